"""Datasets as in-memory tensors, seeded splits, and batches of indices.

- :func:`load_dataset` reads a registered source (:data:`DATASETS`, :func:`dataset_names`) into a
  :class:`Dataset`: images ``float32 [N, C, H, W]`` in [0, 1], labels ``int64 [N]``.
- :func:`make_split` cuts it into a class-balanced, seeded :class:`Split` (labelled, unlabelled,
  validation, test index tensors); :func:`batch_indices` cuts an index tensor into batches, and
  :func:`binarize` draws dynamically binarised images.
- :func:`download` fetches MNIST and Fashion-MNIST, MD5-checked, into :func:`cache_dir`;
  :func:`read_idx` and :func:`write_idx` read and write their IDX files.
"""

from pyrossl.data.dataset import Dataset, Split
from pyrossl.data.download import cache_dir, download
from pyrossl.data.idx import read_idx, write_idx
from pyrossl.data.sources import DATASETS, dataset_names, load_dataset
from pyrossl.data.splits import batch_indices, binarize, make_split

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "batch_indices",
    "binarize",
    "cache_dir",
    "dataset_names",
    "download",
    "load_dataset",
    "make_split",
    "read_idx",
    "write_idx",
]
