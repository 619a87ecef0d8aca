"""`GET /openapi.json` describes the app as it is: every route, and answers that match.

Three layers: the document lists exactly the routes `app.router` has (a route added without
a description fails here, saying where to describe it); the document is valid OpenAPI 3.1;
and schemathesis, run against a live service (real git, real sops, a clients file, a stand-in
upstream), finds no 5xx and no answer that breaks the document in any operation.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, get_args

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from service import console
from service.config.models import Scope
from service.http.app import create_app
from service.http.openapi import PATH, document
from service.journal.reader import verify
from service.settings import Settings
from tests.conftest import Service, SopsProject, git, git_init, serve
from tests.support.gateway import write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

SCOPES: tuple[Scope, ...] = get_args(Scope)
TOKEN = "sb_openapi_every_scope_6f1e2d3c4b5a"
BLOCKING = ("index", "wait", "If-None-Match")
"""docs/reference.md §9: every GET under the API but the stream and `secrets:read` takes these."""
KEY = "sk-openapi-provider-key-0a1b2c3d4e5f"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
WHERE = "service/http/openapi.py or the table of its part of the API (service/http/*_operations.py)"


def routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of `app`, but HEAD, OPTIONS and the document itself."""
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method not in ("HEAD", "OPTIONS") and path != PATH:
            found.add((route.method, str(path)))
    return found


def described(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS and path != PATH
    }


@pytest.fixture
def settings(sops_project: SopsProject) -> Settings:
    return Settings(root=sops_project.root, providers=sops_project.providers, port=0)


# -- the document and the routes ---------------------------------------------------------------------


def undescribed(app: web.Application, doc: dict[str, Any]) -> str | None:
    """What is wrong between the app's routes and the document, as the test says it; None if nothing."""
    have, told = routes(app), described(doc)
    if missing := sorted(have - told):
        return (
            f"routes the app has but /openapi.json does not describe: {missing}; describe each in "
            f"{WHERE} (its scope, parameters, body and answers)"
        )
    if extra := sorted(told - have):
        return f"/openapi.json describes routes the app does not have: {extra} ({WHERE})"
    return None


def test_every_route_of_the_app_is_described_and_nothing_else(settings: Settings) -> None:
    doc = document((console,))
    problem = undescribed(create_app(settings, pages=(console,)), doc)
    assert problem is None, problem
    assert PATH in doc["paths"]


def test_a_route_added_without_a_description_fails_saying_where_to_describe_it(settings: Settings) -> None:
    app = create_app(settings, pages=(console,))

    async def undescribed_example(request: web.Request) -> web.Response:
        raise NotImplementedError

    app.router.add_get("/api/v1/llm-config/undescribed-example", undescribed_example)
    assert undescribed(app, document((console,))) == (
        "routes the app has but /openapi.json does not describe: "
        f"[('GET', '/api/v1/llm-config/undescribed-example')]; describe each in {WHERE} "
        "(its scope, parameters, body and answers)"
    )
    doc = document((console,))
    doc["paths"]["/v1/gone"] = {"get": {}}
    assert "describes routes the app does not have: [('GET', '/v1/gone')]" in str(
        undescribed(create_app(settings, pages=(console,)), doc)
    )


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document((console,))
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_each_operation_names_its_scope_and_the_bearer_scheme() -> None:
    doc = document((console,))
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            scope = op.get("x-switchboard-scope")
            unauthenticated = ("/", "/healthz", "/readyz", "/metrics", PATH, "/api/v1/llm-config/hooks/git")
            if path in unauthenticated or path.startswith("/ui"):  # docs/reference.md §6.1
                assert scope is None and op["security"] == [], (method, path)
                continue
            assert scope in (*SCOPES, "any") and op["security"] == [{"bearer": []}], (method, path)
            assert f"Scope: `{scope}`." in op["description"]
            assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_writes_describe_their_headers_and_bodies() -> None:
    doc = document((console,))
    prefix = "/api/v1/llm-config"
    patch = doc["paths"][f"{prefix}/servers/{{id}}"]["patch"]
    assert "application/merge-patch+json" in patch["requestBody"]["content"]
    assert {p["name"] for p in patch["parameters"]} == {"id", "If-Match", "X-Switchboard-Reason"}
    assert "ETag" in patch["responses"]["200"]["headers"] and "412" in patch["responses"]
    create = doc["paths"][f"{prefix}/api-keys"]["post"]
    assert set(create["responses"]["201"]["headers"]) == {"ETag", "Location"}
    body = doc["components"]["schemas"]["ApiKeyCreate"]
    assert body["properties"]["api_key"]["type"] == "string"  # plaintext, not sops' ciphertext
    assert "pattern" not in body["properties"]["api_key"]
    assert "kind" not in body["required"] and "api_key" in body["required"]
    invalid = doc["components"]["schemas"]["InvalidDetail"]
    assert "problems" in invalid["required"]
    audit = doc["paths"][f"{prefix}/audit"]["get"]
    named = {p["name"] for p in audit["parameters"]}
    assert named == {"subject", "type", "since", "until", "limit", *BLOCKING}


