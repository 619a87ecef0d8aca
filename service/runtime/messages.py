"""What replicas say to each other on the Redis channel (docs/reference.md §12): heartbeats
and health notes, as each is written and as each is read back.

A heartbeat is `{"replica", "instance", "commit", "generation", "ready"}`: what one replica
serves. A health note (`HealthNote`: provider, the blob of its file, status, reason, when) is
a status one replica confirmed itself, which the others adopt when it is newer than theirs.
Anyone who can publish on the channel can send anything, so what is read is checked field
by field and bounded before it is kept; a note is signed, when the replicas hold an age
identity, with a key derived from it, so that no one else can forge one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from service.settings import REPLICA_NAME

MAX_MESSAGE = 2048
_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_PROVIDER = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_REASON = 300
FUTURE_S = 5.0
"""A note dated further ahead than this (clocks differ a little, not more) is refused."""
PAST_S = 120.0
"""A note sent further back than this is refused: anyone who can read Redis can publish a
genuine one again later, and a replica that has confirmed nothing since it started would take
it as news (a provider down yesterday, shown down again). A note is dated twice: `at`, when its
status was confirmed (the newest wins, however old), and `sent`, when it was published (this
check): a replica that joins is told what the others show now (`Fanout.on_joined`)."""


@dataclass(frozen=True, slots=True)
class HealthNote:
    """A provider's health as one replica confirmed it: `blob` is its file's git blob id, so a
    replica serving another version of the provider (a rotated key) does not adopt it."""

    provider: str
    blob: str
    status: str
    reason: str | None
    at: float
    """When it was confirmed, wall clock (the newest wins)."""
    key: str | None = None
    """`refused` (a 401 or 403) or `works` (a request through it succeeded since): only a request
    clears a refused key, not a check (`service.gateway.health.KeyState`); None: a check said."""

    def signed(self, replica: str, instance: str, key: bytes | None, sent: float | None = None) -> str:
        """The message, sent at `sent` (wall clock; `at` when None), signed with `key` if any."""
        body: dict[str, Any] = {
            "kind": "health",
            "replica": replica,
            "instance": instance,
            "provider": self.provider,
            "blob": self.blob,
            "status": self.status,
            "reason": self.reason,
            "at": self.at,
            "sent": self.at if sent is None else sent,
        }
        if self.key is not None:  # absent otherwise: the notes of replicas that do not send it
            body["key_state"] = self.key
        if key is not None:
            body["mac"] = _mac(key, body)
        return json.dumps(body, separators=(",", ":"))


def _finite(value: object) -> TypeGuard[float]:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _mac(key: bytes, body: dict[str, Any]) -> str:
    fields = {k: v for k, v in body.items() if k != "mac"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def parse_health(data: Any, key: bytes | None, now: float) -> tuple[HealthNote, str] | None:
    """A health note and its sender's instance from a message's bytes; None for anything else:
    malformed, unsigned or wrongly signed (with `key`), dated in the future or long past."""
    doc = _document(data)
    if doc is None or doc.get("kind") != "health":
        return None
    provider, blob, status = doc.get("provider"), doc.get("blob"), doc.get("status")
    reason, at, instance = doc.get("reason"), doc.get("at"), doc.get("instance")
    sent, key_state = doc.get("sent", at), doc.get("key_state")
    if not (isinstance(instance, str) and 0 < len(instance) <= 64):
        return None
    if not (isinstance(doc.get("replica"), str) and REPLICA_NAME.match(doc["replica"])):
        return None
    if not (isinstance(provider, str) and _PROVIDER.match(provider)):
        return None
    if not (isinstance(blob, str) and _COMMIT.match(blob)):
        return None
    if status not in ("healthy", "unhealthy"):
        return None
    if key_state is not None and (status, key_state) not in (("unhealthy", "refused"), ("healthy", "works")):
        return None
    if reason is not None and not (
        isinstance(reason, str) and len(reason) <= MAX_REASON and not _CONTROL.search(reason)
    ):
        return None
    if not (_finite(at) and _finite(sent)):
        return None
    if not (at <= now + FUTURE_S and now - PAST_S <= sent <= now + FUTURE_S):
        return None
    if key is not None:
        mac = doc.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), _mac(key, doc).encode()):
            return None
    return HealthNote(provider, blob, status, reason, min(float(at), now), key_state), instance


@dataclass(frozen=True, slots=True)
class Beat:
    """What one replica serves: the heartbeat's content."""

    replica: str
    commit: str | None
    generation: int
    ready: bool


def answer(beat: Beat, seen_at: datetime) -> dict[str, Any]:
    """One replica as `GET …/replicas` lists it."""
    return {
        "replica": beat.replica,
        "commit": beat.commit,
        "generation": beat.generation,
        "ready": beat.ready,
        "seen_at": seen_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def parse_beat(data: Any) -> tuple[Beat, str] | None:
    """A heartbeat and its sender's instance from a message's bytes; None for anything else."""
    doc = _document(data)
    if doc is None:
        return None
    replica, instance, commit = doc.get("replica"), doc.get("instance"), doc.get("commit")
    generation, ready = doc.get("generation"), doc.get("ready")
    if not (isinstance(replica, str) and REPLICA_NAME.match(replica)):
        return None
    if not (isinstance(instance, str) and 0 < len(instance) <= 64):
        return None
    if commit is not None and not (isinstance(commit, str) and _COMMIT.match(commit)):
        return None
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation < 2**53:
        return None
    if not isinstance(ready, bool):
        return None
    return Beat(replica, commit, generation, ready), instance


def _document(data: Any) -> dict[str, Any] | None:
    """A message's JSON object, or None: not bytes or text, over `MAX_MESSAGE`, not JSON, too
    deep, or not an object."""
    if not isinstance(data, bytes | str) or len(data) > MAX_MESSAGE:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
