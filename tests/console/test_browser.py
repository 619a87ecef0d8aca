"""The web console in a real browser (docs/reference.md §10): Debian's Chromium driven by Playwright.

Against a real service: a git repository, real sops, a clients file, stand-in upstreams. One
browser for the session, a fresh context (so a fresh tab and sessionStorage) per test. Every
test also checks what the page must never do (`Watched`): a request to another origin, an
error in the console, an uncaught exception, a dialog (the markup-in-a-name case).

Chromium is installed by CI (`.ci/run`); where it is missing these tests fail, not skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.async_api import Browser, Request, expect

from service.http.changes import CHANGES
from service.journal.events import EVENT_TYPES
from tests.conftest import (
    AgeIdentity,
    Service,
    SopsProject,
    eventually,
    git,
    serve,
    write_atomically,
)
from tests.support.browser import isolated, module_project, server, tab
from tests.support.gateway import write_clients
from tests.support.upstreams import FakeUpstream

API = "/api/v1/llm-config"
ADMIN = "sb_console_admin_4d3c2b1a0f9e8d7c"
READER = "sb_console_reader_1a2b3c4d5e6f7a8b"
WRITER = "sb_console_writer_9f8e7d6c5b4a3f2e"
KEY = "sk-or-console-0123456789abcdef"
EVIL_NAME = "<img src=x onerror=alert(1)>\u202e\x1b[31m"
EVIL_FILE = "<svg onload=alert(3)>.yaml"

pytestmark = pytest.mark.timeout(60)


# -- a service with a bit of everything ----------------------------------------------------------------


@dataclass
class World:
    service: Service
    project: SopsProject
    gpu: FakeUpstream

    @property
    def root(self) -> Path:
        return self.project.root

    def head(self) -> str:
        return git(self.root, "rev-parse", "HEAD")

    async def request(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        data = json.dumps(body) if body is not None else None
        async with self.service.http.request(
            method, self.service.url + path, data=data, headers=headers
        ) as r:
            return r.status, await r.json()


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, age_identity: AgeIdentity, _isolated_home: Path
) -> AsyncIterator[World]:
    with isolated(_isolated_home):
        project = module_project(tmp_path_factory.mktemp("console") / "project", age_identity)
        async with FakeUpstream(name="gpu") as gpu, FakeUpstream(name="vendor", api_key=KEY) as vendor:
            git(project.root, "init", "-q", "-b", "main")
            (project.root / ".gitignore").write_text("var/\n")
            server(project, "gpu", gpu.base_url, name="GPU box", purposes=["chat", "embeddings"])
            backup = project.providers / "backup.yaml"
            text = f"kind: api_key\nid: backup\nprovider: openrouter\nbase_url: {vendor.base_url}\n"
            text += f"api_key: {KEY}\n"
            write_atomically(backup, project.sops.encrypt(text.encode(), str(backup)).decode())
            # A provider file full of markup and control characters.
            server(project, "evil", gpu.base_url, name=EVIL_NAME, models=["<script>alert(2)</script>"])
            (project.providers / EVIL_FILE).write_text("kind: ai_server\nid: svg\nserver_type: vllm\n")
            (project.providers / "broken.yaml").write_text(
                "kind: ai_server\nid: broken\nserver_type: gpu-box\nbase_url: http://h/v1\n"
            )
            routing = {
                "kind": "routing",
                "purposes": {
                    "chat": {"primary": ["gpu"], "weights": {"gpu": 3}, "fallbacks": ["evil"]},
                    "embeddings": {"primary": "gpu"},
                },
            }
            write_atomically(project.providers / "routing.yaml", json.dumps(routing))
            write_clients(
                project,
                {
                    "admin": (ADMIN, ["config:read", "config:write", "admin", "completions"]),
                    "reader": (READER, ["config:read"]),
                    "writer": (WRITER, ["config:read", "config:write"]),
                },
            )
            git(project.root, "add", "-A")
            git(project.root, "commit", "-qm", "the console's world")
            async with serve(project) as service:
                yield World(service, project, gpu)


# -- signing in ---------------------------------------------------------------------------------------


async def test_the_token_is_asked_once_per_tab_and_sent_only_as_a_bearer_header(
    browser: Browser, world: World
) -> None:
    sent: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: sent.append(r))
        await t.page.goto(f"{t.url}/ui/")
        await expect(t.page.locator("h1")).to_have_text("Sign in")
        await t.page.fill("#token", "sb_nobody_knows_this_token")
        await t.page.click("button[type=submit]")
        await expect(t.page.locator("#token-problem")).to_have_text("The service does not know this token.")
        await t.page.fill("#token", ADMIN)
        await t.page.click("button[type=submit]")
        await expect(t.page.locator("h1")).to_have_text("Overview")
        await expect(t.page.locator(".client")).to_have_text("admin")
        assert await t.page.evaluate("sessionStorage.getItem('switchboard.token')") == ADMIN
        assert await t.page.evaluate("localStorage.length") == 0
        await t.live()
        await t.page.reload()  # the same tab: no question
        await expect(t.page.locator("h1")).to_have_text("Overview")
        another = await t.page.context.new_page()  # another tab asks again
        await another.goto(f"{t.url}/ui/")
        await expect(another.locator("h1")).to_have_text("Sign in")
        await another.close()
    api = [r for r in sent if "/api/" in r.url]
    assert any(r.url.endswith("/events?after=0") for r in api)  # the stream, from the log's start
    for request in api:
        assert ADMIN not in request.url and "sb_nobody" not in request.url
        if request.url.endswith("/whoami") and "authorization" not in request.headers:
            continue  # the first question: does the service want a token at all?
        assert request.headers["authorization"] in (f"Bearer {ADMIN}", "Bearer sb_nobody_knows_this_token")


async def test_without_a_clients_file_no_token_is_asked(browser: Browser, sops_project: SopsProject) -> None:
    server(sops_project, "solo", "http://127.0.0.1:9/v1")
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.open("#/providers")
        await expect(t.page.locator(".client")).to_have_text("no authentication")
        await expect(t.page.locator("table.providers tbody tr")).to_have_count(1)
        await expect(t.page.get_by_role("button", name="Sign out")).to_have_count(0)


# -- the pages render real data -----------------------------------------------------------------------


async def test_the_overview_shows_routes_health_commits_and_refused_files(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/overview", ADMIN)
        await t.live()
        ready = (await world.service.get("/readyz"))[1]
        chat = t.page.locator(".route[data-purpose=chat]")
        await expect(chat).to_contain_text("gpu")
        await expect(chat.locator("ol li")).to_contain_text(["evil"])  # the fallback
        await expect(chat.locator(".badge").first).to_have_text(re.compile("healthy|unknown"))
        await expect(t.page.locator(".route[data-purpose=embeddings]")).to_contain_text("gpu")
        # "each purpose with its primaries (weights)": a weight is shown with one primary too
        await expect(chat.locator(".weight")).to_have_text(re.compile(r"weight 3\b"))
        # what the page says of a purpose without a route is what the gateway answers for it
        status, answer = await world.request(
            "POST", "/v1/rerank", ADMIN, {"model": "m", "query": "q", "documents": ["d"]}
        )
        assert (status, answer["error"]["type"]) == (404, "model_not_found"), answer
        await expect(t.page.locator(".route[data-purpose=reranking]")).to_contain_text(
            "Not routed: requests for it answer 404 (model_not_found)."
        )
        cards = t.page.locator(".cards")
        await expect(cards).to_contain_text(f"Generation{ready['generation']}")
        await expect(cards.locator(".sha").first).to_have_text(ready["last_applied_commit"][:7])
        attempted = cards.locator(".card", has_text="Last attempted commit").locator(".sha")
        await expect(attempted).to_have_text(ready["last_attempted_commit"][:7])
        await expect(cards).to_contain_text("degraded")
        refused = t.page.locator("table.refused tbody tr")
        await expect(refused).to_have_count(len(ready["refused"]))
        broken = refused.filter(has_text="providers.d/broken.yaml")
        await expect(broken.locator(".reason")).to_contain_text("server_type")


async def test_the_providers_table_shows_each_column_with_traffic(browser: Browser, world: World) -> None:
    for _ in range(2):
        status, _ = await world.request("POST", "/v1/embeddings", ADMIN, {"model": "m", "input": ["a b c"]})
        assert status == 200
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers", READER)
        gpu = t.page.locator("tr[data-id=gpu]")
        await expect(gpu.locator("[data-label=Kind]")).to_have_text("ai_server")
        await expect(gpu.locator("[data-label='Vendor / server']")).to_have_text("vllm")
        await expect(gpu.locator("[data-label=URL]")).to_have_text(world.gpu.base_url)
        await expect(gpu.locator("[data-label=Purposes]")).to_have_text("chat, embeddings")
        await expect(gpu.locator("[data-label=Models]")).to_have_text("any")
        # traffic is read apart from the providers, so the row may be drawn before it: wait for it
        await expect(gpu.locator("[data-label=Requests]")).to_have_text(
            re.compile(r"^(?:[2-9]|[1-9][\d,]+)$")
        )
        await expect(gpu.locator("[data-label=Tokens]")).not_to_have_text("0")
        await expect(gpu.locator("[data-label=Latency]")).to_have_text(re.compile(r"\d ms"))
        backup = t.page.locator("tr[data-id=backup]")
        await expect(backup.locator("[data-label=Key]")).to_have_text("****" + KEY[-4:])
        await expect(backup.locator("[data-label='Vendor / server']")).to_have_text("openrouter")
        await expect(t.page.locator("body")).not_to_contain_text(KEY)
        await t.page.fill("#filter", "backup")
        await expect(t.page.locator("table.providers tbody tr")).to_have_count(1)


async def test_a_providers_page_shows_its_events_and_its_test_button_checks_it(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers/gpu", ADMIN)
        await expect(t.page.locator("h1")).to_contain_text("gpu")
        added = t.page.locator(".event[data-type='provider.added']")
        await expect(added).to_have_count(1)
        await expect(added.locator(".sha")).to_have_text(
            git(world.root, "log", "-1", "--format=%h", "--abbrev=7", "--", "providers.d/gpu.yaml")
        )
        await expect(added.locator(".author")).to_have_text("Switchboard Tests <tests@switchboard.invalid>")
        await t.page.click("#test")
        await expect(t.page.locator(".test-result")).to_contain_text("OK in")


async def test_the_event_timeline_shows_each_change_field_by_field_and_filters(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/events", READER)
        await t.live()
        added = t.page.locator(".event[data-type='provider.added']", has_text="backup")
        await added.locator("summary").click()  # unfolded by the operator: stays so across updates
        status, body = await world.request("PATCH", f"{API}/servers/gpu", WRITER, {"name": "Bigger GPU box"})
        assert status == 200, body
        update = t.page.locator(
            f".event[data-type='provider.updated']:has(.sha:text-is('{body['commit'][:7]}'))"
        )
        await expect(update).to_have_count(1)  # live: no reload
        row = update.locator("table.changes tr", has_text="name")
        await expect(row.locator(".old")).to_have_text("GPU box")
        await expect(row.locator(".new")).to_have_text("Bigger GPU box")
        await expect(update.locator(".author")).to_have_text("writer <writer@clients.switchboard.invalid>")
        await expect(added.locator("details")).to_have_attribute("open", "")
        await t.page.fill("#event-subject", "gpu")
        await t.page.select_option("#event-type", "provider.updated")
        shown = t.page.locator(".timeline .event")
        await expect(shown).not_to_have_count(0)
        for subject in await shown.locator(".subject").all_text_contents():
            assert subject == "gpu"
        assert set(await shown.evaluate_all("els => els.map(e => e.dataset.type)")) == {"provider.updated"}
        # Every event of the log is there, once: the stream started at the log's beginning.
        await t.page.fill("#event-subject", "")
        await t.page.select_option("#event-type", "")
        summary = t.page.locator("main .help[role=status]")

        async def every_event_once() -> None:
            logged = [e for e in world.service.events() if e.type not in ("secret.read", "clients.updated")]
            assert await summary.text_content() == f"{len(logged)} events"

        await eventually(every_event_once, timeout=10)


async def test_the_event_timeline_filters_by_every_type_of_the_log(browser: Browser, world: World) -> None:
    """ "filterable by subject and type": the type box offers each type an event of the log can have."""
    types = {event.model_fields["type"].default for event in EVENT_TYPES}
    async with tab(browser, world.service.url) as t:
        await t.open("#/events", READER)
        offered = await t.page.locator("#event-type option").evaluate_all("els => els.map(e => e.value)")
    assert sorted(offered) == sorted({"", *types})


# -- live ---------------------------------------------------------------------------------------------


async def test_a_file_edited_on_disk_appears_without_a_reload(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers", READER)
        await t.live()
        await t.page.evaluate("window.__same_page = true")
        await t.page.fill("#filter", "live-one")
        await expect(t.page.locator("table.providers td.empty")).to_have_text("No provider matches.")
        server(world.project, "live-one", "http://127.0.0.1:9/v1", name="first")
        row = t.page.locator("tr[data-id=live-one]")
        await expect(row).to_contain_text("first")
        server(world.project, "live-one", "http://127.0.0.1:9/v1", name="second")
        await expect(row).to_contain_text("second")
        await t.page.click("a[data-page=overview]")
        (world.project.providers / "live-one.yaml").write_text(
            "kind: ai_server\nid: live-one\nserver_type: ???\n"
        )
        await expect(t.page.locator("table.refused")).to_contain_text("providers.d/live-one.yaml")
        (world.project.providers / "live-one.yaml").unlink()
        await expect(t.page.locator("table.refused")).not_to_contain_text("live-one")
        assert await t.page.evaluate("window.__same_page") is True


async def test_a_commit_that_changes_no_file_moves_the_overviews_commits(
    browser: Browser, sops_project: SopsProject
) -> None:
    """A commit of files already served changes no configuration, so no event tells of it; the
    overview asks for the service's state again while it is shown, so its commits stay true."""
    root = sops_project.root
    git(root, "init", "-q", "-b", "main")
    (root / ".gitignore").write_text("var/\n")
    server(sops_project, "gpu", "http://127.0.0.1:9/v1")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "one")
    async with serve(sops_project, rescan_s=0.1) as service, tab(browser, service.url) as t:
        await t.page.clock.install()
        await t.open("#/overview")
        await t.live()
        applied = t.page.locator(".cards .card", has_text="Last applied commit").locator(".sha")
        await expect(applied).to_have_text(_head(root)[:7])
        (root / "README.md").write_text("the configuration of the team\n")
        git(root, "add", "-A")
        git(root, "commit", "-qm", "two")
        second = _head(root)

        async def moved() -> None:
            assert (await service.get("/readyz"))[1]["last_applied_commit"] == second

        await eventually(moved)
        await t.page.clock.fast_forward(11_000)  # past the page's 10 s poll
        await expect(applied).to_have_text(second[:7])
        attempted = t.page.locator(".cards .card", has_text="Last attempted commit").locator(".sha")
        await expect(attempted).to_have_text(second[:7])


