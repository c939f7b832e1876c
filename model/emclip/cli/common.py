"""Pieces every ``emclip`` subcommand needs: Ctrl-C as a cancel request, a progress bar fed by
the library's ``progress(done, total)`` callbacks, and option types that refuse bad values with
one usage line. No torch import here (``emclip --help`` stays fast)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def sigint_cancels(notice: str = "cancelling after the current step") -> Iterator[Callable[[], bool]]:
    """Yield a ``cancel()`` callback that turns True at the first Ctrl-C (printing
    ``emclip: <notice> (Ctrl-C again to stop now)``); a second Ctrl-C raises KeyboardInterrupt at
    once. Outside the main thread no handler can be installed: plain polling of the flag."""
    state = {"cancelled": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: state["cancelled"]
        return

    def handler(signum, frame):
        if state["cancelled"]:
            raise KeyboardInterrupt
        state["cancelled"] = True
        print(f"\nemclip: {notice} (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["cancelled"]
    finally:
        signal.signal(signal.SIGINT, previous)


def progress_bar(desc: str, unit: str, *, quiet: bool, **tqdm_options: Any) -> tuple[Any, Callable[[int, int], None]]:
    """A tqdm bar on stderr (hidden with ``quiet``; else shown when stderr is a terminal) and the
    ``progress(done, total)`` callback that moves it. Close the bar when done."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit=unit, disable=True if quiet else None, file=sys.stderr, **tqdm_options)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return bar, progress


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be >= 1 (a bad value is one usage-error line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value
