"""Pieces every ``emclip`` subcommand needs: Ctrl-C as a cancel request, a progress bar fed by
the library's ``progress(done, total)`` callbacks, option types that refuse bad values with
one usage line, and the check that an output folder is free. No torch import here
(``emclip --help`` stays fast)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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


def add_mirror_flag(parser: argparse.ArgumentParser) -> None:
    """``--mirror`` / ``--no-mirror`` -> ``args.mirror`` True / False; absent -> None (the model's default)."""
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each pass with a left-right mirrored pass (test-time augmentation; default: the "
        "model's setting, on for the bundled model); --no-mirror: one plain pass, ~1.3x faster on a CPU",
    )


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be >= 1 (a bad value is one usage-error line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def same_file(path: Path) -> tuple:
    """Identity of an existing file (device, inode), else its absolute path."""
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return (str(path.absolute()),)


def check_out_dir(
    out: str | Path,
    inputs: Iterable[Path],
    planned: list[Path],
    overwrite: bool,
    replaces: Callable[[Path], str],
) -> Path:
    """Check the ``--out`` folder before anything is written; returns it as a Path.

    Raises NotADirectoryError when ``out`` is an existing file, InvalidArgumentError when a
    ``planned`` output is one of the ``inputs`` (message: "the output P would replace
    {replaces(P)}; ..."), FileExistsError when planned outputs exist and ``overwrite`` is False.
    """
    from ..errors import InvalidArgumentError

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    identities = {same_file(f) for f in inputs}
    for p in planned:
        if p.exists() and same_file(p) in identities:
            raise InvalidArgumentError(f"the output {p} would replace {replaces(p)}; choose another --out folder")
    if not overwrite:
        existing = [p for p in planned if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise FileExistsError(
                f"{existing[0]}{more} already exist; nothing was written. "
                "Pass --overwrite to replace them, or choose another --out folder"
            )
    return out_dir
