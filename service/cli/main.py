"""The `switchboard` command. `cli(*args)` is what tests call; `main()` is the console script.

The parser is the table of contents; each command runs from its own module,
`service.cli.<command>`, imported only when that command runs.

Exit codes: 0 success, 1 the check or operation found problems, 2 wrong usage. Errors are
one line each on stderr, never a traceback: every SwitchboardError is turned into a message
here, in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import AliasChoices, ValidationError

from service import __version__
from service.config.models import Scope
from service.errors import ConfigError, SwitchboardError
from service.settings import Settings

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
            print(f"switchboard: error: setting {_named(where)}: {error['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("switchboard: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"switchboard: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except (
        Exception
    ) as exc:  # one line, never a traceback (docs/reference.md §3); our messages hold no secrets
        print(f"switchboard: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _named(field: str) -> str:
    """A setting as its error names it: the environment variable an operator sets, then its
    field (`SWITCHBOARD_RECEIVE_TIMEOUT_S (receive_timeout_s)`)."""
    info = Settings.model_fields.get(field)
    if info is None:
        return field
    alias = info.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else []
    names = [c for c in choices if isinstance(c, str) and c.isupper()]
    return f"{names[0] if names else 'SWITCHBOARD_' + field.upper()} ({field})"


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
    p.set_defaults(command=_lazy("validate"))

    p = sub.add_parser("schema", help="write schemas/*.schema.json from the models")
    p.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    p.set_defaults(command=_lazy("schema"))

    p = sub.add_parser("keygen", help="make an age identity and add its recipient to .sops.yaml")
    p.add_argument("--key-file", type=Path, help="default: ~/.config/sops/age/keys.txt")
    p.set_defaults(command=_lazy("keygen"))

    p = sub.add_parser("encrypt", help="encrypt files in place with the project's rules")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(command=_lazy("encrypt"))

    p = sub.add_parser("edit", help="edit an encrypted file through sops")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(command=_lazy("edit"))

    p = sub.add_parser("serve", help="run the service")
    p.add_argument("--providers", type=Path, metavar="DIR", help="default: providers.d")
    p.add_argument("--host", metavar="H", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, metavar="P", help="default: 8080")
    p.add_argument("--events", type=Path, metavar="FILE", help="default: var/events.jsonl")
    p.add_argument("--workers", type=int, metavar="N", help="processes on the port (default: 1)")
    p.add_argument("--follow", metavar="DIR", help=argparse.SUPPRESS)  # a follower's leader (workers)
    p.add_argument("--worker", type=int, metavar="K", help=argparse.SUPPRESS)
    p.add_argument("--leader", type=int, metavar="PID", help=argparse.SUPPRESS)
    p.set_defaults(command=_lazy("serve"))

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
    q.set_defaults(command=_lazy("audit", "show"))
    q = audit.add_parser("verify", help="check the hash chain; names the first bad seq")
    q.add_argument("--events", type=Path, metavar="FILE")
    q.set_defaults(command=_lazy("audit", "verify"))

    p = sub.add_parser("state", help="the configuration as it stood at a time, from the event log")
    p.add_argument("--at", metavar="TIME", help="default: now")
    p.add_argument("--events", type=Path, metavar="FILE")
    p.set_defaults(command=_lazy("state"))

    p = sub.add_parser("token", help="API tokens")
    token = p.add_subparsers(required=True, metavar="ACTION")
    q = token.add_parser("create", help="make a token, print it once, add its hash to the clients file")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--scope", nargs="+", required=True, choices=list(get_args(Scope)), metavar="S")
    q.add_argument("--providers", type=Path, metavar="DIR")
    q.set_defaults(command=_lazy("token", "create"))

    p = sub.add_parser("test", help="health-check one provider now")
    p.add_argument("provider_id", metavar="ID")
    p.set_defaults(command=_lazy("test"))

    p = sub.add_parser("rotate", help="re-encrypt every file with a new data key, updating recipients")
    p.add_argument("--add-recipient", action="extend", nargs="+", default=[], metavar="R")
    p.add_argument("--remove-recipient", action="extend", nargs="+", default=[], metavar="R")
    p.set_defaults(command=_lazy("rotate"))

    p = sub.add_parser("plan", help="semantic diff of the configuration between two git revisions")
    p.add_argument("base", nargs="?", metavar="BASE", help="default: the merge base with the default branch")
    p.add_argument("head", nargs="?", metavar="HEAD", help="default: the working tree")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(command=_lazy("plan"))

    p = sub.add_parser("usage", help="the usage ledger, grouped: who spent what, where")
    p.add_argument("--since", metavar="T", help="ISO 8601, a date, or 10m / 2h / 3d ago (default: 7d)")
    p.add_argument("--until", metavar="T", help="default: now")
    p.add_argument(
        "--by", metavar="KEYS", help="client, provider, model, purpose, hour, day, month; comma-separated"
    )
    p.add_argument("--client", metavar="NAME")
    p.add_argument("--provider", metavar="ID")
    p.add_argument("--model", metavar="M")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--db", dest="usage_db", metavar="DB", help="default: SWITCHBOARD_USAGE_DB, var/usage.db")
    p.set_defaults(command=_lazy("usage"))

    p = sub.add_parser("export", help="LiteLLM proxy config.yaml, or WilmerAI endpoint files")
    p.add_argument("target", choices=["litellm", "wilmer"])
    p.add_argument("--out", type=Path, metavar="PATH")
    p.add_argument("--with-secrets", action="store_true", help="write decrypted keys, not env references")
    p.set_defaults(command=_lazy("export"))
    return parser


def _lazy(module: str, name: str = "run") -> Command:
    """`service.cli.<module>.<name>`, imported only when it runs, so `switchboard` starts fast."""

    def command(ns: argparse.Namespace, settings: Settings) -> int:
        function: Command = getattr(importlib.import_module(f"service.cli.{module}"), name)
        return function(ns, settings)

    return command
