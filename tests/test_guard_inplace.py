"""guard_inplace: in-place writes to a lookup's ids or to its result, sharded and fused alike.

Lookups move (a unit goes right after its inputs); a model that writes its ids in place
before or after a lookup must still have each lookup read them as at its own place, and a
model that writes a lookup's result in place must be able to (the sharded result is a view
of a split buffer otherwise). Compared with the unsharded model: forward on 1 and 2 ranks,
three SGD steps on 1.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.passes.guard_inplace import snapshot
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import assert_state_like, train_side_by_side


class _WriteAfter(nn.Module):
    """e1 reads x; then x is written; e2 reads the written x."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Embedding(40, 4), nn.Embedding(41, 4)

    def forward(self, x):
        x = x.clone()
        a = self.e1(x)
        x.add_(1)
        return torch.cat([a, self.e2(x)], 1)


class _WriteBefore(nn.Module):
    """Ids clamped in place, then looked up (through a view, with a bag)."""

    def __init__(self):
        super().__init__()
        self.e1, self.bag = nn.Embedding(40, 4), nn.EmbeddingBag(40, 4, mode="sum")

    def forward(self, x):
        x = x.clone()
        flat = x.view(-1)
        flat.clamp_(max=39)
        x.masked_fill_(x < 0, 0)  # (fx cannot trace x[mask] = 0)
        return self.e1(x) + self.bag(x.unsqueeze(1))


class _WriteResult(nn.Module):
    """A lookup's result written in place (mul_, then an in-place ReLU module); `b += 1`,
    which fx records as ``b = b + 1``, writes nothing."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.EmbeddingBag(40, 4, mode="sum"), nn.Embedding(30, 4)
        self.act, self.lin = nn.ReLU(inplace=True), nn.Linear(4, 1)

    def forward(self, x, y):
        a = self.e1(x.unsqueeze(1))
        a.mul_(2)
        b = self.e2(y)
        b += 1
        return self.lin(self.act(a) + b)


class _MLPInplace(nn.Module):
    """In-place ReLUs on the dense side only: nothing to guard."""

    def __init__(self):
        super().__init__()
        self.e = nn.EmbeddingBag(40, 4, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))

    def forward(self, x):
        return self.mlp(self.e(x.unsqueeze(1)))


def _snapshots(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is snapshot)


def test_a_model_without_inplace_writes_is_left_as_it_is():
    model = _MLPInplace()
    sm = shard(model, Topology(1), (torch.randint(0, 40, (6,)),))
    assert _snapshots(sm.module) == 0


@pytest.mark.parametrize("build, hi, snaps", [(_WriteAfter, 40, 2), (_WriteBefore, 60, 2)])
def test_each_lookup_reads_its_ids_as_at_its_place(build, hi, snaps):
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    example = torch.randint(0, hi, (6,), generator=g)
    sm = shard(model, Topology(1), (example,))
    assert _snapshots(sm.module) == snaps
    lowered = fxrec.lower_for_inference(model, (example,), weight_dtype="fp32")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randint(0, hi, (6,), generator=g)
            assert_close(sm(x), model(x))
            assert_close(lowered(x), model(x))


def test_a_result_written_in_place_trains_as_unsharded():
    torch.manual_seed(0)
    model = _WriteResult()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 40, (5,), generator=g), torch.randint(0, 30, (5,), generator=g))
    sm = shard(model, Topology(1), batch, sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    assert _snapshots(sm.module) == 1
    train_side_by_side(sm, reference, [(torch.randint(0, 40, (5,), generator=g), torch.randint(0, 30, (5,), generator=g))
                                       for _ in range(3)])
    assert_state_like(sm, reference)


def _two_ranks(rank: int, world: int) -> dict:
    out = {}
    for build, hi, args in ((_WriteAfter, 40, 1), (_WriteBefore, 60, 1), (_WriteResult, 30, 2)):
        for sharding in ("table_wise", "row_wise"):
            torch.manual_seed(0)
            model = build()
            g = torch.Generator().manual_seed(2)
            batches = [tuple(torch.randint(0, hi, (4,), generator=g) for _ in range(args)) for _ in range(world)]
            tables = [t.name for t in fxrec.find_tables(model, batches[0])]
            sm = shard(model, Topology(world), batches[rank], constraints={t: sharding for t in tables})
            glob = tuple(torch.cat([b[i] for b in batches]) for i in range(args))
            out[f"{build.__name__}/{sharding}"] = sm(*batches[rank])
            with torch.no_grad():
                out[f"{build.__name__}/{sharding}/want"] = model(*glob)[4 * rank:4 * rank + 4]
            sm(*batches[rank]).sum().backward()  # in training mode too (a view's write would raise)
    return {k: v.detach() for k, v in out.items()}


def test_inplace_writes_on_two_ranks():
    for res in run_workers(_two_ranks, 2, timeout=120):
        for key in [k for k in res if not k.endswith("/want")]:
            assert_close(res[key], res[key + "/want"], msg=key)


@pytest.mark.usefixtures("one_thread")  # inference graphs fuse on one thread
def test_the_compile_backend_guards_too():
    from fxrec.lowering import backend as B

    torch._dynamo.reset()
    try:
        model = _WriteAfter()
        compiled = torch.compile(model, backend="fxrec")
        with torch.no_grad():
            for seed in range(2):
                x = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(seed))
                assert_close(compiled(x), model(x))
        assert sum("reads a snapshot of %x" in line for line in B.compiled[-1].meta["fxrec_log"]) == 2
    finally:
        torch._dynamo.reset()


class _ThroughModules(nn.Module):
    """The ids written through what nn.Identity / nn.Flatten return (the ids themselves, a view)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.e1, self.e2, self.through = nn.Embedding(40, 4), nn.Embedding(41, 4), module

    def forward(self, x):
        x = x.clone()
        a = self.e1(x)
        self.through(x).add_(1)
        return torch.cat([a, self.e2(x)], 1)


@pytest.mark.parametrize("module", [nn.Identity(), nn.Flatten(0)], ids=["identity", "flatten"])
def test_a_write_through_a_module_that_returns_its_input(module):
    torch.manual_seed(0)
    model = _ThroughModules(module)
    x = torch.randint(0, 40, (6,))
    sm = shard(model, Topology(1), (x,))
    assert _snapshots(sm.module) == 2
    with torch.no_grad():
        assert_close(sm(x), model(x))


def test_the_callers_example_is_not_written():
    """Passes run the model on the example: on copies, so a model that writes its input in
    place leaves the caller's tensor as it was (ids near a table's end would otherwise
    drift out of range)."""
    class WritesInput(_WriteAfter):
        def forward(self, x):
            a = self.e1(x)
            x.add_(1)
            return torch.cat([a, self.e2(x)], 1)

    x = torch.full((4,), 39)
    shard(WritesInput(), Topology(1), (x,))
    fxrec.lower_for_inference(WritesInput(), (x,), weight_dtype="fp32")
    assert x.tolist() == [39] * 4
