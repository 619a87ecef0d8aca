"""What the gateway answers of its own (docs/reference.md §7): the model list and the events
of a stream, as `GET /openapi.json` describes them (`service.http.answers`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.http.answers import Answer

# -- the gateway --------------------------------------------------------------------------------------


class ModelEntry(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="the provider that serves it")


class ServerSentEvent(BaseModel):
    """One event of a `text/event-stream` answer: `data:` is a JSON chunk, or `[DONE]` at the end."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    event: str | None = None
    id: str | None = None


class ModelsAnswer(Answer):
    """OpenAI's model list: the models of the enabled providers."""

    object: Literal["list"]
    data: list[ModelEntry]
