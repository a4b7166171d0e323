"""EmbeddingBagCollection / EmbeddingCollection against torch.nn, bag by bag."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxrec import sparse
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.sparse import KeyedJaggedTensor, KeyedTensor


def random_kjt(rows: dict[str, int], batch: int, weighted=False, max_len=4, extra=()):
    """Random ids below each feature's row count; bag sizes 0..max_len; ``extra`` keys
    are features no table reads."""
    keys = list(rows) + list(extra)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,))
    per_key = lengths.view(len(keys), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, rows.get(k, 100), (n,)) for k, n in zip(keys, per_key)])
    weights = torch.rand(values.numel()) if weighted else None
    return KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights)


def reference_pool(weight: torch.Tensor, pooling: str, ids: torch.Tensor, w) -> torch.Tensor:
    """One bag, computed by torch.nn independently of the module under test."""
    dim = weight.size(1)
    if ids.numel() == 0:
        return torch.zeros(dim, dtype=weight.dtype)
    if w is None:
        ref = nn.EmbeddingBag.from_pretrained(weight, mode=pooling)
        return ref(ids.unsqueeze(0))[0]
    if pooling == "sum":
        ref = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
        return ref(ids.unsqueeze(0), per_sample_weights=w.to(weight.dtype).unsqueeze(0))[0]
    rows = nn.Embedding.from_pretrained(weight)(ids).float()
    return ((w.unsqueeze(1) * rows).sum(0) / ids.numel()).to(weight.dtype)  # documented weighted mean


def reference_ebc(ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    out = {}
    for cfg in ebc.embedding_bag_configs():
        weight = ebc.embedding_bags[cfg.name].weight.detach().clone()
        for f in cfg.feature_names:
            jt = kjt[f]
            w_bags = jt.to_dense_weights() or [None] * jt.lengths().numel()
            out[f] = torch.stack([reference_pool(weight, cfg.pooling, ids, w)
                                  for ids, w in zip(jt.to_dense(), w_bags)])
    return out


TOL = {torch.float32: {}, torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("pooling,weighted,dtype,batch", [
    ("sum", False, torch.float32, 4),
    ("mean", False, torch.float32, 4),
    ("sum", True, torch.float32, 3),
    ("mean", True, torch.float32, 3),
    ("sum", False, torch.float32, 1),
    ("mean", True, torch.float32, 1),
    ("sum", True, torch.float16, 4),
    ("mean", False, torch.bfloat16, 4),
])
def test_ebc_matches_nn_embedding_bag(pooling, weighted, dtype, batch):
    tables = [EmbeddingBagConfig("t_user", 20, 8, ["user", "friend"], pooling=pooling, dtype=dtype),
              EmbeddingBagConfig("t_item", 30, 4, ["item"], pooling=pooling, dtype=dtype)]
    ebc = EmbeddingBagCollection(tables)
    kjt = random_kjt({"user": 20, "friend": 20, "item": 30}, batch, weighted, extra=["unused"])
    kt = ebc(kjt)
    assert isinstance(kt, KeyedTensor)
    assert kt.keys() == ["user", "friend", "item"] and kt.length_per_key() == [8, 8, 4]
    # as TorchRec's: half-precision tables give float32 values
    assert kt.values().shape == (batch, 20) and kt.values().dtype == torch.float32
    ref = reference_ebc(ebc, kjt)
    for f, got in kt.to_dict().items():
        torch.testing.assert_close(got, ref[f].float(), **TOL[dtype])


def test_shared_table_gives_separate_outputs_and_empty_bags_are_zero():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 3, ["a", "b"], pooling="mean")])
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3, 7]), lengths=torch.tensor([0, 3, 1, 0]))
    out = ebc(kjt).to_dict()
    w = ebc.embedding_bags["t"].weight.detach()
    torch.testing.assert_close(out["a"], torch.stack([torch.zeros(3), w[[1, 2, 3]].mean(0)]))
    torch.testing.assert_close(out["b"], torch.stack([w[7], torch.zeros(3)]))


def test_ebc_gradients_match_reference():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 15, 4, ["a", "b"], pooling="mean")])
    ref = nn.EmbeddingBag.from_pretrained(ebc.embedding_bags["t"].weight.detach().clone(), freeze=False,
                                          mode="mean")
    kjt = random_kjt({"a": 15, "b": 15}, 3)
    upstream = torch.randn(3, 8)
    (ebc(kjt).values() * upstream).sum().backward()
    loss = 0
    for j, f in enumerate(["a", "b"]):
        jt = kjt[f]
        pooled = ref(jt.values(), jt.offsets()[:-1])
        loss = loss + (pooled * upstream[:, 4 * j:4 * j + 4]).sum()
    loss.backward()
    torch.testing.assert_close(ebc.embedding_bags["t"].weight.grad, ref.weight.grad)


def test_state_dict_keys_and_load():
    tables = [EmbeddingBagConfig("t1", 5, 2, ["a"]), EmbeddingBagConfig("t2", 6, 3, ["b", "c"])]
    ebc = EmbeddingBagCollection(tables)
    assert list(ebc.state_dict()) == ["embedding_bags.t1.weight", "embedding_bags.t2.weight"]
    other = EmbeddingBagCollection(tables)
    other.load_state_dict(ebc.state_dict())
    kjt = random_kjt({"a": 5, "b": 6, "c": 6}, 2)
    torch.testing.assert_close(other(kjt).values(), ebc(kjt).values())
    ec = EmbeddingCollection([EmbeddingConfig("e1", 5, 2, ["a"])])
    assert list(ec.state_dict()) == ["embeddings.e1.weight"]


def test_meta_device_allocates_nothing_then_materialises():
    tables = [EmbeddingBagConfig("huge", 10**10, 128, ["a"]), EmbeddingBagConfig("small", 7, 2, ["b"])]
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    assert all(p.is_meta for p in ebc.parameters())
    assert ebc.embedding_bags["huge"].weight.shape == (10**10, 128)
    ec = EmbeddingCollection([EmbeddingConfig("huge", 10**10, 64, ["a"])], device="meta")
    assert ec.embeddings["huge"].weight.is_meta
    small = EmbeddingBagCollection([EmbeddingBagConfig("small", 7, 2, ["b"])], device="meta")
    small.to_empty(device="cpu")
    small.reset_parameters()
    w = small.embedding_bags["small"].weight
    assert not w.is_meta and w.abs().max() <= math.sqrt(1 / 7)


def test_default_init_is_bounded_and_seeded():
    cfg = [EmbeddingBagConfig("t", 40, 6, ["a"])]
    torch.manual_seed(3)
    a = EmbeddingBagCollection(cfg).embedding_bags["t"].weight
    torch.manual_seed(3)
    b = EmbeddingBagCollection(cfg).embedding_bags["t"].weight
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= math.sqrt(1 / 40) and a.std() > 0.05


def test_weight_init_callable_and_reset_parameters():
    calls = []

    def init(weight):
        calls.append(torch.is_grad_enabled())
        weight.fill_(0.5)

    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 4, 2, ["a"], weight_init=init)])
    assert calls == [False]  # ran under no_grad
    torch.testing.assert_close(ebc.embedding_bags["t"].weight, torch.full((4, 2), 0.5), check_dtype=False)
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.zero_()
    ebc.reset_parameters()
    assert calls == [False, False] and bool((ebc.embedding_bags["t"].weight == 0.5).all())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad_id,value", [(10, "10"), (-1, "-1"), (250, "250")])
def test_ebc_id_out_of_range(bad_id, value):
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_small", 10, 2, ["a", "b"])])
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, bad_id]), lengths=torch.tensor([1, 0, 1, 1]))
    match = rf"feature 'b' \(table 't_small', num_embeddings=10\) has id {value}, outside \[0, 10\)"
    with pytest.raises(ValueError, match=match):
        ebc(kjt)
    ec = EmbeddingCollection([EmbeddingConfig("t_small", 10, 2, ["a", "b"])])
    with pytest.raises(ValueError, match=match):
        ec(kjt)


def test_id_check_follows_validation_switch():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2, ["a"])])
    kjt = KeyedJaggedTensor(["a"], torch.tensor([3, 12]), lengths=torch.tensor([2]))
    with sparse.validation(False):  # our check is skipped; torch's own bounds check still fires
        with pytest.raises((IndexError, RuntimeError)) as info:
            ebc(kjt)
        assert "feature 'a'" not in str(info.value)


def test_missing_feature_and_float_ids():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2, ["a", "needed"])])
    kjt = KeyedJaggedTensor(["a", "other"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(KeyError, match=r"feature 'needed' \(table 't'\) is missing from the input; it has keys"):
        ebc(kjt)
    ec = EmbeddingCollection([EmbeddingConfig("t", 10, 2, ["needed"])])
    with pytest.raises(KeyError, match="feature 'needed'"):
        ec(kjt)
    floats = KeyedJaggedTensor(["a", "needed"], torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"feature 'a' \(table 't'\) has ids of dtype torch.float32"):
        ebc(floats)


@pytest.mark.parametrize("make,match", [
    (lambda: EmbeddingBagConfig("t", 10, 2, ["a"], pooling="max"), r"pooling must be one of \('sum', 'mean'\)"),
    (lambda: EmbeddingBagConfig("t", 0, 2, ["a"]), "'t': num_embeddings must be a positive int, got 0"),
    (lambda: EmbeddingConfig("t", 10, -3, ["a"]), "'t': embedding_dim must be a positive int, got -3"),
    (lambda: EmbeddingBagConfig("t", 10, 2, "a"), "feature_names must be a list of names"),
    # a set's order follows PYTHONHASHSEED: the output columns would differ between ranks and runs
    (lambda: EmbeddingBagConfig("t", 10, 2, {"user_id", "item_id"}),
     r"table 't': feature_names must be a list or tuple, got set \{'"),
    (lambda: EmbeddingConfig("t", 10, 2, frozenset({"a"})),
     r"table 't': feature_names must be a list or tuple, got frozenset"),
    (lambda: EmbeddingBagConfig("t", 10, 2, ["a", "a"]), "feature_names repeat a name"),
    (lambda: EmbeddingBagConfig("t", 10, 2, ["a"], dtype=torch.int64), "dtype must be a floating"),
    (lambda: EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2, ["a"]), EmbeddingBagConfig("t", 5, 2, ["b"])]),
     "two tables are named 't'"),
    (lambda: EmbeddingBagCollection([EmbeddingBagConfig("t1", 10, 2, ["a"]),
                                     EmbeddingBagConfig("t2", 5, 2, ["a", "a@t1"])]),
     "tables 't1' and 't2' both give an output named 'a@t1'"),
])
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: EmbeddingBagConfig("to", 10, 2, ["a"]), "table 'to': a table name may not contain '.' nor be an attribute"),
    (lambda: EmbeddingConfig("a.b", 10, 2, ["a"]), "table 'a.b': a table name may not contain '.'"),
    (lambda: EmbeddingBagConfig("t", 10, 2, ["a"], dtype="floatx"), "table 't': unknown dtype 'floatx'"),
    (lambda: EmbeddingBagConfig("t", 10.5, 2, ["a"]), "'t': num_embeddings must be a positive int, got 10.5"),
])
def test_config_errors_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_counts_take_numpy_integers():
    np = pytest.importorskip("numpy")
    cfg = EmbeddingBagConfig("t", np.int64(10), torch.tensor(4), ["a"])
    assert (cfg.num_embeddings, cfg.embedding_dim) == (10, 4) and type(cfg.num_embeddings) is int


def test_collection_refuses_the_other_config_type():
    with pytest.raises(TypeError, match="EmbeddingCollection: tables must be fxrec.EmbeddingConfigs, got fxrec.EmbeddingBagConfig 't'"):
        EmbeddingCollection([EmbeddingBagConfig("t", 10, 2, ["a"], pooling="mean")])
    with pytest.raises(TypeError, match="EmbeddingBagCollection: tables must be fxrec.EmbeddingBagConfigs, got fxrec.EmbeddingConfig 't'"):
        EmbeddingBagCollection([EmbeddingConfig("t", 10, 2, ["a"])])


def test_collection_forward_input_errors():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2, ["a"])])
    with pytest.raises(TypeError, match="EmbeddingBagCollection.forward takes a fxrec.KeyedJaggedTensor, got torch.Tensor"):
        ebc(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="EmbeddingCollection.forward takes a fxrec.KeyedJaggedTensor, got dict"):
        EmbeddingCollection([EmbeddingConfig("t", 10, 2, ["a"])])({"a": torch.tensor([1])})
    kjt = KeyedJaggedTensor(["a"], torch.tensor([[1, 2], [3, 4]]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"feature 'a' \(table 't'\) has ids of shape \(2, 2\)"):
        ebc(kjt)


def test_config_feature_names_in_given_order():
    assert EmbeddingBagConfig("t", 10, 2, ("b", "a")).feature_names == ["b", "a"]
    assert EmbeddingConfig("t", 10, 2, {"b": 0, "a": 1}.keys()).feature_names == ["b", "a"]


# ------------------------------------------------------------------ EmbeddingCollection
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (4, torch.float32), (3, torch.float16)])
def test_ec_matches_nn_embedding(batch, dtype):
    ec = EmbeddingCollection([EmbeddingConfig("t1", 12, 3, ["a", "b"], dtype=dtype),
                              EmbeddingConfig("t2", 8, 5, ["c"], dtype=dtype)])
    kjt = random_kjt({"a": 12, "b": 12, "c": 8}, batch, extra=["z"])
    out = ec(kjt)
    assert list(out) == ["a", "b", "c"]
    for cfg in ec.embedding_configs():
        ref = nn.Embedding.from_pretrained(ec.embeddings[cfg.name].weight.detach().clone())
        for f in cfg.feature_names:
            torch.testing.assert_close(out[f].lengths(), kjt[f].lengths())
            for got, ids in zip(out[f].to_dense(), kjt[f].to_dense()):
                torch.testing.assert_close(got, ref(ids).float())  # float32, as TorchRec's


# ------------------------------------------------------------------ tracing
class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t1", 20, 4, ["a", "b"], pooling="mean"),
                                           EmbeddingBagConfig("t2", 10, 2, ["c"])])
        self.top = nn.Linear(10, 1)

    def forward(self, kjt: KeyedJaggedTensor):
        kt = self.ebc(kjt)
        return self.top(torch.cat([kt["c"], kt.values()[:, :8]], dim=1))


@pytest.mark.parametrize("weighted", [False, True])
def test_fx_symbolic_trace_model_with_ebc(weighted):
    model = TinyModel()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    (kjt_node,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lookups = [n.args[1] for n in kjt_node.users if n.op == "call_function"]  # kjt["a"] ...
    assert lookups == ["a", "b", "c"]
    assert any(n.op == "call_module" and n.target == "ebc.embedding_bags.t2" for n in gm.graph.nodes)
    for _ in range(2):
        kjt = random_kjt({"a": 20, "b": 20, "c": 10}, 3, weighted)
        torch.testing.assert_close(gm(kjt), model(kjt))


def test_export_and_compile_ebc():
    model = TinyModel()
    example = KeyedJaggedTensor(["a", "b", "c"], torch.tensor([1, 2, 3, 4, 5, 6]),
                                lengths=torch.tensor([2, 0, 1, 1, 0, 2]), weights=torch.rand(6))
    n = torch.export.Dim("num_values")
    exported = torch.export.export(model, (example,), dynamic_shapes={"kjt": [{0: n}, None, {0: n}]})
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        kjt = random_kjt({"a": 20, "b": 20, "c": 10}, 2, weighted=True)
        torch.testing.assert_close(exported.module()(kjt), model(kjt))
        torch.testing.assert_close(compiled(kjt), model(kjt))


def test_another_librarys_types_of_the_same_name_are_told_apart():
    """TorchRec's KeyedJaggedTensor or config handed to fxrec's modules: the message names both
    types in full, not 'takes a KeyedJaggedTensor, got KeyedJaggedTensor'."""
    def foreign(name: str):
        return type(name, (), {"__module__": f"torchrec.sparse.{name.lower()}", "name": "t"})()

    with pytest.raises(TypeError, match=r"takes a fxrec.KeyedJaggedTensor, got torchrec.sparse.keyedjaggedtensor."
                                        r"KeyedJaggedTensor \(fxrec's modules take fxrec.KeyedJaggedTensor"):
        EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2, ["a"])])(foreign("KeyedJaggedTensor"))
    with pytest.raises(TypeError, match=r"tables must be fxrec.EmbeddingBagConfigs, got torchrec.sparse."
                                        r"embeddingbagconfig.EmbeddingBagConfig 't' \(fxrec's modules take"):
        EmbeddingBagCollection([foreign("EmbeddingBagConfig")])


def test_a_table_without_feature_names_reads_its_own_name():
    """As TorchRec's configs: no feature_names means the feature named as the table."""
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 2)])
    assert ebc.embedding_bag_configs()[0].feature_names == ["t"]
    out = ebc(KeyedJaggedTensor(["t"], torch.tensor([1, 2]), lengths=torch.tensor([2])))
    assert out.keys() == ["t"] and out.values().shape == (1, 2)
    assert EmbeddingConfig("e", 10, 2).feature_names == ["e"]


