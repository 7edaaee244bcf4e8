"""What the library tells its user: lines through Python ``logging``, progress bars through rich.

As in transformers and timm, the library only logs (``logging.getLogger("midl_convert")``); a
program decides what is shown. The command line installs rich's handler (``setup``) at INFO,
WARNING with ``--quiet`` and DEBUG with ``--verbose``. Bars and log lines share one stderr
console, so lines print above a running bar; a bar shows only on a terminal and when the caller
left ``progress=True``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger("midl_convert")
_console = None
_bars = True  # off under --quiet


def console():
    """The stderr console that log lines and progress bars share."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def setup(level: int = logging.INFO) -> None:
    """Show the library's log lines at ``level`` and above through rich's handler (what the CLI calls)."""
    from rich.logging import RichHandler

    for handler in [h for h in logger.handlers if isinstance(h, RichHandler)]:
        logger.removeHandler(handler)
    handler = RichHandler(console=console(), show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    global _bars
    _bars = level <= logging.INFO


def bars_shown() -> bool:
    """False under --quiet (``setup`` above INFO)."""
    return _bars


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A bar for a long step; yields ``advance()``, a no-op when disabled or not on a terminal."""
    con = console()
    if not (enabled and bars_shown() and total > 0 and con.is_terminal):
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=con, transient=True)
    task = bar.add_task(description, total=total)
    with bar:
        yield lambda: bar.advance(task)
