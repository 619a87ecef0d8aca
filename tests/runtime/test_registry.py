"""The registry on its own: snapshots swapped whole, refusals, attribution, and the log's replay."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config.loader import Loaded, parse, with_secrets
from service.errors import FileRejected
from service.gateway.routing import RoutingTable
from service.journal.events import ClientsUpdated
from service.journal.log import EventLog
from service.journal.reader import read_events, verify
from service.journal.replay import replay
from service.runtime.registry import Outcome, Registry
from service.runtime.state import Refusal
from service.vcs.attribution import Attributor
from tests.conftest import git, git_init


def sealed(secret: str) -> str:
    """A value shaped like sops' ciphertext, different for every secret as sops' would be."""
    return f"ENC[AES256_GCM,data:{hashlib.sha256(secret.encode()).hexdigest()},iv:AAAA,tag:AAAA,type:str]"


def server(
    provider_id: str, url: str = "http://gpu:8000/v1", *, enabled: bool = True, models: str = ""
) -> bytes:
    return (
        f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\nbase_url: {url}\n"
        f"enabled: {str(enabled).lower()}\nmodels: [{models}]\n"
    ).encode()


def routing(*primary: str) -> bytes:
    return f"kind: routing\npurposes:\n  chat:\n    primary: [{', '.join(primary)}]\n".encode()


def load(name: str, data: bytes) -> Loaded:
    return parse(f"providers.d/{name}.yaml", data)


def key(provider_id: str, secret: str) -> Loaded:
    """An api_key file as the loader gives it after sops decrypted it."""
    text = f"kind: api_key\nid: {provider_id}\nprovider: openai\napi_key: {sealed(secret)}\nsops: {{}}\n"
    data = text.encode()
    return with_secrets(load(provider_id, data), {"api_key": secret})


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "events.jsonl") as events:
        yield events


def test_a_batch_whose_routing_names_a_missing_provider_is_refused_whole(
    tmp_path: Path, log: EventLog
) -> None:
    registry = Registry(log, tmp_path)
    files = {
        "providers.d/a.yaml": load("a", server("a")),
        "providers.d/routing.yaml": load("routing", routing("a")),
    }
    registry.apply(files, {})
    before = registry.snapshot

    files["providers.d/b.yaml"] = load("b", server("b", "http://b/v1"))
    files["providers.d/routing.yaml"] = load("routing", routing("a", "ghost"))
    outcome = registry.apply(files, {})

    assert not outcome.applied
    assert registry.snapshot is before  # b is not added either: the batch is refused whole
    assert "names `ghost`, which does not exist" in registry.refused["providers.d/routing.yaml"]
    assert [e.type for e in log.events()][-1] == "config.rejected"

    outcome = registry.apply(files, {})  # the same refusal again is not a new event
    assert outcome.events == 0

    del files["providers.d/routing.yaml"]
    assert registry.apply(files, {}).applied
    assert set(registry.snapshot.providers) == {"a", "b"}
    assert registry.refused == {}


def test_a_broken_routing_file_does_not_keep_the_first_load_from_completing(
    tmp_path: Path, log: EventLog
) -> None:
    registry = Registry(log, tmp_path)
    files = {
        "providers.d/a.yaml": load("a", server("a")),
        "providers.d/routing.yaml": load("routing", routing("x")),
    }
    outcome = registry.apply(files, {})
    assert outcome.applied and registry.ready
    assert set(registry.snapshot.providers) == {"a"} and registry.snapshot.routing is None
    assert "providers.d/routing.yaml" in registry.refused


def test_new_bytes_with_the_same_configuration_record_nothing(tmp_path: Path, log: EventLog) -> None:
    registry = Registry(log, tmp_path)
    registry.apply({"providers.d/a.yaml": load("a", server("a"))}, {})
    seq, generation = log.last_seq, registry.snapshot.generation
    outcome = registry.apply({"providers.d/a.yaml": load("a", b"# a comment\n" + server("a"))}, {})
    assert outcome.applied and outcome.events == 0
    assert (log.last_seq, registry.snapshot.generation) == (seq, generation)


def test_a_rotated_key_with_the_same_last_four_characters_is_still_an_update(
    tmp_path: Path, log: EventLog
) -> None:
    registry = Registry(log, tmp_path)
    registry.apply({"providers.d/k.yaml": key("k", "sk-first-key-0000-5d80")}, {})
    registry.apply({"providers.d/k.yaml": key("k", "sk-second-key-111-5d80")}, {})
    last = log.events()[-1]
    assert (last.type, last.subject) == ("provider.updated", "k")
    assert last.changes == {"api_key": {"old": "****5d80", "new": "****5d80"}}


def test_a_restart_records_only_what_changed_while_down(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    files = {"providers.d/a.yaml": load("a", server("a")), "providers.d/b.yaml": load("b", server("b"))}
    with EventLog(path) as log:
        Registry(log, tmp_path).apply(files, {})
    with EventLog(path) as log:
        seq = log.last_seq
        Registry(log, tmp_path).apply(files, {})
        assert log.last_seq == seq  # nothing changed: nothing recorded
    files["providers.d/a.yaml"] = load("a", server("a", "http://moved/v1"))
    del files["providers.d/b.yaml"]
    with EventLog(path) as log:
        registry = Registry(log, tmp_path)
        registry.apply(files, {})
        recorded = [(e.type, e.subject) for e in log.events()[seq:]]
        assert recorded == [("provider.updated", "a"), ("provider.removed", "b")]
        assert replay(log.events()) == registry.snapshot.view()


def test_answers_name_the_commit_once_the_files_are_committed(tmp_path: Path, log: EventLog) -> None:
    git_init(tmp_path)
    (tmp_path / "providers.d").mkdir()
    data = server("a")
    (tmp_path / "providers.d" / "a.yaml").write_bytes(data)
    registry = Registry(log, tmp_path, Attributor(tmp_path))
    registry.apply({"providers.d/a.yaml": load("a", data)}, {})
    added = log.events()[-1]
    assert (added.commit, added.uncommitted) == (None, True)
    assert registry.snapshot.commit is None

    git(tmp_path, "add", "providers.d")
    git(tmp_path, "commit", "-q", "-m", "add a")
    head = git(tmp_path, "rev-parse", "HEAD")
    seq, generation = log.last_seq, registry.snapshot.generation
    registry.apply({"providers.d/a.yaml": load("a", data)}, {})  # a rescan after the commit
    assert registry.snapshot.commit == head
    assert registry.snapshot.attribution_of("providers.d/a.yaml").commit == head
    assert registry.snapshot.attribution_of("providers.d/a.yaml").author == (
        "Switchboard Tests <tests@switchboard.invalid>"
    )
    assert (log.last_seq, registry.snapshot.generation) == (seq, generation)


def test_replaying_the_log_rebuilds_the_registry_after_any_sequence_of_edits(
    tmp_path: Path, log: EventLog
) -> None:
    rng = random.Random(20261127)
    registry = Registry(log, tmp_path)
    files: dict[str, Loaded] = {}
    ids = [f"p{i}" for i in range(8)]
    for step in range(300):
        pid = rng.choice(ids)
        name = f"providers.d/{pid}.yaml"
        action = rng.random()
        if action < 0.35:
            url = f"http://{rng.choice(['a', 'b', 'c'])}:{rng.randint(1, 3)}/v1"
            models = ", ".join(rng.sample(["m1", "m2", "m3"], rng.randint(0, 2)))
            files[name] = load(pid, server(pid, url, enabled=rng.random() > 0.1, models=models))
        elif action < 0.5:
            secret = f"sk-{rng.choice(['x', 'y'])}{step:05d}-{rng.choice(['5d80', '9a1c'])}"
            files[name] = key(pid, secret)
        elif action < 0.7:
            files.pop(name, None)
        elif action < 0.9:
            present = [f.removesuffix(".yaml").rsplit("/", 1)[1] for f in files if "/p" in f]
            chosen = rng.sample(present, min(len(present), rng.randint(1, 3))) if present else ["p0"]
            files["providers.d/routing.yaml"] = load("routing", routing(*chosen))
        else:
            files.pop("providers.d/routing.yaml", None)
        registry.apply(dict(files), {})
        assert replay(log.events()) == registry.snapshot.view(), f"step {step}"
    assert replay(read_events(log.path)) == registry.snapshot.view()
    assert registry.snapshot.generation > 50  # the walk did change things


def test_routing_and_clients_events_name_their_actual_files_and_those_files_commits(
    tmp_path: Path, log: EventLog
) -> None:
    git_init(tmp_path)
    folder = tmp_path / "providers.d"
    folder.mkdir()
    contents = {
        "a": server("a"),
        "routes": routing("a"),
        "tokens": (
            f"kind: clients\nclients:\n  - name: ops\n    token_sha256: {'ab' * 32}\n    scopes: [admin]\n"
        ).encode(),
    }
    for name, data in contents.items():
        (folder / f"{name}.yaml").write_bytes(data)
    git(tmp_path, "add", "providers.d")
    git(tmp_path, "commit", "-q", "-m", "routes and tokens")
    head = git(tmp_path, "rev-parse", "HEAD")
    registry = Registry(log, tmp_path, Attributor(tmp_path))
    files = {f"providers.d/{name}.yaml": load(name, data) for name, data in contents.items()}
    registry.apply(files, {})

    by_type = {e.type: e for e in log.events()}
    for event_type, file in (("routing.updated", "routes"), ("clients.updated", "tokens")):
        event = by_type[event_type]
        assert event.file == f"providers.d/{file}.yaml"
        assert (event.commit, event.author) == (head, "Switchboard Tests <tests@switchboard.invalid>")

    (folder / "routes.yaml").unlink()
    del files["providers.d/routes.yaml"]
    registry.apply(files, {})
    removed = log.events()[-1]
    assert (removed.type, removed.file) == ("routing.updated", "providers.d/routes.yaml")


def test_a_fallback_refused_at_the_first_load_keeps_its_route_and_is_skipped_until_it_is_good(
    tmp_path: Path, log: EventLog
) -> None:
    registry = Registry(log, tmp_path)
    route = b"kind: routing\npurposes:\n  chat:\n    primary: [a]\n    fallbacks: [fb]\n"
    files = {"providers.d/a.yaml": load("a", server("a")), "providers.d/routing.yaml": load("routing", route)}
    cannot = {"providers.d/fb.yaml": Refusal("line 9: cannot decrypt: no age identity here", "api_key")}

    assert registry.apply(files, cannot).applied
    snapshot = registry.snapshot
    assert snapshot.routing is not None and snapshot.unavailable == {"fb"}
    assert "fb" not in snapshot.providers
    assert [p.id for p in RoutingTable(snapshot).routes["chat"].ordered] == ["a"]
    assert registry.refused == {"providers.d/fb.yaml": cannot["providers.d/fb.yaml"].reason}
    assert registry.state.degraded

    files["providers.d/b.yaml"] = load("b", server("b"))  # a later change applies as usual
    assert registry.apply(files, cannot).applied
    assert set(registry.snapshot.providers) == {"a", "b"}

    files["providers.d/fb.yaml"] = load("fb", server("fb"))  # the good version arrives
    assert registry.apply(files, {}).applied
    assert [p.id for p in RoutingTable(registry.snapshot).routes["chat"].ordered] == ["a", "fb"]
    assert registry.snapshot.unavailable == frozenset() and not registry.state.degraded

    del files["providers.d/fb.yaml"]  # gone while routing names it: refused whole, as before
    assert not registry.apply(files, {}).applied
    assert "fb" in registry.snapshot.providers


def test_readers_see_each_snapshot_with_its_own_refusals(tmp_path: Path, log: EventLog) -> None:
    registry = Registry(log, tmp_path)
    both = {"providers.d/a.yaml": load("a", server("a")), "providers.d/c.yaml": load("c", server("c"))}
    only_a = {"providers.d/a.yaml": both["providers.d/a.yaml"]}
    c_refused = {"providers.d/c.yaml": Refusal("line 1: broken", "ai_server")}
    registry.apply(both, {})
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        try:
            while not stop.is_set():
                state = registry.state  # one read: the snapshot and its refusals together
                if ("c" in state.snapshot.providers) == ("providers.d/c.yaml" in state.refused):
                    seen.append(f"generation {state.snapshot.generation} with refused {dict(state.refused)}")
        except Exception as exc:
            seen.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(60):
            if n % 2:
                registry.apply(both, {})
            else:
                registry.apply(only_a, c_refused)
    finally:
        stop.set()
        reader.join()
    assert seen == []


def test_on_apply_hears_every_outcome_applied_or_refused_in_order(tmp_path: Path, log: EventLog) -> None:
    registry = Registry(log, tmp_path)
    heard: list[tuple[bool, int, int]] = []

    def broken(outcome: Outcome) -> None:
        raise RuntimeError("listener bug")

    registry.on_apply += [broken, lambda o: heard.append((o.applied, o.snapshot.generation, len(o.refused)))]
    files = {"providers.d/a.yaml": load("a", server("a"))}
    registry.apply(files, {})
    files["providers.d/routing.yaml"] = load("routing", routing("ghost"))
    registry.apply(files, {})
    del files["providers.d/routing.yaml"]
    registry.apply(files, {})

    assert heard == [(True, 1, 0), (False, 1, 1), (True, 1, 0)]


# -- a client's token replaced -------------------------------------------------------------------


def clients_file(**tokens: str) -> Loaded:
    """A clients file: each name with its token's sha256, scope `admin`."""
    body = "".join(f"  - name: {n}\n    token_sha256: {h}\n    scopes: [admin]\n" for n, h in tokens.items())
    return load("clients", f"kind: clients\nclients:\n{body}".encode())


