"""``emclip train CONFIG [key=value ...]``: train a model from a YAML config or preset.

Thin client of :func:`emclip.train.trainer.train`: a tqdm bar shows loss and images/s, Ctrl-C
stops after the current step (the last complete epoch checkpoint stays valid; ``--resume``
continues from it). Under ``torchrun`` only rank 0 draws the bar.
"""

from __future__ import annotations

import argparse
import os

from .common import progress_bar, sigint_cancels

NAME = "train"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="train a model from a YAML config or preset",
        description=(
            "Train EM-CLIP (or the U-Net baseline) as a YAML config says. CONFIG is a .yaml path or a "
            "bundled preset (e.g. default_combined, fundus_drishti_sdg, cardiac_acdc_sdg). Overrides "
            "are key=value with dotted keys and YAML values, e.g. batch_size=4 optim.lr=1e-3 "
            "train.0.limit=20. Multi-process: torchrun --nproc_per_node=2 -m emclip.cli.main train CONFIG."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", nargs="?", help="training config .yaml or preset name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, right after CONFIG (or anywhere with --set)")
    parser.add_argument("--set", dest="more_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override that may appear anywhere (repeatable)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (overrides out_dir)")
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help="folder the dataset paths are relative to (default: the config's, ../shared/data)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete epoch in the output folder")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | mps (overrides the config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--list-presets", action="store_true", help="print the bundled presets and exit")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..train.config import list_presets

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if not args.config:
        from ..errors import ConfigError

        raise ConfigError("give a training CONFIG (.yaml or a preset; see emclip train --list-presets)")
    import logging

    from ..train.config import load_train_config
    from ..train.trainer import train

    overrides = list(args.overrides) + list(args.more_overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    if args.device:
        overrides.append(f"device={args.device}")
    cfg = load_train_config(args.config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    quiet = args.quiet or not main_rank
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="emclip: %(message)s")
    bar, progress = progress_bar("train", "step", quiet=quiet, dynamic_ncols=True)

    def log(record: dict) -> None:
        if record.get("kind") == "train":
            bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")

    try:
        with sigint_cancels("stopping after the current step") as cancel:
            result = train(cfg, resume=args.resume, progress=progress, cancel=cancel, log=log)
    finally:
        bar.close()
    if main_rank:
        print(f"trained {result.epochs_done} epochs ({result.steps_done} steps) -> {result.out_dir}")
        if result.best_val_dice is not None:
            print(f"best validation Dice {result.best_val_dice:.4f}: {result.best_checkpoint}")
        if result.images_per_s:
            print(f"throughput {result.images_per_s:.1f} images/s")
        if result.eval_results:
            print(f"test results: {result.out_dir / 'eval.md'}")
    return 0
