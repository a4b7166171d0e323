"""The kernel registry, the TBE layout's input checks, the optimizer configs and the
FusedEmbeddingBags module's plumbing (numerics are in test_lowering_kernels.py)."""
from __future__ import annotations

import pytest
import torch

from fxrec.lowering import (FusedEmbeddingBags, NoKernelError, TBELayout, kernel_choices,
                            register_kernel, registered, select)
from fxrec.lowering import registry
from fxrec.lowering.fbgemm import AVAILABLE as FBGEMM
from fxrec.optim import SGD, Adagrad, Adam, PerTable, RowWiseAdagrad
from fxrec.types import TableInfo

CPU_FAST = "fbgemm" if FBGEMM else "torch"  # what a CPU problem gets when fbgemm serves it
TABLES = [TableInfo("user", 10, 4), TableInfo("item", 20, 12), TableInfo("ctx", 7, 33)]


def batch():
    # B=2, table-major; bag (item, 0) is empty and id 3 repeats in table "user"
    indices = torch.tensor([3, 3, 1, 19, 6, 0])
    offsets = torch.tensor([0, 2, 3, 3, 4, 5, 6])
    return indices, offsets


@pytest.fixture(autouse=True)
def _no_forced_kernel(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("opt,dtype,pooling,weighted,fwd,bwd", [
    (SGD(0.1), torch.float32, "sum", False, CPU_FAST, CPU_FAST),
    (RowWiseAdagrad(0.1), torch.float16, "mean", False, "torch", CPU_FAST),  # fbgemm's fp16 fwd is slow
    (Adam(0.1), torch.float32, "sum", True, CPU_FAST, "torch"),  # fbgemm has no CPU Adam
    (SGD(0.1), torch.bfloat16, "sum", False, "torch", "torch"),  # nor bf16
    (SGD(0.1), torch.float32, "mean", True, CPU_FAST, CPU_FAST),  # weighted mean: pooled by sum, scaled
])
@pytest.mark.usefixtures("one_thread")
def test_module_picks_the_expected_kernel(opt, dtype, pooling, weighted, fwd, bwd):
    tables = [TableInfo(t.name, t.num_embeddings, t.embedding_dim, pooling=pooling) for t in TABLES]
    m = FusedEmbeddingBags(tables, optimizer=opt, dtype=dtype)
    indices, offsets = batch()
    psw = torch.rand(indices.numel()) if weighted else None
    out = m(indices, offsets, psw)
    out.float().sum().backward()
    assert m.kernel == fwd
    assert m.kernels == {"pooled_forward": fwd, "backward_update": bwd}
    assert out.shape == (2, 49) and out.dtype == dtype


@pytest.mark.skipif(not FBGEMM, reason="fbgemm_gpu is not installed")
def test_pooled_forward_on_several_threads_goes_to_torch_and_the_update_stays_fbgemm():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m = FusedEmbeddingBags([TableInfo(t.name, t.num_embeddings, t.embedding_dim) for t in TABLES],
                               optimizer=SGD(0.1))
        indices, offsets = batch()
        m(indices, offsets).sum().backward()
        assert m.kernels == {"pooled_forward": "torch", "backward_update": "fbgemm"}
        prob = dict(device="cpu", dims=(4,), poolings=("sum",), threads=2)
        assert "runs on one thread" in dict(kernel_choices("pooled_forward", **prob))["fbgemm"]
        assert select("pooled_forward", kernel="fbgemm", **prob)[0] == "fbgemm"  # on request
        assert select("unpooled_forward", **dict(prob, poolings=("none",)))[0] == "fbgemm"
        torch.set_num_threads(1)  # the choice follows the thread count of each call
        m(indices, offsets)
        assert m.kernels["pooled_forward"] == "fbgemm"
    finally:
        torch.set_num_threads(before)


def test_triton_is_never_chosen_on_cpu_by_default():
    assert registered("pooled_forward")[-1] == "torch"
    prob = dict(device="cpu", dims=(4,), poolings=("sum",))  # one thread: Problem's default
    assert select("pooled_forward", **prob)[0] == CPU_FAST
    choices = dict(kernel_choices("pooled_forward", **prob))
    assert choices["torch"] is None
    if "triton" in choices:
        assert "TRITON_INTERPRET" in choices["triton"]


def test_env_var_forces_a_kernel(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    m = FusedEmbeddingBags(TABLES, optimizer=SGD(0.1))
    m(*batch()).sum().backward()
    assert m.kernels == {"pooled_forward": "torch", "backward_update": "torch"}
    # the argument wins over the environment
    assert select("pooled_forward", kernel=CPU_FAST, dims=(4,), poolings=("sum",))[0] == CPU_FAST


def test_forcing_a_kernel_that_cannot_serve_says_why(monkeypatch):
    with pytest.raises(NoKernelError, match="kernel 'triton' (cannot serve|is unavailable)"):
        FusedEmbeddingBags(TABLES, optimizer=SGD(0.1), kernel="triton")
    monkeypatch.setenv(registry.ENV_VAR, "cuda_magic")
    with pytest.raises(NoKernelError, match="FXREC_KERNEL='cuda_magic' is not a kernel"):
        select("pooled_forward", dims=(4,), poolings=("sum",))


@pytest.mark.skipif(not FBGEMM, reason="fbgemm_gpu not importable")
def test_forced_fbgemm_names_the_unsupported_optimizer():
    with pytest.raises(NoKernelError, match="kernel 'fbgemm' cannot serve backward_update: optimizer 'adam'"):
        FusedEmbeddingBags(TABLES, optimizer=Adam(0.1), kernel="fbgemm")


def test_registered_kernel_priority_and_checker(monkeypatch):
    registered("pooled_forward")  # load the backends into the real registry before copying it
    fp16 = dict(weight_dtype=torch.float16, dims=(4,), poolings=("sum",))
    fp16_choice = select("pooled_forward", **fp16)[0]
    monkeypatch.setattr(registry, "_REGISTRY", {op: list(v) for op, v in registry._REGISTRY.items()})
    calls = []

    def mine(*args):
        calls.append(args)

    register_kernel("pooled_forward", "mine", mine,
                    lambda p: None if p.weight_dtype == torch.float32 else "fp32 only", priority=-1)
    assert select("pooled_forward", dims=(4,), poolings=("sum",)) == ("mine", mine)
    assert select("pooled_forward", **fp16)[0] == fp16_choice != "mine"
    assert select("pooled_forward", kernel="mine", dims=(4,), poolings=("sum",))[0] == "mine"
    with pytest.raises(NoKernelError, match="kernel 'mine' cannot serve pooled_forward: fp32 only"):
        select("pooled_forward", kernel="mine", **fp16)
    assert ("mine", "fp32 only") in kernel_choices("pooled_forward", weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown op 'pooled_backward'"):
        register_kernel("pooled_backward", "mine", mine, lambda p: None)
    with pytest.raises(TypeError):
        select("pooled_forward", colour="red")


# ---------------------------------------------------------------- input checks
@pytest.mark.parametrize("indices,offsets,match", [
    ([3, 3, 1, 19, 6, 7], [0, 2, 3, 3, 4, 5, 6], r"table 'ctx': id 7 out of range \[0, 7\)"),
    ([3, 3, 1, -2, 6, 0], [0, 2, 3, 3, 4, 5, 6], r"table 'item': id -2 out of range \[0, 20\)"),
    ([3, 3, 1, 19, 6, 0], [0, 2, 3, 3, 4, 5, 7], r"end at len\(indices\)=6; got first=0, last=7"),
    ([3, 3, 1, 19, 6, 0], [0, 2, 3, 1, 4, 5, 6], r"never decrease.*1 decreasing step"),
    ([3, 3, 1, 19, 6, 0], [0, 2, 3, 3, 4, 6], r"T\*B\+1 entries for T=3 tables, got shape \(6,\)"),
])
def test_bad_batches_are_rejected_naming_table_and_value(indices, offsets, match):
    m = FusedEmbeddingBags(TABLES, optimizer=SGD(0.1))
    with pytest.raises(ValueError, match=match):
        m(torch.tensor(indices), torch.tensor(offsets))


# Runs of equal-row tables share one min/max on the CPU (TBELayout.equal_row_runs): an id
# valid for the run's other tables but not for its own, and runs that are empty, must
# still be caught and named, and ids at each table's last row must pass.
RUN_TABLES = [TableInfo(n, r, 4) for n, r in (("a", 10), ("b", 10), ("c", 5), ("d", 10), ("e", 10))]


@pytest.mark.parametrize("indices,offsets,match", [
    ([9, 9, 4, 9, 9], [0, 1, 2, 3, 4, 5], None),  # every table's last row
    ([9, 9, 5, 9, 9], [0, 1, 2, 3, 4, 5], r"table 'c': id 5 out of range \[0, 5\)"),
    ([9, 9, 4, 9, 10], [0, 1, 2, 3, 4, 5], r"table 'e': id 10 out of range \[0, 10\)"),
    ([4, 10], [0, 0, 0, 1, 1, 2], r"table 'e': id 10 out of range"),  # runs (a,b) and d empty
    ([-1, 0], [0, 0, 0, 0, 1, 2], r"table 'd': id -1 out of range"),
    ([3], [0, 0, 0, 1, 1, 1], None),
])
def test_bounds_check_over_equal_row_runs(indices, offsets, match):
    m = FusedEmbeddingBags(RUN_TABLES, optimizer=SGD(0.1))
    assert m.layout.equal_row_runs == ((0, 2), (2, 3), (3, 5))
    args = torch.tensor(indices), torch.tensor(offsets)
    if match is None:
        assert m(*args).shape == (1, 20)
    else:
        with pytest.raises(ValueError, match=match):
            m(*args)


def test_bad_inputs_types():
    m = FusedEmbeddingBags(TABLES)
    indices, offsets = batch()
    with pytest.raises(ValueError, match="indices must be a 1-D int32/int64 tensor, got torch.float32"):
        m(indices.float(), offsets)
    with pytest.raises(ValueError, match=r"per_sample_weights must be float with the shape of indices \(6,\)"):
        m(indices, offsets, torch.ones(5))
    with pytest.raises(ValueError, match="indices are on meta, the tables on cpu"):
        m(indices.to("meta"), offsets)


def test_empty_batches():
    m = FusedEmbeddingBags(TABLES, optimizer=RowWiseAdagrad(0.1))
    before = m.weights.clone()
    out = m(torch.empty(0, dtype=torch.int32), torch.zeros(3 * 2 + 1, dtype=torch.int32))
    assert out.shape == (2, 49) and not out.detach().any()
    out.sum().backward()
    assert torch.equal(m.weights, before)
    assert m(torch.empty(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)).shape == (0, 49)


# ---------------------------------------------------------------- layout & module plumbing
def test_layout_matches_fbgemm_tensors():
    layout = TBELayout(TABLES)
    assert layout.weights_offsets.tolist() == [0, 40, 280]
    assert layout.D_offsets.tolist() == [0, 4, 16, 49] and layout.D_offsets.dtype == torch.int32
    assert layout.hash_size_cumsum.tolist() == [0, 10, 30, 37]
    assert (layout.numel, layout.total_D, layout.max_D, layout.total_rows) == (511, 49, 33, 37)


def test_layout_rejects_mixed_pooled_and_unpooled():
    with pytest.raises(ValueError, match="table 'seq': pooled and unpooled tables cannot share"):
        TBELayout([TableInfo("user", 10, 4), TableInfo("seq", 5, 4, pooling="none")])


def test_module_rejects_mixed_dtypes_and_bad_optimizer():
    with pytest.raises(ValueError, match="table 'b': dtype torch.float16 differs"):
        FusedEmbeddingBags([TableInfo("a", 4, 4), TableInfo("b", 4, 4, dtype=torch.float16)])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FusedEmbeddingBags(TABLES, optimizer=torch.optim.SGD)
    m = FusedEmbeddingBags(TABLES, optimizer=SGD(0.1))
    m.optimizer = SGD(0.5)  # a new learning rate
    assert m.optimizer.lr == 0.5
    with pytest.raises(ValueError, match="optimizer must stay a SGD"):
        m.optimizer = Adam(0.1)


def test_load_and_export_per_table_weights():
    m = FusedEmbeddingBags(TABLES, optimizer=Adam(0.1))
    new = {t.name: torch.randn(t.num_embeddings, t.embedding_dim) for t in TABLES}
    m.load_tables(new)
    for name, w in m.table_weights().items():
        assert torch.equal(w, new[name])
    views = m.split_weights()
    views[1][3].fill_(7.0)  # views write through to the flat buffer
    assert torch.equal(m.weights[40 + 3 * 12:40 + 4 * 12], torch.full((12,), 7.0))
    state = m.table_state()["item"]
    assert state["exp_avg"].shape == (20, 12) and state["step"].shape == (20,)
    with pytest.raises(ValueError, match=r"table 'item': expected weight \(20, 12\), got \(12, 20\)"):
        m.load_tables([new["user"], new["item"].t(), new["ctx"]])
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['nope'\]"):
        m.load_tables({**new, "nope": torch.zeros(1)})


def test_uninitialised_module_loads_table_by_table():
    """initialize=False draws nothing (the global RNG is untouched); load_table fills one table."""
    before = torch.random.get_rng_state()
    m = FusedEmbeddingBags(TABLES, optimizer=RowWiseAdagrad(0.1), initialize=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    new = {t.name: torch.randn(t.num_embeddings, t.embedding_dim) for t in TABLES}
    for name, w in new.items():
        m.load_table(name, w)
    assert all(torch.equal(w, new[name]) for name, w in m.table_weights().items())
    with pytest.raises(ValueError, match=r"unknown table 'nope'; tables are \['user', 'item', 'ctx'\]"):
        m.load_table("nope", torch.zeros(1))
    with pytest.raises(ValueError, match=r"table 'ctx': expected weight \(7, 33\), got \(33, 7\)"):
        m.load_table("ctx", torch.zeros(33, 7))


def test_with_kernel_copies_tables_and_state_and_draws_nothing():
    from fxrec.runtime.fused_group import with_kernel
    m = FusedEmbeddingBags(TABLES, optimizer=RowWiseAdagrad(0.1))
    (m(*batch()) * torch.randn(2, 49)).sum().backward()  # momentum is no longer zero
    before = torch.random.get_rng_state()
    new = with_kernel(m, "torch")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert new.kernels == {"pooled_forward": "torch", "backward_update": "torch"}
    assert torch.equal(new.weights, m.weights)
    assert torch.equal(new.optimizer_state()["momentum"], m.optimizer_state()["momentum"])
    assert bool(m.optimizer_state()["momentum"].any())


def test_local_lookup_holds_one_shard_of_initial_values_at_a_time():
    """LocalLookup asks for each shard's values while filling it: the previous shard's are
    released before the next is drawn (no second copy of a rank's tables while sharding)."""
    import weakref

    from fxrec.runtime.dist_lookup import LocalShard
    from fxrec.runtime.local_lookup import LocalLookup
    shards = [LocalShard(f"s{i}", f"t{i}", (0, 50), (0, 8), True, ()) for i in range(3)]
    drawn, alive = [], []

    def init(key):
        assert all(ref() is None for ref in alive), f"{key}: an earlier shard's values are still held"
        value = torch.full((50, 8), float(len(drawn)))
        drawn.append(key)
        alive.append(weakref.ref(value))
        return value

    lookup = LocalLookup(shards, SGD(0.1), 1, torch.float32, "cpu", init)
    assert drawn == ["s0", "s1", "s2"]
    assert [float(w.mean()) for w in lookup.pooled.split_weights()] == [0.0, 1.0, 2.0]


def test_no_optimizer_means_no_gradient_and_meta_allocates_nothing():
    m = FusedEmbeddingBags(TABLES)
    assert not m(*batch()).requires_grad
    meta = FusedEmbeddingBags([TableInfo("huge", 10**9, 128)], optimizer=RowWiseAdagrad(0.1), device="meta")
    assert meta.weights.is_meta and meta.optimizer_state()["momentum"].is_meta


def test_optimizer_configs():
    assert SGD(0.1).state_bytes_per_row(64) == 0
    assert RowWiseAdagrad(0.1).state_bytes_per_row(64) == 4
    assert Adam(0.1).state_bytes_per_row(64) == 2 * 64 * 4 + 4
    assert Adagrad(0.1).state_bytes_per_row(64) == 64 * 4 and Adagrad(0.1).eps == 1e-10  # torch.optim.Adagrad's
    assert RowWiseAdagrad(0.1).eps == 1e-8 and Adam(0.1).betas == (0.9, 0.999)
    with pytest.raises(ValueError, match=r"Adam: betas must be two values in \[0, 1\), got \(0.9, 1.0\)"):
        Adam(0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="RowWiseAdagrad: eps must be > 0, got 0"):
        RowWiseAdagrad(0.1, eps=0)
    with pytest.raises(ValueError, match="SGD: lr must be >= 0, got -1"):
        SGD(-1)


@pytest.mark.parametrize("make, error, match", [
    # beyond float32 the fused update sees inf: rows became inf (lr) or never moved (eps)
    (lambda: SGD(float("inf")), ValueError, r"SGD: lr must be finite in float32 .*, got inf"),
    (lambda: Adam(1e300), ValueError, r"Adam: lr must be finite in float32 .*, got 1e\+300"),
    (lambda: RowWiseAdagrad(0.1, eps=1e300), ValueError, r"RowWiseAdagrad: eps must be finite in float32 .*, got "
                                                          r"1e\+300"),
    (lambda: SGD(float("nan")), ValueError, r"SGD: lr must be >= 0, got nan"),
    # True trained with lr 1.0; "no" is truthy and trained exactly
    (lambda: SGD(True), TypeError, r"SGD: lr must be a number >= 0, got True \(bool\)"),
    (lambda: RowWiseAdagrad(0.1, eps=True), TypeError, r"RowWiseAdagrad: eps must be a number > 0, got True"),
    (lambda: RowWiseAdagrad(0.1, exact_column_wise="no"), TypeError,
     r"RowWiseAdagrad: exact_column_wise must be True or False, got 'no' \(str\)"),
    (lambda: RowWiseAdagrad(0.1, exact_column_wise=None), TypeError, r"exact_column_wise must be True or False"),
    # types the comparison failed on with a bare error
    (lambda: SGD("0.1"), TypeError, r"SGD: lr must be a number >= 0, got '0.1' \(str\)"),
    (lambda: SGD(None), TypeError, r"SGD: lr must be a number >= 0, got None"),
    (lambda: SGD(torch.tensor([0.1, 0.2])), TypeError, r"SGD: lr must be a number >= 0, got tensor"),
    (lambda: RowWiseAdagrad(0.1, eps="1e-8"), TypeError, r"RowWiseAdagrad: eps must be a number > 0, got '1e-8'"),
    (lambda: Adam(0.1, betas=0.9), TypeError, r"Adam: betas must be two values in \[0, 1\), got 0.9 \(float\)"),
    (lambda: Adam(0.1, betas="ab"), TypeError, r"Adam: betas must be two values in \[0, 1\), got 'ab'"),
    (lambda: Adam(0.1, betas=None), TypeError, r"Adam: betas must be two values in \[0, 1\), got None"),
    (lambda: PerTable(None), TypeError, r"PerTable: tables must map table names .*, got None"),
])
def test_optimizer_configs_refuse_meaningless_values(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_optimizer_configs_take_numbers_of_any_kind():
    assert SGD(1) == SGD(1.0) and isinstance(SGD(1).lr, float)
    assert RowWiseAdagrad(torch.tensor(0.5)).lr == 0.5
    assert Adam(0.1, betas=[0.5, 0.25]).betas == (0.5, 0.25)


def test_table_minmax_paths_agree():
    # the CPU path (per-table aminmax) and the device path (segment_reduce), table 1 empty
    from fxrec.lowering.layout import _segment_minmax, table_minmax
    indices = torch.tensor([5, 0, 9, 2, 7, 7, 3])
    offsets = torch.tensor([0, 2, 3, 3, 3, 5, 7])  # B=2, T=3
    expected = torch.tensor([[0.0, float("inf"), 2.0], [9.0, float("-inf"), 7.0]], dtype=torch.float64)
    assert torch.equal(table_minmax(indices, offsets, 2, 3), expected)
    assert torch.equal(_segment_minmax(indices, offsets, 2, 7), expected)


def test_dtype_cast_keeps_optimizer_state_fp32_and_psw_grad_without_optimizer():
    m = FusedEmbeddingBags(TABLES, optimizer=Adam(0.1)).half()
    assert m.weights.dtype == torch.float16
    assert m.optimizer_exp_avg.dtype == torch.float32 and m.optimizer_step.dtype == torch.int32
    frozen = FusedEmbeddingBags(TABLES, kernel="torch")
    before = frozen.weights.clone()
    indices, offsets = batch()
    psw = torch.rand(indices.numel(), requires_grad=True)
    frozen(indices, offsets, psw).sum().backward()
    # d sum(out) / d psw_i = sum of i's row
    row_sums = torch.cat([w[indices[s:e]].sum(1) for w, (s, e) in
                          zip(frozen.split_weights(), [(0, 3), (3, 4), (4, 6)])])
    torch.testing.assert_close(psw.grad, row_sums)
    assert torch.equal(frozen.weights, before)
