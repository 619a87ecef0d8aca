"""Placeholder: filled in by the gateway work."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Add this module's routes to the app."""
