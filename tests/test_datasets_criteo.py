"""Criteo readers: the TSV logs and TorchRec's preprocessed .npy layout."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from fxrec.datasets import MISSING_ID, SPARSE_KEYS, CriteoNpyReader, CriteoTsvReader, find_npy_splits


def make_rows(n: int, seed: int) -> list[tuple[str, list[str], list[str]]]:
    """Random records as text fields, with missing values, negatives and mixed-case hex."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(int(rng.integers(0, 2)))
        dense = [("" if rng.random() < 0.2 else str(int(rng.integers(-3, 5000)))) for _ in range(13)]
        cats = []
        for _ in range(26):
            if rng.random() < 0.15:
                cats.append("")
            else:
                text = f"{int(rng.integers(0, 2**32)):08x}"
                cats.append(text.upper() if rng.random() < 0.3 else text)
        rows.append((label, dense, cats))
    return rows


def write_tsv(path, rows, newline="\n", opener=open):
    with opener(path, "wt", newline="") as f:
        for label, dense, cats in rows:
            f.write("\t".join([label] + dense + cats) + newline)


def expected(rows, sizes, log_transform=True):
    labels = torch.tensor([float(r[0]) for r in rows])
    raw = [[int(x) if x else 0 for x in r[1]] for r in rows]
    if log_transform:
        dense = torch.tensor([[math.log(max(x, 0) + 1) for x in row] for row in raw], dtype=torch.float32)
    else:
        dense = torch.tensor(raw, dtype=torch.float32)
    ids = [[(int(c, 16) % (sizes[j] if sizes else 2**64)) if c else MISSING_ID for j, c in enumerate(r[2])] for r in rows]
    return labels, dense, torch.tensor(ids, dtype=torch.int64)


def gather(batches):
    labels = torch.cat([b.labels for b in batches])
    dense = torch.cat([b.dense_features for b in batches])
    ids = torch.cat([torch.stack([b.sparse_features[k].values() for k in SPARSE_KEYS], 1) for b in batches])
    return labels, dense, ids


@pytest.mark.parametrize(
    "sizes, log_transform, newline",
    [
        (None, True, "\n"),
        (1000, True, "\r\n"),
        ([10 + 7 * j for j in range(26)], False, "\n"),
    ],
)
def test_tsv_values_parse_exactly(tmp_path, sizes, log_transform, newline):
    rows = make_rows(23, seed=0)
    path = tmp_path / "day_0.tsv"
    write_tsv(path, rows, newline)
    reader = CriteoTsvReader(path, batch_size=5, num_embeddings_per_feature=sizes, log_transform=log_transform)
    batches = list(reader)
    assert [b.batch_size for b in batches] == [5, 5, 5, 5, 3]
    per_table = [sizes] * 26 if isinstance(sizes, int) else sizes
    want = expected(rows, per_table, log_transform)
    for got, ref in zip(gather(batches), want):
        torch.testing.assert_close(got, ref)
    for b in batches:
        assert b.sparse_features.keys() == SPARSE_KEYS
        assert bool((b.sparse_features.lengths() == 1).all())


def test_tsv_several_files_gzip_limit_and_drop_last(tmp_path):
    rows_a, rows_b = make_rows(6, seed=1), make_rows(7, seed=2)
    write_tsv(tmp_path / "a.tsv", rows_a)
    write_tsv(tmp_path / "b.tsv.gz", rows_b, opener=gzip.open)
    files = [tmp_path / "a.tsv", tmp_path / "b.tsv.gz"]
    batches = list(CriteoTsvReader(files, batch_size=4, num_embeddings_per_feature=97))
    assert [b.batch_size for b in batches] == [4, 4, 4, 1]
    for got, ref in zip(gather(batches), expected(rows_a + rows_b, [97] * 26)):
        torch.testing.assert_close(got, ref)
    dropped = list(CriteoTsvReader(files, batch_size=4, drop_last=True))
    assert [b.batch_size for b in dropped] == [4, 4, 4]
    limited = list(CriteoTsvReader(files, batch_size=4, limit=9, num_embeddings_per_feature=97))
    assert [b.batch_size for b in limited] == [4, 4, 1]
    for got, ref in zip(gather(limited), expected((rows_a + rows_b)[:9], [97] * 26)):
        torch.testing.assert_close(got, ref)