class _DataType:  # stands in for torchrec.types.DataType (an Enum whose values are these names)
    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("config", [EmbeddingBagConfig, EmbeddingConfig])
def test_torchrecs_config_fields_are_taken(config):
    """data_type, init_fn and weight_init_min / max, as TorchRec's configs spell them."""
    assert config(name="t", num_embeddings=10, embedding_dim=2, data_type=_DataType("FP16")).dtype == torch.float16
    assert config(name="t", num_embeddings=10, embedding_dim=2, data_type="bf16").dtype == torch.bfloat16
    seen = []
    cfg = config(name="t", num_embeddings=10, embedding_dim=2, init_fn=lambda w: (seen.append(1), w.fill_(0.25)))
    collection = EmbeddingBagCollection([cfg]) if config is EmbeddingBagConfig else EmbeddingCollection([cfg])
    assert seen and all(bool((p == 0.25).all()) for p in collection.parameters())
    cfg = config(name="t", num_embeddings=1000, embedding_dim=4, weight_init_min=0.5, weight_init_max=0.75)
    collection = EmbeddingBagCollection([cfg]) if config is EmbeddingBagConfig else EmbeddingCollection([cfg])
    w = next(collection.parameters()).detach()
    assert 0.5 <= float(w.min()) and float(w.max()) <= 0.75 and float(w.max()) > 0.7
    assert (cfg.data_type, cfg.init_fn, cfg.weight_init_min, cfg.weight_init_max) == (None, None, None, None)


