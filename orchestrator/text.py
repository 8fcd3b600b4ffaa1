"""Wording shared by error messages."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

# How many names one message lists before "and N more".
SHOWN = 8


def some(items: Sequence[str], limit: int = SHOWN) -> str:
    """'a, b, c' or, past `limit` items, 'a, ..., h and 4 more'."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# Characters a terminal acts on rather than shows: controls (ESC starts a colour or cursor
# sequence; CR and BS overwrite), format characters (bidi overrides reorder a line), and the
# Unicode line and paragraph separators.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})


def printable(text: str) -> str:
    """`text` with every character a terminal would act on written as an escape (ESC as \\x1b,
    a newline as \\n, U+202E as \\u202e), so that what a client stored (a trainer's label,
    an error quoting it) is shown, never obeyed, by the terminal that prints it."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _HIDDEN else ch
        for ch in text
    )
