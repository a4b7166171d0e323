"""fxrec.lower_for_inference and the quantized tables under it, against explicit references.

- The format: `quantize_rows` leaves each element within `max_error` of its value, and
  writes the bytes FBGEMM's own quantizer writes (codes, fp16 scale and bias).
- The kernels: torch and FBGEMM's IntNBit op on mixed-type tables against a reference
  written here (decode every row by hand, pool in a Python loop over bags).
- The lowered model: on fresh random inputs it computes what the unmodified model computes
  with each table replaced by its decoded values (fp32: 1e-5), for every test model and
  int8 / int4 / int2 / fp16 / fp32; the graph holds one quantized lookup per group and no
  float table; it owns its state; errors name the table and the offending value.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxrec
from fxrec.lowering import QuantizedEmbeddingBags, QuantLayout, select
from fxrec.lowering.quant import QUANT_TYPES, dequantize_rows, max_error, quantize_rows
from fxrec.passes import lookup as L
from fxrec.passes.fuse_lookups import KERNEL
from fxrec.types import TableInfo
from models_zoo import CASES

TYPES = ("int8", "int4", "int2", "fp16", "fp32")
KERNELS = ("torch", "fbgemm")


# ------------------------------------------------------------------ the format
def _rows_cases(g):
    return {
        "randn": torch.randn(50, 16, generator=g),
        "wide_range": torch.randn(20, 8, generator=g) * 1000,
        "constant_rows": torch.full((6, 8), 0.37),
        "tiny_range": 1.0 + torch.rand(10, 8, generator=g) * 1e-6,
        "negative": -torch.rand(10, 12, generator=g) - 5,
        "zeros": torch.zeros(3, 4),
    }


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("case", ["randn", "wide_range", "constant_rows", "tiny_range", "negative", "zeros"])
def test_quantize_error_within_bound(qtype, case):
    w = _rows_cases(torch.Generator().manual_seed(0))[case]
    q = QUANT_TYPES[qtype]
    if w.shape[1] % (8 // q.bits if q.integer else 1):
        pytest.skip("dim not packable for this type")  # every case's dim is a multiple of 4
    back = dequantize_rows(quantize_rows(w, q), q, w.shape[1])
    err = (back - w).abs().amax(dim=1)
    assert (err <= max_error(w, q)).all(), (err - max_error(w, q)).max()
    if qtype == "fp32":
        assert torch.equal(back, w)
    elif case in ("constant_rows", "zeros"):  # scale 0: every element decodes to the fp16 bias
        assert torch.equal(back, w.half().float())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_and_qparams_match_fbgemm_quantizer(bits):
    """fbgemm's FloatToFusedNBitRowwiseQuantizedSBHalf writes codes then (scale, bias); we
    write (scale, bias) then the codes (its TBE layout): the same numbers."""
    pytest.importorskip("fbgemm_gpu")
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    theirs = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    ours = quantize_rows(w, QUANT_TYPES[f"int{bits}"])
    n = 32 * bits // 8
    assert torch.equal(ours[:, :4], theirs[:, n:n + 4])
    mismatch = (ours[:, 4:] != theirs[:, :n]).float().mean().item()
    assert mismatch < 0.01  # a code may round the other way at an exact half step


@pytest.mark.parametrize("qtype", ["int8", "int4", "int2"])
def test_back_format_matches_torch_prepack(qtype):
    """The "back" format is what torch's own rowwise prepack ops write (codes, then scale
    and bias: fp32 for int8, fp16 for int4 / int2)."""
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    prepack = {"int8": torch.ops.quantized.embedding_bag_byte_prepack,
               "int4": torch.ops.quantized.embedding_bag_4bit_prepack,
               "int2": torch.ops.quantized.embedding_bag_2bit_prepack}[qtype]
    theirs = prepack(w)
    ours = quantize_rows(w, QUANT_TYPES[qtype], qparams="back")
    assert ours.shape == theirs.shape
    n = 32 * QUANT_TYPES[qtype].bits // 8
    torch.testing.assert_close(ours[:, n:].contiguous().view(torch.float32 if qtype == "int8" else torch.float16),
                               theirs[:, n:].contiguous().view(torch.float32 if qtype == "int8" else torch.float16),
                               rtol=1e-6, atol=0)
    assert (ours[:, :n] != theirs[:, :n]).float().mean().item() < 0.01


def test_layout_bytes_and_alignment():
    tables = [TableInfo(name=f"t{i}", num_embeddings=r, embedding_dim=d) for i, (r, d) in
              enumerate([(10, 8), (7, 6), (5, 12), (3, 4)])]
    lay = QuantLayout(tables, ["int8", "int4", "fp16", "int2"])
    assert lay.row_bytes == (12, 7, 24, 5)
    assert all(o % 16 == 0 for o in lay.weights_offsets_list)
    assert lay.weights_tys.tolist() == [2, 3, 1, 4]
    lay16 = QuantLayout(tables, ["int8", "int4", "fp16", "int2"], row_alignment=16)
    assert lay16.row_bytes == (16, 16, 32, 16)
    back = QuantLayout(tables, ["int8", "int4", "fp16", "int2"], qparams="back")
    assert back.row_bytes == (16, 7, 24, 5)  # int8 keeps fp32 scale and bias there
    with pytest.raises(ValueError, match="row_alignment must be 1"):
        QuantLayout(tables, ["int8"] * 4, row_alignment=16, qparams="back")


def test_format_errors_name_table_and_value():
    t = [TableInfo(name="odd", num_embeddings=4, embedding_dim=5)]
    with pytest.raises(ValueError, match=r"table 'odd': dim 5 cannot be stored as int4"):
        QuantLayout(t, ["int4"])
    with pytest.raises(ValueError, match=r"table 'odd': weight_dtype 'int3' is not"):
        QuantLayout(t, ["int3"])
    w = torch.ones(4, 8)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"table 'x': row 2 holds a non-finite value"):
        quantize_rows(w, QUANT_TYPES["int8"], table="x")
    with pytest.raises(ValueError, match=r"table 'x': row 1 holds 1e\+05, beyond fp16"):
        quantize_rows(torch.tensor([[1.0, 2.0], [1e5, 0.0]]), QUANT_TYPES["int8"], table="x")
    # finite, but its range overflows float32: the scale would be inf and every value decode to nan
    with pytest.raises(ValueError, match=r"table 'x': row 1 spans -2e\+38 to 2e\+38, a range beyond float32"):
        quantize_rows(torch.tensor([[1.0, 2.0, 0.0], [2e38, -2e38, 1.0]]), QUANT_TYPES["int8"], table="x",
                      qparams="back")
    with pytest.raises(ValueError, match="meta device"):
        quantize_rows(torch.empty(3, 4, device="meta"), QUANT_TYPES["int8"], table="x")


# ------------------------------------------------------------------ the kernels
def _ref_pooled(tables, values, indices, offsets, psw, B):
    """Python loop over bags on the decoded tables."""
    out = torch.zeros(B, sum(t.embedding_dim for t in tables))
    col = 0
    for ti, t in enumerate(tables):
        for b in range(B):
            s, e = int(offsets[ti * B + b]), int(offsets[ti * B + b + 1])
            acc = torch.zeros(t.embedding_dim)
            for i in range(s, e):
                acc += values[t.name][int(indices[i])] * (1.0 if psw is None else float(psw[i]))
            if t.pooling == "mean" and e > s:
                acc /= e - s
            out[b, col:col + t.embedding_dim] = acc
        col += t.embedding_dim
    return out


def _batch(g, tables, B, idx_dtype, max_len=4):
    lengths = torch.randint(0, max_len + 1, (len(tables) * B,), generator=g)
    if lengths.numel():
        lengths[0] = 0  # an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = [torch.randint(0, t.num_embeddings, (int(lengths[i * B:(i + 1) * B].sum()),), generator=g)
           for i, t in enumerate(tables)]
    return torch.cat(ids).to(idx_dtype), offsets.to(idx_dtype)


# id -> (dims, types, pooling, weighted, id dtype, B)
KERNEL_CASES = {
    "mixed_types": ((8, 12, 16, 4, 8), ("int8", "int4", "fp16", "int2", "fp32"), "sum", False, torch.int64, 5),
    "mixed_weighted_int32": ((8, 12, 16, 4), ("int8", "int4", "fp16", "fp32"), "sum", True, torch.int32, 4),
    "mean": ((8, 16), ("int8", "int4"), "mean", False, torch.int64, 4),
    "mean_weighted": ((8, 16), ("int8", "int2"), "mean", True, torch.int64, 3),
    "single_int8": ((64,), ("int8",), "sum", False, torch.int64, 6),
    "empty_batch": ((8, 8), ("int8", "int4"), "sum", False, torch.int64, 0),
    "tables30": (tuple([8, 16, 4, 12, 32] * 6), tuple(["int8", "int4", "int2", "fp16", "fp32"] * 6), "sum",
                 False, torch.int64, 2),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_quant_pooled_kernels(kernel, case):
    dims, types, pooling, weighted, idt, B = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 1000)
    tables = [TableInfo(name=f"t{i}", num_embeddings=5 + 3 * i, embedding_dim=d, pooling=pooling)
              for i, d in enumerate(dims)]
    weights = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g) for t in tables}
    mod = QuantizedEmbeddingBags.from_float(tables, weights, dict(zip(weights, types)), kernel=kernel)
    assert mod.kernel == kernel
    indices, offsets = _batch(g, tables, B, idt)
    psw = torch.rand(indices.numel(), generator=g) if weighted else None
    out = mod(indices, offsets, psw)
    assert mod.kernels == {"quant_pooled_forward": kernel}
    ref = _ref_pooled(tables, mod.dequantized(), indices, offsets, psw, B)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and the decoded tables are the float ones up to the format's error
    for t in tables:
        err = (mod.dequantized()[t.name] - weights[t.name]).abs().amax(1)
        assert (err <= max_error(weights[t.name], QUANT_TYPES[types[tables.index(t)]])).all()


@pytest.mark.parametrize("case", ["mixed_types", "mixed_weighted_int32", "mean_weighted"])
def test_torch_kernel_reads_the_front_format_too(case):
    """Torch, the last resort, serves a buffer in FBGEMM's format (decoding the touched rows)."""
    from fxrec.lowering.torch_ref import quant_pooled_forward

    dims, types, pooling, weighted, idt, B = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(5)
    tables = [TableInfo(name=f"t{i}", num_embeddings=6 + i, embedding_dim=d, pooling=pooling)
              for i, d in enumerate(dims)]
    mod = QuantizedEmbeddingBags.from_float(tables, [torch.randn(6 + i, d, generator=g) for i, d in enumerate(dims)],
                                            dict(zip([t.name for t in tables], types)), kernel="fbgemm")
    indices, offsets = _batch(g, tables, B, idt)
    psw = torch.rand(indices.numel(), generator=g) if weighted else None
    out = quant_pooled_forward(mod.weights, mod.layout, indices, offsets, psw)
    torch.testing.assert_close(out, _ref_pooled(tables, mod.dequantized(), indices, offsets, psw, B),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("types", [("int8", "int4", "fp16"), ("int2", "fp32", "int8")])
def test_quant_unpooled_kernels(kernel, types):
    g = torch.Generator().manual_seed(3)
    tables = [TableInfo(name=f"s{i}", num_embeddings=9 + i, embedding_dim=8, pooling="none") for i in range(3)]
    weights = [torch.randn(t.num_embeddings, 8, generator=g) for t in tables]
    mod = QuantizedEmbeddingBags.from_float(tables, weights, dict(zip([t.name for t in tables], types)),
                                            kernel=kernel)
    indices, offsets = _batch(g, tables, 4, torch.int64)
    out = mod(indices, offsets)
    values = mod.dequantized()
    bounds = offsets[::4].tolist()
    ref = torch.cat([values[t.name][indices[s:e]].reshape(-1) for t, s, e in zip(tables, bounds, bounds[1:])])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # torch's ops decode with a fused multiply-add


@pytest.mark.parametrize("kernel", KERNELS)
def test_quant_fp16_output(kernel):
    g = torch.Generator().manual_seed(4)
    tables = [TableInfo(name="a", num_embeddings=20, embedding_dim=16), TableInfo(name="b", num_embeddings=9,
                                                                                  embedding_dim=8)]
    mod = QuantizedEmbeddingBags.from_float(tables, [torch.randn(20, 16, generator=g), torch.randn(9, 8, generator=g)],
                                            "int8", output_dtype=torch.float16, kernel=kernel)
    indices, offsets = _batch(g, tables, 5, torch.int64)
    out = mod(indices, offsets)
    assert out.dtype == torch.float16
    ref = _ref_pooled(tables, mod.dequantized(), indices, offsets, None, 5)
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-3)


