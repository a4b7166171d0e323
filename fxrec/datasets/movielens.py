"""Readers of the MovieLens rating files.

Formats (as distributed by GroupLens):
- ml-100k ``u.data``: ``user <TAB> item <TAB> rating <TAB> timestamp``;
- ml-1m ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``;
- ml-20m / ml-25m (and ml-latest) ``ratings.csv``: header ``userId,movieId,rating,timestamp``
  then ``int,int,decimal,int`` rows (ratings such as ``3.5``).
Ids and timestamps must be non-negative integers, ratings non-negative decimals. A
malformed line raises `ValueError` naming the file, the 1-based line number and the
column. Entirely empty lines are skipped.
"""
from __future__ import annotations

import math
import os
import re
from array import array
from pathlib import Path

import numpy as np
import torch

from fxrec.datasets.criteo import PathLike, text_lines
from fxrec.datasets.interactions import Interactions

_COLUMNS = ("user", "item", "rating", "timestamp")
_CSV_HEADER = "userId,movieId,rating,timestamp"
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
_UINT = re.compile(r"[0-9]+\Z")
# file name -> (separator, has header, integer ratings)
FORMATS = {
    "u.data": ("\t", False, True),
    "ratings.dat": ("::", False, True),
    "ratings.csv": (",", True, False),
}


def _uint(text: str, path, lineno: int, col: int) -> int:
    if not _UINT.match(text):
        raise ValueError(f"{os.fspath(path)}:{lineno}: column {col + 1} ({_COLUMNS[col]}): not a non-negative integer: {text!r}")
    if int(text) >= 2**63:
        raise ValueError(f"{os.fspath(path)}:{lineno}: column {col + 1} ({_COLUMNS[col]}): past int64: {text!r}")
    return int(text)


def read_ratings(path: PathLike, sep: str, header: bool, integer_ratings: bool) -> Interactions:
    """Parse one ratings file of the given layout into `Interactions` (ids remapped)."""
    users, items, times = array("q"), array("q"), array("q")
    ratings = array("d")
    lineno = 0
    for lineno, line in text_lines(path):
        line = line.rstrip("\r\n")
        if lineno == 1 and header:
            if line.lstrip("\ufeff") != _CSV_HEADER:
                raise ValueError(f"{os.fspath(path)}:1: expected header {_CSV_HEADER!r}, got {line!r}")
            continue
        if not line:
            continue
        fields = line.split(sep)
        if len(fields) != 4:
            raise ValueError(f"{os.fspath(path)}:{lineno}: expected 4 {sep!r}-separated columns, got {len(fields)}")
        users.append(_uint(fields[0], path, lineno, 0))
        items.append(_uint(fields[1], path, lineno, 1))
        rating = fields[2]
        if not (_UINT if integer_ratings else _DECIMAL).match(rating):
            kind = "an integer" if integer_ratings else "a decimal number"
            raise ValueError(f"{os.fspath(path)}:{lineno}: column 3 (rating): not {kind}: {rating!r}")
        if not math.isfinite(float(rating)):
            raise ValueError(f"{os.fspath(path)}:{lineno}: column 3 (rating): too large: {rating[:20]!r}...")
        ratings.append(float(rating))
        times.append(_uint(fields[3], path, lineno, 3))
    if header and lineno == 0:  # an empty file lacks the header as much as a wrong one does
        raise ValueError(f"{os.fspath(path)}: empty file; expected header {_CSV_HEADER!r} on line 1")
    as_np = lambda buf, dtype: torch.from_numpy(np.frombuffer(buf, dtype=dtype).copy())  # noqa: E731
    return Interactions.from_raw(as_np(users, np.int64), as_np(items, np.int64), as_np(ratings, np.float64), as_np(times, np.int64))


def find_ratings_file(path: PathLike) -> Path:
    """The ratings file at ``path``: the file itself if its name is a known format, or
    the one known file in the directory (or in one of its immediate subdirectories,
    as an unzipped ``ml-100k/`` is)."""
    path = Path(path)
    if path.is_file():
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if name not in FORMATS:
            raise ValueError(f"{path}: unknown MovieLens file name; expected one of {sorted(FORMATS)} (optionally .gz)")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    for folder in [path] + sorted(p for p in path.iterdir() if p.is_dir()):
        found = [folder / n for n in FORMATS if (folder / n).is_file()]
        found += [folder / f"{n}.gz" for n in FORMATS if (folder / f"{n}.gz").is_file()]
        if len(found) > 1:
            raise ValueError(f"{folder}: several MovieLens rating files ({', '.join(p.name for p in found)}); pass one file")
        if found:
            return found[0]
    raise FileNotFoundError(f"{path}: no MovieLens ratings file ({', '.join(sorted(FORMATS))}) here or one level down")


def load_movielens(path: PathLike) -> Interactions:
    """Load a MovieLens ratings file, detecting the format from its name (``u.data``,
    ``ratings.dat``, ``ratings.csv``, optionally gzipped) or from a directory's content.
    User and item ids are remapped to dense ranges in sorted raw-id order."""
    file = find_ratings_file(path)
    name = file.name[:-3] if file.name.endswith(".gz") else file.name
    sep, header, integer_ratings = FORMATS[name]
    return read_ratings(file, sep, header, integer_ratings)
