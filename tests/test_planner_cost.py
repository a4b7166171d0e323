"""The planner's cost model: storage per optimizer, the communication terms of each
sharding type, kernel efficiency, and numpy evaluation agreeing with the sympy formulas."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import fxrec
from fxrec import TableInfo
from fxrec.cli import main
from fxrec.commands import plan as plan_cli
from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad
from fxrec.planner import cost
from fxrec.planner.plan import Plan, optimizer_kind
from fxrec.topology import Topology

CUDA16 = Topology(16, device="cuda")  # 2 nodes x 8
B = 512


def shard(**kw):
    """One shard's parameters; the table's full dim ``C`` is the shard's ``c`` unless given."""
    base = dict(N=100_000, n=100_000, c=64, pf=10.0, u=1, eb=4, ob=4, pooled=1.0, eff=0.8)
    base.update(kw)
    base.setdefault("C", base["c"])
    return base


def costs(sharding, topo=CUDA16, optimizer="sgd", batch=B, **kw):
    return {k: float(v[0]) for k, v in cost.shard_costs(sharding, shard(**kw), topo, batch, optimizer).items()}


@pytest.mark.parametrize("optimizer,extra", [
    ("sgd", lambda n, c: 0),
    ("rowwise_adagrad", lambda n, c: 4 * n),  # one fp32 per row
    ("adam", lambda n, c: 8 * n * c + 4 * n),  # two fp32 per element + an int32 step per row
    ("adagrad", lambda n, c: 4 * n * c),  # one fp32 per element
])
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise"])
def test_storage_counts_optimizer_state(optimizer, extra, sharding):
    n, c = 6_250, 32
    sgd = costs(sharding, n=n, c=c)["memory"]
    with_state = costs(sharding, optimizer=optimizer, n=n, c=c)["memory"]
    assert with_state - sgd == extra(n, c)
    # weights are part of it, and the buffers scale with the batch
    assert sgd > n * c * 4
    assert costs(sharding, n=n, c=c, batch=2 * B)["memory"] > sgd


def test_data_parallel_adds_allreduce_and_dense_gradient():
    dp = costs("data_parallel", c=64)
    ring = CUDA16.ring_bandwidth
    assert dp["allreduce"] == pytest.approx(2 * 15 / 16 * 100_000 * 64 * 4 / ring)
    assert dp["input_dist"] == 0 and dp["output_dist"] == 0
    one = costs("data_parallel", topo=Topology(1, device="cuda"), c=64)
    assert one["allreduce"] == 0
    # the dense gradient is held beside the weights
    assert dp["memory"] >= 2 * 100_000 * 64 * 4


