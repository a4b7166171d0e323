"""JaggedTensor / KeyedJaggedTensor / KeyedTensor: layout, round trips, validation, tracing."""
from __future__ import annotations

import re

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

from fxrec import sparse
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor


def random_kjt(keys, batch, weighted=False, max_len=4, rows=50, dtype=torch.int64):
    """A KJT with random bag sizes (empty bags included) plus the per-key bags it holds."""
    bags = {k: [torch.randint(0, rows, (int(torch.randint(0, max_len + 1, ())),), dtype=dtype)
                for _ in range(batch)] for k in keys}
    bag_w = {k: [torch.rand(len(b)) for b in bags[k]] for k in keys}
    values = torch.cat([b for k in keys for b in bags[k]] + [torch.empty(0, dtype=dtype)])
    lengths = torch.tensor([len(b) for k in keys for b in bags[k]], dtype=torch.int64)
    weights = torch.cat([w for k in keys for w in bag_w[k]] + [torch.empty(0)]) if weighted else None
    kjt = KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=batch)
    return kjt, bags, (bag_w if weighted else None)


def assert_kjt_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor):
    assert a.keys() == b.keys() and a.stride() == b.stride()
    torch.testing.assert_close(a.values(), b.values())
    torch.testing.assert_close(a.lengths(), b.lengths())
    torch.testing.assert_close(a.offsets(), b.offsets())
    assert (a.weights_or_none() is None) == (b.weights_or_none() is None)
    if a.weights_or_none() is not None:
        torch.testing.assert_close(a.weights(), b.weights())


# ------------------------------------------------------------------ JaggedTensor
@pytest.mark.parametrize("given", ["lengths", "offsets"])
def test_jt_lengths_offsets_consistent(given):
    lengths = torch.tensor([2, 0, 3, 1])
    offsets = torch.tensor([0, 2, 2, 5, 6])
    values = torch.randn(6)
    jt = JaggedTensor(values, **({"lengths": lengths} if given == "lengths" else {"offsets": offsets}))
    torch.testing.assert_close(jt.lengths(), lengths)
    torch.testing.assert_close(jt.offsets(), offsets)
    dense = jt.to_dense()
    assert [len(d) for d in dense] == [2, 0, 3, 1]
    torch.testing.assert_close(torch.cat(dense), values)


@pytest.mark.parametrize("desired_length,trailing", [(None, ()), (2, ()), (5, ()), (None, (3,))])
def test_jt_to_padded_dense_matches_loop(desired_length, trailing):
    lengths = torch.tensor([3, 0, 1, 4])
    values = torch.randn(int(lengths.sum()), *trailing)
    jt = JaggedTensor(values, lengths=lengths)
    out = jt.to_padded_dense(desired_length, padding_value=-7.0)
    width = desired_length if desired_length is not None else 4
    expected = torch.full((4, width, *trailing), -7.0)
    for i, bag in enumerate(jt.to_dense()):
        n = min(len(bag), width)
        expected[i, :n] = bag[:n]
    torch.testing.assert_close(out, expected)


def test_jt_from_dense_round_trip_with_weights():
    bags = [torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([5])]
    weights = [torch.rand(2), torch.rand(0), torch.rand(1)]
    jt = JaggedTensor.from_dense(bags, weights)
    for got, want in zip(jt.to_dense(), bags):
        torch.testing.assert_close(got, want)
    for got, want in zip(jt.to_dense_weights(), weights):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs,match", [
    ({"values": torch.arange(4), "lengths": torch.tensor([1, 2])}, "lengths sum to 3 but values has 4"),
    ({"values": torch.arange(3), "lengths": torch.tensor([4, -1])}, "bag 1 has negative length -1"),
    ({"values": torch.arange(3), "offsets": torch.tensor([0, 2, 1, 3])}, "bag 1 goes from offset 2 down to 1"),
    ({"values": torch.arange(3), "lengths": torch.tensor([1, 2]), "weights": torch.ones(2)},
     r"one weight per value \(3\)"),
    ({"values": torch.arange(3)}, "give lengths or offsets"),
])
def test_jt_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JaggedTensor(**kwargs)


