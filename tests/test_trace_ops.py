"""Sequence-model idioms fx cannot trace by itself (fxrec/trace_ops.py): a tensor factory
given a traced size (``torch.ones(L, L)``, a causal mask) and item assignment
(``e[seq == 0] = 0``). The model captures with torch.fx (no export fallback, which shard
cannot use), the sizes stay symbolic (another sequence length and batch size run), and the
sharded model trains as the unsharded one.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxrec
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import assert_state_like, train_side_by_side


class _Sas(nn.Module):
    def __init__(self, setitem: bool):
        super().__init__()
        self.setitem = setitem
        self.item = nn.Embedding(40, 8)
        self.pos = nn.Embedding(12, 8)
        self.top = nn.Linear(8, 1)

    def forward(self, seq):
        L = seq.shape[1]
        e = self.item(seq) + self.pos(torch.arange(L, device=seq.device))
        if self.setitem:
            e[seq == 0] = 0
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), 1)
        scores = (e @ e.transpose(1, 2)).masked_fill(causal, -1e4).softmax(-1)
        return self.top((scores @ e).mean(1))


def _seq(g, b, length):
    return torch.randint(0, 40, (b, length), generator=g)


@pytest.mark.parametrize("setitem", [False, True])
def test_a_causal_mask_and_item_assignment_capture_with_fx(setitem):
    model = _Sas(setitem)
    gm = fxrec.capture(model, (_seq(torch.Generator().manual_seed(0), 3, 5),), fallback=False)
    g = torch.Generator().manual_seed(1)
    for b, length in ((3, 5), (2, 7)):
        x = _seq(g, b, length)
        torch.testing.assert_close(gm(x), model(x))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ones in targets and torch.arange in targets


@pytest.mark.parametrize("setitem", [False, True])
def test_it_shards_and_trains_as_unsharded(setitem):
    torch.manual_seed(0)
    model = _Sas(setitem)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    sm = shard(model, Topology(1), (_seq(g, 3, 5),), sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    train_side_by_side(sm, reference, [(_seq(g, 3, 5),), (_seq(g, 2, 6),), (_seq(g, 4, 5),)])
    assert_state_like(sm, reference)


def test_factories_without_traced_arguments_are_untouched():
    """Outside a trace, and inside one with plain sizes, torch.ones is torch's own."""
    ones = torch.ones

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 4)

        def forward(self, x):
            return self.e(x) + torch.ones(4)

    gm = fxrec.capture(Plain(), (torch.randint(0, 10, (2, 3)),), fallback=False)
    assert torch.ones is ones
    assert torch.ones not in {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_the_new_nodes_carry_the_models_line():
    """Provenance names the model's line, not fxrec's tracing code."""
    from fxrec.passes import lookup as L

    gm = fxrec.capture(_Sas(True), (_seq(torch.Generator().manual_seed(0), 3, 5),), fallback=False)
    import operator

    made = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.ones, torch.arange,
                                                                                   operator.setitem)]
    assert len(made) == 3
    for n in made:
        assert n.meta[L.SOURCE] is not None and n.meta[L.SOURCE].file.endswith("test_trace_ops.py"), n


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")
        self.bottom = nn.Linear(4, 8)
        self.top = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, dense, ids):
        import torch.utils.checkpoint as ckpt

        h = torch.cat([torch.relu(self.bottom(dense)), self.bag(ids)], 1)
        return ckpt.checkpoint(self.top, h, use_reentrant=self.reentrant)


def _dense_ids(g, b=4):
    return torch.randn(b, 4, generator=g), torch.randint(0, 30, (b, 3), generator=g)


@pytest.mark.parametrize("reentrant", [True, False])
def test_an_activation_checkpoint_in_forward_trains_as_unsharded(reentrant):
    """The reentrant checkpoint runs its function under no_grad in forward: traced into, that
    block stayed in the program and no layer inside or before it, nor the table, trained."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = shard(model, Topology(1), _dense_ids(g), sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    said = [str(w.message) for w in caught if "activation checkpoint" in str(w.message)]
    assert bool(said) == reentrant, said
    train_side_by_side(sm, reference, [_dense_ids(g) for _ in range(3)])
    assert_state_like(sm, reference)
