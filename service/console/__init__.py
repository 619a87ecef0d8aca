"""The web console (docs/reference.md §10): a page served from the package at `/ui/`, a client of the API.

The page is `assets/` (plain JavaScript modules, a stylesheet, an icon: no build step, no CDN);
`files` reads them once into memory and `routes` serves them. The page calls the HTTP API like
any other client, with the token the user gives it. Nothing of `service.http` imports this
package: the app is handed it (`create_app(settings, pages=(console,))`), so the console is
mounted beside the API rather than built into it.
"""

from __future__ import annotations

from service.console.routes import operations, setup

__all__ = ["operations", "setup"]