# ------------------------------------------------------------------ KJT structure
@pytest.mark.parametrize("batch,weighted", [(1, False), (3, False), (4, True)])
def test_kjt_getitem_matches_bags(batch, weighted):
    keys = ["f1", "f2", "f3"]
    kjt, bags, bag_w = random_kjt(keys, batch, weighted)
    assert kjt.stride() == batch
    assert kjt.length_per_key() == [sum(len(b) for b in bags[k]) for k in keys]
    assert kjt.offset_per_key()[-1] == kjt.values().numel()
    for k in keys:
        jt = kjt[k]
        got = jt.to_dense()
        assert len(got) == batch
        for g, want in zip(got, bags[k]):
            torch.testing.assert_close(g, want)
        if weighted:
            for g, want in zip(jt.to_dense_weights(), bag_w[k]):
                torch.testing.assert_close(g, want)
    assert list(kjt.to_dict()) == keys


@pytest.mark.parametrize("values_dtype,lengths_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int32)])
def test_kjt_offsets_lengths_consistent(values_dtype, lengths_dtype):
    kjt, _, _ = random_kjt(["a", "b"], 5, dtype=values_dtype)
    lengths = kjt.lengths().to(lengths_dtype)
    by_lengths = KeyedJaggedTensor(["a", "b"], kjt.values(), lengths=lengths)
    by_offsets = KeyedJaggedTensor(["a", "b"], kjt.values(), offsets=by_lengths.offsets())
    assert by_lengths.offsets().dtype == lengths_dtype
    assert by_offsets.lengths_or_none() is None  # derived lazily ...
    torch.testing.assert_close(by_offsets.lengths(), lengths)  # ... then cached
    assert by_offsets.lengths_or_none() is not None
    torch.testing.assert_close(by_offsets.offsets()[1:], torch.cumsum(lengths, 0).to(lengths_dtype))
    assert by_offsets.stride() == 5 and by_offsets.length_per_key() == by_lengths.length_per_key()


def test_kjt_unknown_key():
    kjt, _, _ = random_kjt(["f1", "f2"], 2)
    with pytest.raises(KeyError, match=r"unknown key 'nope'; known keys: \['f1', 'f2'\]"):
        kjt["nope"]


def test_kjt_zero_keys_stride():
    kjt = KeyedJaggedTensor([], torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int64))
    assert kjt.stride() == 0 and kjt.length_per_key() == [] and kjt.to_dict() == {}
    kjt = KeyedJaggedTensor.empty(is_weighted=True, stride=8)
    assert kjt.stride() == 8 and kjt.weights().numel() == 0
    like = KeyedJaggedTensor.empty_like(random_kjt(["a"], 3, weighted=True)[0])
    assert like.stride() == 3 and like.keys() == [] and like.weights_or_none() is not None


# ------------------------------------------------------------------ KJT round trips
@pytest.mark.parametrize("weighted", [False, True])
def test_kjt_to_dict_from_jt_dict_round_trip(weighted):
    kjt, _, _ = random_kjt(["a", "b", "c"], 4, weighted)
    assert_kjt_equal(KeyedJaggedTensor.from_jt_dict(kjt.to_dict()), kjt)


@pytest.mark.parametrize("segments,weighted", [([1, 2, 1], False), ([0, 4, 0], True), ([2, 2], True)])
def test_kjt_split_concat_round_trip(segments, weighted):
    keys = ["a", "b", "c", "d"]
    kjt, bags, _ = random_kjt(keys, 3, weighted)
    parts = kjt.split(segments)
    assert [p.keys() for p in parts] == [keys[sum(segments[:i]):sum(segments[:i + 1])] for i in range(len(segments))]
    assert all(p.stride() == 3 for p in parts)
    for p in parts:
        for k in p.keys():
            for got, want in zip(p[k].to_dense(), bags[k]):
                torch.testing.assert_close(got, want)
    assert_kjt_equal(KeyedJaggedTensor.concat(parts), kjt)


