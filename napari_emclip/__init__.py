"""napari-emclip: text-prompted segmentation with EM-CLIP in napari.

Importing this package is cheap: the widget, samples and writer live in private modules that
napari loads on demand (see ``napari.yaml``), and torch is only imported on the first Run.
"""

from __future__ import annotations

from emclip._version import __version__

__all__ = ["__version__"]
