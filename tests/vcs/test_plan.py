"""`switchboard plan`: the configuration difference between git revisions, as a pull request sees it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from service.cli.main import cli
from tests.conftest import AgeIdentity, SopsProject
from tests.support.tampering import TAMPERS, URL, Tamper, encrypted_vendor, provider_yaml

OLD_KEY = "sk-or-old-5d80aaaa1111bbbb5d80"
NEW_KEY = "sk-or-new-9a1cbbbb2222cccc9a1c"

ROUTING = """kind: routing
purposes:
  chat:
    primary: [openrouter-main]
    fallbacks: [gpu]
"""


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def commit(project: SopsProject, message: str) -> str:
    git(project.root, "add", "-A")
    git(project.root, "commit", "-q", "-m", message)
    return git(project.root, "rev-parse", "HEAD").strip()


def write_key(project: SopsProject, provider_id: str, key: str, extra: str = "") -> Path:
    path = project.providers / f"{provider_id}.yaml"
    path.write_text(f"kind: api_key\nid: {provider_id}\nprovider: openrouter\napi_key: {key}\n{extra}")
    project.sops.encrypt_in_place(path)
    return path


def write_server(project: SopsProject, provider_id: str, extra: str = "") -> Path:
    path = project.providers / f"{provider_id}.yaml"
    path.write_text(
        f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\nbase_url: http://10.0.0.5:8000/v1\n{extra}"
    )
    return path


@pytest.fixture
def repo(sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch) -> SopsProject:
    """A git repository on `main` with one key, one server and routing committed."""
    monkeypatch.chdir(sops_project.root)
    git(sops_project.root, "init", "-q", "-b", "main")
    write_key(sops_project, "openrouter-main", OLD_KEY)
    write_server(sops_project, "gpu")
    (sops_project.providers / "routing.yaml").write_text(ROUTING)
    commit(sops_project, "initial configuration")
    git(sops_project.root, "checkout", "-q", "-b", "feature")
    return sops_project


def plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli("plan", *args)
    out, err = capsys.readouterr()
    assert OLD_KEY not in out + err and NEW_KEY not in out + err
    return code, out


def test_no_change_is_said_plainly(repo: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan(capsys)
    assert code == 0
    assert "No configuration changes." in out
    assert "The service would accept this configuration" in out


def test_added_changed_and_removed_providers_field_by_field(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_server(repo, "gpu", "models: [llama-3.1-8b]\ntimeout_s: 30\n")
    write_server(repo, "tei", "purposes: [embeddings]\n")
    write_server(repo, "spare")
    commit(repo, "add spare")
    (repo.providers / "spare.yaml").unlink()
    code, out = plan(capsys, "main")
    assert code == 0
    assert "## Switchboard plan: `main` (" in out and "→ the working tree" in out
    assert "### Providers added" in out
    assert "- **`tei`** (`providers.d/tei.yaml`): kind: `ai_server`, server_type: `vllm`" in out
    assert 'purposes: `["embeddings"]`' in out
    assert "spare" not in out  # added and removed again: no change against main
    assert "### Providers changed" in out
    assert '| models | `[]` | `["llama-3.1-8b"]` |' in out
    assert "| timeout_s | `600.0` | `30.0` |" in out


def test_a_removed_provider_is_listed(repo: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    write_server(repo, "spare")
    commit(repo, "add spare")
    git(repo.root, "checkout", "-q", "main")
    git(repo.root, "merge", "-q", "feature")
    git(repo.root, "checkout", "-q", "feature")
    (repo.providers / "spare.yaml").unlink()
    code, out = plan(capsys)
    assert code == 0
    assert "### Providers removed\n\n- **`spare`** (`providers.d/spare.yaml`)" in out


def test_a_removal_routing_still_names_is_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo.providers / "gpu.yaml").unlink()
    commit(repo, "drop the gpu")
    code, out = plan(capsys, "main", "HEAD")
    assert code == 1
    assert "The service would refuse this configuration" in out
    assert "`gpu` is removed but routing for `chat` still names it" in out
    assert "- `providers.d/routing.yaml:5`: routing for `chat` names `gpu`, which does not exist" in out


def test_routing_changes_per_purpose_and_a_purpose_left_without_fallback(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo.providers / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n")
    code, out = plan(capsys)
    assert code == 0
    assert "### Routing" in out
    assert "| `chat` | primary: openrouter-main; fallbacks: gpu | primary: gpu; fallbacks: none |" in out
    assert "`chat` has no fallback" in out


def test_disabling_an_active_provider_warns_and_is_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_server(repo, "gpu", "enabled: false\n")
    code, out = plan(capsys)
    assert code == 1
    assert "`gpu` was active for `chat` and is now disabled" in out
    assert "| enabled | `true` | `false` |" in out
    assert "names `gpu`, which is disabled" in out


def test_a_re_encryption_without_a_key_shows_changed_ciphertext(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    repo.sops.rotate(repo.providers / "openrouter-main.yaml")
    commit(repo, "rotate the data key")
    code, out = plan(capsys)
    assert code == 0
    assert "| api_key | `****` | `****`: ciphertext changed (re-encrypted or a new key) |" in out


def test_with_a_key_a_re_encryption_is_told_from_a_new_key(
    repo: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(repo.identity.key_file))
    repo.sops.rotate(repo.providers / "openrouter-main.yaml")
    code, out = plan(capsys)
    assert code == 0
    assert "| api_key | `****` | `****`: re-encrypted; the key is unchanged |" in out
    write_key(repo, "openrouter-main", NEW_KEY)
    code, out = plan(capsys)
    assert "| api_key | `****` | `****`: a new key: ****5d80 → ****9a1c |" in out


def test_a_new_key_without_a_key_at_hand_is_changed_ciphertext(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_key(repo, "openrouter-main", NEW_KEY)
    code, out = plan(capsys)
    assert code == 0
    assert "ciphertext changed (re-encrypted or a new key)" in out


def test_a_plaintext_secret_is_refused_and_never_shown(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo.providers / "leaky.yaml").write_text(
        f"kind: api_key\nid: leaky\nprovider: groq\napi_key: {NEW_KEY}\n"
    )
    code, out = plan(capsys)
    assert code == 1
    assert "providers.d/leaky.yaml: a plaintext secret" in out
    assert "`providers.d/leaky.yaml:4`: `api_key` is in plaintext" in out


def test_a_link_out_of_the_repository_is_refused_and_never_read(
    repo: SopsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pull request adding `providers.d/x.yaml -> ~/.kube/config` (or any file of the CI
    runner): `plan` of the working tree read it, and showed what it said in the PR's comment."""
    secret = tmp_path / "runner-secret.yaml"
    secret.write_text(f"kind: ai_server\nid: stolen\nserver_type: vllm\nbase_url: http://{NEW_KEY}.test/v1\n")
    (repo.providers / "stolen.yaml").symlink_to(secret)
    code, out = plan(capsys)
    assert code == 1
    assert "providers.d/stolen.yaml" in out and "a symbolic link out of the repository" in out
    assert "Providers added" not in out


