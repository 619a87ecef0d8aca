"""Every error the HTTP API answers (docs/reference.md §6.4), as `GET /openapi.json` describes
it (`service.http.answers`): the one shape, and the cases that say more (422, 502)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.http.answers import Answer

# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """`type` names the case (`not_found`, `conflict`...); more fields may describe it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    message: str


class ErrorAnswer(Answer):
    """Every error: `{"error": {"type", "message", ...}}`."""

    error: ErrorDetail


class MessagesErrorAnswer(Answer):
    """An error on Anthropic's Messages paths, in Anthropic's shape:
    `{"type": "error", "error": {"type", "message", ...}}` (docs/reference.md §14)."""

    type: Literal["error"]
    error: ErrorDetail


class ProblemItem(Answer):
    file: str
    path: str = Field(description="the field to blame, dotted (`purposes.chat.primary.0`); empty for none")
    message: str


class InvalidDetail(ErrorDetail):
    type: Literal["invalid"]
    problems: list[ProblemItem]


class InvalidAnswer(Answer):
    """422: the write would make the configuration invalid; nothing was written."""

    error: InvalidDetail


class Attempt(Answer):
    provider: str
    status: int | None = Field(description="the upstream's HTTP status; null when none came back")
    reason: str


class UpstreamsFailedDetail(ErrorDetail):
    type: Literal["upstreams_failed"]
    attempts: list[Attempt]


class UpstreamsFailedAnswer(Answer):
    """502: every candidate upstream failed; each attempt is listed."""

    error: UpstreamsFailedDetail
