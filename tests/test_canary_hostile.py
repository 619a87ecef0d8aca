"""Canaries against hostile upstreams, through `serve --workers 2`: what `test_canary` does not
cover.

Stand-in vendors (OpenAI's protocol, and Anthropic's behind litellm) that repeat what they were
sent wherever an answer can carry it: the request's headers and body in the body of an error
of every status (4xx the client gets back, 3xx, 429 and 5xx it falls back from), the credential
in `Retry-After`, `x-request-id`, `x-ratelimit-*` and a redirect's `Location`, the credential in
an error event in the middle of a stream; and, on answers that succeed, a word of the prompt as
the answer's `x-request-id`, its `id` and the `model` it names. A real `switchboard serve
--workers 2` (DEBUG, Redis, the usage ledger in SQLite with its spool, traces to an OTLP
receiver) relays them; then the canaries are looked for (docs/reference.md §2.4, §6.5, §7, §13):

- the key in no answer (status line, header or body), log line, file, ledger row, Redis
  command, exported span or metric;
- the prompt in none of those but the gateway's answers to the request that carried it: not
  in the ledger (a record's id), the metrics (a model label), the spans, the logs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import write_provider, write_routing
from tests.support.otlp import OTLPReceiver
from tests.support.replicas import free_port
from tests.support.upstreams import FakeUpstream
from tests.test_canary import (
    ADMIN,
    Driver,
    files_under,
    leaks,
    ledger_rows,
    make_repository,
    monitored,
    needles,
    redis_server,
    switchboard_serve,
    wait_ready,
    write_clients,
)

KEY = "sk-canary-hostile-4f7d2a9c1e8b6d3f0a5c"
ANTHROPIC_KEY = "sk-ant-canary-hostile-7e2b5d8f3a1c9e6b"
PROMPT = "prompt-canary-hostile-b71c4e9a2f5d"
"""One word, so that a vendor can give it back as a request id or a model's name."""
ECHOED = (400, 404, 413, 422, 301, 302, 307, 429, 500, 502, 503, 401, 403)
"""The statuses the vendors echo the request in: the ones the client gets back first, the ones
that open a circuit (429, 5xx, then a refused key) last."""
API = "/api/v1/llm-config"


