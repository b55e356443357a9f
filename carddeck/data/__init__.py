"""Datasets, corrupted suites, corruptions and augmentation domains (numpy/scipy; no torch)."""

from carddeck.data.corrupted import CorruptedSuite, load_corrupted
from carddeck.data.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "CorruptedSuite", "Dataset", "load_corrupted", "load_dataset"]