def _head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD")


async def test_the_stream_resumes_with_last_event_id_after_a_drop(browser: Browser, world: World) -> None:
    streams: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: streams.append(r) if "/llm-config/events" in r.url else None)
        await t.open("#/events", READER)
        await t.live()
        last = await t.page.locator(".timeline .event").first.get_attribute("data-seq")  # the newest seen
        changes = world.service.app[CHANGES]
        for stream in list(changes._streams):  # as a proxy or a restart would: the stream ends
            stream.closed = True
            stream.ready.set()
        await eventually(lambda: len(streams) >= 2, timeout=10)
        assert streams[0].url.endswith("?after=0")
        assert streams[1].url.endswith("/events") and streams[1].headers["last-event-id"] == last
        await t.live()
        status, body = await world.request("PATCH", f"{API}/servers/gpu", WRITER, {"models": ["resumed"]})
        assert status == 200, body
        await expect(t.page.locator(f".event:has(.sha:text-is('{body['commit'][:7]}'))")).to_have_count(1)
        seqs = await t.page.locator(".timeline .event").evaluate_all("els => els.map(e => e.dataset.seq)")
        assert len(seqs) == len(set(seqs))  # nothing twice across the reconnection


# -- writes through the forms ------------------------------------------------------------------------


async def test_a_provider_added_through_the_form_is_a_commit(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/new", WRITER)
        await t.page.click("#f-kind-ai_server")
        await t.page.fill("#f-id", "form-made")
        await t.page.fill("#f-base_url", "ftp://10.0.0.12/v1")
        await t.page.fill("#f-models", "m-one\nm-two")
        await t.page.fill("#f-reason", "made in the console")
        before = world.head()
        await t.page.click("button.primary:text('Create provider')")
        # The service's problem is shown beside the field it concerns, and nothing is written.
        await expect(t.page.locator("[data-field=base_url] .field-problem")).to_contain_text("http")
        assert world.head() == before
        await t.page.fill("#f-base_url", "http://10.0.0.12:8000/v1")
        await t.page.click("button.primary:text('Create provider')")
        done = t.page.locator(".done .ok")
        await expect(done).to_contain_text("Created form-made: commit")
        head = world.head()
        await expect(done.locator(".sha")).to_have_text(head[:7])
    log = git(world.root, "log", "-1", "--format=%an <%ae>%n%s%n%b")
    assert log.splitlines()[:3] == [
        "writer <writer@clients.switchboard.invalid>",
        "create ai_server form-made",
        "made in the console",
    ]
    written = yaml.safe_load((world.project.providers / "form-made.yaml").read_text())
    assert written["models"] == ["m-one", "m-two"] and written["base_url"] == "http://10.0.0.12:8000/v1"


async def test_an_edit_carries_if_match_and_a_change_meanwhile_is_refused(
    browser: Browser, world: World
) -> None:
    server(world.project, "to-edit", "http://127.0.0.1:9/v1", name="before")
    git(world.root, "add", "-A")
    git(world.root, "commit", "-qm", "to-edit")
    await eventually(lambda: world.service.registry.snapshot.providers.get("to-edit") is not None)
    writes: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: writes.append(r) if r.method in ("PATCH", "PUT", "DELETE") else None)
        await t.open("#/changes/edit/to-edit", WRITER)
        await t.live()
        await expect(t.page.locator("#f-name")).to_have_value("before")
        await t.page.fill("#f-name", "after")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Saved to-edit: commit")
        assert git(world.root, "log", "-1", "--format=%s") == "update ai_server to-edit"
        assert writes[-1].method == "PATCH" and writes[-1].headers["if-match"].removeprefix("W/").startswith(
            '"'
        )
        assert json.loads(writes[-1].post_data or "{}") == {"name": "after"}  # only what changed
        # Someone else changes it: the form says so, and a save is refused (412), not lost.
        status, _ = await world.request("PATCH", f"{API}/servers/to-edit", ADMIN, {"name": "elsewhere"})
        assert status == 200
        await expect(t.page.locator("form.change .note")).to_contain_text(
            "changed since this form was loaded"
        )
        await t.page.fill("#f-name", "mine")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator("form.change .form-problems")).to_contain_text("412")
        assert git(world.root, "log", "-1", "--format=%an") == "admin"
        # Delete, confirmed in the page (no dialog), with If-Match.
        await t.page.goto(f"{t.url}/ui/#/changes/edit/to-edit?again=1")
        await t.page.click("text=Delete to-edit…")
        await t.page.click("#confirm-delete")
        await expect(t.page.locator("text=Deleted to-edit: commit")).to_be_visible()
        assert writes[-1].method == "DELETE" and "if-match" in writes[-1].headers
    assert git(world.root, "log", "-1", "--format=%s") == "delete ai_server to-edit"


