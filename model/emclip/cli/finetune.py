"""``emclip finetune DATASET_DIR --from MODEL --out DIR``: fine-tune a checkpoint on corrected masks.

Thin client of :func:`emclip.train.finetune.finetune`. Progress is a tqdm bar (``--progress
bar``, default) or one ``progress DONE TOTAL`` line per step on stdout (``--progress lines``,
read by the napari plugin). Ctrl-C or SIGTERM stop after the current step; nothing is written
to ``--out`` then (exit code 130).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from .common import positive_int

NAME = "finetune"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="fine-tune a model on a folder of corrected masks",
        description=(
            "Fine-tune a trained checkpoint (the bundled default by default) on a dataset folder "
            "(dataset.yaml + images/ + masks/, e.g. filled by the napari plugin's 'Add to training set') "
            "with a small learning rate for a few steps, and write a complete checkpoint to --out. "
            "With 8 or more images one patient group in eight is held out to pick the best epoch; "
            "otherwise the final weights are kept."
        ),
    )
    parser.add_argument("dataset", metavar="DATASET_DIR", help="dataset folder with the corrected masks")
    parser.add_argument("--from", dest="from_model", default="default", metavar="MODEL",
                        help="checkpoint folder to start from (default: the bundled model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the fine-tuned checkpoint")
    parser.add_argument("--epochs", type=positive_int, default=4, help="epochs (validation points with a held-out image; default 4)")
    parser.add_argument("--steps", type=positive_int, default=25, help="optimiser steps per epoch (default 25)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="augmented samples per step (default 4)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the decoder (default 1e-4; image tower lr/4)")
    parser.add_argument("--image-size", type=positive_int, default=None, help="network input side (default: the model's)")
    parser.add_argument("--holdout", choices=["auto", "yes", "no"], default="auto",
                        help="hold out an image for model selection (auto: with 8+ images)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    parser.add_argument("--progress", choices=["bar", "lines", "none"], default="bar",
                        help="tqdm bar (default), 'progress DONE TOTAL' lines on stdout, or nothing")
    parser.set_defaults(func=run)
    return parser


@contextlib.contextmanager
def signals_cancel() -> Iterator[Callable[[], bool]]:
    """A ``cancel()`` that turns True at the first Ctrl-C or SIGTERM; a second Ctrl-C stops at once."""
    state = {"cancelled": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: state["cancelled"]
        return

    def handler(signum, frame):
        if state["cancelled"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["cancelled"] = True
        print("\nemclip: stopping after the current step (nothing is written)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: state["cancelled"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from ..train.finetune import finetune

    logging.basicConfig(level=logging.INFO if args.progress == "bar" else logging.WARNING,
                        format="emclip: %(message)s")
    bar = tqdm(total=1, desc="finetune", unit="step", disable=True if args.progress != "bar" else None,
               file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if args.progress == "lines":
            print(f"progress {done} {total}", flush=True)
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    def log(record: dict) -> None:
        if record.get("kind") == "train":
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        elif record.get("kind") == "val" and args.progress == "lines":
            print(f"val {record['epoch']} {record['val_dice']:.6f}", flush=True)

    holdout = {"auto": None, "yes": True, "no": False}[args.holdout]
    try:
        with signals_cancel() as cancel:
            out = finetune(args.dataset, args.from_model, args.out, epochs=args.epochs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, device=args.device,
                           seed=args.seed, holdout=holdout, progress=progress, cancel=cancel, log=log)
    finally:
        bar.close()
    print(f"checkpoint {out}", flush=True)
    return 0
