"""TrainPipeline: the next batch's id distribution overlaps the current step, same results.

Each job shards a test model under one plan, trains STEPS steps through the pipeline and
the same steps one by one on a second sharded copy, and compares every table and dense
parameter (bit for bit: the same collectives, the same kernels, the same order). Real
processes, gloo, 2 ranks and 2 nodes x 2 ranks (table_row_wise's two hops). Also: the
split (the input stage holds the id all-to-alls, the main stage none), the schedule_overlap
annotations, and a one-process model.
"""
from __future__ import annotations

import traceback

import pytest
import torch

import fxrec
from dist_harness import merge_failures, run_workers
from fxrec.optim import RowWiseAdagrad
from fxrec.passes.schedule_overlap import INPUT, STAGE
from fxrec.runtime import comm
from fxrec.runtime.pipeline import TrainPipeline, split_stages
from shard_models import CASES

STEPS, B, LR = 4, 3, 0.05


def _loss(out, batch):
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.float().pow(2).mean() for o in outs)


def _sharded(name, world, sharding, rpn=None):
    case = CASES[name]
    model, _, batches, tables = case.setup(world, B, seed=0)
    example = batches[0]
    topology = fxrec.Topology(world_size=world, ranks_per_node=rpn)
    sm = fxrec.shard(model, topology, example, constraints={t.name: sharding for t in tables},
                     sparse_optimizer=RowWiseAdagrad(lr=LR))
    return case, sm


