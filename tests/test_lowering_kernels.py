"""Every fused-lookup kernel against explicit references, on fresh random inputs.

References are written here, independently of fxrec.lowering.torch_ref: pooling is a
Python loop over bags; the updates come from torch.optim.SGD, an explicit row-wise
Adagrad and one torch.optim.Adam per touched row, all driven by dense autograd grads.

Kernels under test come from FXREC_TEST_KERNELS (default "torch,fbgemm"). Triton runs
only in the Triton interpreter, which must be switched on before triton is imported,
so `test_triton_interpreter_suite` reruns this file in a child pytest with
TRITON_INTERPRET=1 and FXREC_TEST_KERNELS=triton; nothing leaks into this process.
Triton's backward tests run twice: the rows kernel (the default) and the one-row kernel.
"""
from __future__ import annotations

import os

import pytest
import torch

from fxrec.lowering import FusedEmbeddingBags, NoKernelError, TBELayout, select
from fxrec.lowering.sparse_update import init_state, sort_occurrences
from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad, decay_mode
from fxrec.types import TableInfo
from triton_child import assert_interpreter_child_passes

KERNELS_UNDER_TEST = os.environ.get("FXREC_TEST_KERNELS", "torch,fbgemm").split(",")
B = 4
DIMS30 = tuple([4, 8, 12, 16, 33, 3, 5, 20, 7, 9] * 3)

# id -> (dims, poolings, weight dtype, id dtype, per-sample weights)
POOLED = {
    "single": ((12,), ("sum",), torch.float32, torch.int64, False),
    "mixed_dims_weighted": ((4, 12, 33), ("sum",) * 3, torch.float32, torch.int32, True),
    "mean": ((4, 12, 33), ("mean",) * 3, torch.float32, torch.int64, False),
    "mean_weighted": ((4, 33), ("mean",) * 2, torch.float32, torch.int64, True),
    "sum_and_mean": ((4, 12), ("sum", "mean"), torch.float32, torch.int64, True),
    "fp16_weighted": ((4, 12, 33), ("sum",) * 3, torch.float16, torch.int64, True),
    "fp16_sum_and_mean_weighted": ((4, 12, 8), ("mean", "sum", "mean"), torch.float16, torch.int64, True),
    "bf16_mean": ((4, 12), ("mean",) * 2, torch.bfloat16, torch.int32, False),
    "tables30": (DIMS30, ("sum",) * 30, torch.float32, torch.int64, False),
}
UNPOOLED = {
    "equal_dims": ((8, 8), torch.float32, torch.int64),
    "mixed_dims_fp16": ((4, 12, 33), torch.float16, torch.int32),
    "single_bf16": ((12,), torch.bfloat16, torch.int64),
}
# What fbgemm-gpu-cpu 1.8.0 declines (fxrec/lowering/fbgemm.py says why).
FBGEMM_DECLINES = {"bf16_mean", "mixed_dims_fp16", "single_bf16", "adam"}
# its backward serves unpooled tables of mixed dims (each id a bag of one); its nobag forward does not
FBGEMM_SERVES = {"backward_update": {"mixed_dims_fp16"}}
OPTIMIZERS = {"sgd": SGD(lr=0.1), "rowwise_adagrad": RowWiseAdagrad(lr=0.1, eps=1e-8),
              "adagrad": Adagrad(lr=0.1, eps=1e-8),
              # weight decay (fxrec.optim.DECAY_MODES) on the touched rows
              "sgd_l2": SGD(lr=0.1, weight_decay=0.3),
              "rowwise_adagrad_l2": RowWiseAdagrad(lr=0.1, eps=1e-8, weight_decay=0.3),
              "rowwise_adagrad_decoupled": RowWiseAdagrad(lr=0.1, eps=1e-8, weight_decay=0.3,
                                                          weight_decay_mode="decoupled"),
              "adam_l2": Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3),
              "adam": Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6)}
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def kernels(*cases):
    return [pytest.param(k, c, id=f"{k}-{c}") for k in KERNELS_UNDER_TEST for c in cases]


# Triton's backward has two update kernels: "rows" (several unique rows per program, the
# default) and "one_row" (one unique row per program, config rows=0). Other kernels: None.
BWD_KERNELS = [(k, v) for k in KERNELS_UNDER_TEST for v in (("rows", "one_row") if k == "triton" else (None,))]


def bwd_kernels(*cases):
    return [pytest.param(k, v, *cases_, id="-".join(filter(None, (k, v) + cases_)))
            for k, v in BWD_KERNELS for cases_ in ([(c,) for c in cases] or [()])]


class LaunchCounter:
    """Stands in for a Triton kernel: counts launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def use_triton_backward(variant, monkeypatch) -> dict:
    """Route Triton's backward to `variant`'s update kernel, also where it is called without a
    config: the registry holds `ops.backward_update` itself, so its default config is patched.
    Returns both update kernels' launch counters, by variant."""
    from fxrec.lowering.triton import kernels as K
    from fxrec.lowering.triton import ops
    if variant == "one_row":
        monkeypatch.setitem(ops.backward_update.__kwdefaults__, "config", {"rows": 0})
    counters = {}
    for v, name in (("rows", "backward_update_rows_kernel"), ("one_row", "backward_update_kernel")):
        counters[v] = LaunchCounter(getattr(K, name))
        monkeypatch.setattr(K, name, counters[v])
    return counters


