"""What the writes answer (docs/reference.md §8): the provider written, a delete, a write
committed to a branch or pushed, as `GET /openapi.json` describes them (`service.http.answers`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from service.http.answers import Answer
from service.http.config_answers import ApiKeyAnswer, ServerAnswer

ProviderKind = Literal["ai_server", "api_key"]


class WrittenServer(ServerAnswer):
    """A server as a write answers it: the provider once applied, with the generation that applied it."""

    generation: int


class WrittenApiKey(ApiKeyAnswer):
    """A key as a write answers it: the provider once applied, with the generation that applied it."""

    generation: int


WrittenProvider = Annotated[WrittenServer | WrittenApiKey, Field(discriminator="kind")]


class Deleted(Answer):
    """A provider whose file a write removed."""

    id: str
    kind: ProviderKind
    deleted: Literal[True]
    file: str
    commit: str
    generation: int


class Branched(Answer):
    """A write in `branch` mode: committed to a new branch for review, nothing applied."""

    branch: str = Field(description="`switchboard/<verb>-<id>-<n>`")
    commit: str
    file: str


class Pushed(Answer):
    """A write from git-sync's checkout, pushed to the remote but not applied here yet: git-sync
    did not bring it back within the wait (docs/reference.md §12). It is served once git-sync swaps it in."""

    pending: Literal[True]
    commit: str
    file: str


WriteAccepted = Branched | Pushed
"""202: a write committed to a branch for review, or pushed and not applied here yet."""
