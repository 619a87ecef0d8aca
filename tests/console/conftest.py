"""The browser for the web console's tests: one Chromium for the whole session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

from tests.support.browser import chromium_path, launch


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if chromium_path() is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (CI's .ci/run does)")
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            yield browser
        finally:
            await browser.close()