@pytest.mark.parametrize("perm,weighted", [([2, 0, 1], False), ([1, 2, 0], True), ([0, 1, 2], True)])
def test_kjt_permute(perm, weighted):
    keys = ["a", "b", "c"]
    kjt, bags, bag_w = random_kjt(keys, 4, weighted)
    out = kjt.permute(perm)
    assert out.keys() == [keys[i] for i in perm]
    for k in out.keys():
        for got, want in zip(out[k].to_dense(), bags[k]):
            torch.testing.assert_close(got, want)
        if weighted:
            for got, want in zip(out[k].to_dense_weights(), bag_w[k]):
                torch.testing.assert_close(got, want)
    inverse = sorted(range(3), key=lambda j: perm[j])
    assert_kjt_equal(out.permute(inverse), kjt)
    assert_kjt_equal(kjt.permute(perm).permute(perm).permute(perm), kjt)  # 3-cycles and identity alike


def test_kjt_split_concat_permute_errors():
    kjt, _, _ = random_kjt(["a", "b"], 2, weighted=True)
    with pytest.raises(ValueError, match=r"segments \[1\] must be non-negative and sum to the 2 keys"):
        kjt.split([1])
    with pytest.raises(ValueError, match=r"indices \[5\] out of range for 2 keys"):
        kjt.permute([0, 5])
    with pytest.raises(ValueError, match="key 'a' appears more than once"):
        KeyedJaggedTensor.concat([kjt.split([1, 1])[0], kjt])
    with pytest.raises(ValueError, match=r"strides differ: \[2, 3\]"):
        KeyedJaggedTensor.concat([kjt, random_kjt(["c"], 3)[0]])
    with pytest.raises(ValueError, match="some inputs carry weights and some do not"):
        KeyedJaggedTensor.concat([kjt, random_kjt(["c"], 2)[0]])


# ------------------------------------------------------------------ KJT validation
V = torch.arange(6)
BAD_KJTS = [
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([1, 2, 2, 3])),
     r"lengths sum to 8 but values has 6 entries; key 'b''s bags cover values\[3:8\], past the end"),
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([1, 2, 2, 0])),
     r"lengths sum to 5 but values has 6 entries; the last 1 values after key 'b'"),
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([3, 4, 0, -1])), "key 'b' bag 1 has negative length -1"),
    (dict(keys=["a", "b"], values=V, offsets=torch.tensor([0, 3, 2, 5, 6])),
     "key 'a' bag 1 goes from offset 3 down to 2"),
    (dict(keys=["a", "b"], values=V, offsets=torch.tensor([1, 2, 3, 4, 6])), r"offsets must start at 0, got \[1\]"),
    (dict(keys=["a", "b"], values=V, offsets=torch.tensor([0, 2, 3, 4, 5])), "offsets end at 5 but values has 6"),
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([1, 2, 3])), "3 lengths is not a multiple of the 2 keys"),
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([1, 2, 2, 1]), weights=torch.ones(5)),
     r"one weight per value \(6\), got shape \(5,\)"),
    (dict(keys=["a", "a"], values=V, lengths=torch.tensor([1, 2, 2, 1])), "key 'a' appears more than once"),
    (dict(keys=["a", "b"], values=V, lengths=torch.tensor([1, 2, 2, 1]), stride=4),
     "stride=4 but lengths holds 2 bags per key"),
    (dict(keys=["a"], values=V, lengths=torch.tensor([2.0, 4.0])), "lengths must be a 1-D integer tensor"),
    # no keys, so no bags: every value would be left over
    (dict(keys=[], values=V, lengths=torch.tensor([], dtype=torch.int64)),
     r"lengths sum to 0 but values has 6 entries; the last 6 values \(there are no keys, so no bags\)"),
    (dict(keys=[], values=V, offsets=torch.tensor([0])), "offsets end at 0 but values has 6 entries"),
    (dict(keys=[], values=V[:0], lengths=V[:0], weights=torch.ones(2)), r"one weight per value \(0\), got shape \(2,\)"),
]


