"""`export litellm` routes as Switchboard does: litellm's own `Router`, built from the file,
sends each purpose's requests where Switchboard would (counted at stand-in upstreams), with
the weights, the fallbacks and the prices of the provider files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import yaml

from service.config.export import litellm_costs, litellm_export, litellm_yaml
from service.config.snapshot import load_folder
from service.formats import key_variable
from tests.conftest import SopsProject
from tests.support.gateway import CANARY, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, upstreams

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is first imported

# litellm's own types warn about pydantic internals while it works; warnings are errors here.
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")
MESSAGES = [{"role": "user", "content": "hello there"}]


def configure(project: SopsProject, vendor: str, gpu: str, backup: str, tei: str, infinity: str) -> None:
    """The issue's shape: a vendor key that declares no models weighted 3 to 1 against a GPU
    server for chat, with a fallback; a TEI server that declares none for embeddings, with a
    fallback that declares `bge-m3`."""
    write_provider(project, "vendor", provider="openrouter", base_url=vendor, api_key=CANARY)
    write_provider(project, "gpu", base_url=gpu, models=["llama"], model_map={"fast": "llama"})
    write_provider(project, "backup", server_type="ollama", base_url=backup, models=["llama"])
    write_provider(project, "tei", server_type="tei", base_url=tei, purposes=["embeddings"])
    write_provider(
        project,
        "infinity",
        server_type="infinity",
        base_url=infinity,
        models=["bge-m3"],
        purposes=["embeddings"],
    )
    write_routing(
        project,
        chat={"primary": ["vendor", "gpu"], "weights": {"vendor": 3}, "fallbacks": ["backup"]},
        embeddings={"primary": "tei", "fallbacks": ["infinity"]},
    )


def router(project: SopsProject) -> Any:
    """litellm's Router from the exported file, as LiteLLM's proxy builds it from the YAML."""
    import litellm

    config = yaml.safe_load(litellm_yaml(load_folder(project.providers, "providers.d", None)))
    return litellm.Router(model_list=config["model_list"], **config["router_settings"])


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(key_variable("vendor"), CANARY)
    yield


def landed(*ups: FakeUpstream) -> dict[str, list[str]]:
    """Each stand-in's name -> the models its chat and embeddings requests named, in order."""
    paths = ("/chat/completions", "/embeddings")
    return {up.name: [r.json["model"] for r in up.requests if r.path.endswith(paths)] for up in ups}


async def test_each_purpose_lands_where_switchboard_sends_it_with_its_weights(
    sops_project: SopsProject, key: None
) -> None:
    async with upstreams(
        {"name": "vendor", "api_key": CANARY},
        {"name": "gpu"},
        {"name": "backup"},
        {"name": "tei", "protocol": "tei"},
        {"name": "infinity"},
    ) as ups:
        configure(sops_project, *(up.base_url for up in ups))
        routed = router(sops_project)

        async def send(count: int, model: str, *, embed: bool = False) -> dict[str, list[str]]:
            for up in ups:
                up.requests.clear()
            for _ in range(count):
                if embed:
                    await routed.aembedding(model=model, input=["hello"])
                else:
                    await routed.acompletion(model=model, messages=MESSAGES)
            return {name: models for name, models in landed(*ups).items() if models}

        llama = await send(200, "llama")
        embeddings = await send(20, "bge-m3", embed=True)
        fast = await send(20, "fast")
        other = await send(1, "gpt-4o-mini")
    # Weights kept: 3 to 1 (150 of 200 expected; 5 standard deviations is about 30).
    assert set(llama) == {"vendor", "gpu"} and 120 <= len(llama["vendor"]) <= 180, llama
    # Embeddings stay with embeddings' providers: the TEI server (listed under `bge-m3`, which its
    # purpose's fallback declares), never the chat vendor's catch-all.
    assert embeddings == {"tei": ["bge-m3"] * 20}
    # `fast` is gpu's alias: renamed there, and the vendor (which serves any model) takes it too.
    assert set(fast) == {"vendor", "gpu"}, fast
    assert set(fast["gpu"]) == {"llama"} and set(fast["vendor"]) == {"fast"}
    # A model no chat provider declares goes to chat's `*`: the vendor, which serves any model.
    assert other == {"vendor": ["gpt-4o-mini"]}


async def test_each_purpose_falls_back_to_its_own_fallbacks(sops_project: SopsProject, key: None) -> None:
    async with upstreams(
        {"name": "vendor", "api_key": CANARY},
        {"name": "gpu"},
        {"name": "backup"},
        {"name": "tei", "protocol": "tei"},
        {"name": "infinity"},
    ) as ups:
        vendor, gpu, _, tei, _ = ups
        configure(sops_project, *(up.base_url for up in ups))
        routed = router(sops_project)
        for up in (vendor, gpu, tei):
            up.fail(503)
        chat = await routed.acompletion(model="llama", messages=MESSAGES)
        embedded = await routed.aembedding(model="bge-m3", input=["hello"])
        counts = landed(*ups)
    assert chat.choices[0].message.content == "backup says: hello there"
    assert counts["backup"] == ["llama"]
    assert counts["infinity"] == ["bge-m3"] and len(embedded.data) == 1
    assert "bge-m3" not in counts["vendor"] + counts["gpu"] + counts["backup"]


