"""Snapshot: loaded files -> one immutable configuration, refused whole when files do not fit together."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.config.loader import Loaded, parse
from service.config.models import AiServer, ApiKey
from service.config.secret import Sealed, Secret
from service.config.snapshot import NO_GIT, Attribution, PerSnapshot, Snapshot, cross_check, load_folder
from service.errors import ConfigError, SnapshotRejected
from tests.conftest import SopsProject

ENC = "ENC[AES256_GCM,data:Zm9v,iv:aXZpdml2aXZpdml2aXY=,tag:dGFndGFndGFndGFn,type:str]"
SOPS_BLOCK = "sops:\n  mac: ENC[AES256_GCM,data:eA==,iv:eA==,tag:eA==,type:str]\n  version: 3.11.0\n"
KEY = "sk-or-v1-0123456789abcdef5d80"
HASH = "a" * 64


def server(provider_id: str, *, enabled: bool = True, purposes: str = "chat", file: str = "") -> Loaded:
    text = (
        f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\nbase_url: http://{provider_id}:8000/v1\n"
        f"enabled: {str(enabled).lower()}\npurposes: [{purposes}]\n"
    )
    return parse(file or f"providers.d/{provider_id}.yaml", text.encode())


def key(provider_id: str) -> Loaded:
    text = f"kind: api_key\nid: {provider_id}\nprovider: openrouter\napi_key: {ENC}\n{SOPS_BLOCK}"
    return parse(f"providers.d/{provider_id}.yaml", text.encode())


def routing(text: str, file: str = "providers.d/routing.yaml") -> Loaded:
    return parse(file, f"kind: routing\npurposes:\n{text}".encode())


def clients(file: str = "providers.d/clients.yaml", name: str = "ops") -> Loaded:
    text = f"kind: clients\nclients:\n  - name: {name}\n    token_sha256: {HASH}\n    scopes: [admin]\n"
    return parse(file, text.encode())


def files(*loaded: Loaded) -> dict[str, Loaded]:
    return {item.file: item for item in loaded}


def messages(caught: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in caught.value.problems]


def test_build_indexes_providers_routing_and_clients_in_name_order() -> None:
    snapshot = Snapshot.build(
        files(
            server("zeta"),
            key("alpha"),
            routing("  chat:\n    primary: [zeta]\n    fallbacks: [alpha]\n"),
            clients(),
        ),
        generation=7,
    )
    assert snapshot.generation == 7
    assert list(snapshot.files) == [
        "providers.d/alpha.yaml",
        "providers.d/clients.yaml",
        "providers.d/routing.yaml",
        "providers.d/zeta.yaml",
    ]
    assert list(snapshot.providers) == ["alpha", "zeta"]
    assert isinstance(snapshot.providers["alpha"], ApiKey)
    assert isinstance(snapshot.providers["zeta"], AiServer)
    assert snapshot.routing is not None and snapshot.routing.purposes["chat"].primary == ["zeta"]
    assert snapshot.clients is not None and [c.name for c in snapshot.clients.clients] == ["ops"]
    assert (snapshot.commit, dict(snapshot.attribution)) == (None, {})


def test_a_snapshot_cannot_be_changed_in_place() -> None:
    snapshot = Snapshot.build(files(server("gpu")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.generation = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.providers["other"] = snapshot.providers["gpu"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del snapshot.files["providers.d/gpu.yaml"]  # type: ignore[attr-defined]


def test_an_empty_snapshot_has_nothing_and_views_as_empty() -> None:
    for snapshot in (Snapshot(), Snapshot.build({})):
        assert (dict(snapshot.files), dict(snapshot.providers), snapshot.routing, snapshot.clients) == (
            {},
            {},
            None,
            None,
        )
        assert snapshot.view() == {"providers": {}, "routing": {}, "clients": {}}


def test_an_id_defined_twice_is_named_at_the_second_file_with_the_first() -> None:
    one, two = server("gpu"), server("gpu", file="providers.d/gpu.yml")
    with pytest.raises(SnapshotRejected) as caught:
        Snapshot.build(files(two, one))
    assert messages(caught) == [
        "providers.d/gpu.yml:2: error: id `gpu` is also defined in providers.d/gpu.yaml"
    ]


SECOND_FILES = {
    "routing": lambda: (
        routing("  chat:\n    primary: [gpu]\n"),
        routing("  chat:\n    primary: [gpu]\n", file="providers.d/routing2.yaml"),
    ),
    "clients": lambda: (clients(), clients("providers.d/more-clients.yaml", name="ci")),
}


@pytest.mark.parametrize("kind", list(SECOND_FILES))
def test_each_of_two_routing_or_clients_files_is_refused(kind: str) -> None:
    first, second = SECOND_FILES[kind]()
    with pytest.raises(SnapshotRejected) as caught:
        Snapshot.build(files(server("gpu"), first, second))
    one, two = sorted([first.file, second.file])
    assert messages(caught) == [  # each of them: none is taken over the other
        f"{one}:1: error: more than one {kind} file: {two} also defines `kind: {kind}`; "
        "none is applied while there is more than one",
        f"{two}:1: error: more than one {kind} file: {one} also defines `kind: {kind}`; "
        "none is applied while there is more than one",
    ]


def test_routing_naming_a_missing_disabled_or_unsuited_provider_is_refused_at_its_line() -> None:
    text = (
        "  chat:\n"
        "    primary: [gpu, ghost]\n"
        "    fallbacks: [spare, embedder]\n"
        "  embeddings:\n"
        "    primary: [embedder]\n"
    )
    batch = files(
        server("gpu"),
        server("spare", enabled=False),
        server("embedder", purposes="embeddings"),
        routing(text),
    )
    assert [str(p) for p in cross_check(batch.values())] == [
        "providers.d/routing.yaml:4: error: routing for `chat` names `ghost`, which does not exist",
        "providers.d/routing.yaml:5: error: routing for `chat` names `spare`, which is disabled",
        "providers.d/routing.yaml:5: error: routing for `chat` names `embedder`, "
        "whose purposes (embeddings) lack `chat`",
    ]
    with pytest.raises(SnapshotRejected) as caught:
        Snapshot.build(batch)
    assert len(caught.value.problems) == 3


def test_every_cross_file_problem_is_reported_at_once() -> None:
    batch = files(
        server("gpu"),
        server("gpu", file="providers.d/gpu.yml"),
        routing("  chat:\n    primary: [ghost]\n"),
        clients(),
        clients("providers.d/clients2.yaml", name="ci"),
    )
    with pytest.raises(SnapshotRejected) as caught:
        Snapshot.build(batch)
    assert sorted(p.file for p in caught.value.problems) == [
        "providers.d/clients.yaml",
        "providers.d/clients2.yaml",
        "providers.d/gpu.yml",
        "providers.d/routing.yaml",
    ]


def test_view_is_the_masked_configuration_with_each_providers_file() -> None:
    snapshot = Snapshot.build(
        files(
            server("gpu"), key("or"), routing("  chat:\n    primary: [gpu]\n    fallbacks: [or]\n"), clients()
        )
    )
    view = snapshot.view()
    assert list(view["providers"]) == ["gpu", "or"]
    assert view["providers"]["gpu"]["file"] == "providers.d/gpu.yaml"
    assert view["providers"]["gpu"]["base_url"] == "http://gpu:8000/v1"
    assert view["providers"]["or"]["api_key"] == "****"
    assert ENC not in str(view)
    assert view["routing"] == {"chat": {"primary": ["gpu"], "weights": {}, "fallbacks": ["or"]}}
    assert view["clients"] == {"ops": {"scopes": ["admin"], "token_sha256": "****aaaa"}}
    assert HASH not in str(view)  # token hashes are not part of the recorded configuration


def test_file_of_names_the_file_defining_a_provider() -> None:
    snapshot = Snapshot.build(
        files(server("gpu", file="providers.d/gpu.yml"), routing("  chat:\n    primary: [gpu]\n"))
    )
    assert snapshot.file_of("gpu") == "providers.d/gpu.yml"
    assert snapshot.file_of("ghost") is None
    assert snapshot.file_of("routing") is None


def test_attribution_of_a_file_defaults_to_no_git() -> None:
    snapshot = Snapshot.build(files(server("gpu"), server("cpu")))
    assert snapshot.attribution_of("providers.d/gpu.yaml") is NO_GIT
    attributed = dataclasses.replace(
        snapshot, attribution={"providers.d/gpu.yaml": Attribution("c0ffee", "Ada <ada@x.invalid>", False)}
    )
    assert attributed.attribution_of("providers.d/gpu.yaml") == Attribution(
        "c0ffee", "Ada <ada@x.invalid>", False
    )
    assert attributed.attribution_of("providers.d/cpu.yaml") is NO_GIT


def test_per_snapshot_builds_once_per_snapshot_and_again_for_the_next() -> None:
    built: list[int] = []

    def render(snapshot: Snapshot) -> list[str]:
        built.append(snapshot.generation)
        return list(snapshot.providers)

    memo = PerSnapshot(render)
    first = Snapshot.build(files(server("gpu")), generation=1)
    assert memo.of(first) == ["gpu"]
    assert memo.of(first) is memo.of(first)
    assert built == [1]
    second = Snapshot.build(files(server("gpu"), server("cpu")), generation=2)
    assert memo.of(second) == ["cpu", "gpu"]
    equal = Snapshot.build(files(server("gpu"), server("cpu")), generation=2)
    memo.of(equal)  # equal but not the same snapshot: built again, never served stale
    assert built == [1, 2, 2]


def test_load_folder_names_files_as_shown_and_skips_what_is_not_a_document(tmp_path: Path) -> None:
    folder = tmp_path / "anywhere"
    folder.mkdir()
    (folder / "gpu.yaml").write_bytes(server("gpu").data)
    (folder / "routing.yml").write_text("kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n")
    (folder / ".gpu.yaml.swp").write_text("not: yaml: at: all")
    (folder / "gpu.yaml~").write_text("editor backup")
    (folder / "notes.txt").write_text("not a document")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.yaml").write_text("kind: nonsense")
    snapshot = load_folder(folder, "providers.d/")
    assert list(snapshot.files) == ["providers.d/gpu.yaml", "providers.d/routing.yml"]
    assert snapshot.routing is not None
    assert load_folder(tmp_path / "missing", "providers.d").files == {}


def test_load_folder_reports_every_problem_of_every_file_or_the_cross_file_ones(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: ai_server\nid: a\nserver_typo: vllm\n")
    (tmp_path / "b.yaml").write_text("kind: nonsense\n")
    (tmp_path / "c.yaml").write_bytes(server("c").data)
    with pytest.raises(ConfigError) as caught:
        load_folder(tmp_path, "providers.d")
    assert not isinstance(caught.value, SnapshotRejected)
    assert sorted({p.file for p in caught.value.problems}) == ["providers.d/a.yaml", "providers.d/b.yaml"]

    (tmp_path / "a.yaml").unlink()
    (tmp_path / "b.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: [ghost]\n")
    with pytest.raises(SnapshotRejected, match="names `ghost`, which does not exist"):
        load_folder(tmp_path, "providers.d")


def test_load_folder_decrypts_with_sops_and_leaves_keys_sealed_without(sops_project: SopsProject) -> None:
    path = sops_project.providers / "or.yaml"
    path.write_text(f"kind: api_key\nid: or\nprovider: openrouter\napi_key: {KEY}\n")
    sops_project.sops.encrypt_in_place(path)

    sealed = load_folder(sops_project.providers, "providers.d").providers["or"]
    assert isinstance(sealed, ApiKey) and isinstance(sealed.api_key, Sealed)

    opened = load_folder(sops_project.providers, "providers.d", sops_project.sops).providers["or"]
    assert isinstance(opened, ApiKey) and isinstance(opened.api_key, Secret)
    assert opened.api_key.reveal() == KEY
    assert KEY not in str(load_folder(sops_project.providers, "providers.d", sops_project.sops).view())
