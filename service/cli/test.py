"""`switchboard test ID`: health-check one provider now, with its decrypted key."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from service.config.loader import Loaded, decrypt, is_config_file, parse
from service.config.models import ID_PATTERN, AiServer, ApiKey, Provider
from service.config.upstreams import AllowedUpstreams
from service.crypto.sops import Sops
from service.errors import FileRejected, NotFound
from service.gateway.health import CheckResult, check
from service.gateway.transports.base import open_session
from service.settings import Settings
from service.vcs.gitrepo import GitRepo
from service.vcs.seals import history_seals


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Load and decrypt one provider's file, check it now, print the result; 1 when it failed."""
    provider_id: str = ns.provider_id
    if not re.fullmatch(ID_PATTERN, provider_id):  # wrong usage; nor is `../x` a way out of the folder
        print(f"switchboard: error: ID: {provider_id!r} is not a provider id", file=sys.stderr)
        return 2
    folder = settings.providers_dir
    files = [folder / f"{provider_id}.{ext}" for ext in ("yaml", "yml")]
    found = [f for f in files if f.is_file() and is_config_file(f.name)]
    if not found:
        raise NotFound(f"no provider file {provider_id}.yaml in {folder}")
    path = found[0]
    name = path.absolute().relative_to(settings.files_root).as_posix()
    parsed = parse(name, path.read_bytes())
    refused = _changed_outside_sops(parsed, settings)
    if refused is not None:  # before sops is asked: its MAC would pass, and the key be sent
        raise refused
    loaded = decrypt(parsed, Sops.from_settings(settings))
    provider = loaded.document
    if not isinstance(provider, AiServer | ApiKey):
        raise NotFound(f"{name} is not a provider (kind: {provider.kind})")
    allowed = AllowedUpstreams.parse(settings.allowed_upstreams)
    result = asyncio.run(_check_once(provider, allowed))
    verdict = "ok" if result.ok else "failed"
    print(f"{provider_id}: {verdict} in {result.latency_ms:.1f} ms: {result.message}")
    return 0 if result.ok else 1


def _changed_outside_sops(parsed: Loaded, settings: Settings) -> FileRejected | None:
    """The refusal of a key-holding file carrying the MAC of the version that first carried it
    in git's history while its data differs (docs/reference.md §2.4); None outside git."""
    repo = GitRepo.find(settings.root) if parsed.seal is not None else None
    head = repo.head() if repo is not None else None
    if repo is None or head is None:
        return None
    return parsed.changed_outside_sops(history_seals(repo, settings, [head]))


async def _check_once(provider: Provider, allowed: AllowedUpstreams) -> CheckResult:
    async with open_session(allowed) as session:
        return await check(provider, session)
