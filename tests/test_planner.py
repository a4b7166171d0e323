"""fxrec.plan on table lists: shard structure per sharding type, constraints, pinned
ranks, per-rank sums, JSON round trip, explain(), re-evaluating another batch size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fxrec
from fxrec import Constraint, Plan, PlanError, TableInfo, Topology
from fxrec.planner import cost

TOPOLOGIES = {
    "cpu4": Topology(4, device="cpu"),
    "cuda16": Topology(16, device="cuda"),  # 2 nodes x 8
    "cuda8x4": Topology(8, ranks_per_node=4, device="cuda"),
}


def random_tables(seed: int, count: int, max_rows: int = 3000) -> list[TableInfo]:
    rng = np.random.default_rng(seed)
    return [TableInfo(f"t{i}", int(rng.integers(20, max_rows)), int(rng.choice([4, 8, 12, 16, 24])),
                      float(rng.uniform(1, 20)), pooling=str(rng.choice(["sum", "mean", "none"])))
            for i in range(count)]


def coverage(tp) -> np.ndarray:
    grid = np.zeros((tp.table.num_embeddings, tp.table.embedding_dim), dtype=np.int64)
    for s in tp.shards:
        grid[s.rows[0]:s.rows[1], s.cols[0]:s.cols[1]] += 1
    return grid


def check_structure(tp, topo: Topology) -> None:
    N, d, W, P = tp.table.num_embeddings, tp.table.embedding_dim, topo.world_size, topo.ranks_per_node
    ranks = [s.rank for s in tp.shards]
    if tp.sharding == "data_parallel":
        assert sorted(ranks) == list(range(W))
        assert (coverage(tp) == W).all()
        return
    assert (coverage(tp) == 1).all(), f"{tp.name}: shards do not tile the table exactly"
    if tp.sharding == "table_wise":
        assert len(tp.shards) == 1
    elif tp.sharding == "row_wise":
        assert ranks == list(range(W))
        sizes = [s.num_rows for s in tp.shards]
        assert max(sizes) - min(sizes) <= 1 and [s.rows[0] for s in tp.shards] == sorted(s.rows[0] for s in tp.shards)
    elif tp.sharding == "table_row_wise":
        node = ranks[0] // P
        assert ranks == list(topo.node_ranks(node))
    elif tp.sharding == "column_wise":
        assert len(set(ranks)) == len(ranks) >= 2
        assert all(s.rows == (0, N) for s in tp.shards)
        if d % 4 == 0:
            assert all(s.num_cols % 4 == 0 for s in tp.shards)
        assert len({s.num_cols for s in tp.shards}) == 1


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise", "column_wise", "data_parallel"])
@pytest.mark.parametrize("topo_name", ["cpu4", "cuda16", "cuda8x4"])
def test_every_sharding_type_tiles_tables(sharding, topo_name):
    topo = TOPOLOGIES[topo_name]
    tables = [t for t in random_tables(1, 6) if sharding != "column_wise" or t.embedding_dim >= 8]
    plan = fxrec.plan(tables, topo, constraints={t.name: sharding for t in tables})
    for t in tables:
        tp = plan[t.name]
        assert tp.sharding == sharding
        check_structure(tp, topo)


@pytest.mark.parametrize("topo_name", ["cpu4", "cuda16", "cuda8x4"])
def test_free_plan_structure_and_kernels(topo_name):
    topo = TOPOLOGIES[topo_name]
    tables = random_tables(2, 12, max_rows=200_000)
    plan = fxrec.plan(tables, topo)
    assert list(plan) == [t.name for t in tables] and len(plan) == 12
    for t in tables:
        if t.num_embeddings * t.embedding_dim < 10**6:  # small enough to tile-check densely
            check_structure(plan[t.name], topo)
        assert plan[t.name].kernel == cost.DEFAULT_KERNELS[topo.device][0]
        assert plan[t.name].table.num_embeddings == t.num_embeddings
    assert plan.topology == topo and plan.batch_size == 512


def test_per_rank_sums_match_table_costs():
    topo = TOPOLOGIES["cuda8x4"]
    plan = fxrec.plan(random_tables(3, 10, max_rows=50_000), topo)
    ranks = plan.per_rank()
    assert [r["rank"] for r in ranks] == list(range(8))
    assert [r["node"] for r in ranks] == [0] * 4 + [1] * 4
    for r in ranks:
        assert r["time"] == pytest.approx(sum(r[t] for t in cost.TERMS))
        assert r["memory_bytes"] <= topo.memory_per_rank
    costs = plan.table_costs()
    assert sum(r["num_shards"] for r in ranks) == sum(len(tp.shards) for tp in plan.tables.values())
    assert sum(r["time"] for r in ranks) == pytest.approx(sum(c["total_time"] for c in costs.values()))
    assert sum(r["memory_bytes"] for r in ranks) == pytest.approx(sum(c["total_memory"] for c in costs.values()))
    assert plan.max_rank_time() == pytest.approx(max(r["time"] for r in ranks))
    assert plan.max_rank_time() == pytest.approx(plan.stats["max_rank_time"])
    assert plan.imbalance() == pytest.approx(max(r["time"] for r in ranks) / np.mean([r["time"] for r in ranks]))
    assert plan.stats["lower_bound"] <= plan.max_rank_time() * (1 + 1e-12)


def test_json_round_trip():
    tables = random_tables(4, 8) + [TableInfo("half", 5000, 32, 3.0, dtype=torch.float16, uses=2,
                                              features=["f1", "f2"])]
    plan = fxrec.plan(tables, TOPOLOGIES["cuda16"], sparse_optimizer="rowwise_adagrad", batch_size=256,
                      constraints={"t0": "row_wise", "t1": "column_wise"})
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back.tables == plan.tables and back.topology == plan.topology
    assert (back.batch_size, back.sparse_optimizer) == (256, "rowwise_adagrad")
    assert back["half"].table.dtype == torch.float16 and back["half"].table.features == ["f1", "f2"]
    assert back.per_rank() == plan.per_rank()
    assert back.to_json() == text


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["tables"][0]["shards"].append(d["tables"][0]["shards"][0]), "not exactly once|one shard"),
    (lambda d: d["tables"][0].update(sharding="diagonal"), "unknown sharding type 'diagonal'"),
    (lambda d: d["tables"][0]["shards"][0].__setitem__(0, 99), "rank 99, outside the 4-rank world"),
    (lambda d: d.update(version=7), "version 1"),
    (lambda d: d["tables"][0].pop("kernel"), "malformed"),
    (lambda d: d["tables"].append(d["tables"][0]), "table 't0' is planned twice"),
    (lambda d: d.update(batch_size=-5), "batch_size must be a positive integer, got -5"),
    (lambda d: d["tables"][0]["shards"][0].__setitem__(0, 1.7), "shard fields must be whole numbers, got 1.7"),
    (lambda d: d["tables"][0]["table"].update(num_embeddings=1000.9), "num_embeddings must be a whole number"),
])
def test_from_json_rejects_broken_plans(edit, match):
    plan = fxrec.plan(random_tables(5, 3), TOPOLOGIES["cpu4"], constraints={"t0": "table_wise"})
    data = json.loads(plan.to_json())
    edit(data)
    with pytest.raises(ValueError, match=match):
        Plan.from_json(json.dumps(data))


def test_explain_names_tables_terms_and_imbalance():
    tables = [TableInfo("big", 400_000, 64, 30.0), TableInfo("tiny", 50, 16, 2.0), TableInfo("mid", 20_000, 32, 5.0)]
    plan = fxrec.plan(tables, TOPOLOGIES["cuda16"], constraints={"big": "row_wise", "tiny": "data_parallel",
                                                                  "mid": "table_wise"})
    text = plan.explain()
    assert "big: row_wise over 16 ranks [triton]" in text
    assert "lookup" in text and "ids all-to-all" in text and "reduce-scatter" in text
    assert "tiny: data_parallel over 16 ranks" in text and "all-reduce" in text
    assert "mid: table_wise on rank" in text
    assert "imbalance" in text and "lower bound" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(tuple("0123456789"))]) == 16
    big = plan.table_costs()["big"]
    assert f"{big['time'] * 1e3:.4g} ms = lookup {big['lookup'] * 1e3:.4g}" in text


def test_another_batch_size_without_replanning():
    tables = random_tables(6, 8, max_rows=100_000)
    plan = fxrec.plan(tables, TOPOLOGIES["cuda16"], constraints={t.name: "table_wise" for t in tables})
    # table-wise costs are linear in the batch with no constant term
    for a, b in zip(plan.per_rank(), plan.per_rank(batch_size=2048)):
        assert b["time"] == pytest.approx(4 * a["time"])
        assert b["memory_bytes"] > a["memory_bytes"] or a["num_shards"] == 0
    exprs = plan.cost_expr("t0")
    for key in ("lookup", "input_dist", "output_dist", "time"):
        assert exprs[key].free_symbols == {cost.B}
    costs_2048 = plan.table_costs(2048)["t0"]
    assert float(exprs["time"].subs(cost.B, 2048)) == pytest.approx(costs_2048["time"])
    assert "batch 2048 per rank" in plan.explain(batch_size=2048)
    symbolic = plan.cost_expr("t0", symbolic_bandwidths=True)
    assert cost.bw_inter in symbolic["output_dist"].free_symbols


def test_data_parallel_cost_has_a_batch_independent_allreduce():
    plan = fxrec.plan([TableInfo("small", 100, 16, 4.0)], TOPOLOGIES["cuda16"], constraints={"small": "data_parallel"})
    e = plan.cost_expr("small")
    assert e["allreduce"].free_symbols == set() and float(e["allreduce"]) > 0


def test_constraints_types_kernels_and_shard_counts():
    tables = random_tables(7, 6, max_rows=100_000)
    cons = {
        "t0": Constraint(sharding_types=("column_wise",), min_shards=3, max_shards=4),
        "t1": Constraint(kernels="torch"),
        "t2": Constraint(sharding_types=["row_wise", "table_row_wise"]),
        "t3": "data_parallel",
    }
    tables[0] = TableInfo("t0", 1000, 48, 2.0)  # 48 = 12 x 4: 2, 3, 4, 6 or 12 shards of multiples of 4
    plan = fxrec.plan(tables, TOPOLOGIES["cuda16"], constraints=cons)
    assert plan["t0"].sharding == "column_wise" and len(plan["t0"].shards) in (3, 4)
    assert plan["t1"].kernel == "torch"
    assert plan["t2"].sharding in ("row_wise", "table_row_wise")
    assert plan["t3"].sharding == "data_parallel"


@pytest.mark.parametrize("sharding,pins", [
    ("table_wise", (5,)),
    ("table_wise", (2, 3)),
    ("column_wise", (1, 6)),
    ("table_row_wise", tuple(range(8, 16))),
])
def test_pinned_ranks(sharding, pins):
    tables = random_tables(8, 5)
    plan = fxrec.plan(tables, TOPOLOGIES["cuda16"], constraints={"t1": Constraint(sharding, ranks=pins)})
    assert plan["t1"].sharding == sharding
    assert set(plan["t1"].ranks) <= set(pins)


def test_pinned_ranks_exclude_spread_types():
    plan = fxrec.plan(random_tables(9, 3), TOPOLOGIES["cpu4"], constraints={"t0": Constraint(ranks=(0, 1))})
    assert plan["t0"].sharding in ("table_wise", "column_wise") and set(plan["t0"].ranks) <= {0, 1}


@pytest.mark.parametrize("optimizer,per_element,per_row", [
    ("sgd", 0, 0), ("rowwise_adagrad", 0, 4), ("adam", 8, 4), (fxrec.optim.Adam(lr=0.1), 8, 4),
    (fxrec.optim.RowWiseAdagrad(lr=0.1), 0, 4), ("adagrad", 4, 0), (fxrec.optim.Adagrad(lr=0.1), 4, 0),
])
def test_memory_counts_optimizer_state(optimizer, per_element, per_row):
    tables = [TableInfo("a", 10_000, 16, 2.0), TableInfo("b", 4_000, 32, 1.0)]
    cons = {"a": Constraint("table_wise", ranks=(0,)), "b": Constraint("table_wise", ranks=(1,))}
    base = fxrec.plan(tables, TOPOLOGIES["cpu4"], constraints=cons).per_rank()
    got = fxrec.plan(tables, TOPOLOGIES["cpu4"], constraints=cons, sparse_optimizer=optimizer).per_rank()
    for r, (n, d) in ((0, (10_000, 16)), (1, (4_000, 32))):
        assert got[r]["memory_bytes"] - base[r]["memory_bytes"] == n * d * per_element + n * per_row


def test_pooling_factor_override_and_determinism():
    tables = random_tables(10, 10, max_rows=50_000)
    a = fxrec.plan(tables, TOPOLOGIES["cuda8x4"])
    assert a.to_json() == fxrec.plan(tables, TOPOLOGIES["cuda8x4"]).to_json()
    b = fxrec.plan(tables, TOPOLOGIES["cuda8x4"], constraints={"t0": Constraint(pooling_factor=500.0)})
    assert b["t0"].table.pooling_factor == 500.0
    assert b.table_costs()["t0"]["lookup"] > a.table_costs()["t0"]["lookup"]


def test_check_topology_and_lookup_errors():
    plan = fxrec.plan(random_tables(11, 3), TOPOLOGIES["cpu4"])
    plan.check(Topology(4))
    with pytest.raises(PlanError, match="made for 4 ranks .* not 8"):
        plan.check(Topology(8))
    with pytest.raises(KeyError, match="no table 'nope'"):
        plan["nope"]


def test_plan_a_model_through_find_tables():
    emb = torch.nn.EmbeddingBag(1000, 16, mode="sum")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, ids, offsets):
            return self.emb(ids, offsets)

    ids, offsets = torch.randint(0, 1000, (12,)), torch.tensor([0, 3, 7, 9])
    plan = fxrec.plan(M(), TOPOLOGIES["cpu4"], (ids, offsets))
    assert list(plan) == ["emb"]
    tp = plan["emb"]
    assert (tp.table.num_embeddings, tp.table.embedding_dim) == (1000, 16)
    assert tp.table.pooling_factor == pytest.approx(3.0)
    check_structure(tp, TOPOLOGIES["cpu4"])