def assert_launched_only(counters, variant):
    launches = {v: c.launches for v, c in counters.items()}
    assert launches[variant] > 0 and sum(launches.values()) == launches[variant], launches


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- inputs & references
def make_tables(dims, poolings, gen, rows_hi=50):
    rows = [int(torch.randint(3, rows_hi, (1,), generator=gen)) for _ in dims]
    return [TableInfo(f"t{i}", r, d, pooling=p) for i, (r, d, p) in enumerate(zip(rows, dims, poolings))]


def make_batch(tables, idtype, weighted, gen, dup_range=None, min_ids=2):
    """Table-major ids/offsets with an empty bag per table and a duplicate id per table; each
    table's second bag has at least `min_ids` ids."""
    T = len(tables)
    lengths = torch.randint(0, 5, (T * B,), generator=gen)
    lengths[::B] = 0
    lengths[1::B] = torch.maximum(lengths[1::B], torch.tensor(min_ids))
    ids = []
    for t, tab in enumerate(tables):
        n = int(lengths[t * B:(t + 1) * B].sum())
        x = torch.randint(0, dup_range or tab.num_embeddings, (n,), generator=gen)
        x[1] = x[0]
        ids.append(x)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.cat(ids).to(idtype)
    psw = torch.rand(indices.numel(), generator=gen) + 0.5 if weighted else None
    return indices, offsets, psw


def ref_lookup(tables, weights, indices, offsets, psw):
    """Differentiable Python-loop lookup. pooled: B x sum(dims); unpooled: flat."""
    outs = []
    for t, (tab, w) in enumerate(zip(tables, weights)):
        if tab.pooling == "none":
            s, e = int(offsets[t * B]), int(offsets[(t + 1) * B])
            outs.append(w[indices[s:e].long()].reshape(-1))
            continue
        cols = []
        for b in range(B):
            s, e = int(offsets[t * B + b]), int(offsets[t * B + b + 1])
            rows = w[indices[s:e].long()]
            if psw is not None:
                rows = rows * psw[s:e, None]
            v = rows.sum(0)
            cols.append(v / (e - s) if tab.pooling == "mean" and e > s else v)
        outs.append(torch.stack(cols))
    return torch.cat(outs, dim=1 if tables[0].pooling != "none" else 0)


class RefTrainer:
    """fp32 tables updated by torch.optim / explicit formulas on dense autograd grads,
    rounded to the kernel's weight dtype after each step as the kernels round."""

    def __init__(self, tables, weights, optimizer, dtype):
        self.tables, self.opt, self.dtype = tables, optimizer, dtype
        self.w = [w.float().clone() for w in weights]
        self.momentum = [torch.zeros(t.num_embeddings) for t in tables]
        self.sums = [torch.zeros(t.num_embeddings, t.embedding_dim) for t in tables]  # Adagrad's
        self.adam = {}  # (table, row) -> (param, torch.optim.Adam)

    def step(self, indices, offsets, psw, grad_out):
        params = [torch.nn.Parameter(w) for w in self.w]
        (ref_lookup(self.tables, params, indices, offsets, psw) * grad_out.float()).sum().backward()
        for t, p in enumerate(params):
            s, e = int(offsets[t * B]), int(offsets[(t + 1) * B])
            self._update(t, p, indices[s:e].long().unique())
        self.w = [p.detach().to(self.dtype).float() for p in params]

    def _update(self, t, p, touched):
        mode = decay_mode(self.opt)
        if isinstance(self.opt, SGD) and not mode:
            torch.optim.SGD([p], lr=self.opt.lr).step()  # untouched rows have zero grad
            return
        with torch.no_grad():
            for r in touched.tolist():
                g, w0 = p.grad[r], p[r].clone()
                if mode == 1:  # L2: the optimizer reads the decayed gradient
                    g = g + self.opt.weight_decay * w0
                if isinstance(self.opt, SGD):
                    p[r] -= self.opt.lr * g
                elif isinstance(self.opt, RowWiseAdagrad):
                    self.momentum[t][r] += (g * g).mean()
                    p[r] -= self.opt.lr * g / (self.momentum[t][r].sqrt() + self.opt.eps)
                elif isinstance(self.opt, Adagrad):  # torch.optim.Adagrad's step, on the row
                    self.sums[t][r] += g * g
                    p[r] -= self.opt.lr * g / (self.sums[t][r].sqrt() + self.opt.eps)
                else:
                    self._adam_row(t, r, p, g)
                if mode == 2:  # decoupled: the row shrinks beside the step
                    p[r] -= self.opt.lr * self.opt.weight_decay * w0

    def _adam_row(self, t, r, p, g):
        if (t, r) not in self.adam:
            row = torch.nn.Parameter(p[r].clone())
            self.adam[(t, r)] = (row, torch.optim.Adam([row], lr=self.opt.lr, betas=self.opt.betas,
                                                       eps=self.opt.eps))
        row, opt = self.adam[(t, r)]
        with torch.no_grad():
            row.copy_(p[r])
        row.grad = g.clone()
        opt.step()
        p[r] = row.detach()