def test_a_token_replaced_alone_is_a_clients_updated_event_showing_its_hash_masked(
    tmp_path: Path, log: EventLog
) -> None:
    """A token replaced alone (a leaked one revoked: same name, same scopes) wrote no event, so the
    log an auditor reads showed no trace of it. Each replacement is now one `clients.updated`,
    the hash masked as a key is (`****` and its last four), never the hash itself; rotated many
    times, back to an old token, and to one whose hash ends alike (the same mask: still a change)."""
    registry = Registry(log, tmp_path)
    a = "ab" * 30 + "1111"
    hashes = [a, "cd" * 30 + "2222", "ef" * 30 + "2222", "0a" * 30 + "3333", a]
    files = {"providers.d/clients.yaml": clients_file(ops=hashes[0], ci="c9" * 32)}
    registry.apply(files, {})
    for before, after in itertools.pairwise(hashes):
        files = {"providers.d/clients.yaml": clients_file(ops=after, ci="c9" * 32)}
        outcome = registry.apply(files, {})
        assert outcome.applied and outcome.events == 1
        event = log.events()[-1]
        assert (event.type, event.subject, event.file) == (
            "clients.updated",
            "clients",
            "providers.d/clients.yaml",
        )
        assert event.changes == {
            "ops": {
                "old": {"scopes": ["admin"], "token_sha256": "****" + before[-4:]},
                "new": {"scopes": ["admin"], "token_sha256": "****" + after[-4:]},
            }
        }
        assert replay(log.events()) == registry.snapshot.view()
    text = log.path.read_text()
    assert not any(h in text for h in hashes) and "c9" * 32 not in text
    assert not any(h[-5:] in text for h in hashes)  # the mask's four, never a fifth
    assert verify(log.path) == log.last_seq
    outcome = registry.apply(files, {})  # the same file again: nothing
    assert outcome.events == 0
    restarted = Registry(log, tmp_path)  # the log's checkpoint has the last mask: nothing either
    assert restarted.apply(files, {}).events == 0