def test_quant_kernel_choice_and_bounds():
    tables = [TableInfo(name="a", num_embeddings=10, embedding_dim=8), TableInfo(name="b", num_embeddings=5,
                                                                                 embedding_dim=4)]
    mod = QuantizedEmbeddingBags.from_float(tables, [torch.randn(10, 8), torch.randn(5, 4)], "int8")
    # on the CPU torch's rowwise ops beat fbgemm's table-batched op: torch, in their row format
    assert mod.kernel == "torch" and mod.layout.qparams == "back" and mod.layout.row_bytes == (16, 12)
    forced = QuantizedEmbeddingBags.from_float(tables, [torch.randn(10, 8), torch.randn(5, 4)], "int8",
                                               kernel="fbgemm")
    assert forced.kernel == "fbgemm" and forced.layout.qparams == "front" and forced.layout.row_bytes == (12, 8)
    with pytest.raises(ValueError, match=r"table 'b': id 5 out of range \[0, 5\)"):
        mod(torch.tensor([1, 2, 5]), torch.tensor([0, 1, 2, 2, 3]))
    with pytest.raises(ValueError, match=r"table 'a': id -1 out of range"):
        mod(torch.tensor([-1, 2, 3]), torch.tensor([0, 1, 2, 2, 3]))
    with pytest.raises(ValueError, match="weight_types must name every table"):
        QuantizedEmbeddingBags(tables, {"a": "int8"})
    name, _ = select("quant_pooled_forward", device="cpu", weight_dtype=torch.uint8, dims=(8, 7),
                     poolings=("sum", "mean"), weight_types=("int8", "int8"))
    assert name == "torch"  # fbgemm's op takes one pooling mode per call


