"""`docs/reference.md` is checked against the code, so that it stays true as the code grows.

Every setting of `service/settings.py`, every command and flag of the CLI's parser, every route
the app registers (with its scope), every event type, every error, every metric, the scopes,
the vendors and the fields of each file format must be named in the reference, in the section
that says what it is; and what the reference names in those tables must exist. A failure says
what is missing and where to add it. The project's documentation stands on its own: no file
points its readers at a developers' document they cannot open.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo

from service import client, console, errors
from service.cli.main import _parser
from service.config.metering import Budget, Limits, Price
from service.config.models import PURPOSES, SCOPES, AiServer, ApiKey, Client, Route, ServerType
from service.http.app import create_app
from service.http.context import METRICS
from service.http.openapi import document
from service.journal.events import EVENT_TYPES, BaseEvent
from service.loop_metrics import LoopCounter, LoopHistogram
from service.settings import Settings
from service.vendors import VENDORS

REPO = Path(__file__).resolve().parents[1]
WHERE = "docs/reference.md"
TEXT = (REPO / WHERE).read_text(encoding="utf-8")
HEADING = re.compile(r"^(#{2,4}) (.+?)\s*$", re.M)
NUMBERED = re.compile(r"^(\d+(?:\.\d+)?)\.? ")
POINTER = re.compile(r"docs/reference\.md §(\d+(?:\.\d+)?)")
ANCHOR = re.compile(r"reference\.md#([\w-]+)")
INSIDE = re.compile(r"\]\(#([\w-]+)\)")


# -- reading the reference --------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    level: int
    title: str
    text: str


def sections() -> list[Section]:
    """Every heading of the reference with its text, up to the next heading of its level or above."""
    found = list(HEADING.finditer(TEXT))
    result = []
    for i, match in enumerate(found):
        level = len(match[1])
        end = next((m.start() for m in found[i + 1 :] if len(m[1]) <= level), len(TEXT))
        result.append(Section(level, match[2], TEXT[match.end() : end]))
    return result


def numbers() -> set[str]:
    """The numbers of the reference's sections: `1`, `2`, `2.1`…"""
    return {m[1] for s in sections() if (m := NUMBERED.match(s.title))}


def section(number: str) -> Section:
    """The section numbered `number` (`6.2`)."""
    for found in sections():
        match = NUMBERED.match(found.title)
        if match and match[1] == number:
            return found
    raise AssertionError(f"{WHERE} has no section {number}: its numbered headings are the places named here")


def tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table of `text`: its body rows (header and rule left out), as cells
    without their backticks."""
    found: list[list[list[str]]] = []
    inside = False
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            inside = False
            continue
        if not inside:
            found.append([])
            inside = True
            continue  # the header
        if re.fullmatch(r"\|[\s|:-]*\|", line):
            continue  # the rule under the header
        found[-1].append([c.strip().replace("`", "") for c in re.split(r"(?<!\\)\|", line.strip("|"))])
    return found


def rows(text: str) -> list[list[str]]:
    """The body rows of every table in `text`."""
    return [row for table in tables(text) for row in table]


def names(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole word (a flag, a field, a variable)."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


# -- settings -------------------------------------------------------------------------------------------


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables of a setting, the first being the one the table's row leads with."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        listed = [a for a in alias.choices if isinstance(a, str) and a.isupper()]
        return sorted(listed, key=lambda a: not a.startswith("SOPS_"))
    return [f"SWITCHBOARD_{name.upper()}"]


def shown_default(name: str, field: FieldInfo) -> str | None:
    """A setting's default as the table writes it; None when computed at start (the host name)."""
    if field.default_factory is not None:
        return None
    value = field.default
    if isinstance(value, SecretStr):  # a default that is no secret, kept as one for what may replace it
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and name.endswith("_bytes") and value % (1 << 20) == 0:
        return f"{value >> 20} MiB"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def flags_of(dest: str) -> set[str]:
    """Every flag of the CLI (the global ones and any command's) that sets the setting `dest`."""
    parsers = [_parser(), *(parser for _, parser in commands())]
    return {opt for parser in parsers for a in parser._actions if a.dest == dest for opt in a.option_strings}


