"""Benchmark of the web console (issue 12): 1,000 providers, rendered in a real browser.

    python -m bench.console                # 1,000 providers, 5 runs of each measure
    python -m bench.console --size 200 --runs 3

Builds (once, cached in bench/.cache/console-N/) a git repository of N provider files, as a
large deployment has them: nine in ten self-hosted servers in plaintext, one in ten vendor
keys encrypted by real sops, a routing file and a clients file. `switchboard serve` runs it
in its own process; Debian's Chromium (as the browser tests drive it) opens the console
signed in, in a fresh profile each run (nothing cached), and measures with the page's own
clock (`performance.now()`, from the start of the navigation):

- overview: until the three routes and the status cards, counting N providers, are drawn;
- providers: until the table's first page and its "of N" are drawn;
- filter: typing a whole id into the filter box, until the table shows that one provider;
- transfer: the bytes the browser received for the page (HTML, scripts, style, icon), as
  sent (gzip), and separately the API's JSON and the event log replayed by the stream;
- usage: until the Usage page has drawn its chart (30 days, stacked by client), the top
  clients and the budgets, on a ledger of 50 clients x 30 days (`--clients`, `--days`: a
  record per client and hour, written to the SQLite ledger before the service starts).

Only 127.0.0.1 is contacted. Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, Page, Request, async_playwright

from bench.config import CACHE, Service
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.usage.record import Record
from service.usage.stores.sqlite import SqliteStore
from tests.support.browser import launch

TOKEN = "sb_bench_console_0123456789abcdef"  # noqa: S105 - a throwaway token of the bench
LEDGER = "usage-bench.db"
"""The bench's ledger, beside var/ (which each start empties)."""
SERVER_TYPES = ("vllm", "ollama", "llamacpp", "tgi", "tei", "infinity")
VENDORS = ("openai", "openrouter", "groq", "mistral", "together")


def build(size: int) -> tuple[Path, Path]:
    """A git repository of `size` providers (cached); returns (root, age key file)."""
    root = CACHE / f"console-{size}-v2"  # v2: the client reads usage and has a budget
    key_file = CACHE / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    if (root / ".complete").exists():
        return root, key_file
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "providers.d"
    folder.mkdir(parents=True)
    recipient = next(x.split(": ")[1] for x in key_file.read_text().splitlines() if "public key" in x)
    add_recipient(root / ".sops.yaml", recipient)
    sops = Sops(age_key_file=key_file, project_root=root)

    def make(n: int) -> None:
        path = folder / f"p{n:04d}.yaml"
        if n % 10 == 9:
            vendor = VENDORS[n % len(VENDORS)]
            path.write_text(
                f"kind: api_key\nid: p{n:04d}\nname: {vendor} key {n}\nprovider: {vendor}\n"
                f"base_url: http://127.0.0.1:9/v{n}\napi_key: sk-bench-{n:04d}-0123456789abcdef\n"
                f"models: [model-{n % 7}, model-{n % 11}]\n"
            )
            sops.encrypt_in_place(path)
        else:
            kind = SERVER_TYPES[n % len(SERVER_TYPES)]
            purpose = {"tei": "embeddings", "infinity": "reranking"}.get(kind, "chat")
            path.write_text(
                f"kind: ai_server\nid: p{n:04d}\nname: {kind} server {n}\nserver_type: {kind}\n"
                f"base_url: http://10.{n // 250}.{n % 250}.1:8000/v1\npurposes: [{purpose}]\n"
                f"models: [model-{n % 7}]\n"
            )

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(make, range(size)))
    (folder / "routing.yaml").write_text(
        "kind: routing\npurposes:\n"
        "  chat:\n    primary: [p0000, p0001, p0002]\n    weights: {p0000: 3}\n"
        "    fallbacks: [p0003, p0009]\n"
        "  embeddings:\n    primary: p0004\n"
        "  reranking:\n    primary: p0005\n"
    )
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    (folder / "clients.yaml").write_text(
        f"kind: clients\nclients:\n  - name: bench\n    token_sha256: {digest}\n"
        "    scopes: [config:read, config:write, admin, usage:read]\n"
        '    limits: {budget: {usd: "500", period: month}}\n'
    )
    (root / ".gitignore").write_text("var/\n")
    git = ["git", "-c", "user.name=Bench", "-c", "user.email=bench@switchboard.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", f"{size} providers"], cwd=root, check=True)
    (root / ".complete").touch()
    return root, key_file


def ledger(root: Path, clients: int, days: int) -> int:
    """`root`'s bench ledger: a record per client and hour for `days` days to now (remade each run)."""
    path = root / LEDGER
    path.unlink(missing_ok=True)
    store = SqliteStore(path)
    store.open()
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    count = 0
    try:
        for hour in range(days * 24):
            ts = now - timedelta(hours=hour, minutes=-1)
            batch = [
                Record(
                    id=f"bench-{hour}-{c}",
                    ts=ts,
                    client=f"client-{c:02d}",
                    purpose="chat",
                    model=f"model-{c % 7}",
                    provider=f"p{c % 3:04d}",
                    upstream_model=f"model-{c % 7}",
                    status=429 if (hour + c) % 97 == 0 else 200,
                    stream=False,
                    attempts=1,
                    latency_ms=100.0,
                    ttfb_ms=None,
                    prompt_tokens=1000 + c,
                    cached_tokens=0,
                    cache_write_tokens=0,
                    completion_tokens=200 + hour % 50,
                    reasoning_tokens=0,
                    cost_usd=Decimal("0.000123") * (c + 1),
                    priced=True,
                    estimated=False,
                    replica="bench",
                )
                for c in range(clients)
            ]
            count += store.insert(batch)
    finally:
        store.close()
    return count


