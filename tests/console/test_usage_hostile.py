"""The console's Usage page (docs/reference.md §10, §13) attacked, in Debian's Chromium.

A ledger (written directly, as a shared PostgreSQL ledger could hold it) with thousands of
clients and models, names made of markup that would set `window.__pwned`, bidi and control
characters, a name of 100,000 characters, and amounts that a float sum gets wrong; a clients
file of hundreds of clients, each with limits and a budget, one budget written `1e3`. The page
must run none of it, show every name as text (invisible characters as escapes), stay bounded
(the top few, then "others" / "and N more"), and show money exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from playwright.async_api import Browser, expect

from service.http.context import LEDGER
from tests.conftest import AgeIdentity, Service, eventually, git, serve, write_atomically
from tests.console.test_hostile import call
from tests.support.browser import isolated, module_project, server, tab
from tests.usage.conftest import record

API = "/api/v1/llm-config"
OPS = "sb_usage_hostile_ops_1a2b3c4d5e6f"
METER = "sb_usage_hostile_meter_6f5e4d3c2b1a"
"""A token with usage:read alone: no config:read (no event stream, no configuration)."""
PWN = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=1</script>",
    "<svg><script>window.__pwned=1</script></svg>",
    '"><svg onload="window.__pwned=1">',
    "</title><img src=x onerror=window.__pwned=1>",
]
BIDI = "\u202eevil\u202c\u200b\u0007bell"
HUGE = "H" * 100_000
MANY = 3_000
LIMITED = 250

pytestmark = pytest.mark.timeout(120)


def _clients(project_root: Path) -> None:
    def entry(name: str, token: str, scopes: list[str], limits: dict[str, object]) -> dict[str, object]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return {"name": name, "token_sha256": digest, "scopes": scopes, "limits": limits}

    clients = [
        entry(
            "ops",
            OPS,
            ["config:read", "usage:read"],
            {"rpm": 1000, "budget": {"usd": "1e3", "period": "day"}},
        ),
        entry("meter", METER, ["usage:read"], {}),
    ]
    clients += [
        entry(
            f"c{i:04d}",
            f"sb_token_{i:04d}_abcdefghijkl",
            ["completions"],
            {"rpm": 10 + i, "budget": {"usd": "0", "period": "week"}},
        )
        for i in range(LIMITED)
    ]
    (project_root / "providers.d" / "clients.yaml").write_text(
        yaml.safe_dump({"kind": "clients", "clients": clients})
    )


@dataclass
class World:
    service: Service


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, age_identity: AgeIdentity, _isolated_home: Path
) -> AsyncIterator[World]:
    with isolated(_isolated_home):
        project = module_project(tmp_path_factory.mktemp("usage-hostile") / "project", age_identity)
        git(project.root, "init", "-q", "-b", "main")
        (project.root / ".gitignore").write_text("var/\n")
        budget = {"usd": "999999999999.999999999999", "period": "month"}
        server(project, "gpu", "http://127.0.0.1:9/v1", pricing={"*": {"input": "1"}}, budget=budget)
        routing = {"kind": "routing", "purposes": {"chat": {"primary": ["gpu"]}}}
        write_atomically(project.providers / "routing.yaml", json.dumps(routing))
        _clients(project.root)
        git(project.root, "add", "-A")
        git(project.root, "commit", "-qm", "a hostile world")
        async with serve(project) as service:
            ledger = service.app[LEDGER]
            now = datetime.now(UTC)
            names = [*PWN, BIDI, HUGE]
            for i, name in enumerate(names):
                ledger.submit(
                    record(id=f"h-{i}", ts=now, client=name, model=name, provider="gpu", cost_usd=Decimal(1))
                )
            for i in range(MANY):
                ledger.submit(
                    record(id=f"m-{i}", ts=now, client=f"many-{i}", model=f"model-{i}", provider="gpu")
                )
            for i, cost in enumerate(("0.1", "0.2")):  # 0.1 + 0.2 is 0.30000000000000004 in a float
                ledger.submit(
                    record(id=f"p-{i}", ts=now, client="pennies", model="pennies", cost_usd=Decimal(cost))
                )
            total = len(names) + MANY + 2

            async def recorded() -> None:
                status, body = await service.get(f"{API}/usage", OPS)
                assert status == 200 and int(body["totals"]["requests"]) == total, body

            await eventually(recorded, timeout=30)
            yield World(service)


async def test_names_from_the_ledger_run_nothing_and_are_shown_as_text(
    browser: Browser, world: World
) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", OPS)
        page = t.page
        clients = page.locator("#top-clients + table")
        await expect(clients).to_be_visible()
        for by in ("client", "model", "provider"):
            await page.select_option("#usage-by", by)
            await expect(page.locator(".usage-chart h2")).to_contain_text(f"by {by}")
            await expect(page.locator(".usage-chart .legend li").first).to_be_visible()
        text = await page.locator("main").inner_text()
        for name in PWN:
            assert name in text, name
        assert "\\u{202E}evil\\u{202C}\\u{200B}\\u{0007}bell" in text
        assert "\u202e" not in text and "\u0007" not in text
        assert "more characters" in text and HUGE[:3000] not in text
        # Tooltips (SVG <title>) are text too.
        titles = await page.locator("svg.chart title").all_text_contents()
        assert titles and all("\u202e" not in s and len(s) < 1_000 for s in titles)
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator("main script, main [onerror], main [onload], main img").count() == 0
        height = await page.evaluate("document.documentElement.scrollHeight")
        assert height < 10_000, height


async def test_thousands_of_clients_and_models_stay_the_top_few(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        started = time.monotonic()
        await t.open("#/usage", OPS)
        page = t.page
        legend = page.locator(".usage-chart .legend li")
        await expect(legend.last).to_contain_text("others")
        print(f"usage page with {MANY} clients drawn in {time.monotonic() - started:.2f} s")
        assert await legend.count() == 9  # 8 series and the others
        assert await page.locator("#top-clients + table tbody tr").count() == 10
        await expect(page.locator(".usage-tops")).to_contain_text(f"and {MANY + len(PWN) + 3 - 10:,} more")
        # The budgets: the closest to theirs first (the clients with 0), then "and N more".
        budgets = page.locator("table.budgets tbody tr")
        await expect(budgets).to_have_count(20)
        await expect(page.locator(".budgets-more")).to_contain_text(f"and {LIMITED + 2 - 20:,} more")
        await expect(page.locator(".limits-more")).to_contain_text(f"and {LIMITED + 1 - 10:,} more")
        assert await page.locator("#hits-title ~ table").last.locator("tbody tr").count() == 10
        assert await page.locator("tr").count() < 100


async def test_money_is_exact_and_absurd_budgets_are_read(browser: Browser, world: World) -> None:
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", OPS)
        page = t.page
        # 0.1 + 0.2, added as exact decimals (a float sum shows 0.30000000000000004).
        await expect(page.locator("#top-models + table tbody tr[data-name=pennies]")).to_contain_text("$0.30")
        assert "0.30000000000000004" not in await page.content()
        # A tick of a chart of tiny amounts is digits, never `$1.0e-7`.
        assert await call(page, "chart.js", "compact", 1e-7, True) == "$0.0000001"
        ticks = await page.locator(".usage-chart svg text.tick").all_text_contents()
        assert ticks and not [tick for tick in ticks if "e-" in tick or "e+" in tick], ticks
        # A budget written 1e3 is $1,000.00 (it was answered 1E+3 and shown as $0.00, exhausted).
        ops = page.locator("table.budgets tr[data-name=ops]")
        # ops is not among the 20 closest to their budget (250 clients have a budget of 0): asked directly.
        status, limits = await world.service.get(f"{API}/limits", OPS)
        assert status == 200
        ops_limits = next(c for c in limits["clients"] if c["name"] == "ops")
        assert ops_limits["limits"]["budget"]["usd"] == "1000"
        assert await ops.count() == 0
        gpu = next(p for p in limits["providers"] if p["id"] == "gpu")
        assert gpu["limits"]["budget"]["usd"] == "999999999999.999999999999"
        # The page reads amounts in any notation, exactly.
        for text, shown in (
            ("1E+3", "$1,000.00"),
            ("1e-7", "$0.0000001"),
            ("0E-12", "$0.00"),
            ("999999999999.999999999999", "$999,999,999,999.999999999999"),
            ("0.1", "$0.10"),
        ):
            assert await call(page, "chart.js", "usd", text) == shown, text
        assert await page.evaluate("window.__pwned") is None


async def test_a_token_with_usage_read_alone_sees_the_usage_page_and_nothing_else(
    browser: Browser, world: World
) -> None:
    status, body = await world.service.get(f"{API}/whoami", METER)
    assert status == 200, body
    async with tab(browser, world.service.url) as t:
        await t.open("#/usage", METER)
        page = t.page
        await expect(page.locator("#top-clients + table tbody tr")).to_have_count(10)
        await expect(page.locator("table.budgets tbody tr")).to_have_count(20)
        await expect(page.locator("#nav")).to_contain_text("Overview (needs config:read)")
        assert not [u for u in t.api_requests() if "/events" in u or "/providers" in u]
        assert await page.evaluate("window.__pwned") is None