async def test_the_document_is_served_without_a_token_and_built_once(sops_project: SopsProject) -> None:
    write_clients(sops_project, {"tester": (TOKEN, SCOPES)})
    async with serve(sops_project) as service:
        async with service.http.get(service.url + PATH) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            first = await response.read()
        async with service.http.get(service.url + PATH) as response:
            assert await response.read() == first
        status, _ = await service.get("/api/v1/llm-config/providers")
        assert status == 401  # the rest still needs a token
    assert json.loads(first) == document((console,))


async def test_each_scope_is_the_one_the_handler_asks_for(sops_project: SopsProject) -> None:
    """A token holding every scope but an operation's own is refused with 403, nothing else."""
    clients = {
        f"no-{s.replace(':', '-')}": (f"{TOKEN}-{i}", [o for o in SCOPES if o != s])
        for i, s in enumerate(SCOPES)
    }
    tokens = {s: f"{TOKEN}-{i}" for i, s in enumerate(SCOPES)}
    write_clients(sops_project, clients)
    doc = document((console,))
    async with serve(sops_project) as service:
        for path, item in doc["paths"].items():
            for method, op in item.items():
                scope = op.get("x-switchboard-scope")
                if scope in (None, "any"):
                    continue
                url = service.url + path.replace("{id}", "gpu").replace("{purpose}", "chat")
                headers = {"Authorization": f"Bearer {tokens[scope]}", "Content-Type": "application/json"}
                async with service.http.request(method, url, headers=headers, data=b"{}") as response:
                    assert response.status == 403, (method, path, await response.text())


# -- schemathesis against a live service ---------------------------------------------------------------

SCHEMATHESIS_SEED = 20261127
MAX_EXAMPLES = 10
"""Per operation and phase: enough to find what the handlers get wrong, within the test's minute."""
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "ignored_auth",  # each operation that names a scope refuses a request without a valid token
)