async def usage(browser: Browser, url: str) -> float:
    page, _ = await _page(browser)
    await page.goto(f"{url}/ui/#/usage?range=30d", wait_until="commit")
    ms = await page.wait_for_function(
        """() => document.querySelectorAll('svg.chart rect.bar').length >= 30 * 9
              && document.querySelectorAll('#top-clients + table tbody tr').length === 10
              && document.querySelector('table.budgets tr[data-name=bench]')
              && performance.now()""",
        polling="raf",
    )
    drawn = float(await ms.json_value())
    await page.context.close()
    return drawn


async def _page(browser: Browser) -> tuple[Page, list[Request]]:
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    # Signed in, as a tab that has the token already: what is timed is the console, not typing.
    await context.add_init_script(f"sessionStorage.setItem('switchboard.token', {TOKEN!r})")
    page = await context.new_page()
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    return page, requests


async def overview(browser: Browser, url: str, size: int) -> float:
    page, _ = await _page(browser)
    await page.goto(f"{url}/ui/#/overview", wait_until="commit")
    total = f"{size:,}"
    ms = await page.wait_for_function(
        f"""() => document.querySelectorAll('.route-grid .route').length === 3
              && document.querySelector('.cards')?.textContent.includes('Providers{total}')
              && performance.now()""",
        polling="raf",
    )
    drawn = float(await ms.json_value())
    await page.context.close()
    return drawn


async def providers(browser: Browser, url: str, size: int) -> tuple[float, float, dict[str, int]]:
    page, requests = await _page(browser)
    await page.goto(f"{url}/ui/#/providers", wait_until="commit")
    total = f"{size:,}"
    ms = await page.wait_for_function(
        f"""() => document.querySelectorAll('table.providers tbody tr').length === 50
              && document.querySelector('#providers-summary')?.textContent.endsWith('of {total}')
              && performance.now()""",
        polling="raf",
    )
    drawn = float(await ms.json_value())
    wanted = f"p{size - 2:04d}"
    filtered = await page.evaluate(
        """(id) => {
            const box = document.querySelector('#filter');
            const started = performance.now();
            box.value = id;
            box.dispatchEvent(new Event('input'));
            const rows = document.querySelectorAll('table.providers tbody tr');
            if (rows.length !== 1 || rows[0].dataset.id !== id) throw new Error('not found');
            return performance.now() - started;
        }""",
        wanted,
    )
    sizes = {"page": 0, "api": 0}
    for request in requests:
        if "/llm-config/events" in request.url:
            continue  # still streaming: measured apart
        response = await request.response()
        if response is None:
            continue
        measured = await request.sizes()
        bytes_ = measured["responseBodySize"] + measured["responseHeadersSize"]
        sizes["page" if "/ui/" in request.url else "api"] += bytes_
    await page.context.close()
    return drawn, float(filtered), sizes


async def replayed_log(url: str) -> int:
    """Bytes the event stream sends from the log's start until it says it has caught up."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    received = 0
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/llm-config/events?after=0", headers=headers) as response,
    ):
        async for line in response.content:
            received += len(line)
            if line.startswith(b": connected"):
                return received
    return received


def _row(label: str, values: list[float], unit: str = "ms") -> str:
    return f"| {label} | {statistics.median(values):.0f} {unit} | {max(values):.0f} {unit} |"


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    root, key_file = build(args.size)
    records = ledger(root, args.clients, args.days)
    service = Service(root, key_file, env={"SWITCHBOARD_USAGE_DB": str(root / LEDGER)})
    ready_s = await service.start()
    results: dict[str, list[float]] = {"overview": [], "providers": [], "filter": [], "usage": []}
    sizes: dict[str, Any] = {}
    try:
        async with async_playwright() as playwright:
            browser = await launch(playwright)
            await overview(browser, service.url, args.size)  # warm the service's caches once
            for _ in range(args.runs):
                results["overview"].append(await overview(browser, service.url, args.size))
                drawn, filtered, sizes = await providers(browser, service.url, args.size)
                results["providers"].append(drawn)
                results["filter"].append(filtered)
            await usage(browser, service.url)  # warm
            for _ in range(args.runs):
                results["usage"].append(await usage(browser, service.url))
            await browser.close()
        log_bytes = await replayed_log(service.url)
    finally:
        service.stop()
    print(f"{args.size:,} providers, ready in {ready_s:.1f} s; {args.runs} runs, a fresh profile each\n")
    print("| measure | median | max |")
    print("|---|---:|---:|")
    print(_row("overview drawn (navigation start -> routes and status)", results["overview"]))
    print(_row("providers table drawn (navigation start -> first page of 50)", results["providers"]))
    print(_row("filter box: a whole id typed -> the one row", results["filter"]))
    print(
        _row(
            f"Usage page drawn: chart, top clients, budgets ({args.clients} clients x {args.days} days, "
            f"{records:,} records)",
            results["usage"],
        )
    )
    print(f"| the page: HTML, scripts, style, icon (gzip, as sent) | {sizes['page'] / 1024:.1f} KB | |")
    print(f"| the API's JSON for the providers page (not compressed) | {sizes['api'] / 1024:.0f} KB | |")
    print(f"| the event log replayed by the stream (`?after=0`) | {log_bytes / 1024:.0f} KB | |")


if __name__ == "__main__":
    asyncio.run(main())
