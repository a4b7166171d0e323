"""`fxrec.optim.PerTable`: each table trained by its own sparse optimizer, as TorchRec's
per-table fused parameters allow. Sharded on 2 gloo ranks (every sharding type, pooled and
unpooled, tables of different optimizers in one fused lookup) and on one process (the
fused replicas, whose tables' optimizer groups interleave), 3 steps leave every table and
dense parameter where the unsharded model trained with the same per-table updates leaves
them; the planner sizes each table for its own optimizer's state."""
from __future__ import annotations

import re
import traceback

import pytest
import torch

import fxrec
from dist_harness import run_workers
from fxrec.optim import SGD, Adagrad, Adam, PerTable, RowWiseAdagrad
from fxrec.runtime.local_lookup import FusedGroups, LocalLookup
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES
from test_shard_equivalence import (ADAM_EPS, BETAS, EPS, MIXED, SPARSE_LR, _mismatch, _reference_step,
                                    reference_training)

B, STEPS = 2, 3
CONFIGS = {"sgd": SGD(SPARSE_LR), "rowwise_adagrad": RowWiseAdagrad(SPARSE_LR, eps=EPS),
           "adam": Adam(SPARSE_LR, betas=BETAS, eps=ADAM_EPS), "adagrad": Adagrad(SPARSE_LR, eps=EPS)}
EBC = "sparse_arch.ebc.embedding_bags."
# (job, model, sharding, table -> optimizer kind (the rest: rowwise_adagrad))
JOBS = [
    ("mixed_lists", "dlrm_lists", "mixed", {"emb_l.1": "adam", "emb_l.2": "sgd"}),
    ("tw_ebc", "dlrm_ebc", "table_wise", {EBC + "t_user": "adam", EBC + "t_cat": "sgd"}),
    ("cw_ebc", "dlrm_ebc", "column_wise", {EBC + "t_item": "adam", EBC + "t_user": "adagrad"}),
    ("dp_ebc", "dlrm_ebc", "data_parallel", {EBC + "t_user": "sgd", EBC + "t_cat": "adam"}),
    ("rw_sequence", "sequence_ec", "row_wise", {"ec.embeddings.t_item": "adam", "ec.embeddings.t_query": "adagrad"}),
]


def _per_table(kinds: dict) -> PerTable:
    return PerTable({t: CONFIGS[k] for t, k in kinds.items()}, default=CONFIGS["rowwise_adagrad"])


def _train(sm, ref, case, world: int, rank: int, kinds: dict, bad: list) -> None:
    """STEPS steps of `sm` (local batches) and of the unsharded `ref` (global batch, each table
    updated by its own kind), then every key compared."""
    t_params, opt, ref_opt = reference_training(sm, ref)
    state: dict = {}
    for step in range(STEPS):
        batches = case.local_batches(world, B, seed=10 + step)
        opt.zero_grad()
        sm(*batches[rank]).square().mean().backward()
        opt.step()
        ref.zero_grad()
        ref(*case.concat(batches)).square().mean().backward()
        ref_opt.step()
        for table, p in t_params.items():
            _reference_step(sm, {table: p}, state, kinds.get(table, "rowwise_adagrad"))
    full, want = sm.full_state_dict(), ref.state_dict()
    for key in want:
        _mismatch(f"after {STEPS} steps, {key}", full.get(key), want[key], bad)


def _groups(sm) -> list[list[str]]:
    """Per fused kernel of this rank's lookups, the tables it serves."""
    out = []
    for m in sm.module.modules():
        if isinstance(m, LocalLookup):
            out += [[k.rpartition("@")[0] for k in f.layout.names] for f in m.fused_modules()]
    return out


def _run_job(rank: int, world: int, name: str, sharding: str, kinds: dict) -> dict:
    case, bad = CASES[name], []
    model, ref, batches, tables = case.setup(world, B, seed=1)
    cons = MIXED[name] if sharding == "mixed" else {t.name: sharding for t in tables}
    sm = shard(model, Topology(world, ranks_per_node=1), batches[rank], constraints=cons,
               sparse_optimizer=_per_table(kinds))
    _train(sm, ref, case, world, rank, kinds, bad)
    return {"bad": bad, "groups": _groups(sm), "any_grouped": any(isinstance(m, FusedGroups)
                                                                  for m in sm.module.modules())}


