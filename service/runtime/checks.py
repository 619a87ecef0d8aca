"""What a write must be before it is drafted, and what it must leave valid (docs/reference.md
§8): refused 422.

A request body is checked before anything is rendered or encrypted; the file a draft makes is
validated exactly as `switchboard validate` would validate the commit (the file, then the folder
at the base with it), so a refusal writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from yarl import URL

from service.config import editing
from service.config.loader import Loaded, is_config_file, parse, refused_provider
from service.config.models import ID_PATTERN, PURPOSES, SECRET_FIELDS
from service.config.secret import unsendable
from service.config.snapshot import cross_check
from service.config.upstreams import SETTING, AllowedUpstreams, Lookup, host_refusal
from service.errors import FileRejected, NotFound, Problem, Unprocessable
from service.vendors import VENDORS

KEEP = object()
"""Stands for the key a file holds in a replacement that leaves `api_key` out: it is kept."""


def provider_body(kind: str, body: Mapping[str, Any], provider_id: str | None = None) -> dict[str, Any]:
    """The provider document `body` says, of `kind` (and `provider_id` when the path names one)."""
    if not isinstance(body, Mapping):
        raise Unprocessable("the body must be a JSON object", problems=[problem("", "", "not an object")])
    document = dict(body)
    given = document.setdefault("kind", kind)
    if given != kind:
        raise Unprocessable(
            f"`kind` is {given!r} but this route writes {kind!r}",
            problems=[problem("", "kind", f"must be {kind}")],
        )
    if provider_id is not None and document.setdefault("id", provider_id) != provider_id:
        raise Unprocessable(
            "`id` must be the id in the path", problems=[problem("", "id", "must match the path")]
        )
    if not isinstance(document.get("id"), str) or not re.fullmatch(ID_PATTERN, document["id"]):
        found = problem("", "id", f"required: a string matching {ID_PATTERN}")
        raise Unprocessable(
            "`id` must be a lowercase name that the file can be named after", problems=[found]
        )
    check_body(document)
    return document


def check_body(document: dict[str, Any]) -> None:
    """What must hold before anything is rendered or encrypted; a key's surrounding whitespace
    (a line break pasted with it) is trimmed here, so the file holds the key alone."""
    if "sops" in document:
        raise Unprocessable("`sops` is written by sops", problems=[problem("", "sops", "not a field")])
    for name in SECRET_FIELDS:
        value = document.get(name)
        if value is not None and value is not KEEP and not isinstance(value, str):
            raise Unprocessable(
                f"`{name}` must be a string", problems=[problem("", name, "must be a string")]
            )
        if isinstance(value, str):
            value = document[name] = value.strip()
        if isinstance(value, str) and unsendable(value):  # no header can carry it
            raise Unprocessable(
                f"`{name}` holds a control character (a pasted line break?); a key is one line",
                problems=[problem("", name, "holds a control character")],
            )
    if editing.depth(document) > editing.MAX_DEPTH:
        raise Unprocessable("the document nests too deeply", problems=[problem("", "", "nested too deeply")])


def check_destination(
    file: str, document: Mapping[str, Any], allowed: AllowedUpstreams, lookup: Lookup
) -> None:
    """422 when the provider `document` (of `file`) would send its requests outside
    SWITCHBOARD_ALLOWED_UPSTREAMS, or to a link-local address (cloud metadata) when it is unset.

    Its `base_url`, or its vendor's default URL, is checked as a connection to it would be
    (names resolved with `lookup`); the connection is checked again when it is made, since a
    name can be re-pointed after this. A URL that is no URL is left to the schema's check.
    """
    url = document.get("base_url")
    if url is None and isinstance(document.get("provider"), str) and document["provider"] in VENDORS:
        url = VENDORS[document["provider"]].base_url
    if not isinstance(url, str):
        return
    try:  # parsed as the gateway's client parses it (fullwidth digits are 169.254... there)
        host = URL(url.strip()).raw_host
    except (ValueError, TypeError):
        return
    if not host:
        return
    reason = host_refusal(host, allowed, lookup)
    if reason is not None:
        raise Unprocessable(
            f"`base_url` is outside the upstreams this service may reach ({SETTING}): {reason}",
            problems=[problem(file, "base_url", reason)],
        )


def check_route(purpose: str, route: Mapping[str, Any]) -> None:
    """A route for `purpose` that a routing file can hold (404 for a purpose there is none of)."""
    if purpose not in PURPOSES:
        raise NotFound(f"unknown purpose `{purpose}`; one of {', '.join(PURPOSES)}")
    if not isinstance(route, Mapping):
        raise Unprocessable("the route must be a JSON object", problems=[problem("", "", "not an object")])
    if editing.depth(route) > editing.MAX_DEPTH:
        raise Unprocessable("the route nests too deeply", problems=[problem("", "", "nested too deeply")])


def check_folder(
    files: Mapping[str, bytes], path: str, data: bytes | None, display: Callable[[str], str]
) -> None:
    """`files` with `path` made `data` (None: deleted) valid as `switchboard validate` says."""
    name = display(path)
    loaded: dict[str, Loaded] = {}
    if data is not None:
        try:
            loaded[name] = parse(name, data)
        except FileRejected as exc:
            raise Unprocessable(
                f"{name} would not be valid ({len(exc.problems)} problem(s))",
                problems=problems(exc.problems),
            ) from None
    refused: set[str] = set()  # routing may name a provider whose file is refused, as `validate` says
    for other, content in files.items():
        if other == path or not is_config_file(PurePosixPath(other).name):
            continue
        try:
            loaded[display(other)] = parse(display(other), content)
        except FileRejected:  # a broken sibling is its own change, as `validate` reports it
            provider_id = refused_provider(other, content)
            if provider_id is not None:
                refused.add(provider_id)
    found = cross_check(loaded.values(), refused)
    if found:
        raise Unprocessable(
            f"the configuration would not be valid ({len(found)} problem(s))", problems=problems(found)
        )


def problem(file: str, path: str, message: str) -> dict[str, str]:
    """One problem as a 422 answer lists it."""
    return {"file": file, "path": path, "message": message}


def problems(found: list[Problem]) -> list[dict[str, str]]:
    """Problems the loader found, as a 422 answer lists them."""
    return [problem(p.file, p.path, p.message) for p in found]
