"""Reranking on Hugging Face's Text Embeddings Inference (`server_type: tei`), in `/v1/rerank`'s shape.

TEI serves its own `/rerank` (at the server's root, beside its OpenAI-compatible
`/v1/embeddings`): it takes `{"query", "texts"}` and answers a list of `{"index", "score"}`,
best first. This transport turns a `/v1/rerank` request (`model`, `query`, `documents` as
strings or `{"text"}` objects, `top_n`, `return_documents`) into that, and the answer back
into `{"id", "model", "results": [{"index", "relevance_score"[, "document"]}]}`. The upstream
request goes through the direct transport's session, limits and timeouts; TEI's errors come
back in the gateway's error shape. Embeddings to a TEI server stay on the direct path.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from service.config.models import Provider
from service.errors import BadRequest
from service.gateway.call import Call, Failure
from service.gateway.transports.base import Transport, pass_back
from service.gateway.transports.openai import OpenAITransport


class TEITransport(Transport):
    """Sends reranking requests to TEI's `/rerank`, through the direct transport's session."""

    def __init__(self, direct: OpenAITransport) -> None:
        self.direct = direct

    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Rerank through TEI and answer in `/v1/rerank`'s shape; raises `Failure` to move on."""
        query, texts, top_n, with_documents = _request(call.data)
        target = self.direct.upstream(provider)
        if target.unusable is not None:
            raise Failure(None, target.unusable)
        url = target.base.removesuffix("/v1") + "/rerank"
        body = json.dumps({"query": query, "texts": texts}).encode()  # ASCII: a lone surrogate stays valid
        response, answer = await self.direct.exchange(call, target, url, body)
        pass_back(response.headers, headers, target.key_text, call.said)
        headers["Content-Type"] = "application/json"
        if response.status >= 300:
            return web.Response(body=_error(answer, response.status), status=response.status, headers=headers)
        results = _results(answer, len(texts))
        if top_n is not None:
            results = results[:top_n]
        if with_documents:
            results = [{**r, "document": {"text": texts[r["index"]]}} for r in results]
        reranked = {"id": f"rerank-{os.urandom(8).hex()}", "model": call.model, "results": results}
        return web.Response(body=json.dumps(reranked).encode(), headers=headers)


def _request(data: dict[str, Any]) -> tuple[str, list[str], int | None, bool]:
    """The query, the texts, `top_n` and `return_documents` of a `/v1/rerank` body; 400 when malformed."""
    query = data.get("query")
    documents = data.get("documents")
    if not isinstance(query, str):
        raise BadRequest("`query` must be a string")
    if not isinstance(documents, list):
        raise BadRequest('`documents` must be a list of strings or of {"text"} objects')
    texts = []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise BadRequest('`documents` must be a list of strings or of {"text"} objects')
        texts.append(text)
    top_n = data.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
        raise BadRequest("`top_n` must be a whole number")
    return query, texts, top_n, data.get("return_documents") is True


def _results(answer: bytes, count: int) -> list[dict[str, Any]]:
    """TEI's ranking as `/v1/rerank` results, best first; `Failure` when it is not one."""
    try:
        ranked = json.loads(answer)
    except (ValueError, RecursionError):
        ranked = None
    results = []
    for item in ranked if isinstance(ranked, list) else [None]:
        index = item.get("index") if isinstance(item, dict) else None
        score = item.get("score") if isinstance(item, dict) else None
        if (
            not isinstance(index, int)
            or not 0 <= index < count
            or not isinstance(score, int | float)
            or isinstance(score, bool)
        ):
            raise Failure(None, "the answer is not a TEI ranking")
        results.append({"index": index, "relevance_score": score})
    results.sort(key=_score, reverse=True)
    return results


def _score(result: dict[str, Any]) -> float:
    score: float = result["relevance_score"]
    return score


def _error(answer: bytes, status: int) -> bytes:
    """TEI's `{"error", "error_type"}` as the gateway's `{"error": {"type", "message"}}`."""
    try:
        error = json.loads(answer)
    except (ValueError, RecursionError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("error"), str):
        kind = error.get("error_type")
        message = {"type": kind if isinstance(kind, str) else "upstream_error", "message": error["error"]}
        return json.dumps({"error": message}).encode()
    return answer
