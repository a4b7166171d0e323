"""`fxrec.shard(..., comm_dtype="bf16" / "fp16")`, TorchRec's quantized comms: on 2 gloo ranks
every output collective of the sharded tables carries the narrow dtype in forward and backward
(recorded at torch.distributed), the outputs are the unsharded model's rounded to it, the model
trains close to the unsharded one, and a bad value is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.optim import SGD
from fxrec.topology import Topology
from shard_models import _cat_kjt, _kjt

B, STEPS, LR = 4, 3, 0.1
POOLED, SEQ = {"a": 20, "b": 24}, {"s": 18}
TABLES = ["ebc.embedding_bags.t_a", "ebc.embedding_bags.t_b", "ec.embeddings.t_s"]
WIRE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 20, 8, ["a"]),
                                           EmbeddingBagConfig("t_b", 24, 8, ["b"], pooling="mean")])
        self.ec = EmbeddingCollection([EmbeddingConfig("t_s", 18, 8, ["s"])])
        self.lin = nn.Linear(16, 1)

    def forward(self, kjt, seq):
        pooled = self.ebc(kjt).values()
        rows = self.ec(seq)["s"].values()
        return self.lin(pooled), pooled, rows


def _batches(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(_kjt(g, POOLED, B), _kjt(g, SEQ, B)) for _ in range(world)]


def _record(seen: list):
    """Patch this process's collectives that carry lookup results to note their float dtypes
    (fxrec.runtime.comm binds its reduce-scatter and all-gather at import: patched there)."""
    from fxrec.runtime import comm
    for owner, name in ((dist, "all_to_all_single"), (comm, "_reduce_scatter_single"),
                        (comm, "_all_gather_single")):
        real = getattr(owner, name)

        def wrapped(out, inp, *args, _real=real, _name=name, **kwargs):
            if inp.is_floating_point():
                seen.append((_name, inp.dtype))
            return _real(out, inp, *args, **kwargs)
        setattr(owner, name, wrapped)


def _run(rank: int, world: int, sharding: str, wire: str) -> list[str]:
    bad: list[str] = []
    torch.manual_seed(0)
    model = Model()
    ref = copy.deepcopy(model)
    batches = _batches(world, seed=1)
    sm = fxrec.shard(model, Topology(world), batches[rank], constraints={t: sharding for t in TABLES},
                     sparse_optimizer=SGD(LR), comm_dtype=wire)
    seen: list = []
    _record(seen)
    mine = slice(rank * B, (rank + 1) * B)
    cat = (_cat_kjt([k for k, _ in batches]), _cat_kjt([s for _, s in batches]))
    dtype = WIRE[wire]
    with torch.no_grad():
        got, want = sm(*batches[rank]), ref(*cat)
    rows_mine = cat[1]["s"].lengths()[:mine.stop].sum() - cat[1]["s"].lengths()[mine].sum(), \
        cat[1]["s"].lengths()[:mine.stop].sum()
    wants = (want[1][mine], want[2][int(rows_mine[0]):int(rows_mine[1])])
    for what, g, w in zip(("pooled", "rows"), got[1:], wants):
        if sharding == "data_parallel":  # no collective carries them: as in fp32
            if not torch.equal(g, w):
                bad.append(f"{sharding} {wire} {what}: a data_parallel table's output changed")
            continue
        # what crossed the wire is the value rounded to the narrow dtype (t_b's mean divides after)
        exact = g if what == "rows" else g[:, :8]
        if not torch.equal(exact, exact.to(dtype).float()):
            bad.append(f"{sharding} {wire} {what}: output not representable in {wire}: sent in a wider dtype")
        # each sent value is rounded relative to itself; row_wise partial sums that cancel
        # make the error relative to the partials': bounded by the largest value's
        eps = 2 ** -7 if wire == "bf16" else 2 ** -10
        try:
            assert_close(g, w, rtol=eps, atol=eps * float(w.abs().max()))
        except AssertionError as e:
            bad.append(f"{sharding} {wire} {what}: {str(e).splitlines()[-1]}")
    # train side by side: close (the rounding of forward and backward), not equal
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.lin.parameters(), lr=LR)
    tables = [p for n, p in ref.named_parameters() if not n.startswith("lin")]
    seen.clear()
    for step in range(STEPS):
        batches = _batches(world, seed=10 + step)
        opt.zero_grad()
        sum(o.square().mean() for o in sm(*batches[rank])).backward()
        opt.step()
        ref.zero_grad()
        sum(o.square().mean() for o in ref(_cat_kjt([k for k, _ in batches]),
                                           _cat_kjt([s for _, s in batches]))).backward()
        ref_opt.step()
        with torch.no_grad():
            for p in tables:
                p -= LR * p.grad
    wide = sorted({f"{op} {d}" for op, d in seen if d != dtype})
    if sharding != "data_parallel" and (wide or not seen):
        bad.append(f"{sharding} {wire}: lookup collectives carried {wide or 'nothing'}, not only {dtype}")
    # the sums of row_wise (and table_row_wise on one node) travel by reduce-scatter, their
    # gradients by all-gather: both seen, both narrow
    if sharding == "row_wise" and not {"_reduce_scatter_single", "_all_gather_single"} <= {op for op, _ in seen}:
        bad.append(f"{sharding} {wire}: no reduce-scatter / all-gather recorded ({sorted({op for op, _ in seen})})")
    full = sm.full_state_dict()
    for key, want_value in ref.state_dict().items():
        try:
            assert_close(full[key], want_value, rtol=1e-2, atol=1e-3)
        except AssertionError as e:
            bad.append(f"{sharding} {wire} after {STEPS} steps, {key}: {str(e).splitlines()[-1]}")
    return bad


_JOBS = [(s, "bf16") for s in ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")] + \
    [("row_wise", "fp16")]


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _run, _JOBS, timeout=300))


@pytest.mark.parametrize("job", _JOBS, ids=[f"{s}-{w}" for s, w in _JOBS])
def test_output_collectives_carry_the_narrow_dtype_and_train_close(two_ranks, job):
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])


@pytest.mark.parametrize("value", ["int8", torch.int8, 16, "half-ish"])
def test_a_bad_comm_dtype_is_named(value):
    with pytest.raises(ValueError, match=r"comm_dtype must be one of .* got " + repr(value).replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        fxrec.shard(Model(), Topology(1), _batches(1, 0)[0], comm_dtype=value)


def test_one_rank_is_unchanged():
    torch.manual_seed(0)
    model = Model()
    batch = _batches(1, seed=3)[0]
    sm = fxrec.shard(copy.deepcopy(model), Topology(1), batch, comm_dtype="bf16")
    with torch.no_grad():
        for g, w in zip(sm(*batch), model(*batch)):
            assert_close(g, w)