# ------------------------------------------------------------------ the lowered model
def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    if hasattr(out, "values") and callable(out.values):
        return [out.values()]
    raise TypeError(type(out))


def _decoded_model(model, lowered):
    """A copy of `model` whose tables hold the values the lowered module decodes."""
    values = {}
    for m in lowered.modules():
        if isinstance(m, QuantizedEmbeddingBags):
            values.update(m.dequantized())
    ref = copy.deepcopy(model).eval()
    names = L.table_names_by_param(ref)
    with torch.no_grad():
        for path, p in ref.named_parameters():
            if names.get(path) in values:
                p.copy_(values[names[path]])
    return ref


def _types_for(model, ex, qtype):
    """qtype for every table whose dim packs it, int8 for the others (a mapping)."""
    per = 8 // QUANT_TYPES[qtype].bits if QUANT_TYPES[qtype].integer else 1
    return {t.name: (qtype if t.embedding_dim % per == 0 else "int8") for t in fxrec.find_tables(model, ex)}


MODELS = ["dlrm_lists", "dlrm_ebc", "two_tower", "seq_attention", "weighted_bag", "bag_2d", "functional_bag",
          "functional_embedding", "table_dict", "sequence_ec"]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("name", MODELS)
def test_lowered_model_equals_model_with_decoded_tables(name, qtype):
    case = CASES[name]
    model, ex = case.make(0)
    lowered = fxrec.lower_for_inference(model, ex, _types_for(model, ex, qtype))
    ref = _decoded_model(model, lowered)
    with torch.no_grad():
        for seed in (1, 2):
            x = case.inputs(seed)
            for a, b in zip(_flat(lowered(*x)), _flat(ref(*x))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dlrm_lists", "two_tower", "table_dict"])
def test_lowered_graph_structure_and_state(name):
    case = CASES[name]
    model, ex = case.make(0)
    tables = {t.name: t for t in fxrec.find_tables(model, ex)}
    lowered = fxrec.lower_for_inference(model, ex, "int8")
    assert not lowered.training
    quant = [m for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)]
    served = [n for m in quant for n in m.layout.names]
    assert sorted(served) == sorted(tables)  # every table once, quantized
    lookups = [n for n in lowered.graph.nodes if KERNEL in n.meta]
    assert lookups and all(n.op == "call_module" for n in lookups)
    for node in lookups:  # the kernel serving each quantized lookup, as `fxrec dump` shows it
        ops = {op: k for record in node.meta[KERNEL].values() for op, k in record.items()}
        assert set(ops) <= {"quant_pooled_forward", "quant_unpooled_forward"} and set(ops.values()) == {"torch"}
    # no float copy of a table anywhere in the lowered module's state
    state = lowered.state_dict()
    assert sum(v.numel() for v in state.values() if v.dtype == torch.uint8) == sum(m.layout.numel for m in quant)
    table_params = [k for k, t in L.table_names_by_param(model).items() if t in tables]
    assert not set(table_params) & set(state)
    assert not any(L.LOOKUP in n.meta for n in lowered.graph.nodes)  # no user lookup left
    assert not any(hasattr(m, "source_weights") for m in lowered.modules())  # the user's tables are let go
    assert any("quantize_tables:" in line for line in lowered.meta["fxrec_log"])


