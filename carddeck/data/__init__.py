"""Datasets, corruptions and augmentation domains (numpy/scipy; no torch)."""

from carddeck.data.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