# int() truncated a fractional stride (2.7 -> 2), parsed a string and kept a negative one
@pytest.mark.parametrize("stride", [2.7, "2", -2, float("inf")])
def test_kjt_stride_must_be_a_whole_number(stride):
    with pytest.raises(ValueError, match=rf"KeyedJaggedTensor: stride must be a whole number >= 0, got {re.escape(repr(stride))}"):
        KeyedJaggedTensor(["a"], V[:3], lengths=torch.tensor([1, 2]), stride=stride, validate=False)


def test_kjt_stride_takes_whole_numbers_and_empty_checks_it():
    np = pytest.importorskip("numpy")
    for stride in (2, 2.0, np.int64(2), torch.tensor(2)):
        kjt = KeyedJaggedTensor(["a"], V[:3], lengths=torch.tensor([1, 2]), stride=stride)
        assert kjt.stride() == 2 and type(kjt.stride()) is int
    assert KeyedJaggedTensor.empty(stride=3).stride() == 3
    with pytest.raises(ValueError, match="stride must be a whole number >= 0, got -1"):
        KeyedJaggedTensor.empty(stride=-1)


@pytest.mark.parametrize("desired_length", [1.5, "2", -1])
def test_jt_to_padded_dense_length_must_be_a_whole_number(desired_length):
    jt = JaggedTensor(torch.arange(3), lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=rf"to_padded_dense: desired_length must be a whole number >= 0, "
                                         rf"got {re.escape(repr(desired_length))}"):
        jt.to_padded_dense(desired_length)
    assert jt.to_padded_dense(2.0).shape == (2, 2)


@pytest.mark.parametrize("kwargs,match", BAD_KJTS)
def test_kjt_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KeyedJaggedTensor(**kwargs)


@pytest.mark.parametrize("kwargs,match", BAD_KJTS[:3])
def test_kjt_validation_can_be_switched_off(kwargs, match):
    KeyedJaggedTensor(**kwargs, validate=False)
    with sparse.validation(False):
        KeyedJaggedTensor(**kwargs)
    assert sparse.validation_enabled()  # restored on exit
    previous = sparse.set_validation(False)
    try:
        KeyedJaggedTensor(**kwargs)
    finally:
        sparse.set_validation(previous)
    with pytest.raises(ValueError, match=match):
        KeyedJaggedTensor(**kwargs)


def test_kjt_validation_skipped_for_meta_and_fake_tensors():
    kwargs = dict(BAD_KJTS[0][0])
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    assert KeyedJaggedTensor(**meta).stride() == 2
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        assert KeyedJaggedTensor(**fake).keys() == ["a", "b"]


# ------------------------------------------------------------------ devices
def test_kjt_to_pin_record_stream_cpu():
    kjt, _, _ = random_kjt(["a", "b"], 3, weighted=True)
    assert_kjt_equal(kjt.to("cpu"), kjt)
    pinned = kjt.pin_memory()
    if torch.accelerator.is_available():
        assert pinned.values().is_pinned() and pinned.weights().is_pinned()
        assert_kjt_equal(pinned, kjt)
    else:  # CPU-only torch cannot pin; documented to return the same object
        assert pinned is kjt
    kjt.record_stream(None)  # CPU tensors: nothing to record


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kjt_cuda_round_trip():
    kjt, _, _ = random_kjt(["a", "b"], 3, weighted=True)
    dev = kjt.pin_memory().to("cuda", non_blocking=True)
    dev.record_stream(torch.cuda.current_stream())
    assert dev.device().type == "cuda" and dev.lengths().is_cuda and dev.weights().is_cuda
    assert_kjt_equal(dev.to("cpu"), kjt)


