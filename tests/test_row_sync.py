"""Exact RowWiseAdagrad on column_wise tables (fxrec/runtime/row_sync.py) on 2 gloo ranks:
where the exchange node goes, that every column shard of a row ends with the same
accumulator (up to rounding), and that a forward without autograd touches nothing. The numbers
against the unsharded training are tests/test_shard_equivalence.py's (column_wise and mixed
plans x rowwise_adagrad)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.lowering import sparse_update
from fxrec.optim import SGD, RowWiseAdagrad
from fxrec.passes import lookup as L
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES

LR, B = 0.1, 3
WORLD = 2

# (case, optimizer, constraints): which tables are column_wise; the rest table_wise
STRUCTURE = [
    ("dlrm_lists", "rowwise_adagrad", {"emb_l.0": "column_wise"}, True),
    ("dlrm_lists", "sgd", {"emb_l.0": "column_wise"}, False),  # SGD is elementwise: no exchange needed
    ("dlrm_lists", "rowwise_adagrad", {}, False),  # no table split by columns
    ("dlrm_lists", "per_shard", {"emb_l.0": "column_wise"}, False),  # TorchRec's accumulators: asked for
]
MOMENTA = [  # (case, column_wise tables)
    ("dlrm_lists", {"emb_l.0", "emb_l.2"}),  # emb_l.1 (table_wise) shares the fused kernel
    ("two_tower", {"user_tower.item"}),  # unpooled, read by two lookups
    ("sequence_ec", {"ec.embeddings.t_item", "ec.embeddings.t_query"}),  # unpooled, every table split
]


def _optimizer(name: str):
    return {"rowwise_adagrad": RowWiseAdagrad(LR), "per_shard": RowWiseAdagrad(LR, exact_column_wise=False),
            "sgd": SGD(LR)}[name]


def _build(rank: int, name: str, column_wise: set, optimizer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    batch = case.local_batches(WORLD, B, seed=1)[rank]
    cons = {t.name: "column_wise" if t.name in column_wise else "table_wise"
            for t in fxrec.find_tables(model, batch)}
    return case, model, shard(model, Topology(WORLD), batch, constraints=cons, sparse_optimizer=optimizer)


def _structure(rank: int, name: str, optimizer: str, cons: dict) -> tuple:
    _, _, sm = _build(rank, name, set(cons), _optimizer(optimizer))
    syncs = [n for n in sm.module.graph.nodes if n.op == "call_module" and n.target.endswith(".row_sync")]
    return (len(syncs), syncs[0].meta.get(L.COMM) if syncs else None,
            sorted(u.target.rsplit(".", 1)[-1] for u in syncs[0].users) if syncs else [])


def _momenta(rank: int, name: str, column_wise: set, bags_of_one: float) -> tuple[dict, dict]:
    """Each column shard's accumulator after two steps, by table, and the tables then; the
    split tables updated by bags of one (fraction 1) or by the lookups' own ids (0)."""
    sparse_update.BAGS_OF_ONE_UNIQUE_FRACTION = bags_of_one
    case, _, sm = _build(rank, name, column_wise, RowWiseAdagrad(LR))
    for step in range(2):
        sm(*case.local_batches(WORLD, B, seed=10 + step)[rank]).square().mean().backward()
    out = {}
    for unit in sm.module.fxrec_shards.children():
        lookup = getattr(unit, "lookup", None)
        for fused in lookup.fused_modules() if lookup is not None else []:
            for key, state in fused.table_state().items():
                if key.split("@")[0] in column_wise:
                    out[key] = state["momentum"].clone()
    return out, sm.full_state_dict()


def _no_grad_forward(rank: int) -> bool:
    case, _, sm = _build(rank, "dlrm_lists", {"emb_l.0"}, RowWiseAdagrad(LR))
    before = {k: v.clone() for k, v in sm.full_state_dict().items()}
    with torch.no_grad():
        sm(*case.local_batches(WORLD, B, seed=3)[rank])
    return all(torch.equal(v, before[k]) for k, v in sm.full_state_dict().items())


def _worker(rank: int, world: int) -> dict:
    return {"structure": [_structure(rank, n, o, c) for n, o, c, _ in STRUCTURE],
            "momenta": [{f: _momenta(rank, n, cw, f) for f in (0.0, 1.0)} for n, cw in MOMENTA],
            "no_grad": _no_grad_forward(rank)}


_RESULTS: list = []


def _results() -> list[dict]:
    if not _RESULTS:
        _RESULTS.extend(run_workers(_worker, WORLD, timeout=300))
    return _RESULTS


@pytest.mark.parametrize("i", range(len(STRUCTURE)), ids=[f"{n}-{o}-{sorted(c)}" for n, o, c, _ in STRUCTURE])
def test_row_sync_node_only_where_needed(i):
    expected = STRUCTURE[i][3]
    for count, kind, users in (r["structure"][i] for r in _results()):
        assert count == int(expected)
        if expected:  # a communication node (its all-to-all runs in backward) feeding lookup and output_prep
            assert kind == "all_to_all" and users == ["lookup", "output_prep"]


@pytest.mark.parametrize("bags_of_one", [0.0, 1.0], ids=["own_ids", "bags_of_one"])
@pytest.mark.parametrize("i", range(len(MOMENTA)), ids=[n for n, _ in MOMENTA])
def test_column_shards_hold_identical_accumulators(i, bags_of_one):
    by_table: dict = {}
    for r in _results():
        for key, m in r["momenta"][i][bags_of_one][0].items():
            by_table.setdefault(key.split("@")[0], []).append(m)
    assert set(by_table) == MOMENTA[i][1]
    for table, ms in by_table.items():
        assert len(ms) == 2, f"{table}: expected one column shard per rank"
        assert ms[0].abs().sum() > 0, f"{table}: no row was updated"
        # equal up to one rounding of the shard's own mean per step (row_sync.py)
        assert_close(ms[0], ms[1], rtol=1e-6, atol=0, msg=table)


@pytest.mark.parametrize("i", range(len(MOMENTA)), ids=[n for n, _ in MOMENTA])
def test_bags_of_one_train_as_the_lookups_own_ids(i):
    """The two ways of making the split tables' update (sparse_update.row_sq_sums) give the
    same tables; test_shard_equivalence holds the default one to the unsharded training."""
    for r in _results():
        own, bags = r["momenta"][i][0.0][1], r["momenta"][i][1.0][1]
        assert own.keys() == bags.keys()
        for key in own:
            assert_close(bags[key], own[key], rtol=1e-5, atol=1e-6, msg=key)


def test_no_grad_forward_leaves_tables_alone():
    assert all(r["no_grad"] for r in _results())
