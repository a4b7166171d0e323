"""fxrec.shard on 2 gloo processes: bad input fails on every rank with a clear error (no rank is
left waiting in a collective), and ranks may feed different batch sizes where the plan allows,
an empty one included."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.optim import SGD
from fxrec.planner.plan import PlanError
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES


def _expect(fn, exc_type) -> str:
    try:
        fn()
    except exc_type as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, world: int) -> dict:
    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    model = case.build()
    g = torch.Generator().manual_seed(1)
    sizes = [2, 3]  # rank 1 feeds one more sample than rank 0
    batches = [case.draw(g, b) for b in sizes]
    tables = fxrec.find_tables(model, batches[0])
    out = {}
    out["world"] = _expect(lambda: shard(model, Topology(4), batches[rank]), ValueError)
    out["infeasible"] = _expect(lambda: shard(model, Topology(2, memory_per_rank="1KB"), batches[rank]), PlanError)
    # every type exchanges bag counts (row_wise and table_row_wise reduce-scatters pad their
    # chunks to the largest batch): uneven local batches are fine
    for mixed in ({"emb_l.0": "table_wise", "emb_l.1": "data_parallel", "emb_l.2": "column_wise"},
                  {"emb_l.0": "row_wise", "emb_l.1": "table_row_wise", "emb_l.2": "row_wise"}):
        sm = shard(model, Topology(2, ranks_per_node=1), batches[rank], constraints=mixed)
        with torch.no_grad():
            got, want = sm(*batches[rank]), model(*case.concat(batches))
        start = sum(sizes[:rank])
        assert_close(got, want[start:start + sizes[rank]])
    out["uneven_ok"] = True
    out.update(_bad_batches(rank, model, case, g))
    out["empty"] = {sharding: _empty_batch_step(rank, sharding) for sharding in EMPTY_OK}
    out["row_wise_2_3"] = _empty_batch_step(rank, "row_wise", (2, 3))
    return out


EMPTY_OK = ["table_wise", "column_wise", "data_parallel", "row_wise", "table_row_wise"]


def _empty_batch_step(rank: int, sharding: str, sizes: tuple = (0, 3), ranks_per_node: int = 1) -> list[str]:
    """Rank 0 feeds no sample (a job's last, short batch), or fewer than rank 1 (`sizes`): the
    outputs have each rank's batch, and one SGD step on the summed outputs leaves every table
    row and dense parameter where the unsharded step on the global batch leaves them (loss
    sum / W: each rank's gradients are averaged)."""
    case = CASES["dlrm_ebc"]
    torch.manual_seed(0)
    model = case.build()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    example, batches = case.draw(g, 3), [case.draw(g, b) for b in sizes]
    tables = fxrec.find_tables(model, example)
    sm = shard(model, Topology(len(sizes), ranks_per_node=ranks_per_node), example,
               constraints={t.name: sharding for t in tables}, sparse_optimizer=SGD(0.1))
    out = sm(*batches[rank])
    assert out.shape[0] == sizes[rank]
    out.sum().backward()
    torch.optim.SGD(sm.parameters(), lr=0.1).step()
    (ref(*case.concat(batches)).sum() / len(sizes)).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    got, want = sm.full_state_dict(), ref.state_dict()
    return [k for k in want if not torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6)]


def _check_chain(graph) -> list[str]:
    """What the replicated lookup reads, back to gather: [its input, that node's two inputs,
    the first of those's input], by module name or function name."""
    def name(n):
        return n.target.split(".")[-1] if isinstance(n.target, str) else n.target.__name__
    rep = next(n for n in graph.nodes if name(n) == "replicated")
    check = rep.args[0]
    faults, gathered = check.args
    return [name(check), name(faults), name(gathered), name(faults.args[0]), name(faults.args[0].args[0])]


def _bad_batches(rank: int, model, case, g) -> dict:
    """One rank's bad ids or offsets raise the same error on every rank, at the unit's counts
    exchange, before any ids move; the sharded model then serves the next good batch."""
    batches = [case.draw(g, 3) for _ in range(2)]
    # emb_l.1 replicated: its lookup has no collective of its own, but its unit's counts
    # exchange (for the other tables) carries its faults too
    plan = {"emb_l.0": "table_wise", "emb_l.1": "data_parallel", "emb_l.2": "row_wise"}
    sm = shard(model, Topology(2), batches[rank], constraints=plan)
    dense, offsets, ids = batches[rank]
    far = [i.clone() for i in ids]
    if rank == 1:
        far[1][0] = 24  # emb_l.1 has 24 rows
    short = [o.clone() for o in offsets]
    if rank == 0:
        short[2] = short[2].flip(0)  # decreasing offsets: a negative bag length
    out = {"far_id": _expect(lambda: sm(dense, offsets, far), ValueError),
           "both_bad": _expect(lambda: sm(dense, short, far), ValueError)}
    with torch.no_grad():
        got, want = sm(*batches[rank]), model(*case.concat(batches))
    assert_close(got, want[3 * rank:3 * rank + 3])
    # every table replicated: the unit has no collective of its own, but checks collectively
    dp = shard(model, Topology(2), batches[rank], constraints={t: "data_parallel" for t in plan})
    out["dp_far_id"] = _expect(lambda: dp(dense, offsets, far), ValueError)
    out["dp_chain"] = _check_chain(dp.module.graph)
    out["good_after_bad"] = True
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 2, timeout=180)