def flat_weights(tables, dtype, gen):
    return [(torch.rand(t.num_embeddings, t.embedding_dim, generator=gen) - 0.5).to(dtype) for t in tables]


def pack(tables, weights):
    layout = TBELayout(tables)
    return layout, torch.cat([w.reshape(-1) for w in weights])


def problem(layout, wdtype, idtype, weighted=False, optimizer=None):
    """A Problem's fields; `optimizer` a fxrec.optim config (or None)."""
    return dict(device="cpu", weight_dtype=wdtype, index_dtype=idtype, dims=layout.dims,
                poolings=layout.poolings, optimizer=None if optimizer is None else optimizer.name,
                weight_decay=decay_mode(optimizer), weighted=weighted)


# optimizers fbgemm's CPU backward declines: Adam, and weight decay (1.8.0 leaves it unapplied)
FBGEMM_DECLINED_OPTIMIZERS = {"adam", "adam_l2", "sgd_l2", "rowwise_adagrad_l2", "rowwise_adagrad_decoupled"}


def forced(op, kernel, case, prob):
    """The impl `kernel` for op, or None after checking it declines a documented case."""
    if kernel == "fbgemm" and case in FBGEMM_DECLINES - FBGEMM_SERVES.get(op, set()):
        with pytest.raises(NoKernelError, match="kernel 'fbgemm' cannot serve"):
            select(op, kernel=kernel, **prob)
        return None
    name, impl = select(op, kernel=kernel, **prob)
    assert name == kernel
    return impl


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("kernel,case", kernels(*POOLED))
def test_pooled_forward(kernel, case, gen):
    dims, poolings, wdtype, idtype, weighted = POOLED[case]
    tables = make_tables(dims, poolings, gen)
    weights = flat_weights(tables, wdtype, gen)
    layout, flat = pack(tables, weights)
    indices, offsets, psw = make_batch(tables, idtype, weighted, gen)
    impl = forced("pooled_forward", kernel, case, problem(layout, wdtype, idtype, weighted))
    if impl is None:
        return
    out = impl(flat, layout, indices, offsets, psw)
    expected = ref_lookup(tables, [w.double() for w in weights], indices, offsets,
                          None if psw is None else psw.double())
    assert out.shape == (B, sum(dims)) and out.dtype == wdtype
    torch.testing.assert_close(out.double(), expected.to(wdtype).double(), **TOL[wdtype])


@pytest.mark.parametrize("kernel,case", kernels(*UNPOOLED))
def test_unpooled_forward(kernel, case, gen):
    dims, wdtype, idtype = UNPOOLED[case]
    tables = make_tables(dims, ("none",) * len(dims), gen)
    weights = flat_weights(tables, wdtype, gen)
    layout, flat = pack(tables, weights)
    indices, offsets, _ = make_batch(tables, idtype, False, gen)
    impl = forced("unpooled_forward", kernel, case, problem(layout, wdtype, idtype))
    if impl is None:
        return
    out = impl(flat, layout, indices, offsets)
    torch.testing.assert_close(out, ref_lookup(tables, weights, indices, offsets, None), rtol=0, atol=0)
    for view, tab, t in zip(layout.split_unpooled(out, offsets), tables, range(len(tables))):
        s, e = int(offsets[t * B]), int(offsets[(t + 1) * B])
        assert view.shape == (e - s, tab.embedding_dim)


# ---------------------------------------------------------------- backward + update
BACKWARD = {  # id -> (dims, poolings, weight dtype, id dtype, per-sample weights)
    "mixed_dims_weighted": POOLED["mixed_dims_weighted"],
    "mean": POOLED["mean"],
    "mean_weighted": POOLED["mean_weighted"],
    "sum_and_mean": POOLED["sum_and_mean"],
    "fp16_weighted": POOLED["fp16_weighted"],
    "fp16_sum_and_mean_weighted": POOLED["fp16_sum_and_mean_weighted"],
    "bf16_mean": POOLED["bf16_mean"],
    "tables30": POOLED["tables30"],
    "equal_dims": ((8, 8), ("none", "none"), torch.float32, torch.int64, False),
    "mixed_dims_fp16": ((4, 12, 33), ("none",) * 3, torch.float16, torch.int32, False),
}


DECAYING = ("sgd_l2", "rowwise_adagrad_l2", "rowwise_adagrad_decoupled", "adam_l2")
PLAIN = [o for o in OPTIMIZERS if o not in DECAYING]
# weight decay changes only each row's update, so a few cases carry it (the suite's time)
DECAY_CASES = ("mixed_dims_weighted", "fp16_sum_and_mean_weighted", "equal_dims")
BACKWARD_JOBS = [pytest.param(*p.values, o, id=f"{p.id}-{o}")
                 for opts, cases in ((PLAIN, BACKWARD), (DECAYING, DECAY_CASES))
                 for o in opts for p in bwd_kernels(*cases)]


