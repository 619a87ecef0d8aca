"""The Python client: the old integration interface, kept current by change push (docs/reference.md §9, §11).

    from service.client import Switchboard

    async with Switchboard("http://127.0.0.1:8080", token="sb_…") as sb:
        chat = await sb.get_active_llm_provider("chat")     # first healthy candidate, masked key
        backup = await sb.get_fallback_provider(chat)       # the next candidate, or None
        params = await sb.litellm_params("chat", model="gpt-4o-mini")  # decrypted key (secrets:read)
        result = await sb.test_provider(chat.id)            # admin
        async for event in sb.events(): ...                 # the live event stream

`service.client` is the import path applications use; its modules are `switchboard` (the
connection: the copy kept current by questions held on its tag, the interface), `question`
(that held question's limits, tag and `wait`), `models` (what it returns), `errors` (what it
raises) and `stream` (the event stream, followed across breaks and replicas, and its wire format).

This package imports nothing of the server: only aiohttp's client, the standard library,
and `service.formats` / `service.vendors` (which it ships with). It is packaged alone as the
`switchboard-client` distribution (`client/`), so an application needs neither litellm nor
the rest of the server's dependencies.
"""

from __future__ import annotations

from service.client.errors import BadRequest as BadRequest
from service.client.errors import (
    Forbidden,
    NotFound,
    SwitchboardClientError,
    Unauthorized,
    Unavailable,
)
from service.client.errors import ModelRequired as ModelRequired
from service.client.models import HEALTHY as HEALTHY
from service.client.models import Event, Health, Provider, Route, TestResult
from service.client.stream import MAX_EVENT_BYTES as MAX_EVENT_BYTES
from service.client.stream import REPLICA_HEADER as REPLICA_HEADER
from service.client.switchboard import INDEX_HEADER as INDEX_HEADER
from service.client.switchboard import PREFIX as PREFIX
from service.client.switchboard import Switchboard

__all__ = [
    "Event",
    "Forbidden",
    "Health",
    "NotFound",
    "Provider",
    "Route",
    "Switchboard",
    "SwitchboardClientError",
    "TestResult",
    "Unauthorized",
    "Unavailable",
]