def test_a_refused_clients_file_fixed_with_a_new_token_is_one_event_and_the_refused_hash_is_never_logged(
    tmp_path: Path, log: EventLog
) -> None:
    """A clients file refused (its new token's hash mistyped, in upper case) keeps the last good
    clients and writes `config.rejected`, whose reason names the field, not its value; fixed,
    one `clients.updated` goes from the last good token to the new one."""
    registry = Registry(log, tmp_path)
    old, new = "ab" * 32, "cd" * 30 + "5d80"
    registry.apply({"providers.d/clients.yaml": clients_file(ops=old)}, {})
    typo = new.upper()
    with pytest.raises(FileRejected) as refused:
        entry = f"  - name: ops\n    token_sha256: {typo}\n    scopes: [admin]\n"
        load("clients", f"kind: clients\nclients:\n{entry}".encode())
    kept = {"providers.d/clients.yaml": registry.snapshot.files["providers.d/clients.yaml"]}
    registry.apply(kept, {"providers.d/clients.yaml": Refusal(refused.value.reason, "clients")})
    assert [e.type for e in log.events()][-1] == "config.rejected"
    assert registry.snapshot.clients is not None and registry.snapshot.clients.clients[0].token_sha256 == old
    registry.apply({"providers.d/clients.yaml": clients_file(ops=new)}, {})
    updates = [e for e in log.events() if e.type == "clients.updated"]
    assert len(updates) == 2  # the first load, and the fix: the refused version changed nothing
    assert updates[-1].changes["ops"] == {
        "old": {"scopes": ["admin"], "token_sha256": "****abab"},
        "new": {"scopes": ["admin"], "token_sha256": "****5d80"},
    }
    text = log.path.read_text()
    assert typo not in text and typo.lower() not in text and old not in text
    assert replay(log.events()) == registry.snapshot.view()