def _worker(rank: int, world: int) -> dict:
    out = {}
    for job, name, sharding, kinds in JOBS:
        try:
            out[job] = _run_job(rank, world, name, sharding, kinds)
        except Exception:  # noqa: BLE001 - reported per job
            out[job] = {"bad": [traceback.format_exc(limit=8)]}
            break
    return out


_RESULTS: dict = {}


def _results() -> list:
    if not _RESULTS:
        _RESULTS["ranks"] = run_workers(_worker, 2, timeout=600)
    return _RESULTS["ranks"]


@pytest.mark.parametrize("job", [j[0] for j in JOBS])
def test_per_table_optimizers_train_like_the_unsharded_model(job):
    for rank, res in enumerate(_results()):
        assert job in res, f"rank {rank}: not run (an earlier job failed)"
        assert res[job]["bad"] == [], "\n".join(res[job]["bad"])


def test_tables_of_one_optimizer_share_a_fused_kernel():
    """table_wise over 2 ranks: a rank holding tables of two optimizers runs two kernels,
    each serving only tables of one optimizer."""
    kinds = dict(JOBS[1][3])
    every = [g for res in _results() for g in res["tw_ebc"]["groups"]]
    assert sorted(t for g in every for t in g) == sorted(EBC + t for t in ("t_user", "t_item", "t_cat"))
    for group in every:
        assert len({kinds.get(t, "rowwise_adagrad") for t in group}) == 1, group
    assert any(res["mixed_lists"]["any_grouped"] for res in _results())


def test_one_process_with_interleaved_optimizer_groups():
    """World 1: the fused replicas' tables come in lookup order (user, item, cat) while the
    optimizers alternate (adam, sgd, adam): FusedGroups reorders its kernels' outputs."""
    case = CASES["dlrm_ebc"]
    kinds = {EBC + "t_user": "adam", EBC + "t_item": "sgd", EBC + "t_cat": "adam"}
    model, ref, batches, _ = case.setup(1, B, seed=1)
    sm = shard(model, Topology(1), batches[0], sparse_optimizer=_per_table(kinds))
    grouped = [m for m in sm.module.modules() if isinstance(m, FusedGroups)]
    assert len(grouped) == 1 and [len(p.layout.names) for p in grouped[0].parts] == [2, 1]
    assert not grouped[0]._in_order
    bad: list = []
    _train(sm, ref, case, 1, 0, kinds, bad)
    assert bad == [], "\n".join(bad)


# ------------------------------------------------------------------ API and planner
def test_unknown_or_missing_tables_are_named():
    case = CASES["dlrm_ebc"]
    batch = case.local_batches(1, B, seed=1)[0]
    with pytest.raises(ValueError, match=r"PerTable: unknown table\(s\) \['t_usr'\]; the model's tables are"):
        shard(case.build(), Topology(1), batch, sparse_optimizer=PerTable({"t_usr": SGD(0.1)}, default=SGD(0.1)))
    with pytest.raises(ValueError, match=r"PerTable: no optimizer for table '" + EBC.replace(".", r"\.") + "t_"):
        shard(case.build(), Topology(1), batch, sparse_optimizer=PerTable({EBC + "t_user": SGD(0.1)}))
    with pytest.raises(ValueError, match=r"PerTable: tables must map table names to fxrec.optim"):
        PerTable({"t": "sgd"})


