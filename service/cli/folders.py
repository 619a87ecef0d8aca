"""What several commands need of the providers folder before they start."""

from __future__ import annotations

from service.errors import SwitchboardError
from service.settings import Settings


def providers_folder(settings: Settings) -> None:
    """Refuse a providers folder that does not exist: one error line, exit 1 (`cli.main`), not
    an empty export, nothing re-encrypted or nothing served as if it had no file."""
    if not settings.providers_dir.is_dir():
        raise SwitchboardError(f"{settings.providers_dir}: no such folder")
