"""Local stand-ins for LLM vendors: real aiohttp servers on 127.0.0.1 that tests can misbehave.

Three protocols are spoken:

- ``openai``: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE stream),
  ``POST /v1/embeddings`` (deterministic vectors, float or base64), ``POST /v1/rerank``
  (the Cohere/Jina shape served by Infinity and vLLM), ``POST /v1/responses`` (OpenAI's
  Responses, JSON or its event stream; `previous_response_id` must name one of its own) and
  ``POST /v1/completions`` (legacy completions). Every path also answers without the ``/v1``
  prefix; `missing` leaves paths out (a server that does not speak a protocol: 404).
- ``anthropic``: ``GET /v1/models``, ``POST /v1/messages`` (JSON or the real event stream)
  and ``POST /v1/messages/count_tokens``.

With `tool_calls` ({tool name: arguments}), a request that offers one of those tools and
holds no tool result yet is answered with a call to it, in the protocol's shape; arguments
given as a string are sent as they are (JSON or not).
- ``tei`` (Hugging Face's Text Embeddings Inference): ``GET /info``, ``POST /rerank``
  (``{"query", "texts"}`` -> ``[{"index", "score"}]``, best first), ``POST /embed`` and the
  OpenAI-compatible ``POST /v1/embeddings``; errors are ``{"error", "error_type"}``.

Answers carry a request id and rate-limit headers, as vendors send them.

Every request is recorded (`FakeUpstream.requests`), and at run time the server can be told
to fail with a status, hang before the headers, stall after them, or drop a stream midway;
`refuse_connections` makes its port refuse connections, `closed_port_url` gives a URL
nobody listens on, and `unanswered_url` one whose connections never complete. Out of
process the same controls are ``POST /_control`` (a JSON `Fault`, or ``{"fault": "none"}``),
``GET /_requests`` and ``DELETE /_requests``::

    async with FakeUpstream(name="a", api_key="sk-a") as up:
        up.fail(503, times=1)
        ...  # point the code under test at up.base_url

    python -m tests.support.upstreams --port 8001 --protocol openai --name a --api-key sk-a
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.support import upstream_answers as answers

Protocol = Literal["openai", "anthropic", "tei"]
FaultKind = Literal["status", "hang", "stall", "drop"]

_JSON = dict[str, Any]
_CONTROL_PATHS = ("/_control", "/_requests")
_BODY: web.RequestKey[Any] = web.RequestKey("body")
_FAULT: web.RequestKey[Fault | None] = web.RequestKey("fault")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as it arrived: header names are lower-cased, ``json`` is None if not JSON."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    raw: bytes = b""
    """The body's bytes exactly as they arrived (not listed by ``GET /_requests``)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A misbehaviour applied to the next `times` requests (every request when None).

    ``status``: answer `status` with a vendor-style error body. ``hang``: sleep `seconds`
    before sending anything. ``stall``: send the headers, then sleep `seconds` before the
    body. ``drop``: send `chunks` stream chunks (half the body when not streaming), then
    close the connection.
    """

    kind: FaultKind
    status: int = 500
    seconds: float = 0.0
    chunks: int = 1
    times: int | None = None


@dataclass(slots=True)
class FakeUpstream:
    """A stand-in LLM vendor; use as ``async with`` or call `start` and `close`."""

    protocol: Protocol = "openai"
    name: str = "upstream"
    api_key: str | None = None
    """Expected key (bearer token, or ``x-api-key``); any key, or none, is accepted when None."""
    latency_s: float = 0.0
    """Added before every answer, as a model's processing time."""
    chunk_interval_s: float = 0.0
    """Pause between stream chunks."""
    models: tuple[str, ...] = ("fake-model",)
    padding: int = 0
    """Bytes of filler added to every JSON answer (a `padding` field), to make answers large."""
    stream_options: bool = True
    """Whether chat requests may carry `stream_options`; an older server refuses them with 400."""
    tool_calls: dict[str, Any] = field(default_factory=dict)
    """Tool name -> the arguments of a call to it, made when a request offers that tool."""
    missing: tuple[str, ...] = ()
    """Paths not served (``/v1/responses``...): a server that does not speak their protocol."""
    port: int = 0
    record_limit: int = 10_000
    requests: deque[RecordedRequest] = field(init=False)
    _fault: Fault | None = field(default=None, init=False)
    _served: int = field(default=0, init=False)
    _responses: dict[str, str] = field(default_factory=dict, init=False)
    """Response id -> its text, for `previous_response_id`."""
    _runner: web.AppRunner | None = field(default=None, init=False)
    _site: web.TCPSite | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.requests = deque(maxlen=self.record_limit)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeUpstream:
        """Listen on 127.0.0.1 (`port`, or a free one when 0) and return self."""
        app = web.Application(middlewares=[self._middleware])
        if self.protocol == "tei":  # TEI's paths are exactly these: /rerank has no /v1 twin
            for method, path, handler_name in _TEI_ROUTES:
                app.router.add_route(method, path, getattr(self, handler_name))
        for method, path, handler_name in _ANTHROPIC_ROUTES if self.protocol == "anthropic" else ():
            if path in self.missing:
                continue
            handler = getattr(self, handler_name)
            app.router.add_route(method, path, handler)
            app.router.add_route(method, path.removeprefix("/v1"), handler)
        for method, path, handler_name in _OPENAI_ROUTES if self.protocol == "openai" else ():
            if path in self.missing:
                continue
            handler = getattr(self, handler_name)
            app.router.add_route(method, path, handler)
            app.router.add_route(method, path.removeprefix("/v1"), handler)
        app.router.add_post("/_control", self._control)
        app.router.add_get("/_requests", self._list_requests)
        app.router.add_delete("/_requests", self._clear_requests)
        # Cancel handlers whose client went away, and do not wait for hanging ones on close.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await self.accept_connections()
        return self

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def refuse_connections(self) -> None:
        """Stop listening and drop open connections; the port refuses until `accept_connections`."""
        assert self._runner is not None and self._site is not None, "not started"
        await self._site.stop()
        self._site = None
        for handler in list(self._runner.server.connections if self._runner.server else ()):
            handler.force_close()

    async def accept_connections(self) -> None:
        """Listen again, on the same port as before."""
        assert self._runner is not None, "not started"
        if self._site is None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()
            self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The root plus ``/v1``, as OpenAI-style clients expect."""
        return f"{self.url}/v1"

    # -- behaviour ---------------------------------------------------------------------------

    def answer_normally(self) -> None:
        """Forget any fault."""
        self._fault = None

    def inject(self, fault: Fault) -> None:
        """Apply `fault` to the next requests."""
        self._fault = fault

    def fail(self, status: int = 500, *, times: int | None = None) -> None:
        """Answer `status` (500, 429, 400, 408 ...) with a vendor-style error body."""
        self.inject(Fault("status", status=status, times=times))

    def hang(self, seconds: float, *, times: int | None = None) -> None:
        """Sleep `seconds` before sending the headers."""
        self.inject(Fault("hang", seconds=seconds, times=times))

    def stall(self, seconds: float, *, times: int | None = None) -> None:
        """Send the headers, then sleep `seconds` before the first byte of the body."""
        self.inject(Fault("stall", seconds=seconds, times=times))

    def drop_after(self, chunks: int, *, times: int | None = None) -> None:
        """Send `chunks` stream chunks, then close the connection without finishing."""
        self.inject(Fault("drop", chunks=chunks, times=times))

    def _take_fault(self) -> Fault | None:
        fault = self._fault
        if fault is not None and fault.times is not None:
            left = fault.times - 1
            self._fault = Fault(fault.kind, fault.status, fault.seconds, fault.chunks, left) if left else None
        return fault

    # -- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _CONTROL_PATHS:
            return await handler(request)
        body: Any = None
        raw = await request.read() if request.can_read_body else b""
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.path, headers, body, raw))
        if (auth_error := self._check_auth(request)) is not None:
            return auth_error
        fault = self._take_fault()
        if fault is not None and fault.kind == "hang":
            await asyncio.sleep(fault.seconds)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None and fault.kind == "status":
            return self._error(fault.status, f"injected failure {fault.status} from {self.name}")
        request[_FAULT] = fault if fault is not None and fault.kind in ("stall", "drop") else None
        request[_BODY] = body
        try:
            return await handler(request)
        except (AttributeError, KeyError, TypeError, ValueError):  # as a vendor, a 400 and not a 500
            return self._error(400, "the request body does not have the expected shape")

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.protocol == "anthropic":
            if "anthropic-version" not in request.headers:
                return self._error(400, "anthropic-version: header is required")
            given = request.headers.get("x-api-key")
        else:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and given != self.api_key:
            return self._error(401, "Incorrect API key provided")
        return None

    def _error(self, status: int, message: str) -> web.Response:
        headers = self._headers()
        if status == 429:
            headers["retry-after"] = "7"
        if self.protocol == "tei":
            kind = "overloaded" if status == 429 else "backend" if status >= 500 else "validation"
            return web.json_response({"error": message, "error_type": kind}, status=status, headers=headers)
        if self.protocol == "anthropic":
            kinds = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}
            kind = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
            error: _JSON = {"type": kind, "message": message}
            return web.json_response({"type": "error", "error": error}, status=status, headers=headers)
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        openai_error = {"message": message, "type": kind, "param": None, "code": code}
        return web.json_response({"error": openai_error}, status=status, headers=headers)

    async def _send(self, request: web.Request, payload: Any) -> web.StreamResponse:
        """Send a JSON answer, honouring a stall or drop fault."""
        if self.padding and isinstance(payload, dict):
            payload = {**payload, "padding": "x" * self.padding}
        fault = request[_FAULT]
        if fault is None:
            return web.json_response(payload, headers=self._headers())
        body = json.dumps(payload).encode()
        response = web.StreamResponse(headers={**self._headers(), "Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
            await response.write(body)
            return response
        await response.write(body[: len(body) // 2])
        return _drop(request, response)

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        """Send server-sent events one by one, honouring a stall or drop fault."""
        fault = request[_FAULT]
        response = web.StreamResponse(
            headers={**self._headers(), "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        if fault is not None and fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
        for i, event in enumerate(events):
            if fault is not None and fault.kind == "drop" and i == fault.chunks:
                return _drop(request, response)
            if i and self.chunk_interval_s:
                await asyncio.sleep(self.chunk_interval_s)
            await response.write(event)
        await response.write_eof()
        return response

    def _headers(self) -> dict[str, str]:
        """What a vendor says beside its answer: its name here, a request id, rate limits."""
        self._served += 1
        if self.protocol == "anthropic":
            return {
                "x-upstream-name": self.name,
                "request-id": f"req_{self.name}_{self._served}",
                "anthropic-ratelimit-requests-limit": "1000",
                "anthropic-ratelimit-requests-remaining": str(1000 - self._served),
            }
        return {
            "x-upstream-name": self.name,
            "x-request-id": f"req-{self.name}-{self._served}",
            "x-ratelimit-limit-requests": "1000",
            "x-ratelimit-remaining-requests": str(1000 - self._served),
            "x-ratelimit-reset-requests": "1s",
        }

    def _reply_text(self, prompt: str) -> str:
        return f"{self.name} says: {prompt}" if prompt else f"{self.name} says hello"

    # -- control endpoints -------------------------------------------------------------------

    async def _control(self, request: web.Request) -> web.Response:
        data: _JSON = await request.json()
        kind = data.pop("fault", "none")
        for setting in ("latency_s", "chunk_interval_s", "name", "api_key", "padding", "stream_options"):
            if setting in data:
                setattr(self, setting, data.pop(setting))
        try:
            self._fault = None if kind == "none" else Fault(kind=kind, **data)
        except TypeError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        return web.json_response({"fault": None if self._fault is None else asdict(self._fault)})

    async def _list_requests(self, request: web.Request) -> web.Response:
        listed = [{k: v for k, v in asdict(r).items() if k != "raw"} for r in self.requests]
        return web.json_response(listed)

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({})

    # -- OpenAI ------------------------------------------------------------------------------

    async def _openai_models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models]
        return await self._send(request, {"object": "list", "data": data})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        if "stream_options" in body and not self.stream_options:
            return self._error(400, "Unrecognized request argument supplied: stream_options")
        model = str(body.get("model", self.models[0]))
        prompt = _last_text(body.get("messages", []))
        text = self._reply_text(prompt)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base: _JSON = {"id": f"chatcmpl-{self.name}", "created": int(time.time()), "model": model}
        base["system_fingerprint"] = self.name
        offered = [t.get("function", {}).get("name") for t in body.get("tools") or []]
        answered = any(m.get("role") == "tool" for m in body.get("messages", []))
        call = self._tool_call(offered, answered)
        if call is not None:
            return await self._chat_tool_call(request, body, base, usage, *call)
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            completion = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return await self._send(request, completion)
        chunk = {**base, "object": "chat.completion.chunk"}
        words = text.split(" ")
        deltas: list[_JSON] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": w if i == 0 else f" {w}"} for i, w in enumerate(words)]
        choices: list[_JSON] = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        choices.append({"index": 0, "delta": {}, "finish_reason": "stop"})
        chunks = [{**chunk, "choices": [c]} for c in choices]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**chunk, "choices": [], "usage": usage})
        events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
        return await self._stream(request, events)

    def _tool_call(self, offered: list[Any], answered: bool) -> tuple[str, Any] | None:
        """The tool call to answer with: one of `tool_calls` the request offers, before any result."""
        if answered:
            return None
        for name in offered:
            if isinstance(name, str) and name in self.tool_calls:
                return name, self.tool_calls[name]
        return None

    async def _chat_tool_call(
        self, request: web.Request, body: _JSON, base: _JSON, usage: _JSON, name: str, arguments: Any
    ) -> web.StreamResponse:
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": answers.chat_tool_message(name, arguments),
                "finish_reason": "tool_calls",
            }
            return await self._send(
                request, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        chunks = answers.chat_tool_chunks({**base, "object": "chat.completion.chunk"}, name, arguments)
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        return await self._stream(request, [answers.sse(c) for c in chunks] + [b"data: [DONE]\n\n"])

    async def _responses_api(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self._responses:
            return self._error(400, f"Previous response with id '{previous}' not found.")
        items = body.get("input")
        items = items if isinstance(items, list) else [{"role": "user", "content": str(items or "")}]
        prompt = _last_text(items)
        offered = [t.get("name") for t in body.get("tools") or [] if t.get("type") == "function"]
        answered = any(i.get("type") == "function_call_output" for i in items)
        call = self._tool_call(offered, answered)
        text = self._reply_text(prompt)
        if previous is not None:
            text += f" (after: {self._responses[previous]})"
        output = [answers.call_item(*call)] if call is not None else [answers.text_item(text)]
        usage = {
            "input_tokens": len(prompt.split()),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(text.split()),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(prompt.split()) + len(text.split()),
        }
        response_id = f"resp_{self.name}_{len(self._responses) + 1}"
        self._responses[response_id] = text
        model = str(body.get("model", self.models[0]))
        done = answers.response(self.name, model, response_id, output, usage, previous)
        if not body.get("stream"):
            return await self._send(request, done)
        return await self._stream(request, answers.response_events(done))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        prompt = body.get("prompt", "")
        prompt = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        text = self._reply_text(prompt)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = str(body.get("model", self.models[0]))
        if not body.get("stream"):
            return await self._send(request, answers.completion(model, text, usage))
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, answers.completion_chunks(model, text, usage, with_usage))

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        return await self._send(request, {"input_tokens": 1000 + len(json.dumps(body.get("messages", [])))})

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        inputs = body.get("input", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        dimensions = int(body.get("dimensions", 8))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vector: Any = embed(str(item), dimensions)
            if as_base64:  # what the openai SDK asks for by default
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(str(item).split()) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        model = body.get("model", self.models[0])
        return await self._send(request, {"object": "list", "data": data, "model": model, "usage": usage})

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        query = str(body.get("query", ""))
        documents = [d.get("text", "") if isinstance(d, dict) else str(d) for d in body.get("documents", [])]
        ranked = sorted(
            ({"index": i, "relevance_score": relevance(query, doc)} for i, doc in enumerate(documents)),
            key=lambda r: -r["relevance_score"],
        )
        top_n = body.get("top_n")
        results: list[_JSON] = ranked[: int(top_n)] if top_n is not None else ranked
        if body.get("return_documents"):
            results = [{**r, "document": {"text": documents[r["index"]]}} for r in results]
        tokens = len(query.split()) + sum(len(d.split()) for d in documents)
        model = body.get("model", self.models[0])
        payload = {"id": f"rerank-{self.name}", "model": model, "results": results}
        return await self._send(request, {**payload, "usage": {"total_tokens": tokens}})

    # -- TEI (Hugging Face's Text Embeddings Inference) ----------------------------------------

    async def _tei_info(self, request: web.Request) -> web.StreamResponse:
        return await self._send(
            request, {"model_id": self.models[0], "max_input_length": 512, "version": "1.8.0"}
        )

    async def _tei_rerank(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        query, texts = body.get("query"), body.get("texts")
        if (
            not isinstance(query, str)
            or not isinstance(texts, list)
            or not all(isinstance(t, str) for t in texts)
        ):
            return self._error(422, "Failed to deserialize the JSON body: `query` and `texts` are required")
        if not texts:
            return self._error(422, "`texts` cannot be empty")
        ranked: list[_JSON] = sorted(
            ({"index": i, "score": relevance(query, text)} for i, text in enumerate(texts)),
            key=lambda r: -r["score"],
        )
        if body.get("return_text"):
            ranked = [{**r, "text": texts[r["index"]]} for r in ranked]
        return await self._send(request, ranked)

    async def _tei_embed(self, request: web.Request) -> web.StreamResponse:
        inputs = _json_body(request).get("inputs", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        return await self._send(request, [embed(str(item)) for item in inputs])

    # -- Anthropic ---------------------------------------------------------------------------

    async def _anthropic_models(self, request: web.Request) -> web.StreamResponse:
        created = "2025-01-01T00:00:00Z"
        data = [{"type": "model", "id": m, "display_name": m, "created_at": created} for m in self.models]
        page = {"data": data, "has_more": False, "first_id": self.models[0], "last_id": self.models[-1]}
        return await self._send(request, page)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = _json_body(request)
        if "max_tokens" not in body:
            return self._error(400, "max_tokens: Field required")
        prompt = _last_text(body.get("messages", []))
        text = self._reply_text(prompt)
        usage = {"input_tokens": len(prompt.split()), "output_tokens": len(text.split())}
        offered = [t.get("name") for t in body.get("tools") or []]
        answered = "tool_result" in json.dumps(body.get("messages", []))
        call = self._tool_call(offered, answered)
        message: _JSON = {
            "id": f"msg_{self.name}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", self.models[0]),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if call is not None:
            name, arguments = call
            given = answers.arguments_text(arguments)
            block = {"type": "tool_use", "id": "toolu_up1", "name": name, "input": arguments}
            message.update(
                content=[block if isinstance(arguments, dict) else {**block, "input": given}],
                stop_reason="tool_use",
            )
        if not body.get("stream"):
            return await self._send(request, message)
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        words = text.split(" ")
        blocks: list[_JSON] = [
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
            *(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
                for t in [words[0], *(f" {w}" for w in words[1:])]
            ),
            {"type": "content_block_stop", "index": 0},
        ]
        if call is not None:
            blocks = answers.messages_tool_events(*call)
        events: list[_JSON] = [
            {"type": "message_start", "message": start},
            *blocks,
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
            {"type": "message_stop"},
        ]
        sse = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
        return await self._stream(request, sse)


_OPENAI_ROUTES = (
    ("GET", "/v1/models", "_openai_models"),
    ("POST", "/v1/chat/completions", "_chat_completions"),
    ("POST", "/v1/embeddings", "_embeddings"),
    ("POST", "/v1/rerank", "_rerank"),
    ("POST", "/v1/responses", "_responses_api"),
    ("POST", "/v1/completions", "_completions"),
)
_TEI_ROUTES = (
    ("GET", "/info", "_tei_info"),
    ("POST", "/rerank", "_tei_rerank"),
    ("POST", "/embed", "_tei_embed"),
    ("POST", "/v1/embeddings", "_embeddings"),
)
_ANTHROPIC_ROUTES = (
    ("GET", "/v1/models", "_anthropic_models"),
    ("POST", "/v1/messages", "_messages"),
    ("POST", "/v1/messages/count_tokens", "_count_tokens"),
)


def _drop(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Close the connection under a half-sent response, as a crashed upstream would."""
    if request.transport is not None:
        request.transport.abort()
    return response


