"""``emclip demo``: open napari with a sample image and the EM-CLIP widget.

A thin dispatcher: the napari side lives in ``napari_emclip._demo`` and is imported by name only
when the command runs, so the ``emclip`` package itself never imports napari or Qt.
"""

from __future__ import annotations

import argparse
import importlib
import sys

NAME = "demo"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="open napari with the fundus sample and the EM-CLIP widget",
        description=(
            "Open napari with the colour fundus sample and the EM-CLIP widget docked, ready to run. "
            "With --screenshot, run the default prompts, save a PNG of the whole window and exit "
            "(needs a display; on a headless machine use xvfb-run)."
        ),
    )
    parser.add_argument(
        "--screenshot", metavar="FILE.png", help="run, save the window to FILE.png, exit"
    )
    parser.add_argument(
        "--model",
        metavar="NAME|PATH",
        default=None,
        help="config name (e.g. tiny) or checkpoint folder (default: the bundled model)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="mask threshold (default 0.5)"
    )
    parser.add_argument("--prompts", default=None, help="prompts instead of the fundus presets")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up a --screenshot run after this many seconds (default 600)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("napari_emclip._demo")
    except ImportError as exc:
        print(
            f"emclip demo needs napari and a Qt binding ({exc}); install them with "
            "pip install 'napari-emclip[all]'",
            file=sys.stderr,
        )
        return 2
    return int(
        demo.run_demo(
            screenshot=args.screenshot,
            model=args.model,
            threshold=args.threshold,
            prompts=args.prompts,
            timeout=args.timeout,
        )
    )