def _step_by_step(sharded, batches) -> list[float]:
    """The reference: the same steps without the pipeline; the losses."""
    opt = torch.optim.SGD(list(sharded.parameters()) or [torch.zeros(1, requires_grad=True)], lr=LR)
    losses = []
    for batch in batches:
        loss = _loss(sharded(*batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_both(rank: int, world: int, name: str, sharding: str, rpn=None) -> list[str]:
    """name "<model>+grad": the per-sample weights (argument 2) require grad, so the input
    stage carries gradients and must run in step (no overlap)."""
    name, _, grad = name.partition("+")
    case, piped = _sharded(name, world, sharding, rpn)
    _, plain = _sharded(name, world, sharding, rpn)
    batches = [case.local_batches(world, B, seed=10 + s)[rank] for s in range(STEPS)]
    if grad:
        batches = [b[:2] + (b[2].clone().requires_grad_(True),) + b[3:] for b in batches]
    opt = torch.optim.SGD(list(piped.parameters()) or [torch.zeros(1, requires_grad=True)], lr=LR)
    pipe = TrainPipeline(piped, opt, _loss)
    it = iter(batches)
    losses = []
    while True:
        try:
            losses.append(pipe.progress(it)[0].item())
        except StopIteration:
            break
    pipe.close()
    ref_losses = _step_by_step(plain, batches)
    fails = []
    if len(losses) != STEPS or losses != ref_losses:
        fails.append(f"losses {losses} != {ref_losses}")
    if pipe.overlapped != (0 if grad else STEPS - 1):
        fails.append(f"{pipe.overlapped} input stages overlapped, expected {0 if grad else STEPS - 1}")
    a, b = piped.state_dict(), plain.state_dict()
    for key in b:
        x, y = a[key], b[key]
        if hasattr(x, "local_shards") and not x.local_shards():
            continue  # a table this rank holds no shard of
        x = x.local_shards()[0].tensor if hasattr(x, "local_shards") and x.local_shards() else x
        y = y.local_shards()[0].tensor if hasattr(y, "local_shards") and y.local_shards() else y
        if not torch.equal(x, y):
            fails.append(f"{key} differs")
    return fails


JOBS = [("dlrm_ebc", "table_wise"), ("dlrm_ebc", "row_wise"), ("dlrm_lists", "column_wise"),
        ("two_tower", "table_wise"), ("sequence", "row_wise"), ("weighted_mean", "table_wise"),
        ("weighted_mean+grad", "row_wise"), ("odd_tables", "column_wise")]


def _worker(rank: int, world: int, jobs: list, rpn) -> dict:
    out = {}
    for job in jobs:
        try:
            out[job] = _train_both(rank, world, *job, rpn=rpn)
        except Exception:  # noqa: BLE001 - reported per job; the other ranks fail their collective too
            out[job] = [traceback.format_exc(limit=8)]
            break
    return out


_RESULTS: dict = {}


def _results(world: int, rpn) -> dict:
    key = (world, rpn)
    if key not in _RESULTS:
        jobs = JOBS if rpn is None else [("dlrm_ebc", "table_row_wise"), ("sequence", "table_row_wise")]
        _RESULTS[key] = merge_failures(run_workers(_worker, world, jobs, rpn, timeout=600))
    return _RESULTS[key]


def _bad_batch_then_good(rank: int, world: int) -> list:
    """Rank 0's second batch holds an id out of range: both ranks raise at that step (not
    later, not one of them), and the pipeline goes on with the next batch."""
    case, piped = _sharded("dlrm_ebc", world, "row_wise")
    batches = [case.local_batches(world, B, seed=30 + s)[rank] for s in range(4)]
    if rank == 0:
        dense, kjt = batches[1]
        values = kjt.values().clone()
        values[0] = 10_000
        batches[1] = (dense, type(kjt)(kjt.keys(), values, lengths=kjt.lengths()))
    pipe = TrainPipeline(piped, torch.optim.SGD(piped.parameters(), lr=LR), _loss)
    it, seen = iter(batches), []
    for _ in range(4):
        try:
            pipe.progress(it)
            seen.append("trained")
        except ValueError as e:
            seen.append(str(e))
    pipe.close()
    return seen


def test_a_bad_batch_raises_on_every_rank_and_training_goes_on():
    for seen in run_workers(_bad_batch_then_good, 2, timeout=300):
        assert seen[0] == seen[2] == seen[3] == "trained" and "id 10000" in seen[1], seen


class _Flaky:
    """Batches, but asking for number 2 raises OSError once (a transient read error)."""

    def __init__(self, batches):
        self.batches, self.i, self.failed = list(batches), 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == 2 and not self.failed:
            self.failed = True
            raise OSError("transient read error")
        if self.i >= len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]


def _iterator_error(rank: int, world: int) -> list:
    """The pipeline asks for batch 2 while batch 1 trains: the error is raised at the step
    that takes batch 2, batch 1 trains first, and the losses and parameters are those of
    step-by-step training that meets the same error."""
    runs = []
    for piped in (True, False):
        case, sm = _sharded("dlrm_ebc", world, "row_wise")
        opt = torch.optim.SGD(sm.parameters(), lr=LR)
        batches = _Flaky(case.local_batches(world, B, seed=40 + s)[rank] for s in range(4))
        pipe = TrainPipeline(sm, opt, _loss) if piped else None
        seen = []
        for _ in range(5):
            try:
                if piped:
                    seen.append(round(pipe.progress(batches)[0].item(), 6))
                else:
                    batch = next(batches)
                    loss = _loss(sm(*batch), batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    seen.append(round(loss.item(), 6))
            except OSError as e:
                seen.append(str(e))
        if piped:
            pipe.close()
        runs.append((seen, {k: v.clone() for k, v in sm.full_state_dict().items()}))
    return runs


def test_an_iterator_error_is_raised_at_its_step_and_no_batch_is_lost():
    for (piped, p_state), (plain, s_state) in run_workers(_iterator_error, 2, timeout=300):
        assert piped == plain and piped[2] == "transient read error", (piped, plain)
        for k in s_state:
            assert torch.equal(p_state[k], s_state[k]), k


@pytest.mark.parametrize("name, sharding", JOBS)
def test_pipeline_trains_like_step_by_step_on_two_ranks(name, sharding):
    assert not _results(2, None)[(name, sharding)]


@pytest.mark.parametrize("name", ["dlrm_ebc", "sequence"])
def test_pipeline_table_row_wise_two_nodes(name):
    assert not _results(4, 2)[(name, "table_row_wise")]


def test_split_puts_the_id_exchange_in_the_input_stage():
    """A two-rank program, built in one process on meta (`fxrec dump`'s way): the
    all-to-alls of ids and counts are input-stage nodes, the pooled-vector exchange not."""
    from fxrec.shard import meta_shard
    from fxrec.capture import capture
    from fxrec.passes.runner import PassContext, run_passes

    case = CASES["dlrm_ebc"]
    torch.manual_seed(0)
    model = case.build()
    example = case.local_batches(2, B, seed=0)[0]
    tables = fxrec.find_tables(model, example)
    topo = fxrec.Topology(world_size=2)
    ctx = PassContext(example_inputs=example, topology=topo)
    ctx.options.update(rank=0, world_size=2, batch_size=B, device=torch.device("meta"), init=meta_shard,
                       constraints={t.name: "row_wise" for t in tables})
    gm = run_passes(capture(model, example), ctx)
    stage = {n.name: n.meta[STAGE] for n in gm.graph.nodes}
    comms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (comm.all_to_all,
                                                                                   comm.all_to_all_counts,
                                                                                   comm.reduce_scatter)]
    ids_exchange = [n for n in comms if n.target is comm.all_to_all_counts or
                    any(u.op == "call_module" and "unpack" in u.target for u in n.users)]
    assert ids_exchange and all(stage[n.name] == INPUT for n in ids_exchange)
    assert any(stage[n.name] != INPUT for n in comms)  # the pooled vectors' exchange runs in the main stage
    from fxrec.passes.render import node_line
    assert all(("{stage input_dist}" in node_line(n)) == (stage[n.name] == INPUT) for n in gm.graph.nodes)
    split = split_stages(gm)
    assert split is not None
    for node in gm.graph.nodes:  # the split follows the pass's marks: without them, no split
        node.meta.pop(STAGE)
    with pytest.raises(ValueError, match="no schedule_overlap marks"):
        split_stages(gm)
    input_gm, main_gm, _ = split
    main_targets = {n.target for n in main_gm.graph.nodes}
    assert comm.all_to_all_counts not in main_targets and comm.all_to_all_counts in {n.target for n in
                                                                                     input_gm.graph.nodes}


def test_one_process_pipeline_equals_plain_steps():
    case, piped = _sharded("dlrm_ebc", 1, "table_wise")
    _, plain = _sharded("dlrm_ebc", 1, "table_wise")
    batches = [case.local_batches(1, B, seed=20 + s)[0] for s in range(3)]
    pipe = TrainPipeline(piped, torch.optim.SGD(piped.parameters(), lr=LR), _loss)
    got = []
    it = iter(batches)
    for _ in batches:
        got.append(pipe.progress(it)[0].item())
    with pytest.raises(StopIteration):
        pipe.progress(it)
    pipe.close()
    assert got == _step_by_step(plain, batches)


@pytest.mark.parametrize("calls_before_close", [0, 1])
def test_a_closed_pipeline_refuses_to_train_and_takes_no_batch(calls_before_close):
    """After close(), progress raises before taking a batch (it used to take one, fail to
    start its input stage on the stopped thread, and silently lose every other batch)."""
    case, piped = _sharded("dlrm_ebc", 1, "table_wise")
    batches = [case.local_batches(1, B, seed=30 + s)[0] for s in range(3)]
    pipe = TrainPipeline(piped, torch.optim.SGD(piped.parameters(), lr=LR), _loss)
    it = iter(batches)
    for _ in range(calls_before_close):
        pipe.progress(it)
    pipe.close()
    pipe.close()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the pipeline is closed"):
            pipe.progress(it)
    assert len(list(it)) == 3 - 2 * calls_before_close  # only what the pipeline took before close()


def test_bad_arguments_are_refused_at_construction():
    """Each failed at the first progress() (a missing optimizer only after forward ran), with
    an AttributeError or 'NoneType object is not callable' naming no argument."""
    case, piped = _sharded("dlrm_ebc", 1, "table_wise")
    opt = torch.optim.SGD(piped.parameters(), lr=LR)
    with pytest.raises(TypeError, match=r"TrainPipeline takes a fxrec.ShardedModel \(fxrec.shard\(...\)\), got "
                                        r"DLRMEBC"):
        TrainPipeline(case.build(), opt, _loss)
    with pytest.raises(TypeError, match=r"TrainPipeline: optimizer must be a torch optimizer .*, got NoneType"):
        TrainPipeline(piped, None, _loss)
    with pytest.raises(TypeError, match=r"TrainPipeline: loss_fn must be callable, got None"):
        TrainPipeline(piped, opt, None)
    with pytest.raises(TypeError, match=r"TrainPipeline: inputs must be callable, got None"):
        TrainPipeline(piped, opt, _loss, inputs=None)