def test_every_setting_is_in_the_settings_table_with_its_default_and_flags() -> None:
    table = rows(section("3.3").text)
    missing = []
    for name, field in Settings.model_fields.items():
        env = env_names(name, field)
        row = next((r for r in table if any(names(r[0], e) for e in env)), None)
        if row is None:
            missing.append(
                f"setting `{name}` (service/settings.py): add a row for `{env[0]}` to the table of "
                f"{WHERE} §3.3: | `{env[0]}` | flag | default | what it does |"
            )
            continue
        missing += [
            f"{WHERE} §3.3: the row of `{env[0]}` must also name `{e}`" for e in env if e not in row[0]
        ]
        default = shown_default(name, field)
        if default is not None and not names(row[2], default):
            missing.append(
                f"{WHERE} §3.3: the default of `{env[0]}` is `{default}` (service/settings.py), "
                f"the table says `{row[2]}`"
            )
        missing += [
            f"{WHERE} §3.3: the row of `{env[0]}` must name its flag `{flag}`"
            for flag in sorted(flags_of(name))
            if not names(row[1], flag)
        ]
    assert not missing, "\n".join(missing)


def test_every_variable_the_reference_names_is_a_setting() -> None:
    known = {e for name, field in Settings.model_fields.items() for e in env_names(name, field)}
    stray = sorted(set(re.findall(r"\bSWITCHBOARD_[A-Z0-9_]+\b", TEXT)) - known)
    assert not stray, f"{WHERE} names variables that service/settings.py does not have: {stray}"


# -- commands ---------------------------------------------------------------------------------------------


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(`audit show`, its parser) for every command of the CLI, nested ones by their full name."""

    def walk(prefix: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix.strip(), parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from walk(f"{prefix} {name}", sub)

    root = _parser()
    for name, parser in walk("", root):
        if parser is not root:
            yield name, parser


def command_sections() -> dict[str, str]:
    return {
        m[1]: s.text
        for s in sections()
        if s.level == 4 and (m := re.fullmatch(r"`switchboard (.+)`", s.title))
    }


def test_every_command_and_flag_is_in_the_reference() -> None:
    documented = command_sections()
    missing = []
    for name, parser in commands():
        text = documented.get(name)
        if text is None:
            missing.append(
                f"command `switchboard {name}` (service/cli/main.py): add a heading "
                f"#### `switchboard {name}` to {WHERE} §3.2, saying what it does and each flag"
            )
            continue
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            said = list(action.option_strings) or [str(action.metavar or action.dest)]
            if not action.option_strings and action.choices:
                said = [str(c) for c in action.choices]
            elif action.choices and action.metavar is None:
                said += [str(c) for c in action.choices]
            missing += [
                f"{WHERE} §3.2, `switchboard {name}`: name `{word}`" for word in said if not names(text, word)
            ]
    known = {name for name, _ in commands()}
    missing += [
        f"{WHERE} §3.2 documents `switchboard {n}`, which the CLI does not have"
        for n in documented
        if n not in known
    ]
    root = _parser()
    missing += [
        f"{WHERE} §3.1: name the global flag `{opt}`"
        for action in root._actions
        for opt in action.option_strings
        if opt not in ("-h", "--help") and not names(section("3.1").text, opt)
    ]
    assert not missing, "\n".join(missing)


# -- HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> web.Application:
    """The service's app on an empty project, built as `serve` builds it (nothing started)."""
    root = tmp_path_factory.mktemp("reference")
    (root / "providers.d").mkdir()
    return create_app(
        Settings(root=root, providers=root / "providers.d", events=root / "var" / "events.jsonl"),
        pages=(console,),
    )


@pytest.fixture(scope="module")
def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app registers; a HEAD that goes with a GET is left out."""
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    return {(m, p) for m, p in routes if not (m == "HEAD" and ("GET", p) in routes)}


def scopes_in_openapi() -> dict[tuple[str, str], str | None]:
    return {
        (method.upper(), path): operation.get("x-switchboard-scope")
        for path, operations in document((console,))["paths"].items()
        for method, operation in operations.items()
    }


NONE = "\u2013"
"""What the tables write for nothing (an en dash): no scope needed, no subject, no field."""


def documented_scope(cell: str) -> str | None:
    """The scope a row's cell names: NONE (no token), `any valid token` (any), or the scope."""
    scope = cell.split(" (")[0].strip()
    return {NONE: None, "any valid token": "any"}.get(scope, scope)


def test_every_route_is_in_the_endpoints_table_with_its_scope(app_routes: set[tuple[str, str]]) -> None:
    table = {(r[0], r[1]): r for r in rows(section("6.2").text)}
    scopes = scopes_in_openapi()
    missing = []
    for method, path in sorted(app_routes):
        scope = scopes.get((method, path))
        shown = {None: NONE, "any": "any valid token"}.get(scope, scope)
        row = table.get((method, path))
        if row is None:
            missing.append(
                f"route `{method} {path}` (registered by the app): add a row to the table of "
                f"{WHERE} §6.2: | `{method}` | `{path}` | {shown} | what it answers |"
            )
        elif (method, path) in scopes and documented_scope(row[2]) != scope:
            missing.append(
                f"{WHERE} §6.2: `{method} {path}` needs the scope {shown}, the table says {row[2]}"
            )
    missing += [
        f"{WHERE} §6.2 lists `{m} {p}`, which the app does not register"
        for m, p in table
        if (m, p) not in app_routes
    ]
    assert not missing, "\n".join(missing)