def _json_body(request: web.Request) -> _JSON:
    body = request[_BODY]
    return body if isinstance(body, dict) else {}


def _last_text(messages: list[_JSON]) -> str:
    """The text of the last message, whether its content is a string or a list of parts."""
    if not messages:
        return ""
    last = messages[-1]
    if last.get("type") == "function_call_output":  # a Responses item
        return str(last.get("output", ""))
    content = last.get("content", "")
    if isinstance(content, list):
        texts = [
            p.get("text") or (p.get("content") if p.get("type") == "tool_result" else "")
            for p in content
            if isinstance(p, dict)
        ]
        return " ".join(t for t in texts if isinstance(t, str) and t)
    return str(content)


def embed(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic unit vector for `text` (same text, same vector)."""
    digest = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    raw = [b / 255 - 0.5 for b in digest[:dimensions]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def relevance(query: str, document: str) -> float:
    """Share of the query's words found in `document`, in [0, 1]."""
    words = set(query.lower().split())
    return len(words & set(document.lower().split())) / len(words) if words else 0.0


def closed_port_url() -> str:
    """A loopback URL nobody listens on, so connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve a hand-written upstream `app` on 127.0.0.1 while the block runs; yields its root URL."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def unanswered_url() -> Iterator[str]:
    """A loopback URL whose connections never complete (for connect timeouts), while the block runs.

    The port listens with a full accept queue that nobody drains, so the kernel drops the
    next handshakes and a client waits in `connect` until its own timeout.
    """
    with socket.socket() as server, contextlib.ExitStack() as stack:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(4):  # more than the queue holds
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def upstreams(*specs: _JSON) -> AsyncIterator[list[FakeUpstream]]:
    """Run several stand-ins at once: ``async with upstreams({"name": "a"}, {"name": "b"}) as (a, b)``."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeUpstream(**spec)) for spec in specs]


async def _serve(upstream: FakeUpstream) -> None:
    async with upstream:
        print(f"listening on {upstream.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Run one stand-in until interrupted; prints ``listening on URL`` once ready."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.upstreams", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--protocol", choices=["openai", "anthropic", "tei"], default="openai")
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0)
    parser.add_argument("--model", action="append", help="a model served (repeatable)")
    parser.add_argument("--record-limit", type=int, default=1000)
    args = parser.parse_args(argv)
    upstream = FakeUpstream(
        protocol=args.protocol,
        name=args.name,
        api_key=args.api_key,
        latency_s=args.latency_ms / 1000,
        chunk_interval_s=args.chunk_interval_ms / 1000,
        models=tuple(args.model or ["fake-model"]),
        port=args.port,
        record_limit=args.record_limit,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(upstream))


if __name__ == "__main__":
    main()