async def test_moving_a_keyed_provider_asks_for_its_key_beside_the_key_field(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/backup", WRITER)
        await expect(t.page.locator("#f-base_url")).not_to_have_value("")
        await t.page.fill("#f-base_url", "http://127.0.0.1:9/elsewhere")
        before = world.head()
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator("[data-field=api_key] .field-problem")).to_contain_text("send `api_key`")
        assert world.head() == before
        await expect(t.page.locator("#f-api_key")).to_be_focused()


async def test_pricing_budget_and_protocols_are_set_through_the_form_with_problems_beside_them(
    browser: Browser, world: World
) -> None:
    writes: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: writes.append(r) if r.method in ("POST", "PATCH") else None)
        await t.open("#/changes/new", WRITER)
        await t.page.click("#f-kind-ai_server")
        await t.page.fill("#f-id", "priced")
        await t.page.fill("#f-base_url", "http://10.0.0.13:8000/v1")
        await t.page.click("details.costs summary")
        before = world.head()
        # What the form cannot read is said beside the field, and nothing is sent.
        await t.page.fill("#f-pricing", "gpt-4o input")
        await t.page.fill("#f-budget", "200")
        await t.page.click("button.primary:text('Create provider')")
        pricing_problem = t.page.locator("[data-field=pricing] .field-problem")
        await expect(pricing_problem).to_contain_text('not "class=amount"')
        await expect(t.page.locator("[data-field=budget] .field-problem")).to_contain_text("period")
        assert not writes
        # What the service refuses (markup in a model's name, a negative budget, an amount that
        # is not one) comes back as a 422 shown beside the fields, as text.
        await t.page.fill("#f-pricing", "<svg/onload=alert(4)> input=1e999 output=abc")
        await t.page.fill("#f-budget", "-5")
        await t.page.select_option("#f-budget-period", "month")
        await t.page.click("button.primary:text('Create provider')")
        await expect(pricing_problem).to_contain_text("<svg/onload=alert(4)>")
        await expect(t.page.locator("[data-field=budget] .field-problem")).to_contain_text("0 or more")
        assert writes[-1].method == "POST" and world.head() == before
        # Then right: the amounts go as the strings typed (exact money), protocols as ticked.
        await t.page.fill("#f-pricing", "* input=0.15 output=0.60\nm-big input=2.50 cached_input=1.25")
        await t.page.fill("#f-budget", "200.50")
        await t.page.check("#f-protocols-chat")
        await t.page.check("#f-protocols-completions")
        await t.page.click("button.primary:text('Create provider')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Created priced: commit")
        sent = json.loads(writes[-1].post_data or "{}")
        assert sent["pricing"] == {
            "*": {"input": "0.15", "output": "0.60"},
            "m-big": {"input": "2.50", "cached_input": "1.25"},
        }
        assert sent["budget"] == {"usd": "200.50", "period": "month"}
        assert sent["protocols"] == ["chat", "completions"]
        provider = world.service.registry.snapshot.providers["priced"]
        assert str(provider.pricing["m-big"].input) == "2.50" and str(provider.budget.usd) == "200.50"

        # An edit sends a merge patch of what was touched: a model removed is null, each kept
        # model's classes all sent (null where removed); the budget and protocols replaced.
        await t.open("#/changes/edit/priced")
        await expect(t.page.locator("#f-pricing")).to_have_value(
            "* input=0.15 output=0.60\nm-big input=2.50 cached_input=1.25"
        )
        await expect(t.page.locator("#f-budget")).to_have_value("200.50")
        await t.page.fill("#f-pricing", "* input=0.20")
        await t.page.select_option("#f-budget-period", "week")
        await t.page.uncheck("#f-protocols-chat")
        await t.page.uncheck("#f-protocols-completions")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Saved priced: commit")
        assert json.loads(writes[-1].post_data or "{}") == {
            "pricing": {
                "m-big": None,
                "*": {"input": "0.20", "output": None, "cached_input": None, "cache_write": None},
            },
            "budget": {"usd": "200.50", "period": "week"},
            "protocols": None,
        }
        await expect(t.page.locator("#f-pricing")).to_have_value("* input=0.20")
    written = yaml.safe_load((world.project.providers / "priced.yaml").read_text())
    assert written["pricing"] == {"*": {"input": "0.20"}} or written["pricing"] == {"*": {"input": 0.2}}
    assert "protocols" not in written and written["budget"]["period"] == "week"