def http_errors() -> list[type[errors.HTTPError]]:
    """Every error answered over HTTP; a private base class (`_Throttled`, the 429s' headers) is
    never raised itself, so it inherits `HTTPError`'s type with its own status and has no row."""
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.HTTPError)
        and cls.__module__ == errors.__name__
        and not cls.__name__.startswith("_")
    ]


def test_every_error_type_is_in_the_errors_table_with_its_status() -> None:
    table = {r[0]: r for r in rows(section("6.4").text)}
    missing = []
    for cls in http_errors():
        row = table.get(cls.type)
        if row is None:
            missing.append(
                f"error {cls.__name__} (service/errors.py): add a row to the table of {WHERE} §6.4: "
                f"| `{cls.type}` | {cls.status} | when it is answered |"
            )
        elif row[1] != str(cls.status):
            missing.append(f"{WHERE} §6.4: `{cls.type}` is answered {cls.status}, the table says {row[1]}")
    types = {cls.type for cls in http_errors()}
    missing += [
        f"{WHERE} §6.4 lists `{t}`, which no error of service/errors.py has" for t in table if t not in types
    ]
    assert not missing, "\n".join(missing)


def test_every_other_error_class_is_in_the_command_line_errors_table() -> None:
    table = {r[0] for r in rows(section("3.4").text)}
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.SwitchboardError)
        and cls is not errors.SwitchboardError
        and (cls is errors.HTTPError or not issubclass(cls, errors.HTTPError))
    ]
    missing = [
        f"error {cls.__name__} (service/errors.py): add a row to the table of {WHERE} §3.4: "
        f"| `{cls.__name__}` | the case, as a user meets it |"
        for cls in classes
        if cls.__name__ not in table
    ]
    assert not missing, "\n".join(missing)


def test_every_metric_is_in_the_metrics_table_with_its_labels(app: web.Application) -> None:
    table = {r[0]: r for r in rows(section("6.5").text)}
    missing = []
    exported = set()
    # The app's metrics, as objects: their names, types and label names.
    for metric in vars(app[METRICS]).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client keeps the name, type and label names in these attributes.
            family, kind, labelnames = metric._name, metric._type, metric._labelnames
        elif isinstance(metric, LoopCounter | LoopHistogram):  # the loop-local ones, in public ones
            family, kind, labelnames = metric.name, metric.type, metric.labelnames
        else:
            continue
        name = family + ("_total" if kind == "counter" else "")
        exported.add(name)
        row = table.get(name)
        if row is None:
            missing.append(
                f"metric `{name}` (service/metrics.py): add a row to the table of {WHERE} §6.5: "
                f"| `{name}` | {', '.join(f'`{x}`' for x in labelnames)} | what it counts |"
            )
            continue
        missing += [
            f"{WHERE} §6.5: the row of `{name}` must name its label `{label}`"
            for label in labelnames
            if not names(row[1], label)
        ]
    missing += [
        f"{WHERE} §6.5 lists `{n}`, which service/metrics.py does not export"
        for n in table
        if n not in exported
    ]
    assert not missing, "\n".join(missing)


# -- events -----------------------------------------------------------------------------------------------


def test_every_event_type_is_in_the_events_table_with_its_own_fields() -> None:
    table = {r[0]: r for r in rows(section("5.2").text)}
    common = set(BaseEvent.model_fields)
    missing = []
    for cls in EVENT_TYPES:
        kind = cls.model_fields["type"].default
        row = table.get(kind)
        own = sorted(set(cls.model_fields) - common)
        if row is None:
            missing.append(
                f"event `{kind}` ({cls.__name__}, service/journal/events.py): add a row to the table of "
                f"{WHERE} §5.2: | `{kind}` | subject | {', '.join(f'`{f}`' for f in own) or NONE} | when |"
            )
            continue
        missing += [
            f"{WHERE} §5.2: the row of `{kind}` must name its field `{f}`"
            for f in own
            if not names(row[2], f)
        ]
    kinds = {cls.model_fields["type"].default for cls in EVENT_TYPES}
    missing += [f"{WHERE} §5.2 lists `{k}`, which is not an event type" for k in table if k not in kinds]
    first = {r[0] for r in rows(section("5.1").text)}
    missing += [
        f"{WHERE} §5.1: add the field `{f}` every event has" for f in sorted(common) if f not in first
    ]
    assert not missing, "\n".join(missing)


