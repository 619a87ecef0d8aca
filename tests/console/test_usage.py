"""The console's Usage page (docs/reference.md §10, §13) in Debian's Chromium, on a real ledger.

A real service with a priced provider, clients with limits and a budget, and requests driven
through the gateway to a stand-in upstream: the records the page draws are the ledger's own.
Two records are written to the ledger directly, as a shared PostgreSQL ledger could hold them:
a client named with markup, and amounts too large for a float. The page must draw the charts,
the budgets and the limit hits, show every name as text, and say so when the ledger is down.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from playwright.async_api import Browser, expect

from service.http.context import LEDGER
from tests.conftest import AgeIdentity, Service, SopsProject, eventually, git, serve, write_atomically
from tests.support.browser import isolated, module_project, server, tab
from tests.support.upstreams import FakeUpstream
from tests.usage.conftest import record

API = "/api/v1/llm-config"
OPS = "sb_usage_console_ops_5a4b3c2d1e0f"
BATCH = "sb_usage_console_batch_0f1e2d3c4b5a"
READER = "sb_usage_console_reader_9a8b7c6d5e4f"
EVIL_CLIENT = "<img src=x onerror=alert(1)>"
EVIL_MODEL = "<svg/onload=alert(2)>"
HUGE_COST = Decimal("999999.999999")
"""Near the most a record may cost (the ledger holds a record to $1,000,000); three add up past
what a float keeps exactly at this scale."""

DAILY = {"usd": "10", "period": "day"}

pytestmark = pytest.mark.timeout(90)


def clients_file(project: SopsProject, with_reader: bool = True) -> None:
    def entry(name: str, token: str, scopes: list[str], limits: dict[str, object] | None = None) -> dict:
        found: dict[str, object] = {
            "name": name,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            "scopes": scopes,
        }
        return found | ({"limits": limits} if limits else {})

    clients = [
        entry("ops", OPS, ["config:read", "usage:read", "completions"], {"rpm": 1000, "budget": DAILY}),
        entry("batch", BATCH, ["completions"], {"rpm": 2}),
    ]
    if with_reader:
        clients.append(entry("reader", READER, ["config:read"]))
    (project.providers / "clients.yaml").write_text(yaml.safe_dump({"kind": "clients", "clients": clients}))


@dataclass
class World:
    service: Service
    project: SopsProject

    async def chat(self, token: str, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "count the words in this prompt"}]}
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{self.service.url}/v1/chat/completions"
        async with self.service.http.post(url, json=body, headers=headers) as r:
            await r.read()
            return r.status

    async def requests_recorded(self) -> int:
        status, body = await self.service.get(f"{API}/usage", OPS)
        assert status == 200, body
        return int(body["totals"]["requests"])


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, age_identity: AgeIdentity, _isolated_home: Path
) -> AsyncIterator[World]:
    with isolated(_isolated_home):
        project = module_project(tmp_path_factory.mktemp("usage") / "project", age_identity)
        async with FakeUpstream(name="gpu") as gpu:
            git(project.root, "init", "-q", "-b", "main")
            (project.root / ".gitignore").write_text("var/\n")
            pricing = {"*": {"input": "1000", "output": "2000"}}
            server(project, "gpu", gpu.base_url, pricing=pricing, budget={"usd": "500", "period": "month"})
            routing = {"kind": "routing", "purposes": {"chat": {"primary": ["gpu"]}}}
            write_atomically(project.providers / "routing.yaml", json.dumps(routing))
            clients_file(project)
            git(project.root, "add", "-A")
            git(project.root, "commit", "-qm", "a priced world")
            async with serve(project) as service:
                world = World(service, project)
                statuses = [await world.chat(OPS, "m-one") for _ in range(3)]
                statuses.append(await world.chat(OPS, EVIL_MODEL))  # no models list: any name goes
                # rpm 2: the third is refused
                statuses += [await world.chat(BATCH, "m-two") for _ in range(3)]
                assert statuses == [200] * 6 + [429], statuses
                ledger = service.app[LEDGER]
                now = datetime.now(UTC)
                evil = record(id="evil-1", ts=now, client=EVIL_CLIENT, model=EVIL_MODEL, provider="gpu")
                ledger.submit(evil)
                for i in range(3):
                    ledger.submit(
                        record(
                            id=f"huge-{i}",
                            ts=now,
                            client="whale",
                            provider="gpu",
                            prompt_tokens=10**14,
                            completion_tokens=10**14,
                            cost_usd=HUGE_COST,
                        )
                    )

                async def all_recorded() -> None:
                    assert await world.requests_recorded() == 11

                await eventually(all_recorded, timeout=10)
                yield world


async def test_the_usage_page_draws_charts_budgets_and_limit_hits_from_the_ledger(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", OPS)
        page = t.page
        await expect(page.locator("h1")).to_have_text("Usage")
        # The chart: cost per day, stacked by client; each client in the legend, as text.
        chart = page.locator(".usage-chart")
        await expect(chart.locator("h2")).to_have_text("Cost by client, per day")
        assert await chart.locator("svg.chart rect.bar").count() >= 3
        legend = chart.locator(".legend li")
        await expect(legend).to_have_count(4)  # whale, ops, batch, the markup one
        await expect(legend.filter(has_text=EVIL_CLIENT)).to_have_count(1)
        # The totals: the whale's cost exactly, never through a float.
        await expect(page.locator(".cards")).to_contain_text("$3,000,000.")
        await expect(page.locator(".cards")).to_contain_text("Refused by a limit")
        # Top clients and models, the markup among them as text.
        clients = page.locator("#top-clients + table tbody tr")
        await expect(clients.first).to_contain_text("whale")
        await expect(clients.first).to_contain_text("$2,999,999.999997")
        await expect(clients.first).to_contain_text("600,000,000,000,000")
        await expect(page.locator("#top-models + table")).to_contain_text(EVIL_MODEL)
        await expect(page.locator("#top-clients + table")).to_contain_text(EVIL_CLIENT)
        # Tokens stacked by model.
        await page.select_option("#usage-measure", "tokens")
        await page.select_option("#usage-by", "model")
        await expect(chart.locator("h2")).to_have_text("Tokens by model, per day")
        await expect(chart.locator(".legend")).to_contain_text("m-one")
        await expect(chart.locator(".legend")).to_contain_text(EVIL_MODEL)
        # Budgets: spent / reserved / left, the client's and the provider's, from …/limits.
        ops = page.locator("table.budgets tr[data-name=ops]")
        await expect(ops).to_contain_text("$10.00 / day")
        spent = await ops.locator(".spent").text_content()
        left = await ops.locator(".left").text_content()
        assert spent and spent != "$0.00" and left and left != "$10.00", (spent, left)
        assert await ops.locator("svg.meter rect.meter-spent").count() == 1
        await expect(page.locator("table.budgets tr[data-name=gpu]")).to_contain_text("$500.00 / month")
        # Limit hits: batch was refused once (rpm 2), and its use now against its limits.
        hits = page.locator("table.hits tr[data-name=batch]")
        await expect(hits).to_contain_text("1")
        await expect(page.locator("#hits-title ~ table").last).to_contain_text("/ 2")
        # No element was made from the data: the only image is the page's own icon.
        sources = await page.locator("img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
        assert all(re.fullmatch(r"v/[0-9a-f]+/icon\.svg", s or "") for s in sources), sources
        assert await page.locator("svg[onload], [onerror]").count() == 0
    # Watched.check() (leaving the block) fails on any dialog, such as alert(1).


async def test_the_usage_page_follows_new_requests_without_a_reload(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", OPS)
        requests = t.page.locator(".cards .stat").filter(has_text="Requests").locator(".stat-value")
        await expect(requests).not_to_have_text("")
        before = int((await requests.text_content() or "0").replace(",", ""))
        assert await world.chat(OPS, "m-three") == 200
        await expect(requests).to_have_text(str(before + 1), timeout=15_000)
        await expect(t.page.locator(".usage-chart .legend")).to_contain_text("ops")


async def test_a_token_without_usage_read_is_not_offered_the_page(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", READER)
        await expect(t.page.locator("#nav")).to_contain_text("Usage (needs usage:read)")
        await expect(t.page.locator("main .note")).to_contain_text("needs the scope usage:read")
        assert not [u for u in t.api_requests() if "/usage" in u or "/limits" in u]


async def test_a_ledger_that_is_off_or_down_is_said_and_the_budgets_still_shown(
    browser: Browser, sops_project: SopsProject
) -> None:
    server(sops_project, "gpu", "http://127.0.0.1:9/v1", budget={"usd": "5", "period": "week"})
    clients_file(sops_project, with_reader=False)
    async with serve(sops_project, usage_db="off") as service, tab(browser, service.url) as t:
        await t.open("#/usage", OPS)
        status = t.page.locator(".usage-status .note")
        await expect(status).to_contain_text("unavailable (503 ledger_unavailable)")
        await expect(t.page.locator("table.budgets tr[data-name=gpu]")).to_contain_text("$5.00 / week")
        await expect(t.page.locator("table.budgets tr[data-name=ops] .left")).to_have_text("$10.00")
        # The browser logs each 503 as a failed resource: here the API working, not the page failing.
        await t.page.goto("about:blank")  # no poll after this
        t.watched.errors[:] = [e for e in t.watched.errors if "status of 503" not in e]


async def test_an_empty_ledger_says_so(browser: Browser, sops_project: SopsProject) -> None:
    clients_file(sops_project, with_reader=False)
    async with serve(sops_project) as service, tab(browser, service.url) as t:
        await t.open("#/usage", OPS)
        await expect(t.page.locator(".usage-chart")).to_contain_text("Nothing in this period.")
        await expect(t.page.locator("#top-clients ~ p")).to_have_text("No requests in this period.")
        await expect(t.page.locator("#hits-title ~ p").first).to_contain_text("No request was refused")
        assert await t.page.locator("svg.chart rect.bar").count() == 0