async def test_a_route_set_through_the_form_is_a_commit_with_if_match(browser: Browser, world: World) -> None:
    puts: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: puts.append(r) if r.method == "PUT" else None)
        await t.open("#/changes/route/chat", WRITER)
        await expect(t.page.locator("#f-primary-0")).to_have_value("gpu")
        await expect(t.page.locator("#f-weight-0")).to_have_value("3")
        await expect(t.page.locator("#f-fallbacks-0")).to_have_value("evil")
        await t.page.click("text=Add a fallback")
        await t.page.fill("#f-fallbacks-1", "nowhere")
        await t.page.click("button.primary:text('Save the chat route')")
        # `purposes.chat.fallbacks.1` is shown on that row, and nothing is written.
        rows = t.page.locator("#route-fallbacks li")
        await expect(rows.nth(1).locator(".field-problem")).to_contain_text("nowhere")
        await expect(rows.nth(0).locator(".field-problem")).to_have_text("")
        await t.page.fill("#f-fallbacks-1", "backup")
        await t.page.click("button.primary:text('Save the chat route')")
        await expect(t.page.locator("text=Saved the chat route: commit")).to_be_visible()
    assert git(world.root, "log", "-1", "--format=%s") == "update routing chat"
    sent = json.loads(puts[-1].post_data or "{}")
    assert sent == {"primary": ["gpu"], "weights": {"gpu": 3}, "fallbacks": ["evil", "backup"]}
    assert puts[-1].headers["if-match"].removeprefix("W/").startswith('"')