def test_a_new_learning_rate_per_table_keeps_shared_kernels_equal():
    case = CASES["dlrm_ebc"]
    kinds = {EBC + "t_user": "adam"}
    sm = shard(case.build(), Topology(1), case.local_batches(1, B, seed=1)[0], sparse_optimizer=_per_table(kinds))
    sm.sparse_optimizer = PerTable({EBC + "t_user": Adam(0.5)}, default=RowWiseAdagrad(0.5))
    assert sm.sparse_optimizer.for_table(EBC + "t_item").lr == 0.5
    with pytest.raises(ValueError, match=r"share one fused kernel"):
        sm.sparse_optimizer = PerTable({EBC + "t_user": Adam(0.5), EBC + "t_item": RowWiseAdagrad(0.1)},
                                       default=RowWiseAdagrad(0.5))
    with pytest.raises(ValueError, match=r"must stay a Adam"):
        sm.sparse_optimizer = RowWiseAdagrad(0.5)
    # a misspelt table would silently get the default, as shard refuses it
    with pytest.raises(ValueError, match=r"PerTable: unknown table\(s\) \['t_usr'\]; the model's tables are"):
        sm.sparse_optimizer = PerTable({EBC + "t_user": Adam(0.5), "t_usr": Adam(0.1)}, default=RowWiseAdagrad(0.5))
    assert sm.sparse_optimizer.for_table(EBC + "t_user").lr == 0.5


def _fused_optimizers(sm) -> dict:
    return {name: fused.optimizer for m in sm.module.modules() if isinstance(m, LocalLookup)
            for fused in m.fused_modules() for name in fused.layout.names}


@pytest.mark.filterwarnings("ignore:fxrec.shard. table.s. .* stay dense parameters")
def test_frozen_tables_stay_frozen_under_a_new_optimizer():
    """A pretrained frozen table and a buffer table get no sparse optimizer, also after the
    user swaps in a new one (a learning-rate schedule), and take no state."""
    case = CASES["odd_tables"]
    model, _, batches, _ = case.setup(1, B, seed=1)
    sm = shard(model, Topology(1), batches[0], sparse_optimizer=RowWiseAdagrad(0.1))
    assert sm.frozen == ("pre", "codes", "negs")  # negs: looked up only under no_grad
    sm.sparse_optimizer = RowWiseAdagrad(0.05)
    optimizers = {key.rpartition("@")[0]: opt for key, opt in _fused_optimizers(sm).items()}
    assert optimizers["pre"] is None and optimizers["codes"] is None and optimizers["negs"] is None
    assert optimizers["user"] == optimizers["hist"] == RowWiseAdagrad(0.05)
    state = sm.local_optimizer_state()
    assert all(not st for t in ("pre", "codes") for *_, st in state[t]) and all(st for *_, st in state["user"])
    before = {k: v.clone() for k, v in sm.full_state_dict().items() if k in ("pre.weight", "codes")}
    sm(*batches[0]).square().mean().backward()
    after = sm.full_state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:fxrec.shard. table.s. .* stay dense parameters")
def test_a_per_table_optimizer_for_a_frozen_table_is_refused():
    case = CASES["odd_tables"]
    model, _, batches, _ = case.setup(1, B, seed=1)
    with pytest.raises(ValueError, match=r"PerTable names an optimizer for table\(s\) \['pre'\], whose weight is "
                                         r"frozen \(requires_grad=False, or a buffer\)"):
        shard(model, Topology(1), batches[0], sparse_optimizer=PerTable({"pre": SGD(0.1)}, default=SGD(0.1)))


def test_the_planner_sizes_each_table_for_its_own_optimizer():
    """Adam keeps 2 fp32 moments per element, SGD nothing: a memory cap that Adam on every
    table would exceed fits when only the small table uses Adam."""
    big = fxrec.TableInfo(name="big", num_embeddings=200_000, embedding_dim=64, pooling_factor=2.0)
    small = fxrec.TableInfo(name="small", num_embeddings=1_000, embedding_dim=64, pooling_factor=2.0)
    topo = Topology(2, memory_per_rank="60MB")  # big: 51 MB of weights, Adam would add 102 MB
    per_table = PerTable({"small": Adam(0.01)}, default=SGD(0.01))
    plan = fxrec.plan([big, small], topo, sparse_optimizer=per_table)
    assert plan.sparse_optimizer == {"big": "sgd", "small": "adam"}
    mem = {n: c["total_memory"] for n, c in plan.table_costs().items()}
    assert mem["big"] < 1.1 * 200_000 * 64 * 4  # SGD: the weights (and small buffers) only
    assert mem["small"] > 3 * 1_000 * 64 * 4  # Adam: weights + two moments
    with pytest.raises(fxrec.PlanError):
        fxrec.plan([big, small], topo, sparse_optimizer=Adam(0.01))
    assert fxrec.Plan.from_json(plan.to_json()).sparse_optimizer == {"big": "sgd", "small": "adam"}
    assert "optimizer sgd: big; adam: small" in plan.explain()


