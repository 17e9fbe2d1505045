"""Progress bars for long operations: one live tqdm line on stderr when stderr is a terminal;
nothing when it is a pipe or a file (callers print plain lines there, if anything), so logs
hold no carriage returns."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", quiet: bool = False, leave: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr, disabled when `quiet` or stderr is not a terminal. A terminal
    that reports no width (a pty nobody sized) gets a fixed width instead of an empty bar."""
    width = _columns()
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                disable=quiet or not on_terminal(), file=sys.stderr,
                dynamic_ncols=width > 0, ncols=None if width > 0 else FALLBACK_COLUMNS,
                nrows=None if width > 0 else FALLBACK_ROWS)