def test_a_file_failing_validation_keeps_its_last_good_version(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo.providers / "gpu.yaml").write_text("kind: ai_server\nid: gpu\nserver_typo: vllm\n")
    code, out = plan(capsys)
    assert code == 1
    assert "Providers removed" not in out
    assert "unknown field `server_typo`" in out


def test_routing_may_name_a_new_provider_whose_file_is_refused_as_validate_says(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reference.md §3, §4: a refused provider file still counts as known to routing, and
    plan reports what `validate` reports. With no last good version of the file, plan added
    "routing names `spare`, which does not exist", which `validate` does not say."""
    (repo.providers / "spare.yaml").write_text("kind: ai_server\nid: spare\nserver_type: vllm\n")
    (repo.providers / "routing.yaml").write_text(ROUTING.replace("[gpu]", "[gpu, spare]"))
    code, out = plan(capsys, "--format", "json")
    assert code == 1
    found = [(p["file"], p["message"]) for p in json.loads(out)["problems"]]
    assert found == [("providers.d/spare.yaml", "missing required field `base_url`")]
    assert cli("validate") == 1
    assert capsys.readouterr().out == "providers.d/spare.yaml:1: error: missing required field `base_url`\n"


def test_a_sops_config_that_stops_covering_the_files_is_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo.root / ".sops.yaml").write_text("creation_rules:\n  - path_regex: elsewhere/.*\n    age: x\n")
    code, out = plan(capsys)
    assert code == 1
    assert "no creation rule in .sops.yaml covers this file" in out


def test_a_change_of_the_recipients_in_sops_yaml_is_warned_of(
    repo: SopsProject, capsys: pytest.CaptureFixture[str], other_age_identity: AgeIdentity
) -> None:
    """docs/reference.md §2.4: `plan` warns when a pull request changes the recipients in
    `.sops.yaml` (an identity added can read every key encrypted from then on)."""
    sops_yaml = repo.root / ".sops.yaml"
    ours, theirs = repo.identity.recipient, other_age_identity.recipient
    sops_yaml.write_text(sops_yaml.read_text().replace(ours, f"{ours},{theirs}"))
    code, out = plan(capsys)
    assert code == 0
    assert "### ⚠️ Warnings" in out
    assert f"`.sops.yaml` changes its recipients: adds {theirs}" in out
    commit(repo, "another recipient")
    sops_yaml.write_text(sops_yaml.read_text().replace(f"{ours},{theirs}", theirs))
    code, out = plan(capsys, "HEAD", "--format", "json")
    assert code == 0
    [warning] = json.loads(out)["warnings"]
    assert warning.startswith(f"`.sops.yaml` changes its recipients: removes {ours}")
    sops_yaml.write_text(sops_yaml.read_text().replace(theirs, f"{theirs},{ours}"))
    code, out = plan(capsys, "HEAD", "--format", "json")
    assert json.loads(out)["warnings"] == []  # the same recipients, written in another order


def test_default_base_is_the_merge_base_with_main(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_server(repo, "ours")
    commit(repo, "ours, on the branch")
    git(repo.root, "checkout", "-q", "main")
    write_server(repo, "theirs")
    commit(repo, "theirs, on main meanwhile")
    git(repo.root, "checkout", "-q", "feature")
    code, out = plan(capsys)
    assert code == 0
    assert "**`ours`**" in out
    assert "theirs" not in out


def test_two_revisions_are_read_without_touching_the_working_tree(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_server(repo, "committed")
    first = commit(repo, "committed")
    write_server(repo, "uncommitted")
    _, out = plan(capsys, "main", first)
    assert "**`committed`**" in out
    assert "uncommitted" not in out
    assert (repo.providers / "uncommitted.yaml").exists()
    assert git(repo.root, "status", "--porcelain").strip() == "?? providers.d/uncommitted.yaml"


def test_json_output(repo: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    (repo.providers / "gpu.yaml").unlink()
    code, out = plan(capsys, "--format", "json")
    body = json.loads(out)
    assert code == 1
    assert body["refused"] is True
    assert body["base"]["rev"] == "main"
    assert body["head"] == {"rev": None, "commit": None, "worktree": True}
    assert [c["type"] for c in body["changes"]] == ["provider.removed"]
    assert body["changes"][0]["subject"] == "gpu"
    assert body["problems"][0]["file"] == "providers.d/routing.yaml"


def test_an_unknown_revision_is_an_error(repo: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("plan", "no-such-branch") == 1
    assert "unknown revision 'no-such-branch'" in capsys.readouterr().err


def test_a_pull_request_that_raises_a_budget_or_a_limit_says_so(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    clients = repo.providers / "clients.yaml"
    entry = "  - name: ops\n    token_sha256: " + "a" * 64 + "\n    scopes: [completions]\n"
    clients.write_text(
        "kind: clients\nclients:\n" + entry + "    limits: {rpm: 600, budget: {usd: '50', period: month}}\n"
    )
    write_server(repo, "gpu", "budget: {usd: 200, period: month}\n")
    commit(repo, "limits")
    clients.write_text(
        "kind: clients\nclients:\n"
        + entry
        + "    limits: {rpm: 300, tpm: 1000, budget: {usd: '80', period: month}}\n"
    )
    write_server(repo, "gpu")
    code, out = plan(capsys, "HEAD")
    assert code == 0
    assert "### Limits and budgets" in out
    assert "- client `ops`: budget raised from 50 to 80 USD a month" in out
    assert "- client `ops`: rpm lowered from 600 to 300 requests a minute" in out
    assert "- client `ops`: tpm set to 1,000 tokens a minute (unlimited before)" in out
    assert "- provider `gpu`: budget removed (no cap now; 200 USD a month before)" in out
    assert "limits: rpm 300, tpm 1000, budget 80 USD/month" in out
    _, as_json = plan(capsys, "HEAD", "--format", "json")
    assert "client `ops`: budget raised from 50 to 80 USD a month" in json.loads(as_json)["limits"]


def test_a_pull_request_that_replaces_a_token_alone_shows_it_masked(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token replaced (same name and scopes) is a change a reviewer must see: masked, as in the
    event log (`****` and the hash's last four), never the hash."""
    clients = repo.providers / "clients.yaml"
    old, new = "a" * 60 + "1111", "b" * 60 + "2222"
    entry = "kind: clients\nclients:\n  - name: ops\n    token_sha256: {}\n    scopes: [completions]\n"
    clients.write_text(entry.format(old))
    commit(repo, "a token")
    clients.write_text(entry.format(new))
    code, out = plan(capsys, "HEAD")
    assert code == 0
    assert "| `ops` | completions; token `****1111` | completions; token `****2222` |" in out
    assert old not in out and new not in out


# -- a file changed outside sops (docs/reference.md §2.4) ------------------------------------------


def _vendor(repo: SopsProject, tamper: Tamper) -> Path:
    path = encrypted_vendor(repo, tamper)
    commit(repo, "add a vendor")
    return path


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.name)
def test_a_key_holding_file_changed_outside_sops_is_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str], tamper: Tamper
) -> None:
    """The pull request keeps the base's MAC, which sops' check passes (checked here), while
    the values are cut differently: only an edit without the identity does that."""
    path = _vendor(repo, tamper)
    path.write_text(tamper.apply(path.read_text()))
    assert repo.sops.decrypt(path.read_bytes(), str(path))  # the MAC passes
    commit(repo, "point the vendor elsewhere")
    code, out = plan(capsys, "HEAD~1", "HEAD")
    assert code == 1
    assert "**❌ The service would refuse this configuration**" in out
    assert "`providers.d/vendor.yaml:" in out
    assert "MAC mismatch: the file was changed without sops: its MAC is the previous version's, but" in out
    assert "(sops' MAC does not cover names or where values begin and end)" in out
    assert tamper.url == URL or tamper.url not in out  # the change is not shown as one the service takes
    code, out = plan(capsys, "--format", "json", "HEAD~1", "HEAD")
    problems = json.loads(out)["problems"]
    assert [p["file"] for p in problems] == ["providers.d/vendor.yaml"]


