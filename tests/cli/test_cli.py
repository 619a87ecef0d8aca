"""The service commands of the CLI that need no running server: token, serve's refusals, audit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli.main import cli
from service.journal.events import ServiceStarted
from service.journal.log import EventLog
from tests.conftest import git_init


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(*args)
    out, err = capsys.readouterr()
    return code, out, err


def test_token_create_prints_the_token_once_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "providers.d"
    args = ("token", "create", "ops-center", "--scope", "config:read", "completions")
    code, out, err = run(capsys, *args, "--providers", str(folder))
    assert code == 0
    token = out.strip()
    assert out == f"{token}\n" and token.startswith("sb_")
    assert err == (
        f"added client 'ops-center' to {folder / 'clients.yaml'}; the token is shown only this once\n"
    )
    (client,) = yaml.safe_load((folder / "clients.yaml").read_text())["clients"]
    assert client == {
        "name": "ops-center",
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": ["config:read", "completions"],
    }


def test_token_create_refuses_a_name_taken_and_an_unknown_scope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "providers.d"
    assert run(capsys, "token", "create", "a", "--scope", "admin", "--providers", str(folder))[0] == 0
    code, _, err = run(capsys, "token", "create", "a", "--scope", "admin", "--providers", str(folder))
    assert code == 1
    assert "a client named 'a' exists already" in err
    with pytest.raises(SystemExit) as caught:
        cli("token", "create", "b", "--scope", "root", "--providers", str(folder))
    assert caught.value.code == 2


@pytest.mark.parametrize("name", ["my ops", ".ops", "ops\n", "o" * 64])
def test_token_create_refuses_a_name_no_client_may_have_as_wrong_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """docs/reference.md §3: "2 wrong usage", one line on stderr; no file is written."""
    folder = tmp_path / "providers.d"
    code, out, err = run(capsys, "token", "create", name, "--scope", "admin", "--providers", str(folder))
    assert (code, out) == (2, "")
    assert err == f"switchboard: error: NAME: {name!r} is not a client name " + (
        "(a letter or digit, then letters, digits, `.`, `_` or `-`; at most 63)\n"
    )
    assert not folder.exists()


def test_serve_refuses_a_public_address_without_a_clients_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "providers.d").mkdir()
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--host", "0.0.0.0", "--port", "0")  # noqa: S104
    assert code == 1
    assert "refusing to listen on 0.0.0.0 without authentication" in err
    assert "switchboard token create" in err


def test_serve_needs_the_providers_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 1
    assert "providers.d: no such folder" in err


def test_serve_refuses_a_pull_it_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("SWITCHBOARD_GIT_PULL", "main")
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 2 and "REMOTE/BRANCH" in err
    monkeypatch.setenv("SWITCHBOARD_GIT_PULL", "origin/main")
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 1 and "not in a git repository" in err


@pytest.mark.parametrize("committer", ["nobody", "Bot <bot@example.org", "<bot@example.org>"])
def test_serve_refuses_a_committer_git_would_not_take_as_wrong_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, committer: str
) -> None:
    """docs/reference.md §3: "2 wrong usage", one line naming the variable. It was "internal
    error: ValueError", exit 1, as for a bug."""
    (tmp_path / "providers.d").mkdir()
    git_init(tmp_path)
    monkeypatch.setenv("SWITCHBOARD_GIT_COMMITTER", committer)
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("switchboard: error: SWITCHBOARD_GIT_COMMITTER")
    assert "`Name <email>`" in err


def test_serve_refuses_allowed_upstreams_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("SWITCHBOARD_ALLOWED_UPSTREAMS", "10.0.0.0/8, 10.0.0.0/33")
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 2
    assert err.count("\n") == 1 and "SWITCHBOARD_ALLOWED_UPSTREAMS: '10.0.0.0/33' is neither a network" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", ""])
def test_serve_refuses_a_receive_timeout_that_is_no_time_as_wrong_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """docs/reference.md §3.3: SWITCHBOARD_RECEIVE_TIMEOUT_S is a number of seconds over 0, and
    finite (none would let a trickled head hold its connection for good): anything else is one
    line, exit 2, before anything is served."""
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("SWITCHBOARD_RECEIVE_TIMEOUT_S", value)
    code, out, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(
        "switchboard: error: setting SWITCHBOARD_RECEIVE_TIMEOUT_S (receive_timeout_s): "
    ), err


def test_a_bad_time_argument_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path), "state", "--at", "yesterday-ish")
    assert code == 2
    assert "not a time" in err


