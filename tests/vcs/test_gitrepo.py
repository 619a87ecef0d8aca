"""GitRepo: revisions and files read from a real repository's object store, never checked out."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import GitError
from service.vcs.gitrepo import Commit, GitRepo, blob_sha
from tests.conftest import git, git_init

ME = "Switchboard Tests <tests@switchboard.invalid>"
ADA = "Ada Lovelace <ada@switchboard.invalid>"
ROUTING = b"kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n"


def commit(root: Path, message: str, author: str | None = None) -> str:
    """Commit everything in the work tree; returns the new HEAD."""
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message, *(["--author", author] if author else []))
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A repository on `main` with two files in `providers.d/` and one further down, committed."""
    top = tmp_path / "repo"
    (top / "providers.d" / "nested").mkdir(parents=True)
    git_init(top)
    (top / "providers.d" / "gpu.yaml").write_bytes(b"kind: ai_server\n")
    (top / "providers.d" / "routing.yaml").write_bytes(ROUTING)
    (top / "providers.d" / "nested" / "deep.yaml").write_bytes(b"deeper\n")
    (top / "README").write_text("top\n")
    commit(top, "initial")
    return top


@pytest.fixture
def repo(root: Path) -> GitRepo:
    found = GitRepo.find(root)
    assert found is not None
    return found


def test_find_answers_the_top_level_from_any_folder_inside(root: Path) -> None:
    found = GitRepo.find(root / "providers.d" / "nested")
    assert found is not None
    assert found.root.resolve() == root.resolve()
    assert repr(found) == f"GitRepo({str(found.root)!r})"


def test_find_outside_a_repository_or_without_git_is_none(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert GitRepo.find(outside) is None
    assert GitRepo.find(root, binary="no-such-git-binary") is None


def test_head_is_none_before_the_first_commit_then_the_commit(tmp_path: Path) -> None:
    git_init(tmp_path)
    repo = GitRepo(tmp_path)
    assert repo.head() is None
    (tmp_path / "a").write_text("a\n")
    sha = commit(tmp_path, "first")
    assert repo.head() == sha


def test_resolve_names_a_commit_and_refuses_an_unknown_revision(root: Path, repo: GitRepo) -> None:
    head = git(root, "rev-parse", "HEAD")
    assert repo.resolve("main") == repo.resolve("HEAD") == head
    (root / "README").write_text("second\n")
    commit(root, "second")
    assert repo.resolve("HEAD~1") == head
    with pytest.raises(GitError, match="unknown revision 'no-such-branch'"):
        repo.resolve("no-such-branch")
    with pytest.raises(GitError, match="unknown revision '--all'"):
        repo.resolve("--all")  # never taken for an option


def test_default_branch_is_main_else_master_else_none(tmp_path: Path) -> None:
    for branch, expected in (("main", "main"), ("master", "master"), ("trunk", None)):
        top = tmp_path / branch
        top.mkdir()
        git(top, "init", "-q", "-b", branch)
        (top / "a").write_text("a\n")
        commit(top, "first")
        assert GitRepo(top).default_branch() == expected, branch


def test_default_branch_follows_origin_head(tmp_path: Path) -> None:
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "trunk")
    (upstream / "a").write_text("a\n")
    commit(upstream, "first")
    git(tmp_path, "clone", "-q", str(upstream), "clone")
    assert GitRepo(tmp_path / "clone").default_branch() == "origin/trunk"


def test_merge_base_is_the_fork_point_or_none_without_shared_history(root: Path, repo: GitRepo) -> None:
    fork = git(root, "rev-parse", "HEAD")
    git(root, "checkout", "-q", "-b", "feature")
    (root / "README").write_text("feature\n")
    commit(root, "on the branch")
    git(root, "checkout", "-q", "main")
    (root / "README").write_text("main\n")
    commit(root, "on main meanwhile")
    assert repo.merge_base("main", "feature") == fork
    git(root, "checkout", "-q", "--orphan", "unrelated")
    commit(root, "no parent")
    assert repo.merge_base("main", "unrelated") is None


def test_read_tree_gives_the_files_directly_in_a_folder_at_a_revision(root: Path, repo: GitRepo) -> None:
    first = git(root, "rev-parse", "HEAD")
    (root / "providers.d" / "gpu.yaml").write_bytes(b"changed\n")
    (root / "providers.d" / "link.yaml").symlink_to("gpu.yaml")
    commit(root, "change gpu, add a symlink")
    (root / "providers.d" / "gpu.yaml").write_bytes(b"in the work tree only\n")

    assert repo.read_tree(first, "providers.d") == {
        "providers.d/gpu.yaml": b"kind: ai_server\n",
        "providers.d/routing.yaml": ROUTING,
    }
    now = repo.read_tree("HEAD", "providers.d/")  # a trailing slash is the same folder
    assert list(now) == ["providers.d/gpu.yaml", "providers.d/routing.yaml"]  # no symlink, no subfolder
    assert now["providers.d/gpu.yaml"] == b"changed\n"
    assert repo.read_tree("HEAD", "providers.d/nested") == {"providers.d/nested/deep.yaml": b"deeper\n"}
    assert repo.read_tree("HEAD", "no-such-folder") == {}
    assert git(root, "status", "--porcelain") == "M providers.d/gpu.yaml"  # nothing checked out


