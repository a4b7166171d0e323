"""Reader of the preprocessed binary Criteo layout written by TorchRec's scripts.

Each split (a day of the Terabyte log, or a slice of Kaggle) is three ``.npy`` files
sharing a stem: ``<stem>_dense.npy`` (N x 13 float, already transformed by the
preprocessing, TorchRec: ``log(x + 3)``; passed through as float32), ``<stem>_sparse.npy``
(N x 26 integers, ``int(hex, 16)`` stored as int32) and ``<stem>_labels.npy`` (N or
N x 1, values 0/1). Arrays are memory-mapped, so a day of 200 M rows costs no RAM
until its batches are read.

Hashing follows TorchRec's reader: ``id = value mod n`` with floor modulo, so the
negative int32 values that hex ids >= 2**31 wrap to also land in ``[0, n)``. Without
hashing, a negative id is an error.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from fxrec.datasets.batch import Batch, make_batch
from fxrec.datasets.criteo import NUM_DENSE, NUM_SPARSE, SPARSE_KEYS, PathLike, count_option, table_sizes

_PARTS = ("dense", "sparse", "labels")


def _natural_key(text: str) -> list:
    # day_2 before day_10
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def find_npy_splits(directory: PathLike) -> list[Path]:
    """The stems ``<dir>/<name>`` of every ``<name>_dense.npy`` in ``directory``,
    in natural order (``day_2`` before ``day_10``)."""
    directory = Path(directory)
    stems = [p.with_name(p.name[: -len("_dense.npy")]) for p in directory.glob("*_dense.npy")]
    if not stems:
        raise FileNotFoundError(f"no *_dense.npy files in {directory}")
    return sorted(stems, key=lambda p: _natural_key(p.name))


def _stem(path: Path) -> Path:
    """The stem a path names: ``dir/day_0`` itself, or one of its three files
    (``dir/day_0_dense.npy``), which a shell's tab completion hands over as readily."""
    for part in _PARTS:
        suffix = f"_{part}.npy"
        if path.name.endswith(suffix) and len(path.name) > len(suffix) and path.is_file():
            return path.with_name(path.name[: -len(suffix)])
    return path