@pytest.mark.parametrize("command", [["audit", "show"], ["audit", "verify"], ["state"]], ids=" ".join)
def test_a_command_reading_a_missing_log_is_one_error_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`audit show` said nothing and exited 0, as if the log were there and empty (a wrong
    `--events` read as "nothing happened"), and `state` printed an empty configuration; each now
    says what `audit verify` said."""
    code, out, err = run(capsys, "--root", str(tmp_path), *command)
    missing = tmp_path / "var" / "events.jsonl"
    assert (code, out) == (1, "")
    assert err == f"switchboard: error: {missing}: cannot read the event log: No such file or directory\n"


@pytest.mark.parametrize("command", [["audit", "show"], ["audit", "verify"], ["state"]], ids=" ".join)
def test_a_command_reading_a_log_that_is_a_fifo_says_so_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Opening a FIFO for reading waits for a writer: each command hung, forever."""
    fifo = tmp_path / "var" / "events.jsonl"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    code, out, err = run(capsys, "--root", str(tmp_path), *command)
    assert (code, out) == (1, "")
    assert err == f"switchboard: error: {fifo}: cannot read the event log: not a regular file\n"


@pytest.mark.parametrize(
    "command", [["export", "litellm"], ["export", "wilmer", "--out"], ["rotate"]], ids=" ".join
)
def test_a_command_reading_a_missing_providers_folder_is_one_error_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Run in the wrong folder (or with a wrong `--providers`), `export` printed an empty LiteLLM
    configuration and `rotate` "0 file(s) re-encrypted", both exiting 0 as if there were nothing
    to do; each now says what `serve` says, and writes nothing."""
    args = [*command, str(tmp_path / "wilmer")] if command[-1] == "--out" else command
    code, out, err = run(capsys, "--root", str(tmp_path), *args)
    assert (code, out) == (1, "")
    assert err == f"switchboard: error: {tmp_path / 'providers.d'}: no such folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_missing_file_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path), "encrypt", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert err.strip() == f"switchboard: error: No such file or directory: {tmp_path / 'nope.yaml'}"


def test_serve_says_which_packages_tracing_needs_when_they_are_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("SWITCHBOARD_OTEL_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    # As if the packages were not installed: importlib finds no module of these names.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 1
    assert "SWITCHBOARD_OTEL_EXPORTER=otlp needs the Python packages" in err
    assert "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc" in err
    assert "proto-http" not in err  # the protocol asked for is grpc


def test_serve_refuses_an_otlp_protocol_it_cannot_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("SWITCHBOARD_OTEL_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in err and "'http/protobuf' or 'grpc'" in err
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    monkeypatch.setenv("SWITCHBOARD_OTEL_EXPORTER", "jaeger")
    code, _, err = run(capsys, "--root", str(tmp_path), "serve", "--port", "0")
    assert code == 2 and "otel_exporter" in err and "'otlp' or 'none'" in err


SPEC_COMMANDS = [
    ["serve"],
    ["validate"],
    ["schema"],
    ["keygen"],
    ["encrypt"],
    ["edit"],
    ["rotate"],
    ["plan"],
    ["audit"],
    ["audit", "show"],
    ["audit", "verify"],
    ["state"],
    ["export"],
    ["test"],
    ["token"],
    ["token", "create"],
    ["usage"],
]


@pytest.mark.parametrize("command", SPEC_COMMANDS, ids=" ".join)
def test_every_command_of_the_table_answers_help_with_its_usage(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """docs/reference.md §3: every command of the table takes `--help`: its usage on stdout, exit 0."""
    with pytest.raises(SystemExit) as caught:
        cli(*command, "--help")
    out, err = capsys.readouterr()
    assert (caught.value.code, err) == (0, "")
    assert out.startswith(f"usage: switchboard {' '.join(command)} ")


def test_python_dash_m_service_is_the_switchboard_command() -> None:
    """docs/reference.md §3: `python -m service` is `switchboard`, exit codes included."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: switchboard ")
    wrong = subprocess.run(
        [sys.executable, "-m", "service", "no-such-command"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert wrong.returncode == 2 and wrong.stdout == "" and "Traceback" not in wrong.stderr


def test_state_before_the_first_event_is_the_empty_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`state --at` a time before the log began: nothing was configured yet (exit 0), not an
    error; a time after its last event is the configuration as it stands."""
    log = EventLog(tmp_path / "events.jsonl")
    log.append(ServiceStarted(version="0", pid=1))
    log.close()
    code, out, err = run(capsys, "state", "--at", "2001-01-01T00:00:00Z", "--events", str(log.path))
    assert (code, err) == (0, "")
    assert json.loads(out) == {"providers": {}, "routing": {}, "clients": {}}