CONFIG = r"""
# 502 (every upstream failed) and 503 (no candidate, not ready) are answers of the contract, not
# faults: status_code_conformance still fails one that an operation does not document. 500 fails.
[checks.not_a_server_error]
expected-statuses = ["1XX", "2XX", "3XX", "4XX", "502", "503"]

# Values the fuzzer mixes into what it generates, as AFL's dictionaries do: the edges that the
# schemas alone rarely reach. Times off the calendar; line breaks and NULs in a key that becomes
# a header, and in text that becomes YAML; URLs with credentials, bad ports, no host; numbers at
# the end of the range; and the ids that exist, so that writes change real files.
[dictionaries.times]
values = ["99999999999d", "9999999w", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "0001-01-01"]

[dictionaries.keys]
values = ["sk-edge\r\nInjected: yes", "line\nbreak", "tab\there", "nul\u0000byte", "del\u007f", " sk-space "]

[dictionaries.text]
values = [
    "kind: clients\nclients: []", "line\nbreak", "nul\u0000byte", "'; --", "&a *a",
    "!!python/object:os.system",
]

[dictionaries.urls]
values = [
    "http://127.0.0.1:9/v1", "http://[::1]:9/v1", "http://user:pass@127.0.0.1:9/", "https://h/?q=1#f",
    "http://h:99999/", "http://a\u0000b/", "https://",
]

[dictionaries.ids]
values = ["gpu", "openrouter", "spare", "new-server", "new-key"]

[dictionaries.numbers]
values = [0, -1, 1e-300, 1.7976931348623157e308, 9007199254740993, 4294967296]

[dictionaries.integers]
values = [0, -1, 9007199254740993, 18446744073709551616]

[parameters]
"query.since" = { dictionary = "times", probability = 0.5 }
"query.until" = { dictionary = "times", probability = 0.5 }
"query.at" = { dictionary = "times", probability = 0.5 }
"path.id" = { dictionary = "ids", probability = 0.5 }
"body.api_key" = { dictionary = "keys", probability = 0.5 }
"body.name" = { dictionary = "text", probability = 0.3 }
"body.base_url" = { dictionary = "urls", probability = 0.5 }
"body.provider_id" = { dictionary = "ids", probability = 0.5 }

[generation.dictionaries]
number = { dictionary = "numbers", probability = 0.2 }
integer = { dictionary = "integers", probability = 0.2 }
"""


def seed(project: SopsProject, upstream: FakeUpstream) -> None:
    """A realistic configuration in a git repository: a GPU server, a vendor key, a spare, routes."""
    git_init(project.root)
    (project.root / ".gitignore").write_text("var/\n")
    write_provider(
        project,
        "gpu",
        server_type="vllm",
        base_url=upstream.base_url,
        purposes=["chat", "embeddings", "reranking"],
    )
    write_provider(
        project,
        "openrouter",
        provider="openrouter",
        base_url=upstream.base_url,
        api_key=KEY,
        purposes=["chat"],
    )
    write_provider(project, "spare", server_type="ollama", base_url=upstream.base_url, purposes=["chat"])
    write_routing(
        project,
        chat={"primary": ["gpu"], "fallbacks": ["openrouter"]},
        embeddings="gpu",
        reranking="gpu",
    )
    write_clients(project, {"tester": (TOKEN, SCOPES)})
    git(project.root, "add", "-A")
    git(project.root, "commit", "-qm", "a realistic configuration")


async def schemathesis(service: Service, workdir: Path) -> tuple[int, str]:
    """Run `schemathesis run` (its stateless phases) against the service; its exit code and report."""
    (workdir / "schemathesis.toml").write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        service.url + PATH,
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SCHEMATHESIS_SEED),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        # The event stream never ends by design; tests/http/test_push.py tests it against a server.
        "--exclude-path",
        "/api/v1/llm-config/events",
        "--no-color",
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160"},
    )
    try:
        output, _ = await process.communicate()
    finally:
        if process.returncode is None:  # the test timed out: leave no schemathesis behind
            process.kill()
            await process.wait()
    return process.returncode or 0, output.decode(errors="replace")


@pytest.mark.timeout(150)
async def test_schemathesis_finds_no_server_error_and_no_answer_that_breaks_the_document(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    async with FakeUpstream(name="upstream") as upstream:
        seed(sops_project, upstream)
        async with serve(sops_project) as service:
            started = time.perf_counter()
            code, report = await schemathesis(service, tmp_path)
            took = time.perf_counter() - started
    print(report[-3000:], f"\nschemathesis took {took:.1f} s")  # shown with -s
    assert code == 0, report[-30_000:]
    assert "No issues found" in report or "passed" in report, report[-5000:]
    # The writes were real: commits by the API's client, nothing left half-done, the log whole.
    authors = git(sops_project.root, "log", "--format=%ae").splitlines()
    written = authors.count("tester@clients.switchboard.invalid")
    print(f"{written} commits written over HTTP")
    assert written >= 5, authors
    assert git(sops_project.root, "status", "--porcelain") == ""
    verify(sops_project.root / "var" / "events.jsonl")
