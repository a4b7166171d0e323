"""fxrec's Triton kernels for quantized tables against torch_ref, on fresh random inputs.

The comparisons run only where kernel "triton" is under test (FXREC_TEST_KERNELS): on the
CPU that means the Triton interpreter, which must be switched on before triton is imported,
so `test_triton_interpreter_suite` reruns this file in a child pytest with TRITON_INTERPRET=1
and FXREC_TEST_KERNELS=triton; nothing leaks into this process. This process checks the
registry's choice (CPU problems refused without the interpreter) and that the kernels compile
for a GPU (sm_90) ahead of time, which the interpreter never does.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fxrec.lowering import torch_ref
from fxrec.lowering.quant import QuantLayout, quantize_rows
from fxrec.lowering.registry import kernel_choices, registered, select
from fxrec.types import TableInfo
from triton_child import assert_interpreter_child_passes

KERNELS_UNDER_TEST = os.environ.get("FXREC_TEST_KERNELS", "torch,fbgemm").split(",")
CHILD = "triton" in KERNELS_UNDER_TEST
I32, I64 = torch.int32, torch.int64
ALL5 = ("int8", "int4", "int2", "fp16", "fp32")

# id -> (types, dims, poolings, ids dtype, offsets dtype, per-sample weights, output dtype, B, row_alignment)
POOLED = {
    "mixed_types": (ALL5, (12, 8, 16, 4, 136), ("sum",) * 5, I64, I64, False, torch.float32, 4, 1),
    "single_table": (("int4",), (64,), ("sum",), I32, I32, False, torch.float32, 4, 1),
    "mean": (("int8", "int2", "fp16"), (5, 128, 12), ("mean",) * 3, I64, I32, False, torch.float32, 3, 1),
    "sum_weighted": (ALL5, (4, 16, 8, 12, 8), ("sum",) * 5, I32, I64, True, torch.float32, 3, 1),
    "mean_weighted": (("int2", "int8", "fp32"), (4, 7, 16), ("mean",) * 3, I64, I64, True, torch.float32, 3, 1),
    "sum_and_mean": (("int4", "fp16"), (12, 8), ("sum", "mean"), I32, I32, True, torch.float32, 3, 1),
    "fp16_out": (ALL5, (8, 12, 4, 64, 16), ("sum",) * 5, I64, I64, True, torch.float16, 3, 1),
    "bf16_out": (("int8", "fp32"), (16, 8), ("mean",) * 2, I32, I32, False, torch.bfloat16, 3, 1),
    "row_alignment_16": (ALL5, (12, 8, 4, 12, 4), ("sum",) * 5, I64, I64, False, torch.float32, 3, 16),
    "batch_0": (("int8", "int4"), (8, 8), ("sum",) * 2, I64, I64, False, torch.float32, 0, 1),
    "no_ids": (("int8", "fp16"), (8, 12), ("mean",) * 2, I32, I64, False, torch.float32, 3, 1),
}
# id -> (types, dims, ids dtype, offsets dtype, output dtype, B, row_alignment)
UNPOOLED = {
    "mixed_types": (ALL5, (12, 8, 136, 4, 16), I64, I64, torch.float32, 3, 1),
    "mixed_fp16_out": (("int2", "int8", "fp32"), (8, 5, 12), I32, I32, torch.float16, 3, 1),
    "equal_dims_aligned": (("int4", "fp16"), (16, 16), I64, I32, torch.float32, 4, 16),
    "batch_0": (("int8",), (8,), I64, I64, torch.float32, 0, 1),
    "a_table_without_ids": (("int4", "int8"), (8, 12), I32, I64, torch.float32, 3, 1),
}
LONG_BAG = 20  # > the kernels' 8 ids per loop step at these batches' mean bag sizes
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

triton_only = pytest.mark.skipif(not CHILD, reason="runs in test_triton_interpreter_suite's child (or on a GPU)")


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def make_tables(types, dims, poolings, row_alignment, gen, device="cpu"):
    """A QuantLayout and its uint8 buffer, quantized from randn rows (a few rows per table)."""
    tables = [TableInfo(f"t{i}", int(torch.randint(3, 20, (1,), generator=gen)), d, pooling=p)
              for i, (d, p) in enumerate(zip(dims, poolings))]
    layout = QuantLayout(tables, types, row_alignment=row_alignment)
    weights = torch.zeros(layout.numel, dtype=torch.uint8)
    for part, tab, q, nbytes in zip(layout.split(weights), tables, layout.types, layout.row_bytes):
        part.copy_(quantize_rows(torch.randn(tab.num_embeddings, tab.embedding_dim, generator=gen) * 3, q, nbytes))
    return layout.to(device), weights.to(device)


def make_batch(layout, B, idtype, odtype, weighted, gen, empty_table=None, no_ids=False):
    """Table-major ids/offsets: every table's first bag empty, a repeated id per table, and
    table 0's second bag `LONG_BAG` ids long (several steps of a kernel's id loop)."""
    T = layout.num_tables
    if B == 0:
        empty = torch.zeros(0, dtype=idtype)
        return empty, torch.zeros(1, dtype=odtype), (torch.zeros(0) if weighted else None)
    lengths = torch.randint(0, 5, (T * B,), generator=gen)
    lengths[::B] = 0
    if B > 1:
        lengths[1] = LONG_BAG
    if empty_table is not None:
        lengths[empty_table * B:(empty_table + 1) * B] = 0
    if no_ids:
        lengths.zero_()
    ids = []
    for t in range(T):
        x = torch.randint(0, layout.rows[t], (int(lengths[t * B:(t + 1) * B].sum()),), generator=gen)
        if x.numel() > 1:
            x[1] = x[0]
        ids.append(x)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(odtype)
    indices = torch.cat(ids).to(idtype)
    psw = torch.rand(indices.numel(), generator=gen) + 0.5 if weighted else None
    return indices, offsets, psw


def _to(device, *xs):
    return [None if x is None else x.to(device) for x in xs]


def check_pooled(case, gen, device="cpu"):
    types, dims, poolings, idt, odt, weighted, out_dtype, B, align = POOLED[case]
    layout, weights = make_tables(types, dims, poolings, align, gen, device)
    indices, offsets, psw = _to(device, *make_batch(layout, B, idt, odt, weighted, gen, no_ids=case == "no_ids"))
    name, impl = select("quant_pooled_forward", kernel="triton", device=device, weight_dtype=torch.uint8,
                        index_dtype=idt, dims=dims, poolings=poolings, weighted=weighted, weight_types=types,
                        output_dtype=out_dtype)
    assert name == "triton"
    got = impl(weights, layout, indices, offsets, psw, out_dtype)
    want = torch_ref.quant_pooled_forward(weights.cpu(), layout.to("cpu"), indices.cpu(), offsets.cpu(),
                                          None if psw is None else psw.cpu(), out_dtype)
    assert got.shape == (B, sum(dims)) and got.dtype == out_dtype and got.device.type == device
    torch.testing.assert_close(got.cpu(), want, **TOL[out_dtype])
    if case == "no_ids":
        assert not got.any()


def check_unpooled(case, gen, device="cpu"):
    types, dims, idt, odt, out_dtype, B, align = UNPOOLED[case]
    layout, weights = make_tables(types, dims, ("none",) * len(dims), align, gen, device)
    empty = 0 if case == "a_table_without_ids" else None
    indices, offsets, _ = _to(device, *make_batch(layout, B, idt, odt, False, gen, empty_table=empty))
    name, impl = select("quant_unpooled_forward", kernel="triton", device=device, weight_dtype=torch.uint8,
                        index_dtype=idt, dims=dims, poolings=("none",) * len(dims), weight_types=types,
                        output_dtype=out_dtype)
    assert name == "triton"
    got = impl(weights, layout, indices, offsets, out_dtype)
    want = torch_ref.quant_unpooled_forward(weights.cpu(), layout.to("cpu"), indices.cpu(), offsets.cpu(), out_dtype)
    assert got.dim() == 1 and got.dtype == out_dtype and got.device.type == device
    torch.testing.assert_close(got.cpu(), want, **TOL[out_dtype])


@triton_only
@pytest.mark.parametrize("case", list(POOLED))
def test_quant_pooled_matches_torch_ref(case, gen):
    check_pooled(case, gen)


@triton_only
@pytest.mark.parametrize("case", list(UNPOOLED))
def test_quant_unpooled_matches_torch_ref(case, gen):
    check_unpooled(case, gen)


@triton_only
def test_every_code_of_every_int_type(gen):
    """Rows holding every code (0 .. 2**bits-1) at every position within a byte, against
    torch_ref: a wrong shift or mask cannot hide behind random data."""
    for qtype, bits in (("int8", 8), ("int4", 4), ("int2", 2)):
        levels = 1 << bits
        dim = max(levels, 8)
        rows = torch.stack([(torch.arange(dim) + r) % levels for r in range(levels)]).float()
        rows[:, 0], rows[:, 1] = 0, levels - 1  # every row spans the full range: code = value
        layout = QuantLayout([TableInfo("t", levels, dim, pooling="none")], [qtype])
        weights = quantize_rows(rows, layout.types[0]).reshape(-1)
        ids, offsets = torch.arange(levels), torch.tensor([0, levels])
        _, impl = select("quant_unpooled_forward", kernel="triton", weight_dtype=torch.uint8, dims=(dim,),
                         poolings=("none",), weight_types=(qtype,))
        got = impl(weights, layout, ids, offsets)
        torch.testing.assert_close(got, torch_ref.quant_unpooled_forward(weights, layout, ids, offsets), rtol=0, atol=0)
        torch.testing.assert_close(got.view(levels, dim), rows, rtol=0, atol=0)


# ---------------------------------------------------------------- this process
@triton_only
def test_lowered_model_on_triton():
    """fxrec.lower_for_inference(kernel="triton"): the module keeps FBGEMM's row format and
    computes what the torch-served lowering computes, up to the formats' rounding."""
    import fxrec
    from fxrec.lowering import QuantizedEmbeddingBags
    sys.path.insert(0, os.path.dirname(__file__))
    from models_zoo import CASES

    case = CASES["dlrm_ebc"]
    model, ex = case.make(0)
    tri = fxrec.lower_for_inference(model, ex, "int4", kernel="triton")
    ref = fxrec.lower_for_inference(model, ex, "int4", kernel="torch")
    quant = [m for m in tri.modules() if isinstance(m, QuantizedEmbeddingBags)]
    assert {m.kernel for m in quant} == {"triton"} and {m.layout.qparams for m in quant} == {"front"}
    x = case.inputs(3)
    with torch.no_grad():  # int4 codes and fp16 qparams are the same in both formats
        torch.testing.assert_close(tri(*x), ref(*x), rtol=1e-5, atol=1e-5)


