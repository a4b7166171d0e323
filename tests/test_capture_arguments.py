"""The captured program takes the model's arguments as the model does: containers checked
against the structure they were captured with, defaults left out of example_inputs fixed
(and still accepted by keyword), NamedTuples, and the model's hooks run."""
from __future__ import annotations

import copy
import re
import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from fxrec.optim import SGD
from fxrec.passes import lookup as L
from shard_models import assert_state_like, train_side_by_side


class _Lists(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.EmbeddingBag(20, 4, mode="sum")

    def forward(self, id_list, feats):
        out = sum(self.e(ids) for ids in id_list)
        return out + feats["x"] * feats.get("scale", 1.0)


def _lists_batch(g, n: int = 3):
    return [torch.randint(0, 20, (4, 2), generator=g) for _ in range(n)], {"x": torch.randn(4, 4, generator=g)}


# (what the call changes, the message's start)
STRUCTURE_CASES = [
    (lambda ids, feats: (ids + ids[:1], feats), "argument 'id_list' is a list of 4, but the model was captured "
                                                "with a list of 3"),
    (lambda ids, feats: (ids[:2], feats), "argument 'id_list' is a list of 2"),
    (lambda ids, feats: (ids, dict(feats, scale=torch.full((4, 1), 3.0))),
     "argument 'feats' is a dict with key(s) ['scale'] that example_inputs lacked"),
    (lambda ids, feats: (ids, {}), "argument 'feats' is a dict without key(s) ['x']"),
    (lambda ids, feats: (ids, {1: feats["x"]}), "argument 'feats' is a dict with key(s) [1] that example_inputs "
                                                 "lacked and without key(s) ['x']"),
    (lambda ids, feats: (ids[0], feats), "argument 'id_list' is a Tensor"),
]


@pytest.mark.parametrize("change, message", STRUCTURE_CASES)
def test_a_call_of_another_structure_than_captured_raises_naming_the_argument(change, message):
    torch.manual_seed(0)
    model = _Lists()
    g = torch.Generator().manual_seed(0)
    example = _lists_batch(g)
    sm = fxrec.shard(model, fxrec.Topology(world_size=1), example, sparse_optimizer=SGD(0.1))
    other = _lists_batch(g)
    assert_close(sm(*other), model(*other))  # the captured structure, fresh values
    assert_close(sm(list(reversed(other[0])), other[1]), model(list(reversed(other[0])), other[1]))
    with pytest.raises(ValueError, match=re.escape(message)):
        sm(*change(*other))
    with pytest.raises(ValueError, match="argument 'id_list'"):  # the lowered program checks as well
        fxrec.lower_for_inference(model, example, "fp32")(other[0][:2], other[1])


class _Defaults(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.out = nn.EmbeddingBag(20, 8, mode="sum"), nn.Linear(8, 1)

    def forward(self, ids, extra=None, scale=1.0, normalize=False):
        h = self.e(ids)
        if extra is not None:
            h = h + extra
        if normalize:
            h = h / h.norm(dim=1, keepdim=True)
        return self.out(h) * scale


@pytest.mark.parametrize("containers", [False, True])
def test_arguments_left_out_of_example_inputs_are_fixed_at_their_defaults(containers):
    class WithList(_Defaults):  # the same, with its ids in a list (fx's pytree codegen)
        def forward(self, ids, extra=None, scale=1.0, normalize=False):
            return super().forward(ids[0], extra, scale, normalize)

    torch.manual_seed(0)
    model = WithList() if containers else _Defaults()
    ids = torch.randint(0, 20, (4, 3))
    arg = [ids] if containers else ids
    sm = fxrec.shard(model, fxrec.Topology(world_size=1), (arg,), sparse_optimizer=SGD(0.1))
    assert sm.module.meta[L.CAPTURED_BY] == "fx"
    assert_close(sm(arg), model(arg))
    assert_close(sm(arg, extra=None, scale=2.0), model(arg, scale=2.0))  # a number stays an input
    with pytest.raises(AssertionError, match="argument 'extra' was captured as None"):
        sm(arg, extra=torch.ones(4, 8))
    with pytest.raises(AssertionError, match="argument 'normalize' was captured as False"):
        sm(arg, normalize=True)


class _Batch(NamedTuple):
    ids: torch.Tensor
    dense: torch.Tensor


class _TakesNamedTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.lin = nn.EmbeddingBag(20, 4, mode="sum"), nn.Linear(4, 4)

    def forward(self, batch: _Batch):
        return self.e(batch.ids) + self.lin(batch.dense)


def test_a_namedtuple_argument_is_sharded_like_a_tuple():
    torch.manual_seed(0)
    model = _TakesNamedTuple()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [(_Batch(torch.randint(0, 20, (4, 3), generator=g), torch.randn(4, 4, generator=g)),)
               for _ in range(3)]
    sm = fxrec.shard(model, fxrec.Topology(world_size=1), batches[0], sparse_optimizer=SGD(0.1),
                     constraints={"e": "table_wise"})
    assert_close(sm(*batches[1]), reference(*batches[1]))
    train_side_by_side(sm, reference, batches)
    assert_state_like(sm, reference)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.b, self.lin = nn.Embedding(20, 4), nn.EmbeddingBag(30, 4, mode="sum"), nn.Linear(8, 2)

    def forward(self, i, j):
        return self.lin(torch.cat([self.e(i), self.b(j)], 1))


# (where the hook goes, the hook, the tables that stay dense)
HOOK_CASES = [
    ("e", lambda m: m.e.register_forward_hook(lambda mod, inp, out: out * 2.0), ["e"]),
    ("b", lambda m: m.b.register_forward_pre_hook(lambda mod, inp: ((inp[0] + 1) % 30,) + tuple(inp[1:])), ["b"]),
    ("b kwargs", lambda m: m.b.register_forward_pre_hook(lambda mod, args, kw: (((args[0] * 7) % 30,) + args[1:], kw),
                                                         with_kwargs=True), ["b"]),
    ("root", lambda m: m.register_forward_hook(lambda mod, inp, out: out + 1.0), []),
    ("root pre", lambda m: m.register_forward_pre_hook(lambda mod, inp: (inp[0], (inp[1] * 3) % 30)), []),
]


@pytest.mark.parametrize("where, register, dense", HOOK_CASES, ids=[c[0] for c in HOOK_CASES])
def test_the_models_hooks_run(where, register, dense):
    torch.manual_seed(0)
    model = _Two()
    register(model)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 20, (4,), generator=g), torch.randint(0, 30, (4, 3), generator=g))
               for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = fxrec.shard(model, fxrec.Topology(world_size=1), batches[0], sparse_optimizer=SGD(0.1),
                         constraints={t: "table_wise" for t in {"e", "b"} - set(dense)})
    said = " ".join(str(w.message) for w in caught)
    for table in dense:  # a hooked lookup module stays a module call, its hook with it
        assert f"module '{table}' has a forward" in said
    assert sorted(sm.plan.tables) == sorted({"e", "b"} - set(dense))
    assert_close(sm(*batches[1]), reference(*batches[1]))
    train_side_by_side(sm, reference, batches)
    assert_state_like(sm, reference)
    served = fxrec.lower_for_inference(reference, batches[0], "fp32")
    assert_close(served(*batches[2]), reference.eval()(*batches[2]))


