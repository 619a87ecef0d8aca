"""The web console against a hostile reviewer (issue 12): what files, tokens and load try.

A provider file full of markup, control and invisible characters, a 20,000-character name and
3,000 models; a provider named `constructor`; tokens that may only read, only complete, were
revoked or were never tokens; links that are not URLs; problems the forms do not expect; a
burst of events and a restart under the page. Each test is a finding of that review (or what
held against it), against a real service, real sops and git, in Debian's Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.async_api import Browser, Page, Request, expect

from service.http.context import EVENTS
from service.journal.events import ProviderHealthChanged
from service.journal.log import EventLog
from tests.conftest import AgeIdentity, Service, SopsProject, eventually, git, serve, write_atomically
from tests.support.browser import isolated, module_project, server, tab
from tests.support.gateway import write_clients

API = "/api/v1/llm-config"
ADMIN = "sb_hostile_admin_0f1e2d3c4b5a6978"
READER = "sb_hostile_reader_8a7b6c5d4e3f2a1b"
WRITER = "sb_hostile_writer_1b2a3f4e5d6c7b8a"
COMPLETER = "sb_hostile_completer_5d4c3b2a1f0e9d8c"
VICTIM = "sb_hostile_victim_2c3d4e5f6a7b8c9d"
CLIENTS = {
    "admin": (ADMIN, ["config:read", "config:write", "admin", "completions"]),
    "reader": (READER, ["config:read"]),
    "writer": (WRITER, ["config:read", "config:write"]),
    "completer": (COMPLETER, ["completions"]),
    "victim": (VICTIM, ["config:read"]),
}
NOWHERE = "http://127.0.0.1:9/v1"
# Markup, a right-to-left override, a zero-width space, a tag character, a Hangul filler (blank
# in every font), an escape sequence and a bell: then 20,000 characters with nowhere to wrap.
EVIL_NAME = "<img src=x onerror=alert(1)>\u202e\u200b\U000e0041\u3164\x1b[31m\x07" + "A" * 20_000
EVIL_MODELS = [f"<b>m{n}</b>\u202e{'x' * 40}" for n in range(3000)]
EVIL_MAP = {
    "__proto__": "proto-target",
    "a=b": "c",
    " spaced ": " x ",
    "<img src=x onerror=alert(5)>": "javascript:alert(1)",
    "constructor": "k",
}

pytestmark = pytest.mark.timeout(60)


@dataclass
class World:
    service: Service
    project: SopsProject

    @property
    def root(self) -> Path:
        return self.project.root

    def head(self) -> str:
        return git(self.root, "rev-parse", "HEAD")

    def file(self, provider_id: str) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((self.project.providers / f"{provider_id}.yaml").read_text())
        return loaded

    def commit(self, message: str) -> None:
        git(self.root, "add", "-A")
        git(self.root, "commit", "-qm", message)

    async def request(
        self, method: str, path: str, token: str, body: Any = None, **headers: str
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}
        data = json.dumps(body) if body is not None else None
        async with self.service.http.request(method, self.service.url + path, data=data, headers=sent) as r:
            return r.status, await r.json()

    async def loaded(self, provider_id: str) -> None:
        await eventually(lambda: provider_id in self.service.registry.snapshot.providers, timeout=10)


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, age_identity: AgeIdentity, _isolated_home: Path
) -> AsyncIterator[World]:
    with isolated(_isolated_home):
        project = module_project(tmp_path_factory.mktemp("hostile") / "project", age_identity)
        git(project.root, "init", "-q", "-b", "main")
        (project.root / ".gitignore").write_text("var/\n")
        evil = {
            "kind": "ai_server",
            "id": "evil",
            "server_type": "vllm",
            "base_url": 'http://127.0.0.1:9/"><svg/onload=alert(6)>/' + "z" * 3000,  # a URL holds no space
            "name": EVIL_NAME,
            "models": EVIL_MODELS,
            "model_map": EVIL_MAP,
        }
        # YAML, not JSON: the characters as they are (JSON would escape them).
        write_atomically(project.providers / "evil.yaml", yaml.safe_dump(evil, allow_unicode=True))
        server(project, "gpu", NOWHERE, name="GPU box")
        server(project, "spare", NOWHERE)
        routing = {
            "kind": "routing",
            "purposes": {"chat": {"primary": ["gpu"], "fallbacks": ["spare", "evil"]}},
        }
        write_atomically(project.providers / "routing.yaml", json.dumps(routing))
        write_clients(project, CLIENTS)
        git(project.root, "add", "-A")
        git(
            project.root,
            "-c",
            "user.name=<img src=x onerror=alert(7)>\u202e",
            "commit",
            "-qm",
            "<script>alert(9)</script>",
        )
        async with serve(project) as service:
            yield World(service, project)


async def whoami_count(page: Page, during_s: float) -> int:
    asked: list[Request] = []
    page.on("request", lambda r: asked.append(r) if r.url.endswith("/whoami") else None)
    await asyncio.sleep(during_s)
    return len(asked)


# A page's script that imports the console's modules as the page does (`await load("dom.js")`).
LOAD = """
    const version = document.querySelector("script[type=module]").src.split("/v/")[1].split("/")[0];
    const load = (name) => import(new URL(`v/${version}/${name}`, location.href).href);
