"""Datasets: readers for the official layouts, the demo dataset, the describe CLI."""

from usss_jax.data.base import DataError, DatasetReader, DatasetSpec, Example
from usss_jax.data.registry import READERS, get_reader

__all__ = ["DataError", "DatasetReader", "DatasetSpec", "Example", "READERS", "get_reader"]