def test_triton_interpreter_suite():
    """This file's kernel tests for "triton", in a child pytest under TRITON_INTERPRET=1."""
    if CHILD:
        return  # we are the child
    assert_interpreter_child_passes(__file__, "interpreter_suite or gpu or compile_for or checker")


QUANT_OPS = ("quant_pooled_forward", "quant_unpooled_forward")


@pytest.mark.parametrize("op", QUANT_OPS)
def test_checker_refuses_cpu_without_interpreter(op):
    if CHILD or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    prob = dict(device="cpu", weight_dtype=torch.uint8, dims=(8,), poolings=("sum",) if op == QUANT_OPS[0]
                else ("none",), weight_types=("int8",))
    assert select(op, **prob)[0] != "triton"
    choices = dict(kernel_choices(op, **prob))
    assert choices["torch"] is None
    if "triton" in choices:
        assert "TRITON_INTERPRET" in choices["triton"]


@pytest.mark.parametrize("op", QUANT_OPS)
def test_checker_names_what_it_refuses(op):
    if "triton" not in registered(op):
        pytest.skip("triton not importable")
    base = dict(device="cuda", weight_dtype=torch.uint8, dims=(8, 4), poolings=("sum", "sum"),
                weight_types=("int4", "fp32"))
    assert dict(kernel_choices(op, **base))["triton"] is None
    for change, reason in ((dict(weight_dtype=torch.float32), "uint8"), (dict(weight_types=("int4", "int3")), "int3"),
                           (dict(output_dtype=torch.float64), "float64"), (dict(index_dtype=torch.int16), "int16"),
                           (dict(device="meta"), "meta")):
        assert reason in dict(kernel_choices(op, **{**base, **change}))["triton"], change
    assert "'back'" in dict(kernel_choices(op, **base, qparams="back"))["triton"]