"""


async def call(page: Page, module: str, function: str, *args: Any) -> Any:
    """`function(...args)` of one of the console's modules, in the page."""
    return await page.evaluate(
        "async ([module, name, args]) => {" + LOAD + "return (await load(module))[name](...args); }",
        [module, function, list(args)],
    )


# -- the token -------------------------------------------------------------------------------------


async def test_signing_out_asks_for_a_token_once_and_keeps_what_is_typed(
    browser: Browser, world: World
) -> None:
    """Signing out used to start an endless loop of `whoami` (hundreds a second), redrawing the
    sign-in form each time: the service was flooded and nobody could type a token again."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/overview", READER)
        await t.live()
        shown = await t.page.evaluate(
            "document.documentElement.outerHTML + [...document.querySelectorAll('input')].map(i => i.value)"
        )
        assert READER not in shown  # in no attribute, text or field of the page
        await t.page.click("text=Sign out")
        await expect(t.page.locator("#token-problem")).to_have_text("Signed out.")
        assert await t.page.evaluate("sessionStorage.length + localStorage.length") == 0
        assert await whoami_count(t.page, 1.5) == 0
        await t.page.fill("#token", READER)
        await asyncio.sleep(0.3)
        await expect(t.page.locator("#token")).to_have_value(READER)
        await t.page.click("button[type=submit]")
        await expect(t.page.locator(".client")).to_have_text("reader")


@pytest.mark.parametrize("stored", ["sb_\u2019curly", "sb_line\nbreak", "  "])
async def test_a_token_in_the_tab_that_cannot_be_a_header_is_dropped(
    browser: Browser, world: World, stored: str
) -> None:
    """Not "the service cannot be reached" every 3 s forever: the tab asks for a token."""
    async with tab(browser, world.service.url) as t:
        await t.page.goto(f"{t.url}/ui/")
        await expect(t.page.locator("h1")).to_have_text("Sign in")
        await t.page.evaluate("token => sessionStorage.setItem('switchboard.token', token)", stored)
        await t.page.reload()
        await expect(t.page.locator("h1")).to_have_text("Sign in")
        assert await t.page.evaluate("sessionStorage.getItem('switchboard.token')") is None
        await t.page.fill("#token", "sb_\u2019typed")
        await t.page.click("button[type=submit]")
        await expect(t.page.locator("#token-problem")).to_have_text("The service does not know this token.")


async def test_a_completions_token_is_shown_nothing_of_the_configuration(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/overview", COMPLETER)
        await expect(t.page.locator("main .note")).to_contain_text("needs the scope config:read")
        for page in (
            "#/providers",
            "#/providers/gpu",
            "#/changes/edit/gpu",
            "#/changes/route/chat",
            "#/events",
        ):
            await t.page.goto(f"{t.url}/ui/{page}")
            await expect(t.page.locator("main .note")).to_contain_text("needs the scope")
            await expect(t.page.locator("main form, main input, main table")).to_have_count(0)
        assert not [url for url in t.api_requests() if not url.endswith("/whoami")]


WRITES = [
    ("POST", f"{API}/servers", {"id": "intruder", "server_type": "vllm", "base_url": NOWHERE}),
    ("PUT", f"{API}/servers/gpu", {"id": "gpu", "server_type": "vllm", "base_url": NOWHERE}),
    ("PATCH", f"{API}/servers/gpu", {"name": "taken over"}),
    ("DELETE", f"{API}/servers/spare", None),
    ("PUT", f"{API}/active/chat", {"primary": ["spare"]}),
    ("POST", f"{API}/active", {"purpose": "chat", "provider_id": "spare"}),
    ("POST", f"{API}/providers/gpu/test", {}),
    ("POST", f"{API}/servers/gpu/test", {}),
]


@pytest.mark.parametrize("token", [READER, COMPLETER], ids=["config-read", "completions"])
async def test_the_api_refuses_every_write_of_the_forms_to_a_token_without_the_scope(
    world: World, token: str
) -> None:
    """The console is only a client: were its forms shown to anyone, the API refuses them."""
    head = world.head()
    for method, path, body in WRITES:
        status, answer = await world.request(method, path, token, body, **{"If-Match": '"x"'})
        assert status == 403, (method, path, answer)
        assert token not in json.dumps(answer)
    assert world.head() == head


async def test_a_revoked_token_is_forgotten_and_asked_again_even_on_a_page_that_only_streams(
    browser: Browser, world: World
) -> None:
    """The Events page reads only the stream: the service must end a revoked client's stream,
    so the page hears its 401, forgets the token and asks once (no loop)."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/events", VICTIM)
        await t.live()
        remaining = {name: entry for name, entry in CLIENTS.items() if name != "victim"}
        write_clients(world.project, remaining)
        try:
            await expect(t.page.locator("#token-problem")).to_contain_text(
                "stopped accepting", timeout=10_000
            )
            assert await t.page.evaluate("sessionStorage.getItem('switchboard.token')") is None
            assert await whoami_count(t.page, 1.5) == 0
        finally:
            write_clients(world.project, CLIENTS)
            await eventually(lambda: _knows(world.service, "victim"), timeout=10)


