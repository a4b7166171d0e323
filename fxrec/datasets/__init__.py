"""fxrec.datasets: data sources that yield fxrec batches.

- `SyntheticCriteo`: a Criteo-like click log with a learnable hidden signal.
- `CriteoTsvReader` / `CriteoNpyReader`: the Criteo TSV logs and TorchRec's ``.npy`` layout.
- `load_movielens`, `synthetic_interactions`, splits and `TwoTowerBatches` for retrieval.
"""
from __future__ import annotations

from fxrec.datasets.batch import Batch, make_batch
from fxrec.datasets.criteo import MISSING_ID, SPARSE_KEYS, CriteoTsvReader
from fxrec.datasets.criteo_npy import CriteoNpyReader, find_npy_splits
from fxrec.datasets.interactions import Interactions, leave_last_out, synthetic_interactions, train_test_split_by_time
from fxrec.datasets.movielens import load_movielens
from fxrec.datasets.retrieval import TwoTowerBatches
from fxrec.datasets.synthetic import SyntheticCriteo, TableSpec

__all__ = [
    "Batch",
    "CriteoNpyReader",
    "CriteoTsvReader",
    "Interactions",
    "MISSING_ID",
    "SPARSE_KEYS",
    "SyntheticCriteo",
    "TableSpec",
    "TwoTowerBatches",
    "find_npy_splits",
    "leave_last_out",
    "load_movielens",
    "make_batch",
    "synthetic_interactions",
    "train_test_split_by_time",
]
