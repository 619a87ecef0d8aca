"""`switchboard rotate [--add-recipient R…] [--remove-recipient R…]`: new data keys everywhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from service.cli.folders import providers_folder
from service.config.sops_rules import recipients
from service.crypto.keys import is_recipient
from service.crypto.rotation import Rotation, RotationStopped, encrypted_files, rotate, update_recipients
from service.crypto.sops import Sops
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """`switchboard rotate [--add-recipient R…] [--remove-recipient R…]`; 2 for a malformed recipient."""
    for flag, given in (("--add-recipient", ns.add_recipient), ("--remove-recipient", ns.remove_recipient)):
        for recipient in given:
            if not is_recipient(recipient):  # wrong usage: checked before `.sops.yaml` is touched
                print(f"switchboard: error: {flag}: not an age recipient: {recipient!r}", file=sys.stderr)
                return 2
    providers_folder(settings)
    listed = set(recipients(settings.sops_config))
    for recipient in ns.remove_recipient:
        if recipient not in listed:  # already gone, or another key than meant: nothing revoked
            print(
                f"switchboard: warning: --remove-recipient: {recipient} is not a recipient in "
                f"{settings.sops_config.name}; nothing to remove",
                file=sys.stderr,
            )
    sops = Sops.from_settings(settings)
    desired = update_recipients(settings.sops_config, ns.add_recipient, ns.remove_recipient)
    files = encrypted_files(settings.providers_dir)
    try:
        if sys.stderr.isatty():
            result = _with_progress_bar(files, sops, desired)
        else:
            result = rotate(files, sops, desired, progress=lambda p: print(f"rotated {sops.relative(p)}"))
    except RotationStopped as exc:
        print(
            f"switchboard: rotated {len(exc.done)} of {len(exc.done) + len(exc.pending)} file(s); "
            f"{exc.file} and the {len(exc.pending) - 1} after it are unchanged; "
            "fix the cause and run `switchboard rotate` again",
            file=sys.stderr,
        )
        raise
    print(f"{len(result.rotated)} file(s) re-encrypted with new data keys for {len(desired)} recipient(s)")
    return 0


def _with_progress_bar(files: list[Path], sops: Sops, desired: Sequence[str]) -> Rotation:
    # rich, already a dependency; drawn on stderr so stdout stays clean for scripts.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("rotating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=len(files))

        def advance(path: Path) -> None:
            bar.update(task, advance=1, description=sops.relative(path))

        return rotate(files, sops, desired, progress=advance)