def test_a_provider_that_declares_no_models_is_listed_under_its_purposes_models(
    sops_project: SopsProject,
) -> None:
    configure(sops_project, *(f"http://127.0.0.1:{port}/v1" for port in range(9, 14)))
    export = litellm_export(load_folder(sops_project.providers, "providers.d", None))
    config = export.config
    assert export.notes == [
        "embeddings: in Switchboard `tei` takes any model; LiteLLM routes by name alone, so only the "
        "models the purpose's providers declare (bge-m3) go there, and other models go to chat's `*`"
    ]
    names: dict[str, set[str]] = {}
    for deployment in config["model_list"]:
        names.setdefault(deployment["model_name"], set()).add(
            deployment["model_info"]["switchboard_provider"]
        )
    assert names == {
        "llama": {"vendor", "gpu"},
        "fast": {"vendor", "gpu"},
        "*": {"vendor"},  # chat only
        "backup/llama": {"backup"},
        "bge-m3": {"tei"},
        "infinity/bge-m3": {"infinity"},
    }
    modes = {d["model_info"]["id"]: d["model_info"]["mode"] for d in config["model_list"]}
    assert modes["tei:bge-m3"] == "embedding" and modes["vendor:*"] == "chat"
    assert config["router_settings"]["fallbacks"] == [
        {"llama": ["backup/llama"]},
        {"bge-m3": ["infinity/bge-m3"]},
    ]
    weights = {d["model_info"]["id"]: d["litellm_params"].get("weight") for d in config["model_list"]}
    assert (weights["vendor:llama"], weights["gpu:llama"], weights["vendor:*"]) == (3.0, 1.0, 3.0)


# -- prices (reference §13) ----------------------------------------------------------------------------------

PRICING = {
    "*": {"input": 0.15, "output": "0.60", "cached_input": 0.075},
    "llama": {"input": "2.5", "output": "0.9", "cache_write": 3.125},
}


def test_each_deployment_carries_its_prices_per_token_exactly(sops_project: SopsProject) -> None:
    configure(sops_project, *(f"http://127.0.0.1:{port}/v1" for port in range(9, 14)))
    write_provider(
        sops_project, "gpu", base_url="http://127.0.0.1:10/v1", models=["llama"], model_map={"fast": "llama"},
        pricing=PRICING,
    )  # fmt: skip
    snapshot = load_folder(sops_project.providers, "providers.d", None)
    text = litellm_yaml(snapshot)
    params = {d["model_info"]["id"]: d["litellm_params"] for d in yaml.safe_load(text)["model_list"]}

    def per_token(per_million: str) -> float:
        return float(Decimal(per_million) / 1_000_000)

    costs = {k: v for k, v in params["gpu:llama"].items() if "cost" in k}
    assert costs == {  # its own entry alone: `*` prices only models without one
        "input_cost_per_token": per_token("2.5"),
        "output_cost_per_token": per_token("0.9"),
        "cache_creation_input_token_cost": per_token("3.125"),
    }
    assert {k: v for k, v in params["gpu:fast"].items() if "cost" in k} == costs  # "fast" is sent as llama
    assert litellm_costs(snapshot.providers["gpu"], "other") == {  # no entry of its own: `*`
        "input_cost_per_token": per_token("0.15"),
        "output_cost_per_token": per_token("0.60"),
        "cache_read_input_token_cost": per_token("0.075"),
    }
    assert not any("cost" in k for k in params["vendor:llama"])  # unpriced: LiteLLM prices it itself
    assert "input_cost_per_token: 2.5e-06" in text  # 2.5 per million, as the text says it
    assert "cache_creation_input_token_cost: 3.125e-06" in text


async def test_litellm_prices_a_request_with_the_exported_prices(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="gpu", models=("llama",)) as gpu:
        write_provider(sops_project, "gpu", base_url=gpu.base_url, models=["llama"], pricing=PRICING)
        write_routing(sops_project, chat="gpu")
        answer = await router(sops_project).acompletion(model="llama", messages=MESSAGES)
    usage = answer.usage
    expected = Decimal(usage.prompt_tokens) * Decimal("2.5") + Decimal(usage.completion_tokens) * Decimal(
        "0.9"
    )
    assert answer._hidden_params["response_cost"] == pytest.approx(float(expected / 1_000_000), rel=1e-12)


# -- what LiteLLM's proxy needs to start ------------------------------------------------------------


def test_the_file_is_a_proxy_config_litellm_accepts_with_a_master_key_from_the_environment(
    sops_project: SopsProject,
) -> None:
    from litellm.proxy._types import ConfigYAML

    configure(sops_project, *(f"http://127.0.0.1:{port}/v1" for port in range(9, 14)))
    write_provider(sops_project, "gpu", base_url="http://127.0.0.1:10/v1", models=["llama"], pricing=PRICING)
    config = yaml.safe_load(litellm_yaml(load_folder(sops_project.providers, "providers.d", None)))
    ConfigYAML.model_validate(config)  # LiteLLM's own description of config.yaml
    assert config["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}