@pytest.mark.parametrize("fields, match", [
    ({"data_type": "INT8"}, r"table 't': data_type 'INT8' is not a float type fxrec trains \(FP32, FP16, BF16\); "
                            r"quantized types are served by fxrec.lower_for_inference"),
    ({"data_type": "FP16", "dtype": torch.bfloat16}, "table 't': data_type FP16 and dtype torch.bfloat16 disagree"),
    ({"init_fn": torch.nn.init.zeros_, "weight_init": torch.nn.init.ones_},
     "table 't': weight_init and init_fn both set the initial weights"),
    ({"init_fn": torch.nn.init.zeros_, "weight_init_max": 0.1},
     "table 't': init_fn and weight_init_min/max both set the initial weights"),
    ({"weight_init_min": 0.5, "weight_init_max": 0.1}, "table 't': weight_init_min 0.5 is above weight_init_max 0.1"),
])
def test_torchrecs_config_fields_that_clash_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=2, **fields)


@pytest.mark.parametrize("config", [EmbeddingBagConfig, EmbeddingConfig])
def test_torchrecs_positional_order_is_taken(config):
    """TorchRec's configs open with (num_embeddings, embedding_dim, name, data_type,
    feature_names, weight_init_max, weight_init_min); a call starting with an int is read so."""
    fxrec_order = config("t", 100, 16, ["a"])
    assert config(100, 16, "t", None, ["a"]) == fxrec_order
    assert config(100, 16, "t", feature_names=["a"]) == fxrec_order
    assert config(torch.tensor(100), 16, name="t", feature_names=["a"]) == fxrec_order  # integer-like, as elsewhere
    half = config(100, 16, "t", "FP16", ["a"], 0.5, 0.25)
    assert (half.name, half.num_embeddings, half.embedding_dim, half.dtype) == ("t", 100, 16, torch.float16)
    w = torch.empty(100, 16)
    half.weight_init(w)
    assert 0.25 <= float(w.min()) and float(w.max()) <= 0.5
    if config is EmbeddingBagConfig:
        assert config(100, 16, "t", pooling="mean").pooling == "mean"


@pytest.mark.parametrize("call, match", [
    (lambda: EmbeddingBagConfig(100, 16, "t", name="u"), r"'name' given by position \(TorchRec's order"),
    (lambda: EmbeddingConfig(100, 16, "t", None, ["a"], 0.5, 0.25, 90), r"only num_embeddings, .* by position"),
    (lambda: EmbeddingBagConfig(100, 16), r"missing 1 required positional argument: 'name'"),
])
def test_torchrecs_positional_order_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()
