"""`switchboard export`: LiteLLM and WilmerAI configurations, loaded by their consumers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli.main import cli
from service.config.export import litellm_config
from service.config.snapshot import load_folder as load
from service.formats import key_variable
from tests.conftest import SopsProject, git, git_init
from tests.support.tampering import TAMPERS, encrypted_vendor
from tests.support.upstreams import FakeUpstream

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is first imported

PRIMARY_KEY = "sk-primary-0123456789abcdef"
FALLBACK_KEY = "sk-fallback-0123456789abcdef"


def write(project: SopsProject, name: str, text: str, *, encrypt: bool = False) -> None:
    path = project.providers / f"{name}.yaml"
    path.write_text(text)
    if encrypt:
        project.sops.encrypt_in_place(path)


def configure(project: SopsProject, primary_url: str, fallback_url: str) -> None:
    """An OpenAI key as primary (aliased model), a vLLM server as fallback, an unrouted spare."""
    write(
        project,
        "vendor",
        "kind: api_key\nid: vendor\nprovider: openai\n"
        f"base_url: {primary_url}\napi_key: {PRIMARY_KEY}\n"
        "models: [fake-model]\nmodel_map: {fast: fake-model}\n",
        encrypt=True,
    )
    write(
        project,
        "gpu",
        f"kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: {fallback_url}\n"
        f"api_key: {FALLBACK_KEY}\nmodels: [fake-model]\n",
        encrypt=True,
    )
    write(
        project,
        "embedder",
        "kind: ai_server\nid: embedder\nserver_type: tei\nbase_url: http://127.0.0.1:1/v1\n"
        "purposes: [embeddings]\n",
    )
    write(
        project,
        "offline",
        "kind: ai_server\nid: offline\nserver_type: vllm\nbase_url: http://x:1\nenabled: no\n",
    )
    write(
        project,
        "routing",
        "kind: routing\npurposes:\n  chat:\n    primary: vendor\n    fallbacks: [gpu]\n"
        "  embeddings:\n    primary: embedder\n",
    )


@pytest.fixture
def project(sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch) -> SopsProject:
    monkeypatch.chdir(sops_project.root)
    return sops_project


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli("export", *args)
    out, err = capsys.readouterr()
    return code, out, err


def test_litellm_deployments_fallbacks_and_env_references(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    code, out, err = export(capsys, "litellm")
    assert code == 0, err
    assert PRIMARY_KEY not in out and FALLBACK_KEY not in out
    assert "# Keys are read from the environment: SWITCHBOARD_KEY_GPU, SWITCHBOARD_KEY_VENDOR" in out
    config = yaml.safe_load(out)
    deployments = {
        (d["model_name"], d["model_info"]["switchboard_provider"]): d for d in config["model_list"]
    }
    assert sorted(deployments) == [
        ("embedder/*", "embedder"),
        ("fake-model", "vendor"),
        ("fast", "vendor"),
        ("gpu/fake-model", "gpu"),
    ]
    assert deployments["fast", "vendor"]["litellm_params"] == {
        "model": "openai/fake-model",
        "api_base": "http://127.0.0.1:9/v1",
        "api_key": "os.environ/SWITCHBOARD_KEY_VENDOR",
        "timeout": 600,
    }
    assert deployments["embedder/*", "embedder"]["model_info"]["mode"] == "embedding"
    assert deployments["embedder/*", "embedder"]["litellm_params"]["api_key"] == "no-key"
    assert config["router_settings"]["fallbacks"] == [{"fake-model": ["gpu/fake-model"]}]


def test_litellm_weights_follow_routing(project: SopsProject) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    write(
        project,
        "routing",
        "kind: routing\npurposes:\n  chat:\n    primary: [vendor, gpu]\n    weights: {gpu: 3}\n",
    )
    config = litellm_config(load(project.providers, "providers.d", None))
    weights = {
        d["model_info"]["switchboard_provider"]: d["litellm_params"]["weight"]
        for d in config["model_list"]
        if d["model_name"] == "fake-model"
    }
    assert weights == {"vendor": 1.0, "gpu": 3.0}
    assert "fallbacks" not in config["router_settings"]


def test_with_secrets_writes_decrypted_keys_to_a_private_file(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(project.identity.key_file))
    out_file = tmp_path / "litellm.yaml"
    code, out, err = export(capsys, "litellm", "--with-secrets", "--out", str(out_file))
    assert code == 0
    assert PRIMARY_KEY not in out + err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    keys = {d["litellm_params"]["api_key"] for d in yaml.safe_load(out_file.read_text())["model_list"]}
    assert keys == {PRIMARY_KEY, FALLBACK_KEY, "no-key"}


def test_with_secrets_and_no_key_at_hand_fails_without_writing(
    project: SopsProject, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    code, _, err = export(capsys, "litellm", "--with-secrets", "--out", str(tmp_path / "x.yaml"))
    assert code == 1
    assert "cannot decrypt" in err
    assert not (tmp_path / "x.yaml").exists()


def test_an_invalid_configuration_is_not_exported(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    (project.providers / "gpu.yaml").unlink()
    code, out, err = export(capsys, "litellm")
    assert (code, out) == (1, "")
    assert "names `gpu`, which does not exist" in err


@pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")  # litellm's
async def test_litellm_router_completes_through_the_export_and_falls_back(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import litellm

    async with (
        FakeUpstream(name="primary", api_key=PRIMARY_KEY) as primary,
        FakeUpstream(name="fallback", api_key=FALLBACK_KEY) as fallback,
    ):
        configure(project, primary.base_url, fallback.base_url)
        code, out, err = export(capsys, "litellm")
        assert code == 0, err
        monkeypatch.setenv(key_variable("vendor"), PRIMARY_KEY)
        monkeypatch.setenv(key_variable("gpu"), FALLBACK_KEY)
        config: dict[str, Any] = yaml.safe_load(out)
        router = litellm.Router(model_list=config["model_list"], **config["router_settings"])
        messages = [{"role": "user", "content": "hello"}]

        answer = await router.acompletion(model="fast", messages=messages)
        assert answer.choices[0].message.content
        assert [r.json["model"] for r in primary.requests] == ["fake-model"]
        assert not fallback.requests

        primary.fail(503)
        answer = await router.acompletion(model="fake-model", messages=messages)
        assert answer.choices[0].message.content
        assert [r.json["model"] for r in fallback.requests] == ["fake-model"]


def test_wilmer_endpoint_files(
    project: SopsProject, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    write(
        project,
        "claude",
        "kind: api_key\nid: claude\nname: Claude\nprovider: anthropic\n"
        f"api_key: {PRIMARY_KEY}\nmodels: [claude-sonnet-4-5]\n",
        encrypt=True,
    )
    out_dir = tmp_path / "Endpoints"
    code, _, err = export(capsys, "wilmer", "--out", str(out_dir))
    assert code == 0
    assert "wrote 4 endpoint file(s)" in err
    assert "skipped (disabled, or no WilmerAI API type): offline" in err
    files = {p.name: json.loads(p.read_text()) for p in out_dir.iterdir()}
    assert sorted(files) == ["claude.json", "embedder.json", "gpu.json", "vendor.json"]
    vendor = files["vendor.json"]
    assert vendor["endpoint"] == "http://127.0.0.1:9"
    assert vendor["apiTypeConfigFileName"] == "Open-AI-API"
    assert vendor["modelNameToSendToAPI"] == "fake-model"
    assert vendor["dontIncludeModel"] is False
    assert vendor["apiKey"] == ""
    assert vendor["maxContextTokenSize"] == 8192
    assert vendor["removeThinking"] is False
    assert files["claude.json"]["apiTypeConfigFileName"] == "Claude"
    assert files["claude.json"]["endpoint"] == "https://api.anthropic.com"
    assert files["claude.json"]["modelNameForDisplayOnly"] == "Claude"
    embedder = files["embedder.json"]
    assert embedder == {
        "modelNameForDisplayOnly": "embedder",
        "endpoint": "http://127.0.0.1:1",
        "apiKey": "",
        "apiTypeConfigFileName": "OpenAI-Embeddings",
        "modelNameToSendToAPI": "",
        "dontIncludeModel": True,
    }


def test_wilmer_with_secrets(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(project.identity.key_file))
    assert export(capsys, "wilmer", "--with-secrets", "--out", str(tmp_path))[0] == 0
    assert json.loads((tmp_path / "gpu.json").read_text())["apiKey"] == FALLBACK_KEY
    assert stat.S_IMODE((tmp_path / "gpu.json").stat().st_mode) == 0o600


def test_wilmer_needs_an_output_folder(project: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = export(capsys, "wilmer")
    assert code == 2
    assert "export wilmer needs --out DIR" in err


def test_provider_methods_match_the_export(project: SopsProject) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    snapshot = load(project.providers, "providers.d", None)
    gpu = snapshot.providers["gpu"]
    assert gpu.to_litellm_config("fake-model")["model"] == "openai/fake-model"
    assert gpu.to_litellm_config()["model"] == "openai/*"
    wilmer = gpu.to_wilmer_config()
    assert wilmer is not None and wilmer["endpoint"] == "http://127.0.0.1:10"


def test_a_model_name_used_by_two_purposes_is_an_export_error(
    project: SopsProject, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    write(
        project,
        "embedder",
        "kind: ai_server\nid: embedder\nserver_type: tei\nbase_url: http://127.0.0.1:1/v1\n"
        "purposes: [embeddings]\nmodels: [fake-model]\n",
    )
    out_file = tmp_path / "litellm.yaml"
    code, out, err = export(capsys, "litellm", "--out", str(out_file))
    assert (code, out) == (1, "")
    assert not out_file.exists()
    (line,) = err.splitlines()
    assert line.startswith("providers.d/routing.yaml:")
    assert "model `fake-model`: embeddings routes it to embedder, and chat routes it to vendor" in line


def test_a_model_name_holding_a_wildcard_is_an_export_error(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    write(
        project,
        "gpu",
        "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:10/v1\nmodels: [gpt-*]\n",
    )
    code, _, err = export(capsys, "litellm")
    assert code == 1
    assert "model `gpt-*` holds `*`" in err


def test_what_litellm_cannot_route_is_noted_and_its_master_key_is_an_env_reference(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(project, "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    code, out, err = export(capsys, "litellm")
    assert code == 0
    note = (
        "embeddings: no provider of it declares a model, so LiteLLM reaches `embedder` only as "
        "`<provider id>/<model>`; list their `models` to route embeddings by model name"
    )
    assert err.splitlines() == [f"switchboard: note: {note}"]
    assert f"# Note: {note}" in out.splitlines()
    assert "# The proxy's own master key is read from LITELLM_MASTER_KEY (general_settings)." in out
    assert yaml.safe_load(out)["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}


def test_with_secrets_a_provider_changed_outside_sops_is_not_exported(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The export hands the key and its `base_url` to another tool: a file carrying the MAC of
    the version that first carried it in HEAD's history while its data differs was changed
    outside sops, and nothing is written (docs/reference.md §2.4, §3.2)."""
    root, tamper = project.root, TAMPERS[0]
    git_init(root)
    path = encrypted_vendor(project, tamper)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "add a vendor")
    path.write_text(tamper.apply(path.read_text()))
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(project.identity.key_file))
    code, _, err = export(capsys, "litellm", "--with-secrets", "--out", str(tmp_path / "x.yaml"))
    assert code == 1
    assert "MAC mismatch: the file was changed without sops" in err
    assert not (tmp_path / "x.yaml").exists()
