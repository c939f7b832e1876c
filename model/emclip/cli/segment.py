"""``emclip segment``: segment image files by text prompts and write masks + overlays.

For each ``IMAGE`` it writes, into ``--out``, ``<stem>_masks.tif`` (``uint8`` 0/1, ``P x H x W``,
or ``P x Z x H x W`` for a stack, with the prompt names and the scores in the TIFF metadata,
readable with :func:`emclip.io.read_mask_tiff`) and ``<stem>_overlay.png`` (masks coloured over
the image; for stacks, the slice with the most foreground). Files are written atomically, and
nothing is written when an output already exists unless ``--overwrite`` is given (an output
never replaces an input, even then). Every input is checked (exists, regular file, accepted
extension, not empty, image content) before the model loads; a failure on one image of a batch
names it and keeps the outputs of the images before it. The first Ctrl-C cancels after the
current step; a second one stops at once.

NIfTI volumes (``.nii``/``.nii.gz``, or case folders) go to :mod:`.segment_volumes`: one
``<case>_<prompt>.nii.gz`` per prompt with the source affine, sliced along ``--axis`` (default axial).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import add_mirror_flag, check_out_dir, progress_bar
from .common import sigint_cancels as _sigint_cancels

NAME = "segment"

EXAMPLES = """examples:
  emclip segment fundus.png --prompts "optic disc, optic cup" --out results/ --model checkpoints/fundus
  emclip segment scans/*.tif -p "left ventricle; myocardium" -o out/ --modality "cardiac MRI" --overwrite
  emclip segment stack.tif -p "brain tumour" -o out/ --axis 0     (a TIFF stack, slice by slice)
  emclip segment pat1_flair.nii.gz -p "whole tumour" -o out/ --axis axial   (NIfTI: <case>_<prompt>.nii.gz
                                               with the source affine + <case>_emclip.json)
  emclip segment lge.png -p "left ventricle" --exemplar ref.png ref_lv.png "left ventricle" -o out/
                                               (reference-guided: text + a labelled exemplar; --bank FOLDER)
  emclip segment fundus.png --auto -o out/     (prompt-free: every structure the model knows for the
                                               recognised modality; only found ones are written)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="segment images by text prompts (writes mask TIFFs and overlay PNGs)",
        description=(
            "Segment the structures named by --prompts in each IMAGE and write, into --out,\n"
            "<stem>_masks.tif (one 0/1 channel per prompt, prompt names in the TIFF metadata)\n"
            "and <stem>_overlay.png. Existing outputs are kept unless --overwrite is given.\n"
            "Ctrl-C cancels after the current step (twice: at once); nothing half-written remains."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files: .tif/.tiff (also stacks), .png, .jpg/.jpeg, .bmp; or sample:retina, sample:cardiac-phantom",
    )
    parser.add_argument(
        "-p",
        "--prompts",
        default=None,
        help='structure names separated by commas or semicolons, e.g. "optic disc, optic cup"; '
        "leave out (or --auto) to segment every structure the model knows for the image's modality",
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="prompt-free: recognise the modality (or take --modality) and segment every structure "
        "the model knows for it; only found structures are written (default when --prompts is left out)",
    )
    parser.add_argument(
        "--exemplar",
        nargs=3,
        action="append",
        default=None,
        metavar=("IMAGE", "MASK", "NAME"),
        help="a reference image, its mask (nonzero = the structure) and the structure's name, used "
        "as a visual prompt (repeatable); a NAME among --prompts combines with that prompt, other "
        "names are added. With exemplars, --prompts may be left out",
    )
    parser.add_argument(
        "--bank", default=None, metavar="FOLDER", help="a template bank folder of exemplars (emclip.TemplateBank)"
    )
    parser.add_argument(
        "--exemplar-mode",
        choices=("combine", "only"),
        default="combine",
        help="for a prompt that has exemplars: combine text and exemplar (default) or use the exemplar only",
    )
    parser.add_argument(
        "-o", "--out", required=True, metavar="DIR", help="output folder (created if missing)"
    )
    parser.add_argument(
        "-m",
        "--model",
        default=None,
        metavar="PATH|NAME",
        help="checkpoint folder or file, or a config name such as 'tiny' (random weights, "
        "for testing); default: the bundled model",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "mps", "cpu"),
        help="where to run (default auto: cuda, then mps, then cpu)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="probability above which a pixel is in the mask (default 0.5)",
    )
    parser.add_argument(
        "--modality",
        default=None,
        help='imaging modality for the prompt templates, e.g. "fundus", "cardiac MRI"',
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="segment in overlapping tiles of this size; 0 = never; default: automatic "
        "for very large images",
    )
    parser.add_argument(
        "--min-area",
        type=int,
        default=None,
        metavar="PIXELS",
        help="masks smaller than this count as not found (default: 0.01%% of the image, >= 4)",
    )
    parser.add_argument(
        "--axis",
        type=_axis_value,
        default=None,
        help="treat each image as a stack and segment it slice by slice along this axis. "
        "Default: only arrays that cannot be a 2D image are stacks (a TIFF of 3 or 4 "
        "planes reads as a colour image; pass --axis 0 to segment its planes). "
        "NIfTI volumes (.nii/.nii.gz): axial (default), coronal, sagittal or a voxel axis 0..2",
    )
    parser.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        metavar="AXIS",
        help="axis holding the colour channels (default: guessed: a last or first axis of 1, 3 or 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--no-coarse-to-fine",
        dest="coarse_to_fine",
        action="store_const",
        const=False,
        default=None,
        help="never crop around the optic disc of a whole fundus photograph (default: automatic "
        "for optic disc/cup/rim prompts)",
    )
    add_mirror_flag(parser)
    parser.add_argument("--no-overlay", action="store_true", help="do not write the overlay PNGs")
    parser.add_argument(
        "--all-components",
        action="store_true",
        help="keep every connected region of each mask (default: for the structures the model "
        "lists as one object, e.g. optic disc or left ventricle, only the main region is kept)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickle checkpoints (.pt/.pth/.ckpt); only for files you trust",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or per-image summary"
    )
    parser.set_defaults(func=run)
    return parser


def _axis_value(text: str) -> int | str:
    """``--axis``: an integer, or axial/coronal/sagittal (NIfTI volumes only)."""
    name = text.strip().lower()
    if name in ("axial", "coronal", "sagittal"):
        return name
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid axis {text!r}: use a number, or axial/coronal/sagittal for NIfTI volumes"
        ) from None


def _load_exemplars(args: argparse.Namespace) -> list[Any]:
    """The exemplars of ``--exemplar IMAGE MASK NAME`` (each) and ``--bank FOLDER``, checked
    before the model loads; also stored as ``args.exemplar_list``."""
    from ..errors import InvalidExemplarError
    from ..exemplars import Exemplar, TemplateBank
    from ..io import read_image

    out: list[Any] = []
    for image_path, mask_path, name in getattr(args, "exemplar", None) or []:
        try:
            image, mask = read_image(image_path), read_image(mask_path)
            if mask.ndim == 3 and mask.shape[-1] in (3, 4):  # a colour-coded mask: any colour is inside
                mask = mask[..., :3].any(axis=-1)
            out.append(Exemplar(image, mask, name, args.modality))
        except (OSError, ValueError) as exc:
            raise InvalidExemplarError(f"--exemplar {image_path} {mask_path} {name!r}: {exc}") from exc
    if getattr(args, "bank", None):
        out.extend(TemplateBank.load(args.bank))
    args.exemplar_list = out
    return out


def output_paths(image: Path, out_dir: Path, overlay: bool = True) -> list[Path]:
    """The files ``emclip segment`` writes for ``image``."""
    paths = [out_dir / f"{image.stem}_masks.tif"]
    if overlay:
        paths.append(out_dir / f"{image.stem}_overlay.png")
    return paths


def _resolve_sample(name: str) -> Path:
    """``sample:NAME`` (see :data:`emclip.samples.SAMPLES`) -> a file holding that sample."""
    if not name.startswith("sample:"):
        return Path(name)
    from .. import samples
    from ..errors import InvalidArgumentError

    key = name.split(":", 1)[1]
    if key not in samples.SAMPLES:
        raise InvalidArgumentError(f"unknown sample {key!r}; choose one of: " + ", ".join(f"sample:{k}" for k in samples.SAMPLES))
    if key == "retina":
        return samples.retina_path()
    import tempfile

    import tifffile

    path = Path(tempfile.mkdtemp(prefix="emclip-sample-")) / f"{key}.tif"
    tifffile.imwrite(path, samples.load_sample(key))
    return path


def _check_inputs(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """Validate paths before loading anything: inputs exist, are not empty and hold an image
    format (judged from their first bytes), outputs are free (or --overwrite), no two inputs
    would write the same output and no output would replace an input."""
    from ..errors import InvalidArgumentError
    from ..io import check_image_file

    images = [_resolve_sample(p) for p in args.images]
    for path in images:
        check_image_file(path)
    seen: dict[str, Path] = {}
    for path in images:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise InvalidArgumentError(
                f"{other} and {path} would write the same output files (same name {path.stem!r}); "
                "rename one or run them with different --out folders"
            )
    planned = [p for img in images for p in output_paths(img, Path(args.out), not args.no_overlay)]
    out_dir = check_out_dir(
        args.out, images, planned, args.overwrite, replaces=lambda p: f"the input image {p.name}"
    )
    return images, out_dir


def _with_context(exc: BaseException, path: Path, done: int, total: int) -> BaseException:
    """``exc`` with the image's path and the batch progress in its message (same type)."""
    text = str(exc)
    if path.name not in text:
        text = f"{path}: {text}"
    if total > 1:
        text += f" ({done} of {total} images were segmented before this one; their outputs are kept)"
    try:
        new = type(exc)(text)
    except Exception:  # noqa: BLE001 - an exception type with another signature: keep the original
        return exc
    return new


def _is_stack(image: Any, axis: int | None, channel_axis: int | None) -> bool:
    """Whether to segment ``image`` slice by slice: --axis given, 4D, or 3D but not an image."""
    from ..preprocess import channels_last

    if axis is not None or image.ndim == 4:
        return True
    if image.ndim == 3:
        try:
            channels_last(image, channel_axis)
        except ValueError:
            return True
    return False


def _overlay_slice(
    image: Any, result: Any, axis: int, channel_axis: int | None
) -> tuple[Any, Any, int | None]:
    """For a stack: the 2D image, its masks and channel axis, for the slice with most foreground."""
    import numpy as np

    pos = result.stack_axis
    masks = result.masks
    per_slice = masks.sum(axis=tuple(i for i in range(masks.ndim) if i != 1 + pos))
    z = int(np.argmax(per_slice)) if per_slice.any() else masks.shape[1 + pos] // 2
    axis %= image.ndim
    if channel_axis is not None:
        channel_axis %= image.ndim
        channel_axis = channel_axis - 1 if channel_axis > axis else channel_axis
    return np.take(image, z, axis=axis), np.take(masks, z, axis=1 + pos), channel_axis


def _summary(name: str, result: Any) -> str:
    import numpy as np

    total = int(np.prod(result.masks.shape[1:]))
    parts = []
    for prompt, found, area, score, maxp in zip(
        result.prompts, result.found, result.areas, result.scores, result.max_probability
    ):
        if found:
            parts.append(f"{prompt}: {100.0 * area / total:.2f}% of pixels, score {score:.2f}")
        else:
            parts.append(f"{prompt}: not found (max probability {maxp:.2f})")
    info = getattr(result, "info", None) or {}
    if info.get("prompt_free"):
        conf = info.get("modality_confidence")
        how = f"recognised, confidence {conf:.2f}" if conf is not None else "given"
        from ..modality import display_name

        head = f"{name}: modality {display_name(info.get('modality'))} ({how})"
        if not parts:
            return f"{head}; none of {', '.join(info.get('structures_tried', []))} found, nothing written"
        return f"{head}; " + "; ".join(parts)
    return f"{name}: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..errors import Cancelled, EMClipError, InvalidArgumentError
    from ..prompts import parse_prompts

    if getattr(args, "auto", False) and args.prompts is not None:
        raise InvalidArgumentError(
            "--auto segments every structure the model knows: give either --auto or --prompts, not both"
        )
    exemplars = _load_exemplars(args)
    if exemplars and getattr(args, "auto", False):
        raise InvalidArgumentError("--auto cannot be combined with --exemplar/--bank; give --prompts or leave both out")
    prompts = None if args.prompts is None else parse_prompts(args.prompts)  # None: prompt-free
    if not 0.0 < args.threshold < 1.0:
        raise InvalidArgumentError(
            f"--threshold must be between 0 and 1 (exclusive), got {args.threshold}"
        )
    if args.tile_size is not None and args.tile_size < 0:
        raise InvalidArgumentError(
            f"--tile-size must be >= 0 (0 = no tiling), got {args.tile_size}"
        )
    from .segment_volumes import is_volume_input, run_volumes

    if is_volume_input(list(args.images)):
        if exemplars:
            raise InvalidArgumentError("--exemplar/--bank work with 2D images and TIFF stacks, not NIfTI volumes")
        return run_volumes(args, prompts)
    if isinstance(args.axis, str):
        raise InvalidArgumentError(
            f"--axis {args.axis} is for NIfTI volumes (it needs their orientation); give a number for TIFF stacks"
        )
    images, out_dir = _check_inputs(args)

    from ..inference import load_model

    model = load_model(args.model, args.device, trust_pickle=args.trust_pickle)
    if args.all_components:
        model.config.single_object = []
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = bool(args.quiet)
    bar = tqdm(
        images, desc="images", unit="image", disable=True if quiet else None, file=sys.stderr
    )
    with _sigint_cancels() as cancel:
        for done, path in enumerate(bar):
            try:
                result = _segment_file(path, prompts, model, out_dir, args, cancel)
            except Cancelled:
                raise
            except (EMClipError, ValueError, TypeError) as exc:
                raise _with_context(exc, path, done, len(images)) from exc
            if not quiet:
                tqdm.write(_summary(path.name, result), file=sys.stdout)
    bar.close()
    return 0


def _segment_file(
    path: Path,
    prompts: list[str],
    model: Any,
    out_dir: Path,
    args: argparse.Namespace,
    cancel: Callable[[], bool],
) -> Any:
    """Segment one image file and write its outputs (atomically); returns the result."""
    from ..errors import InvalidArgumentError
    from ..inference import segment, segment_stack
    from ..io import read_image, write_mask_tiff, write_overlay_png

    image = read_image(path)
    if args.axis is not None and image.ndim == 2:
        raise InvalidArgumentError(
            f"{path.name} is a 2D image ({image.shape[0]}x{image.shape[1]}); --axis is for stacks, leave it out"
        )
    steps, progress = progress_bar(path.name, "it", quiet=args.quiet, leave=False, position=1)
    options = dict(
        modality=args.modality,
        threshold=args.threshold,
        tile_size=args.tile_size,
        min_area=args.min_area,
        channel_axis=args.channel_axis,
        progress=progress,
        cancel=cancel,
        mirror=args.mirror,
    )
    if getattr(args, "exemplar_list", None):
        options.update(exemplars=args.exemplar_list, exemplar_mode=args.exemplar_mode)
    axis = args.axis if args.axis is not None else 0
    try:
        if _is_stack(image, args.axis, args.channel_axis):
            result = segment_stack(image, prompts, model, axis=axis, **options)
        else:
            result = segment(image, prompts, model, coarse_to_fine=args.coarse_to_fine, **options)
    finally:
        steps.close()
    if not result.prompts:  # prompt-free and nothing found: no masks to write
        return result
    mask_path, *overlay_path = output_paths(path, out_dir, not args.no_overlay)
    write_mask_tiff(
        mask_path,
        result.masks,
        result.prompts,
        metadata={
            "source": path.name,
            "model": str(args.model) if args.model else "default",
            "modality": result.info.get("modality", args.modality),
            "threshold": result.threshold,
            "min_area": result.min_area,
            "found": result.found,
            "scores": result.scores,
            "areas": result.areas,
            "max_probability": result.max_probability,
            "stack_axis": result.stack_axis,
            "tiled": result.tiled,
        },
    )
    if overlay_path:
        if result.stack_axis is not None:
            plane, masks, channels = _overlay_slice(image, result, axis, args.channel_axis)
            write_overlay_png(
                overlay_path[0], plane, masks, prompt_names=result.prompts, channel_axis=channels
            )
        else:
            write_overlay_png(overlay_path[0], image, result, channel_axis=args.channel_axis)
    return result