# ------------------------------------------------------------------ pytree and tracing
def test_pytree_round_trip_spec_independent_of_cache():
    kjt, _, _ = random_kjt(["a", "b"], 3, weighted=True)
    by_offsets = KeyedJaggedTensor(["a", "b"], kjt.values(), offsets=kjt.offsets(), weights=kjt.weights())
    leaves, spec = pytree.tree_flatten({"x": kjt})
    _, spec2 = pytree.tree_flatten({"x": by_offsets})
    assert spec == spec2 and len(leaves) == 3
    assert_kjt_equal(pytree.tree_unflatten(leaves, spec)["x"], kjt)
    kt = KeyedTensor(["u", "v"], [2, 3], torch.randn(4, 5))
    back = pytree.tree_unflatten(*pytree.tree_flatten(kt))
    assert back.keys() == ["u", "v"] and back.length_per_key() == [2, 3]
    torch.testing.assert_close(back.values(), kt.values())
    paths, _ = pytree.tree_flatten_with_path(kjt)
    assert [pytree.keystr(p) for p, _ in paths] == ["._values", "._lengths", "._weights"]


class PoolTwo(nn.Module):
    """Pools feature "f" with a bag and adds a weighted reduction over the whole KJT."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 4, mode="sum", include_last_offset=True)

    def forward(self, kjt: KeyedJaggedTensor):
        jt = kjt["f"]
        pooled = self.bag(jt.values(), jt.offsets(), per_sample_weights=jt.weights())
        return pooled + kjt.weights().sum() + kjt.lengths().view(2, -1).sum(0, keepdim=True).T


def test_torch_export_matches_eager():
    model = PoolTwo()
    example = KeyedJaggedTensor(["f", "g"], torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 0, 1, 1, 0, 1]),
                                weights=torch.rand(5))
    n = torch.export.Dim("num_values")  # children: values, lengths, weights
    exported = torch.export.export(model, (example,), dynamic_shapes={"kjt": [{0: n}, None, {0: n}]})
    for _ in range(3):  # fresh batches with other bag sizes and value counts
        kjt, _, _ = random_kjt(["f", "g"], 3, weighted=True)
        torch.testing.assert_close(exported.module()(kjt), model(kjt))


def test_torch_compile_eager_backend():
    def fn(kjt):
        return kjt["b"].values().float().sum() * 2 + kjt.lengths().float().mean() + kjt.stride()

    compiled = torch.compile(fn, backend="eager")
    for _ in range(2):
        kjt, _, _ = random_kjt(["a", "b"], 4)
        torch.testing.assert_close(compiled(kjt), fn(kjt))


def test_torch_compile_constructs_kjt_inside():
    def fn(values, lengths):
        kjt = KeyedJaggedTensor(["a", "b"], values, lengths=lengths)  # checks skipped while compiling
        return kjt.offsets() * 2 + kjt.stride()

    compiled = torch.compile(fn, backend="eager")
    kjt, _, _ = random_kjt(["a", "b"], 3)
    torch.testing.assert_close(compiled(kjt.values(), kjt.lengths()), fn(kjt.values(), kjt.lengths()))


def test_fx_symbolic_trace_kjt_argument():
    model = PoolTwo()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["kjt"]
    methods = {n.target for n in gm.graph.nodes if n.op == "call_method"}
    assert {"values", "offsets", "weights", "lengths"} <= methods
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and n.args[0] is placeholders[0]]
    assert [n.args[1] for n in getitems] == ["f"]
    kjt, _, _ = random_kjt(["f", "g"], 3, weighted=True)
    torch.testing.assert_close(gm(kjt), model(kjt))


def test_fx_trace_builds_keyed_tensor_in_graph():
    class ToKT(nn.Module):
        def forward(self, kjt):
            jt = kjt["a"]
            rows = jt.values().float().unsqueeze(1).expand(-1, 2)
            return KeyedTensor(["x", "y"], [2, 2], torch.cat([rows, rows * 2], dim=1))

    gm = torch.fx.symbolic_trace(ToKT())
    assert any(n.target is KeyedTensor for n in gm.graph.nodes)
    kjt, _, _ = random_kjt(["a"], 3)
    out, ref = gm(kjt), ToKT()(kjt)
    assert isinstance(out, KeyedTensor) and out.keys() == ["x", "y"]
    torch.testing.assert_close(out.values(), ref.values())


# ------------------------------------------------------------------ KeyedTensor
@pytest.mark.parametrize("key_dim", [1, 0])
def test_keyed_tensor_to_dict_and_getitem(key_dim):
    lpk = [3, 1, 4]
    values = torch.randn(5, 8) if key_dim == 1 else torch.randn(8, 5)
    kt = KeyedTensor(["a", "b", "c"], lpk, values, key_dim=key_dim)
    assert kt.offset_per_key() == [0, 3, 4, 8]
    d = kt.to_dict()
    assert list(d) == ["a", "b", "c"]
    for (k, t), start, n in zip(d.items(), [0, 3, 4], lpk):
        torch.testing.assert_close(t, values.narrow(key_dim, start, n))
        torch.testing.assert_close(kt[k], t)
    with pytest.raises(KeyError, match=r"unknown key 'z'; known keys: \['a', 'b', 'c'\]"):
        kt["z"]


def test_keyed_tensor_regroup_and_from_tensor_list():
    parts = [torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 2)]
    kt1 = KeyedTensor.from_tensor_list(["a", "b"], parts[:2])
    kt2 = KeyedTensor.from_tensor_list(["c"], parts[2:])
    g1, g2 = KeyedTensor.regroup([kt1, kt2], [["c", "a"], ["b"]])
    torch.testing.assert_close(g1, torch.cat([parts[2], parts[0]], dim=1))
    torch.testing.assert_close(g2, parts[1])
    d = KeyedTensor.regroup_as_dict([kt1, kt2], [["c", "a"], ["b"]], ["ca", "b_only"])
    assert list(d) == ["ca", "b_only"]
    torch.testing.assert_close(d["ca"], g1)
    with pytest.raises(ValueError, match=r"regroup_as_dict: 1 keys \['x'\] for 2 groups"):
        KeyedTensor.regroup_as_dict([kt1, kt2], [["c"], ["b"]], ["x"])
    with pytest.raises(ValueError, match=r"regroup_as_dict: keys \['x', 'x'\] repeat a name"):
        KeyedTensor.regroup_as_dict([kt1, kt2], [["c"], ["b"]], ["x", "x"])


@pytest.mark.parametrize("keys,lpk,match", [
    (["a", "b"], [2, 2], r"values has 5 entries along key_dim=1 but length_per_key \{'a': 2, 'b': 2\} sums to 4"),
    (["a", "a"], [2, 3], "key 'a' appears more than once"),
    (["a"], [2, 3], "1 keys but 2 lengths"),
])
def test_keyed_tensor_validation(keys, lpk, match):
    with pytest.raises(ValueError, match=match):
        KeyedTensor(keys, lpk, torch.randn(3, 5))


# A str iterates as its characters and a set in hash order (another in each process): both
# were read as key lists, silently (keys="f1" became 'f', '1' with half the batch size).
@pytest.mark.parametrize("make,match", [
    (lambda: KeyedJaggedTensor("f1", torch.arange(4), lengths=torch.tensor([1, 1, 2, 0])),
     "KeyedJaggedTensor: keys must be a list of names, got the string 'f1'"),
    (lambda: KeyedJaggedTensor({"a", "b"}, torch.arange(4), lengths=torch.tensor([1, 1, 2, 0])),
     "KeyedJaggedTensor: keys must be a list or tuple, got set"),
    (lambda: KeyedJaggedTensor("f1", torch.arange(4), lengths=torch.tensor([1, 1, 2, 0]), validate=False),
     "keys must be a list of names, got the string 'f1'"),
    (lambda: KeyedTensor("ab", [2, 3], torch.randn(2, 5)), "KeyedTensor: keys must be a list of names, got the string 'ab'"),
    (lambda: KeyedTensor.regroup([KeyedTensor(["a", "b"], [2, 3], torch.randn(2, 5))], ["ab"]),
     r"KeyedTensor.regroup: groups\[0\] must be a list of names, got the string 'ab'"),
    (lambda: KeyedTensor.regroup([KeyedTensor(["a", "b"], [2, 3], torch.randn(2, 5))], [{"a", "b"}]),
     r"KeyedTensor.regroup: groups\[0\] must be a list or tuple, got set"),
])
def test_key_lists_refuse_str_and_set(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_key_lists_take_tuples_and_dict_keys():
    kjt = KeyedJaggedTensor(("a", "b"), torch.arange(3), lengths=torch.tensor([1, 2, 0, 0]))
    assert kjt.keys() == ["a", "b"] and kjt.stride() == 2
    kt = KeyedTensor({"a": 0, "b": 0}.keys(), (2, 3), torch.randn(2, 5))
    assert kt.keys() == ["a", "b"]
    assert KeyedTensor.regroup([kt], [("b",)])[0].shape == (2, 3)


# Type slips that failed with an AttributeError, torch's error or a KeyError naming nothing
@pytest.mark.parametrize("make,error,match", [
    (lambda: KeyedJaggedTensor(["a"], [1, 2], lengths=torch.tensor([2])), TypeError,
     "KeyedJaggedTensor: values must be a torch.Tensor, got list"),
    (lambda: KeyedJaggedTensor(["a"], torch.arange(2), lengths=[1, 1]), TypeError,
     "KeyedJaggedTensor: lengths must be a torch.Tensor, got list"),
    (lambda: JaggedTensor([1, 2], lengths=torch.tensor([2])), TypeError, "JaggedTensor: values must be a torch.Tensor, got list"),
    (lambda: KeyedJaggedTensor.concat(random_kjt(["a"], 2)[0]), TypeError,
     "concat takes a list of KeyedJaggedTensors, got one"),
    (lambda: random_kjt(["a", "b"], 2)[0].split([1.0, 1.0]), TypeError, r"split: segments must be integers, got \[1.0, 1.0\]"),
    (lambda: random_kjt(["a", "b"], 2)[0].permute([1.0, 0.0]), TypeError, r"permute: indices must be integers, got \[1.0, 0.0\]"),
    (lambda: KeyedJaggedTensor.from_jt_dict({"a": torch.arange(2)}), TypeError,
     "from_jt_dict: key 'a' maps to a Tensor, not a JaggedTensor"),
    (lambda: JaggedTensor.from_dense([]), ValueError, "JaggedTensor.from_dense: values is empty"),
    (lambda: KeyedTensor.from_tensor_list([], []), ValueError, "KeyedTensor.from_tensor_list: tensors is empty"),
    (lambda: KeyedTensor.regroup([], [[]]), ValueError,
     r"KeyedTensor.regroup: groups\[0\] is empty and there is no KeyedTensor to take its batch from"),
    (lambda: KeyedTensor(["a"], [2], torch.randn(3, 2), key_dim=5), ValueError,
     r"KeyedTensor: key_dim=5 is not a dimension of values of shape \(3, 2\)"),
])
def test_type_slips_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_permute_takes_a_tensor_of_indices():
    kjt, _, _ = random_kjt(["a", "b"], 2)
    assert_kjt_equal(kjt.permute(torch.tensor([1, 0])), kjt.permute([1, 0]))


# ---------------------------------------------------------------- TorchRec's argument order
def test_positional_arguments_follow_torchrecs_order():
    """TorchRec's positional calls mean the same here: JaggedTensor(values, weights, lengths,
    offsets), KeyedJaggedTensor(keys, values, weights, lengths, offsets, stride),
    KeyedJaggedTensor.empty(is_weighted, device, values_dtype, weights_dtype, lengths_dtype)."""
    values, w, lengths = torch.tensor([10, 11, 12]), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 2, 1, 0])
    kjt = KeyedJaggedTensor(["a", "b"], values, w, lengths)
    assert torch.equal(kjt.weights(), w) and torch.equal(kjt.lengths(), lengths) and kjt.stride() == 2
    by_offsets = KeyedJaggedTensor(["a", "b"], values, None, None, torch.tensor([0, 0, 2, 3, 3]), 2)
    assert torch.equal(by_offsets.lengths(), lengths) and by_offsets.weights_or_none() is None
    jt = JaggedTensor(values, w, torch.tensor([2, 1]))
    assert torch.equal(jt.weights(), w) and jt.to_dense()[1].tolist() == [12]
    assert JaggedTensor(values, None, None, torch.tensor([0, 3])).lengths().tolist() == [3]
    empty = KeyedJaggedTensor.empty(True, None, torch.int32, torch.float64, torch.int32)
    assert (empty.values().dtype, empty.weights().dtype, empty.lengths().dtype) == (torch.int32, torch.float64,
                                                                                    torch.int32)


@pytest.mark.parametrize("make", [
    lambda: KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 0])),
    lambda: JaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([2, 1])),
])
def test_lengths_given_third_say_the_third_argument_is_weights(make):
    """fxrec's old order put lengths third: such a call now reaches the constructor as integer
    weights, without lengths, and says so rather than read them as weights."""
    with pytest.raises(ValueError, match=r"give lengths or offsets; the third positional argument is weights, "
                                         r"as in TorchRec: .*, or pass lengths="):
        make()
    with pytest.raises(TypeError, match=r"weights must be floating point, got torch.int64 \(the third positional"):
        KeyedJaggedTensor(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]), lengths=torch.tensor([2]))


def test_empty_like_keeps_the_weights_dtype():
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]),
                            weights=torch.tensor([1.0, 2.0], dtype=torch.float64))
    like = KeyedJaggedTensor.empty_like(kjt)
    assert like.weights().dtype == torch.float64 and like.stride() == 1


def test_regroup_of_an_empty_group_and_to_dict_compute_offsets():
    """As TorchRec's: an empty group gives batch x 0 columns; to_dict takes compute_offsets."""
    kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.ones(3, 2), torch.zeros(3, 1)])
    empty, ab = KeyedTensor.regroup([kt], [[], ["b", "a"]])
    assert empty.shape == (3, 0) and ab.shape == (3, 3)
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]))
    assert kjt.to_dict(compute_offsets=False)["a"].values().tolist() == [1, 2]


def test_kjt_to_takes_the_weights_dtype():
    """As TorchRec's KeyedJaggedTensor.to: dtype is the weights' (the ids keep theirs)."""
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]), weights=torch.tensor([0.5, 1.0]))
    moved = kjt.to("cpu", dtype=torch.float64)
    assert moved.weights().dtype == torch.float64 and moved.values().dtype == torch.int64
    bare = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]))
    assert bare.to("cpu", dtype=torch.float16).weights_or_none() is None


def test_from_dense_lengths_are_int32_on_the_values_device():
    """As TorchRec's JaggedTensor.from_dense (on a CPU-only machine: the meta device stands in)."""
    jt = JaggedTensor.from_dense([torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64)])
    assert jt.lengths().dtype == torch.int32 and jt.lengths().tolist() == [2, 0]
    meta = JaggedTensor.from_dense([torch.zeros(2, device="meta"), torch.zeros(1, device="meta")])
    assert meta.lengths().device.type == "meta"
