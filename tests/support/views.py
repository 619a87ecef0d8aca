"""Builders of masked configuration views (`service.config.view.ConfigView`) for the tests."""

from __future__ import annotations

from typing import Any

from service.config.view import ConfigView


def provider_view(pid: str, **fields: Any) -> dict[str, Any]:
    """The view of an OpenRouter key provider, as `Snapshot.view()` gives it, with `fields` changed."""
    view: dict[str, Any] = {
        "kind": "api_key",
        "id": pid,
        "name": None,
        "enabled": True,
        "provider": "openrouter",
        "base_url": "https://openrouter.ai/api/v1",
        "api_key": "****5d80",
        "models": [],
        "model_map": {},
        "purposes": ["chat"],
        "connect_timeout_s": 5.0,
        "timeout_s": 600.0,
        "first_byte_timeout_s": 15.0,
        "idle_timeout_s": 60.0,
        "file": f"providers.d/{pid}.yaml",
    }
    return view | fields


def view_of(*providers: dict[str, Any], routing: Any = None, clients: Any = None) -> ConfigView:
    """A whole view holding `providers`, with optional routing and clients."""
    return {"providers": {p["id"]: p for p in providers}, "routing": routing or {}, "clients": clients or {}}