def test_lowered_owns_its_state_and_leaves_the_model_alone():
    case = CASES["dlrm_lists"]
    model, ex = case.make(0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowered = fxrec.lower_for_inference(model, ex, "int8")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in lowered.parameters())
    x = case.inputs(5)
    with torch.no_grad():
        first = lowered(*x)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # training the model on...
    model(*x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(lowered(*x), first, rtol=0, atol=0)  # ...does not reach the lowered one


def test_lowered_state_dict_round_trip():
    case = CASES["dlrm_ebc"]
    model, ex = case.make(0)
    a = fxrec.lower_for_inference(model, ex, "int4")
    other, _ = case.make(7)  # other weights, same shapes
    b = fxrec.lower_for_inference(other, ex, "int4")
    x = case.inputs(3)
    assert not all(torch.equal(p, q) for p, q in zip(_flat(a(*x)), _flat(b(*x))))
    b.load_state_dict(a.state_dict())
    for p, q in zip(_flat(a(*x)), _flat(b(*x))):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_forced_kernel_serves_the_lowered_model(kernel, qtype):
    case = CASES["dlrm_ebc"]
    model, ex = case.make(0)
    lowered = fxrec.lower_for_inference(model, ex, qtype, kernel=kernel)
    quant = [m for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)]
    assert {m.kernel for m in quant} == {kernel}
    assert {m.layout.qparams for m in quant} == {"back" if kernel == "torch" else "front"}
    ref = _decoded_model(model, lowered)
    x = case.inputs(4)
    with torch.no_grad():
        for a, b in zip(_flat(lowered(*x)), _flat(ref(*x))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Tied(nn.Module):
    """A table whose weight is also a dense layer's (tied): its lookups stay unfused, float."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="sum")
        self.other = nn.EmbeddingBag(12, 4, mode="sum")

    def forward(self, ids, offsets):
        pooled = self.bag(ids, offsets) + self.other(ids, offsets)
        return pooled @ self.bag.weight.t()


def test_tied_table_stays_float_with_a_warning():
    model = _Tied()
    ex = (torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    # `bag` is no table (its weight is a dense layer's too); `other` is quantized alone
    with pytest.warns(UserWarning, match=r"table\(s\) \['bag'\] stay unquantized: 'bag': its weight is also read "
                                         r"outside embedding lookups"):
        lowered = fxrec.lower_for_inference(model, ex, "int8")
    quantized = [m for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)]
    assert [tuple(m.layout.names) for m in quantized] == [("other",)]
    with torch.no_grad():
        torch.testing.assert_close(lowered(*ex), _decoded_model(model, lowered)(*ex), rtol=1e-6, atol=1e-6)


def test_the_kernel_variable_is_read_when_lowering(monkeypatch):
    """FXREC_KERNEL picks the kernel, and with it the row format, when the model is lowered;
    setting or clearing it later changes neither (a per-call read failed on the other format)."""
    case = CASES["dlrm_ebc"]
    model, ex = case.make(0)
    x = case.inputs(2)
    monkeypatch.setenv("FXREC_KERNEL", "fbgemm")
    forced = fxrec.lower_for_inference(model, ex, "int8")
    monkeypatch.delenv("FXREC_KERNEL")
    plain = fxrec.lower_for_inference(model, ex, "int8")
    monkeypatch.setenv("FXREC_KERNEL", "fbgemm")
    with torch.no_grad():
        for lowered, kernel in ((forced, "fbgemm"), (plain, "torch")):
            lowered(*x)
            assert {m.kernel for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)} == {kernel}
        monkeypatch.delenv("FXREC_KERNEL")
        forced(*x)
        assert {m.kernel for m in forced.modules() if isinstance(m, QuantizedEmbeddingBags)} == {"fbgemm"}


class _BagThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")
        self.lin = nn.Linear(8, 1)

    def forward(self, ids, offsets):
        return self.lin(self.bag(ids, offsets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_gets_lookups_in_its_dtype(dtype):
    """The lookups come out in the tables' dtype unless output_dtype says otherwise: an fp16
    or bf16 model's dense layers take them (they refused the float32 default before)."""
    torch.manual_seed(0)
    model = _BagThenLinear().to(dtype).eval()
    ex = (torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 2]))
    lowered = fxrec.lower_for_inference(model, ex, "int8")
    assert [m.output_dtype for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)] == [dtype]
    with torch.no_grad():
        out = lowered(*ex)
        assert out.dtype == dtype
        torch.testing.assert_close(out, _decoded_model(model, lowered)(*ex), rtol=1e-2, atol=1e-2)
    as_asked = fxrec.lower_for_inference(model.float(), ex, "int8", output_dtype=torch.bfloat16)
    assert [m.output_dtype for m in as_asked.modules() if isinstance(m, QuantizedEmbeddingBags)] == [torch.bfloat16]


