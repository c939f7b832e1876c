"""Reliability of the Python API on bad inputs (images, prompts, options), property-based.

Every call to :func:`emclip.segment` / :func:`emclip.segment_stack` with a generated input must
end in one of two ways: a valid :class:`SegmentationResult` (shapes match the image, masks bool,
probabilities finite in [0, 1]) or an emclip error that is a ``ValueError``/``TypeError`` with a
message. Anything else is a crash and fails the test; a call slower than ``HANG_SECONDS`` is a
hang and fails too. Huge declared dimensions use zero-stride views, so nothing big is allocated.

The counts (inputs tried, valid results, clear errors, crashes, hangs) go to the session-wide
``reliability_counts`` (tests/conftest.py), printed at the end of the run. Examples are
derandomised for a reproducible CI; ``EMCLIP_FUZZ=1`` explores randomly with 10x more examples.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import unicodedata
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from emclip import memory
from emclip.errors import (
    EMClipError,
    InsufficientMemoryError,
    InvalidImageError,
    InvalidPromptError,
)
from emclip.inference import (
    OutOfMemoryFallbackWarning,
    SegmentationResult,
    segment,
    segment_stack,
)
from emclip.preprocess import to_float_rgb
from emclip.prompts import MAX_PROMPT_CHARS, MAX_PROMPTS, parse_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = os.environ.get("EMCLIP_FUZZ") == "1"
HANG_SECONDS = 20.0
"""A single call slower than this counts as a hang (the slowest valid case takes ~0.5 s)."""
WATCHDOG_SECONDS = 300
"""A call still running after this long is a real hang: dump every thread's stack and exit, so
the run fails instead of blocking forever."""

FREE_MEMORY = 256 * 2**20
"""Free memory the API is told it has, so that huge declared images are refused deterministically."""


def _settings(n: int) -> settings:
    return settings(
        max_examples=n * 10 if FUZZ else n,
        deadline=None,
        database=None,
        derandomize=not FUZZ,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def _bounded_memory_one_thread_quiet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny passes: threads only add overhead on a shared machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memory, "available_memory", lambda: FREE_MEMORY)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def counts(reliability_counts):
    for key in ("crashes", "hangs"):
        reliability_counts[key] += 0
    return reliability_counts


def attempt(label: str, call: Callable[[], Any], counts) -> Any:
    """Run ``call`` and classify the outcome; a crash or a hang fails the test (and is counted)."""
    counts[f"{label}: inputs tried"] += 1
    start = time.perf_counter()
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True, file=sys.__stderr__)
    try:
        out = call()
    except (ValueError, TypeError) as exc:
        if not isinstance(exc, EMClipError) or len(str(exc).strip()) < 10:
            counts["crashes"] += 1
            raise AssertionError(
                f"not an emclip error with a message: {type(exc).__name__}: {exc!r}"
            ) from exc
        out = exc
        counts[f"{label}: clear errors"] += 1
    except Exception as exc:
        counts["crashes"] += 1
        raise AssertionError(f"crash: {type(exc).__name__}: {exc}") from exc
    else:
        counts[f"{label}: valid results"] += 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - start
    if elapsed > HANG_SECONDS:
        counts["hangs"] += 1
        raise AssertionError(f"{label} took {elapsed:.1f} s (hang)")
    return out


# --------------------------------------------------------------------------- strategies

INT_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64, np.longdouble]
ODD_DTYPES = [np.complex64, object, "U3", "datetime64[s]", "V4"]
VALUES = [
    "random",
    "constant",
    "some-nan",
    "some-inf",
    "all-nan",
    "negative",
    "extremes",
    "subnormal",
    "huge",
]


def _fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, values: str) -> np.ndarray:
    """An array of ``shape``/``dtype`` holding the kind of ``values`` asked for (where it applies)."""
    dt = np.dtype(dtype)
    if dt.kind not in "biuf":
        return np.zeros(shape, dtype=dt)
    if dt.kind == "b":
        return rng.random(shape) > 0.5 if values != "constant" else np.ones(shape, bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if values == "constant":
            return np.full(shape, info.max // 3, dtype=dt)
        if values == "extremes":
            return np.resize(np.array([info.min, info.max], dtype=dt), shape)
        lo = info.min if values == "negative" and info.min < 0 else 0
        hi = info.max if values in ("huge", "negative") else min(info.max, 4095)
        return rng.integers(lo, hi, size=shape, dtype=dt, endpoint=True)
    info = np.finfo(dt)
    base = rng.random(shape)
    if values == "constant":
        return np.full(shape, 7.25, dtype=dt)
    if values == "negative":
        return (-base * 1000).astype(dt)
    if values == "extremes":
        return np.resize(np.array([-info.max, info.max, 0], dtype=dt), shape)
    if values == "subnormal":
        return (base * float(info.smallest_subnormal) * 4).astype(dt)
    if values == "huge":
        return (base * float(info.max) / 2).astype(dt)
    out = base.astype(dt)
    if out.size and values in ("some-nan", "some-inf", "all-nan"):
        flat = out.reshape(-1)
        if values == "all-nan":
            flat[:] = np.nan
        else:
            pick = rng.random(flat.size) < 0.05
            pick[0] = True
            flat[pick] = np.nan if values == "some-nan" else -np.inf
    return out


def _zero_stride(shape: tuple[int, ...], dtype: Any, value: float) -> np.ndarray:
    """A read-only array of any declared size that takes one element of memory."""
    one = np.array([value]).astype(dtype)
    view = np.lib.stride_tricks.as_strided(one, shape=shape, strides=(0,) * len(shape))
    view.flags.writeable = False
    return view


@st.composite
def images(draw) -> tuple[np.ndarray, Any, str]:
    """(array, channel_axis, description) covering the shapes, dtypes and values users pass."""
    layout = draw(
        st.sampled_from(
            ["2d"] * 5
            + ["hwc"] * 2
            + ["chw", "thin", "thin", "stack", "4d", "5d", "1d", "0d", "huge", "huge"]
        )
    )
    side = st.one_of(
        st.sampled_from(range(8, 73)), st.sampled_from(range(8, 73)), st.integers(0, 72)
    )
    if layout == "2d":
        shape = (draw(side), draw(side))
    elif layout == "hwc":
        shape = (draw(side), draw(side), draw(st.sampled_from([1, 2, 3, 4, 5])))
    elif layout == "chw":
        shape = (
            draw(st.sampled_from([1, 3, 4])),
            draw(st.integers(5, 72)),
            draw(st.integers(5, 72)),
        )
    elif layout == "stack":
        shape = (draw(st.sampled_from([2, 5, 6])), draw(side), draw(side))
    elif layout == "4d":
        shape = (draw(st.integers(1, 3)), 3, draw(st.integers(8, 24)), draw(st.integers(8, 24)))
    elif layout == "5d":
        shape = (1, draw(st.integers(1, 2)), 3, draw(st.integers(8, 16)), draw(st.integers(8, 16)))
    elif layout == "1d":
        shape = (draw(st.integers(0, 500)),)
    elif layout == "0d":
        shape = ()
    elif layout == "thin":
        thin, long = draw(st.integers(1, 12)), draw(st.integers(8, 700))
        shape = (thin, long) if draw(st.booleans()) else (long, thin)
    else:  # huge declared dimensions, zero-stride: refused, never allocated
        dims = [draw(st.integers(5_000, 2_000_000)) for _ in range(2)]
        if draw(st.booleans()):
            dims.append(3)
        dtype = draw(st.sampled_from(INT_DTYPES + FLOAT_DTYPES[:3] + [np.bool_]))
        value = draw(st.sampled_from([0.0, 1.0, float("nan")]))
        return _zero_stride(tuple(dims), dtype, value), None, f"huge {dims} {np.dtype(dtype)}"
    dtype = draw(st.sampled_from([np.bool_] + INT_DTYPES + FLOAT_DTYPES + ODD_DTYPES))
    values = draw(st.sampled_from(VALUES + ["random"] * 4))
    seed = draw(st.integers(0, 2**32 - 1))
    arr = _fill(np.random.default_rng(seed), shape, dtype, values)
    if draw(st.integers(0, 9)) == 0 and arr.ndim >= 2:
        arr = arr[::-1, ::2] if arr.shape[1] >= 16 else np.asfortranarray(arr)
    channel_axis = draw(st.sampled_from([None] * 12 + [-4, -1, 0, 1, 2, 3, 4, "x", 1.5, True]))
    return arr, channel_axis, f"{layout} {shape} {np.dtype(dtype)} {values}"


@st.composite
def volumes(draw) -> tuple[np.ndarray, Any, str]:
    """(array, channel_axis, description) for segment_stack: mostly 3D/4D, some of other ranks."""
    layout = draw(st.sampled_from(["zyx"] * 4 + ["zyxc"] * 3 + ["2d", "5d", "huge"]))
    side = st.sampled_from(range(4, 49))  # uniform: integers() favours the (failing) edges
    if layout == "zyx":
        shape = (draw(st.sampled_from([1, 2, 3, 4, 5, 6, 0])), draw(side), draw(side))
    elif layout == "zyxc":
        shape = (
            draw(st.sampled_from([1, 2, 3, 4])),
            draw(side),
            draw(side),
            draw(st.sampled_from([1, 3, 4, 3, 2, 5])),
        )
    elif layout == "2d":
        shape = (draw(side), draw(side))
    elif layout == "5d":
        shape = (1, 2, 3, 16, 16)
    else:
        dims = (
            draw(st.integers(1_000, 100_000)),
            draw(st.integers(500, 5_000)),
            draw(st.integers(500, 5_000)),
        )
        return _zero_stride(dims, np.uint8, 1), None, f"huge {dims}"
    dtype = draw(
        st.sampled_from(
            [np.bool_, np.uint8, np.int16, np.uint16, np.float32, np.float64, np.complex64]
        )
    )
    values = draw(st.sampled_from(VALUES + ["random"] * 4))
    arr = _fill(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), shape, dtype, values)
    channel_axis = draw(st.sampled_from([None] * 12 + [-1, 0, 3, -5, "x", True]))
    return arr, channel_axis, f"{layout} {shape} {np.dtype(dtype)} {values}"


@st.composite
def valid_volumes(draw) -> tuple[np.ndarray, Any, str]:
    """Volumes segment_stack must segment: 3D or channel-last 4D, finite numbers, sides >= 8."""
    shape = (
        draw(st.sampled_from(range(1, 10))),
        draw(st.sampled_from(range(8, 49))),
        draw(st.sampled_from(range(8, 49))),
    )
    if draw(st.booleans()):
        shape += (draw(st.sampled_from([1, 3, 4])),)
    dtype = draw(st.sampled_from([np.bool_, np.uint8, np.int16, np.uint16, np.float32, np.float64]))
    values = draw(
        st.sampled_from(["random", "constant", "negative", "extremes", "subnormal", "huge"])
    )
    arr = _fill(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), shape, dtype, values)
    return arr, None, f"valid {shape} {np.dtype(dtype)} {values}"


_WORDS = [
    "optic disc",
    "optic cup",
    "Optic Disc",
    "left ventricle",
    "myocardium",
    "视盘",
    "视杯",
    "émoji 🧠",
    "ﬁbre",
    "cup",
    "x",
]
_STRANGE = [
    "\x00",
    "\x07",
    "\x1b[31m",
    "\x1b[0m",
    "\x7f",
    "\x85",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\u2028",
    "\udcff",
    "\ud800",
    "\t",
    "\r\n",
    ",",
    ";",
    "\xa0",
    "\u0301",
]
_TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(_STRANGE)), max_size=40).map("".join)
_MANY_WORDS = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6),
    min_size=50,
    max_size=100,
    unique=True,
)

prompts_strategy = st.one_of(
    _TEXT,
    st.lists(_TEXT, max_size=6),
    st.lists(st.sampled_from(_WORDS), min_size=1, max_size=100).map(", ".join),
    _MANY_WORDS.map(", ".join),
    _MANY_WORDS,
    st.integers(0, 20).map(lambda n: "," * n + " " * (n % 3) + ";" * (n % 2)),
    st.sampled_from([" ", "\t\n", "\u3000", "\u200b\u200b", "\x00\x00"]),
    st.integers(MAX_PROMPT_CHARS - 2, 10_000).map(lambda n: "a" * n),
    st.integers(1, 2_500).map(lambda n: " ".join(["cup"] * n)),
    st.sampled_from([None, 5, 1.5, b"optic cup", bytearray(b"cup"), ["a", 3], [["a"]], [None]]),
)


# --------------------------------------------------------------------------- checks


def _expected_spatial(arr: np.ndarray, channel_axis: Any) -> tuple[int, ...]:
    if arr.ndim == 2:
        return tuple(arr.shape)
    if channel_axis is not None:
        return tuple(np.delete(np.array(arr.shape), int(channel_axis) % arr.ndim))
    if arr.shape[-1] in (1, 3, 4):
        return tuple(arr.shape[:2])
    return tuple(arr.shape[1:])


def check_result(res: Any, spatial: tuple[int, ...], threshold: float = 0.5) -> None:
    """Everything a caller relies on in a SegmentationResult."""
    assert isinstance(res, SegmentationResult)
    n = len(res.prompts)
    assert 1 <= n <= MAX_PROMPTS
    for p in res.prompts:
        assert isinstance(p, str) and p.strip() == p and 0 < len(p) <= MAX_PROMPT_CHARS
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in p), repr(p)
    assert len({p.casefold() for p in res.prompts}) == n, "duplicates were kept"
    assert res.masks.dtype == bool and res.masks.shape == (n,) + spatial
    probs = res.probabilities
    assert probs.dtype == np.float32 and probs.shape == (n,) + spatial
    assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
    assert not (res.masks & (probs <= threshold)).any(), "a mask pixel is below the threshold"
    assert res.found.dtype == bool and res.found.shape == (n,)
    np.testing.assert_array_equal(res.areas, res.masks.reshape(n, -1).sum(1))
    assert np.isfinite(res.scores).all() and np.isfinite(res.max_probability).all()
    assert res.cluster_map.dtype == np.int32 and res.cluster_map.shape == spatial
    assert res.cluster_map.min() >= 0
    assert np.isfinite(res.cluster_similarity).all()
    assert res.label_image().shape == spatial


# --------------------------------------------------------------------------- property tests


@_settings(300)
@given(data=images())
def test_generated_images_give_a_result_or_a_clear_error(tiny_model, counts, data):
    arr, channel_axis, what = data
    out = attempt(
        "segment: images",
        lambda: segment(arr, "optic disc, cup", tiny_model, channel_axis=channel_axis),
        counts,
    )
    if isinstance(out, SegmentationResult):
        check_result(out, _expected_spatial(arr, channel_axis))
    elif what.startswith("huge"):  # huge declared size: refused up front, never run
        assert isinstance(out, InvalidImageError)


options = st.fixed_dictionaries(
    {
        "threshold": st.one_of(
            st.just(0.5),
            st.floats(-1, 2),
            st.sampled_from([0, 1, float("nan"), float("inf"), "0.3", "high", None, True]),
        ),
        "min_area": st.one_of(st.none(), st.integers(-5, 10**7), st.sampled_from([1.5, "3", True])),
        "tile_size": st.one_of(
            st.none(), st.sampled_from([0, 5, 31, 32, 48, 64, 10**9, -1, 2.0, "64", True])
        ),
        "batch_size": st.sampled_from([4, 1, 2, 0, -3, 10**6, 2.5, True, "4"]),
        "modality": st.one_of(
            st.none(), st.sampled_from(["fundus", "cardiac MRI", "", "brain"]), _TEXT, st.integers()
        ),
        "device": st.sampled_from([None, None, "cpu", "auto", "gpu", "cuda:7", 7]),
        "model": st.sampled_from(["tiny-instance"] * 6 + ["no/such/model", 123, "linear"]),
    }
)


DEFAULTS = {
    "threshold": 0.5,
    "min_area": None,
    "tile_size": None,
    "batch_size": 4,
    "modality": None,
    "device": None,
    "model": "tiny-instance",
}


@_settings(200)
@given(
    prompts=prompts_strategy, opts=st.one_of(st.just(DEFAULTS), options), seed=st.integers(0, 2**16)
)
def test_generated_prompts_and_options_give_a_result_or_a_clear_error(
    tiny_model, counts, prompts, opts, seed
):
    image = np.random.default_rng(seed).integers(0, 255, (40, 56), dtype=np.uint8)
    model = {"tiny-instance": tiny_model, "linear": torch.nn.Linear(2, 2)}.get(
        opts["model"], opts["model"]
    )
    kwargs = {k: v for k, v in opts.items() if k != "model"}
    out = attempt(
        "segment: prompts+options", lambda: segment(image, prompts, model, **kwargs), counts
    )
    if isinstance(out, SegmentationResult):
        check_result(out, (40, 56), float(kwargs["threshold"]))
        assert out.prompts == parse_prompts(prompts)


@_settings(120)
@given(
    data=st.one_of(valid_volumes(), volumes()),
    axis=st.sampled_from([0] * 6 + [1, 2, -1, 3, 9, "z", None]),
)
def test_generated_stacks_give_a_result_or_a_clear_error(tiny_model, counts, data, axis):
    arr, channel_axis, _ = data
    out = attempt(
        "segment_stack: volumes",
        lambda: segment_stack(
            arr, ["optic disc"], tiny_model, axis=axis, channel_axis=channel_axis, batch_size=3
        ),
        counts,
    )
    if isinstance(out, SegmentationResult):
        channel = None if arr.ndim == 3 else (-1 if channel_axis is None else channel_axis) % 4
        spatial = tuple(n for i, n in enumerate(arr.shape) if i != channel)
        assert out.masks.shape == out.probabilities.shape == (1,) + spatial
        assert out.cluster_map.shape == spatial and out.masks.dtype == bool
        assert np.isfinite(out.probabilities).all()
        assert 0.0 <= out.probabilities.min() and out.probabilities.max() <= 1.0
        assert out.slice_found.shape == (out.masks.shape[1 + out.stack_axis], 1)


@_settings(500)
@given(prompts=prompts_strategy)
def test_parse_prompts_cleans_or_refuses(counts, prompts):
    out = attempt("parse_prompts", lambda: parse_prompts(prompts), counts)
    if isinstance(out, Exception):
        assert isinstance(out, InvalidPromptError)
        return
    assert 1 <= len(out) <= MAX_PROMPTS
    assert len({p.casefold() for p in out}) == len(out)
    for p in out:
        assert p and p == " ".join(p.split()) and len(p) <= MAX_PROMPT_CHARS
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in p)
        p.encode("utf-8")  # printable and writable to any UTF-8 file or terminal


@_settings(300)
@given(data=images())
def test_intensity_normalisation_is_finite_in_unit_range(counts, data):
    arr, channel_axis, _ = data
    out = attempt("to_float_rgb", lambda: to_float_rgb(arr, channel_axis), counts)
    if isinstance(out, np.ndarray):
        assert out.dtype == np.float32 and out.ndim == 3 and out.shape[-1] == 3
        assert out.shape[:2] == _expected_spatial(arr, channel_axis)[:2]
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


# --------------------------------------------------------------------------- the list, by name


def _img(shape, dtype=np.uint8, fill=None):
    rng = np.random.default_rng(0)
    if fill is not None:
        return np.full(shape, fill, dtype=dtype)
    return (rng.random(shape) * 200).astype(dtype)


BAD_IMAGES = {
    "empty": (np.zeros((0, 0)), "empty"),
    "1x1": (np.zeros((1, 1)), "1x1 pixels"),
    "1xN": (np.zeros((1, 300)), "1x300 pixels"),
    "Nx1": (np.zeros((300, 1)), "300x1 pixels"),
    "all NaN": (np.full((32, 32), np.nan), "NaN"),
    "one inf": (np.where(np.eye(32) > 0, np.inf, 1.0), "infinite"),
    "4-D": (np.zeros((2, 3, 32, 32)), "segment_stack"),
    "5-D": (np.zeros((1, 2, 3, 32, 32)), "2D image"),
    "2 channels": (np.zeros((32, 32, 2)), "channel_axis"),
    "complex": (np.zeros((32, 32), np.complex64), "dtype"),
    "strings": (np.full((32, 32), "a"), "dtype"),
    "masked": (np.ma.masked_greater(np.arange(1024.0).reshape(32, 32), 1000), "masked"),
    "gigantic 2**31+ px": (_zero_stride((50_000, 50_000), np.uint8, 0), "segment a crop"),
    "gigantic for free memory": (_zero_stride((20_000, 20_000, 3), np.float32, 1), "free"),
    "list of lists": ([[1, 2], [3, 4]], "numpy array"),
    "None": (None, "numpy array"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_each_bad_image_kind_has_a_message_that_says_what_to_do(tiny_model, counts, name):
    image, needle = BAD_IMAGES[name]
    counts["segment: named bad images: inputs tried"] += 1
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match=needle.replace("*", r"\*")):
        segment(image, "optic disc", tiny_model)
    assert time.perf_counter() - start < 5, "refusing an input must not take long"


GOOD_IMAGES = {
    "constant": _img((40, 40), np.float32, 3.0),
    "negative": -_img((40, 40), np.float64),
    "int16 signed": (_img((40, 40), np.float32) * 300 - 30000).astype(np.int16),
    "uint16 full range": np.resize(np.array([0, 65535, 1234], np.uint16), (40, 40)),
    "float64 near its limits": np.resize(np.array([-1.7e308, 1.7e308, 0.0]), (40, 40)),
    "float32 subnormal": np.resize(np.array([0.0, 1e-45], np.float32), (40, 40)),
    "bool": _img((40, 40)) > 100,
    "RGBA": _img((40, 40, 4)),
    "thin 9 x 600": _img((9, 600)),
    "big-endian": _img((40, 40), np.float32).astype(">f4"),
}


@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_unusual_but_valid_images_are_segmented(tiny_model, counts, name):
    image = GOOD_IMAGES[name]
    counts["segment: named unusual valid images: inputs tried"] += 1
    res = segment(image, "optic disc, optic cup", tiny_model)
    check_result(res, image.shape[:2])


def test_constant_and_extreme_images_normalise_without_nan():
    assert not to_float_rgb(np.full((16, 16), 5.0)).any()  # constant -> all zeros
    extreme = to_float_rgb(np.resize(np.array([-1.7e308, 1.7e308]), (16, 16)))
    assert set(np.unique(extreme)) == {0.0, 1.0}
    tiny = to_float_rgb(np.resize(np.array([0.0, 5e-324]), (16, 16)))
    assert set(np.unique(tiny)) == {0.0, 1.0}  # a subnormal step is still a step
    with pytest.raises(InvalidImageError, match="float64 range"):
        to_float_rgb(np.full((16, 16), np.finfo(np.longdouble).max))
    if np.finfo(np.longdouble).max <= np.finfo(np.float64).max:
        pytest.skip("long double is float64 here")


def test_channel_first_and_channel_last_give_the_same_answer(tiny_model):
    hwc = _img((48, 64, 3))
    chw = np.ascontiguousarray(np.moveaxis(hwc, -1, 0))
    a = segment(hwc, "optic disc", tiny_model)
    b = segment(chw, "optic disc", tiny_model)
    c = segment(chw, "optic disc", tiny_model, channel_axis=0)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    np.testing.assert_allclose(a.probabilities, c.probabilities, atol=1e-6)
    rgba = np.concatenate([hwc, np.full((48, 64, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_allclose(
        segment(rgba, "optic disc", tiny_model).probabilities, a.probabilities, atol=1e-6
    )  # alpha is ignored


def test_a_thin_image_is_tiled_without_failing_its_overview(tiny_model):
    res = segment(_img((9, 700)), "optic disc", tiny_model)  # 700 > 8 * 64: tiled
    assert res.tiled and res.cluster_map.shape == (9, 700) and res.cluster_map.min() >= 1


def test_results_that_cannot_fit_are_refused_before_running(tiny_model, monkeypatch):
    calls = []
    image, prompts = np.zeros((400, 400), np.uint8), [f"p{i}" for i in range(10)]
    monkeypatch.setattr(tiny_model, "predict_logits", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(memory, "available_memory", lambda: 2 * 2**20)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* free.*crop"):
        segment(image, prompts, tiny_model)
    with pytest.raises(InvalidImageError, match="needs about"):
        segment_stack(np.zeros((40, 100, 100), np.uint8), "a", tiny_model)
    assert not calls, "the model ran although the result could not fit"
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: no check
    assert segment(image, prompts, tiny_model).masks.shape == (10, 400, 400)


@pytest.mark.parametrize(
    "prompts, needle",
    [
        ("", "empty"),
        ("   \t ", "empty"),
        (",,, ;;", "empty"),
        ("\u200b\ufeff", "empty"),
        (", ".join(f"s{i}" for i in range(100)), "at most 64"),
        ("x" * 10_000, "too long"),
        (b"optic cup", "decode"),
        (["cup", 3], "string"),
    ],
)
def test_each_bad_prompt_kind_has_a_message(tiny_model, counts, prompts, needle):
    counts["segment: named bad prompts: inputs tried"] += 1
    with pytest.raises(InvalidPromptError, match=needle):
        segment(np.zeros((32, 32), np.uint8), prompts, tiny_model)


def test_no_prompts_with_a_model_that_knows_no_structures_says_to_name_them(tiny_model, counts):
    """prompts=None means prompt-free mode; a model without known structures must say what to do."""
    counts["segment: named bad prompts: inputs tried"] += 1
    with pytest.raises(ValueError, match="name the structures"):
        segment(np.zeros((32, 32), np.uint8), None, tiny_model)


def test_prompt_cleaning_keeps_meaning_and_drops_noise():
    assert parse_prompts("optic disc, Optic Disc ,optic  disc; cup") == ["optic disc", "cup"]
    assert parse_prompts("\x1b[1;31moptic disc\x1b[0m") == ["optic disc"]  # pasted colour codes
    assert parse_prompts("optic\x00disc\u202e, c\u200bup\udcff") == ["optic disc", "cup"]
    assert parse_prompts(["a, b", "视盘", "émoji 🧠"]) == ["a, b", "视盘", "émoji 🧠"]
    assert len(parse_prompts(", ".join(f"s{i}" for i in range(64)))) == 64


# --------------------------------------------------------------------------- out of memory


def test_host_out_of_memory_falls_back_to_tiles_with_a_message(tiny_model, monkeypatch):
    from emclip.inference import single_image

    image = _img((300, 300))  # below the auto-tiling size of the 64 px model (512)
    reference = segment(image, "optic disc", tiny_model, tile_size=128)
    original = single_image.to_float_rgb

    def no_memory_for_big(arr, *args, **kwargs):  # tiles (128 px) and the overview (150 px) fit
        if arr.shape[0] * arr.shape[1] > 30_000:
            raise MemoryError("Unable to allocate 2.00 GiB for an array")
        return original(arr, *args, **kwargs)

    monkeypatch.setattr(single_image, "to_float_rgb", no_memory_for_big)
    with pytest.warns(OutOfMemoryFallbackWarning, match="out of memory.*128-pixel tiles"):
        res = segment(image, "optic disc", tiny_model)
    assert res.tiled and res.info["tile_size"] == 128
    check_result(res, (300, 300))
    np.testing.assert_allclose(res.probabilities, reference.probabilities, atol=1e-5)


def test_too_little_free_memory_for_the_whole_image_falls_back_to_tiles(tiny_model, monkeypatch):
    image = _img((400, 400))  # results need ~2.1 MB, a float RGB copy of the image ~2.6 MB
    monkeypatch.setattr(memory, "available_memory", lambda: int(2.3 * 2**20))
    with pytest.warns(OutOfMemoryFallbackWarning, match="needs about"):
        res = segment(image, "optic disc", tiny_model)
    assert res.tiled
    check_result(res, (400, 400))
    with pytest.raises(InsufficientMemoryError, match="crop"):  # too little even for the results
        segment(image, "optic disc, optic cup", tiny_model)


def test_gpu_out_of_memory_falls_back_to_the_cpu():
    """The last step of the fallback chain (no GPU here: a stand-in runner on 'cuda')."""
    from emclip.inference.out_of_memory import Plan, next_plan

    class Runner:
        device, size, moved = torch.device("cuda"), 64, []

        def set_device(self, device):
            self.moved.append(device)
            self.device = device

    runner = Runner()
    plan = Plan(tile=128, batch_size=1)
    with pytest.warns(OutOfMemoryFallbackWarning, match="CPU"):
        again = next_plan(plan, runner, RuntimeError("CUDA out of memory"))
    assert again == plan and runner.moved == [torch.device("cpu")]
    with pytest.raises(RuntimeError, match="out of memory"):  # nothing lighter on the CPU
        next_plan(plan, runner, RuntimeError("out of memory"))