class Echoing(FakeUpstream):
    """A vendor that repeats what it was sent: `echo:<status>` in a request's body makes it answer
    that status, with everything it received in its error and its credential in its headers;
    `reflect` makes it answer (plain or streamed) with the prompt as its request id, the
    answer's id and its model, and, streamed, with an error event quoting its credential."""

    def _check_auth(self, request: web.Request) -> web.Response | None:
        refused = FakeUpstream._check_auth(self, request)
        raw = self.requests[-1].raw.decode("utf-8", "replace")
        status = next((int(w[5:8]) for w in raw.replace('"', " ").split() if w.startswith("echo:")), None)
        if refused is not None or status is None:
            return refused
        given = request.headers.get("x-api-key") or request.headers.get("Authorization", "")
        told = f"you sent {dict(request.headers)!r} and {raw}"
        headers = {
            "Retry-After": f"1 {given}",
            "x-request-id": given.removeprefix("Bearer "),
            "x-ratelimit-remaining-requests": given,
            "X-Echo": told.replace("\n", " ")[:4000],
        }
        if 300 <= status < 400:
            headers["Location"] = f"http://127.0.0.1:9/?key={given}&prompt={PROMPT}"
        error: dict[str, Any] = {"message": told, "type": "api_error", "code": given}
        if self.protocol == "anthropic":
            return web.json_response({"type": "error", "error": error}, status=status, headers=headers)
        return web.json_response({"error": error}, status=status, headers=headers)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(self.requests[-1].raw)
        if "reflect" not in json.dumps(body):
            return await FakeUpstream._chat_completions(self, request)
        given = request.headers.get("Authorization", "")
        base = {"id": PROMPT, "created": 1, "model": PROMPT, "system_fingerprint": PROMPT}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        headers = {"x-request-id": PROMPT, "x-ratelimit-remaining-requests": PROMPT}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(answer, headers=headers)
        chunk = {**base, "object": "chat.completion.chunk"}
        delta = {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}
        events = [
            {**chunk, "choices": [delta]},
            {"error": {"message": f"the key was {given}", "code": given}},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


def requests_of(marker: str, model: str, stream: bool) -> list[tuple[str, dict[str, Any]]]:
    """The same request in each protocol, `marker` in a field the vendor sees."""
    prompt = [{"role": "user", "content": PROMPT}]
    return [
        ("/v1/chat/completions", {"model": model, "messages": prompt, "user": marker, "stream": stream}),
        ("/v1/responses", {"model": model, "input": PROMPT, "user": marker, "stream": stream}),
        (
            "/v1/messages",
            {
                "model": model,
                "max_tokens": 5,
                "messages": prompt,
                "metadata": {"user_id": marker},
                "stream": stream,
            },
        ),
    ]


@pytest.mark.timeout(120)
async def test_no_key_and_no_prompt_leaks_from_a_hostile_upstream(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    project = sops_project
    pricing = {"*": {"input": 1.0, "output": 2.0}}
    async with (
        Echoing(name="vendor", api_key=KEY) as vendor,
        Echoing(protocol="anthropic", name="claude", api_key=ANTHROPIC_KEY, models=("claude-x",)) as claude,
        OTLPReceiver() as otlp,
    ):
        # `vendor` declares no models: the model its answers name labels its metrics
        write_provider(
            project, "vendor", provider="openai", base_url=vendor.base_url, api_key=KEY, pricing=pricing
        )
        write_provider(
            project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=ANTHROPIC_KEY,
            models=["claude-x"],
            pricing=pricing,
        )
        write_routing(project, chat={"primary": "claude", "fallbacks": ["vendor"]})  # claude-x: claude first
        write_clients(project)
        make_repository(project, tmp_path)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        async with (
            redis_server(tmp_path / "redis") as redis,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
            monitored(redis) as redis_commands,
            switchboard_serve(project, port, log, otlp, redis, "--workers", "2") as process,
        ):
            await wait_ready(http, url, process, log)
            board = Driver(url, http)
            gateway: list[int] = []  # the answers that may hold the prompt: their requests had it
            for stream in (False, True):
                for path, body in requests_of("reflect", "fake-model", stream):
                    gateway.append(len(board.answers))
                    answer = await board.post(path, body, **{"anthropic-version": "2023-06-01"})
                    assert answer.status == 200, answer.text()
            for status in ECHOED:
                for model in ("fake-model", "claude-x"):  # the direct path, and litellm
                    for stream in (False, True):
                        for path, body in requests_of(f"echo:{status}", model, stream):
                            gateway.append(len(board.answers))
                            answer = await board.post(path, body, **{"anthropic-version": "2023-06-01"})
                            assert answer.status < 500 or answer.status in (502, 503), answer.text()
            await asyncio.sleep(1.2)  # a ledger batch, an OTLP export
            for path in (
                "/readyz",
                "/metrics",  # the workers' merged
                f"{API}/providers",
                f"{API}/usage/requests?limit=1000",
                f"{API}/usage?group_by=model,provider",
                f"{API}/audit",
                f"{API}/limits",
            ):
                assert (await board.get(path, ADMIN)).status == 200, path
            await board.stream_events(ADMIN, 0.5)
        assert process.returncode == 0, log.read_text()[-4000:]

    (tmp_path / "answers.txt").write_text("\n\n".join(a.what + "\n" + a.text() for a in board.answers))
    keys = (*needles(KEY), *needles(ANTHROPIC_KEY))
    found: list[str] = []
    for number, answer in enumerate(board.answers):
        found += leaks(
            f"the answer to {answer.what}", answer.text(), keys if number in gateway else (*keys, PROMPT)
        )
    found += leaks(
        "the service's output (DEBUG, both workers)", log.read_text(errors="replace"), (*keys, PROMPT)
    )
    for path in files_under(project.root):
        found += leaks(str(path), path.read_bytes().decode("utf-8", "replace"), (*keys, PROMPT))
    rows = ledger_rows(project.root / "var" / "usage.db")
    assert "'claude'" in rows and "'vendor'" in rows, rows[:2000]
    found += leaks("the ledger's rows", rows, (*keys, PROMPT))
    found += leaks("a command to Redis", bytes(redis_commands).decode("utf-8", "replace"), (*keys, PROMPT))
    for export in otlp.exports:
        found += leaks("an OTLP export", export.decode("utf-8", "replace"), (*keys, PROMPT))
    assert not found, "\n".join(found)
    # What makes the search mean something: the vendors had both, and echoed them.
    assert any(PROMPT.encode() in r.raw and b"echo:" in r.raw for r in vendor.requests)
    assert any(PROMPT.encode() in r.raw and b"echo:" in r.raw for r in claude.requests)
    assert any(b"reflect" in r.raw for r in vendor.requests)
    assert otlp.spans, "no span was exported"