class _OneBag(nn.Module):
    def __init__(self, rows, dim):
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, dim, mode="sum")

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


def test_lower_for_inference_errors():
    case = CASES["dlrm_lists"]
    model, ex = case.make(0)
    with pytest.raises(ValueError, match=r"table 'emb_l.0': weight_dtype 'int3' is not a quantized table type"):
        fxrec.lower_for_inference(model, ex, "int3")
    with pytest.raises(ValueError, match=r"missing \['emb_l.1', 'emb_l.2'\]"):
        fxrec.lower_for_inference(model, ex, {"emb_l.0": "int8"})
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['emb_l.9'\]"):
        fxrec.lower_for_inference(model, ex, {"emb_l.0": "int8", "emb_l.1": "int8", "emb_l.2": "int8",
                                              "emb_l.9": "int8"})
    odd = _OneBag(10, 5)
    with pytest.raises(ValueError, match=r"table 'bag': dim 5 cannot be stored as int4 .* choose int8 or fp16"):
        fxrec.lower_for_inference(odd, (torch.tensor([1, 2]), torch.tensor([0, 1])), "int4")
    wide = _BagThenLinear().double()
    with pytest.raises(ValueError, match=r"table\(s\) \['bag'\] are float64, and quantized lookups return"):
        fxrec.lower_for_inference(wide, (torch.tensor([1, 2]), torch.tensor([0, 1])), "int8")
    lowered = fxrec.lower_for_inference(model, ex, "int8")
    dense, offsets, ids = case.inputs(1)
    ids = [torch.tensor([3, 1000, 2])] + ids[1:]
    offsets = [torch.tensor([0, 1, 1, 2])] + offsets[1:]
    with pytest.raises(ValueError, match=r"table 'emb_l.0' \(lookup %emb_l_0\): id 1000 outside \[0, 20\)"):
        lowered(dense, offsets, ids)


