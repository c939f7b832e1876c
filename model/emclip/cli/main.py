"""``emclip`` console entry point: builds the argparse tree from :data:`SUBCOMMANDS` and runs one.

Error policy: a mistake in what the user passed (:class:`~emclip.errors.EMClipError`,
``ValueError``, ``TypeError``, a missing/unwritable path, a malformed option) prints one line
``emclip: error: ...`` and exits 2; :class:`~emclip.errors.Cancelled` or Ctrl-C prints one line
and exits 130; anything else exits 1 with one line. ``--debug`` (before or after the subcommand)
also prints the traceback. Text that the terminal cannot encode (undecodable file names, odd
prompts) is escaped, never a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
import warnings
from typing import Iterator, NoReturn, Sequence

from .._version import __version__
from ..errors import Cancelled, EMClipError

#: Subcommand modules, in the order ``emclip --help`` lists them. Each exposes
#: ``add_parser(subparsers) -> ArgumentParser`` and ``run(args) -> int``, and must not import
#: torch at module level. Adding a subcommand is one line here.
SUBCOMMANDS: list[str] = [
    "emclip.cli.segment",
    "emclip.cli.train",
    "emclip.cli.finetune",
    "emclip.cli.evaluate",
    "emclip.cli.demo",
]

USER_ERRORS: tuple[type[BaseException], ...] = (
    EMClipError,
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""Exceptions shown as one line (exit code 2): they mean the input needs fixing."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``emclip: error: ...`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"emclip: error: {text} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``emclip`` parser with every registered subcommand."""
    parser = OneLineErrorParser(
        prog="emclip",
        description="EM-CLIP: text-prompted medical image segmentation (command line of napari-emclip).",
    )
    parser.add_argument("--version", action="version", version=f"emclip {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
        with contextlib.suppress(argparse.ArgumentError):
            # also accept --debug after the subcommand; SUPPRESS keeps the global value otherwise
            sub.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS,
                help="print full tracebacks on errors",
            )
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return text or type(exc).__name__


@contextlib.contextmanager
def _escaping_output() -> Iterator[None]:
    """Escape characters stdout cannot encode (``\\udcff``, ...) instead of raising."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors in ("strict", None) and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError, OSError, TypeError):
                continue
            changed.append((stream, errors or "strict"))
    try:
        yield
    finally:
        for stream, errors in changed:
            with contextlib.suppress(AttributeError, ValueError, OSError, TypeError):
                stream.reconfigure(errors=errors)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings as ``emclip: warning: ...`` lines instead of Python's two-line format."""

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"emclip: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    original = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emclip`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse already printed)
        return (
            exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
        )
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    try:
        with _escaping_output(), _one_line_warnings():
            return int(run(args) or EXIT_OK)
    except (Cancelled, KeyboardInterrupt):
        if debug:
            traceback.print_exc()
        print("emclip: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"emclip: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an environment problem, not the user's input
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(
            f"emclip: error: unexpected {type(exc).__name__}: {_one_line(exc)}{hint}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