def _knows(service: Service, name: str) -> bool:
    clients = service.registry.snapshot.clients
    return clients is not None and any(c.name == name for c in clients.clients)


async def test_the_console_and_every_answer_forbid_sniffing(world: World) -> None:
    """An error that quotes the request (`<script>` in a path) is JSON and says so firmly."""
    headers = {"Authorization": f"Bearer {READER}"}
    for path in (
        "/ui/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        f"{API}/providers/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        f"{API}/providers",
        "/metrics",
        "/openapi.json",
        "/nowhere/%3Cscript%3E",
    ):
        async with world.service.http.get(world.service.url + path, headers=headers) as response:
            assert response.headers.get("X-Content-Type-Options") == "nosniff", path


# -- what files say ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "character",
    [
        "\u202e",
        "\u2066",
        "\u200b",
        "\ufeff",
        "\x1b",
        "\x7f",
        "\U000e0041",
        "\u3164",
        "\u115f",
        "\ufe0f",
        "\u034f",
    ],
)
async def test_invisible_and_reordering_characters_are_shown_as_escapes(
    browser: Browser, world: World, character: str
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.page.goto(f"{t.url}/ui/")
        shown = await call(t.page, "dom.js", "clean", f"a{character}b")
        assert shown == f"a\\u{{{ord(character):04X}}}b"


async def test_a_huge_provider_file_keeps_every_page_usable(browser: Browser, world: World) -> None:
    """A 20,000-character name and 3,000 models made one table row 130,000 px tall (the pager
    out of reach) and cost seconds of layout on every live redraw; now long text is clipped,
    saying how much is left out, and a long list of models is summarised in the table."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers", READER)
        row = t.page.locator("tr[data-id=evil]")
        await expect(row).to_contain_text("<img src=x onerror=alert(1)>")

        async def short() -> bool:  # a live redraw may replace the row as it is measured: no box
            box = await row.bounding_box()
            return box is not None and box["height"] < 600

        await eventually(short, timeout=10)
        await expect(row.locator("[data-label=Models]")).to_contain_text("2,990 more")
        await expect(row.locator("[data-label=Provider]")).to_contain_text("more characters")
        await expect(t.page.locator("#page-next")).to_be_in_viewport()
        for route, title in (
            ("#/overview", "Overview"),
            ("#/providers/evil", "evil"),
            ("#/events?subject=evil", "Events"),
        ):
            await t.page.goto(f"{t.url}/ui/{route}")
            await expect(t.page.locator("h1")).to_contain_text(title)
            await expect(t.page.locator("main")).to_contain_text("<img src=x onerror=alert(1)>")
            height = await t.page.evaluate("document.documentElement.scrollHeight")
            assert height < 10_000, (route, height)
        h1 = t.page.locator("h1")
        await t.page.goto(f"{t.url}/ui/#/providers/evil")
        await expect(h1).to_contain_text("more characters")
        assert (await h1.bounding_box() or {"height": 1e9})["height"] < 1_000
        sources = await t.page.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
        assert all(s and s.endswith("/icon.svg") for s in sources), sources


# -- the forms -------------------------------------------------------------------------------------


async def test_an_edit_sends_only_what_the_operator_changed(browser: Browser, world: World) -> None:
    """A model_map key with `=`, `__proto__` or spaces, models and a name with characters an
    input cannot hold: an edit of another field must not rewrite them (it did, silently)."""
    patches: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: patches.append(r) if r.method == "PATCH" else None)
        await t.open("#/changes/edit/evil", WRITER)
        await expect(t.page.locator("#f-models")).not_to_have_value("")
        await t.page.click("#f-purposes-reranking")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Saved evil: commit")
        assert json.loads(patches[-1].post_data or "{}") == {"purposes": ["chat", "reranking"]}
        written = world.file("evil")
        assert written["model_map"] == EVIL_MAP
        assert written["models"] == EVIL_MODELS and written["name"] == EVIL_NAME
        # Saved again with nothing changed since: nothing is sent.
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done")).to_contain_text("Nothing changed")
        assert len(patches) == 1


async def test_a_model_map_line_removed_in_the_form_is_removed_from_the_file(
    browser: Browser, world: World
) -> None:
    """A merge patch merges objects: the removed alias has to be sent as null, or it stays."""
    server(world.project, "mapped", NOWHERE, model_map={"fast": "m-1", "slow": "m-2"})
    world.commit("mapped")
    await world.loaded("mapped")
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/mapped", WRITER)
        await expect(t.page.locator("#f-model_map")).to_have_value("fast = m-1\nslow = m-2")
        await t.page.fill("#f-model_map", "fast = m-3")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Saved mapped: commit")
        await expect(t.page.locator("#f-model_map")).to_have_value("fast = m-3")
    assert world.file("mapped")["model_map"] == {"fast": "m-3"}


async def test_a_problem_of_another_file_is_not_shown_beside_a_field_of_this_one(
    browser: Browser, world: World
) -> None:
    """Disabling `gpu`, which routing names: the problem is routing.yaml's (path
    `purposes.chat.primary.0`), not this file's `purposes` field."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/gpu", WRITER)
        await expect(t.page.locator("#f-name")).to_have_value("GPU box")
        await t.page.click("#f-enabled")
        await t.page.click("button.primary:text('Save changes')")
        general = t.page.locator("form.change .form-problems")
        await expect(general).to_contain_text("providers.d/routing.yaml")
        await expect(general).to_contain_text("disabled")
        await expect(t.page.locator("[data-field=purposes] .field-problem")).to_have_text("")