def test_lowered_or_sharded_models_are_refused():
    case = CASES["dlrm_lists"]
    model, ex = case.make(0)
    lowered = fxrec.lower_for_inference(model, ex, "int8")
    with pytest.raises(ValueError, match=r"holds fxrec's fused tables already \(at 'fxrec_fused.f0.lookup.pooled'\)"):
        fxrec.lower_for_inference(lowered, ex, "int4")
    sharded = fxrec.shard(model, fxrec.Topology(world_size=1), ex)
    with pytest.raises(ValueError, match=r"takes the unsharded model: .*full_state_dict"):
        fxrec.lower_for_inference(sharded, ex, "int8")


def test_meta_tables_cannot_be_lowered():
    with torch.device("meta"):
        bag = _OneBag(100, 8)
    with pytest.raises(ValueError, match=r"table\(s\) \['bag'\] are on the meta device: there are no values"):
        fxrec.lower_for_inference(bag, (torch.tensor([1, 2]), torch.tensor([0, 1])), "int8")


def test_dump_shows_the_inference_graph(tmp_path):
    from fxrec.commands.dump import build_dump

    model, ex = CASES["dlrm_lists"].make(0)
    text = build_dump(model, ex, weight_dtype="int4")
    assert "quant_pooled_forward=fbgemm" in text  # int4 on the CPU: fbgemm's op beats torch's
    assert "emb_l.0:int4" in text


