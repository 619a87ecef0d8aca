"""What the HTTP API answers, as pydantic models: the response schemas of `GET /openapi.json`.

Handlers build their answers as plain dicts (rendered once per snapshot, cheap to encode);
these models describe those dicts and are never on a request's path. They are strict
(`extra="forbid"`), so schemathesis, run against a live service in the tests, fails when an
answer grows a field that is not described here: describe it, then ship it.

This module holds their base; the models are in one module per area of the API, beside the
tables of operations that use them: `config_answers` (the reads), `write_answers`,
`gateway_answers`, `limits_answers`, `service_answers` (the service's own routes, the replicas)
and `error_answers` (every error).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
