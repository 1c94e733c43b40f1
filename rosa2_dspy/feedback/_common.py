"""Small helpers shared by the feedback sources."""

from __future__ import annotations

from typing import Any


def field_text(obj: Any, name: str) -> str | None:
    """Read field ``name`` of an example, prediction or dict as text; None when absent or empty."""
    getter = getattr(obj, "get", None)
    value = getter(name) if callable(getter) else getattr(obj, name, None)
    if value is None:
        return None
    text = str(value).strip()
    return text or None