def test_one_rank_ebc_output_is_not_copied():
    """The fused lookup's B x sum(dims) output already has the KeyedTensor's layout: the
    EBC's result is that tensor, not a concatenation of its column blocks."""
    from fxrec.passes.shard_ops import _cat_columns

    base = torch.randn(4, 10)
    assert _cat_columns([base[:, 0:3], base[:, 3:7], base[:, 7:10]]) is base
    for parts in ([base[:, 0:3], base[:, 7:10]], [base[:, 3:7], base[:, 0:3], base[:, 7:10]],
                  [base[:2, 0:3], base[:2, 3:10]], [torch.randn(4, 3), torch.randn(4, 7)]):
        out = _cat_columns(parts)
        assert out is not base and torch.equal(out, torch.cat(parts, dim=1))


def test_bounds_check_switch_reaches_the_input_check():
    from fxrec.passes.shard_ops import GatherInputs

    model, ex = CASES["dlrm_ebc"].make(0)
    for check in (True, False):
        lowered = fxrec.lower_for_inference(model, ex, "int8", bounds_check=check)
        gathers = [m for m in lowered.modules() if isinstance(m, GatherInputs)]
        quant = [m for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)]
        assert gathers and all(g.check is check for g in gathers)
        assert not any(m.bounds_check for m in quant)  # checked once, by the unit's input check


