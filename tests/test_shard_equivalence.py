"""The equivalence of DESIGN.md on real gloo processes: a model sharded over W ranks, each fed
its local batch, computes what the unsharded model computes on the global batch, and after 3
training steps every table row and dense parameter equals the unsharded training's.

One spawn per world size runs every (sharding, model, optimizer) job; each rank compares its
own results with an unsharded replica trained on the global batch and returns the mismatches,
and the parametrized tests below read their job's result. Reference training: dense
parameters with torch.optim.SGD; tables with the same update written out on their dense
gradients (SGD, or RowWiseAdagrad's ``m += mean(g^2); w -= lr / (sqrt(m) + eps) * g``).
"""
from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad
from fxrec.passes.lookup import table_names_by_param
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES

B, STEPS, SPARSE_LR, DENSE_LR, EPS = 2, 3, 0.1, 0.1, 1e-8
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise", "mixed", "explicit_plan"]
MODELS = ["dlrm_lists", "dlrm_ebc", "two_tower", "sequence", "weighted_mean", "sequence_ec", "uneven_bags",
          "odd_tables"]
OPTIMIZERS = ["sgd", "rowwise_adagrad", "adam", "adagrad", "rowwise_adagrad_per_shard"]
BETAS, ADAM_EPS = (0.9, 0.99), 1e-4  # a larger eps: Adam's g / |g| would magnify rounding of tiny grads
RANKS_PER_NODE = {2: 1, 4: 2}  # table_row_wise crosses nodes: 2 nodes x 1 rank, 2 nodes x 2 ranks

# one plan mixing every sharding type the model's tables allow
MIXED = {
    "dlrm_lists": {"emb_l.0": "column_wise", "emb_l.1": "table_row_wise", "emb_l.2": "row_wise"},
    "dlrm_ebc": {"sparse_arch.ebc.embedding_bags.t_user": "table_wise",
                 "sparse_arch.ebc.embedding_bags.t_item": "row_wise",
                 "sparse_arch.ebc.embedding_bags.t_cat": "data_parallel"},
    "two_tower": {"user_tower.user": "data_parallel", "user_tower.item": "column_wise"},
    "sequence": {"tok": "row_wise", "pos": "data_parallel"},
    "weighted_mean": {"bag": "row_wise", "fixed": "table_wise", "ebc.embedding_bags.t_a": "table_row_wise",
                      "ebc.embedding_bags.t_b": "data_parallel"},
    "sequence_ec": {"ec.embeddings.t_item": "column_wise", "ec.embeddings.t_query": "row_wise"},
    "uneven_bags": {"one": "table_wise", "one_b": "row_wise", "two": "table_wise", "two_b": "table_row_wise",
                    "three": "column_wise"},
    # item and tags stay dense; pre and codes are never trained
    "odd_tables": {"user": "column_wise", "hist": "row_wise", "pre": "table_wise", "codes": "table_row_wise"},
}
# Adagrad's state is per element, as Adam's: pooled, weighted and unpooled models suffice
ADAGRAD_MODELS = {"dlrm_ebc", "weighted_mean", "sequence_ec", "odd_tables"}
# column_wise needs at least 2 column shards of >= 4 columns: dim-4 tables cannot be split
NO_COLUMN_WISE = {"weighted_mean"}


def _jobs(world: int) -> list[tuple[str, str, str]]:
    # Adam and Adagrad (elementwise, like SGD) on 2 ranks only, to keep the suite short; TorchRec's
    # per-column-shard RowWiseAdagrad (exact_column_wise=False) differs from the exact one
    # only on column_wise tables
    return [(s, m, o) for s in SHARDINGS for m in MODELS for o in OPTIMIZERS
            if not (s == "column_wise" and m in NO_COLUMN_WISE) and (o not in ("adam", "adagrad") or world == 2)
            and (o != "adagrad" or m in ADAGRAD_MODELS)
            and (o != "rowwise_adagrad_per_shard" or (s == "column_wise" and world == 2))]


# ------------------------------------------------------------------ worker (runs in each rank)
def _constraints(sharding: str, name: str, tables) -> dict:
    if sharding in ("mixed", "explicit_plan"):
        return MIXED[name]
    return {t.name: sharding for t in tables}