def test_world_size_mismatch_on_every_rank(results):
    for r in results:
        assert "topology has world_size 4 but this job has 2 rank(s)" in r["world"]


def test_planning_error_raised_on_every_rank(results):
    for r in results:
        assert r["infeasible"].startswith("PlanError") and "emb_l" in r["infeasible"]


def test_uneven_batches_under_every_sharding_type(results):
    assert all(r["uneven_ok"] for r in results)


@pytest.mark.parametrize("sharding", EMPTY_OK)
def test_a_rank_with_an_empty_batch_trains_like_the_global_batch(results, sharding):
    assert results[0]["empty"][sharding] == [] and results[1]["empty"][sharding] == []


def test_row_wise_trains_on_uneven_batches(results):
    """Local batches of 2 and 3: the reduce-scatter's chunks are padded to 3 bags."""
    assert results[0]["row_wise_2_3"] == [] and results[1]["row_wise_2_3"] == []


UNEVEN_4 = (1, 2, 0, 3)


def _uneven_worker(rank: int, world: int) -> dict:
    # 2 nodes x 2 ranks: table_row_wise's node reduce-scatter and cross-node all-to-all both
    # see uneven chunks
    return {s: _empty_batch_step(rank, s, UNEVEN_4, ranks_per_node=2) for s in ("row_wise", "table_row_wise")}


@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise"])
def test_uneven_batches_on_two_nodes_train_like_the_global_batch(sharding):
    if "uneven_4" not in _CACHE:
        _CACHE["uneven_4"] = run_workers(_uneven_worker, 4, timeout=180)
    assert all(r[sharding] == [] for r in _CACHE["uneven_4"]), _CACHE["uneven_4"]


_CACHE: dict = {}


def test_one_ranks_bad_ids_raise_on_every_rank(results):
    for r in results:
        assert r["far_id"] == "ValueError: rank 1's batch: table 'emb_l.1' (lookup %emb_l_1): id 24 outside [0, 24)"


def test_bad_ids_raise_on_every_rank_with_every_table_replicated(results):
    for r in results:
        assert r["dp_far_id"] == "ValueError: rank 1's batch: table 'emb_l.1' (lookup %emb_l_1): id 24 outside [0, 24)"


def test_replicated_unit_checks_before_its_lookup(results):
    for r in results:
        assert r["dp_chain"] == ["fault_check", "all_to_all_counts", "gather", "fault_send", "gather"]


def test_the_first_faulty_rank_is_reported(results):
    for r in results:
        assert r["both_bad"].startswith("ValueError: rank 0's batch: table 'emb_l.2' (lookup %emb_l_2): bag length -")
        assert "is negative (offsets must not decrease, nor pass the number of ids, " in r["both_bad"]


def test_a_good_batch_after_bad_ones(results):
    assert all(r["good_after_bad"] for r in results)