@pytest.mark.parametrize("kernel,variant,case,opt", BACKWARD_JOBS)
def test_backward_update(kernel, variant, case, opt, gen, monkeypatch):
    counters = use_triton_backward(variant, monkeypatch) if kernel == "triton" else None
    dims, poolings, wdtype, idtype, weighted = BACKWARD[case]
    optimizer = OPTIMIZERS[opt]
    tables = make_tables(dims, poolings, gen, rows_hi=12)  # few rows: rows recur across steps
    weights = flat_weights(tables, wdtype, gen)
    layout, flat = pack(tables, weights)
    prob = problem(layout, wdtype, idtype, weighted, optimizer)
    impl = forced("backward_update", kernel, "adam" if opt in FBGEMM_DECLINED_OPTIMIZERS else case, prob)
    if impl is None:
        return
    state = init_state(optimizer, layout)
    ref = RefTrainer(tables, weights, optimizer, wdtype)
    for _ in range(2):  # the second step sees non-zero state and per-row step counts
        indices, offsets, psw = make_batch(tables, idtype, weighted, gen)
        n_out = B * layout.total_D if layout.pooled else int(layout.unpooled_offsets(offsets)[-1])
        grad = torch.randn(n_out, generator=gen).to(wdtype)
        grad = grad.view(B, -1) if layout.pooled else grad
        impl(flat, state, layout, optimizer, grad, indices, offsets, psw)
        ref.step(indices, offsets, psw, grad.view(B, -1) if layout.pooled else grad)
    tol = dict(TOL[wdtype])
    if opt.startswith("adam") and wdtype == torch.float32:
        # Adam steps by m / (sqrt(v) + eps): where a row's summed gradient is near eps (1e-6),
        # a reduction in another order moves the step by ~1e-4 of lr (seen: 1.6e-5 at lr 0.05)
        tol["atol"] = 5e-5
    for t, (got, want) in enumerate(zip(layout.split(flat), ref.w)):
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m: f"table {t}: {m}")
    if opt.startswith("rowwise_adagrad"):
        # fp16/bf16 tables: the kernel's squared gradients come from low-precision rows and
        # outputs, ~1e-3 relative apart from the fp32 reference's (seen: 4.6e-4, seed 1255740668)
        rtol = 1e-4 if wdtype == torch.float32 else TOL[wdtype]["rtol"]
        torch.testing.assert_close(state["momentum"], torch.cat(ref.momentum), rtol=rtol, atol=1e-3)
    if counters:
        assert_launched_only(counters, variant)


def hot_batch(tables, gen, mix: str):
    """A batch with rows of more than 3 occurrences. "all_hot": 7+ ids on 2 rows per table, so
    a row occurs at least 4 times; "hot_and_cold": ids over the whole table (rows rarely
    recur), but the first 7 ids of each table's second bag are one row."""
    if mix == "all_hot":
        return make_batch(tables, torch.int64, True, gen, dup_range=2, min_ids=7)
    indices, offsets, psw = make_batch(tables, torch.int64, True, gen, min_ids=7)
    for t in range(len(tables)):
        s = int(offsets[t * B + 1])
        indices[s:s + 7] = 0
    return indices, offsets, psw


@pytest.mark.parametrize("mix", ["all_hot", "hot_and_cold"])
@pytest.mark.parametrize("opt", PLAIN)
@pytest.mark.parametrize("kernel,variant", bwd_kernels())
def test_backward_update_hot_rows(kernel, variant, opt, mix, gen, monkeypatch):
    """Rows with many occurrences (Zipf-like ids): Triton first sums a hot row's occurrences in
    chunks (here of 3, so that small shapes reach it), then reduces the chunks. The rows kernel
    chunks only the hot rows and updates the cold ones from their occurrences (two launches)."""
    if kernel == "triton":
        from fxrec.lowering.triton import ops
        counters = use_triton_backward(variant, monkeypatch)
        chunk = {"rows": "_BWD_ROWS_CHUNK", "one_row": "_BWD_CHUNK"}[variant]
        monkeypatch.setattr(ops, chunk, 3)
    dims, poolings = (4, 12, 33), ("sum",) * 3
    tables = make_tables(dims, poolings, gen)
    weights = flat_weights(tables, torch.float32, gen)
    layout, flat = pack(tables, weights)
    optimizer = OPTIMIZERS[opt]
    impl = forced("backward_update", kernel, "adam" if opt in FBGEMM_DECLINED_OPTIMIZERS else "hot",
                  problem(layout, torch.float32, torch.int64, True, optimizer))
    if impl is None:
        return
    state = init_state(optimizer, layout)
    ref = RefTrainer(tables, weights, optimizer, torch.float32)
    for _ in range(2):
        indices, offsets, psw = hot_batch(tables, gen, mix)
        seg = sort_occurrences(layout, indices, offsets, psw).seg
        counts = seg[1:] - seg[:-1]
        assert bool((counts > 3).any())  # the batch does reach the chunked path
        if mix == "hot_and_cold":
            assert bool((counts <= 3).any())
        grad = torch.randn(B, layout.total_D, generator=gen)
        impl(flat, state, layout, optimizer, grad, indices, offsets, psw)
        ref.step(indices, offsets, psw, grad)
    for t, (got, want) in enumerate(zip(layout.split(flat), ref.w)):
        torch.testing.assert_close(got, want, msg=lambda m: f"table {t}: {m}")
    if opt.startswith("rowwise_adagrad"):
        torch.testing.assert_close(state["momentum"], torch.cat(ref.momentum), rtol=1e-4, atol=1e-3)
    if kernel == "triton":
        assert_launched_only(counters, variant)
        if variant == "rows" and mix == "hot_and_cold":  # per step: the cold rows, then the hot rows' chunks
            assert counters["rows"].launches == 4


