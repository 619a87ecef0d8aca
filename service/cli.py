"""The `switchboard` command. `cli(*args)` is what tests call; `main()` is the console script.

Exit codes: 0 success, 1 the check or operation found problems, 2 wrong usage. Errors are
one line each on stderr, never a traceback: every SwitchboardError is turned into a message
here, in one place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from service import __version__
from service.errors import ConfigError, SwitchboardError
from service.models import Scope
from service.settings import Settings

if TYPE_CHECKING:
    from service.sops import Sops

Command = Callable[[argparse.Namespace, Settings], int]


def main() -> int:
    """Console script entry point."""
    return cli(*sys.argv[1:])


def cli(*args: str) -> int:
    """Run one command; returns its exit code."""
    parser = _parser()
    ns = parser.parse_args(args)
    try:
        settings = _settings(ns)
        command: Command = ns.command
        return command(ns, settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except SwitchboardError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            print(f"switchboard: error: setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("switchboard: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"switchboard: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, never a traceback (SPEC 3); our messages hold no secrets
        print(f"switchboard: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _settings(ns: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(ns).items()
        if key in Settings.model_fields and value is not None and key != "command"
    }
    return Settings(**overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="GitOps configuration service and gateway for LLM providers."
    )
    parser.add_argument("--version", action="version", version=f"switchboard {__version__}")
    parser.add_argument("--root", type=Path, help="the configuration repository (default: here)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check provider files (for CI and pre-commit)")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    p.add_argument("--format", choices=["text", "json", "github"], default="text")
    p.add_argument("--decrypt", action="store_true", help="also decrypt each file and check its MAC")
    p.set_defaults(command=_validate)

    p = sub.add_parser("schema", help="write schemas/*.schema.json from the models")
    p.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    p.set_defaults(command=_schema)

    p = sub.add_parser("keygen", help="make an age identity and add its recipient to .sops.yaml")
    p.add_argument("--key-file", type=Path, help="default: ~/.config/sops/age/keys.txt")
    p.set_defaults(command=_keygen)

    p = sub.add_parser("encrypt", help="encrypt files in place with the project's rules")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(command=_encrypt)

    p = sub.add_parser("edit", help="edit an encrypted file through sops")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(command=_edit)

    p = sub.add_parser("serve", help="run the service")
    p.add_argument("--providers", type=Path, metavar="DIR", help="default: providers.d")
    p.add_argument("--host", metavar="H", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, metavar="P", help="default: 8080")
    p.add_argument("--events", type=Path, metavar="FILE", help="default: var/events.jsonl")
    p.set_defaults(command=_serve)

    p = sub.add_parser("audit", help="read or check the event log")
    audit = p.add_subparsers(required=True, metavar="ACTION")
    q = audit.add_parser("show", help="events, oldest first")
    q.add_argument("--subject", metavar="ID")
    q.add_argument("--type", dest="event_type", metavar="T", help="a type, or a family like `provider`")
    q.add_argument("--since", metavar="T", help="ISO 8601, a date, or 10m / 2h / 3d ago")
    q.add_argument("--until", metavar="T")
    q.add_argument("--limit", type=int, metavar="N", help="the N most recent")
    q.add_argument("--format", choices=["text", "json"], default="text")
    q.add_argument("--events", type=Path, metavar="FILE")
    q.set_defaults(command=_audit_show)
    q = audit.add_parser("verify", help="check the hash chain; names the first bad seq")
    q.add_argument("--events", type=Path, metavar="FILE")
    q.set_defaults(command=_audit_verify)

    p = sub.add_parser("state", help="the configuration as it stood at a time, from the event log")
    p.add_argument("--at", metavar="TIME", help="default: now")
    p.add_argument("--events", type=Path, metavar="FILE")
    p.set_defaults(command=_state)

    p = sub.add_parser("token", help="API tokens")
    token = p.add_subparsers(required=True, metavar="ACTION")
    q = token.add_parser("create", help="make a token, print it once, add its hash to the clients file")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--scope", nargs="+", required=True, choices=list(get_args(Scope)), metavar="S")
    q.add_argument("--providers", type=Path, metavar="DIR")
    q.set_defaults(command=_token_create)

    p = sub.add_parser("test", help="health-check one provider now")
    p.add_argument("provider_id", metavar="ID")
    p.set_defaults(command=_lazy("service.health", "command"))

    p = sub.add_parser("rotate", help="re-encrypt every file with a new data key, updating recipients")
    p.add_argument("--add-recipient", action="append", default=[], metavar="R")
    p.add_argument("--remove-recipient", action="append", default=[], metavar="R")
    p.set_defaults(command=_lazy("service.rotate", "command"))

    p = sub.add_parser("plan", help="semantic diff of the configuration between two git revisions")
    p.add_argument("base", nargs="?", metavar="BASE", help="default: the merge base with the default branch")
    p.add_argument("head", nargs="?", metavar="HEAD", help="default: the working tree")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(command=_lazy("service.plan", "command"))

    p = sub.add_parser("export", help="LiteLLM proxy config.yaml, or WilmerAI endpoint files")
    p.add_argument("target", choices=["litellm", "wilmer"])
    p.add_argument("--out", type=Path, metavar="PATH")
    p.add_argument("--with-secrets", action="store_true", help="write decrypted keys, not env references")
    p.set_defaults(command=_lazy("service.export", "command"))
    return parser


def _lazy(module: str, name: str) -> Command:
    """A command whose module is imported only when it runs, so `switchboard` starts fast."""

    def command(ns: argparse.Namespace, settings: Settings) -> int:
        import importlib

        function: Command = getattr(importlib.import_module(module), name)
        return function(ns, settings)

    return command


# -- commands ------------------------------------------------------------------------------


def make_sops(settings: Settings) -> Sops:
    """The sops runner for these settings (the identity from SOPS_AGE_KEY_FILE / SOPS_AGE_KEY)."""
    from service.secret import Secret
    from service.sops import Sops

    key = Secret(settings.age_key.get_secret_value()) if settings.age_key else None
    return Sops(
        settings.sops_binary, age_key_file=settings.age_key_file, age_key=key, project_root=settings.root
    )


def _validate(ns: argparse.Namespace, settings: Settings) -> int:
    from service.validate import collect, render, validate

    paths = list(ns.paths) or [settings.providers_dir]
    missing = [p for p in paths if not p.exists()]
    if missing:
        for path in missing:
            print(f"switchboard: error: {path}: no such file or folder", file=sys.stderr)
        return 1
    problems = validate(paths, sops=make_sops(settings) if ns.decrypt else None)
    files = len(collect(paths))
    output = render(problems, ns.format, files)
    if output:
        print(output)
    if ns.format == "text":
        verdict = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{files} file(s) checked: {verdict}", file=sys.stderr)
    return 1 if problems else 0


def _schema(ns: argparse.Namespace, settings: Settings) -> int:
    from service.schemas import render_schemas

    folder = settings.root / "schemas"
    stale = []
    for name, text in render_schemas().items():
        path = folder / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not ns.check:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if ns.check and stale:
        for path in stale:
            print(f"{path}: stale; run `switchboard schema`", file=sys.stderr)
        return 1
    return 0


def _keygen(ns: argparse.Namespace, settings: Settings) -> int:
    from service.keys import add_recipient, default_key_file, write_identity

    config_home = os.environ.get("XDG_CONFIG_HOME")
    key_file = ns.key_file or default_key_file(Path.home(), Path(config_home) if config_home else None)
    recipient = write_identity(key_file)
    added = add_recipient(settings.sops_config, recipient)
    print(f"identity: {key_file} (private: keep it out of git)")
    print(f"recipient: {recipient}")
    if added:
        print(f"added the recipient to {settings.sops_config}")
    return 0


def _encrypt(ns: argparse.Namespace, settings: Settings) -> int:
    sops = make_sops(settings)
    for path in ns.files:
        sops.encrypt_in_place(path)
        print(f"encrypted {path}")
    return 0


def _edit(ns: argparse.Namespace, settings: Settings) -> int:
    from service.validate import render, validate

    code = int(make_sops(settings).edit(ns.file))
    if code not in (0, 200):
        return 1
    problems = validate([ns.file])
    if problems:
        print(render(problems, "text", 1))
        return 1
    return 0


def _serve(ns: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from service.app import create_app
    from service.auth import is_loopback

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.providers_dir.is_dir():
        print(f"switchboard: error: {settings.providers_dir}: no such folder", file=sys.stderr)
        return 1
    has_clients = any((settings.providers_dir / f"clients.{ext}").exists() for ext in ("yaml", "yml"))
    if not has_clients and not is_loopback(settings.host):
        print(
            f"switchboard: error: refusing to listen on {settings.host} without authentication: "
            f"there is no clients file in {settings.providers_dir} "
            "(create one with `switchboard token create`), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 1
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=None,
        shutdown_timeout=10,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        print=lambda line: logging.getLogger("service").info(line.strip()),
    )
    return 0


def _audit_show(ns: argparse.Namespace, settings: Settings) -> int:
    from service.audit import filter_events, parse_time
    from service.events import read_events

    events = read_events(settings.events_file)
    try:
        since = parse_time(ns.since) if ns.since else None
        until = parse_time(ns.until) if ns.until else None
    except ValueError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 2
    for event in filter_events(events, ns.subject, ns.event_type, since, until, ns.limit):
        if ns.format == "json":
            print(event.model_dump_json())
            continue
        commit = (event.commit or "")[:10] or ("uncommitted" if event.uncommitted else "-")
        fields = ", ".join(event.changes) or getattr(event, "reason", None) or ""
        line = f"{event.seq:>6} {event.model_dump(mode='json')['ts']} {event.type:<24} {event.subject or '-'}"
        print(f"{line} [{commit}] {event.author or ''} {fields}".rstrip())
    return 0


def _audit_verify(ns: argparse.Namespace, settings: Settings) -> int:
    from service.events import verify

    count = verify(settings.events_file)
    print(f"{settings.events_file}: {count} events, hash chain intact")
    return 0


def _state(ns: argparse.Namespace, settings: Settings) -> int:
    from service.audit import parse_time, replay
    from service.events import read_events

    try:
        at = parse_time(ns.at) if ns.at else None
    except ValueError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(replay(read_events(settings.events_file), at), indent=2, sort_keys=True))
    return 0


def _token_create(ns: argparse.Namespace, settings: Settings) -> int:
    from service.tokens import create_token

    token, path = create_token(settings.providers_dir, ns.name, ns.scope)
    print(token)
    print(f"added client {ns.name!r} to {path}; the token is shown only this once", file=sys.stderr)
    return 0
