"""The fast path's check at start (`fast_check.unlike_aiohttp`): what it uses of aiohttp makes
the requests and answers aiohttp's own server would, or the fast path is off."""

from __future__ import annotations

import pytest
from aiohttp import web

from service.http import fast_check


async def test_the_fast_paths_requests_and_answers_are_aiohttps() -> None:
    assert fast_check.unlike_aiohttp() is None


async def test_a_private_attribute_unlike_its_property_turns_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serialized` reads `Response`'s private attributes: an aiohttp whose properties give
    something else is told at start (`unlike_aiohttp`), and the fast path is off."""
    assert fast_check.unlike_aiohttp() is None
    monkeypatch.setattr(web.StreamResponse, "reason", property(lambda self: "Elsewhere"))
    assert fast_check.unlike_aiohttp() == "Response._reason 'Made', not 'Elsewhere'"
