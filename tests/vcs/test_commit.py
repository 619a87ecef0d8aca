"""Commits made with plumbing, the branch and files moved to them, and recovery after a crash."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shlex
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import service.vcs.commit as commit_module
from service.errors import GitError
from service.vcs.authorship import Identity, message
from service.vcs.commit import Committer
from service.vcs.git_output import failure, redact
from service.vcs.gitrepo import GitRepo, safe_environ
from tests.conftest import git, git_init

COMMITTER = Identity("Switchboard", "switchboard@localhost")
AUTHOR = Identity.client("deployer")


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    root = tmp_path / "repo"
    (root / "providers.d").mkdir(parents=True)
    git_init(root)
    (root / "providers.d" / "a.yaml").write_text("a: 1\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    found = GitRepo.find(root)
    assert found is not None
    return found


def test_a_commit_is_built_without_touching_ref_index_or_files(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    base = committer.resolve("HEAD")
    commit = committer.build(
        base, {"providers.d/b.yaml": b"b: 2\n"}, author=AUTHOR, text=message("s", None, "x")
    )
    assert committer.resolve("HEAD") == base
    assert git(repo.root, "status", "--porcelain") == ""
    assert not (repo.root / "providers.d" / "b.yaml").exists()
    shown = git(repo.root, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%P", commit)
    assert (
        shown == f"deployer <deployer@clients.switchboard.invalid>|Switchboard <switchboard@localhost>|{base}"
    )
    assert repo.read_file(commit, "providers.d/b.yaml") == b"b: 2\n"


def test_advance_moves_branch_files_and_index_together(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    assert ref == "refs/heads/main"
    commit = committer.build(
        base, {"providers.d/a.yaml": None, "providers.d/b.yaml": b"b: 2\n"}, author=AUTHOR, text="m\n"
    )
    assert committer.advance(ref, base, commit) == ["providers.d/a.yaml", "providers.d/b.yaml"]
    assert committer.resolve("HEAD") == commit
    assert git(repo.root, "status", "--porcelain") == ""
    assert not (repo.root / "providers.d" / "a.yaml").exists()
    assert (repo.root / "providers.d" / "b.yaml").read_bytes() == b"b: 2\n"


def test_a_branch_moved_meanwhile_is_refused_and_nothing_changes(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/b.yaml": b"b\n"}, author=AUTHOR, text="m\n")
    (repo.root / "other.txt").write_text("x")
    git(repo.root, "add", "other.txt")
    git(repo.root, "commit", "-qm", "someone else")
    moved = committer.resolve("HEAD")
    with pytest.raises(GitError):
        committer.advance(ref, base, commit)
    assert committer.resolve("HEAD") == moved and not (repo.root / "providers.d" / "b.yaml").exists()
    assert not (repo.root / ".git" / "switchboard-write.json").exists()


@pytest.mark.parametrize("edit", ["changed", "removed", "added"])
def test_a_file_edited_since_the_callers_check_is_never_written_over(repo: GitRepo, edit: str) -> None:
    """A hand edit (or another program) between the writer's check for local changes and the
    files' move: the branch goes back, and the edit stays as it was made."""
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    changes = {"providers.d/a.yaml": b"a: 2\n", "providers.d/b.yaml": b"b: 2\n"}
    commit = committer.build(base, changes, author=AUTHOR, text="m\n")
    a, b = repo.root / "providers.d" / "a.yaml", repo.root / "providers.d" / "b.yaml"
    if edit == "changed":
        a.write_text("a: 1  # by hand\n")
    elif edit == "removed":
        a.unlink()
    else:
        b.write_text("b: by hand\n")
    before = {path: path.read_bytes() if path.exists() else None for path in (a, b)}
    with pytest.raises(GitError, match="changed in the working tree meanwhile; not overwritten"):
        committer.advance(ref, base, commit)
    assert committer.resolve("HEAD") == base
    assert {path: path.read_bytes() if path.exists() else None for path in (a, b)} == before
    assert git(repo.root, "diff", "--cached", "--name-only") == ""  # the index as it was
    assert not (repo.root / ".git" / "switchboard-write.json").exists()


