"""A real browser for the web console: Debian's Chromium, driven by Playwright.

Playwright's own browser download is not reachable (and not wanted): the browser is the
system's `chromium` (`apt-get install chromium`, as `.ci/run` does), launched headless with
a fresh profile. `Watched` records what a page does that the console must never do: a
request to another origin, a console error, an uncaught exception, a dialog. `tab` opens a
fresh tab (its own sessionStorage) that fails the test when the page did any of those;
`module_project` and `isolated` give a module one service for all its tests.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Error, Page, Playwright, Request, expect

from tests.conftest import AgeIdentity, SopsProject, write_atomically

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str | None:
    """The system's Chromium, or None when it is not installed."""
    return shutil.which("chromium")


async def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless, with a fresh temporary profile (Playwright's launch makes one)."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium (CI's .ci/run does)")
    return await playwright.chromium.launch(executable_path=path, args=list(CHROMIUM_ARGS), headless=True)


@dataclass
class Watched:
    """What a page did that the console must not do, recorded as it happens."""

    origin: str
    requests: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", self._error)
        page.on("dialog", self._dialog)

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)
        parts = urlsplit(request.url)
        if parts.scheme == "data":
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign.append(request.url)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning") and not _expected(message.text):
            self.errors.append(f"console.{message.type}: {message.text}")

    def _error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error}")

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def check(self) -> None:
        """Fail when the page reached another origin, logged an error, or opened a dialog."""
        assert not self.foreign, f"requests left the service's origin: {self.foreign}"
        assert not self.dialogs, f"the page opened dialogs: {self.dialogs}"
        assert not self.errors, f"the page logged errors: {self.errors}"


def _expected(text: str) -> bool:
    # The browser logs every answer >= 400 as a failed resource, also the 401/403/404/409/412/
    # 422 that the console asks for on purpose (a wrong token, a refused write); those are
    # the API working, not the page failing.
    return text.startswith("Failed to load resource: the server responded with a status of 4")


@dataclass
class Tab:
    """One tab of the console, and what it did."""

    page: Page
    watched: Watched
    url: str

    async def open(self, route: str = "#/overview", token: str | None = None) -> None:
        """Load the console at `route`, signing in with `token` when it asks for one."""
        await self.page.goto(f"{self.url}/ui/{route}")
        if token is not None:
            await self.page.fill("#token", token)
            await self.page.click("button[type=submit]")
        await expect(self.page.locator("#nav a, #nav .nav-off").first).to_be_visible()

    async def live(self) -> None:
        """Wait until the event stream has caught up with the log."""
        await expect(self.page.locator("#live")).to_have_text("live")

    def api_requests(self) -> list[str]:
        return [url for url in self.watched.requests if "/api/" in url]


@contextlib.asynccontextmanager
async def tab(browser: Browser, url: str, **options: Any) -> AsyncIterator[Tab]:
    """A fresh context (cookies, storage) and page; fails the test if the page misbehaved."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    page = await context.new_page()
    watched = Watched(url)
    watched.attach(page)
    try:
        yield Tab(page, watched, url)
    finally:
        await context.close()
    watched.check()


# -- one service for a module's tests -------------------------------------------------------------


@contextlib.contextmanager
def isolated(home: Path) -> Iterator[None]:
    """The environment every test has (tests/conftest.py), for a module's whole service."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("SOPS_AGE_KEY", "SOPS_AGE_KEY_FILE", "SOPS_AGE_KEY_CMD", "SOPS_CONFIG"):
            patch.delenv(name, raising=False)
        patch.setenv("HOME", str(home))
        patch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
        for role in ("AUTHOR", "COMMITTER"):
            patch.setenv(f"GIT_{role}_NAME", "Switchboard Tests")
            patch.setenv(f"GIT_{role}_EMAIL", "tests@switchboard.invalid")
        yield


def module_project(root: Path, identity: AgeIdentity) -> SopsProject:
    """A sops project at `root` for `identity` (the `sops_project` fixture, for a module)."""
    from service.crypto.sops import Sops

    (root / "providers.d").mkdir(parents=True)
    (root / ".sops.yaml").write_text(
        "creation_rules:\n  - path_regex: providers.d/.*\\.ya?ml$\n"
        f"    encrypted_regex: ^(api_key)$\n    age: {identity.recipient}\n"
    )
    sops = Sops(age_key_file=identity.key_file, project_root=root)
    return SopsProject(root=root, providers=root / "providers.d", sops=sops, identity=identity)


def server(project: SopsProject, provider_id: str, base_url: str, **fields: Any) -> Path:
    """An `ai_server` file with `fields`, written as editors do."""
    doc = {"kind": "ai_server", "id": provider_id, "server_type": "vllm", "base_url": base_url, **fields}
    return write_atomically(project.providers / f"{provider_id}.yaml", json.dumps(doc))
