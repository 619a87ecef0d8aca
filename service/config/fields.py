"""The documents' checked field types: a secret sealed by sops, an upstream's URL, a duration."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema

from service.config.secret import SOPS_VALUE, Sealed, Secret


class PlaintextSecretError(ValueError):
    """A secret field holds a plaintext value in a file that should carry SOPS ciphertext."""


def _to_secret(value: object) -> Secret | Sealed:
    if isinstance(value, Secret | Sealed):
        return value
    if isinstance(value, str) and SOPS_VALUE.match(value):
        return Sealed(value)
    if isinstance(value, str):
        # The value itself must never be echoed: this message is all that is reported.
        raise PlaintextSecretError("is in plaintext; encrypt the file with `switchboard encrypt FILE`")
    raise ValueError("must be a string encrypted by sops")


SecretField = Annotated[
    Secret | Sealed,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda s: s.masked, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": SOPS_VALUE.pattern.replace(r"type:\w+", "type:str"),  # a key is a string
            "description": "The secret, encrypted by sops (`switchboard encrypt FILE`); never plaintext.",
        }
    ),
]


def _check_url(value: str) -> str:
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; put the key in `api_key`")
    if "?" in value or "#" in value:  # an empty one too: the JSON Schema's pattern refuses it
        raise ValueError("must not have a query or a fragment")
    try:
        parts.port  # noqa: B018 - the property validates the port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value.rstrip("/")


Url = Annotated[
    str,
    BeforeValidator(lambda v: _check_url(v) if isinstance(v, str) else v),
    # The scheme in any case, as urlsplit reads it; a host without credentials; no query, no
    # fragment, no space or control character anywhere.
    WithJsonSchema(
        {
            "type": "string",
            "format": "uri",
            "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#@\s\x00-\x1f\x7f]+(/[^?#\s\x00-\x1f\x7f]*)?$",
        }
    ),
]


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A duration in seconds: finite and positive (`.inf` is no way to say "no limit")."""
