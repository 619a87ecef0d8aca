"""What git says, as the service repeats it (in a 409's message, a log line, `/readyz`): the
credentials of any URL masked (`redact`), and of an error, git's verdict and what the remote
said, bounded (`failure`)."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")
"""A URL's user and password, up to the last `@` before its path: a password may hold an `@`."""
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it masked (`https://****@host/...`), and its query
    too (`?private_token=…`): git masks the user and password of a URL it names, not a query."""
    return _QUERY.sub(r"\1?****", _CREDENTIALS.sub(r"\1****@", text))


_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x1f\x7f]")
REMOTE_LINES = 10
"""The most lines of what the remote said that a git error keeps."""
LINE_CHARS = 300
"""The longest line a git error keeps of git's output (the rest is cut, after credentials are
masked: a cut must not leave the start of a password where the mask no longer finds it)."""


def failure(stderr: bytes, returncode: int) -> str:
    """Why git failed, from its error output, with the credentials of any URL masked: git's own
    verdict (`fatal: Unable to create '…/index.lock': File exists.`, not the advice after it,
    `remove the file manually to continue.`), then what the remote said (`remote: …`, the
    reason a hook on the remote gave for refusing a push; git's `error: failed to push some
    refs` alone says nothing of it), at most REMOTE_LINES lines of LINE_CHARS characters."""
    lines = [_line(raw) for raw in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    verdicts = [line for line in lines if line.startswith(("fatal:", "error:"))]
    detail = (verdicts or lines or [f"exit {returncode}"])[0 if verdicts else -1]
    said = [line for line in lines if line.startswith("remote:") and line != "remote:" and line != detail]
    if said:
        more = f"; and {len(said) - REMOTE_LINES} more line(s)" if len(said) > REMOTE_LINES else ""
        detail = f"{detail} ({'; '.join(said[:REMOTE_LINES])}{more})"
    return detail


def _line(raw: str) -> str:
    """One line of git's output, masked, without terminal codes or padding, cut to LINE_CHARS."""
    line = redact(_CONTROL.sub("", redact(raw))).strip()  # masked before and after: either may join a URL
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"
