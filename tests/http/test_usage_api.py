"""`GET …/usage` and `GET …/usage/requests` (reference §13) on a live service, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from service.http.context import LEDGER
from service.usage.ledger import Ledger
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.support.gateway import write_clients
from tests.support.postgres import PostgresServer
from tests.usage.conftest import record

USAGE = "/api/v1/llm-config/usage"
REQUESTS = f"{USAGE}/requests"
READER = "sb_usage_reader_4d6e8f0a1c3b"
OTHER = "sb_usage_config_only_9e8d7c6b5a"
TODAY = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(hours=2)


def _project(sops_project: SopsProject) -> SopsProject:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(
        sops_project,
        {"reader": (READER, ["usage:read"]), "operator": (OTHER, ["config:read", "completions", "admin"])},
    )
    return sops_project


@pytest.fixture
async def service(sops_project: SopsProject) -> AsyncIterator[Service]:
    async with serve(_project(sops_project)) as running:
        yield running


async def _get(service: Service, path: str, token: str | None = READER) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with service.http.get(service.url + path, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, response.headers.copy()


async def _recorded(service: Service, count: int) -> None:
    async def seen() -> bool:
        status, body, _ = await _get(service, f"{REQUESTS}?limit=1000&since=30d")
        return status == 200 and len(body["requests"]) == count

    await eventually(seen, timeout=2)  # docs/reference.md §13: within 2 s of its answer


async def test_records_are_seen_within_two_seconds_grouped_as_asked(service: Service) -> None:
    ledger = service.app[LEDGER]
    for i in range(6):
        ledger.submit(
            record(
                ts=TODAY - timedelta(days=i % 2),
                client="ops" if i % 3 else "batch",
                model="gpt-4o" if i < 4 else "gpt-4o-mini",
                status=(200, 200, 502, 429, 200, 200)[i],
                cost_usd=Decimal("0.000825") if i not in (2, 3) else Decimal(0),
            )
        )
    await _recorded(service, 6)

    status, body, headers = await _get(service, f"{USAGE}?since=3d&group_by=client,day")
    assert status == 200 and headers["ETag"]
    assert set(body) == {"since", "until", "group_by", "rows", "totals", "shared"}
    assert body["group_by"] == ["client", "day"] and body["shared"] is False
    assert body["since"].endswith("Z") and body["until"].endswith("Z")
    day = TODAY.strftime("%Y-%m-%d")
    yesterday = (TODAY - timedelta(days=1)).strftime("%Y-%m-%d")
    assert [(r["client"], r["day"], r["requests"]) for r in body["rows"]] == [
        ("batch", yesterday, 1),
        ("batch", day, 1),
        ("ops", yesterday, 2),
        ("ops", day, 2),
    ]
    assert set(body["rows"][0]) == {
        "client",
        "day",
        "requests",
        "errors",
        "limited",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_usd",
    }
    assert body["totals"] == {
        "requests": 6,
        "errors": 1,
        "limited": 1,
        "prompt_tokens": 600,
        "cached_tokens": 120,
        "completion_tokens": 300,
        "reasoning_tokens": 60,
        "cost_usd": "0.0033",
    }

    status, by_model, _ = await _get(service, f"{USAGE}?since=3d&group_by=model&client=ops")
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [("gpt-4o", 2), ("gpt-4o-mini", 2)]


async def test_the_window_asked_for_keeps_the_tag_until_the_usage_changes(service: Service) -> None:
    """`since` and `until` (the last 7 days up to now by default) are when it was asked, as
    `state`'s `at`: the tag of an answer left them out, or it was new on every request and
    `If-None-Match` never answered 304 (docs/reference.md §9: "so that they too answer a tag
    with 304 until they change")."""
    tags = {}
    for path in (USAGE, f"{USAGE}?since=3d&group_by=client"):
        status, _, headers = await _get(service, path)
        tag = tags[path] = headers["ETag"]
        assert status == 200 and tag.startswith('W/"')
        async with service.http.get(
            service.url + path, headers={"Authorization": f"Bearer {READER}", "If-None-Match": tag}
        ) as again:
            assert again.status == 304 and await again.read() == b""
    service.app[LEDGER].submit(record(ts=TODAY))
    await _recorded(service, 1)
    status, _, changed = await _get(service, USAGE)
    assert status == 200 and changed["ETag"] != tags[USAGE]


async def test_csv_has_the_json_rows_keys_as_columns(service: Service) -> None:
    service.app[LEDGER].submit(record(ts=TODAY, model='=HYPERLINK("http://evil")'))
    await _recorded(service, 1)
    status, text, headers = await _get(service, f"{USAGE}?since=1d&group_by=model,hour&format=csv")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    status, body, _ = await _get(service, f"{USAGE}?since=1d&group_by=model,hour")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(body["rows"][0])
    assert rows[1][0] == '\'=HYPERLINK("http://evil")'  # a spreadsheet shows it, never runs it
    assert rows[1][1] == TODAY.strftime("%Y-%m-%dT%H:00:00Z")
    assert rows[1][2:] == [str(v) for v in list(body["rows"][0].values())[2:]]


async def test_requests_page_newest_first_with_a_cursor_and_a_clamped_limit(service: Service) -> None:
    ledger = service.app[LEDGER]
    for i in range(7):
        ledger.submit(record(id=f"page-{i}", ts=TODAY + timedelta(seconds=i)))
    await _recorded(service, 7)
    seen: list[str] = []
    path = f"{REQUESTS}?limit=3"
    while True:
        status, body, _ = await _get(service, path)
        assert status == 200
        seen += [r["id"] for r in body["requests"]]
        if body["next_cursor"] is None:
            break
        path = f"{REQUESTS}?limit=3&cursor={body['next_cursor']}"
    assert seen == [f"page-{i}" for i in reversed(range(7))]
    for huge in ("1001", "999999999", "9" * 5000):
        status, body, _ = await _get(service, f"{REQUESTS}?limit={huge}")
        assert status == 200 and len(body["requests"]) == 7 and body["next_cursor"] is None
    (first, *_) = body["requests"]
    assert set(first) == {
        "id", "ts", "client", "purpose", "model", "provider", "upstream_model", "status", "stream",
        "attempts", "latency_ms", "ttfb_ms", "prompt_tokens", "cached_tokens", "cache_write_tokens",
        "completion_tokens", "reasoning_tokens", "cost_usd", "priced", "estimated", "replica",
    }  # fmt: skip


async def test_since_and_until_are_iso_8601_in_utc_with_z_an_offset_or_a_date_alone(service: Service) -> None:
    """The same instants said in UTC, in another zone, or as a date (its midnight, UTC) bound the
    same records, in `/usage` and `/usage/requests` alike; a record's `status` is an integer, and
    `status` filters by it."""
    ledger = service.app[LEDGER]
    for i, status in enumerate((200, 429, 502)):
        ledger.submit(record(id=f"at-{i}", ts=TODAY + timedelta(minutes=i), status=status))
    await _recorded(service, 3)
    plus_two = timezone(timedelta(hours=2))

    def said(at: datetime) -> list[str]:
        return [
            at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            quote(at.astimezone(plus_two).isoformat()),  # 2026-…T…+02:00, its `+` sent as %2B
            at.astimezone(plus_two).isoformat(),  # its `+` sent as it is: a space once the query is read
            at.strftime("%Y-%m-%dt%H:%M:%Sz"),  # RFC 3339's lower case
            at.astimezone(timezone(timedelta(hours=-5))).isoformat(),
        ]

    for since in said(TODAY + timedelta(seconds=30)):  # after the first record
        for until in said(TODAY + timedelta(minutes=1, seconds=30)):  # before the last
            status, body, _ = await _get(service, f"{REQUESTS}?since={since}&until={until}")
            assert status == 200 and [r["id"] for r in body["requests"]] == ["at-1"], (since, until)
            status, body, _ = await _get(service, f"{USAGE}?since={since}&until={until}")
            assert status == 200 and body["totals"]["requests"] == 1 and body["totals"]["limited"] == 1
    day = TODAY.strftime("%Y-%m-%d")
    status, body, _ = await _get(service, f"{USAGE}?since={day}")
    assert body["since"] == f"{day}T00:00:00Z" and body["totals"]["requests"] == 3
    status, body, _ = await _get(service, f"{REQUESTS}?until={day}")
    assert status == 200 and body == {"requests": [], "next_cursor": None}
    status, body, _ = await _get(service, f"{REQUESTS}?status=429&since={day}")
    assert [(r["id"], r["status"]) for r in body["requests"]] == [("at-1", 429)]
    status, body, _ = await _get(service, f"{REQUESTS}?status=5xx")
    assert [(r["id"], r["status"]) for r in body["requests"]] == [("at-2", 502)]
    assert all(type(r["status"]) is int for r in (await _get(service, REQUESTS))[1]["requests"])


@pytest.mark.parametrize(
    "query",
    [
        f"{USAGE}?group_by=client,tenant",
        f"{USAGE}?group_by=client;DROP TABLE usage_records",
        f"{USAGE}?since=yesterday-ish",
        f"{USAGE}?since=99999999999d",
        f"{USAGE}?since=2026-01-02&until=2026-01-01",
        f"{USAGE}?format=xml",
        f"{USAGE}?client=" + "x" * 300,
        f"{USAGE}?prompt=1",
        f"{REQUESTS}?limit=0",
        f"{REQUESTS}?limit=-5",
        f"{REQUESTS}?limit=lots",
        f"{REQUESTS}?status=teapot",
        f"{REQUESTS}?status=6xx",
        f"{REQUESTS}?cursor=not-a-cursor",
        f"{REQUESTS}?cursor=WzEsMl0",  # [1,2]: well formed, not ours
        f"{REQUESTS}?until=0001-01-01",
        f"{USAGE}?client=%00",
        f"{REQUESTS}?provider=a%00b",
        f"{REQUESTS}?cursor=WzEsImFcdTAwMDAiXQ",  # [1,"a\u0000"]
        f"{REQUESTS}?cursor=WzEsIlx1ZDgwMCJd",  # [1,"\ud800"]: a lone surrogate no database binds
        f"{REQUESTS}?cursor=WzEsIu2ggCJd",  # [1,"\xed\xa0\x80"]: one as raw bytes
        f"{REQUESTS}?cursor=" + base64.urlsafe_b64encode(b"[" * 3000).decode(),  # nested past the stack
    ],
)
async def test_bad_parameters_are_400_naming_what_is_wrong(service: Service, query: str) -> None:
    status, body, _ = await _get(service, query)
    assert status == 400, body
    assert body["error"]["type"] == "bad_request" and body["error"]["message"]


async def test_no_parameter_makes_postgresql_answer_500(sops_project: SopsProject, postgres_url: str) -> None:
    async with serve(_project(sops_project), usage_db=postgres_url) as service:
        for query in (
            f"{USAGE}?client=%00",
            f"{REQUESTS}?client=%C3%28",
            f"{REQUESTS}?cursor=WzEsImFcdTAwMDAiXQ",
            f"{USAGE}?model=" + "%F0%9F%92%A9" * 50,
            f"{REQUESTS}?provider=\\x27%3B--",
        ):
            status, body, _ = await _get(service, query)
            assert status in (200, 400), (query, status, body)


async def test_only_usage_read_reads_the_ledger_and_it_reads_nothing_else(service: Service) -> None:
    service.app[LEDGER].submit(record(ts=TODAY))
    await _recorded(service, 1)
    for path in (USAGE, REQUESTS):
        assert (await _get(service, path, OTHER))[0] == 403
        assert (await _get(service, path, None))[0] == 401
    for path in (
        "/api/v1/llm-config/providers",
        "/api/v1/llm-config/audit",
        "/api/v1/llm-config/events",
        "/api/v1/llm-config/state",
        "/api/v1/llm-config/active/chat/litellm",
        "/v1/models",
    ):
        assert (await _get(service, path, READER))[0] == 403, path
    status, body, _ = await _get(service, f"{REQUESTS}?since=1d")
    text = str(body)
    assert status == 200 and "messages" not in text and "content" not in text


async def test_readyz_names_the_ledger_state(service: Service) -> None:
    status, body, _ = await _get(service, "/readyz", None)
    assert status == 200 and body["ledger"] == "ok" and body["degraded"] is False


async def test_the_ledger_off_keeps_nothing_and_answers_503(sops_project: SopsProject) -> None:
    async with serve(_project(sops_project), usage_db="off") as service:
        service.app[LEDGER].submit(record())
        status, body, _ = await _get(service, "/readyz", None)
        assert body["ledger"] == "off" and body["degraded"] is False
        status, body, _ = await _get(service, USAGE)
        assert status == 503 and body["error"]["type"] == "ledger_unavailable"
        assert not (sops_project.root / "var" / "usage-spool").exists()


async def test_postgresql_down_the_service_starts_serves_and_says_so_then_recovers(
    sops_project: SopsProject, postgres_server: PostgresServer, postgres_url: str
) -> None:
    postgres_server.stop()
    try:
        async with serve(_project(sops_project), usage_db=postgres_url) as service:
            status, body, _ = await _get(service, "/readyz", None)
            assert status == 200 and body["ledger"] == "degraded" and body["degraded"] is True
            status, body, _ = await _get(service, USAGE)
            assert status == 503 and body["error"]["type"] == "ledger_unavailable"
            status, body, _ = await _get(service, REQUESTS)
            assert status == 503 and body["error"]["type"] == "ledger_unavailable"
            service.app[LEDGER].submit(record(ts=TODAY))  # the gateway goes on answering

            postgres_server.start()

            async def back() -> bool:
                _, body, _ = await _get(service, "/readyz", None)
                return body["ledger"] == "ok"

            await eventually(back, timeout=15)  # retried at least every 5 s
            await _recorded(service, 1)
            status, body, _ = await _get(service, f"{USAGE}?since=1d")
            assert body["shared"] is True and body["totals"]["requests"] == 1
    finally:
        postgres_server.ensure_running()


class _Freezer:
    """A TCP relay to PostgreSQL that can stop relaying while keeping every connection open: a
    server that no longer answers, its sockets alive (hung, or cut off without a reset)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._url = parts
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return self._url._replace(netloc=f"{self._url.username}@127.0.0.1:{port}").geturl()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()

    def freeze(self) -> None:
        self._thawed.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += (writer, up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                await self._thawed.wait()
                sink.write(data)
                await sink.drain()
        sink.close()


async def test_a_database_that_stops_answering_is_503_and_holds_up_neither_the_gateway_nor_a_stop(
    sops_project: SopsProject, postgres_url: str
) -> None:
    """A PostgreSQL that no longer answers on the connections already made (they stay open) is a
    database that is down: `/usage` and `/usage/requests` answer 503 `ledger_unavailable` in a few
    seconds, the records wait in the spool, and a graceful stop ends, keeping them there."""
    freezer = _Freezer(postgres_url)
    async with freezer as url:
        async with serve(_project(sops_project), usage_db=url) as service:
            service.app[LEDGER].submit(record(ts=TODAY))
            await _recorded(service, 1)
            freezer.freeze()
            asked = time.monotonic()
            usage = await asyncio.wait_for(_get(service, USAGE), timeout=30)
            requests = await asyncio.wait_for(_get(service, REQUESTS), timeout=30)
            answered = time.monotonic() - asked
            service.app[LEDGER].submit(record(ts=TODAY))  # it waits in the spool
            stopping = time.monotonic()
        stopped = time.monotonic() - stopping
    for status, body, _ in (usage, requests):
        assert status == 503 and body["error"]["type"] == "ledger_unavailable"
    assert answered < 25 and stopped < 20, (answered, stopped)
    spool = sops_project.root / "var" / "usage-spool"
    assert sum(p.read_bytes().count(b"\n") for p in spool.glob("*.jsonl")) == 1


async def test_a_stop_while_a_write_waits_on_the_database_is_quick_and_keeps_its_record(
    sops_project: SopsProject, postgres_url: str
) -> None:
    """The ledger's thread waits in a transaction the database does not answer (here a lock
    another session holds on the records' table: a server that answers nothing looks the same)
    when the service is stopped: the stop cuts it rather than wait out the transaction's
    deadline (a minute), and its record stays in the spool for the next start."""
    import psycopg

    with psycopg.connect(postgres_url) as blocker:
        async with serve(_project(sops_project), usage_db=postgres_url) as service:
            service.app[LEDGER].submit(record(ts=TODAY))
            await _recorded(service, 1)
            blocker.execute("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")  # held by its transaction
            service.app[LEDGER].submit(record(ts=TODAY))  # its batch's insert waits for the lock
            await asyncio.sleep(1.5)
            stopping = time.monotonic()
        stopped = time.monotonic() - stopping
        blocker.rollback()
    assert stopped < 15, stopped
    spool = sops_project.root / "var" / "usage-spool"
    assert sum(p.read_bytes().count(b"\n") for p in spool.glob("*.jsonl")) == 1


def test_the_ledger_is_a_record_sink() -> None:
    from service.usage.record import RecordSink

    sink: RecordSink = Ledger(None, __import__("pathlib").Path("unused"))
    sink.submit(record())  # off: kept nowhere, never raises
