"""Reading JSON values a client or an upstream sent, whatever their shape: a field of the wrong
type reads as empty, never as an exception."""

from __future__ import annotations

from typing import Any


def as_dict(value: object) -> dict[str, Any]:
    """`value` when it is an object, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    """`value` when it is an array, else an empty one."""
    return value if isinstance(value, list) else []


def as_str(value: object, default: str = "") -> str:
    """`value` when it is a string, else `default`."""
    return value if isinstance(value, str) else default
