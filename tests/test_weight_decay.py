"""Weight decay of the fused sparse optimizers (fxrec.optim's ``weight_decay``), on 2 gloo ranks
against the unsharded model: "l2" adds weight_decay * w to a touched row's gradient before the
optimizer reads it; RowWiseAdagrad's "decoupled" shrinks the row by lr * weight_decay * w
beside its step; rows no batch touched are left alone, as FBGEMM and TorchRec do. An exact
column_wise RowWiseAdagrad table's accumulator reads the decayed gradient of the whole row.
"""
from __future__ import annotations

import pytest
import torch

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad, decay_mode
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES
from test_shard_equivalence import (ADAM_EPS, BETAS, DENSE_LR, EPS, MIXED, SPARSE_LR, _constraints, _mismatch,
                                    reference_training)

B, STEPS, WD = 2, 3, 0.2
OPTIMIZERS = {
    "sgd_l2": SGD(SPARSE_LR, weight_decay=WD),
    "rowwise_adagrad_l2": RowWiseAdagrad(SPARSE_LR, eps=EPS, weight_decay=WD),
    "rowwise_adagrad_decoupled": RowWiseAdagrad(SPARSE_LR, eps=EPS, weight_decay=WD, weight_decay_mode="decoupled"),
    "adagrad_l2": Adagrad(SPARSE_LR, eps=EPS, weight_decay=WD),
    "adam_l2": Adam(SPARSE_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD),
}
# (sharding, model, optimizer): every optimizer, every sharding type, column_wise under both modes
JOBS = [
    ("column_wise", "dlrm_ebc", "rowwise_adagrad_l2"),
    ("column_wise", "sequence_ec", "rowwise_adagrad_l2"),
    ("column_wise", "dlrm_ebc", "rowwise_adagrad_decoupled"),
    ("column_wise", "two_tower", "adam_l2"),
    ("row_wise", "sequence_ec", "adagrad_l2"),
    ("table_wise", "dlrm_lists", "sgd_l2"),
    ("data_parallel", "dlrm_ebc", "rowwise_adagrad_l2"),
    ("table_row_wise", "uneven_bags", "adam_l2"),
    ("mixed", "odd_tables", "rowwise_adagrad_decoupled"),
    ("mixed", "dlrm_lists", "rowwise_adagrad_l2"),
]


def _reference_step(t_params: dict, state: dict, opt) -> None:
    """`opt`'s update, weight decay included, of the rows each table's dense gradient touches."""
    mode = decay_mode(opt)
    with torch.no_grad():
        for name, p in t_params.items():
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            rows = (g != 0).any(1).nonzero().squeeze(1)
            w0 = p[rows].clone()
            g = g[rows] + (opt.weight_decay * w0 if mode == 1 else 0.0)
            st = state.setdefault(name, {})
            if isinstance(opt, SGD):
                step = opt.lr * g
            elif isinstance(opt, RowWiseAdagrad):
                m = st.setdefault("m", torch.zeros(p.shape[0]))
                m[rows] += (g * g).mean(1)
                step = (opt.lr / (m[rows].sqrt() + opt.eps)).unsqueeze(1) * g
            elif isinstance(opt, Adagrad):
                s = st.setdefault("s", torch.zeros_like(p))
                s[rows] += g * g
                step = opt.lr * g / (s[rows].sqrt() + opt.eps)
            else:  # lazy Adam, a step count per row
                for key in ("m", "v"):
                    st.setdefault(key, torch.zeros_like(p))
                n = st.setdefault("n", torch.zeros(p.shape[0], dtype=torch.float64))
                n[rows] += 1
                b1, b2 = opt.betas
                st["m"][rows] = b1 * st["m"][rows] + (1 - b1) * g
                st["v"][rows] = b2 * st["v"][rows] + (1 - b2) * g * g
                size = (opt.lr / (1 - b1 ** n[rows])).float().unsqueeze(1)
                bc2 = (1 - b2 ** n[rows]).sqrt().float().unsqueeze(1)
                step = size * st["m"][rows] / (st["v"][rows].sqrt() / bc2 + opt.eps)
            if mode == 2:
                step = step + opt.lr * opt.weight_decay * w0
            p[rows] = w0 - step


