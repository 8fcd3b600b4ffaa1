"""Wording shared by error messages."""

from __future__ import annotations

from collections.abc import Sequence

# How many names one message lists before "and N more".
SHOWN = 8


def some(items: Sequence[str], limit: int = SHOWN) -> str:
    """'a, b, c' or, past `limit` items, 'a, ..., h and 4 more'."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