def test_tsv_skips_blank_lines(tmp_path):
    rows = make_rows(3, seed=3)
    path = tmp_path / "blank.tsv"
    write_tsv(path, rows)
    text = path.read_text().replace("\n", "\n\n", 1)
    path.write_text(text)
    (batch,) = list(CriteoTsvReader(path, batch_size=8, num_embeddings_per_feature=50))
    torch.testing.assert_close(batch.labels, expected(rows, [50] * 26)[0])


def _line(label="1", dense=None, cats=None):
    dense = dense or ["1"] * 13
    cats = cats or ["0a"] * 26
    return "\t".join([label] + dense + cats)


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("1\t2\t3", r"bad\.tsv:3: expected 40 tab-separated columns, got 3"),
        (_line() + "\t", r"bad\.tsv:3: expected 40 tab-separated columns, got 41"),
        (_line(label="2"), r"bad\.tsv:3: column 1 \(label\): label must be 0 or 1, got '2'"),
        (_line(label=""), r"bad\.tsv:3: column 1 \(label\): label must be 0 or 1, got ''"),
        (_line(dense=["1"] * 3 + ["1.5"] + ["1"] * 9), r"bad\.tsv:3: column 5 \(int_3\): not an integer: '1.5'"),
        (_line(dense=[" 7"] + ["1"] * 12), r"bad\.tsv:3: column 2 \(int_0\): not an integer: ' 7'"),
        (_line(dense=["1"] * 12 + ["+7"]), r"bad\.tsv:3: column 14 \(int_12\): not an integer: '\+7'"),
        (_line(dense=["9" * 30] + ["1"] * 12), r"bad\.tsv:3: column 2 \(int_0\): integer past int64: '9{24}'"),
        (_line(cats=["0a"] * 25 + ["xyz"]), r"bad\.tsv:3: column 40 \(cat_25\): not a hexadecimal id: 'xyz'"),
        (_line(cats=["0x1f"] + ["0a"] * 25), r"bad\.tsv:3: column 15 \(cat_0\): not a hexadecimal id: '0x1f'"),
    ],
)
def test_tsv_malformed_rows_name_file_line_and_column(tmp_path, bad_line, match):
    path = tmp_path / "bad.tsv"
    path.write_text(_line() + "\n" + _line(label="0") + "\n" + bad_line + "\n" + _line() + "\n")
    with pytest.raises(ValueError, match=match):
        list(CriteoTsvReader(path, batch_size=2))


def test_tsv_huge_id_without_hashing(tmp_path):
    path = tmp_path / "big.tsv"
    path.write_text(_line(cats=["f" * 17] + ["0a"] * 25) + "\n")
    with pytest.raises(ValueError, match=r"big\.tsv:1: column 15 \(cat_0\): id 'f+' does not fit in int64"):
        list(CriteoTsvReader(path))
    (batch,) = list(CriteoTsvReader(path, num_embeddings_per_feature=1000))
    assert int(batch.sparse_features["cat_0"].values()[0]) == int("f" * 17, 16) % 1000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_embeddings_per_feature=[10] * 25), "has 25 entries, expected 26"),
        (dict(num_embeddings_per_feature=0), "for cat_0 must be >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(limit=-1), "limit must be >= 0"),
        # a fraction is refused, not truncated to a smaller batch / table
        (dict(batch_size=2.5), "CriteoTsvReader: batch_size must be a whole number, got 2.5"),
        (dict(limit=3.5), "CriteoTsvReader: limit must be a whole number, got 3.5"),
        (dict(num_embeddings_per_feature=[10] * 25 + [5.5]), "for cat_25 must be a whole number, got 5.5"),
        (dict(num_embeddings_per_feature=True), "for cat_0 must be a whole number, got True"),
    ],
)
def test_tsv_rejects_bad_options(tmp_path, kwargs, match):
    (tmp_path / "x.tsv").write_text(_line() + "\n")
    with pytest.raises(ValueError, match=match):
        CriteoTsvReader(tmp_path / "x.tsv", **kwargs)


