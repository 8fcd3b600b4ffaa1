"""Wording helpers: what a terminal would obey is shown escaped, the rest as it is."""

from __future__ import annotations

import pytest

from orchestrator.text import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("step-1200", "step-1200"),
        ("ünïcödé 学习 ok", "ünïcödé 学习 ok"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
        ("over\rwrite\bback\x07", "over\\rwrite\\x08back\\x07"),
        ("two\nlines\ttab", "two\\nlines\\ttab"),
        ("\u202eevil\u200b", "\\u202eevil\\u200b"),
        ("\x9bc1 \u2028sep", "\\x9bc1 \\u2028sep"),
    ],
)
def test_printable_escapes_what_a_terminal_would_obey(raw: str, shown: str) -> None:
    assert printable(raw) == shown
