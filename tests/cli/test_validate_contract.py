"""`switchboard validate` against docs/reference.md §3: each check of the list, in each format.

Checks: YAML syntax (one document, a mapping), the schema, `id` equals the file name, unique
ids, routing and clients references; text is `FILE:LINE: error: MESSAGE`, `--format github` is
`::error file=FILE,line=LINE::MESSAGE`; exit 1 when any problem is found, 2 for wrong usage.
"""

from __future__ import annotations

import json

import pytest

from service.cli.main import cli
from tests.conftest import SopsProject

SERVER = "kind: ai_server\nid: {id}\nserver_type: vllm\nbase_url: http://127.0.0.1:8000/v1\n"
TOKEN = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.fixture
def folder(sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch) -> SopsProject:
    monkeypatch.chdir(sops_project.root)
    return sops_project


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli("validate", *args)
    return code, capsys.readouterr().out.splitlines()


def test_an_id_in_a_yaml_and_a_yml_file_alike_is_one_problem_with_its_line(
    folder: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder.providers / "gpu.yaml").write_text(SERVER.format(id="gpu"))
    (folder.providers / "gpu.yml").write_text(SERVER.format(id="gpu"))
    code, lines = run(capsys)
    assert code == 1
    assert lines == ["providers.d/gpu.yml:2: error: id `gpu` is also defined in providers.d/gpu.yaml"]


def test_two_clients_with_one_name_or_one_token_are_problems_in_every_format(
    folder: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = "  - name: {name}\n    token_sha256: {token}\n    scopes: [admin]\n"
    clients = folder.providers / "clients.yaml"
    clients.write_text(
        "kind: clients\nclients:\n"
        + entry.format(name="ops", token=TOKEN)
        + entry.format(name="ops", token=TOKEN.replace("9", "8"))
    )
    code, lines = run(capsys)
    assert (code, lines) == (1, ["providers.d/clients.yaml:1: error: two clients have the same name"])
    clients.write_text(
        "kind: clients\nclients:\n"
        + entry.format(name="ops", token=TOKEN)
        + entry.format(name="ci", token=TOKEN)
    )
    code, lines = run(capsys, "--format", "github")
    assert (code, lines) == (
        1,
        ["::error file=providers.d/clients.yaml,line=1::two clients have the same token"],
    )


def test_routing_references_are_checked_and_each_named_in_json(
    folder: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder.providers / "gpu.yaml").write_text(SERVER.format(id="gpu") + "enabled: false\n")
    (folder.providers / "tei.yaml").write_text(SERVER.format(id="tei") + "purposes: [embeddings]\n")
    (folder.providers / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: [gpu, ghost]\n    fallbacks: [tei]\n"
    )
    code, lines = run(capsys, "--format", "json")
    report = json.loads("\n".join(lines))
    assert code == 1 and report["ok"] is False and report["files"] == 3
    assert [(p["file"], p["line"], p["path"], p["message"]) for p in report["problems"]] == [
        (
            "providers.d/routing.yaml",
            4,
            "purposes.chat.primary.0",
            "routing for `chat` names `gpu`, which is disabled",
        ),
        (
            "providers.d/routing.yaml",
            4,
            "purposes.chat.primary.1",
            "routing for `chat` names `ghost`, which does not exist",
        ),
        (
            "providers.d/routing.yaml",
            5,
            "purposes.chat.fallbacks.0",
            "routing for `chat` names `tei`, whose purposes (embeddings) lack `chat`",
        ),
    ]


def test_weights_may_name_only_primaries(folder: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    for provider_id in ("gpu", "cpu"):
        (folder.providers / f"{provider_id}.yaml").write_text(SERVER.format(id=provider_id))
    (folder.providers / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: gpu\n    weights: {cpu: 2}\n    fallbacks: [cpu]\n"
    )
    code, lines = run(capsys)
    assert code == 1
    assert lines == [
        "providers.d/routing.yaml:3: error: `purposes.chat`: weights name cpu, which is not a primary"
    ]


def test_a_routing_file_may_name_a_provider_whose_file_is_refused(
    folder: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reference.md §4: a refused provider file still counts as known to routing; only the
    file itself is reported."""
    (folder.providers / "gpu.yaml").write_text("kind: ai_server\nid: gpu\nserver_type: vllm\n")
    (folder.providers / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: gpu\n")
    code, lines = run(capsys)
    assert (code, lines) == (1, ["providers.d/gpu.yaml:1: error: missing required field `base_url`"])