@pytest.mark.parametrize("kernel,variant", bwd_kernels())
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
def test_deterministic_update_is_bit_identical(kernel, variant, opt, gen, monkeypatch):
    counters = use_triton_backward(variant, monkeypatch) if kernel == "triton" else None
    tables = make_tables((4, 12, 33), ("sum",) * 3, gen)
    indices, offsets, psw = make_batch(tables, torch.int64, True, gen, dup_range=3)
    grad = torch.randn(B, 49, generator=gen)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        m = FusedEmbeddingBags(tables, optimizer=OPTIMIZERS[opt], kernel=kernel, deterministic=True)
        (m(indices, offsets, psw) * grad).sum().backward()
        results.append((m.weights.clone(), [v.clone() for v in m.optimizer_state().values()]))
        assert m.kernels == {"pooled_forward": kernel, "backward_update": kernel}
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    if counters:
        assert_launched_only(counters, variant)


@pytest.mark.skipif("fbgemm" not in KERNELS_UNDER_TEST, reason="fbgemm not under test")
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("case", ["mixed_dims_weighted", "mean", "tables30", "unpooled"])
def test_fbgemm_update_on_several_threads_is_the_same_bits(case, opt, gen, monkeypatch):
    """fbgemm's update, called on runs of tables from several threads at once, equals one call."""
    from fxrec.lowering import fbgemm as fb
    runs: list[int] = []  # how many runs of tables each update was cut into
    in_parallel = fb._in_parallel
    monkeypatch.setattr(fb, "_in_parallel", lambda calls: (runs.append(len(calls)), in_parallel(calls)))
    if case == "unpooled":
        dims, poolings, dtype, idx, weighted = (8, 8, 8), ("none",) * 3, torch.float32, torch.int64, False
    else:
        dims, poolings, dtype, idx, weighted = POOLED[case]
    tables = make_tables(dims, poolings, gen)
    indices, offsets, psw = make_batch(tables, idx, weighted, gen, dup_range=3)
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            m = FusedEmbeddingBags(tables, optimizer=OPTIMIZERS[opt], kernel="fbgemm")
            for step in range(2):
                out = m(indices, offsets, psw)
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(step)))
            assert m.kernels["backward_update"] == "fbgemm"
            assert runs[-2:] == [min(threads, len(dims))] * 2  # one run per thread, at most one per table
            results.append([m.weights.clone()] + list(m.optimizer_state().values()))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.skipif("fbgemm" not in KERNELS_UNDER_TEST, reason="fbgemm not under test")
def test_fbgemm_update_runs_cut_the_ids_evenly():
    from fxrec.lowering.fbgemm import _table_runs
    layout = TBELayout([TableInfo(f"t{i}", 10, 4) for i in range(6)])
    lengths = torch.tensor([10, 1, 1, 1, 1, 3])  # ids per table, B = 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    assert _table_runs(layout, offsets, 1) == [(0, 6)]
    assert _table_runs(layout, offsets, 2) == [(0, 1), (1, 6)]
    assert _table_runs(layout, offsets, 6) == [(t, t + 1) for t in range(6)]
    assert _table_runs(layout, offsets[:1].repeat(7), 3) == [(0, 2), (2, 4), (4, 6)]  # no ids: even cuts


# ---------------------------------------------------------------- the module
@pytest.mark.parametrize("kernel", KERNELS_UNDER_TEST)
def test_module_training_step_matches_reference(kernel, gen):
    tables = make_tables((4, 12, 33), ("sum",) * 3, gen)
    m = FusedEmbeddingBags(tables, optimizer=RowWiseAdagrad(lr=0.1), kernel=kernel)
    assert m.kernel == kernel and m.kernels["backward_update"] == kernel
    weights = flat_weights(tables, torch.float32, gen)
    m.load_tables({t.name: w for t, w in zip(tables, weights)})
    indices, offsets, psw = make_batch(tables, torch.int64, True, gen)
    psw.requires_grad_()
    grad = torch.randn(B, 49, generator=gen)
    out = m(indices, offsets, psw)
    (out * grad).sum().backward()
    ref_psw = psw.detach().clone().requires_grad_()
    ref_params = [w.clone().requires_grad_() for w in weights]
    (ref_lookup(tables, ref_params, indices, offsets, ref_psw) * grad).sum().backward()
    torch.testing.assert_close(psw.grad, ref_psw.grad)
    ref = RefTrainer(tables, weights, m.optimizer, torch.float32)
    ref.step(indices, offsets, psw.detach(), grad)
    for got, want in zip(m.table_weights().values(), ref.w):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", KERNELS_UNDER_TEST)