def _reference_step(sm, t_params: dict, state: dict, optimizer: str) -> None:
    """The sparse update on the unsharded tables' dense gradients, on the rows the batch
    touched (nonzero gradient). RowWiseAdagrad's accumulator sees the whole row, also for
    column_wise tables (fxrec/runtime/row_sync.py), unless exact_column_wise=False (one per
    column shard, as TorchRec); Adam is lazy, with per-row step counts."""
    with torch.no_grad():
        for name, p in t_params.items():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            if optimizer == "sgd":
                p -= SPARSE_LR * g
            elif optimizer == "adam":
                _lazy_adam(p, g, state.setdefault(name, {}))
            elif optimizer == "adagrad":  # torch.optim.Adagrad's step on the whole table
                s = state.setdefault(name, torch.zeros_like(p))
                s += g * g
                p -= SPARSE_LR * g / (s.sqrt() + EPS)
            elif optimizer == "rowwise_adagrad_per_shard":  # one accumulator per column shard
                for c0, c1 in sorted({tuple(s.cols) for s in sm.plan[name].shards}):
                    m = state.setdefault((name, c0), torch.zeros(p.shape[0]))
                    gb = g[:, c0:c1]
                    m += (gb * gb).mean(1)
                    p[:, c0:c1] -= (SPARSE_LR / (m.sqrt() + EPS)).unsqueeze(1) * gb
            else:
                m = state.setdefault(name, torch.zeros(p.shape[0]))
                m += (g * g).mean(1)
                p -= (SPARSE_LR / (m.sqrt() + EPS)).unsqueeze(1) * g


def reference_training(sm, ref) -> tuple[dict, torch.optim.Optimizer, torch.optim.Optimizer]:
    """(the unsharded `ref`'s table parameters by table name, SGD over `sm`'s dense parameters,
    SGD over `ref`'s): what a test trains side by side (a dummy parameter where there is none)."""
    names = table_names_by_param(ref)
    t_params = {names[n]: p for n, p in ref.named_parameters() if names[n] in sm.plan}
    dense = [p for n, p in ref.named_parameters() if names[n] not in sm.plan]
    opt = torch.optim.SGD(list(sm.parameters()) or [torch.zeros(1, requires_grad=True)], lr=DENSE_LR)
    ref_opt = torch.optim.SGD(dense or [torch.zeros(1, requires_grad=True)], lr=DENSE_LR)
    return t_params, opt, ref_opt


def _lazy_adam(p, g, st: dict) -> None:
    rows = (g != 0).any(1).nonzero().squeeze(1)
    for key in ("m", "v"):
        st.setdefault(key, torch.zeros_like(p))
    st.setdefault("step", torch.zeros(p.shape[0], dtype=torch.float64))
    st["step"][rows] += 1
    step = st["step"][rows]
    st["m"][rows] = BETAS[0] * st["m"][rows] + (1 - BETAS[0]) * g[rows]
    st["v"][rows] = BETAS[1] * st["v"][rows] + (1 - BETAS[1]) * g[rows] ** 2
    step_size = (SPARSE_LR / (1 - BETAS[0] ** step)).float().unsqueeze(1)
    bc2 = (1 - BETAS[1] ** step).sqrt().float().unsqueeze(1)
    p[rows] -= step_size * st["m"][rows] / (st["v"][rows].sqrt() / bc2 + ADAM_EPS)


def _mismatch(what: str, got, want, out: list) -> None:
    try:
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    except AssertionError as e:
        out.append(f"{what}: {str(e).strip().splitlines()[0]} {str(e).strip().splitlines()[-1]}")


def _run_job(rank: int, world: int, sharding: str, name: str, optimizer: str) -> list[str]:
    case, bad = CASES[name], []
    model, ref, batches, tables = case.setup(world, B, seed=1)
    topology = Topology(world, ranks_per_node=RANKS_PER_NODE[world])
    cons = _constraints(sharding, name, tables)
    plan = fxrec.plan(tables, topology, constraints=cons) if sharding == "explicit_plan" else None
    sparse = {"sgd": SGD(SPARSE_LR), "rowwise_adagrad": RowWiseAdagrad(SPARSE_LR, eps=EPS),
              "rowwise_adagrad_per_shard": RowWiseAdagrad(SPARSE_LR, eps=EPS, exact_column_wise=False),
              "adam": Adam(SPARSE_LR, betas=BETAS, eps=ADAM_EPS), "adagrad": Adagrad(SPARSE_LR, eps=EPS)}[optimizer]
    sm = shard(model, topology, batches[rank], plan=plan, constraints=None if plan else cons,
               sparse_optimizer=sparse)
    for table, kind in cons.items():
        if sm.plan[table].sharding != kind:
            bad.append(f"plan put {table} {sm.plan[table].sharding}, not {kind}")
    with torch.no_grad():
        _mismatch("forward", sm(*batches[rank]), ref(*case.concat(batches))[rank * B:(rank + 1) * B], bad)
    t_params, opt, ref_opt = reference_training(sm, ref)
    state: dict = {}
    for step in range(STEPS):
        batches = case.local_batches(world, B, seed=10 + step)
        opt.zero_grad()
        sm(*batches[rank]).square().mean().backward()  # loss averaged over the local batch
        opt.step()
        ref.zero_grad()
        ref(*case.concat(batches)).square().mean().backward()  # ... and over the global batch
        ref_opt.step()
        _reference_step(sm, t_params, state, optimizer)
    full, want = sm.full_state_dict(), ref.state_dict()
    if list(full) != list(want):
        bad.append(f"full_state_dict keys {list(full)} != {list(want)}")
    for key in want:
        _mismatch(f"after {STEPS} steps, {key}", full.get(key), want[key], bad)
    return bad


