"""MovieLens readers, interaction splits, the synthetic generator and two-tower batches."""
from __future__ import annotations

import gzip

import pytest
import torch

from fxrec.datasets import (
    Interactions,
    TwoTowerBatches,
    leave_last_out,
    load_movielens,
    synthetic_interactions,
    train_test_split_by_time,
)

# (user, item, rating, timestamp) in file order; raw ids are sparse on purpose
RECORDS = [(7, 300, 4, 881250949), (3, 12, 5, 891717742), (7, 12, 1, 878887116), (42, 9, 3, 880606923), (3, 300, 2, 886397596)]
HALF_RATINGS = ["4.0", "3.5", "0.5", "5", "2.5"]


def write_format(folder, fmt: str, opener=open, suffix=""):
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "100k":
        path, lines = folder / f"u.data{suffix}", ["\t".join(map(str, r)) for r in RECORDS]
    elif fmt == "1m":
        path, lines = folder / f"ratings.dat{suffix}", ["::".join(map(str, r)) for r in RECORDS]
    else:
        path = folder / f"ratings.csv{suffix}"
        lines = ["userId,movieId,rating,timestamp"]
        lines += [f"{u},{i},{r},{t}" for (u, i, _, t), r in zip(RECORDS, HALF_RATINGS)]
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def check_records(inter: Interactions, ratings: list[float]):
    assert (inter.num_users, inter.num_items) == (3, 3)
    torch.testing.assert_close(inter.user_raw_ids, torch.tensor([3, 7, 42]))
    torch.testing.assert_close(inter.item_raw_ids, torch.tensor([9, 12, 300]))
    torch.testing.assert_close(inter.user_ids, torch.tensor([1, 0, 1, 2, 0]))
    torch.testing.assert_close(inter.item_ids, torch.tensor([2, 1, 1, 0, 2]))
    torch.testing.assert_close(inter.ratings, torch.tensor(ratings, dtype=torch.float32))
    torch.testing.assert_close(inter.timestamps, torch.tensor([r[3] for r in RECORDS]))
    torch.testing.assert_close(inter.user_raw_ids[inter.user_ids], torch.tensor([r[0] for r in RECORDS]))


@pytest.mark.parametrize("fmt", ["100k", "1m", "csv"])
@pytest.mark.parametrize("how", ["file", "dir", "nested", "gzip"])
def test_load_movielens_formats(tmp_path, fmt, how):
    if how == "gzip":
        target = write_format(tmp_path, fmt, opener=gzip.open, suffix=".gz")
    else:
        path = write_format(tmp_path / "ml" if how == "nested" else tmp_path, fmt)
        target = path if how == "file" else tmp_path
    ratings = [float(x) for x in HALF_RATINGS] if fmt == "csv" else [float(r[2]) for r in RECORDS]
    check_records(load_movielens(target), ratings)


@pytest.mark.parametrize(
    "fmt, line, match",
    [
        ("100k", "1\t2\t3", r"u\.data:3: expected 4 '\\t'-separated columns, got 3"),
        ("100k", "1\tx\t3\t4", r"u\.data:3: column 2 \(item\): not a non-negative integer: 'x'"),
        ("100k", "1\t2\t3.5\t4", r"u\.data:3: column 3 \(rating\): not an integer: '3\.5'"),
        ("1m", "1::2::3::-4", r"ratings\.dat:3: column 4 \(timestamp\): not a non-negative integer: '-4'"),
        ("1m", "1:2:3:4", r"ratings\.dat:3: expected 4 '::'-separated columns, got 1"),
        ("csv", "1,2,abc,4", r"ratings\.csv:3: column 3 \(rating\): not a decimal number: 'abc'"),
        ("csv", "-1,2,3.0,4", r"ratings\.csv:3: column 1 \(user\): not a non-negative integer: '-1'"),
        ("100k", "1\t99999999999999999999\t3\t4", r"u\.data:3: column 2 \(item\): past int64"),
        ("csv", "1,2," + "9" * 400 + ",4", r"ratings\.csv:3: column 3 \(rating\): too large"),
    ],
)
def test_malformed_lines_name_file_line_and_column(tmp_path, fmt, line, match):
    path = write_format(tmp_path, fmt)
    lines = path.read_text().splitlines()
    lines.insert(2, line)  # the bad record is line 3 of the file (after the csv header and one row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        load_movielens(path)