async def test_a_problem_of_a_folded_field_is_shown(browser: Browser, world: World) -> None:
    """A timeout is in a folded section: its problem used to land there, unseen."""
    before = world.head()
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/spare", WRITER)
        await expect(t.page.locator("#f-timeout_s")).to_have_value("600")
        await t.page.locator("details.timeouts summary").click()
        await t.page.fill("#f-timeout_s", "0")
        await t.page.locator("details.timeouts summary").click()  # folded again
        await t.page.click("button.primary:text('Save changes')")
        problem = t.page.locator("[data-field=timeout_s] .field-problem")
        await expect(problem).to_contain_text("greater than 0")
        await expect(problem).to_be_visible()
        await expect(t.page.locator("#f-timeout_s")).to_be_focused()
    assert world.head() == before


async def test_a_reason_in_any_script_is_committed_as_typed(browser: Browser, world: World) -> None:
    """`café` went out as Latin-1 bytes and was committed `caf\ufffd` (the service reads UTF-8);
    anything past Latin-1 (`☕`, `日本語`) was refused by the form."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/spare", WRITER)
        await expect(t.page.locator("#f-timeout_s")).to_have_value("600")
        await t.page.fill("#f-name", "Spare box")
        await t.page.fill("#f-reason", " café crème ☕ 日本語\tok ")
        await t.page.click("button.primary:text('Save changes')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Saved spare: commit")
    assert git(world.root, "log", "-1", "--format=%b").splitlines()[0] == "café crème ☕ 日本語 ok"


async def test_a_delete_that_routing_forbids_says_why_and_writes_nothing(
    browser: Browser, world: World
) -> None:
    before = world.head()
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/gpu", WRITER)
        await t.page.click("text=Delete gpu…")
        await t.page.click("#confirm-delete")
        await expect(t.page.locator("section.change .form-problems")).to_contain_text("409")
        await expect(t.page.locator("section.change .form-problems")).to_contain_text("Nothing was written.")
        await expect(t.page.get_by_role("button", name="Delete gpu…")).to_be_focused()
    assert world.head() == before


async def test_in_branch_mode_a_write_says_which_branch_holds_it(
    browser: Browser, sops_project: SopsProject
) -> None:
    """202: committed to a branch for review, nothing applied; the page says so, not "Saved"."""
    git(sops_project.root, "init", "-q", "-b", "main")
    (sops_project.root / ".gitignore").write_text("var/\n")
    server(sops_project, "gpu", NOWHERE)
    write_clients(sops_project, {"writer": (WRITER, ["config:read", "config:write"])})
    git(sops_project.root, "add", "-A")
    git(sops_project.root, "commit", "-qm", "start")
    async with serve(sops_project, write_mode="branch") as service, tab(browser, service.url) as t:
        await t.open("#/changes/edit/gpu", WRITER)
        await expect(t.page.locator("#f-timeout_s")).to_have_value("600")
        await t.page.fill("#f-name", "reviewed first")
        await t.page.click("button.primary:text('Save changes')")
        done = t.page.locator(".done .ok")
        await expect(done).to_contain_text("Committed to the branch switchboard/update-gpu-1")
        await expect(done).to_contain_text("nothing is applied until it is merged")
        assert service.registry.snapshot.providers["gpu"].name is None


async def test_while_no_clients_file_loads_the_page_waits_then_asks(
    browser: Browser, sops_project: SopsProject
) -> None:
    """A clients file that does not load: every protected endpoint answers 503, so does
    `whoami`; the page says why and asks again until it loads, then asks for a token."""
    server(sops_project, "gpu", NOWHERE)
    clients = sops_project.providers / "clients.yaml"
    clients.write_text("kind: clients\nclients: [{name: broken}]\n")
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.page.goto(f"{t.url}/ui/")
        await expect(t.page.locator("h1")).to_have_text("The service cannot be reached")
        await expect(t.page.locator("main .problem")).to_contain_text("503")
        await expect(t.page.locator("main .problem")).to_contain_text("no valid clients file")
        write_clients(sops_project, {"reader": (READER, ["config:read"])})
        await expect(t.page.locator("h1")).to_have_text("Sign in", timeout=10_000)
        await t.page.fill("#token", READER)
        await t.page.click("button[type=submit]")
        await expect(t.page.locator(".client")).to_have_text("reader")
        # The browser logs each 503 as a failed resource: the service saying "not yet".
        t.watched.errors = [e for e in t.watched.errors if "status of 503" not in e]


async def test_no_other_origin_can_frame_the_console(browser: Browser, world: World) -> None:
    """frame-ancestors 'none' and X-Frame-Options: a page elsewhere cannot put the console
    under an invisible frame and have an operator click its buttons."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto("about:blank")
        await page.set_content(f'<iframe src="{world.service.url}/ui/"></iframe>')
        (frame,) = page.main_frame.child_frames
        await eventually(lambda: frame.url != "about:blank", timeout=10)
        assert frame.url == "chrome-error://chromewebdata/"  # refused: not the console
    finally:
        await context.close()