@pytest.mark.parametrize("sizes", [np.int64(7), np.int32(7), 7.0, np.array([7] * 26), [np.int64(7)] * 26])
def test_tsv_table_sizes_accept_numpy_and_whole_floats(tmp_path, sizes):
    (tmp_path / "x.tsv").write_text(_line() + "\n")
    (batch,) = list(CriteoTsvReader(tmp_path / "x.tsv", num_embeddings_per_feature=sizes))
    assert int(batch.sparse_features.values().max()) < 7


def test_tsv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file .*nope\.tsv"):
        CriteoTsvReader([tmp_path / "nope.tsv"])


# ---------------------------------------------------------------- .npy layout

def write_split(stem, n, seed, labels_2d=True):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, 13), dtype=np.float32) * 5
    sparse = rng.integers(-(2**31), 2**31 - 1, size=(n, 26), dtype=np.int64).astype(np.int32)
    labels = rng.integers(0, 2, size=(n, 1) if labels_2d else (n,), dtype=np.int32)
    np.save(f"{stem}_dense.npy", dense)
    np.save(f"{stem}_sparse.npy", sparse)
    np.save(f"{stem}_labels.npy", labels)
    return dense, sparse, labels.reshape(-1)


def test_npy_reads_across_splits_with_hashing(tmp_path):
    d0, s0, l0 = write_split(tmp_path / "day_2", 5, seed=0)
    d1, s1, l1 = write_split(tmp_path / "day_10", 6, seed=1, labels_2d=False)
    assert [p.name for p in find_npy_splits(tmp_path)] == ["day_2", "day_10"]
    sizes = [100 + j for j in range(26)]
    reader = CriteoNpyReader(tmp_path, batch_size=4, num_embeddings_per_feature=sizes)
    assert len(reader) == 3
    batches = list(reader)
    assert [b.batch_size for b in batches] == [4, 4, 3]
    labels, dense, ids = gather(batches)
    torch.testing.assert_close(dense, torch.from_numpy(np.concatenate([d0, d1])))
    torch.testing.assert_close(labels, torch.from_numpy(np.concatenate([l0, l1]).astype(np.float32)))
    # floor modulo, as TorchRec's reader: wrapped (negative) int32 ids land in range too
    want = np.concatenate([s0, s1]).astype(np.int64) % np.array(sizes)
    torch.testing.assert_close(ids, torch.from_numpy(want))
    assert int(ids.min()) >= 0


def test_npy_stems_limit_drop_last_and_no_mmap(tmp_path):
    d0, _, _ = write_split(tmp_path / "day_0", 7, seed=2)
    reader = CriteoNpyReader([tmp_path / "day_0"], batch_size=3, num_embeddings_per_feature=10, limit=5, mmap=False)
    assert [b.batch_size for b in reader] == [3, 2]
    dropped = CriteoNpyReader(tmp_path / "day_0", batch_size=3, num_embeddings_per_feature=10, drop_last=True)
    assert len(dropped) == 2 and [b.batch_size for b in dropped] == [3, 3]
    torch.testing.assert_close(torch.cat([b.dense_features for b in dropped]), torch.from_numpy(d0[:6]))


@pytest.mark.parametrize(
    "part, array, match",
    [
        ("dense", np.zeros((4, 12), np.float32), r"day_0_dense\.npy: expected an N x 13 real array, got shape \(4, 12\)"),
        ("sparse", np.zeros((4, 26), np.float32), r"day_0_sparse\.npy: expected an N x 26 integer array"),
        ("sparse", np.zeros((3, 26), np.int32), r"day_0_sparse\.npy: has 3 rows but .*day_0_dense\.npy has 4"),
        ("labels", np.zeros((4, 2), np.int32), r"day_0_labels\.npy: expected an N or N x 1 numeric array, got shape \(4, 2\)"),
        ("labels", np.zeros((5,), np.int32), r"day_0_labels\.npy: has 5 rows but .*day_0_dense\.npy has 4"),
    ],
)
def test_npy_shape_errors_name_the_file(tmp_path, part, array, match):
    write_split(tmp_path / "day_0", 4, seed=3)
    np.save(tmp_path / f"day_0_{part}.npy", array)
    with pytest.raises(ValueError, match=match):
        CriteoNpyReader(tmp_path / "day_0")