def test_row_wise_reduce_scatter_vs_table_wise_all_to_all():
    topo = CUDA16
    remote = (topo.ranks_per_node - 1) / topo.intra_node_bandwidth + \
        (topo.world_size - topo.ranks_per_node) / topo.inter_node_bandwidth
    tw = costs("table_wise", c=64)
    rw = costs("row_wise", n=100_000 // 16, c=64)
    assert tw["output_dist"] == pytest.approx(2 * B * 64 * 4 * remote)
    assert rw["output_dist"] == pytest.approx(2 * 15 * B * 64 * 4 / topo.ring_bandwidth)
    # a row shard reads 1/16 of the rows but writes partial sums for every bag
    G, bw = 16 * B, topo.hbm_bandwidth * 0.8
    assert tw["lookup"] == pytest.approx((G * 10 * 64 * 4 * 3 + 2 * G * 64 * 4) / bw)
    assert rw["lookup"] == pytest.approx((G * 10 / 16 * 64 * 4 * 3 + 2 * G * 64 * 4) / bw)
    # and receives 1/16 of the ids, but every bag's length
    assert rw["input_dist"] == pytest.approx(B * (10 / 16 * 8 + 4) * remote)


def test_unpooled_tables_return_one_row_per_id():
    pooled = costs("row_wise", n=6_250, pf=1.0)["output_dist"]
    pooled_pf = costs("row_wise", n=6_250, pf=20.0)["output_dist"]
    assert pooled == pytest.approx(pooled_pf)  # one pooled vector per bag, whatever the pooling
    none1 = costs("row_wise", n=6_250, pf=1.0, pooled=0.0)["output_dist"]
    none20 = costs("row_wise", n=6_250, pf=20.0, pooled=0.0)["output_dist"]
    assert none20 == pytest.approx(20 * none1)
    tw1, tw20 = (costs("table_wise", pf=p, pooled=0.0)["output_dist"] for p in (1.0, 20.0))
    assert tw20 == pytest.approx(20 * tw1)


def test_column_wise_splits_lookup_but_repeats_ids():
    tw = costs("table_wise", c=128)
    cw = costs("column_wise", c=32)  # one of 4 column shards
    assert 4 * cw["lookup"] == pytest.approx(tw["lookup"])
    assert 4 * cw["output_dist"] == pytest.approx(tw["output_dist"])
    assert cw["input_dist"] == pytest.approx(tw["input_dist"])  # every shard receives all ids


def test_table_row_wise_keeps_reduce_scatter_inside_the_node():
    twrw = costs("table_row_wise", n=100_000 // 8)
    rw = costs("row_wise", n=100_000 // 16)
    assert twrw["output_dist"] < rw["output_dist"]


def test_kernel_efficiency_scales_lookup_only():
    fast = costs("table_wise", eff=cost.KERNEL_EFFICIENCY["cuda"]["triton"])
    slow = costs("table_wise", eff=cost.KERNEL_EFFICIENCY["cuda"]["torch"])
    assert slow["lookup"] / fast["lookup"] == pytest.approx(0.80 / 0.25)
    assert slow["output_dist"] == fast["output_dist"]
    assert cost.kernel_efficiency("cuda", "triton", {"triton": 0.5}) == 0.5
    with pytest.raises(ValueError, match="unknown kernel 'tpu'"):
        cost.kernel_efficiency("cuda", "tpu")


@pytest.mark.parametrize("sharding", cost.SHARDING_TYPES)
def test_numpy_evaluation_matches_sympy(sharding):
    rng = np.random.default_rng(3)
    params = shard(N=int(rng.integers(1000, 10**6)), c=int(rng.choice([16, 64])), pf=float(rng.uniform(1, 30)),
                   pooled=float(rng.integers(0, 2)), C=128, optimizer=None)
    params.pop("optimizer")
    params["n"] = params["N"] // 3
    values = cost.plan_values(CUDA16, B)
    for optimizer in ("adam", "rowwise_adagrad"):  # rowwise_adagrad: column_wise's row sync too
        exprs = cost.shard_expressions(sharding, params, CUDA16, optimizer)
        got = cost.shard_costs(sharding, params, CUDA16, B, optimizer)
        for key in cost.TERMS + ("memory",):
            expected = float(exprs[key].subs(values))
            assert got[key][0] == pytest.approx(expected, rel=1e-12)
        # the batch size and bandwidths stay free symbols
        free = set().union(*(e.free_symbols for e in exprs.values()))
        assert cost.B in free and free <= {cost.B, cost.bw_mem, cost.bw_intra, cost.bw_inter, cost.bw_ring}


@pytest.mark.parametrize("bad,match", [
    ("momentum", "unknown sparse optimizer 'momentum'"),
])
def test_unknown_optimizer(bad, match):
    with pytest.raises(ValueError, match=match):
        cost.shard_costs("table_wise", shard(), CUDA16, B, bad)


def test_unknown_sharding_type():
    with pytest.raises(ValueError, match="unknown sharding type 'diagonal'"):
        cost.formulas("diagonal")


def test_time_is_linear_in_batch_for_sharded_tables():
    e = cost.shard_expressions("table_wise", shard(), CUDA16, "sgd", symbolic=(cost.B,))
    total = sp.expand(sum(e[t] for t in cost.TERMS))
    assert sp.Poly(total, cost.B).degree() == 1 and total.subs(cost.B, 0) == 0


@pytest.mark.parametrize("device,c,eb,floor", [
    ("cuda", 16, 4, 128),  # 64-byte rows move a 128-byte line
    ("cuda", 32, 2, 128),  # fp16: 64 bytes
    ("cuda", 64, 4, None),  # 256 bytes: no floor
    ("cpu", 8, 4, 64),  # 32-byte rows move a 64-byte cache line
    ("cpu", 16, 4, None),  # exactly one line
])
def test_narrow_rows_move_a_whole_access(device, c, eb, floor):
    topo = Topology(4, device=device)
    eff = 0.5
    got = costs("table_wise", topo=topo, c=c, eb=eb, ob=cost.output_bytes(eb), eff=eff)["lookup"]
    ids, row = 4 * B * 10, floor or c * eb  # W * B bags of pf = 10 ids each
    out = 4 * B * c * cost.output_bytes(eb)
    assert got == pytest.approx((3 * ids * row + 2 * out) / (topo.hbm_bandwidth * eff))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_optimizer_state_array_is_a_scattered_access(device):
    topo = Topology(4, device=device)
    gran, bw = cost.ROW_ACCESS_BYTES[device], topo.hbm_bandwidth * 0.8
    ids = 4 * B * 10
    sgd = costs("table_wise", topo=topo, c=64)["lookup"]
    # one 4-byte momentum per row: read and written, each access a whole line
    ada = costs("table_wise", topo=topo, c=64, optimizer="rowwise_adagrad")["lookup"]
    assert ada - sgd == pytest.approx(2 * ids * gran / bw)
    # Adam: two 64-wide fp32 moments (256 bytes each) and a 4-byte step per row
    adam = costs("table_wise", topo=topo, c=64, optimizer="adam")["lookup"]
    assert adam - sgd == pytest.approx(2 * ids * (2 * 64 * 4 + gran) / bw)


def test_narrow_column_shards_cost_more_than_their_share():
    # a 64-wide fp32 table cut 16 ways has 16-byte rows: every shard still moves 128
    whole = costs("table_wise", c=64)["lookup"]
    four = costs("column_wise", c=16)["lookup"]
    sixteen = costs("column_wise", c=4)["lookup"]
    assert 4 * four > whole and 16 * sixteen > 4 * four
    assert sixteen == pytest.approx(four * (3 * 10 * 128 + 2 * 4 * 4) / (3 * 10 * 128 + 2 * 16 * 4))


# -- exact RowWiseAdagrad on column_wise tables: second pass and row sync ----------------
# 2 nodes x 2 ranks with round bandwidths, so the arithmetic below is by hand: a message to
# one other rank costs remote / (W-1) = (1/1e11 + 2/1e10) / 3 = 7e-11 s/byte on average.
SMALL = Topology(4, ranks_per_node=2, device="cuda", hbm_bandwidth=1e12, intra_node_bandwidth=1e11,
                 inter_node_bandwidth=1e10)
PEER = 7e-11
EXACT, PER_SHARD = "rowwise_adagrad", "rowwise_adagrad_per_shard"


@pytest.mark.parametrize("N,c,second_pass,row_sync", [
    # 4 shards of 16 columns: ids = W*B*pf = 4*512*10 = 20480; per id the second pass gathers
    # its bag's grad row, 16*4 = 64 bytes, charged as one 128-byte line on cuda, and writes
    # and reads a 4-byte partial: 20480 * (128 + 8) = 2785280 bytes over bw_mem*eff = 5e11;
    # 3 peers, each sent 20480 rows x 4 bytes
    (100_000, 16, 2_785_280 / 5e11, 3 * 20_480 * 4 * PEER),
    # 2 shards of 32: a grad row is 128 bytes, the same line; 1 peer
    (100_000, 32, 2_785_280 / 5e11, 1 * 20_480 * 4 * PEER),
    # 2 shards of 64 (C=128): 256-byte grad rows: 20480 * (256 + 8) = 5406720 bytes
    (100_000, 64, 5_406_720 / 5e11, 1 * 20_480 * 4 * PEER),
    # a 1000-row table: the second pass is per id, but at most 1000 rows are exchanged
    (1_000, 16, 2_785_280 / 5e11, 3 * 1_000 * 4 * PEER),
])
def test_exact_rowwise_adagrad_charges_column_wise_second_pass_and_row_sync(N, c, second_pass, row_sync):
    kw = dict(topo=SMALL, N=N, n=N, c=c, C=128 if c == 64 else 64, pf=10.0, eff=0.5)
    exact, per_shard = costs("column_wise", optimizer=EXACT, **kw), costs("column_wise", optimizer=PER_SHARD, **kw)
    assert exact["lookup"] - per_shard["lookup"] == pytest.approx(second_pass, rel=1e-12)
    assert exact["row_sync"] == pytest.approx(row_sync, rel=1e-12) and per_shard["row_sync"] == 0
    assert exact["time"] - per_shard["time"] == pytest.approx(second_pass + row_sync, rel=1e-12)
    for key in ("input_dist", "output_dist", "allreduce", "memory"):
        assert exact[key] == per_shard[key]


@pytest.mark.parametrize("sharding,topo,kw", [
    ("table_wise", SMALL, dict(c=64)),
    ("row_wise", SMALL, dict(n=25_000, c=64)),
    ("table_row_wise", SMALL, dict(n=50_000, c=64)),
    ("data_parallel", SMALL, dict(c=64)),
    ("column_wise", SMALL, dict(c=64, C=64)),  # k = 1: the row is not split
    ("column_wise", Topology(1, device="cuda"), dict(c=16, C=64)),  # W = 1: no peer to sync with
])
def test_exact_rowwise_adagrad_costs_nothing_more_elsewhere(sharding, topo, kw):
    assert costs(sharding, topo=topo, optimizer=EXACT, **kw) == costs(sharding, topo=topo, optimizer=PER_SHARD, **kw)


@pytest.mark.parametrize("sharding", [s for s in cost.SHARDING_TYPES if s != "column_wise"])
def test_whole_row_shardings_have_no_sync_in_their_formulas(sharding):
    f = cost.formulas(sharding)
    assert f["row_sync"] == 0
    assert cost.opt_sync not in f["lookup"].free_symbols and cost.C not in f["lookup"].free_symbols


def test_optimizer_tables_agree():
    assert set(cost.OPTIMIZER_ROW_SYNC) == set(cost.OPTIMIZER_STATE) == set(plan_cli.OPTIMIZERS)
    assert cost.OPTIMIZER_STATE[PER_SHARD] == cost.OPTIMIZER_STATE[EXACT]
    assert [k for k, v in cost.OPTIMIZER_ROW_SYNC.items() if v] == [EXACT]


def test_shard_parameters_must_carry_the_full_dim():
    params = shard()
    params.pop("C")
    with pytest.raises(ValueError, match=r"shard_costs: shard parameter\(s\) \['C'\] missing"):
        cost.shard_costs("column_wise", params, CUDA16, B, EXACT)


@pytest.mark.parametrize("optimizer,kind", [
    (None, "sgd"),
    (SGD(0.1), "sgd"),
    (RowWiseAdagrad(0.1), EXACT),
    (RowWiseAdagrad(0.1, exact_column_wise=False), PER_SHARD),
    (Adam(0.1), "adam"),
    (Adagrad(0.1), "adagrad"),
    (PER_SHARD, PER_SHARD),
    (EXACT, EXACT),
])
def test_optimizer_kind(optimizer, kind):
    assert optimizer_kind(optimizer) == kind


def _column_wise_plan(optimizer):
    tables = [TableInfo("wide", 100_000, 64, 10.0), TableInfo("small", 1_000, 16, 2.0)]
    return fxrec.plan(tables, SMALL, sparse_optimizer=optimizer,
                      constraints={"wide": fxrec.Constraint("column_wise", min_shards=4), "small": "table_wise"})


@pytest.mark.parametrize("optimizer,kind", [
    (RowWiseAdagrad(0.1), EXACT),
    (RowWiseAdagrad(0.1, exact_column_wise=False), PER_SHARD),
])
def test_plan_json_round_trips_the_optimizer_kind(optimizer, kind):
    plan = _column_wise_plan(optimizer)
    back = Plan.from_json(plan.to_json())
    assert plan.sparse_optimizer == back.sparse_optimizer == kind
    assert back.per_rank() == plan.per_rank()
    # every rank holds one of wide's 4 column shards; only the exact optimizer syncs them
    syncs = [r["row_sync"] for r in plan.per_rank()]
    assert all(s > 0 for s in syncs) if kind == EXACT else syncs == [0.0] * 4


def test_explain_shows_the_row_sync():
    exact = _column_wise_plan(RowWiseAdagrad(0.1))
    per_shard = _column_wise_plan(RowWiseAdagrad(0.1, exact_column_wise=False))
    wide = exact.table_costs()["wide"]
    # 4 shards of 16 columns on SMALL at B = 512: the first row of the hand-computed table
    assert wide["row_sync"] == pytest.approx(3 * 20_480 * 4 * PEER, rel=1e-12)
    text = exact.explain()
    assert text.splitlines()[0].endswith(f"optimizer {EXACT}")
    assert f"row-sum all-to-all {wide['row_sync'] * 1e3:.4g}" in text and "rowsync" in text
    text = per_shard.explain()
    assert text.splitlines()[0].endswith(f"optimizer {PER_SHARD}") and "row-sum all-to-all" not in text
    assert exact.cost_expr("wide")["row_sync"].free_symbols == {cost.B}
    assert exact.max_rank_time() > per_shard.max_rank_time()


def test_cli_plans_with_the_per_shard_optimizer(tmp_path, capsys):
    csv = tmp_path / "tables.csv"
    csv.write_text("name,num_embeddings,embedding_dim,pooling_factor\nwide,100000,64,10\n")
    out = tmp_path / "plan.json"
    rc = main(["plan", "--tables", str(csv), "--world-size", "4", "--device", "cuda", "--optimizer", PER_SHARD,
               "--constraint", "wide=column_wise", "-o", str(out)])
    assert rc == 0 and f"optimizer {PER_SHARD}" in capsys.readouterr().out
    assert Plan.from_json(out.read_text()).sparse_optimizer == PER_SHARD