async def test_a_scope_taken_away_takes_its_page_away(browser: Browser, world: World) -> None:
    """The clients file narrows `writer` to config:read while its edit form is open: the save
    is refused (403, the API decides) and the page, asking `whoami` again, stops offering it."""
    before = world.head()
    async with tab(browser, world.service.url) as t:
        await t.open("#/changes/edit/spare", WRITER)
        await expect(t.page.locator("#f-timeout_s")).to_have_value("600")
        write_clients(world.project, {**CLIENTS, "writer": (WRITER, ["config:read"])})
        try:
            await eventually(lambda: not _may(world.service, "writer", "config:write"), timeout=10)
            await t.page.fill("#f-name", "not mine to change")
            await t.page.click("button.primary:text('Save changes')")
            await expect(t.page.locator("main .note")).to_contain_text("needs the scope config:write")
            await expect(t.page.locator("#nav .nav-off")).to_have_text(
                ["Changes (needs config:write)", "Usage (needs usage:read)"]
            )
            await expect(t.page.locator("main form")).to_have_count(0)
        finally:
            write_clients(world.project, CLIENTS)
            await eventually(lambda: _may(world.service, "writer", "config:write"), timeout=10)
    assert world.head() == before


async def test_a_token_that_may_write_but_not_read_is_offered_only_what_it_can_do(
    browser: Browser, sops_project: SopsProject
) -> None:
    """config:write without config:read: a new provider needs nothing read, but an edit, a
    delete or a route starts from what the service has (and its ETag), which this token may not
    read. Those forms are not offered, and the page says why; adding one still works."""
    server(sops_project, "gpu", NOWHERE)
    blind = "sb_hostile_blind_writer_6e5d4c3b2a19"
    write_clients(sops_project, {"blind": (blind, ["config:write"])})
    git(sops_project.root, "init", "-q", "-b", "main")
    (sops_project.root / ".gitignore").write_text("var/\n")
    git(sops_project.root, "add", "-A")
    git(sops_project.root, "commit", "-qm", "a blind writer")
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.open("#/changes/new", blind)
        await expect(t.page.locator("#nav a[data-page=changes]")).to_have_count(1)
        for page in ("#/changes/edit/gpu", "#/changes/route/chat"):
            await t.page.goto(f"{t.url}/ui/{page}")
            await expect(t.page.locator("main .note")).to_contain_text("needs the scope config:read")
            await expect(t.page.locator("main form, main input, main select")).to_have_count(0)
        await expect(t.page.locator("main nav.tabs a")).to_have_count(1)  # "Add a provider" alone
        await t.page.click("main nav.tabs a")
        await t.page.click("#f-kind-ai_server")
        await t.page.fill("#f-id", "added-blind")
        await t.page.fill("#f-base_url", NOWHERE)
        await t.page.click("button.primary:text('Create provider')")
        await expect(t.page.locator(".done .ok")).to_contain_text("Created added-blind: commit")
        assert git(sops_project.root, "log", "-1", "--format=%s") == "create ai_server added-blind"
        forbidden = [url for url in t.api_requests() if "/servers/gpu" in url or "/active/" in url]
        assert forbidden == []


