"""Sample data for File ▸ Open Sample ▸ napari-emclip (no network, nothing downloaded).

The images themselves (and their licences) live in :mod:`emclip.samples`; this module only wraps
them as napari layer data.
"""

from __future__ import annotations

from typing import Any

from emclip.samples import (  # noqa: F401  (re-exported for tests and the demo)
    FUNDUS_CITATION,
    PHANTOM_NOTE,
    PHANTOM_STRUCTURES,
    cardiac_phantom,
    fundus_image,
    retina_path,
)

LayerData = tuple[Any, dict[str, Any], str]


def fundus_sample() -> list[LayerData]:
    """Sample contribution: the fundus photograph as an RGB image layer."""
    return [
        (
            fundus_image(),
            {
                "name": "fundus photograph",
                "rgb": True,
                "metadata": {"source": FUNDUS_CITATION, "modality": "fundus"},
            },
            "image",
        )
    ]


def cardiac_sample() -> list[LayerData]:
    """Sample contribution: the synthetic cardiac MRI stack and its (hidden) reference labels."""
    image, labels = cardiac_phantom()
    scale = (8.0, 1.25, 1.25)
    meta = {"source": PHANTOM_NOTE, "modality": "cardiac_mri", "synthetic": True}
    return [
        (
            image,
            {"name": "cardiac MRI phantom (synthetic)", "scale": scale, "metadata": meta},
            "image",
        ),
        (
            labels,
            {
                "name": "phantom reference",
                "scale": scale,
                "visible": False,
                "features": {"index": [1, 2, 3], "name": list(PHANTOM_STRUCTURES)},
                "metadata": meta,
            },
            "labels",
        ),
    ]
