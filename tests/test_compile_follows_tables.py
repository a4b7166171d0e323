"""torch.compile(backend="fxrec") keeps following the model's tables, however they change.

The fused graphs read the tables from fxrec's buffers (float: the parameters become views of
the fused buffer; quantized: a serving copy), not from what dynamo passes. These tests change
the tables in each way a user does and check the compiled model against eager:

- the parameter replaced (``load_state_dict(assign=True)``, a new ``nn.Parameter``) or its
  data swapped (``.data = ...``), float and quantized;
- a fused sparse optimizer writing the buffer (another compile of the same model, quantized,
  must re-quantize);
- an eval graph compiled before the training one: the training graph's recompiles (a new
  batch size) keep its optimizer state;
- a per-table weight_dtype over a forward dynamo splits in two graphs;
- two instances of a model, which dynamo serves one graph: each keeps its own tables and
  its own optimizer state.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import fxrec
from fxrec.lowering import backend as B


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):  # one thread: inference graphs fuse (several: torch serves them unfused)
    torch._dynamo.reset()
    B.compiled.clear()
    yield
    torch._dynamo.reset()


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.lin = nn.EmbeddingBag(50, 4, mode="sum"), nn.Linear(4, 1)

    def forward(self, ids, offsets):
        return self.lin(self.e(ids, offsets))


def _batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (2 * b,), generator=g), torch.arange(0, 2 * b, 2)


def _logs() -> str:
    return "\n".join(line for g in B.compiled for line in g.meta["fxrec_log"])


def _assign(model: nn.Module, reference: nn.Module, how: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(50, 4, generator=g)
    reference.e.weight.data.copy_(new)
    if how == "assign":
        model.load_state_dict({**model.state_dict(), "e.weight": new}, assign=True)
    elif how == "parameter":
        model.e.weight = nn.Parameter(new)
    else:
        model.e.weight.data = new


@pytest.mark.parametrize("how", ["assign", "parameter", "data"])
@pytest.mark.parametrize("options", [{}, {"weight_dtype": "fp32"}], ids=["float", "quantized"])
def test_a_replaced_table_is_served(how, options):
    torch.manual_seed(0)
    model = _Bag().eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options=options)
    x = _batch(4, 1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), reference(*x))
        for seed in (2, 3):  # twice: the second replacement of an already re-bound table
            _assign(model, reference, how, seed)
            torch.testing.assert_close(compiled(*x), reference(*x))
    assert "serves groups" in _logs()


def test_a_table_replaced_by_one_of_another_shape_is_served():
    """dynamo's guards see the new shape and recompile: the new graph fuses the new table."""
    model = _Bag().eval()
    compiled = torch.compile(model, backend="fxrec")
    x = _batch(4, 1)
    with torch.no_grad():
        compiled(*x)
        model.e.weight = nn.Parameter(torch.randn(60, 4))
        x = (x[0] + 10, x[1])  # ids up to 59
        torch.testing.assert_close(compiled(*x), model(*x))
    assert _logs().count("tables ['e'] now live in its fused buffer") == 2


def test_quantized_serving_follows_fused_training():
    """One compile trains the tables with a fused optimizer (which writes the fused buffer,
    not the parameters); another serves them quantized: it re-quantizes after the steps."""
    torch.manual_seed(0)
    model = _Bag()
    train = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.5)})
    serve = torch.compile(model, backend="fxrec", options={"weight_dtype": "fp32"})
    x = _batch(3, 1)
    with torch.no_grad():
        serve(*x)
    before = model.e.weight.detach().clone()
    for _ in range(3):
        train(*x).square().sum().backward()
    assert not torch.equal(model.e.weight.detach(), before)
    with torch.no_grad():
        torch.testing.assert_close(serve(*x), model(*x))


def test_an_eval_graph_first_does_not_reset_the_training_state():
    """A validation call under no_grad compiles first and owns the fused buffer; the training
    graph shares it with its own RowWiseAdagrad state, which its recompile for a new batch
    size keeps, so four steps equal eager RowWiseAdagrad."""
    torch.manual_seed(0)
    lr, eps = 0.1, 1e-8
    model = _Bag()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec",
                             options={"sparse_optimizer": fxrec.optim.RowWiseAdagrad(lr=lr, eps=eps)})
    with torch.no_grad():
        compiled(*_batch(8, 0))
    acc = torch.zeros(50)
    for step, b in enumerate([8, 8, 16, 16]):
        x = _batch(b, 10 + step)
        compiled(*x).square().mean().backward()
        reference(*x).square().mean().backward()
        with torch.no_grad():  # eager RowWiseAdagrad on the table; the dense layer is not stepped on either side
            g = reference.e.weight.grad
            acc += g.square().mean(1)
            reference.e.weight -= lr * g / (acc.sqrt() + eps).unsqueeze(1)
            reference.e.weight.grad = None
        torch.testing.assert_close(model.e.weight, reference.e.weight, msg=f"step {step}")
    logs = _logs()
    assert "shares the fused buffer of an earlier compile (['e']), with its own optimizer state" in logs
    assert "reuses the fused module of an earlier compile (['e'])" in logs


class _TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.user, self.item, self.lin = nn.EmbeddingBag(50, 8), nn.EmbeddingBag(70, 8), nn.Linear(16, 1)

    def forward(self, u, uo, i, io):
        a = self.user(u, uo)
        torch._dynamo.graph_break()
        return self.lin(torch.cat([a, self.item(i, io)], 1))


