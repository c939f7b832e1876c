"""Datasets: the project's folder format (dataset.yaml + images/ + masks/), NIfTI volumes,
grouped splits, augmentation and network-ready prompted samples."""

from .folder import FolderDataset, Sample, open_dataset
from .format import DatasetSpec, read_meta, read_spec
from .splits import Split, grouped_split, split_dataset

__all__ = [
    "DatasetSpec",
    "FolderDataset",
    "Sample",
    "Split",
    "grouped_split",
    "open_dataset",
    "read_meta",
    "read_spec",
    "split_dataset",
]
