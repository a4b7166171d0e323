"""hoist_inputs: lookups whose ids are indexed out of one input inside a loop share a unit.

``[e(tokens[:, k]).mean(1) for k, e in enumerate(embs)]`` with a padding_idx (so the mean
is not folded into a bag) indexes table k's ids after table k-1's result is used; moved
next to the input, the indexing lets apply_plan serve every table by one unit. The numbers
stay the unsharded model's; graphs with in-place writes or grad-mode switches keep their order.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import assert_state_like, train_side_by_side


class _Seq(nn.Module):
    def __init__(self, tables: int = 4, quiet: bool = False):
        super().__init__()
        self.quiet = quiet
        self.embs = nn.ModuleList([nn.Embedding(50, 4, padding_idx=0) for _ in range(tables)])
        self.top = nn.Linear(4 * tables, 1)

    def forward(self, tokens):  # B x tables x L
        ys = [e(tokens[:, k]).mean(dim=1) for k, e in enumerate(self.embs)]
        if self.quiet:
            with torch.no_grad():
                ys[0] = ys[0] * 1.0
        return self.top(torch.cat(ys, dim=1))


def _units(sm) -> int:
    return sum(1 for name, _ in sm.module.get_submodule("fxrec_shards").named_children() if name != "groups")


def _tokens(g, b=3):
    return torch.randint(0, 50, (b, 4, 5), generator=g)


def test_lookups_indexed_in_a_loop_share_one_unit_and_train_as_unsharded():
    torch.manual_seed(0)
    model = _Seq()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    sm = shard(model, Topology(1), (_tokens(g),), sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    assert _units(sm) == 1
    train_side_by_side(sm, reference, [(_tokens(g),) for _ in range(3)])
    assert_state_like(sm, reference)


def test_a_graph_with_a_grad_mode_switch_keeps_its_order():
    sm = shard(_Seq(quiet=True), Topology(1), (_tokens(torch.Generator().manual_seed(1)),))
    assert _units(sm) == 4


def _two_ranks(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = _Seq()
    g = torch.Generator().manual_seed(2)
    batches = [_tokens(g) for _ in range(world)]
    sm = shard(model, Topology(world), (batches[rank],), constraints={f"embs.{k}": "row_wise" for k in range(4)})
    with torch.no_grad():
        return {"units": _units(sm), "got": sm(batches[rank]), "want": model(torch.cat(batches))[3 * rank:3 * rank + 3]}


def test_on_two_ranks():
    for res in run_workers(_two_ranks, 2, timeout=120):
        assert res["units"] == 1
        assert_close(res["got"], res["want"])
