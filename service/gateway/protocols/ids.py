"""Response ids that carry the provider that gave them, under a MAC (`previous_response_id`,
docs/reference.md §14).

Switchboard keeps no conversation, and a response's id must be continuable at once on any
replica: so the id itself says where the response is. The id a client gets is

    resp_<payload>.<mac>        payload = base64url("n" or "t", provider id, upstream id)
                                mac     = HMAC-SHA256(key, client name, payload), 128 bits

`n`: a provider that speaks Responses natively gave it (it can be continued there); `t`: a
translated answer (Switchboard keeps no conversation: it cannot be continued). The MAC binds
the id to the client it was given to, so no client can make the gateway send another
client's response id, or an id of its choosing, to a provider.

The key: each provider's own decrypted API key, through HMAC (`derive_key`): every replica
holds it (it decrypts the same files), nobody outside does, and whoever does could call the
vendor directly anyway. A provider without a key (a self-hosted server) uses the service's
age identity, which every replica holds to decrypt the files; without either, a key made at
start, so its ids continue on the replica that gave them only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

PREFIX = "resp_"
_UPSTREAM_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,256}\Z")
"""An upstream id that is wrapped (vendors' ids are letters, digits and `_-`)."""


def derive_key(secret: str | bytes, purpose: bytes = b"switchboard response ids v1") -> bytes:
    """A MAC key for response ids, derived one-way from a secret (never the secret itself)."""
    material = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(material, purpose, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class ResponseId:
    """What a wrapped id says: the provider that gave it, the upstream's id, and whether that
    provider speaks Responses natively (`native`)."""

    provider: str
    upstream: str
    native: bool


def wrap(key: bytes, client: str, provider: str, upstream: str, *, native: bool) -> str:
    """The id the client gets for an upstream's response `upstream` from `provider`."""
    payload = f"{'n' if native else 't'}\n{provider}\n{upstream}".encode()
    return PREFIX + _b64(payload) + "." + _b64(_mac(key, client, payload))


def provider_of(wrapped: str) -> str | None:
    """The provider an id names, before its MAC is checked (None: not an id of ours)."""
    payload = _payload(wrapped)
    if payload is None:
        return None
    parts = payload.split(b"\n")
    return parts[1].decode("utf-8", "replace") if len(parts) == 3 else None


def unwrap(key: bytes, client: str, wrapped: str) -> ResponseId | None:
    """What `wrapped` says, when Switchboard gave it to `client` with this key; else None."""
    payload = _payload(wrapped)
    if payload is None:
        return None
    mac = _unb64(wrapped.rpartition(".")[2])
    if mac is None or not hmac.compare_digest(mac, _mac(key, client, payload)):
        return None
    try:
        kind, provider, upstream = payload.decode().split("\n")
    except ValueError:  # not UTF-8, or not three parts
        return None
    return ResponseId(provider, upstream, kind == "n")


def wrappable(upstream: str) -> bool:
    """Whether an upstream's response id is one that is wrapped (a plain vendor id)."""
    return bool(_UPSTREAM_ID.match(upstream))


def _payload(wrapped: str) -> bytes | None:
    if not isinstance(wrapped, str) or not wrapped.startswith(PREFIX) or len(wrapped) > 1024:
        return None
    body, dot, _ = wrapped[len(PREFIX) :].partition(".")
    return _unb64(body) if dot else None


def _mac(key: bytes, client: str, payload: bytes) -> bytes:
    return hmac.new(key, client.encode() + b"\n" + payload, hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