def test_quantize_in_chunks_equals_at_once(monkeypatch):
    """quantize_rows works a chunk of rows at a time (no float copy of a large table): the
    bytes, and the row an error names, are those of one pass."""
    from fxrec.lowering import quant

    w = torch.randn(37, 16, generator=torch.Generator().manual_seed(6))
    kinds = [(q, f) for q in TYPES for f in ("front", "back")]
    whole = {(q, f): quantize_rows(w, QUANT_TYPES[q], qparams=f) for q, f in kinds}
    monkeypatch.setattr(quant, "_CHUNK_ROWS", 8)
    for q, f in kinds:
        assert torch.equal(quantize_rows(w, QUANT_TYPES[q], qparams=f), whole[(q, f)]), (q, f)
    w[29, 3] = float("inf")
    with pytest.raises(ValueError, match=r"table 'x': row 29 holds a non-finite value \(inf\)"):
        quantize_rows(w, QUANT_TYPES["int8"], table="x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ["int8", "int4", "fp16"])
@pytest.mark.parametrize("name", ["dlrm_lists", "dlrm_ebc", "two_tower", "sequence_ec"])
def test_gpu_lowered_model_equals_model_with_decoded_tables(name, qtype):
    """On a GPU the lookups run on fxrec's Triton kernels, in FBGEMM's row format."""
    case = CASES[name]
    model, ex = case.make(0)
    model = model.cuda()
    ex = _to_cuda(ex)
    lowered = fxrec.lower_for_inference(model, ex, _types_for(model, ex, qtype))
    quant = [m for m in lowered.modules() if isinstance(m, QuantizedEmbeddingBags)]
    assert quant and {m.kernel for m in quant} == {"triton"} and {m.layout.qparams for m in quant} == {"front"}
    ref = _decoded_model(model, lowered)
    with torch.no_grad():
        x = _to_cuda(case.inputs(1))
        for a, b in zip(_flat(lowered(*x)), _flat(ref(*x))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _to_cuda(x):
    """A batch (tensors, lists, tuples, dicts, sparse types) moved to the GPU."""
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cuda(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cuda(v) for k, v in x.items()}
    return x.to("cuda") if hasattr(x, "to") else x


@pytest.mark.parametrize("types", [("fp32", "fp16", "int8"), ("fp16", "int4", "fp32")])
def test_torch_kernel_reads_padded_rows(types):
    """FBGEMM's GPU layout pads each row to 16 bytes: the torch kernel (the fallback there)
    reads only a row's own values, pooled and unpooled."""
    from fxrec.lowering.torch_ref import quant_pooled_forward, quant_unpooled_forward

    g = torch.Generator().manual_seed(8)
    dims = (6, 10, 4)  # fp32 x 6 = 24 bytes, fp16 x 10 = 20 bytes: both padded to 32
    for pooling in ("sum", "none"):
        ds = dims if pooling == "sum" else (8, 8, 8)
        tables = [TableInfo(name=f"p{i}", num_embeddings=7 + i, embedding_dim=d, pooling=pooling)
                  for i, d in enumerate(ds)]
        lay = QuantLayout(tables, list(types), row_alignment=16)
        buf = torch.zeros(lay.numel, dtype=torch.uint8)
        values = {}
        for t, part, q, nbytes in zip(tables, lay.split(buf), lay.types, lay.row_bytes):
            w = torch.randn(t.num_embeddings, t.embedding_dim, generator=g)
            quantize_rows(w, q, nbytes, t.name, out=part)
            values[t.name] = dequantize_rows(part, q, t.embedding_dim)
        indices, offsets = _batch(g, tables, 4, torch.int64)
        if pooling == "sum":
            got = quant_pooled_forward(buf, lay, indices, offsets)
            torch.testing.assert_close(got, _ref_pooled(tables, values, indices, offsets, None, 4),
                                       rtol=1e-5, atol=1e-5)
        else:
            got = quant_unpooled_forward(buf, lay, indices, offsets)
            bounds = offsets[::4].tolist()
            want = torch.cat([values[t.name][indices[s:e]].reshape(-1) for t, s, e in zip(tables, bounds, bounds[1:])])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fusing_for_quantization_makes_no_float_copy():
    """With a weight_dtype, fuse_lookups builds its fused modules on meta and keeps the user's
    tables for quantize_tables: no float copy of a table exists on the way."""
    from fxrec.capture import capture
    from fxrec.passes.runner import PassContext, run_passes
    from fxrec.runtime.local_lookup import LocalLookup

    model, ex = CASES["dlrm_lists"].make(0)
    ctx = PassContext(example_inputs=ex, options={"inference": True, "weight_dtype": "int8"})
    gm = run_passes(capture(model, ex), ctx, until="fuse_lookups")
    lookups = [m for m in gm.modules() if isinstance(m, LocalLookup)]
    assert lookups and all(f.weights.is_meta for m in lookups for f in m.fused_modules())
    source = lookups[0].source_weights
    assert all(source[f"emb_l.{i}"] is model.emb_l[i].weight for i in range(3))  # the user's own tensors


class _NeedsExport(nn.Module):
    """fx cannot trace `int(offsets.shape[0])`: torch.export captures it, which fixes `scale`."""

    def __init__(self):
        super().__init__()
        self.e, self.lin = nn.EmbeddingBag(50, 4, mode="sum"), nn.Linear(4, 1)

    def forward(self, ids, offsets, scale: float = 1.0):
        y = self.e(ids, offsets) + torch.zeros(int(offsets.shape[0]), 1)
        return self.lin(y) * scale


@pytest.mark.filterwarnings("ignore")
def test_an_exported_capture_names_the_arguments_it_fixed():
    model = _NeedsExport().eval()
    ids, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2])
    lowered = fxrec.lower_for_inference(model, (ids, offsets), weight_dtype="int8")
    assert lowered.meta[L.CAPTURED_BY] == "export"
    with torch.no_grad():
        torch.testing.assert_close(lowered(ids, offsets), model(ids, offsets))
        for kwargs, args in (({}, (3.0,)), ({"scale": 3.0}, ())):
            with pytest.raises(TypeError, match=r"captured by torch.export .* with its 2 example input\(s\), which "
                                                r"fixes the other arguments at their values then \(scale=1.0\)"):
                lowered(ids, offsets, *args, **kwargs)