def test_module_unpooled_adam(kernel, gen):
    tables = make_tables((8, 8), ("none", "none"), gen)
    opt = Adam(lr=0.01)
    if kernel == "fbgemm":
        with pytest.raises(NoKernelError, match="optimizer 'adam' unsupported"):
            FusedEmbeddingBags(tables, optimizer=opt, kernel=kernel)
        return
    m = FusedEmbeddingBags(tables, optimizer=opt, kernel=kernel)
    ref = RefTrainer(tables, [w.clone() for w in m.split_weights()], opt, torch.float32)
    for _ in range(2):
        indices, offsets, _ = make_batch(tables, torch.int64, False, gen)
        out = m(indices, offsets)
        grad = torch.randn(out.shape, generator=gen)
        (out * grad).sum().backward()
        ref.step(indices, offsets, None, grad)
    assert m.kernel == kernel
    for got, want in zip(m.split_weights(), ref.w):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- Triton
only_in_triton_child = pytest.mark.skipif("triton" not in KERNELS_UNDER_TEST,
                                          reason="runs in the interpreter child only")


@only_in_triton_child
def test_triton_is_not_picked_on_cpu_unless_requested():
    prob = dict(device="cpu", dims=(4,), poolings=("sum",))
    assert select("pooled_forward", **prob)[0] != "triton"
    assert select("pooled_forward", kernel="triton", **prob)[0] == "triton"


FWD_CONFIGS = {  # id -> (op, config, pooling)
    "pooled_block_n32": ("pooled_forward", {"block_n": 32, "num_warps": 2}, "sum"),
    "unpooled_block_n32": ("unpooled_forward", {"block_n": 32, "num_warps": 2}, "none"),
    # several bags per program: B=4 bags per table, so programs span two tables, and the last
    # program of bags=8 is part empty (3 tables x 4 bags)
    "pooled_bags2_mean": ("pooled_forward", {"bags": 2, "block_n": 4}, "mean"),
    "pooled_bags8": ("pooled_forward", {"bags": 8, "block_n": 8, "num_warps": 4}, "sum"),
    "pooled_bags4_mean": ("pooled_forward", {"bags": 4, "block_n": 2}, "mean"),
}


@only_in_triton_child
@pytest.mark.parametrize("case", list(FWD_CONFIGS))
def test_triton_forward_config(case, gen):
    """A launch config other than the heuristic's (benchmarks sweep these) computes the same;
    the multi-bag kernel, bit for bit what the one-bag kernel computes with the same block_n."""
    from fxrec.lowering.triton import ops
    op, config, pooling = FWD_CONFIGS[case]
    pooled = op == "pooled_forward"
    tables = make_tables((4, 12, 33), (pooling,) * 3, gen)
    weights = flat_weights(tables, torch.float32, gen)
    layout, flat = pack(tables, weights)
    indices, offsets, psw = make_batch(tables, torch.int64, pooled, gen)
    out = (ops.pooled_forward(flat, layout, indices, offsets, psw, config=config) if pooled
           else ops.unpooled_forward(flat, layout, indices, offsets, config=config))
    torch.testing.assert_close(out, ref_lookup(tables, weights, indices, offsets, psw))
    if "bags" in config:
        one = ops.pooled_forward(flat, layout, indices, offsets, psw, config={"block_n": config["block_n"]})
        assert torch.equal(out, one)


BAD_CONFIGS = {  # id -> (op, config, error)
    "pooled_unknown": ("pooled_forward", {"blockn": 16}, "pooled_forward: unknown config key 'blockn'"),
    "unpooled_rows": ("unpooled_forward", {"rows": 4}, "unpooled_forward: unknown config key 'rows'"),
    "backward_unknown": ("backward_update", {"warps": 4}, "backward_update: unknown config key 'warps'"),
    "block_n_not_pow2": ("pooled_forward", {"block_n": 12}, "config block_n=12 must be a power of two"),
    "rows_negative": ("backward_update", {"rows": -1}, r"config rows=-1 must be a power of two or 0"),
    "bags_not_pow2": ("pooled_forward", {"bags": 3}, "config bags=3 must be a power of two"),
    "unpooled_bags": ("unpooled_forward", {"bags": 2}, "unpooled_forward: unknown config key 'bags'"),
}


