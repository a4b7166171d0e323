"""hoist_inputs: lookups whose ids are indexed out of one input inside a loop share a unit.

``[e(tokens[:, k]).mean(1) for k, e in enumerate(embs)]`` with a padding_idx (so the mean
is not folded into a bag) indexes table k's ids after table k-1's result is used; moved
next to the input, the indexing lets apply_plan serve every table by one unit. A DIN-style
model looks a shared table up twice, the second time by ids it computes (``target % n``)
after using the first result: moved up, that arithmetic lets one unit serve both. The
numbers stay the unsharded model's; graphs with grad-mode switches keep their order, and so
does the computation of ids an in-place write may reach.
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


class _Din(nn.Module):
    """Behaviour sequence and target item from one table; the target's ids hashed, clamped or
    sliced after the sequence's result is used; optionally that result written in place."""

    def __init__(self, ids: str, inplace: bool = False):
        super().__init__()
        self.ids, self.inplace = ids, inplace
        self.item = nn.Embedding(50, 8, padding_idx=0)
        self.top = nn.Linear(8, 1)

    def forward(self, hist, target):
        h = self.item(hist)
        if self.inplace:
            h.masked_fill_((hist == 0).unsqueeze(-1), 0.0)
        h = h.sum(1)
        if self.ids == "hash":
            t = self.item((target * 31 + 7) % 50)
        elif self.ids == "clamp":
            t = self.item(torch.where(target > 0, target, torch.ones_like(target)).clamp(max=49))
        else:
            t = self.item(hist[:, -1])
        return self.top(h * t)


def _din_batch(g, b=4):
    return torch.randint(0, 50, (b, 5), generator=g), torch.randint(0, 1000, (b,), generator=g) % 60


@pytest.mark.parametrize("ids,inplace", [("hash", False), ("clamp", False), ("last", True), ("hash", True)])
def test_a_shared_table_looked_up_by_computed_ids_is_one_unit_and_trains_as_unsharded(ids, inplace):
    torch.manual_seed(0)
    model = _Din(ids, inplace)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    sm = shard(model, Topology(1), _din_batch(g), sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    assert _units(sm) == 1
    train_side_by_side(sm, reference, [_din_batch(g) for _ in range(3)])
    assert_state_like(sm, reference)


class _WrittenIds(nn.Module):
    """The second lookup's ids come from a tensor the model writes in place after the first
    lookup's result is used: where they are read matters, so nothing moves."""

    def __init__(self):
        super().__init__()
        self.item = nn.Embedding(50, 8)

    def forward(self, hist):
        ids = hist.clone()
        h = self.item(ids).sum(1) * 2
        ids.clamp_(max=10)
        return h + self.item(ids % 7).sum(1)


class _WrittenThroughAView(nn.Module):
    """The write reaches the ids through a view guard_inplace's lists do not name."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.item = nn.Embedding(50, 8)

    def forward(self, hist, target):
        h = self.item(hist).sum(1) * 2
        t = target + 0
        if self.how == "ravel":
            t.ravel().add_(1)
        else:
            t.split_with_sizes([t.shape[0]])[0].add_(1)
        return h * self.item(t % 50)


@pytest.mark.parametrize("model", [_WrittenIds(), _WrittenThroughAView("ravel"), _WrittenThroughAView("split")],
                         ids=["clamp_", "ravel", "split_with_sizes"])
def test_ids_an_in_place_write_reaches_keep_their_place(model):
    """Moved ahead of the write, the second lookup would read its ids unwritten (a wrong
    answer); kept in place, one unit cannot serve the table, which is refused."""
    example = (torch.randint(0, 50, (4, 5)),) if isinstance(model, _WrittenIds) else _din_batch(
        torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"lookups \['item', 'item_1'\] read the same table.*%item_1"):
        shard(model, Topology(1), example)


def _din_two_ranks(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = _Din("hash")
    g = torch.Generator().manual_seed(2)
    batches = [_din_batch(g) for _ in range(world)]
    sm = shard(model, Topology(world), batches[rank], constraints={"item": "row_wise"})
    whole = tuple(torch.cat(parts) for parts in zip(*batches))
    with torch.no_grad():
        return {"units": _units(sm), "got": sm(*batches[rank]), "want": model(*whole)[4 * rank:4 * rank + 4]}


def test_a_shared_table_looked_up_by_computed_ids_on_two_ranks():
    for res in run_workers(_din_two_ranks, 2, timeout=120):
        assert res["units"] == 1
        assert_close(res["got"], res["want"])