def test_other_qparams_formats_are_refused():
    """The kernels read FBGEMM's "front" format; a layout in another must not be decoded."""
    pytest.importorskip("triton")
    from fxrec.lowering.triton import quant_ops
    tables = [TableInfo("t", 4, 8, pooling="sum")]
    layout = QuantLayout(tables, ["int8"], qparams="back")
    weights = torch.zeros(layout.numel, dtype=torch.uint8)
    ids, offsets = torch.tensor([1]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="'front'"):
        quant_ops.quant_pooled_forward(weights, layout, ids, offsets)
    layout = QuantLayout([TableInfo("t", 4, 8)], ["int8"], qparams="back")
    with pytest.raises(ValueError, match="'front'"):
        quant_ops.quant_unpooled_forward(weights, layout, ids, offsets)


_COMMON_SIG = {"weights_ptr": "*u8", "w_offsets_ptr": "*i64", "row_bytes_ptr": "*i64", "tys_ptr": "*u8",
               "d_offsets_ptr": "*i32"}
_CHECK_SIG = {"rows_ptr": "*i64", "n": "i32", "err_ptr": "*i64", "CHECK": "constexpr"}  # the bounds check
_COMPILE_CASES = {  # case -> (kernel, signature, constexprs)
    "pooled_i32_psw_bf16": ("quant_pooled_forward_kernel",
                            {**_COMMON_SIG, "is_mean_ptr": "*i32", "indices_ptr": "*i32", "offsets_ptr": "*i32",
                             "psw_ptr": "*fp32", "out_ptr": "*bf16", "B": "i32", "total_D": "i32", **_CHECK_SIG,
                             "HAS_PSW": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
                            {"HAS_PSW": True, "CHECK": True, "BLOCK_N": 32, "BLOCK_D": 128}),
    "pooled_i64_fp32_unchecked": ("quant_pooled_forward_kernel",
                                  {**_COMMON_SIG, "is_mean_ptr": "*i32", "indices_ptr": "*i64", "offsets_ptr": "*i64",
                                   "psw_ptr": "*u8", "out_ptr": "*fp32", "B": "i32", "total_D": "i32", **_CHECK_SIG,
                                   "HAS_PSW": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
                                  {"HAS_PSW": False, "CHECK": False, "BLOCK_N": 8, "BLOCK_D": 16}),
    **{f"unpooled_fp16{'' if check else '_unchecked'}": (
        "quant_unpooled_forward_kernel",
        {**_COMMON_SIG, "indices_ptr": "*i64", "offsets_ptr": "*i32", "out_offsets_ptr": "*i64",
         "out_ptr": "*fp16", "B": "i32", **_CHECK_SIG, "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        {"CHECK": check, "BLOCK_N": 8, "BLOCK_D": 64}) for check in (True, False)},
}


@pytest.mark.parametrize("case", list(_COMPILE_CASES))
def test_quant_kernels_compile_for_sm90(case):
    """The interpreter does not run the GPU compiler; compile ahead of time (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fxrec.lowering.triton import quant_kernels as K
    kernel, sig, constexprs = _COMPILE_CASES[case]
    compiled = triton.compile(ASTSource(fn=JITFunction(getattr(K, kernel).fn), signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["mixed_types", "sum_weighted", "fp16_out", "row_alignment_16", "batch_0"])
def test_gpu_quant_pooled(case, gen):
    check_pooled(case, gen, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["mixed_types", "mixed_fp16_out", "a_table_without_ids"])
def test_gpu_quant_unpooled(case, gen):
    check_unpooled(case, gen, "cuda")
