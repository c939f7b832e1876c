"""``emclip evaluate --model M --data DIR [--data DIR ...]``: Dice, HD95, ASD per structure."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_mirror_flag, positive_int, progress_bar, sigint_cancels

NAME = "evaluate"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="evaluate a model on dataset folders (Dice, HD95, ASD)",
        description=(
            "Run a model on dataset folders (dataset.yaml + images/ + masks/, or NIfTI cases) with the "
            "structure names of each dataset.yaml as prompts, and report Dice, HD95 and ASD per structure "
            "and dataset (mean and std over images). Prints a markdown table."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH|NAME", help="checkpoint folder or config name")
    parser.add_argument("--data", required=True, action="append", metavar="DATASET_DIR",
                        help="dataset folder (repeat for several)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train", "trainval", "all"],
                        help="which split of each dataset (official when meta.csv has one; default test)")
    parser.add_argument("--prompt-set", default="names", choices=["names", "synonyms"],
                        help="ask with the structure names (default) or their synonyms (prompt robustness)")
    parser.add_argument("--json", metavar="OUT.json", default=None, help="write the results as JSON")
    parser.add_argument("--markdown", metavar="OUT.md", default=None, help="write the table as markdown")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most N images (cases) per dataset (N >= 1)")
    parser.add_argument("--axis", default="axial", help="slicing axis for NIfTI datasets (default axial)")
    parser.add_argument("--channels", default=None, metavar="SEQ[,SEQ...]",
                        help="NIfTI datasets: sequences to feed, e.g. flair,t1ce or flair (default: a fusion model "
                             "gets every dataset sequence it knows, other models the first one)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of random splits (default 0, as in training)")
    add_mirror_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, to_json, to_markdown
    from ..io import atomic_write_text

    for d in args.data:
        if not Path(d).expanduser().is_dir():
            raise FileNotFoundError(f"dataset folder not found: {d}")
    bar, progress = progress_bar("evaluate", "image", quiet=args.quiet)
    try:
        with sigint_cancels("stopping after the current step") as cancel:
            results = evaluate(args.model, args.data, split=args.split, prompt_set=args.prompt_set,
                               device=args.device, threshold=args.threshold, limit=args.limit, axis=args.axis,
                               channels=args.channels, split_seed=args.split_seed, model_name=str(args.model), progress=progress,
                               cancel=cancel, mirror=args.mirror)
    finally:
        bar.close()
    table = to_markdown(results)
    if args.json:
        atomic_write_text(args.json, to_json(results))
    if args.markdown:
        atomic_write_text(args.markdown, table)
    print(table, end="")
    return 0