def test_the_same_change_made_through_sops_is_planned(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper = TAMPERS[0]
    path = _vendor(repo, tamper)
    path.write_text(tamper.apply(provider_yaml("vendor", tamper)))
    repo.sops.encrypt_in_place(path)
    code, out = plan(capsys, "HEAD")
    assert code == 0, out
    assert "https://llm.com" in out


def test_a_comment_changed_outside_sops_is_planned(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _vendor(repo, TAMPERS[0])
    path.write_text(
        "# the vendor's key\n" + path.read_text().replace("name: GPU box", "name: 'GPU box' # ours")
    )
    code, out = plan(capsys, "HEAD")
    assert code == 0, out
    assert "No configuration changes." in out


def test_a_file_without_a_key_changed_by_hand_is_planned(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    write_server(repo, "gpu").write_text(
        (repo.providers / "gpu.yaml").read_text().replace("10.0.0.5", "10.0.0.6")
    )
    code, out = plan(capsys)
    assert code == 0, out
    assert "10.0.0.6" in out


def test_a_change_cut_from_an_older_versions_mac_is_refused_and_a_revert_is_planned(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The MAC of any version in BASE's history passes sops: a pull request can take an old
    file and move its bytes. A revert to it as it was is a change like any other."""
    tamper = TAMPERS[0]
    path = _vendor(repo, tamper)
    first = path.read_text()
    path.write_text(provider_yaml("vendor", tamper).replace("GPU box", "GPU box 2"))
    repo.sops.encrypt_in_place(path)
    commit(repo, "rename the vendor")
    path.write_text(tamper.apply(first))
    code, out = plan(capsys, "HEAD")
    assert code == 1
    assert (
        "MAC mismatch: the file was changed without sops: its MAC is that of providers.d/vendor.yaml at "
        in out
    )
    assert "but `base_url` and `name` differ" in out
    path.write_text(first)
    code, out = plan(capsys, "HEAD")
    assert code == 0, out


def test_a_change_cut_from_a_version_of_the_pull_request_itself_is_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The version sops wrote may exist only in the pull request's own commits (a commit pushed
    on top of a reviewed one): its MAC is no more the tampered file's than BASE's would be."""
    tamper = TAMPERS[0]
    path = _vendor(repo, tamper)  # on the branch, not in BASE nor its history
    first = path.read_text()
    path.write_text(tamper.apply(first))
    commit(repo, "point the vendor elsewhere")
    code, out = plan(capsys)
    assert code == 1, out
    assert (
        "MAC mismatch: the file was changed without sops: its MAC is that of providers.d/vendor.yaml at"
        in out
    )
    path.write_text(first)  # the revert: the version that first carried the MAC, as it was
    commit(repo, "revert")
    code, out = plan(capsys)
    assert code == 0, out


def test_a_base_changed_outside_sops_may_be_restored(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The version that first carried a MAC is the one sops wrote: a pull request restoring it
    over a tampered BASE is planned, and one cutting it otherwise still refused."""
    tamper = TAMPERS[0]
    path = _vendor(repo, tamper)
    first = path.read_text()
    path.write_text(tamper.apply(first))
    tampered_base = commit(repo, "tampered, merged unchecked")
    path.write_text(first)
    code, out = plan(capsys, tampered_base)
    assert code == 0, out
    path.write_text(
        tamper.apply(first).replace("https://llm.com", "https://llm.co").replace('"pany', '"mpany')
    )
    code, out = plan(capsys, tampered_base)
    assert code == 1, out


def test_two_files_of_the_pull_request_sharing_a_mac_are_both_refused(
    repo: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new file and a copy of it under another name, its bytes moved: neither MAC is in git
    yet, and which one sops wrote cannot be told."""
    path = repo.providers / "vendor.yaml"
    path.write_text(
        f"kind: ai_server\nserver_type: vllm\nid: vendor\nname: 2 GPU box\nbase_url: {URL}\napi_key: k-5d80\n"
    )
    repo.sops.encrypt_in_place(path)
    renamed = path.read_text().replace("id: vendor\nname: 2 GPU box\n", "id: vendor2\nname: ' GPU box'\n")
    assert repo.sops.decrypt(renamed.encode(), str(path))  # the MAC passes
    (repo.providers / "vendor2.yaml").write_text(renamed)
    code, out = plan(capsys, "--format", "json")
    assert code == 1, out
    problems = json.loads(out)["problems"]
    assert sorted(p["file"] for p in problems) == ["providers.d/vendor.yaml", "providers.d/vendor2.yaml"]
    assert all("MAC mismatch: the file was changed without sops" in p["message"] for p in problems)