_RESULTS: dict = {}


def _results(world: int) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = merge_failures(run_workers(run_jobs, world, _run_job, _jobs(world), 6, timeout=600))
    return _RESULTS[world]


@pytest.mark.parametrize("world, sharding, name, optimizer", [(w,) + job for w in (2, 4) for job in _jobs(w)])
def test_sharded_equals_unsharded(world, sharding, name, optimizer):
    results = _results(world)
    job = (sharding, name, optimizer)
    assert job in results, f"job not run (an earlier job on some rank failed): {sorted(results)[-1:]}"
    assert results[job] == [], "\n".join(results[job])


class _Pretrained(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.EmbeddingBag(6, 8, mode="sum")
        self.b = torch.nn.Embedding(5, 8)
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, ids, offsets, seq):
        return self.lin(self.a(ids, offsets) + self.b(seq).sum(1))


def _rank0_values_worker(rank: int, world: int) -> list:
    """Each rank builds the model with its own seed; rank 0 then loads 'pretrained' values."""
    out = []
    for sharding in ("table_wise", "row_wise", "column_wise", "data_parallel"):
        torch.manual_seed(rank)
        model = _Pretrained()
        if rank == 0:
            with torch.no_grad():
                model.a.weight.copy_(torch.arange(48.0).view(6, 8) / 48)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        batch = (torch.tensor([0, 5, 5, 3]), torch.tensor([0, 2]), torch.tensor([[0, 4], [2, 2]]))
        sm = shard(model, Topology(world), batch, constraints={"a": sharding, "b": sharding}, sparse_optimizer=SGD(0.1))
        with torch.no_grad():
            got, want = sm(*batch), model(*batch)
        for k in ("a.weight", "b.weight"):  # the user's tables are left as they were
            assert torch.equal(model.state_dict()[k], before[k]), (rank, sharding, k)
        out.append((sharding, got, want, {k: v for k, v in sm.full_state_dict().items()}, before))
    return out


def test_tables_start_from_rank_0s_values_as_dense_layers_do():
    results = run_workers(_rank0_values_worker, 2, timeout=300)
    for rank, per_sharding in enumerate(results):
        for (sharding, got, _, full, _), (_, _, want, _, rank0) in zip(per_sharding, results[0]):
            assert_close(got, want, rtol=0, atol=1e-6, msg=f"rank {rank} {sharding}: forward")
            for k in ("a.weight", "b.weight"):
                assert torch.equal(full[k], rank0[k]), (rank, sharding, k)


class _MaxNorm(torch.nn.Module):
    """item has max_norm (left dense, renormalising the rows it reads in forward); other is sharded."""

    def __init__(self):
        super().__init__()
        self.item = torch.nn.Embedding(40, 8, max_norm=0.5)
        self.bag = torch.nn.EmbeddingBag(40, 8, max_norm=0.4, mode="mean")
        self.other = torch.nn.Embedding(20, 8)
        self.w = torch.nn.Parameter(torch.randn(40, 8) * 0.3)  # F.embedding with max_norm
        torch.nn.init.normal_(self.item.weight, std=0.3)
        torch.nn.init.normal_(self.bag.weight, std=0.3)
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, seq):
        h = self.item(seq) + self.other(seq % 20) + self.bag(seq).unsqueeze(1)
        h = h + torch.nn.functional.embedding(seq, self.w, max_norm=0.6)
        return self.lin(h).squeeze(-1).sum(1)


def _max_norm_worker(rank: int, world: int) -> dict:
    import copy
    import warnings

    torch.manual_seed(0)
    model = _MaxNorm()
    ref = copy.deepcopy(model)
    batches = [torch.randint(0, 40, (2 + r, 6), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # item and bag stay dense: said in a warning
        sm = shard(model, Topology(world), (batches[rank],), sparse_optimizer=SGD(DENSE_LR))
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=DENSE_LR), torch.optim.SGD(ref.parameters(), lr=DENSE_LR)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(10 + step)
        batches = [torch.randint(0, 40, (2, 6), generator=g) for _ in range(world)]
        opt.zero_grad()
        sm(batches[rank]).tanh().mean().backward()
        opt.step()
        ref_opt.zero_grad()  # the unsharded model on the global batch
        ref(torch.cat(batches)).tanh().mean().backward()
        ref_opt.step()
    return {"sharded": sm.full_state_dict(), "reference": ref.state_dict()}


def test_max_norm_tables_renormalise_the_global_batchs_rows_on_every_rank():
    results = run_workers(_max_norm_worker, 2, timeout=300)
    for k in ("item.weight", "bag.weight", "w"):
        assert torch.equal(results[0]["sharded"][k], results[1]["sharded"][k]), k  # replicas stay equal
    for k, want in results[0]["reference"].items():
        assert_close(results[0]["sharded"][k], want, rtol=1e-5, atol=1e-6, msg=k)