def test_a_per_table_weight_dtype_spans_the_graphs():
    """Each graph quantizes the tables it looks up; the log names the others."""
    torch.manual_seed(0)
    model = _TwoGraphs().eval()
    x = (torch.tensor([1, 2, 3]), torch.tensor([0, 1]), torch.tensor([4, 5, 6]), torch.tensor([0, 2]))
    types = {"user": "int4", "item": "int8"}
    # one kernel for both: alone in its graph, the int8 table would be served by torch's op,
    # whose qparams are fp32 (fbgemm's, for the pair in one group, fp16)
    lowered = fxrec.lower_for_inference(model, x, weight_dtype=types, kernel="fbgemm")
    compiled = torch.compile(model, backend="fxrec", options={"weight_dtype": types, "kernel": "fbgemm"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), lowered(*x))
    logs = _logs()
    assert "weight_dtype names table(s) ['item'] this graph does not look up" in logs
    assert "weight_dtype names table(s) ['user'] this graph does not look up" in logs
    with pytest.raises(Exception, match=r"weight_dtype must name every table: missing \['item'\]; the tables are "
                                        r"\['item'\]"):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend="fxrec", options={"weight_dtype": {"user": "int8"}})(*x)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.user, self.item, self.lin = nn.EmbeddingBag(50, 4), nn.EmbeddingBag(30, 4), nn.Linear(8, 1)

    def forward(self, u, uo, i, io):
        return self.lin(torch.cat([self.user(u, uo), self.item(i, io)], 1))


def _pair_batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 50, (2 * b,), generator=g), torch.arange(0, 2 * b, 2),
            torch.randint(0, 30, (3 * b,), generator=g), torch.arange(0, 3 * b, 3))


def test_two_instances_served_by_one_graph_keep_their_own_tables():
    """Dynamo serves the second instance the first one's graph (the parameters are inputs, so
    its guards pass): each instance is served its own tables, and the first one's parameters
    are left as they were (they were once overwritten by the second's)."""
    torch.manual_seed(0)
    a, b = _Pair().eval(), _Pair().eval()
    references = {id(a): copy.deepcopy(a), id(b): copy.deepcopy(b)}
    before = copy.deepcopy(a.state_dict())
    compiled = {id(a): torch.compile(a, backend="fxrec"), id(b): torch.compile(b, backend="fxrec")}
    with torch.no_grad():
        for step, model in enumerate([a, a, b, b, a, b]):
            x = _pair_batch(4, step)
            torch.testing.assert_close(compiled[id(model)](*x), references[id(model)](*x), msg=f"call {step}")
    for key, value in a.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert a.user.weight.untyped_storage().data_ptr() != b.user.weight.untyped_storage().data_ptr()
    assert "serves groups" in _logs()


def _rowwise_adagrad_step(reference: nn.Module, acc: dict, lr: float, eps: float) -> None:
    """Eager RowWiseAdagrad on the reference's tables; the dense layer is stepped on neither side."""
    with torch.no_grad():
        for name in ("user", "item"):
            weight = getattr(reference, name).weight
            acc[name] += weight.grad.square().mean(1)
            weight -= lr * weight.grad / (acc[name].sqrt() + eps).unsqueeze(1)
    reference.zero_grad()


def test_two_instances_train_their_own_tables_and_optimizer_state():
    """A sweep or an A/B run: two instances trained with a sparse optimizer through one graph,
    step by step in turn. Each trains its own tables from its own (fresh) RowWiseAdagrad state,
    as eager does, and the second's steps leave the first's tables as they were. A table of
    the first replaced on the way (its other table's parameter too: assign=True wraps the
    state_dict's views anew) is copied into its buffer, the optimizer state kept."""
    lr, eps = 0.1, 1e-8
    torch.manual_seed(0)
    a, b = _Pair(), _Pair()
    references = {id(a): copy.deepcopy(a), id(b): copy.deepcopy(b)}
    acc = {id(m): {"user": torch.zeros(50), "item": torch.zeros(30)} for m in (a, b)}
    compiled = {id(m): torch.compile(m, backend="fxrec", options={
        "sparse_optimizer": fxrec.optim.RowWiseAdagrad(lr=lr, eps=eps)}) for m in (a, b)}
    for step in range(3):
        for model, other in ((a, b), (b, a)):
            reference, x = references[id(model)], _pair_batch(8, 10 * step + (model is b))
            kept = {k: v.detach().clone() for k, v in other.named_parameters()}
            out = compiled[id(model)](*x)
            torch.testing.assert_close(out, reference(*x), msg=f"step {step}")
            out.square().mean().backward()
            reference(*x).square().mean().backward()
            _rowwise_adagrad_step(reference, acc[id(model)], lr, eps)
            for name in ("user", "item"):
                torch.testing.assert_close(getattr(model, name).weight, getattr(reference, name).weight,
                                           msg=f"step {step}, {name}")
            for k, v in other.named_parameters():
                assert torch.equal(v.detach(), kept[k]), f"step {step}: {k} of the other instance changed"
        if step == 0:  # a's item table replaced while b's tables are served: a's user table keeps its state
            new = torch.randn(30, 4)
            a.load_state_dict({**a.state_dict(), "item.weight": new}, assign=True)
            references[id(a)].item.weight.data.copy_(new)
    assert a.user.weight.untyped_storage().data_ptr() != b.user.weight.untyped_storage().data_ptr()
    if len(B.compiled) == 1:  # the second instance was served the first one's graph
        assert "of another parameter set" in _logs()
