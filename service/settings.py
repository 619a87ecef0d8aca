"""One `Settings` object, built at the edge from flags and `SWITCHBOARD_*` variables."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPLICA_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}\Z")
"""A replica's name (SWITCHBOARD_REPLICA): what a host name may be, and what the other replicas
hear in its heartbeats (docs/reference.md §12)."""

_OTLP_VARIABLES = {
    "otlp_protocol": "OTEL_EXPORTER_OTLP_PROTOCOL",
    "otlp_traces_protocol": "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "otlp_metrics_protocol": "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
}


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
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Processes serving the port (`serve --workers N`, SO_REUSEPORT): one leads (the "
        "watcher, the event log, writes, every API but the gateway's relayed calls), the others relay "
        "gateway calls and pipe every other connection to it. 2 or more needs SWITCHBOARD_REDIS_URL.",
    )

    sops_binary: str = "sops"
    age_key_file: Path | None = Field(
        None, validation_alias=AliasChoices("age_key_file", "SWITCHBOARD_AGE_KEY_FILE", "SOPS_AGE_KEY_FILE")
    )
    age_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("age_key", "SWITCHBOARD_AGE_KEY", "SOPS_AGE_KEY")
    )

    debounce_ms: int = Field(50, ge=1, description="How long the watcher gathers changes into one batch.")
    rescan_s: float = Field(10.0, gt=0, description="A full rescan of the folder at least this often.")
    max_body_bytes: int = Field(16 << 20, gt=0, description="Larger request bodies get 413.")
    max_upstream_bytes: int = Field(
        64 << 20, gt=0, description="Larger non-streamed upstream answers (litellm's too): 502."
    )
    send_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A client that takes nothing of its answer (a stream) for this long is let go "
        "of as one that went away: its connection closed, its upstream request dropped.",
    )
    receive_timeout_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,  # no limit would hold a trickled head for good, where the keep-alive did not
        description="A request whose head has not ended this long after it began, or whose body has "
        "sent nothing for this long, is answered 408 and its connection closed.",
    )
    allowed_upstreams: str | None = Field(
        None,
        description="Where upstream requests may connect: comma-separated CIDRs and host names "
        "(`*.` wildcards), checked on the address connected to, after DNS resolution. Unset: "
        "anywhere but link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata), which "
        "only a listed network within them allows (never a name, nor 0.0.0.0/0).",
    )
    health_interval_s: float = Field(30.0, ge=0, description="Active health checks; 0 turns them off.")
    health_confirm: int = Field(
        2, ge=1, description="Consecutive results a new health status must hold before it is an event."
    )
    circuit_failures: int = Field(3, ge=1, description="Consecutive failures that open a circuit.")
    circuit_cooldown_s: float = Field(30.0, gt=0, description="How long an open circuit stays open.")
    max_watchers: int = Field(2000, ge=0, description="Blocking queries and event streams held at once.")
    max_watchers_per_client: int = Field(
        100,
        ge=0,
        description="Of those, at most this many for one authenticated client, counted by its name "
        "(none without authentication).",
    )

    # Writes over HTTP (docs/reference.md §8)
    write_mode: Literal["commit", "branch", "off"] | None = Field(
        None, description="commit / branch / off; default: commit inside a git repository, else off."
    )
    git_push: str | None = Field(None, description="A remote each write commit (or branch) is pushed to.")
    git_committer: str = Field(
        "Switchboard <switchboard@localhost>", description="The committer of writes over HTTP."
    )

    # Many replicas (docs/reference.md §12)
    replica: str = Field(default_factory=socket.gethostname, description="This replica's name.")
    git_pull: str | None = Field(None, description="REMOTE/BRANCH to fetch and fast-forward to.")
    git_pull_interval_s: float = Field(30.0, gt=0, description="How often the built-in pull fetches.")
    webhook_secret: SecretStr | None = Field(None, description="Checks the git host's push notifications.")
    redis_url: SecretStr | None = Field(
        None, description="Redis for fan-out, heartbeats, and the limits shared by every replica (optional)."
    )

    # Limits and budgets (docs/reference.md §13)
    default_max_tokens: int = Field(
        4096,
        ge=1,
        le=10**9,
        description="The completion tokens a request is taken to ask for when it says nothing and the "
        "model's output limit is unknown (what a budget reserves for it).",
    )
    limits_without_redis: Literal["local", "refuse"] = Field(
        "local",
        description="When Redis cannot be reached: `local` (each replica enforces the limits from its own "
        "counts, and its share of each budget) or `refuse` (limited clients get 503).",
    )

    # The usage ledger (docs/reference.md §13)
    usage_db: SecretStr = Field(
        SecretStr("var/usage.db"),
        description="The ledger: a SQLite file, `postgresql://…` (shared by replicas), or `off`.",
    )
    usage_retention_days: int = Field(
        90, ge=1, description="Raw usage records are kept this long; rollups forever."
    )
    usage_spool: Path = Field(
        Path("var/usage-spool"), description="Records not yet in the ledger's database wait here."
    )

    # Traces (docs/reference.md §14): the exporters read the rest of the `OTEL_EXPORTER_OTLP_*` variables
    otel_exporter: Literal["otlp", "none"] | None = Field(
        None,
        description="otlp: the gateway's spans and metrics go out over OTLP; unset or none: off.",
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        validation_alias=AliasChoices("otlp_protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        description="The OTLP protocol of spans and metrics (default: http/protobuf).",
    )
    otlp_traces_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        validation_alias=AliasChoices("otlp_traces_protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        description="The OTLP protocol of spans, when not `otlp_protocol`.",
    )
    otlp_metrics_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        validation_alias=AliasChoices("otlp_metrics_protocol", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
        description="The OTLP protocol of metrics, when not `otlp_protocol`.",
    )

    log_level: str = "INFO"

    @field_validator("replica", mode="before")
    @classmethod
    def _replica(cls, value: object) -> object:
        """An empty variable is an unset one (the host name); a name the other replicas would
        not list (its heartbeats dropped as malformed) is refused, naming the variable."""
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value:
            return socket.gethostname()
        if not REPLICA_NAME.match(value):
            raise ValueError(
                f"SWITCHBOARD_REPLICA={value!r}: a replica's name is 1 to 253 letters, digits and "
                "`._:@-`, starting with a letter or digit (as a host name)"
            )
        return value

    @field_validator("git_push", "git_pull", mode="before")
    @classmethod
    def _git_remote(cls, value: object) -> object:
        """An empty variable is an unset one (a template's `SWITCHBOARD_GIT_PUSH=`): counted as
        set, it let a replica that pulls commit a write the remote never got (docs/reference.md §12)."""
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("otel_exporter", mode="before")
    @classmethod
    def _exporter(cls, value: object) -> object:
        """An empty variable is an unset one; the name is matched whatever its case."""
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("otlp_protocol", "otlp_traces_protocol", "otlp_metrics_protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object, info: ValidationInfo) -> object:
        """An empty variable is an unset one; another protocol than the exporters' is refused,
        naming the variable."""
        if not isinstance(value, str):
            return value
        value = value.strip().lower()
        if value and value not in ("http/protobuf", "grpc"):
            variable = _OTLP_VARIABLES[info.field_name or ""]
            raise ValueError(
                f"{variable}={value}: Switchboard's OTLP exporters speak 'http/protobuf' or 'grpc'"
            )
        return value or None

    def path(self, path: Path) -> Path:
        """A path relative to the configuration repository."""
        return path if path.is_absolute() else self.root / path

    @property
    def tracing(self) -> bool:
        """Whether the gateway's spans and metrics go out over OTLP (docs/reference.md §14)."""
        return self.otel_exporter == "otlp"

    @property
    def otlp_protocols(self) -> tuple[str, str]:
        """The OTLP protocols of spans and of metrics: the signal's own, else the general one,
        else http/protobuf (the OTLP specification's default)."""
        default = self.otlp_protocol or "http/protobuf"
        return self.otlp_traces_protocol or default, self.otlp_metrics_protocol or default

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
    def usage_spool_dir(self) -> Path:
        return self.path(self.usage_spool)

    @property
    def spent_file(self) -> Path:
        """The local snapshot of budgets' spent (docs/reference.md §13), beside the ledger's spool."""
        return self.usage_spool_dir.parent / "usage-spent.json"

    def age_identity(self) -> str | None:
        """The age identity's text as given (`age_key`, else the file `age_key_file`), for keys
        derived from it one-way; None when there is none, it cannot be read, or it is blank.
        Read at start only, never on a request."""
        secret: str | None = None
        if self.age_key is not None:
            secret = self.age_key.get_secret_value()
        elif self.age_key_file is not None:
            try:
                secret = self.age_key_file.read_text()
            except OSError:
                secret = None
        return secret if secret and secret.strip() else None

    @property
    def sops_config(self) -> Path:
        """`.sops.yaml` of the providers' repository: beside the files' root (`files_root`), so a
        service started from another folder encrypts by the rules `validate` reads there."""
        return self.files_root / ".sops.yaml"
