"""Datasets, task streams and batches."""
from jaxcl.data.batches import Pool, augment, batches, epoch_order, num_batches, pool
from jaxcl.data.sources import KNOWN, DataError, Dataset, checked, load, load_digits, load_npz, load_tfds
from jaxcl.data.streams import Stream, StreamInfo, Task, build, multi, permuted, rotated, split

__all__ = [
    "KNOWN", "DataError", "Dataset", "Pool", "Stream", "StreamInfo", "Task", "augment", "batches", "build",
    "checked", "epoch_order", "load", "load_digits", "load_npz", "load_tfds", "multi", "num_batches",
    "permuted", "pool", "rotated", "split",
]
