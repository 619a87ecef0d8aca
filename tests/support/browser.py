"""A real browser for the web console: Debian's Chromium, driven by Playwright.

Playwright's own browser download is not reachable (and not wanted): the browser is the
system's `chromium` (`apt-get install chromium`, as `.ci/run` does), launched headless with
a fresh profile. `Watched` records what a page does that the console must never do: a
request to another origin, a console error, an uncaught exception, a dialog.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from playwright.async_api import Browser, ConsoleMessage, Dialog, Error, Page, Playwright, Request

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
