"""One `Settings` object, built at the edge from flags and `SWITCHBOARD_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service and the commands need; passed explicitly, never read deep inside.

    Flags win over `SWITCHBOARD_*` environment variables, which win over the defaults. The
    age identity comes from `SOPS_AGE_KEY_FILE` / `SOPS_AGE_KEY`, as sops itself reads them.
    """

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", frozen=True, extra="forbid")

    root: Path = Field(Path(), description="The configuration repository (where .sops.yaml lives).")
    providers: Path = Field(Path("providers.d"), description="The folder of provider files.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    events: Path = Field(Path("var/events.jsonl"), description="The event log (JSON Lines).")

    sops_binary: str = "sops"
    age_key_file: Path | None = Field(
        None, validation_alias=AliasChoices("age_key_file", "SWITCHBOARD_AGE_KEY_FILE", "SOPS_AGE_KEY_FILE")
    )
    age_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("age_key", "SWITCHBOARD_AGE_KEY", "SOPS_AGE_KEY")
    )

    debounce_ms: int = Field(50, ge=1, description="How long the watcher gathers changes into one batch.")
    max_body_bytes: int = Field(16 << 20, gt=0, description="Larger request bodies get 413.")
    health_interval_s: float = Field(30.0, ge=0, description="Active health checks; 0 turns them off.")
    circuit_failures: int = Field(3, ge=1, description="Consecutive failures that open a circuit.")
    circuit_cooldown_s: float = Field(30.0, gt=0, description="How long an open circuit stays open.")
    log_level: str = "INFO"

    def path(self, path: Path) -> Path:
        """A path relative to the configuration repository."""
        return path if path.is_absolute() else self.root / path

    @property
    def providers_dir(self) -> Path:
        return self.path(self.providers)

    @property
    def files_root(self) -> Path:
        """What the `file` of events and answers is relative to: the repository root, or, for a
        providers folder outside it, the folder's parent (so names read `providers.d/x.yaml`)."""
        providers, root = self.providers_dir.absolute(), self.root.absolute()
        return root if providers.is_relative_to(root) else providers.parent

    @property
    def events_file(self) -> Path:
        return self.path(self.events)

    @property
    def sops_config(self) -> Path:
        return self.root / ".sops.yaml"