def test_no_hook_runs(repo: GitRepo, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for name in ("pre-commit", "post-commit", "reference-transaction", "post-index-change", "post-checkout"):
        hook = repo.root / ".git" / "hooks" / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    committer = Committer(repo, COMMITTER)
    base = committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/b.yaml": b"b\n"}, author=AUTHOR, text="m\n")
    committer.advance(committer.ref(), base, commit)
    assert not marker.exists()
    git(repo.root, "commit", "-q", "--allow-empty", "-m", "a person's commit runs hooks")
    assert marker.exists()  # the hooks do work: they just never run for the service


def _crash_after_the_ref_moved(committer: Committer, repo: GitRepo) -> tuple[str | None, str]:
    """The state a kill leaves between `update-ref` and the files: the record, the ref moved."""
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(
        base, {"providers.d/a.yaml": b"a: 2\n", "providers.d/c.yaml": b"c\n"}, author=AUTHOR, text="m\n"
    )
    (repo.root / ".git" / "switchboard-write.json").write_text(
        json.dumps({"ref": ref, "old": base, "new": commit})
    )
    git(repo.root, "update-ref", ref, commit, base or "")
    (repo.root / "providers.d" / "a.yaml").write_bytes(b"a: 2\n")  # one file written, the other not
    (repo.root / ".git" / "index.lock").write_text("")  # and git killed holding the index
    return base, commit


def test_recovery_finishes_a_write_cut_short_after_the_ref_moved(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    _, commit = _crash_after_the_ref_moved(committer, repo)
    assert git(repo.root, "status", "--porcelain") != ""
    done = Committer(repo, COMMITTER).recover()
    assert done is not None and "finished" in done
    assert git(repo.root, "status", "--porcelain") == ""
    assert committer.resolve("HEAD") == commit
    assert (repo.root / "providers.d" / "c.yaml").read_bytes() == b"c\n"
    assert Committer(repo, COMMITTER).recover() is None


def test_recovery_before_the_ref_moved_leaves_everything_as_it_was(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    base = committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/a.yaml": b"a: 2\n"}, author=AUTHOR, text="m\n")
    record = {"ref": committer.ref(), "old": base, "new": commit}
    (repo.root / ".git" / "switchboard-write.json").write_text(json.dumps(record))
    done = committer.recover()
    assert done is not None and "nothing to undo" in done
    assert committer.resolve("HEAD") == base and git(repo.root, "status", "--porcelain") == ""


def test_a_damaged_record_is_removed(repo: GitRepo) -> None:
    (repo.root / ".git" / "switchboard-write.json").write_text("{torn")
    assert "damaged" in (Committer(repo, COMMITTER).recover() or "")
    assert not (repo.root / ".git" / "switchboard-write.json").exists()


def test_undo_puts_branch_files_and_index_back(repo: GitRepo) -> None:
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/a.yaml": b"changed\n"}, author=AUTHOR, text="m\n")
    paths = committer.advance(ref, base, commit)
    committer.undo(ref, base, commit, paths)
    assert committer.resolve("HEAD") == base
    assert (repo.root / "providers.d" / "a.yaml").read_bytes() == b"a: 1\n"
    assert git(repo.root, "status", "--porcelain") == ""


def test_an_undo_cut_short_is_finished_at_the_restart(repo: GitRepo) -> None:
    """Killed after the undo moved the branch back, before its files: the restart finished
    nothing (the undo kept no record), and the write's file stayed as a local edit."""
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/a.yaml": b"changed\n"}, author=AUTHOR, text="m\n")
    paths = committer.advance(ref, base, commit)
    committer._record(ref, commit, base, paths, undo=True)  # what `undo` does first
    git(repo.root, "update-ref", ref, base or "", commit)  # then the branch moved back: killed here
    done = Committer(repo, COMMITTER).recover()
    assert done is not None and "finished" in done
    assert (repo.root / "providers.d" / "a.yaml").read_bytes() == b"a: 1\n"
    assert git(repo.root, "status", "--porcelain") == ""


def test_an_undo_cut_short_before_it_moved_leaves_the_write_whole(repo: GitRepo) -> None:
    """Killed before the undo moved the branch back, with the write's files half written:
    the write stands, whole."""
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    changes = {"providers.d/a.yaml": b"a: 2\n", "providers.d/c.yaml": b"c\n"}
    commit = committer.build(base, changes, author=AUTHOR, text="m\n")
    paths = committer.advance(ref, base, commit)
    (repo.root / "providers.d" / "c.yaml").unlink()  # the write's files, half there
    committer._record(ref, commit, base, paths, undo=True)
    done = Committer(repo, COMMITTER).recover()
    assert done is not None and "undo cut short" in done
    assert committer.resolve("HEAD") == commit and git(repo.root, "status", "--porcelain") == ""


class _Killed(BaseException):
    """The process killed at that point: nothing after it runs, no handler either."""


def test_a_write_refused_for_a_hand_edit_and_cut_short_is_put_back_at_the_restart(
    repo: GitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file edited by hand during a write: nothing was written, and the branch goes back. Killed
    before it went back, the restart took the undo's record for one of a written write ("the
    write stands, whole") and left the branch at the write's commit with none of its files:
    the commit's files showing as local edits, every later write to them refused."""
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/a.yaml": b"a: 2\n"}, author=AUTHOR, text="m\n")
    (repo.root / "providers.d" / "a.yaml").write_text("a: 1  # by hand\n")
    move = committer._move

    def killed_going_back(ref: str, old: str | None, new: str | None, note: str = "undo") -> None:
        if note == "undo":
            raise _Killed
        move(ref, old, new, note)

    monkeypatch.setattr(committer, "_move", killed_going_back)
    with pytest.raises(_Killed):
        committer.advance(ref, base, commit)
    done = Committer(repo, COMMITTER).recover()
    assert done is not None
    assert committer.resolve("HEAD") == base
    assert (repo.root / "providers.d" / "a.yaml").read_text() == "a: 1  # by hand\n"
    assert git(repo.root, "status", "--porcelain") == "M providers.d/a.yaml"  # the edit, alone
    assert Committer(repo, COMMITTER).recover() is None


def test_a_write_that_cannot_be_recorded_moves_nothing(repo: GitRepo) -> None:
    """The record could not be written (a full disk; here a folder in its place): an OSError
    escaped as a 500. It is a GitError with the reason, before anything moved."""
    committer = Committer(repo, COMMITTER)
    ref, base = committer.ref(), committer.resolve("HEAD")
    commit = committer.build(base, {"providers.d/a.yaml": b"changed\n"}, author=AUTHOR, text="m\n")
    (repo.root / ".git" / "switchboard-write.json").mkdir()
    with pytest.raises(GitError, match="could not record the write"):
        committer.advance(ref, base, commit)
    assert committer.resolve("HEAD") == base and git(repo.root, "status", "--porcelain") == ""


def _bare(tmp_path: Path, repo: GitRepo) -> Path:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(repo.root, "push", "-q", str(bare), "main")
    return bare


def test_a_push_lands_only_on_the_commit_it_expects(repo: GitRepo, tmp_path: Path) -> None:
    """A compare-and-swap: a remote that is not at `at` (behind a local commit never pushed,
    or moved on) takes nothing, so no unpushed commit rides along with a write."""
    bare = _bare(tmp_path, repo)
    committer = Committer(repo, COMMITTER)
    pushed = committer.resolve("HEAD")
    assert pushed is not None
    unpushed = committer.build(pushed, {"providers.d/b.yaml": b"b\n"}, author=AUTHOR, text="local\n")
    write = committer.build(unpushed, {"providers.d/c.yaml": b"c\n"}, author=AUTHOR, text="write\n")
    assert (
        committer.push(str(bare), write, "main", at=unpushed) is not None
    )  # stale: the remote is at `pushed`
    assert git(bare, "rev-parse", "main") == pushed
    unrelated = committer.build(None, {"providers.d/c.yaml": b"c\n"}, author=AUTHOR, text="root\n")
    assert "never rewrites" in (committer.push(str(bare), unrelated, "main", at=pushed) or "")
    assert git(bare, "rev-parse", "main") == pushed
    on_remote = committer.build(pushed, {"providers.d/c.yaml": b"c\n"}, author=AUTHOR, text="write\n")
    assert committer.push(str(bare), on_remote, "main", at=pushed) is None
    assert git(bare, "rev-parse", "main") == on_remote
    assert committer.push(str(bare), on_remote, "review", at=None) is None  # a new branch
    again = committer.build(on_remote, {"providers.d/d.yaml": b"d\n"}, author=AUTHOR, text="x\n")
    assert committer.push(str(bare), again, "review", at=None) is not None  # not new any more
    assert git(bare, "rev-parse", "review") == on_remote


def test_git_runs_without_secrets_identity_or_prompts() -> None:
    env = safe_environ(
        {
            "PATH": "/bin",
            "HOME": "/home/x",
            "SOPS_AGE_KEY": "AGE-SECRET-KEY-1",
            "SOPS_AGE_KEY_FILE": "/k",
            "SWITCHBOARD_WEBHOOK_SECRET": "s",
            "GIT_AUTHOR_NAME": "a",
            "GIT_COMMITTER_EMAIL": "c",
            "EMAIL": "e",
            "GIT_DIR": "/elsewhere",
            "GIT_CONFIG_PARAMETERS": "'core.hookspath'='/tmp/evil'",
        }
    )
    assert env == {"PATH": "/bin", "HOME": "/home/x", "GIT_TERMINAL_PROMPT": "0"}


def test_credentials_in_urls_are_masked_in_git_errors() -> None:
    assert redact("fatal: unable to access 'https://bot:ghp_secret@github.com/o/r.git/'") == (
        "fatal: unable to access 'https://****@github.com/o/r.git/'"
    )
    assert redact("fatal: unable to access 'https://gl.example/o/r.git?private_token=glpat-x/': no") == (
        "fatal: unable to access 'https://gl.example/o/r.git?****': no"
    )


def test_a_remote_that_hangs_takes_nothing_with_it(
    repo: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push to a dead host is given up after REMOTE_TIMEOUT_S, and the ssh that hangs goes
    too: killing git alone left it running (one more each write), holding the terminal."""
    pids = tmp_path / "ssh-pids"
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 30\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(ssh))
    monkeypatch.setattr(commit_module, "REMOTE_TIMEOUT_S", 2.0)
    hanging = GitRepo(repo.root)
    committer = Committer(hanging, COMMITTER)
    base = committer.resolve("HEAD")
    assert base is not None
    reason = committer.push("ssh://git.example.invalid/repo.git", base, "main", at=None)
    assert reason is not None and "did not finish" in reason
    (pid,) = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 5  # SIGKILL is delivered, not waited for
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Whether `pid` runs (a killed process whose parent died may stay a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


PASSWORD = "hunter2-pw-5f1e"


def _refusing(bare: Path, *lines: str) -> None:
    """A pre-receive hook on `bare` that prints `lines` (git shows them as `remote: …`) and refuses."""
    hook = bare / "hooks" / "pre-receive"
    printed = "".join(f"printf '%s\\n' {shlex.quote(line)} >&2\n" for line in lines)
    hook.write_text(f"#!/bin/sh\n{printed}exit 1\n")
    hook.chmod(0o755)


@contextlib.contextmanager
def _git_over_http(root: Path) -> Iterator[str]:
    """A real git server over HTTP for the repositories under `root` (`git http-backend`, the CGI
    program git ships), on a port of its own: its URL."""

    class Backend(http.server.BaseHTTPRequestHandler):
        def _cgi(self) -> None:
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REMOTE_USER": "tester",  # receive-pack (a push) is served to a known user only
                "REMOTE_ADDR": "127.0.0.1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            }
            if self.headers.get("Content-Encoding"):
                env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            env["CONTENT_LENGTH"] = str(len(body))
            done = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False, timeout=30
            )
            head, _, content = done.stdout.partition(b"\r\n\r\n")
            status = 200
            headers = []
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = _cgi  # the names http.server calls

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_push_a_remote_hook_refuses_says_the_hooks_reason_and_no_credential(
    repo: GitRepo, tmp_path: Path
) -> None:
    """git's first `error:` line (`failed to push some refs`) was all a refused push said: the
    reason the remote's hook gave (`remote: …`) was dropped. It is kept, masked and bounded,
    and no credential of the remote's URL, nor of a URL the hook prints, is in it."""
    bare = _bare(tmp_path, repo)
    _refusing(
        bare,
        "main is protected: open a pull request",
        f"see https://bot:{PASSWORD}@policy.example/rules?token={PASSWORD}",
        "x" * 5_000,
        *[f"line {n}" for n in range(50)],
    )
    committer = Committer(repo, COMMITTER)
    base = committer.resolve("HEAD")
    assert base is not None
    commit = committer.build(base, {"providers.d/b.yaml": b"b\n"}, author=AUTHOR, text="write\n")
    with _git_over_http(tmp_path) as url:
        authed = f"{url.replace('//', f'//bot:{PASSWORD}@')}/remote.git"
        for remote in (str(bare), authed):
            reason = committer.push(remote, commit, "main", at=base)
            assert reason is not None
            assert "failed to push some refs" in reason, reason
            assert "remote: main is protected: open a pull request" in reason, reason
            assert "https://****@policy.example/rules?****" in reason, reason
            assert PASSWORD not in reason and "bot:" not in reason, reason
            assert len(reason) < 5_000 and "more line(s)" in reason, reason
            assert git(bare, "rev-parse", "main") == base
        _refusing(bare)  # says nothing: git's own verdict alone
        quiet = committer.push(str(bare), commit, "main", at=base)
        assert quiet is not None and quiet.endswith(f"failed to push some refs to '{bare}'"), quiet
        (bare / "hooks" / "pre-receive").unlink()
        assert committer.push(authed, commit, "main", at=base) is None  # the server does take a push
        assert git(bare, "rev-parse", "main") == commit
        closed = authed.replace(url.rsplit(":", 1)[1], "1")  # nothing listens there
        reason = committer.push(closed, commit, "main", at=commit)
        assert reason is not None and PASSWORD not in reason and "bot:" not in reason, reason


@pytest.mark.parametrize(
    "text",
    [
        f"https://bot:{PASSWORD}@host/r.git",
        f"https://bot:p@ss{PASSWORD}@host/r.git",  # an `@` in the password
        f"https://bot:{PASSWORD}\x00@host/r.git",
        f"https://bot:\x1b[K{PASSWORD}@host/r.git",
        f"https://bot:{PASSWORD}" + "@host" + "/x" * 500,
        "y" * 290 + f" https://bot:{PASSWORD}@host/r.git",  # cut past the line's length
    ],
)
def test_no_credential_survives_a_git_error_line(text: str) -> None:
    reason = failure(f"remote: {text}\nerror: failed to push some refs to 'x'\n".encode(), 1)
    assert PASSWORD not in reason and "bot:" not in reason and "\x1b" not in reason, reason
    assert "****" in reason or reason.endswith("…)"), reason