def test_blob_ids_are_gits_ids_and_match_blob_sha_of_the_content(root: Path, repo: GitRepo) -> None:
    ids = repo.blob_ids("HEAD", "providers.d")
    assert ids == {
        "providers.d/gpu.yaml": git(root, "rev-parse", "HEAD:providers.d/gpu.yaml"),
        "providers.d/routing.yaml": git(root, "rev-parse", "HEAD:providers.d/routing.yaml"),
    }
    assert ids["providers.d/routing.yaml"] == blob_sha(ROUTING)


@pytest.mark.parametrize(
    "data", [b"", b"kind: routing\n", b"no newline at the end", "ünïcødé\n".encode(), bytes(range(256)) * 3]
)
def test_blob_sha_equals_git_hash_object(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert blob_sha(data) == git(tmp_path, "hash-object", str(path))


def test_last_authors_names_the_last_author_of_each_path_in_one_walk(root: Path, repo: GitRepo) -> None:
    (root / "providers.d" / "gpu.yaml").write_bytes(b"by ada\n")
    (root / "providers.d" / "nested" / "deep.yaml").write_bytes(b"by ada too\n")
    commit(root, "ada's change", author=ADA)
    (root / "providers.d" / "new.yaml").write_bytes(b"not committed\n")
    paths = [
        "providers.d/gpu.yaml",
        "providers.d/routing.yaml",
        "providers.d/nested/deep.yaml",
        "providers.d/new.yaml",
    ]
    assert repo.last_authors(paths) == {
        "providers.d/gpu.yaml": ADA,
        "providers.d/routing.yaml": ME,
        "providers.d/nested/deep.yaml": ADA,
    }
    assert repo.last_authors(["providers.d/gpu.yaml"], rev="HEAD~1") == {"providers.d/gpu.yaml": ME}


def test_read_file_is_one_file_at_a_revision_or_none(root: Path, repo: GitRepo) -> None:
    assert repo.read_file("main", "providers.d/routing.yaml") == ROUTING
    assert repo.read_file("main", "providers.d/none.yaml") is None
    assert repo.read_file("main", "providers.d/nested") is None  # a folder is not a file
    (root / "providers.d" / "routing.yaml").unlink()
    commit(root, "drop routing")
    assert repo.read_file("HEAD", "providers.d/routing.yaml") is None
    assert repo.read_file("HEAD~1", "providers.d/routing.yaml") == ROUTING


def test_last_commit_is_the_commit_and_author_that_last_touched_a_path(root: Path, repo: GitRepo) -> None:
    first = git(root, "rev-parse", "HEAD")
    (root / "providers.d" / "gpu.yaml").write_bytes(b"by ada\n")
    second = commit(root, "ada's change", author=ADA)
    assert repo.last_commit("providers.d/gpu.yaml") == Commit(second, ADA)
    assert repo.last_commit("providers.d/routing.yaml") == Commit(first, ME)
    assert repo.last_commit("providers.d/gpu.yaml", rev=first) == Commit(first, ME)
    assert repo.last_commit("providers.d/never.yaml") is None


def test_relative_is_posix_from_the_top_level_and_refuses_a_path_outside(
    tmp_path: Path, root: Path, repo: GitRepo
) -> None:
    assert repo.relative(root / "providers.d" / "gpu.yaml") == "providers.d/gpu.yaml"
    assert repo.relative(root / "providers.d" / "nested" / ".." / "gpu.yaml") == "providers.d/gpu.yaml"
    with pytest.raises(GitError, match="is not inside the repository"):
        repo.relative(tmp_path / "elsewhere.yaml")


def test_a_failing_git_command_or_a_missing_binary_is_a_git_error(root: Path, repo: GitRepo) -> None:
    with pytest.raises(GitError, match=r"^git ls-tree failed: .*no-such-rev"):
        repo.read_tree("no-such-rev", "providers.d")
    with pytest.raises(GitError, match="the git binary 'no-such-git-binary' was not found"):
        GitRepo(root, binary="no-such-git-binary").head()


def test_first_commit_is_the_root_of_the_first_parent_line_or_none(
    root: Path, repo: GitRepo, tmp_path: Path
) -> None:
    first = git(root, "rev-list", "--max-parents=0", "HEAD")
    empty_tree = git(root, "hash-object", "-t", "tree", "/dev/null")
    other = git(root, "commit-tree", "-m", "another history", empty_tree)
    git(root, "merge", "-q", "--allow-unrelated-histories", "--no-edit", other)
    assert set(git(root, "rev-list", "--max-parents=0", "HEAD").split()) == {first, other}
    assert repo.first_commit("HEAD") == first  # the merged history's root is not on the line
    empty = tmp_path / "empty"
    empty.mkdir()
    git_init(empty)
    assert GitRepo(empty).first_commit("HEAD") is None