# -- files ------------------------------------------------------------------------------------------------


def test_every_field_of_every_file_kind_is_in_its_section() -> None:
    provider_fields = {r[0] for r in rows(section("2.1").text)}
    missing = [
        f"{WHERE} §2.1: add the provider field `{f}` ({m.__name__}, service/config/models.py) to the table"
        for m in (AiServer, ApiKey)
        for f in m.model_fields
        if f not in provider_fields
    ]
    parts: list[tuple[str, type[Any], str]] = [
        ("2.1", Price, "prices"),
        ("2.1", Budget, "budget"),
        ("2.2", Route, "route"),
        ("2.3", Client, "client"),
        ("2.3", Limits, "limits"),
    ]
    for number, model, what in parts:
        text = section(number).text
        missing += [
            f"{WHERE} §{number}: name the {what} field `{f}` ({model.__name__})"
            for f in model.model_fields
            if not names(text, f)
        ]
    text = section("2.1").text
    missing += [
        f"{WHERE} §2.1: name the server type `{t}`" for t in get_args(ServerType) if not names(text, t)
    ]
    missing += [
        f"{WHERE} §2.2: name the purpose `{p}`" for p in PURPOSES if not names(section("2.2").text, p)
    ]
    assert not missing, "\n".join(missing)


def test_every_vendor_is_in_the_vendors_table_with_its_url_and_protocol() -> None:
    (vendors,) = [t for t in tables(section("2.1").text) if t and t[0][0] in VENDORS]
    table = {r[0]: r for r in vendors}
    missing = []
    for name, vendor in VENDORS.items():
        protocol = "forwarded directly" if vendor.openai_compatible else "through litellm"
        row = table.get(name)
        if row is None or row[1] != vendor.base_url or row[2] != protocol:
            missing.append(
                f"vendor `{name}` (service/vendors.py): the vendors' table of {WHERE} §2.1 needs "
                f"| `{name}` | `{vendor.base_url}` | {protocol} |"
            )
    missing += [
        f"{WHERE} §2.1 lists the vendor `{n}`, which service/vendors.py does not know"
        for n in table
        if n not in VENDORS
    ]
    assert not missing, "\n".join(missing)


def test_every_scope_is_in_the_scopes_table() -> None:
    table = {r[0] for r in rows(section("2.3").text)}
    missing = [f"{WHERE} §2.3: add the scope `{s}` to the scopes' table" for s in SCOPES if s not in table]
    assert not missing, "\n".join(missing)


def test_every_name_the_python_client_exports_is_in_its_section() -> None:
    text = section("11").text
    missing = [f"{WHERE} §11: name `service.client.{n}`" for n in client.__all__ if not names(text, n)]
    assert not missing, "\n".join(missing)


# -- the documentation stands on its own -----------------------------------------------------------------


def tracked_files() -> list[Path]:
    """The repository's files as git has them (untracked and ignored ones left out)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def lines_of(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return []  # an image, say


CONTRACT = "SP" + "EC"  # spelled so, this file does not name it
"""The developers' product contract: not in the repository, so no reader can open it."""


def test_nothing_sends_readers_to_a_document_that_is_not_in_the_repository() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
        for path in tracked_files()
        if path.name != "CHANGELOG.md"  # the history, as it was written
        for number, line in enumerate(lines_of(path), 1)
        if re.search(rf"\b{CONTRACT}\b", line)
    ]
    assert not found, (
        f"these lines send readers to {CONTRACT}.md, which is not in the repository: point them at the "
        f"section of {WHERE} that says it (`docs/reference.md §8`), or say it in words\n" + "\n".join(found)
    )


def slug(title: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_every_pointer_into_the_reference_names_a_section_it_has() -> None:
    """`docs/reference.md §8` in a comment, `reference.md#8-writes-over-http` in a link."""
    known, anchors = numbers(), {slug(s.title) for s in sections()}
    found = []
    for path in tracked_files():
        for number, line in enumerate(lines_of(path), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            found += [f"{where}: §{m[1]}" for m in POINTER.finditer(line) if m[1] not in known]
            found += [f"{where}: #{m[1]}" for m in ANCHOR.finditer(line) if m[1] not in anchors]
            if path.name == "reference.md":  # its own table of contents
                found += [f"{where}: #{m[1]}" for m in INSIDE.finditer(line) if m[1] not in anchors]
    assert not found, f"these point at sections {WHERE} does not have:\n" + "\n".join(found)