# ------------------------------------------------------------------ inputs one rank cannot read
class _Folded(torch.nn.Module):
    """An nn.Embedding whose .sum(1) over 2-D ids fxrec folds into a bag lookup."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 4)

    def forward(self, ids):
        return self.emb(ids).sum(1)


def _unreadable_worker(rank: int, world: int) -> dict:
    """On rank 1 only: float ids, a missing KeyedJaggedTensor feature, float64 per-sample
    weights, 1-D ids where a folded .sum(1) was captured on 2-D ones. Each is refused before
    any id moves, with the same error on both ranks (none waits in a collective), and
    the next good batch runs."""
    out = {}
    for name, sharding in (("dlrm_lists", "table_wise"), ("dlrm_ebc", "row_wise"), ("weighted_mean", "row_wise"),
                           ("dlrm_lists", "data_parallel")):
        case = CASES[name]
        torch.manual_seed(0)
        model = case.build()
        g = torch.Generator().manual_seed(3)
        batches = [case.draw(g, 3) for _ in range(world)]
        tables = fxrec.find_tables(model, batches[0])
        sm = shard(model, Topology(world), batches[rank], constraints={t.name: sharding for t in tables})
        bad = batches[rank]
        if rank == 1 and name == "dlrm_lists":
            dense, offsets, ids = bad
            bad = (dense, offsets, [i if k != 1 else i.float() for k, i in enumerate(ids)])
        elif rank == 1 and name == "dlrm_ebc":
            dense, kjt = bad
            keys, b = kjt.keys()[:-1], dense.shape[0]
            lengths = kjt.lengths()[:len(keys) * b]
            bad = (dense, fxrec.KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values()[:int(lengths.sum())],
                                                                   lengths=lengths))
        elif rank == 1:
            ids, offsets, w, *rest = bad
            bad = (ids, offsets, w.double(), *rest)
        out[f"{name}/{sharding}"] = _expect(lambda: sm(*bad), (TypeError, KeyError, ValueError))
        with torch.no_grad():
            sm(*batches[rank])
    torch.manual_seed(0)
    model = _Folded()
    sm = shard(model, Topology(world), (torch.randint(0, 30, (3, 2)),), constraints={"emb": "row_wise"})
    ids = torch.randint(0, 30, (3,)) if rank == 1 else torch.randint(0, 30, (3, 2))
    out["folded"] = _expect(lambda: sm(ids), ValueError)
    return out


def test_an_input_one_rank_cannot_read_raises_on_every_rank():
    results = run_workers(_unreadable_worker, 2, timeout=180)
    assert results[0] == results[1], results
    r = results[0]
    assert r["dlrm_lists/table_wise"] == ("TypeError: rank 1's batch: table 'emb_l.1' (lookup %emb_l_1): ids must be "
                                          "int64 or int32, got torch.float32")
    assert r["dlrm_lists/data_parallel"] == r["dlrm_lists/table_wise"]
    assert re.fullmatch(r"KeyError: \"rank 1's batch: table '\S+' \(lookup %\w+, feature '\w+'\): the feature is "
                        r"missing from the input\"", r["dlrm_ebc/row_wise"]), r["dlrm_ebc/row_wise"]
    assert r["weighted_mean/row_wise"] == ("TypeError: rank 1's batch: table 'bag' (lookup %bag): per-sample weights "
                                           "must have the table's dtype, torch.float32, got torch.float64")
    assert r["folded"] == ("ValueError: rank 1's batch: table 'emb' (lookup %emb): ids were 2-D when the model was "
                           "captured (the .sum/.mean after the lookup pools their last dimension), got 1-D ids")


# ------------------------------------------------------------------ after destroy_process_group
def _after_destroy_worker(rank: int, world: int) -> dict:
    """A ShardedModel used once its process group is gone: every entry point that would run
    a collective (or silently skip one: data_parallel replicas would train apart) says so."""
    case = CASES["dlrm_lists"]
    out = {}
    for sharding in ("data_parallel", "row_wise"):
        torch.manual_seed(0)
        model = case.build()
        batch = case.draw(torch.Generator().manual_seed(rank), 3)
        tables = fxrec.find_tables(model, batch)
        sm = shard(model, Topology(world), batch, constraints={t.name: sharding for t in tables})
        out[sharding] = sm
    import torch.distributed as dist
    dist.destroy_process_group()
    errors = {}
    for sharding, sm in out.items():
        errors[f"{sharding}/forward"] = _expect(lambda: sm(*batch), RuntimeError)
        errors[f"{sharding}/full_state_dict"] = _expect(sm.full_state_dict, RuntimeError)
        errors[f"{sharding}/state_dict"] = _expect(sm.state_dict, RuntimeError)
        errors[f"{sharding}/load_state_dict"] = _expect(lambda: sm.load_state_dict(model.state_dict()),
                                                        RuntimeError)
    errors["checkpoint.save"] = _expect(lambda: fxrec.checkpoint.save(out["data_parallel"], "/nonexistent/ckpt"),
                                        RuntimeError)
    return errors


def test_a_sharded_model_after_destroy_process_group_is_refused():
    for errors in run_workers(_after_destroy_worker, 2, timeout=180):
        for what, got in errors.items():
            assert got.startswith("RuntimeError: ShardedModel: sharded for world_size 2, but torch.distributed is "
                                  "not initialised (was destroy_process_group called?)"), (what, got)


# ------------------------------------------------------------------ shard's arguments, agreed
def _agreement_worker(rank: int, world: int) -> dict:
    """One rank's bad example batch or PerTable, and settings that differ between ranks: every
    rank raises the same error from shard (none waits in the plan's broadcast), and a shard
    with good arguments then works in the same process group."""
    from fxrec.optim import PerTable, RowWiseAdagrad

    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    model = case.build()
    batch = case.draw(torch.Generator().manual_seed(rank), 3)
    dense, offsets, ids = batch
    far = (dense, offsets, [i + 100 if k == 0 and rank == 1 else i for k, i in enumerate(ids)])
    typo = PerTable({"emb_l.O": SGD(0.5)}, default=SGD(0.1)) if rank == 1 else SGD(0.1)
    row_wise = {t: "row_wise" for t in ("emb_l.0", "emb_l.1", "emb_l.2")}
    plans = [fxrec.plan(model, Topology(world), batch, constraints={t: s for t in row_wise})
             for s in ("row_wise", "table_wise")]
    errors = (ValueError, TypeError, KeyError, RuntimeError)
    out = {
        "bad_example": _expect(lambda: shard(model, Topology(world), far), errors),
        "bad_per_table": _expect(lambda: shard(model, Topology(world), batch, sparse_optimizer=typo), errors),
        "optimizer_type": _expect(lambda: shard(model, Topology(world), batch, constraints=row_wise,
                                                sparse_optimizer=SGD(0.1) if rank == 0 else RowWiseAdagrad(0.1)),
                                  errors),
        "lr": _expect(lambda: shard(model, Topology(world), batch, sparse_optimizer=SGD(0.1 if rank == 0 else 5.0)),
                      errors),
        "constraints": _expect(lambda: shard(model, Topology(world), batch,
                                             constraints=row_wise if rank == 0 else None), errors),
        "seed": _expect(lambda: shard(model, Topology(world), batch, seed=rank), errors),
        "plan": _expect(lambda: shard(model, Topology(world), batch, plan=plans[rank]), errors),
        # Topology.from_env under launchers that set LOCAL_WORLD_SIZE differently: rank 1's
        # plan check failed alone and rank 0 waited in the next collective
        "topology": _expect(lambda: shard(model, Topology(world, ranks_per_node=1 if rank else None), batch),
                            errors),
    }
    sm = shard(model, Topology(world), batch, constraints=row_wise, sparse_optimizer=SGD(0.1))
    with torch.no_grad():
        out["good_after"] = tuple(sm(*batch).shape)
    return out


@pytest.fixture(scope="module")
def agreement():
    return run_workers(_agreement_worker, 2, timeout=180)


def test_one_ranks_bad_example_batch_raises_on_every_rank(agreement):
    assert agreement[0]["bad_example"] == agreement[1]["bad_example"]
    assert agreement[0]["bad_example"].startswith("ExampleIdError: rank 1: table 'emb_l.0' (lookup %emb_l_0): "
                                                  "id "), agreement[0]["bad_example"]
    assert agreement[0]["bad_per_table"] == agreement[1]["bad_per_table"]
    assert agreement[0]["bad_per_table"].startswith("ValueError: rank 1: PerTable: unknown table(s) ['emb_l.O']")
    assert agreement[0]["good_after"] == (3, 1)


@pytest.mark.parametrize("name, values", [
    ("optimizer_type", "rank 0 has SGD(lr=0.1), rank 1 has RowWiseAdagrad(lr=0.1,"),
    ("lr", "rank 0 has SGD(lr=0.1), rank 1 has SGD(lr=5.0)"),
    ("constraints", "rank 0 has {'emb_l.0': 'row_wise', 'emb_l.1': 'row_wise', 'emb_l.2': 'row_wise'}, rank 1 has "
                    "None"),
    ("seed", "rank 0 has 0, rank 1 has 1"),
    ("plan", "rank 0 has {'emb_l.0': ('row_wise'"),
    ("topology", "rank 0 has (2, 2, 'cpu'), rank 1 has (2, 1, 'cpu')"),
])
def test_settings_that_differ_between_ranks_raise_on_every_rank(agreement, name, values):
    argument = {"optimizer_type": "sparse_optimizer", "lr": "sparse_optimizer"}.get(name, name)
    for r in agreement:
        assert r[name].startswith(f"ValueError: fxrec.shard: {argument} differs between ranks: {values}"), r[name]
    assert agreement[0][name] == agreement[1][name]
