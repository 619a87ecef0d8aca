"""Benchmark of the protocols (issue 21): what a translated request costs against native chat.

    python -m bench.protocols                 # or: just bench
    python -m bench.protocols --runs 3 --seconds 2

One fake OpenAI-protocol upstream (its own process) and `switchboard serve` (its own
process) with one encrypted provider for it that lists `protocols: [chat]`, so that
Anthropic Messages and OpenAI Responses requests are translated to chat and back. Each round
sends, at concurrency 1 and alternating, chat completions (native: the body goes as it is),
Messages and Responses (translated), whole and streamed; the table gives medians over the
rounds: each protocol's p50 latency and stream time to first byte, and what it adds over
native chat through the same Switchboard (the targets: < 0.3 ms p50, < 1 ms to the first
byte). Only 127.0.0.1 is contacted.

End to end, on a machine shared with other work, the noise (milliseconds) is larger than
what is measured (microseconds); so the run starts with the translation's own cost, in
process and stable: a request translated to chat and encoded, its chat answer translated
back, and a stream's first chunk turned into the client's first events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.config import CACHE, Service
from bench.load import LoadResult, chat_body, run_load
from bench.upstream import UpstreamProcess
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.crypto.tokens import create_token
from service.gateway.protocols import messages, responses
from service.gateway.protocols.messages_stream import MessagesStream
from service.gateway.protocols.responses_stream import ResponsesStream

UPSTREAM_KEY = "sk-upstream-bench-0123456789"
MODEL = "fake-model"
PROMPT = "Say hello in one sentence."


def build_project(upstream_base_url: str) -> tuple[Path, Path, str]:
    """A project with one provider that speaks chat only, and a client; (root, key file, token)."""
    root = CACHE / "protocols"
    key_file = CACHE / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    folder = root / "providers.d"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    recipient = next(x.split(": ")[1] for x in key_file.read_text().splitlines() if "public key" in x)
    add_recipient(root / ".sops.yaml", recipient)
    path = folder / "upstream.yaml"
    path.write_text(
        f"kind: api_key\nid: upstream\nprovider: openai\nbase_url: {upstream_base_url}\n"
        f"api_key: {UPSTREAM_KEY}\npurposes: [chat]\nprotocols: [chat]\n"
    )
    Sops(age_key_file=key_file, project_root=root).encrypt_in_place(path)
    (folder / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: upstream\n")
    token, _ = create_token(folder, "bench", ["completions"])
    return root, key_file, token


def bodies(stream: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each protocol's path and a small request in it."""
    messages: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    responses: dict[str, Any] = {"model": MODEL, "input": PROMPT}
    if stream:
        messages["stream"] = responses["stream"] = True
    return {
        "chat": ("/v1/chat/completions", chat_body(MODEL, stream=stream)),
        "messages": ("/v1/messages", messages),
        "responses": ("/v1/responses", responses),
    }


_ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, in one sentence."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13},
    }
).encode()
_FIRST = (
    b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake-model", '
    b'"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n'
)


def _per_call_us(work: Any, count: int = 20000) -> float:
    """The median over 5 batches of one call's time, in microseconds."""
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            work()
        batches.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(batches)


def translation_costs() -> str:
    """What the translation itself costs, in process: the floor of what a translated call adds."""
    rows = [
        "| protocol | request to chat, encoded | chat answer back | a stream's first events |",
        "|---|---:|---:|---:|",
    ]
    for name, (_, body) in bodies(False).items():
        if name == "chat":
            continue
        module: Any = messages if name == "messages" else responses

        def request(body: dict[str, Any] = body, module: Any = module) -> bytes:
            return json.dumps(module.to_chat(json.loads(json.dumps(body)))).encode()

        def answer(body: dict[str, Any] = body, module: Any = module, name: str = name) -> bytes:
            chat = json.loads(_ANSWER)
            out = module.from_chat(chat) if name == "messages" else module.from_chat(chat, body, "resp_1")
            return json.dumps(out).encode()

        def first(body: dict[str, Any] = body, name: str = name) -> bytes:
            stream = MessagesStream(MODEL) if name == "messages" else ResponsesStream(body, "resp_1")
            return stream.feed(_FIRST)

        cells = [name, *(f"{_per_call_us(w):.1f} µs" for w in (request, answer, first))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds; the table gives medians")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load")
    args = parser.parse_args(argv)
    print(translation_costs(), flush=True)

    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    root, key_file, token = build_project(upstream.base_url)
    service = Service(root, key_file, name="var-protocols")
    results: dict[tuple[str, bool], list[LoadResult]] = defaultdict(list)
    try:
        await service.start()
        for run in range(args.runs):
            for stream in (False, True):
                for name, (path, body) in bodies(stream).items():
                    result = await run_load(
                        service.url + path,
                        token=token,
                        requests=None,
                        duration_s=args.seconds,
                        warmup=50,
                        stream=stream,
                        body=body,
                    )
                    if result.errors:
                        print(f"  {name}: {result.errors} errors {result.statuses}", file=sys.stderr)
                    results[(name, stream)].append(result)
                    kind = "stream" if stream else "whole"
                    print(
                        f"round {run + 1} {name:<10} {kind:<6} {result.summary()}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        service.stop()
        await upstream.stop()
    print()
    print(_table(results))


def _median(results: list[LoadResult], field: str) -> float:
    return statistics.median(float(getattr(r, field) or 0.0) for r in results)


def _table(results: dict[tuple[str, bool], list[LoadResult]]) -> str:
    chat_p50 = _median(results[("chat", False)], "p50_ms")
    chat_ttfb = _median(results[("chat", True)], "ttfb_p50_ms")
    rows = [
        "| protocol | path to the upstream | c=1 p50 | added p50 | stream TTFB p50 | added TTFB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("chat", "messages", "responses"):
        p50 = _median(results[(name, False)], "p50_ms")
        ttfb = _median(results[(name, True)], "ttfb_p50_ms")
        cells = [
            name,
            "native" if name == "chat" else "translated to chat",
            f"{p50:.3f} ms",
            "" if name == "chat" else f"{p50 - chat_p50:+.3f} ms",
            f"{ttfb:.3f} ms",
            "" if name == "chat" else f"{ttfb - chat_ttfb:+.3f} ms",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    asyncio.run(main())
