"""How stored text is shown to people: titles and times that a row's odd values cannot break.

The CLI and the TUI both show titles and dates from the database, which may hold anything a bug, an
import or a hand edit put there; these functions never raise and never pass control characters on.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any

from storage.conversations import parse_time

UNTITLED = "Untitled"
UNKNOWN_TIME = "date unknown"
TITLE_CHARS = 80
# Terminal escape sequences (CSI like colours and cursor moves, OSC like window titles, and two-byte
# escapes) go whole, so no "[31m" is left behind when the escape character itself is dropped.
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")


ZWJ = "\u200d"   # a format character that joins emoji sequences; harmless, and kept


def one_line(text: Any) -> str:
    """`text` on one line: terminal escape sequences removed; other control and format characters
    (line breaks, bidi overrides, zero-width spaces) become spaces, and runs of whitespace one space."""
    text = ESCAPES.sub("", str(text if text is not None else ""))
    cleaned = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != ZWJ else ch
                      for ch in text)
    return " ".join(cleaned.split())


def display_title(title: Any, limit: int = TITLE_CHARS) -> str:
    """A conversation title safe to show in a terminal, a sidebar or a Markdown heading; never empty."""
    line = one_line(title)
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line or UNTITLED


def display_time(stamp: Any, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored ISO-8601 time in local time, or "date unknown" when the row holds something else."""
    when = parse_time(stamp)
    if when is None:
        return UNKNOWN_TIME
    try:
        return when.astimezone().strftime(fmt)
    except (OverflowError, OSError, ValueError):   # a year the platform cannot convert
        return UNKNOWN_TIME