@pytest.mark.parametrize(
    "part, row, col, value, match",
    [
        ("labels", 2, 0, 2, r"day_0_labels\.npy: row 2: label must be 0 or 1, got 2"),
        ("dense", 3, 5, np.nan, r"day_0_dense\.npy: row 3: column 5 is not finite"),
        ("sparse", 1, 4, -7, r"day_0_sparse\.npy: row 1: cat_4 has negative id -7"),
    ],
)
def test_npy_value_errors_name_file_and_row(tmp_path, part, row, col, value, match):
    write_split(tmp_path / "day_0", 4, seed=4)
    arr = np.load(tmp_path / f"day_0_{part}.npy")
    arr = np.abs(arr) if part == "sparse" else arr
    arr[row, col] = value
    np.save(tmp_path / f"day_0_{part}.npy", arr)
    sizes = None if part == "sparse" else 1000
    with pytest.raises(ValueError, match=match):
        list(CriteoNpyReader(tmp_path / "day_0", batch_size=2, num_embeddings_per_feature=sizes))


def test_npy_uint64_ids_hash_exactly_and_empty_files_are_named(tmp_path):
    """uint64 ids past 2**63 hash in uint64 (int64 would wrap them to other rows); unhashed,
    they are refused with file, row and feature. A 0-byte file is named, not torch's EOFError."""
    write_split(tmp_path / "day_0", 2, seed=6)
    sparse = np.full((2, 26), 2**64 - 5, dtype=np.uint64)
    np.save(tmp_path / "day_0_sparse.npy", sparse)
    (batch,) = list(CriteoNpyReader(tmp_path / "day_0", batch_size=2, num_embeddings_per_feature=1000))
    assert int(batch.sparse_features.values()[0]) == (2**64 - 5) % 1000 == 611
    with pytest.raises(ValueError, match=r"day_0_sparse\.npy: row 0: cat_0 has id 18446744073709551611, past int64"):
        list(CriteoNpyReader(tmp_path / "day_0", batch_size=2))
    (tmp_path / "day_0_labels.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"day_0_labels\.npy: not a readable \.npy array"):
        CriteoNpyReader(tmp_path / "day_0")


def test_npy_missing_files(tmp_path):
    write_split(tmp_path / "day_0", 2, seed=5)
    (tmp_path / "day_0_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*day_0_labels\.npy"):
        CriteoNpyReader(tmp_path / "day_0")
    with pytest.raises(FileNotFoundError, match=r"no \*_dense\.npy files"):
        find_npy_splits(tmp_path / "nothing_here")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=2.5), "CriteoNpyReader: batch_size must be a whole number, got 2.5"),
        (dict(batch_size=0), "CriteoNpyReader: batch_size must be >= 1, got 0"),
        (dict(limit=1.5), "CriteoNpyReader: limit must be a whole number, got 1.5"),
        (dict(limit=-1), "CriteoNpyReader: limit must be >= 0, got -1"),
        (dict(num_embeddings_per_feature=0), "for cat_0 must be >= 1, got 0"),
    ],
)
def test_npy_rejects_bad_options(tmp_path, kwargs, match):
    write_split(tmp_path / "day_0", 4, seed=7)
    with pytest.raises(ValueError, match=match):
        CriteoNpyReader(tmp_path / "day_0", **kwargs)


@pytest.mark.parametrize("part", ["dense", "sparse", "labels"])
def test_npy_one_file_of_a_split_names_its_stem(tmp_path, part):
    """dir/day_0_dense.npy (what tab completion gives) reads the split dir/day_0, rather
    than looking for dir/day_0_dense.npy_dense.npy."""
    d0, _, _ = write_split(tmp_path / "day_0", 5, seed=8)
    batches = list(CriteoNpyReader(tmp_path / f"day_0_{part}.npy", batch_size=5, num_embeddings_per_feature=10))
    torch.testing.assert_close(batches[0].dense_features, torch.from_numpy(d0))
