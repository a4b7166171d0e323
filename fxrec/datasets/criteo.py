"""Streaming reader of the Criteo Kaggle / Terabyte click logs (TSV).

Each line is ``label <TAB> 13 integer columns <TAB> 26 hexadecimal categorical
columns`` (40 fields); any feature field may be empty, meaning missing. Files may be
plain text or gzip (``.gz``). The reader yields `Batch` objects whose sparse features
have keys ``cat_0 .. cat_25`` with exactly one id per bag.

Conventions (the reference DLRM's and TorchRec's):
- categorical id = ``int(hex, 16) % num_embeddings`` when a table size is given, else
  the raw ``int(hex, 16)``; a missing categorical becomes id ``MISSING_ID`` (0);
- dense value = ``log(max(x, 0) + 1)`` with ``log_transform=True`` (the default),
  else ``float(x)``; a missing integer becomes 0 before the transform (so 0 after it);
- label must be ``0`` or ``1``.
A malformed line raises `ValueError` naming the file, the 1-based line number and the
column. Lines that are entirely empty are skipped (they carry no record).
"""
from __future__ import annotations

import gzip
import numbers
import os
import re
import zlib
from typing import Iterable, Iterator, Sequence

import torch

from fxrec.datasets.batch import Batch, make_batch
from fxrec.types import whole

NUM_DENSE = 13
NUM_SPARSE = 26
MISSING_ID = 0
DENSE_NAMES = [f"int_{i}" for i in range(NUM_DENSE)]
SPARSE_KEYS = [f"cat_{i}" for i in range(NUM_SPARSE)]
COLUMN_NAMES = ["label"] + DENSE_NAMES + SPARSE_KEYS
_NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
_INT = re.compile(r"-?[0-9]+\Z")
_HEX = re.compile(r"[0-9a-fA-F]+\Z")
_INT64_MAX = 2**63 - 1

PathLike = str | os.PathLike


def count_option(value, minimum: int, what: str) -> int:
    """`value` as an int >= `minimum`; a fraction (a batch of 2.5) or a non-number is an
    error naming `what`, never truncated."""
    count = whole(value)
    if count is None:
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if count < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")
    return count


def table_sizes(num_embeddings_per_feature: int | Sequence[int] | None, num_features: int = NUM_SPARSE) -> list[int] | None:
    """Normalise a table-size option to one positive int per feature (or None: no hashing).
    One number (a Python or numpy integer) stands for every feature."""
    if num_embeddings_per_feature is None:
        return None
    if isinstance(num_embeddings_per_feature, numbers.Real):  # np.int64(5) is one size, not a sequence
        sizes = [num_embeddings_per_feature] * num_features
    else:
        sizes = list(num_embeddings_per_feature)
    if len(sizes) != num_features:
        raise ValueError(f"num_embeddings_per_feature has {len(sizes)} entries, expected {num_features} (one per cat_i)")
    return [count_option(n, 1, f"num_embeddings_per_feature for {key}") for key, n in zip(SPARSE_KEYS, sizes)]


def open_text(path: PathLike):
    """Open a text file or a ``.gz`` file for reading; undecodable bytes survive as
    surrogates so that the parser reports them with their line number."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")


def text_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text or ``.gz`` file; a damaged file (not gzip, cut short)
    raises a ValueError naming it and the last line read, not gzip's bare error."""
    lineno = 0
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                yield lineno, line
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{os.fspath(path)}: unreadable after line {lineno}: {type(e).__name__}: {e}") from e


def _bad(path, lineno: int, col: int, msg: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}:{lineno}: column {col + 1} ({COLUMN_NAMES[col]}): {msg}")