def test_a_log_from_before_token_hashes_replays_as_it_did_and_the_first_start_records_them_once(
    tmp_path: Path,
) -> None:
    """Logs written before the hash was recorded have client entries without `token_sha256`:
    they replay as they did, and the first start on them records the masks in one
    `clients.updated` whose old entries have none (no token changed: the old entry never said),
    so that the log rebuilds the configuration exactly again. The next start records nothing."""
    path = tmp_path / "events.jsonl"
    with EventLog(path) as old_log:
        old_log.append(ClientsUpdated(changes={"ops": {"old": None, "new": {"scopes": ["admin"]}}}))
        old_log.append(ClientsUpdated(changes={"ci": {"old": None, "new": {"scopes": ["config:read"]}}}))
    files = {}
    files["providers.d/clients.yaml"] = load(
        "clients",
        b"kind: clients\nclients:\n"
        + f"  - name: ops\n    token_sha256: {'ab' * 32}\n    scopes: [admin]\n".encode()
        + f"  - name: ci\n    token_sha256: {'cd' * 32}\n    scopes: ['config:read']\n".encode(),
    )
    with EventLog(path) as log:
        assert log.replay()[1]["clients"] == {"ops": {"scopes": ["admin"]}, "ci": {"scopes": ["config:read"]}}
        registry = Registry(log, tmp_path)
        assert registry.apply(files, {}).events == 1
        (upgrade,) = log.events()[2:]
        assert upgrade.type == "clients.updated"
        assert upgrade.changes == {
            "ci": {
                "old": {"scopes": ["config:read"]},
                "new": {"scopes": ["config:read"], "token_sha256": "****cdcd"},
            },
            "ops": {"old": {"scopes": ["admin"]}, "new": {"scopes": ["admin"], "token_sha256": "****abab"}},
        }
        assert log.replay()[1] == replay(log.events()) == registry.snapshot.view()
        first_two = replay(log.events()[:2])
        assert first_two["clients"] == {"ops": {"scopes": ["admin"]}, "ci": {"scopes": ["config:read"]}}
    with EventLog(path) as log:
        assert Registry(log, tmp_path).apply(files, {}).events == 0
    assert verify(path) == 3
