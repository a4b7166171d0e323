"""apply_plan's units: a table read by a module call and by ``F.embedding_bag`` on the module's weight.

``s = self.e(seq).flatten(1); p = F.embedding_bag(ids, self.e.weight, offs)`` reads one
table twice, so one unit must serve both lookups, and both lookups' ids come straight from
the inputs. fx fetches ``self.e.weight`` (a get_attr) only where the second lookup needs it,
after ``.flatten`` used the first result; the unit never reads that weight (it serves the
table from its shards), so the weight's place must not make the ids look late. Ids that
really are computed from the first result still cannot share its unit and stay refused.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.optim import SGD
from fxrec.passes import PassContext, lint, run_passes
from fxrec.passes import lookup as L
from fxrec.passes.apply_plan import ROOT, build_units
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import _cat_bags, assert_state_like, train_side_by_side

ROWS, DIM, L_SEQ, LR = 12, 8, 3, 0.1
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel"]
ONE_RANK = [s for s in SHARDINGS if s != "column_wise"]  # column_wise needs 2 column shards on 2 ranks


class SeqThenBag(nn.Module):
    """nn.Embedding on a sequence, its result used, then F.embedding_bag on the same weight."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(ROWS, DIM)
        self.top = nn.Linear(DIM * L_SEQ + DIM, 3)

    def forward(self, seq, ids, offs):
        s = self.e(seq).flatten(1)
        p = F.embedding_bag(ids, self.e.weight, offs, mode="mean")
        return self.top(torch.cat([s, p], 1))


class BagThenBag(nn.Module):
    """nn.EmbeddingBag, its result used, then F.embedding_bag on the same weight."""

    def __init__(self):
        super().__init__()
        self.e = nn.EmbeddingBag(ROWS, DIM, mode="sum")
        self.top = nn.Linear(2 * DIM, 3)

    def forward(self, seq, ids, offs):
        s = self.e(seq) * 2
        p = F.embedding_bag(ids, self.e.weight, offs, mode="sum")
        return self.top(torch.cat([s, p], 1))


class IdsFromResult(SeqThenBag):
    """The second lookup's ids are computed from the first's result: genuinely late."""

    def forward(self, seq, ids, offs):
        s = self.e(seq).flatten(1)
        late = s.argmax(1) % ROWS
        p = F.embedding_bag(late, self.e.weight, torch.arange(late.numel()), mode="mean")
        return self.top(torch.cat([s, p], 1))


MODELS = {"seq_then_bag": SeqThenBag, "bag_then_bag": BagThenBag}


def _batch(g, b: int = 4) -> tuple:
    lengths = torch.randint(0, 4, (b,), generator=g)
    ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    return torch.randint(0, ROWS, (b, L_SEQ), generator=g), ids, lengths.cumsum(0) - lengths


def _concat(batches: list) -> tuple:
    return (torch.cat([b[0] for b in batches]), *_cat_bags([(b[1], b[2]) for b in batches]))


def _units(gm) -> int:
    return sum(1 for name, _ in gm.get_submodule(ROOT).named_children() if name != "groups")


# ------------------------------------------------------------------ the pass
@pytest.mark.parametrize("name", list(MODELS))
def test_the_weights_late_get_attr_does_not_hold_the_unit_back(name):
    model = MODELS[name]()
    example = _batch(torch.Generator().manual_seed(0))
    gm = run_passes(fxrec.capture(model, example), PassContext(example_inputs=example), until="group_tables")
    lookups = [n for n in gm.graph.nodes if L.LOOKUP in n.meta]
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "e.weight")
    nodes = list(gm.graph.nodes)
    assert nodes.index(weight) > min(nodes.index(u) for u in lookups[0].users)  # as fx places it
    assert build_units(gm) == [lookups]


@pytest.mark.parametrize("name", list(MODELS))
def test_one_unit_serves_both_lookups_and_computes_as_eager(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    example = _batch(g)
    ctx = PassContext(example_inputs=example, topology=Topology(1),
                      options=dict(rank=0, world_size=1, sparse_optimizer=SGD(LR), constraints={"e": "table_wise"}))
    gm = run_passes(fxrec.capture(model, example), ctx)
    lint(gm)
    assert _units(gm) == 1
    assert not [n for n in gm.graph.nodes if L.LOOKUP in n.meta or n.op == "get_attr" and n.target == "e.weight"]
    batch = _batch(g, 5)
    assert_close(gm(*batch), model(*batch))


def test_ids_computed_from_the_first_result_stay_refused():
    example = _batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"lookups \['e', 'embedding_bag'\] read the same table.*%embedding_bag"):
        shard(IdsFromResult(), Topology(1), example)


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("sharding", ONE_RANK)
@pytest.mark.parametrize("name", list(MODELS))
def test_shards_and_trains_as_unsharded_on_one_rank(name, sharding):
    torch.manual_seed(0)
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    sm = shard(model, Topology(1), _batch(g), constraints={"e": sharding}, sparse_optimizer=SGD(LR))
    assert sm.plan["e"].sharding == sharding and _units(sm.module) == 1
    train_side_by_side(sm, reference, [_batch(g) for _ in range(3)], lr=LR)
    assert_state_like(sm, reference)


def _mismatch(what: str, got, want, out: list) -> None:
    try:
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    except AssertionError as e:
        out.append(f"{what}: {str(e).strip().splitlines()[0]}")


def _two_rank_job(rank: int, world: int, name: str, sharding: str) -> list[str]:
    """Forward and 3 SGD steps on each rank's local batch against the unsharded model on the
    global one (loss averaged over it; the tables' SGD is torch's on the rows the batch touched)."""
    torch.manual_seed(0)
    model, bad = MODELS[name](), []
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [_batch(g) for _ in range(world)]
    sm = shard(model, Topology(world), batches[rank], constraints={"e": sharding}, sparse_optimizer=SGD(LR))
    if sm.plan["e"].sharding != sharding or _units(sm.module) != 1:
        bad.append(f"plan {sm.plan['e'].sharding}, {_units(sm.module)} units")
    with torch.no_grad():
        _mismatch("forward", sm(*batches[rank]), reference(*_concat(batches))[4 * rank:4 * rank + 4], bad)
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=LR), torch.optim.SGD(reference.parameters(), lr=LR)
    for _ in range(3):
        batches = [_batch(g) for _ in range(world)]
        for run, batch, o in ((sm, batches[rank], opt), (reference, _concat(batches), ref_opt)):
            o.zero_grad()
            run(*batch).square().mean().backward()
            o.step()
    full = sm.full_state_dict()
    for key, value in reference.state_dict().items():
        _mismatch(f"after 3 steps, {key}", full.get(key), value, bad)
    return bad


_JOBS = [(name, sharding) for name in MODELS for sharding in SHARDINGS]
_RESULTS: dict = {}


@pytest.mark.parametrize("name, sharding", _JOBS)
def test_shards_and_trains_as_unsharded_on_two_ranks(name, sharding):
    if not _RESULTS:  # one spawn of 2 gloo ranks runs every job
        _RESULTS.update(merge_failures(run_workers(run_jobs, 2, _two_rank_job, _JOBS, timeout=300)))
    assert (name, sharding) in _RESULTS, "an earlier job failed and ended the run"
    assert _RESULTS[(name, sharding)] == []