def _may(service: Service, name: str, scope: str) -> bool:
    clients = service.registry.snapshot.clients
    return clients is not None and any(c.name == name and scope in c.scopes for c in clients.clients)


# -- what links and ids say ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route",
    [
        "#/providers/%E0%A4%A",
        "#/events?subject=%E0",
        "#/changes/edit/%",
        "#/changes/edit/..",
        "#/providers/..",
    ],
)
async def test_a_link_that_is_not_well_encoded_still_shows_a_page(
    browser: Browser, world: World, route: str
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/overview", READER)
        await t.page.goto(f"{t.url}/ui/{route}")
        await expect(t.page.locator("main h1")).to_be_visible()
    # Leaving the block fails the test on an uncaught exception (it was a URIError).


async def test_a_provider_named_constructor_is_a_provider_like_any_other(
    browser: Browser, world: World
) -> None:
    """`constructor` is a valid id and also a property of every JavaScript object: a lookup
    by id must not find Object's (a crash of the table, `function Object()` as a weight in the log)."""
    async with tab(browser, world.service.url) as t:
        await t.open("#/providers?q=constructor", READER)
        await t.live()
        # Traffic read before the provider was added, as the page may hold it for a moment.
        status, before = await world.request("GET", f"{API}/traffic", READER)
        assert status == 200 and "constructor" not in before["providers"]
        await t.page.route("**/llm-config/traffic", lambda route: route.fulfill(json=before))
        server(world.project, "constructor", NOWHERE)
        world.commit("constructor")
        row = t.page.locator("tr[data-id=constructor]")
        await expect(row.locator("[data-label=Requests]")).to_have_text("0")
        await expect(row.locator("[data-label=Tokens]")).to_have_text("0")
        routing = {
            "kind": "routing",
            "purposes": {"chat": {"primary": ["gpu", "constructor"], "weights": {"gpu": 2}}},
        }
        write_atomically(world.project.providers / "routing.yaml", json.dumps(routing))
        world.commit("route to constructor")
        await t.page.goto(f"{t.url}/ui/#/events?subject=routing")
        change = t.page.locator(".event[data-type='routing.updated'] td.new").first
        await expect(change).to_have_text("gpu \u00d72, constructor")
        await t.page.goto(f"{t.url}/ui/#/providers/constructor")
        await expect(t.page.locator("dt:text-is('Tokens') + dd")).to_have_text("0")


# -- load and failure ------------------------------------------------------------------------------


async def test_a_burst_of_events_arrives_once_each_and_the_page_keeps_answering(
    browser: Browser, world: World
) -> None:
    """3,000 events at once: the service closes the stream, 256 behind, the page resumes
    from the log with `Last-Event-ID` and shows each event once, and typing still answers."""
    streams: list[Request] = []
    async with tab(browser, world.service.url) as t:
        t.page.on("request", lambda r: streams.append(r) if "/llm-config/events" in r.url else None)
        await t.open("#/events?subject=burst", READER)
        await t.live()
        log = world.service.app[EVENTS]
        for n in range(3000):  # on the loop: every one is offered before the stream may send any
            log.append(ProviderHealthChanged(subject="burst", reason=f"<i>{n}</i>"))
        summary = t.page.locator("main .help[role=status]")
        await expect(summary).to_contain_text("3,000 events matching", timeout=20_000)
        assert len(streams) >= 2 and "last-event-id" in streams[-1].headers
        shown = await t.page.locator(".timeline .event").evaluate_all("els => els.map(e => e.dataset.seq)")
        assert len(shown) == len(set(shown)) == 100
        await t.page.fill("#event-subject", "gpu")
        await expect(summary).not_to_contain_text("3,000", timeout=2_000)


async def test_a_long_log_is_kept_within_bounds_without_freezing_the_page(
    browser: Browser, world: World
) -> None:
    """The timeline keeps the newest 50,000 events and 64 MiB of their JSON. Past 50,000 it
    dropped the oldest one at a time, moving the whole array for each event: reading a log of
    150,000 took 21 s of the page's only thread; and a few thousand events of huge files
    (a 1 MiB file changed, twice its size in an event) were all kept."""
    async with tab(browser, world.service.url) as t:
        await t.page.goto(f"{t.url}/ui/")
        kept = await t.page.evaluate(
            "async () => {"
            + LOAD
            + """
                const store = new (await load("store.js")).Store({});
                const started = performance.now();
                for (let seq = 1; seq <= 150000; seq++) {
                    store.arrived({ seq, type: "provider.health_changed", subject: `p${seq % 1000}` }, 200);
                }
                const ms = performance.now() - started;
                const count = store.events.length;
                for (let seq = 150001; seq <= 150200; seq++) {
                    store.arrived({ seq, type: "provider.updated", subject: "huge" }, 2 * 1024 * 1024);
                }
                const seqs = store.events.map((e) => e.seq);
                return { ms, count, chars: store.chars, seqs: [seqs[0], seqs.at(-1), seqs.length] };
            }"""
        )
    assert kept["ms"] < 3_000, kept
    assert 50_000 <= kept["count"] <= 55_000
    assert kept["chars"] <= 64 * 2**20
    first, last, count = kept["seqs"]
    assert last == 150_200 and last - first + 1 == count


@pytest.mark.timeout(120)
async def test_a_thousand_providers_and_ten_thousand_events_stay_usable(
    browser: Browser, sops_project: SopsProject
) -> None:
    """Drawn within a second on this machine (3 s allowed for a busy CI), the log read in the
    background while the pages answer, and the tab's memory bounded."""
    for n in range(1000):
        server(sops_project, f"p{n:04d}", f"http://10.0.{n // 250}.{n % 250}:8000/v1", name=f"Box {n}")
    write_clients(sops_project, {"reader": (READER, ["config:read"])})
    log = EventLog(sops_project.root / "var" / "events.jsonl")
    for n in range(10_000):
        log.append(ProviderHealthChanged(subject=f"p{n % 1000:04d}", reason=f"<b>check {n}</b>"))
    log.close()
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.page.goto(f"{t.url}/ui/")
        await t.page.fill("#token", READER)
        started = time.perf_counter()
        await t.page.click("button[type=submit]")
        await expect(t.page.locator(".cards")).to_contain_text("1,000 enabled")
        overview = time.perf_counter() - started
        started = time.perf_counter()
        await t.page.click("a[data-page=providers]")
        await expect(t.page.locator("#providers-summary")).to_have_text("Showing 1\u201350 of 1,000")
        table = time.perf_counter() - started
        assert overview < 3 and table < 3, (overview, table)
        await t.page.fill("#filter", "p0999")
        await expect(t.page.locator("table.providers tbody tr")).to_have_count(1)
        await t.live()
        await t.page.click("a[data-page=events]")
        logged = len([e for e in service.events() if e.type not in ("secret.read", "clients.updated")])
        await expect(t.page.locator("main .help[role=status]")).to_have_text(f"{logged:,} events")
        heap = await t.page.evaluate("performance.memory.usedJSHeapSize")
        assert heap < 100 * 2**20, heap


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_the_page_rides_out_a_restart_of_the_service(
    browser: Browser, sops_project: SopsProject
) -> None:
    """The service stops under the page and comes back: the page says so, reconnects with
    `Last-Event-ID`, and shows every event once, the new ones too."""
    server(sops_project, "gpu", NOWHERE)
    write_clients(sops_project, {"reader": (READER, ["config:read"])})
    port = _free_port()
    async with tab(browser, f"http://127.0.0.1:{port}") as t:
        async with serve(sops_project, port=port):
            await t.open("#/events", READER)
            await t.live()
        await expect(t.page.locator("#live")).to_have_text("reconnecting")
        server(sops_project, "gpu", NOWHERE, name="while it was down")
        async with serve(sops_project, port=port) as service:
            await t.live()
            logged = [e.seq for e in service.events() if e.type not in ("secret.read", "clients.updated")]
            summary = t.page.locator("main .help[role=status]")
            await expect(summary).to_have_text(f"{len(logged)} events", timeout=15_000)
            shown = await t.page.locator(".timeline .event").evaluate_all(
                "els => els.map(e => Number(e.dataset.seq))"
            )
            assert sorted(shown, reverse=True) == shown and len(set(shown)) == len(shown)
            assert shown == sorted(logged, reverse=True)[: len(shown)]
            await expect(t.page.locator(".event[data-type='provider.updated']")).to_contain_text(
                "while it was down"
            )
        # The browser logs each request refused while the service was down, or answered 503
        # while it started again: the page retried.
        down = ("ERR_CONNECTION_REFUSED", "status of 503")
        t.watched.errors = [e for e in t.watched.errors if not any(d in e for d in down)]