def parse_line(line: str, path: PathLike, lineno: int, sizes: list[int] | None) -> tuple[int, list[int], list[int]]:
    """Parse one TSV record (without its line terminator) into
    ``(label, 13 raw integers, 26 ids)``; raises ValueError naming file, line, column."""
    fields = line.split("\t")
    if len(fields) != _NUM_COLUMNS:
        raise ValueError(f"{os.fspath(path)}:{lineno}: expected {_NUM_COLUMNS} tab-separated columns, got {len(fields)}")
    label = fields[0]
    if label != "0" and label != "1":
        raise _bad(path, lineno, 0, f"label must be 0 or 1, got {label!r}")
    dense = []
    for col in range(1, 1 + NUM_DENSE):
        text = fields[col]
        if not text:
            dense.append(0)
        elif _INT.match(text):
            value = int(text)
            if not -2**63 <= value < 2**63:  # the batch holds int64: name the line, not torch's overflow
                raise _bad(path, lineno, col, f"integer past int64: {text[:24]!r}")
            dense.append(value)
        else:
            raise _bad(path, lineno, col, f"not an integer: {text!r}")
    ids = []
    for col in range(1 + NUM_DENSE, _NUM_COLUMNS):
        text = fields[col]
        if not text:
            ids.append(MISSING_ID)
            continue
        if not _HEX.match(text):
            raise _bad(path, lineno, col, f"not a hexadecimal id: {text!r}")
        value = int(text, 16)
        if sizes is not None:
            value %= sizes[col - 1 - NUM_DENSE]
        elif value > _INT64_MAX:
            raise _bad(path, lineno, col, f"id {text!r} does not fit in int64; pass num_embeddings_per_feature to hash it")
        ids.append(value)
    return int(label), dense, ids


def dense_transform(raw: torch.Tensor, log_transform: bool) -> torch.Tensor:
    """Integer dense columns -> float32, ``log(max(x, 0) + 1)`` when ``log_transform``."""
    if not log_transform:
        return raw.to(torch.float32)
    return torch.log1p(raw.to(torch.float64).clamp(min=0)).to(torch.float32)


def rows_to_batch(labels: list[int], dense: list[list[int]], ids: list[list[int]], log_transform: bool) -> Batch:
    """Build a Batch from parsed rows (one id per bag for every key)."""
    batch = len(labels)
    dense_t = dense_transform(torch.tensor(dense, dtype=torch.int64).view(batch, NUM_DENSE), log_transform)
    id_t = torch.tensor(ids, dtype=torch.int64).view(batch, NUM_SPARSE).t()
    ones = torch.ones(batch, dtype=torch.int32)
    return make_batch(SPARSE_KEYS, dense_t, list(id_t.unbind(0)), [ones] * NUM_SPARSE, torch.tensor(labels, dtype=torch.float32))


class CriteoTsvReader:
    """An iterable of `Batch` read from one or more Criteo TSV files, in file order.

    ``num_embeddings_per_feature``: int (all tables) or 26 ints; ids are hashed into
    ``[0, n)``. ``limit``: read at most this many records in total. The last, partial
    batch is yielded unless ``drop_last``. Each iteration re-reads the files.
    """

    def __init__(
        self,
        paths: PathLike | Iterable[PathLike],
        batch_size: int = 512,
        num_embeddings_per_feature: int | Sequence[int] | None = None,
        log_transform: bool = True,
        drop_last: bool = False,
        limit: int | None = None,
    ):
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise ValueError("CriteoTsvReader: no input files given")
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"CriteoTsvReader: no such file {os.fspath(path)}")
        self.batch_size = count_option(batch_size, 1, "CriteoTsvReader: batch_size")
        self.limit = None if limit is None else count_option(limit, 0, "CriteoTsvReader: limit")
        self.sizes = table_sizes(num_embeddings_per_feature)
        self.log_transform = bool(log_transform)
        self.drop_last = bool(drop_last)

    @property
    def keys(self) -> list[str]:
        return list(SPARSE_KEYS)

    def records(self) -> Iterator[tuple[int, list[int], list[int]]]:
        """Every parsed record ``(label, raw dense ints, ids)``, honouring ``limit``."""
        count = 0
        for path in self.paths:
            for lineno, line in text_lines(path):
                if self.limit is not None and count >= self.limit:
                    return
                line = line.rstrip("\r\n")
                if not line:
                    continue
                yield parse_line(line, path, lineno, self.sizes)
                count += 1

    def __iter__(self) -> Iterator[Batch]:
        labels, dense, ids = [], [], []
        for label, row_dense, row_ids in self.records():
            labels.append(label)
            dense.extend(row_dense)
            ids.extend(row_ids)
            if len(labels) == self.batch_size:
                yield rows_to_batch(labels, dense, ids, self.log_transform)
                labels, dense, ids = [], [], []
        if labels and not self.drop_last:
            yield rows_to_batch(labels, dense, ids, self.log_transform)
