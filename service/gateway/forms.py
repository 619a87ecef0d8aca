"""How a call reaches each provider in its protocol: as it is, or translated to chat (docs/reference.md §14).

A provider speaks a protocol natively when its file lists it in `protocols`, or by its
vendor's or server type's default. A request goes as it is (model mapped) to a provider
that speaks its protocol, with the protocol's headers the client sent (`anthropic-version`,
`anthropic-beta`, `OpenAI-Beta`) beside the provider's own URL and key; otherwise Messages
and Responses requests are translated to chat, and legacy completions and token counts are
not served there. A 404 for the path of a protocol the provider speaks only by default means
it does not speak it: `remember` keeps that for as long as the provider's file is unchanged.

Response ids (`previous_response_id`) are wrapped with the provider that gave them and a MAC
(service/gateway/protocols/ids.py); the MAC key of each provider is derived here, once per
version of its file.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from service.config.models import Provider
from service.config.secret import Secret
from service.errors import BadRequest
from service.gateway.call import Call, encode
from service.gateway.protocols import ids, messages, responses
from service.gateway.protocols.translation import NativeResponses, ToMessages, ToResponses

PATHS = {
    "chat": "/chat/completions",
    "messages": "/messages",
    "responses": "/responses",
    "completions": "/completions",
    "count_tokens": "/messages/count_tokens",
}
"""Each protocol's path after the upstream's base URL (an Anthropic provider's base: its API
root plus `/v1`)."""
SPOKEN_AS = {"count_tokens": "messages"}
"""A protocol a provider speaks as part of another: counting tokens is Messages'."""
TRANSLATED = frozenset(("messages", "responses"))
"""Protocols translated to chat for a provider that does not speak them."""
PROTOCOL_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")
"""Client headers a native request keeps (never a credential, never a host)."""
_MAX_HEADER = 2000


class Forms:
    """Which providers speak which protocols (as learned), and the response ids' keys."""

    def __init__(self, fallback_key: bytes) -> None:
        self.fallback_key = fallback_key
        """The MAC key of providers without an API key (derived from the age identity)."""
        self._unspoken: dict[str, tuple[Provider, set[str]]] = {}
        self._keys: dict[str, tuple[Provider, bytes]] = {}

    def speaks(self, provider: Provider, protocol: str) -> bool:
        """Whether `provider` speaks `protocol` natively, as far as is known."""
        spoken = SPOKEN_AS.get(protocol, protocol)
        if spoken not in provider.native_protocols:
            return False
        learned = self._unspoken.get(provider.id)
        return (
            learned is None
            or learned[0] is not provider
            or (spoken not in learned[1] and protocol not in learned[1])
        )

    def remember(self, provider: Provider, protocol: str) -> None:
        """`provider` answered 404 on `protocol`'s path: it does not speak it (until its file
        changes). A 404 at count_tokens' path is of that path alone: a server that does not
        count tokens may still speak Messages."""
        learned = self._unspoken.get(provider.id)
        if learned is None or learned[0] is not provider:
            learned = self._unspoken[provider.id] = (provider, set())
        learned[1].add(protocol)

    def serves(self, provider: Provider, call: Call) -> bool:
        """Whether `provider` can take `call` at all: natively, or translated to chat."""
        return call.protocol == "chat" or call.protocol in TRANSLATED or self.speaks(provider, call.protocol)

    def key(self, provider: Provider) -> bytes:
        """The MAC key of `provider`'s response ids: from its own API key, else the fallback."""
        found = self._keys.get(provider.id)
        if found is not None and found[0] is provider:
            return found[1]
        secret = provider.api_key if isinstance(provider.api_key, Secret) else None
        key = ids.derive_key(secret.reveal()) if secret is not None else self.fallback_key
        self._keys[provider.id] = (provider, key)
        return key

    def prepare(self, call: Call, provider: Provider, pinned: ids.ResponseId | None = None) -> None:
        """Set what the next attempt sends `provider`: the request as it is, or as chat."""
        protocol = call.protocol
        if protocol == "chat":
            return
        if self.speaks(provider, protocol):
            self._native(call, provider, pinned)
        else:
            self._translated(call, provider)

    def _native(self, call: Call, provider: Provider, pinned: ids.ResponseId | None) -> None:
        body, data = call.client_body, call.client_data
        if pinned is not None:
            data = {**data, "previous_response_id": pinned.upstream}
            body = encode(data)
        call.send_as(PATHS[call.protocol], body, data, call.protocol)
        call.by_default = provider.protocols is None
        call.protocol_headers = _protocol_headers(call)
        call.translation = (
            NativeResponses(
                self._wrapper(call, provider, native=True),
                (pinned.upstream, call.pinned) if pinned is not None and call.pinned else None,
            )
            if call.protocol == "responses"
            else None
        )

    def _translated(self, call: Call, provider: Provider) -> None:
        if call.chat is None:
            translate = messages.to_chat if call.protocol == "messages" else responses.to_chat
            try:
                chat = translate(call.client_data)
            except RecursionError:  # a tool input nested as deep as the parser allowed
                raise BadRequest("the body is JSON nested too deep") from None
            call.chat = (encode(chat), chat)
        body, data = call.chat
        call.send_as(PATHS["chat"], body, data, "chat")
        call.by_default = False
        call.protocol_headers = {}
        if call.protocol == "messages":
            call.translation = ToMessages(call.model)
        else:
            wrapped = self._wrapper(call, provider, native=False)(f"chatcmpl-{_nonce()}")
            call.translation = ToResponses(call.client_data, wrapped or f"resp_{_nonce()}")

    def _wrapper(self, call: Call, provider: Provider, *, native: bool) -> Callable[[str], str | None]:
        key, client, pid = self.key(provider), call.client, provider.id

        def wrap(upstream: str) -> str | None:
            return ids.wrap(key, client, pid, upstream, native=native) if ids.wrappable(upstream) else None

        return wrap


def _protocol_headers(call: Call) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name in PROTOCOL_HEADERS:
        value = call.request.headers.get(name)
        if value is not None and len(value) <= _MAX_HEADER and value.isprintable():
            headers[name] = value
    return headers


def _nonce() -> str:
    return secrets.token_hex(12)