@pytest.mark.parametrize("pooled", [True, False])
def test_interleaved_groups_read_and_write_the_layout_of_one_kernel(pooled):
    """Tables of optimizers A, B, A (dims 4, 8, 4) in one LocalLookup: a FusedGroups whose
    output, per-sample-weight gradients and SGD updates equal one kernel's over all three."""
    from fxrec.runtime.dist_lookup import LocalShard

    shards = [LocalShard(f"t{i}@0", f"t{i}", (0, 20), (0, d), pooled, ()) for i, d in enumerate((4, 8, 4))]
    values = {s.key: torch.randn(20, s.num_cols, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate(shards)}
    per_table = PerTable({"t1": SGD(0.3)}, default=SGD(0.1))
    grouped = LocalLookup(shards, per_table, 1, torch.float32, "cpu", values.__getitem__)
    single = LocalLookup(shards, SGD(0.1), 1, torch.float32, "cpu", values.__getitem__)
    part = grouped.pooled if pooled else grouped.unpooled
    assert isinstance(part, FusedGroups) and part.members == [[0, 2], [1]] and not part._in_order
    g = torch.Generator().manual_seed(5)
    B = 3
    lengths = torch.randint(0, 4, (3 * B,), generator=g) if pooled else torch.tensor([5, 2, 4])
    ids = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    outs, psw_grads = [], []
    for m in (grouped, single):
        if pooled:
            w = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(6)).requires_grad_(True)
            out, _ = m(ids, off, w, None, None)
        else:
            w = None
            _, parts = m(None, None, None, ids, off)
            out = torch.cat([p.reshape(-1) for p in parts])
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out) / out.numel())
        outs.append(out.detach())
        psw_grads.append(None if w is None else w.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    if pooled:
        torch.testing.assert_close(psw_grads[0], psw_grads[1])
    got, want = grouped.shard_weights(), single.shard_weights()
    torch.testing.assert_close(got["t0@0"], want["t0@0"])  # SGD(0.1) in both
    torch.testing.assert_close(got["t2@0"], want["t2@0"])
    step_single = want["t1@0"] - values["t1@0"]  # SGD(0.1)'s step; SGD(0.3) takes 3 times it
    torch.testing.assert_close(got["t1@0"] - values["t1@0"], 3 * step_single, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the setter, on every rank
def _swap(sm, value) -> str:
    try:
        sm.sparse_optimizer = value
        return "accepted"
    except ValueError as e:
        return f"ValueError: {e}"


def _setter_worker(rank: int, world: int) -> dict:
    """table_wise over 2 ranks, t_user and t_item pinned on rank 0 (one fused kernel under SGD),
    t_cat on rank 1; each new optimizer is set on every rank, then the state of each."""
    case = CASES["dlrm_ebc"]
    model, _, batches, _ = case.setup(world, B, seed=1)
    pins = {"t_user": 0, "t_item": 0, "t_cat": 1}
    cons = {EBC + t: fxrec.Constraint("table_wise", ranks=(r,)) for t, r in pins.items()}
    sm = shard(model, Topology(world), batches[rank], constraints=cons, sparse_optimizer=SGD(0.1))
    out = {"groups": _groups(sm)}
    for name, value in [
        ("shares_a_kernel", PerTable({EBC + "t_user": SGD(0.05)}, default=SGD(0.1))),  # refused on rank 0 only
        ("untrained", PerTable({EBC + "t_cat": None}, default=SGD(0.1))),  # refused on rank 1 only
        ("rank_own", SGD(0.1 + rank)),  # each rank checks its own alone, and passes
        ("alone", PerTable({EBC + "t_cat": SGD(0.05)}, default=SGD(0.1))),  # fits every rank's kernels
    ]:
        out[name] = (_swap(sm, value), sm.sparse_optimizer, _fused_optimizers(sm))
    sm(*batches[rank]).square().mean().backward()  # the ranks still run one program
    return out


def test_a_new_sparse_optimizer_is_agreed_by_every_rank():
    """A rank checked a new sparse optimizer against its own kernels alone: under table_wise,
    the rank holding a table refused what the other rank took and applied, so the ranks
    trained apart (or one stopped while the other waited). Now every rank raises the first
    refusing rank's error and keeps its optimizer, or every rank applies it; a value that
    differs from rank 0's is refused on every rank."""
    ranks = run_workers(_setter_worker, 2, timeout=300)
    assert ranks[0]["groups"] == [[EBC + "t_user", EBC + "t_item"]] and ranks[1]["groups"] == [[EBC + "t_cat"]]
    refused = {"shares_a_kernel": r"ValueError: rank 0: sparse_optimizer: tables \[.*t_user.*t_item.*\] share one "
                                  r"fused kernel",
               "untrained": r"ValueError: rank 1: sparse_optimizer: table '.*t_cat' must stay a SGD, got None",
               "rank_own": r"ValueError: ShardedModel.sparse_optimizer: sparse_optimizer differs between ranks: "
                           r"rank 0 has SGD\(lr=0.1\), rank 1 has SGD\(lr=1.1\); every rank must set the same "
                           r"sparse_optimizer"}
    for rank, res in enumerate(ranks):
        for name, pattern in refused.items():
            outcome, optimizer, fused = res[name]
            assert re.match(pattern, outcome), (rank, name, outcome)
            assert optimizer == SGD(0.1) and set(fused.values()) == {SGD(0.1)}, (rank, name, optimizer, fused)
        outcome, optimizer, fused = res["alone"]
        assert outcome == "accepted", (rank, outcome)
        assert optimizer == PerTable({EBC + "t_cat": SGD(0.05)}, default=SGD(0.1))
        assert {k.rpartition("@")[0]: v for k, v in fused.items()} == (
            {EBC + "t_user": SGD(0.1), EBC + "t_item": SGD(0.1)} if rank == 0 else {EBC + "t_cat": SGD(0.05)})


def test_a_table_with_a_kernel_of_its_own_is_frozen_by_lr_zero():
    """What README's "Limits of fused training" says: after shard, a table given a setting of
    its own at shard time stops moving once its lr is set to 0 (its RowWiseAdagrad state still
    accumulates); the other tables train on."""
    case = CASES["dlrm_ebc"]
    model, _, batches, _ = case.setup(1, B, seed=1)
    own = PerTable({EBC + "t_user": RowWiseAdagrad(0.04)}, default=RowWiseAdagrad(0.05))
    sm = shard(model, Topology(1), batches[0], sparse_optimizer=own)
    sm.sparse_optimizer = PerTable({EBC + "t_user": RowWiseAdagrad(0.0)}, default=RowWiseAdagrad(0.05))
    before = {k: v.clone() for k, v in sm.full_state_dict().items()}
    state = [s.clone() for *_, st in sm.local_optimizer_state()[EBC + "t_user"] for s in st.values()]
    sm(*batches[0]).square().mean().backward()
    after = sm.full_state_dict()
    assert torch.equal(after[EBC + "t_user.weight"], before[EBC + "t_user.weight"])
    assert not torch.equal(after[EBC + "t_item.weight"], before[EBC + "t_item.weight"])
    assert any(not torch.equal(s, t) for s, t in
               zip(state, [s for *_, st in sm.local_optimizer_state()[EBC + "t_user"] for s in st.values()]))