class _Nested(NamedTuple):
    ids: torch.Tensor
    more: list


class _TakesNested(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.EmbeddingBag(20, 4, mode="sum")

    def forward(self, batch: _Nested):
        return self.e(batch.ids) + sum(self.e(x) for x in batch.more)


def test_lists_inside_a_namedtuple_are_checked_and_a_saved_program_loads(tmp_path):
    torch.manual_seed(0)
    model = _TakesNested()
    ids = torch.randint(0, 20, (4, 3))
    example = (_Nested(ids, [ids, ids]),)
    sm = fxrec.shard(model, fxrec.Topology(world_size=1), example, sparse_optimizer=SGD(0.1))
    with pytest.raises(ValueError, match=r"argument 'batch'.more is a list of 3, but the model was captured with "
                                         r"a list of 2"):
        sm(_Nested(ids, [ids, ids, ids]))
    # torch.load re-traces the saved forward with proxies, which the check lets through
    torch.save(sm, tmp_path / "sharded.pt")
    loaded = torch.load(tmp_path / "sharded.pt", weights_only=False)
    assert_close(loaded(*example), model(*example))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.lin = nn.EmbeddingBag(20, 4, mode="sum"), nn.Linear(4, 4)

    def forward(self, ids):
        return self.lin(self.e(ids))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.out = _Inner(), nn.Linear(4, 1)

    def forward(self, ids):
        return self.out(self.inner(ids))


def test_hooks_follow_the_model_and_lost_backward_hooks_are_named():
    torch.manual_seed(0)
    model = _Outer()
    ids = torch.randint(0, 20, (4, 3))
    model.inner.register_full_backward_hook(lambda mod, gin, gout: None)
    with pytest.warns(UserWarning, match=r"the backward hooks of module\(s\) \['inner'\] do not run"):
        sm = fxrec.shard(model, fxrec.Topology(world_size=1), (ids,), sparse_optimizer=SGD(0.1))
    # the program shares the model's hooks: registered or removed on the model later, also on it
    handle = model.register_forward_hook(lambda mod, inp, out: out * 2.0)
    assert_close(sm(ids), model(ids))
    assert_close(sm(ids), 2.0 * model.out(model.inner(ids)))
    handle.remove()
    assert_close(sm(ids), model(ids))


class _PairAndKJT(nn.Module):
    """A tuple argument beside a KeyedJaggedTensor one; the tuple bound to a defaulted parameter."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(8, 4)
        self.ebc = fxrec.EmbeddingBagCollection([fxrec.EmbeddingBagConfig("t", 8, 4, ["f"])])

    def forward(self, kjt, scale=None, pair=None):
        return self.bag(pair[0], pair[1]) * scale + self.ebc(kjt).values()


def _pair_batch(g):
    kjt = fxrec.KeyedJaggedTensor(["f"], torch.randint(0, 8, (3,), generator=g), lengths=torch.tensor([2, 1]))
    return kjt, torch.rand(2, 1, generator=g), (torch.randint(0, 8, (3,), generator=g), torch.tensor([0, 1]))


def test_a_kjt_beside_a_container_and_a_container_after_a_default_are_captured_by_fx():
    # the KJT came apart into its tensors when the example ran (torch's Interpreter unpacks
    # every pytree leaf), and the signature put `pair` without a default after `scale=None`
    # (a SyntaxError): both fell back to torch.export, whose lookups fxrec.shard refuses
    torch.manual_seed(0)
    model = _PairAndKJT()
    g = torch.Generator().manual_seed(0)
    example = _pair_batch(g)
    assert fxrec.capture(model, example).meta[L.CAPTURED_BY] == "fx"
    sm = fxrec.shard(copy.deepcopy(model), fxrec.Topology(1), example, sparse_optimizer=SGD(0.1))
    batch = _pair_batch(g)
    with torch.no_grad():
        assert_close(sm(*batch), model(*batch))
