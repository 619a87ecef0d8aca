"""`switchboard usage` reads the ledger directly: the service need not run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from service.cli.main import cli
from service.usage.ledger import Ledger
from service.usage.query import UsageQuery
from service.usage.stores import open_store
from tests.support.postgres import PostgresServer
from tests.usage.conftest import record

NOW = datetime.now(UTC)


@pytest.fixture
async def recorded(tmp_path: Path) -> Ledger:
    ledger = Ledger(open_store("var/usage.db", tmp_path), tmp_path / "var" / "usage-spool")
    await ledger.start()
    for i in range(4):
        ledger.submit(record(ts=NOW - timedelta(hours=i), client=("a", "b")[i % 2], cost_usd=Decimal("0.5")))
    await ledger.stop()  # stored, and the service is gone
    return ledger


async def test_json_prints_what_get_usage_answers(
    recorded: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("--root", str(tmp_path), "usage", "--since", "1d", "--by", "client", "--format", "json") == 0
    printed = json.loads(capsys.readouterr().out)
    await recorded.start()
    try:
        query = UsageQuery.parse(
            {"since": printed["since"], "until": printed["until"], "group_by": "client"}, NOW
        )
        assert printed == await recorded.usage(query)
    finally:
        await recorded.stop()
    assert [(r["client"], r["requests"], r["cost_usd"]) for r in printed["rows"]] == [
        ("a", 2, "1"),
        ("b", 2, "1"),
    ]


async def test_table_and_csv(recorded: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--root", str(tmp_path), "usage", "--by", "client,model") == 0
    table = capsys.readouterr().out
    assert "client" in table and "gpt-4o" in table and "total" in table and "cost_usd" in table
    assert cli("--root", str(tmp_path), "usage", "--by", "client", "--format", "csv", "--client", "a") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("client,requests,errors,limited,prompt_tokens") and len(lines) == 2


async def test_until_ends_the_window_and_by_takes_several_keys(
    recorded: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records in [since, until): of the four an hour apart, the two before 90 minutes ago."""
    until = (NOW - timedelta(minutes=90)).isoformat()
    argv = ("--root", str(tmp_path), "usage", "--since", "1d", "--until", until, "--by", "client,hour")
    assert cli(*argv, "--format", "json") == 0
    printed = json.loads(capsys.readouterr().out)
    hours = [(NOW - timedelta(hours=i)).strftime("%Y-%m-%dT%H:00:00Z") for i in (2, 3)]
    assert printed["group_by"] == ["client", "hour"]
    assert [(r["client"], r["hour"], r["requests"]) for r in printed["rows"]] == [
        ("a", hours[0], 1),
        ("b", hours[1], 1),
    ]
    assert printed["until"] == until.replace("+00:00", "Z") and printed["totals"]["cost_usd"] == "1"


def test_wrong_usage_exits_2_and_an_empty_folder_has_no_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("--root", str(tmp_path), "usage", "--by", "tenant") == 2
    assert "--by" in capsys.readouterr().err
    assert cli("--root", str(tmp_path), "usage", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["rows"] == []
    assert not (tmp_path / "var").exists()  # reading made nothing


def test_off_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCHBOARD_USAGE_DB", "off")
    assert cli("--root", str(tmp_path), "usage") == 1
    assert "off" in capsys.readouterr().err


async def test_records_left_in_the_spool_are_mentioned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "var" / "usage-spool"
    spool.mkdir(parents=True)
    from service.usage.encoding import encode

    (spool / "000000000001.jsonl").write_bytes(encode(record()) * 3)
    assert cli("--root", str(tmp_path), "usage") == 0
    assert "3 records" in capsys.readouterr().err


def test_a_postgresql_database_the_service_never_wrote_to_has_no_usage_and_one_down_is_said(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    """As an empty folder's SQLite: a fresh database holds no usage yet (not an error naming a
    missing table); a database that cannot be reached exits 1."""
    monkeypatch.setenv("SWITCHBOARD_USAGE_DB", postgres_url)
    assert cli("--root", str(tmp_path), "usage", "--format", "json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == [] and printed["totals"]["requests"] == 0 and printed["shared"] is True
    postgres_server.stop()
    try:
        assert cli("--root", str(tmp_path), "usage", "--format", "json") == 1
    finally:
        postgres_server.ensure_running()
    assert "cannot be reached" in capsys.readouterr().err


def test_a_postgresql_that_cannot_be_reached_is_one_line_on_stderr(tmp_path: Path) -> None:
    """docs/reference.md §3: errors go to stderr as one line each. The connection pool's own
    warnings (one a try, each of two lines) are not printed beside the command's error."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://switchboard:pw-0123456789@127.0.0.1:{port}/usage"
    done = subprocess.run(
        [sys.executable, "-m", "service", "--root", str(tmp_path), "usage", "--db", url],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "switchboard: error: the usage ledger cannot be read: PostgreSQL cannot be reached"
    ]


async def test_records_waiting_in_a_followers_spool_are_said_too(
    recorded: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --workers N`: each follower spools in `<spool>/worker-K`; what waits there is not
    stored yet either, and said so."""
    spool = tmp_path / "var" / "usage-spool"
    (spool / "000000000009.jsonl").write_text('{"a": 1}\n')
    (spool / "worker-1").mkdir()
    (spool / "worker-1" / "000000000001.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    assert cli("--root", str(tmp_path), "usage", "--format", "json") == 0
    assert "3 records in" in capsys.readouterr().err