# -- what the page must not do ------------------------------------------------------------------------


async def test_markup_and_control_characters_from_files_are_shown_as_text(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers/evil", ADMIN)
        shown = EVIL_NAME.replace("\u202e", "\\u{202E}").replace("\x1b", "\\u{001B}")
        await expect(t.page.locator("h1")).to_have_text(f"evil {shown}")
        await expect(t.page.locator("dd", has_text="<script>")).to_have_text("<script>alert(2)</script>")
        await t.open("#/providers")
        await expect(t.page.locator("tr[data-id=evil]")).to_contain_text("<img src=x onerror=alert(1)>")
        await t.open("#/overview")
        await expect(t.page.locator("table.refused")).to_contain_text(f"providers.d/{EVIL_FILE}")
        await t.open("#/events")
        await t.page.locator(".event[data-type='provider.added']", has_text="evil").locator("summary").click()
        await expect(t.page.locator(".event td.new", has_text="onerror").first).to_be_visible()
        # No element was made from the data: the only images are the page's own icon.
        sources = await t.page.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
        assert all(re.fullmatch(r"v/[0-9a-f]+/icon\.svg", s or "") for s in sources), sources
        assert await t.page.locator("script").count() == 1
    # Watched.check() (leaving the block) fails on any dialog, such as alert(1).


async def test_a_read_only_token_is_offered_no_write_and_told_why(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers/gpu", READER)
        await expect(t.page.locator("#nav .nav-off")).to_have_text(
            ["Changes (needs config:write)", "Usage (needs usage:read)"]
        )
        await expect(t.page.locator("#nav a[data-page=changes]")).to_have_count(0)
        await expect(t.page.locator(".actions")).to_contain_text("Test needs the scope admin")
        await expect(t.page.locator(".actions")).to_contain_text("Editing needs the scope config:write")
        await expect(t.page.locator("#test")).to_have_count(0)
        await t.open("#/changes/new")
        await expect(t.page.locator("main .note")).to_contain_text("needs the scope config:write")
        await expect(t.page.locator("main form, main input, main button")).to_have_count(0)
        await t.open("#/events")
        await expect(t.page.locator("main .note")).to_contain_text("admin tokens only")


async def test_a_thousand_providers_page_and_one_is_found_by_its_id(
    browser: Browser, sops_project: SopsProject
) -> None:
    for n in range(120):
        server(sops_project, f"p{n:04d}", f"http://10.0.{n // 250}.{n % 250}:8000/v1")
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.open("#/providers")
        await expect(t.page.locator("#providers-summary")).to_have_text("Showing 1\u201350 of 120")
        await t.page.click("text=Next")
        await expect(t.page.locator("#providers-summary")).to_have_text("Showing 51\u2013100 of 120")
        await expect(t.page.locator("table.providers tbody tr").first).to_have_attribute("data-id", "p0050")
        await t.page.fill("#filter", "p0117")
        await expect(t.page.locator("table.providers tbody tr")).to_have_count(1)
        await t.page.click("th button:text('Provider')")  # sort by id, descending
        await t.page.fill("#filter", "")
        await expect(t.page.locator("table.providers tbody tr").first).to_have_attribute("data-id", "p0119")
        # A live update redraws the table and keeps the keyboard focus where it was.
        await t.page.focus("tr[data-id=p0117] a")
        server(sops_project, "p0120", "http://10.0.9.9:8000/v1")
        await expect(t.page.locator("#providers-summary")).to_have_text("Showing 1\u201350 of 121")
        assert await t.page.evaluate("document.activeElement.textContent") == "p0117"
        # Keyboard: the filter, the sort buttons and the pager are reachable with Tab.
        await t.page.focus("#filter")
        focused = []
        for _ in range(4):
            await t.page.keyboard.press("Tab")
            focused.append(
                await t.page.evaluate("document.activeElement.id || document.activeElement.textContent")
            )
        assert focused[:2] == ["kind", "health"]


async def test_a_narrow_window_lays_the_table_out_as_cards(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.page.set_viewport_size({"width": 380, "height": 800})
        await t.open("#/providers", READER)
        row = t.page.locator("tr[data-id=gpu]")
        await expect(row).to_be_visible()
        width = await t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 380, "nothing wider than the window"
        # Read in one step inside the page: the table may be drawn again (a pushed change) between
        # a locator's finding the cell and a later evaluate, and a detached cell has no style.
        label = await t.page.wait_for_function(
            """() => {
                const td = document.querySelector("tr[data-id=gpu] td[data-label=Kind]");
                const content = td && td.isConnected ? getComputedStyle(td, "::before").content : "";
                return content && content !== "none" ? content : null;
            }"""
        )
        assert await label.json_value() == '"Kind"'