class _Split:
    """One stem's three arrays, shape-checked."""

    def __init__(self, stem: Path, mmap: bool):
        self.files = {part: Path(f"{stem}_{part}.npy") for part in _PARTS}
        mode = "r" if mmap else None
        arrays = {}
        for part, path in self.files.items():
            if not path.is_file():
                raise FileNotFoundError(f"Criteo split {stem}: missing file {path}")
            try:
                arrays[part] = np.load(path, mmap_mode=mode, allow_pickle=False)
            except (ValueError, EOFError) as err:  # EOFError: an empty or cut file
                raise ValueError(f"{path}: not a readable .npy array ({err})") from err
        self.dense, self.sparse, self.labels = arrays["dense"], arrays["sparse"], arrays["labels"]
        self._check_shapes()
        self.rows = int(self.dense.shape[0])

    def _check_shapes(self) -> None:
        d, s, l = self.dense, self.sparse, self.labels
        f = self.files
        if d.ndim != 2 or d.shape[1] != NUM_DENSE or not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
            raise ValueError(f"{f['dense']}: expected an N x {NUM_DENSE} real array, got shape {d.shape} dtype {d.dtype}")
        if s.ndim != 2 or s.shape[1] != NUM_SPARSE or not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"{f['sparse']}: expected an N x {NUM_SPARSE} integer array, got shape {s.shape} dtype {s.dtype}")
        if not (l.ndim == 1 or (l.ndim == 2 and l.shape[1] == 1)) or l.dtype.kind not in "biuf":
            raise ValueError(f"{f['labels']}: expected an N or N x 1 numeric array, got shape {l.shape} dtype {l.dtype}")
        for part, arr in (("sparse", s), ("labels", l)):
            if arr.shape[0] != d.shape[0]:
                raise ValueError(
                    f"{f[part]}: has {arr.shape[0]} rows but {f['dense']} has {d.shape[0]}; the three files of a split must match"
                )

    def read(self, start: int, stop: int, sizes: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) as (float32 dense, int64 ids, float32 labels), checked."""
        dense = np.asarray(self.dense[start:stop], dtype=np.float32)
        raw = np.asarray(self.sparse[start:stop])
        if raw.dtype == np.uint64 and sizes is not None:  # hash in uint64: past 2**63 int64 would wrap
            raw = np.mod(raw, np.asarray(sizes, dtype=np.uint64))
        elif raw.dtype == np.uint64 and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            r, c = (int(x[0]) for x in np.nonzero(raw > np.iinfo(np.int64).max))
            raise ValueError(f"{self.files['sparse']}: row {start + r}: {SPARSE_KEYS[c]} has id {int(raw[r, c])}, "
                             f"past int64; pass num_embeddings_per_feature to hash it into range")
        ids = raw.astype(np.int64)
        labels = np.asarray(self.labels[start:stop], dtype=np.float64).reshape(-1)
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            row = start + int(bad[0])
            value = np.asarray(self.labels[row]).reshape(-1)[0].item()  # as stored, not as float
            raise ValueError(f"{self.files['labels']}: row {row}: label must be 0 or 1, got {value}")
        bad_rows = np.flatnonzero(~np.isfinite(dense).all(axis=1))
        if bad_rows.size:
            row = start + int(bad_rows[0])
            col = int(np.flatnonzero(~np.isfinite(dense[bad_rows[0]]))[0])
            raise ValueError(f"{self.files['dense']}: row {row}: column {col} is not finite ({dense[bad_rows[0], col]})")
        if sizes is not None:
            ids = np.mod(ids, np.asarray(sizes, dtype=np.int64))
        elif ids.size and ids.min() < 0:
            r, c = (int(x[0]) for x in np.nonzero(ids < 0))
            raise ValueError(
                f"{self.files['sparse']}: row {start + r}: {SPARSE_KEYS[c]} has negative id {ids[r, c]}; "
                "pass num_embeddings_per_feature to hash it into range"
            )
        return dense, ids, labels.astype(np.float32)


class CriteoNpyReader:
    """An iterable of `Batch` over preprocessed ``.npy`` splits, in the order given.

    ``paths``: stems (``dir/day_0`` for ``dir/day_0_dense.npy`` ...; one of the three
    files names its stem too), directories (all their splits, natural order), or a list
    mixing both. Batches run across split
    boundaries; the last, partial batch is yielded unless ``drop_last``. ``limit``
    caps the total number of rows. Shapes are checked at construction; values (labels
    0/1, finite dense, non-negative ids) as each batch is read.
    """

    def __init__(
        self,
        paths: PathLike | Iterable[PathLike],
        batch_size: int = 512,
        num_embeddings_per_feature: int | Sequence[int] | None = None,
        drop_last: bool = False,
        limit: int | None = None,
        mmap: bool = True,
    ):
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        stems: list[Path] = []
        for item in items:
            stems.extend(find_npy_splits(item) if Path(item).is_dir() else [_stem(Path(item))])
        if not stems:
            raise ValueError("CriteoNpyReader: no splits given")
        self.batch_size = count_option(batch_size, 1, "CriteoNpyReader: batch_size")
        limit = None if limit is None else count_option(limit, 0, "CriteoNpyReader: limit")
        self.sizes = table_sizes(num_embeddings_per_feature)
        self.splits = [_Split(stem, mmap) for stem in stems]
        self.drop_last = bool(drop_last)
        total = sum(s.rows for s in self.splits)
        self.num_rows = total if limit is None else min(total, limit)

    @property
    def keys(self) -> list[str]:
        return list(SPARSE_KEYS)

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _pieces(self) -> Iterator[tuple[_Split, int, int]]:
        left = self.num_rows
        for split in self.splits:
            take = min(split.rows, left)
            if take:
                yield split, 0, take
            left -= take

    def __iter__(self) -> Iterator[Batch]:
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        have = 0
        for split, start, stop in self._pieces():
            while start < stop:
                end = min(stop, start + self.batch_size - have)
                pending.append(split.read(start, end, self.sizes))
                have += end - start
                start = end
                if have == self.batch_size:
                    yield _to_batch(pending)
                    pending, have = [], 0
        if pending and not self.drop_last:
            yield _to_batch(pending)


def _to_batch(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    dense = torch.from_numpy(np.concatenate([p[0] for p in pieces]))
    ids = torch.from_numpy(np.concatenate([p[1] for p in pieces]))
    labels = torch.from_numpy(np.concatenate([p[2] for p in pieces]))
    ones = torch.ones(labels.shape[0], dtype=torch.int32)
    return make_batch(SPARSE_KEYS, dense, list(ids.t().unbind(0)), [ones] * NUM_SPARSE, labels)