@only_in_triton_child
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_triton_config_rejects_bad_entries(case, gen):
    from fxrec.lowering.triton import ops
    op, config, error = BAD_CONFIGS[case]
    tables = make_tables((4, 12), ("none" if op == "unpooled_forward" else "sum",) * 2, gen)
    layout, flat = pack(tables, flat_weights(tables, torch.float32, gen))
    before = flat.clone()
    indices, offsets, _ = make_batch(tables, torch.int64, False, gen)
    with pytest.raises(ValueError, match=error):
        if op == "backward_update":
            ops.backward_update(flat, init_state(OPTIMIZERS["sgd"], layout), layout, OPTIMIZERS["sgd"],
                                torch.ones(B, layout.total_D), indices, offsets, config=config)
        else:
            getattr(ops, op)(flat, layout, indices, offsets, config=config)
    assert torch.equal(flat, before)  # rejected before any update


@only_in_triton_child
@pytest.mark.parametrize("ids,groups,block_n", [(0, 4, 8), (28, 4, 8), (36, 4, 16), (80, 4, 32), (10**6, 3, 32)])
def test_triton_unpooled_block_n_is_the_mean_per_table(ids, groups, block_n):
    """Mean ids per table rounded up to a power of two, within [8, 32]."""
    from fxrec.lowering.triton import ops
    assert ops._fwd_block_n(ids, groups) == block_n


@only_in_triton_child
@pytest.mark.parametrize("block_d,rows", [(4, 16), (16, 16), (32, 16), (64, 8), (128, 0), (256, 0), (8192, 0)])
def test_triton_backward_rows_per_program(block_d, rows):
    """About 512 elements per rows-kernel tile, at most 16 rows; from dim 128 the one-row
    kernel (0)."""
    from fxrec.lowering.triton import ops
    assert ops._bwd_rows(block_d) == rows


@only_in_triton_child
@pytest.mark.parametrize("rows,block_d,warps", [(8, 64, 4), (16, 32, 4), (16, 16, 2), (16, 4, 1), (4, 256, 8),
                                                (0, 128, 2), (0, 8192, 2)])
def test_triton_backward_rows_warps(rows, block_d, warps):
    """4 tile elements per thread, 1 to 8 warps; 2 for the one-row kernel (rows 0)."""
    from fxrec.lowering.triton import ops
    assert ops._bwd_warps(rows, block_d) == warps


def test_triton_interpreter_suite():
    """This file's tests for kernel "triton", in a child pytest under TRITON_INTERPRET=1."""
    if "triton" in KERNELS_UNDER_TEST:
        return  # we are the child
    # (fbgemm's own cases skip there)
    assert_interpreter_child_passes(__file__, "interpreter_suite or gpu or compile_for", allow_skips=True)


