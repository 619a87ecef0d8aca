"""`switchboard export litellm|wilmer [--out PATH] [--with-secrets]`: other tools' configuration.

Keys are environment references unless `--with-secrets` (then files are written mode 0600).
What the LiteLLM file cannot route as Switchboard does is said on stderr (and in its header);
a configuration it cannot say at all (a model name used by two purposes) exits 1, writing
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli.folders import providers_folder
from service.config.export import litellm_export, wilmer_endpoints
from service.config.snapshot import load_folder
from service.config.sops_mac import Known
from service.crypto.sops import Sops
from service.files import write_atomically
from service.settings import Settings
from service.vcs.gitrepo import GitRepo
from service.vcs.seals import history_seals


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """`switchboard export litellm [--out FILE]` / `export wilmer --out DIR` [`--with-secrets`]."""
    if ns.target == "wilmer" and ns.out is None:
        print("switchboard: error: export wilmer needs --out DIR", file=sys.stderr)
        return 2
    providers_folder(settings)
    sops = Sops.from_settings(settings) if ns.with_secrets else None
    snapshot = load_folder(
        settings.providers_dir, settings.providers.as_posix(), sops, _known(settings, sops)
    )
    if ns.target == "litellm":
        export = litellm_export(snapshot, with_secrets=ns.with_secrets)
        for note in export.notes:  # what LiteLLM cannot route as Switchboard does; also in the header
            print(f"switchboard: note: {note}", file=sys.stderr)
        text = export.yaml()
        if ns.out is None:
            print(text, end="")
        else:
            _write(ns.out, text, secret=ns.with_secrets)
            print(f"wrote {ns.out}", file=sys.stderr)
        return 0
    files = wilmer_endpoints(snapshot, with_secrets=ns.with_secrets)
    ns.out.mkdir(parents=True, exist_ok=True)
    for name, endpoint in files.items():
        _write(ns.out / name, json.dumps(endpoint, indent=2) + "\n", secret=ns.with_secrets)
    skipped = sorted(set(snapshot.providers) - {n.removesuffix(".json") for n in files})
    print(f"wrote {len(files)} endpoint file(s) to {ns.out}", file=sys.stderr)
    if skipped:
        print(f"skipped (disabled, or no WilmerAI API type): {', '.join(skipped)}", file=sys.stderr)
    return 0


def _known(settings: Settings, sops: Sops | None) -> Known | None:
    """With secrets, in git: the versions of HEAD's history, each MAC the first version's that
    carried it, for a file changed outside sops (docs/reference.md §2.4)."""
    repo = GitRepo.find(settings.root) if sops is not None else None
    head = repo.head() if repo is not None else None
    return history_seals(repo, settings, [head]) if repo is not None and head is not None else None


def _write(path: Path, text: str, *, secret: bool) -> None:
    write_atomically(path, text.encode("utf-8"), mode=0o600 if secret else 0o644)
