"""The question held on the copy's tag (`?wait=`, `If-None-Match`): its limits, the tag and `wait` sent."""

from __future__ import annotations

MAX_WAIT_S = 300.0
"""The longest the service holds a question (`?wait=`, docs/reference.md §9)."""
NEWS_HELD_S = 0.2
"""A held question answered with news after this long was held, not answered at once: a
service that answers at once does so in milliseconds."""
MAX_TAG_CHARS = 1024
"""A longer `ETag` is not kept (nor sent back): the copy is then compared by its content."""


def _usable_tag(tag: str | None) -> str | None:
    """The answer's `ETag` to send back as it is, or None when it cannot be (a copy without a
    tag is compared by its content)."""
    if tag is None or not tag or len(tag) > MAX_TAG_CHARS or not (tag.isascii() and tag.isprintable()):
        return None
    return tag


def _duration(seconds: float) -> str:
    """`seconds` as the service reads a `wait`: whole seconds (`15s`), else milliseconds
    (`1500ms`, at least `1ms`); never a form it refuses (`1e-05s`)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