def _run(rank: int, world: int, sharding: str, name: str, optimizer: str) -> list[str]:
    case, bad = CASES[name], []
    model, ref, batches, tables = case.setup(world, B, seed=1)
    cons = _constraints(sharding, name, tables)
    opt = OPTIMIZERS[optimizer]
    sm = shard(model, Topology(world, ranks_per_node=1), batches[rank], constraints=cons, sparse_optimizer=opt)
    for table, kind in cons.items():
        if sm.plan[table].sharding != kind:
            bad.append(f"plan put {table} {sm.plan[table].sharding}, not {kind}")
    t_params, dense_opt, ref_opt = reference_training(sm, ref)
    state: dict = {}
    for step in range(STEPS):
        batches = case.local_batches(world, B, seed=10 + step)
        dense_opt.zero_grad()
        sm(*batches[rank]).square().mean().backward()
        dense_opt.step()
        ref.zero_grad()
        ref(*case.concat(batches)).square().mean().backward()
        ref_opt.step()
        _reference_step(t_params, state, opt)
    full, want = sm.full_state_dict(), ref.state_dict()
    for key in want:
        _mismatch(f"after {STEPS} steps, {key}", full.get(key), want[key], bad)
    return bad


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _run, JOBS, timeout=600))


@pytest.mark.parametrize("job", JOBS, ids=["-".join(j) for j in JOBS])
def test_weight_decay_trains_like_the_unsharded_model(two_ranks, job):
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])


def test_a_decayed_row_is_only_a_touched_one():
    """World 1, SGD with L2: a row no batch touched keeps its value (a dense torch optimizer's
    weight_decay would shrink it too)."""
    torch.manual_seed(0)
    model = torch.nn.EmbeddingBag(10, 4, mode="sum")
    before = model.weight.detach().clone()
    ids, offsets = torch.tensor([1, 3, 3]), torch.tensor([0, 2])
    sm = shard(model, Topology(1), (ids, offsets), sparse_optimizer=SGD(0.5, weight_decay=0.1))
    sm(ids, offsets).sum().backward()
    after = sm.full_state_dict()["weight"]
    untouched = [r for r in range(10) if r not in (1, 3)]
    assert torch.equal(after[untouched], before[untouched])
    torch.testing.assert_close(after[1], before[1] - 0.5 * (1 + 0.1 * before[1]))
    torch.testing.assert_close(after[3], before[3] - 0.5 * (2 + 0.1 * before[3]))


@pytest.mark.parametrize("make, match", [
    (lambda: SGD(0.1, weight_decay=-0.5), r"SGD: weight_decay must be >= 0, got -0.5"),
    (lambda: Adam(0.1, weight_decay="x"), r"Adam: weight_decay must be a number >= 0, got 'x'"),
    (lambda: RowWiseAdagrad(0.1, weight_decay=0.1, weight_decay_mode="cowclip"),
     r"RowWiseAdagrad: weight_decay_mode must be one of \['l2', 'decoupled'\], got 'cowclip'"),
    (lambda: Adagrad(0.1, weight_decay=float("inf")), r"Adagrad: weight_decay must be finite"),
])
def test_bad_weight_decay_is_named(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_fbgemms_enum_names_are_taken():
    class WeightDecayMode:  # stands in for fbgemm_gpu's enum member
        name = "DECOUPLE"
    assert RowWiseAdagrad(0.1, weight_decay=0.1, weight_decay_mode=WeightDecayMode()).weight_decay_mode == "decoupled"
    assert decay_mode(RowWiseAdagrad(0.1, weight_decay=0.0, weight_decay_mode="decoupled")) == 0
