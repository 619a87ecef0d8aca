"""`switchboard keygen [--key-file F]`: an age identity, its recipient added to `.sops.yaml`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from service.crypto.keys import add_recipient, default_key_file, write_identity
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Make the identity (never over an existing one) and print where it is and its recipient."""
    config_home = os.environ.get("XDG_CONFIG_HOME")
    # where sops and the service read it when set (SOPS_AGE_KEY_FILE), else where sops looks
    key_file = (
        ns.key_file
        or settings.age_key_file
        or default_key_file(Path.home(), Path(config_home) if config_home else None)
    )
    recipient = write_identity(key_file)
    added = add_recipient(settings.sops_config, recipient)
    print(f"identity: {key_file} (private: keep it out of git)")
    print(f"recipient: {recipient}")
    if added:
        print(f"added the recipient to {settings.sops_config}")
    return 0