def test_csv_header_and_detection_errors(tmp_path):
    path = write_format(tmp_path / "a", "csv")
    path.write_text("user,item,rating,time\n1,2,3.0,4\n")
    with pytest.raises(ValueError, match=r"ratings\.csv:1: expected header 'userId,movieId,rating,timestamp'"):
        load_movielens(path)
    path.write_text("")  # no header either: an empty file is not 0 interactions
    with pytest.raises(ValueError, match=r"ratings\.csv: empty file; expected header 'userId,movieId,rating,timestamp'"):
        load_movielens(path)
    write_format(tmp_path / "b", "100k")
    write_format(tmp_path / "b", "1m")
    with pytest.raises(ValueError, match="several MovieLens rating files"):
        load_movielens(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings file"):
        load_movielens(tmp_path / "c")
    (tmp_path / "movies.dat").write_text("1::Toy Story::Animation\n")
    with pytest.raises(ValueError, match="unknown MovieLens file name"):
        load_movielens(tmp_path / "movies.dat")


# ---------------------------------------------------------------- splits

def hand_made() -> Interactions:
    # user 0: times 5, 1, 9 ; user 1: 4, 4 (tie) ; user 2: one interaction
    users = [0, 0, 1, 0, 1, 2]
    items = [10, 11, 12, 13, 14, 15]
    times = [5, 1, 4, 9, 4, 2]
    return Interactions.from_raw(users, items, [1.0] * 6, times)


def test_leave_last_out():
    train, test = leave_last_out(hand_made())
    torch.testing.assert_close(test.item_ids, torch.tensor([3, 4]))  # raw 13 (user 0 at t=9), 14 (later row of the tie)
    torch.testing.assert_close(train.item_ids, torch.tensor([0, 1, 2, 5]))
    assert (train.num_users, train.num_items) == (3, 6)
    train2, test2 = leave_last_out(hand_made(), num_test=2)
    torch.testing.assert_close(test2.item_ids, torch.tensor([0, 3]))  # user 1 has only 2: stays in train
    assert len(train2) == 4
    with pytest.raises(ValueError, match="num_test must be >= 1"):
        leave_last_out(hand_made(), num_test=0)


def test_split_by_time():
    train, test = train_test_split_by_time(hand_made(), test_fraction=0.5)
    # time order: 1(row1) 2(row5) 4(row2) 4(row4) 5(row0) 9(row3); latest 3 are rows 4, 0, 3
    torch.testing.assert_close(test.item_ids, torch.tensor([0, 3, 4]))
    torch.testing.assert_close(train.item_ids, torch.tensor([1, 2, 5]))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        train_test_split_by_time(hand_made(), test_fraction=1.5)


def test_interactions_validation():
    with pytest.raises(ValueError, match=r"item_ids must lie in \[0, 2\)"):
        Interactions(torch.tensor([0]), torch.tensor([2]), torch.ones(1), torch.zeros(1, dtype=torch.int64),
                     1, 2, torch.arange(1), torch.arange(2))
    with pytest.raises(ValueError, match="ratings must be 1-D with 1 entries"):
        Interactions(torch.tensor([0]), torch.tensor([1]), torch.ones(2), torch.zeros(1, dtype=torch.int64),
                     1, 2, torch.arange(1), torch.arange(2))


# ---------------------------------------------------------------- synthetic

def test_synthetic_interactions_structure_and_determinism():
    a, users, items = synthetic_interactions(60, 90, 3000, seed=4, return_factors=True)
    b = synthetic_interactions(60, 90, 3000, seed=4)
    torch.testing.assert_close(a.item_ids, b.item_ids)
    torch.testing.assert_close(a.timestamps, b.timestamps)
    assert (a.num_users, a.num_items, len(a)) == (60, 90, 3000)
    assert int(a.item_ids.max()) < 90 and int(a.user_ids.max()) < 60
    assert set(a.ratings.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # latent structure: observed pairs align far better than random pairs
    observed = (users[a.user_ids] * items[a.item_ids]).sum(1).mean()
    shuffled = (users[a.user_ids] * items[torch.randperm(90)[a.item_ids]]).sum(1).mean()
    assert float(observed) > float(shuffled) + 1.0
    assert not torch.equal(synthetic_interactions(60, 90, 3000, seed=5).item_ids, a.item_ids)


# ---------------------------------------------------------------- two-tower batches

def reference_history(inter, pool, index, limit):
    u, t = int(inter.user_ids[index]), int(inter.timestamps[index])
    rows = [j for j in range(len(pool)) if int(pool.user_ids[j]) == u and int(pool.timestamps[j]) < t]
    rows.sort(key=lambda j: (int(pool.timestamps[j]), j))
    return [int(pool.item_ids[j]) for j in rows[-limit:]] if limit else []


def shuffled_order(batches: TwoTowerBatches) -> list[int]:
    # the documented order: a permutation seeded by (seed, epoch)
    gen = torch.Generator().manual_seed(batches.seed * 1_000_003 + batches.epoch)
    return torch.randperm(len(batches.interactions), generator=gen).tolist()


@pytest.mark.parametrize("history_length, use_train_pool", [(0, False), (3, False), (4, True)])
def test_two_tower_batches_match_reference(history_length, use_train_pool):
    inter = synthetic_interactions(20, 30, 300, seed=1)
    inter.timestamps = inter.timestamps % 50  # many ties
    train, test = leave_last_out(inter)
    target, pool = (test, train) if use_train_pool else (inter, inter)
    batches = TwoTowerBatches(target, batch_size=16, history_length=history_length,
                              history_from=pool if use_train_pool else None, shuffle=True, seed=3)
    order = shuffled_order(batches)
    assert len(batches) == (len(target) + 15) // 16
    done = 0
    for query, candidate in batches:
        rows = order[done : done + candidate.stride()]
        done += len(rows)
        assert query.keys() == (["user_id", "user_history"] if history_length else ["user_id"])
        assert candidate.keys() == ["item_id"] and query.stride() == len(rows)
        torch.testing.assert_close(query["user_id"].values(), target.user_ids[rows])
        torch.testing.assert_close(candidate["item_id"].values(), target.item_ids[rows])
        if history_length:
            hist = [h.tolist() for h in query["user_history"].to_dense()]
            assert hist == [reference_history(target, pool, r, history_length) for r in rows]
    assert done == len(target)


def test_two_tower_shuffle_epochs_and_drop_last():
    inter = synthetic_interactions(10, 10, 50, seed=2)
    batches = TwoTowerBatches(inter, batch_size=8, drop_last=True, seed=1)
    first = [c.values().clone() for _, c in batches]
    again = [c.values().clone() for _, c in batches]
    assert len(first) == len(batches) == 6 and all(v.numel() == 8 for v in first)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    batches.set_epoch(1)
    assert not all(torch.equal(x, c.values()) for x, (_, c) in zip(first, batches))
    ordered = TwoTowerBatches(inter, batch_size=50, shuffle=False)
    (_, cand), = list(ordered)
    torch.testing.assert_close(cand.values(), inter.item_ids)


def test_two_tower_rejects_bad_arguments():
    inter = synthetic_interactions(10, 10, 50, seed=2)
    other = synthetic_interactions(10, 12, 50, seed=2)
    with pytest.raises(ValueError, match=r"history_from has \(num_users, num_items\) = \(10, 12\), expected \(10, 10\)"):
        TwoTowerBatches(inter, history_length=2, history_from=other)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TwoTowerBatches(inter, batch_size=0)
    with pytest.raises(ValueError, match="history_length must be >= 0"):
        TwoTowerBatches(inter, history_length=-1)


# Counts were truncated by int() (num_test=1.5 acted as neither 1 nor 2, batch_size=2.5 as 2),
# strings parsed or failing inside torch, and nan / inf reached torch.multinomial.
@pytest.mark.parametrize("call,match", [
    (lambda i: TwoTowerBatches(i, batch_size=2.5), r"TwoTowerBatches: batch_size must be >= 1 and a whole number, got 2.5"),
    (lambda i: TwoTowerBatches(i, batch_size="8"), r"TwoTowerBatches: batch_size must be >= 1 and a whole number, got '8'"),
    (lambda i: TwoTowerBatches(i, batch_size=None), r"batch_size must be >= 1 and a whole number, got None"),
    (lambda i: TwoTowerBatches(i, batch_size=float("inf")), r"batch_size must be >= 1 and a whole number, got inf"),
    (lambda i: TwoTowerBatches(i, history_length=1.7), r"history_length must be >= 0 and a whole number, got 1.7"),
    (lambda i: TwoTowerBatches(i, seed=1.5), r"TwoTowerBatches: seed must be a whole number, got 1.5"),
    (lambda i: TwoTowerBatches(i).set_epoch(0.5), r"set_epoch: epoch must be a whole number, got 0.5"),
    (lambda i: leave_last_out(i, num_test=1.5), r"leave_last_out: num_test must be >= 1 and a whole number, got 1.5"),
    (lambda i: leave_last_out(i, num_test="1"), r"num_test must be >= 1 and a whole number, got '1'"),
    (lambda i: train_test_split_by_time(i, "0.2"), r"train_test_split_by_time: test_fraction must be a finite number, got '0.2'"),
    (lambda i: train_test_split_by_time(i, float("nan")), r"test_fraction must be a finite number, got nan"),
    (lambda i: synthetic_interactions(num_users=1.5), r"synthetic_interactions: num_users must be >= 1 and a whole number, got 1.5"),
    (lambda i: synthetic_interactions(num_items="10"), r"num_items must be >= 1 and a whole number, got '10'"),
    (lambda i: synthetic_interactions(dim=2.5), r"dim must be >= 1 and a whole number, got 2.5"),
    (lambda i: synthetic_interactions(num_interactions=10.7), r"num_interactions must be >= 0 and a whole number, got 10.7"),
    (lambda i: synthetic_interactions(seed=1.5), r"synthetic_interactions: seed must be a whole number, got 1.5"),
    (lambda i: synthetic_interactions(sharpness=float("nan")), r"sharpness must be a finite number, got nan"),
    (lambda i: synthetic_interactions(popularity=float("inf")), r"popularity must be a finite number, got inf"),
])
def test_retrieval_counts_are_whole_and_numbers_finite(call, match):
    with pytest.raises(ValueError, match=match):
        call(synthetic_interactions(10, 10, 50, seed=2))


def test_retrieval_counts_take_whole_numbers():
    np = pytest.importorskip("numpy")
    inter = synthetic_interactions(np.int64(10), 10.0, torch.tensor(50), seed=-1, sharpness=np.float32(2.0))
    assert (inter.num_users, inter.num_items, len(inter)) == (10, 10, 50)
    assert TwoTowerBatches(inter, batch_size=np.int64(8), history_length=2.0).batch_size == 8
    assert len(leave_last_out(inter, num_test=1.0)[1]) == len(leave_last_out(inter)[1])
    assert len(train_test_split_by_time(inter, torch.tensor(0.2))[1]) == 10


def test_a_gz_that_is_not_gzip_names_the_file(tmp_path):
    path = tmp_path / "ratings.csv.gz"
    path.write_text("userId,movieId,rating,timestamp\n1,2,3.0,4\n")  # plain text under a .gz name
    with pytest.raises(ValueError, match=r"ratings\.csv\.gz: unreadable after line 0: BadGzipFile"):
        load_movielens(path)
