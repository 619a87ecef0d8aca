"""`python -m demo.screenshots` (`just screenshots`): the web console's pages, photographed.

Serves the demo's world (`demo/world.py`) from a fresh temporary folder, so every run
starts from the same files and an empty log; sends a little traffic through the gateway
(one stand-in fails twice, so there are errors and a fallback) and makes two changes over
the write API (so the timeline has field-by-field changes with their commits); the demo is
priced (`demo/world.py`), so that traffic has costs for the Usage page; then opens
each page of the console in Debian's Chromium, as the browser tests do, and saves a PNG of
each to `docs/console/`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp
from playwright.async_api import Page, async_playwright

from demo.world import REPO, World, world
from tests.support.browser import Watched, launch

OUT = REPO / "docs" / "console"
API = "/api/v1/llm-config"
WIDE = {"width": 1360, "height": 860}
NARROW = {"width": 390, "height": 844}


async def _traffic(demo: World) -> None:
    demo.upstreams["local-vllm"].fail(503, times=2)
    async with aiohttp.ClientSession() as http:
        for n in range(24):
            body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": f"hello number {n}"}]}
            async with http.post(f"{demo.url}/v1/chat/completions", json=body) as response:
                await response.read()
        for n in range(6):
            body = {"model": "bge-m3", "input": [f"some text to embed, {n}"]}
            async with http.post(f"{demo.url}/v1/embeddings", json=body) as response:
                await response.read()
        headers = {"X-Switchboard-Reason": "name the workstation"}
        patch = {"name": "Ollama on the workstation", "models": ["llama3.1:8b", "qwen2.5:7b"]}
        async with http.patch(f"{demo.url}{API}/servers/local-ollama", json=patch, headers=headers) as r:
            _check(r.status, await r.text())
        route = {
            "primary": ["openrouter-default", "local-vllm"],
            "weights": {"openrouter-default": 2},
            "fallbacks": ["anthropic-main", "local-ollama"],
        }
        headers = {"X-Switchboard-Reason": "more to the GPU box"}
        async with http.put(f"{demo.url}{API}/active/chat", json=route, headers=headers) as r:
            _check(r.status, await r.text())


def _check(status: int, body: str) -> None:
    if status != 200:
        raise RuntimeError(f"the demo refused a change ({status}): {body}")


async def _shoot(page: Page, url: str, ready: str, name: str, out: Path, *, whole: bool = True) -> Path:
    await page.goto(url)
    await page.wait_for_selector(ready)
    await page.wait_for_selector("#live.live-live")
    await page.wait_for_timeout(150)  # the last redraw of a live update
    path = out / f"{name}.png"
    await page.screenshot(path=str(path), full_page=whole)
    return path


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-screenshots-") as folder:
        async with world(0, Path(folder) / "demo") as demo, async_playwright() as playwright:
            await _traffic(demo)
            browser = await launch(playwright)
            context = await browser.new_context(viewport=WIDE, device_scale_factor=1, color_scheme="light")
            page = await context.new_page()
            watched = Watched(demo.url)
            watched.attach(page)
            ui = f"{demo.url}/ui/"
            shots = [
                await _shoot(page, f"{ui}#/overview", ".route-grid .route", "overview", args.out),
                await _shoot(page, f"{ui}#/providers", "table.providers tbody tr", "providers", args.out),
                await _shoot(page, f"{ui}#/providers/local-vllm", ".timeline .event", "provider", args.out),
                await _shoot(page, f"{ui}#/events", ".timeline .event", "events", args.out, whole=False),
                await _shoot(page, f"{ui}#/usage?by=provider", "svg.chart rect.bar", "usage", args.out),
            ]
            await page.goto(f"{ui}#/changes/new")
            await page.fill("#f-id", "gpu-2")
            await page.click("#f-kind-ai_server")
            await page.fill("#f-base_url", "ftp://10.0.0.12:8000/v1")
            await page.click("text=Create provider")
            await page.wait_for_selector("[data-field=base_url].invalid")
            shots.append(args.out / "changes.png")
            await page.screenshot(path=str(shots[-1]), full_page=True)
            await page.set_viewport_size(NARROW)
            shots.append(
                await _shoot(
                    page, f"{ui}#/providers", "table.providers tbody tr", "narrow", args.out, whole=False
                )
            )
            watched.check()
            await browser.close()
    for shot in shots:
        print(shot.relative_to(REPO) if shot.is_relative_to(REPO) else shot)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