_BWD_SIG = {"weights_ptr": "*bf16", "momentum_ptr": "*fp32", "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32",
            "sum_ptr": "*fp32", "step_size_ptr": "*fp32", "bc2_sqrt_ptr": "*fp32", "w_offsets_ptr": "*i64",
            "d_offsets_ptr": "*i32",
            "hash_cumsum_ptr": "*i64", "uniq_table_ptr": "*i64", "uniq_row_ptr": "*i64", "seg_ptr": "*i64",
            "src_off_ptr": "*i64", "scale_ptr": "*fp32", "grad_ptr": "*bf16", "lr": "fp32", "eps": "fp32",
            "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "wd": "fp32",
            "OPT": "constexpr", "WD_MODE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
_BWD_ROWS_SIG = {"weights_ptr": "*bf16", "momentum_ptr": "*fp32", "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32",
                 "sum_ptr": "*fp32", "step_size_ptr": "*fp32", "bc2_sqrt_ptr": "*fp32", "w_offsets_ptr": "*i64",
                 "d_offsets_ptr": "*i32", "hash_cumsum_ptr": "*i64", "uniq_table_ptr": "*i64",
                 "uniq_row_ptr": "*i64", "sel_ptr": "*i64", "start_ptr": "*i64", "end_ptr": "*i64",
                 "src_off_ptr": "*i64", "scale_ptr": "*fp32", "grad_ptr": "*bf16", "lr": "fp32", "eps": "fp32",
                 "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "wd": "fp32", "H": "i32",
                 "OPT": "constexpr", "WD_MODE": "constexpr", "HAS_SEL": "constexpr", "ROWS": "constexpr",
                 "BLOCK_D": "constexpr"}
_POOLED_SIG = {"weights_ptr": "*fp16", "w_offsets_ptr": "*i64", "d_offsets_ptr": "*i32", "is_mean_ptr": "*i32",
               "indices_ptr": "*i32", "offsets_ptr": "*i32", "psw_ptr": "*fp32", "out_ptr": "*fp16", "B": "i32",
               "total_D": "i32", "rows_ptr": "*i64", "n": "i32", "err_ptr": "*i64", "HAS_PSW": "constexpr",
               "CHECK": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
_COMPILE_CASES = {  # case -> (kernel, signature, constexprs)
    **{f"pooled_forward_kernel{suffix}": ("pooled_forward_kernel", _POOLED_SIG,
                                          {"HAS_PSW": True, "CHECK": check, "BLOCK_N": n, "BLOCK_D": 128})
       for suffix, n, check in (("", 8, True), ("_unchecked", 8, False), ("_n32", 32, True))},
    **{f"pooled_forward_bags{bags}{'' if check else '_unchecked'}": (
        "pooled_forward_bags_kernel", {**_POOLED_SIG, "num_bags": "i32", "BAGS": "constexpr"},
        {"HAS_PSW": check, "CHECK": check, "BAGS": bags, "BLOCK_N": 8, "BLOCK_D": 64})
       for bags, check in ((4, True), (8, False), (2, True))},
    **{f"unpooled_forward_kernel{'' if check else '_unchecked'}": (
        "unpooled_forward_kernel",
        {"weights_ptr": "*bf16", "w_offsets_ptr": "*i64", "d_offsets_ptr": "*i32", "indices_ptr": "*i64",
         "offsets_ptr": "*i64", "out_offsets_ptr": "*i64", "out_ptr": "*bf16", "B": "i32", "rows_ptr": "*i64",
         "n": "i32", "err_ptr": "*i64", "CHECK": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        {"CHECK": check, "BLOCK_N": 8, "BLOCK_D": 64}) for check in (True, False)},
    **{f"backward_{opt}_wd{wd}": ("backward_update_kernel", _BWD_SIG,
                                  {"OPT": code, "WD_MODE": wd, "BLOCK_N": 8, "BLOCK_D": 64})
       for opt, code in (("sgd", 0), ("rowwise_adagrad", 1), ("adam", 2), ("adagrad", 3)) for wd in (0, 1, 2)},
    **{f"backward_rows_{opt}_r{rows}_d{block_d}{'_sel' if sel else ''}_wd{wd}": (
        "backward_update_rows_kernel", _BWD_ROWS_SIG,
        {"OPT": code, "WD_MODE": wd, "HAS_SEL": sel, "ROWS": rows, "BLOCK_D": block_d})
       for opt, code in (("sgd", 0), ("rowwise_adagrad", 1), ("adam", 2), ("adagrad", 3))
       for rows, block_d, sel, wd in ((8, 128, False, 0), (16, 64, True, 1), (4, 64, False, 2))},
    "segment_sum_kernel": ("segment_sum_kernel",
                           {"d_offsets_ptr": "*i32", "uniq_table_ptr": "*i64", "chunk_row_ptr": "*i64",
                            "chunk_first_ptr": "*i64", "chunk_last_ptr": "*i64", "src_off_ptr": "*i64",
                            "scale_ptr": "*fp32", "grad_ptr": "*fp16", "out_ptr": "*fp32",
                            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
                           {"BLOCK_N": 8, "BLOCK_D": 64}),
}


@pytest.mark.parametrize("case", list(_COMPILE_CASES))
def test_triton_kernels_compile_for_sm90(case):
    """The interpreter does not run the GPU compiler; compile ahead of time (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fxrec.lowering.triton import kernels as K
    kernel, sig, constexprs = _COMPILE_CASES[case]
    fn = getattr(K, kernel)
    compiled = triton.compile(ASTSource(fn=JITFunction(fn.fn), signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_gpu_triton_is_chosen_and_trains(opt, gen):
    tables = make_tables((4, 12, 33), ("sum",) * 3, gen)
    m = FusedEmbeddingBags(tables, optimizer=OPTIMIZERS[opt], device="cuda")
    assert m.kernels == {"pooled_forward": "triton", "backward_update": "triton"}
    weights = [w.cpu() for w in m.split_weights()]
    ref = RefTrainer(tables, weights, m.optimizer, torch.float32)
    indices, offsets, psw = make_batch(tables, torch.int64, True, gen)
    grad = torch.randn(B, 49, generator=gen)
    out = m(indices.cuda(), offsets.cuda(), psw.cuda())
    torch.testing.assert_close(out.cpu(), ref_lookup(tables, weights, indices, offsets, psw))
    (out * grad.cuda()).sum().backward()
    ref.step(indices, offsets, psw, grad)
    for got, want in zip(m.split_weights(), ref.w):
        torch.testing.assert_close(got.cpu(), want)


@pytest.mark.skipif("fbgemm" not in KERNELS_UNDER_TEST, reason="fbgemm not under test")
@pytest.mark.parametrize("batch", [0, 2])
def test_fbgemm_unpooled_update_without_ids_changes_nothing(batch):
    """Unpooled updates go through fbgemm's pooled backward, each id a bag of one: a batch
    with no ids at all (an empty local batch, or empty bags) leaves weights and state alone."""
    from fxrec.lowering import FusedEmbeddingBags
    from fxrec.optim import RowWiseAdagrad
    from fxrec.types import TableInfo

    fused = FusedEmbeddingBags([TableInfo(f"t{i}", 10, 4, pooling="none") for i in range(3)],
                               RowWiseAdagrad(0.1), kernel="fbgemm")
    before = fused.weights.clone()
    fused.update(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(3 * batch + 1, dtype=torch.long), None)
    assert torch.equal(fused.weights, before) and not fused.optimizer_state()["momentum"].any()
