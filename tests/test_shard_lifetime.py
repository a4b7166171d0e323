"""What fxrec.shard and its runtime leave behind: nothing that outlives its owner, nothing that
acts on the user's own model. Real processes, gloo, 2 ranks.

- The dense-gradient hooks `shard` puts on the model's own parameters average gradients only in
  backwards of the sharded program and go with the ShardedModel: the plain model's backward
  keeps its local gradient, re-sharding does not stack hooks, a dropped model is freed.
- A deep copy of a ShardedModel (copy.deepcopy, AveragedModel) is a second one with hooks, shards
  and optimizer state of its own: the copy and the original train apart, each as the unsharded model.
- A TrainPipeline's process groups go with it (closed, or collected unclosed): one pipeline
  per epoch keeps the number of groups, open files and threads flat.
- The groups `shard` and background checkpoints make once per default process group go with
  it: init / shard / save / destroy cycles in one process keep open files and threads flat.
"""
from __future__ import annotations

import copy
import datetime
import gc
import os
import weakref

import torch
import torch.distributed as dist

import fxrec
from dist_harness import free_port, run_workers
from fxrec.models import DLRMPlain
from fxrec.runtime.pipeline import TrainPipeline
from shard_models import CASES

B = 3


def _model() -> DLRMPlain:
    torch.manual_seed(0)
    return DLRMPlain([20, 30], 4, 3, [8, 4], [8, 1])


def _batch(rank: int) -> tuple:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(B, 3, generator=g), [torch.arange(B)] * 2, [torch.randint(0, 20, (B,), generator=g)] * 2


def _shard(model, batch):
    return fxrec.shard(model, fxrec.Topology(world_size=dist.get_world_size()), batch,
                       sparse_optimizer=fxrec.optim.SGD(lr=0.1))


def _hooks(p) -> int:
    return len(p._post_accumulate_grad_hooks or {})


def _plain_grad_is_local(model, batch) -> bool:
    """The plain model's backward gives what a copy of it (no hooks) gives on the same batch."""
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        m(*batch).sum().backward()
    return all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))


def _grad_sync_worker(rank: int, world: int) -> None:
    model, batch = _model(), _batch(rank)
    p = model.top_l[0].weight
    sm = _shard(model, batch)
    assert _hooks(p) == 1
    assert _plain_grad_is_local(model, batch)
    sm(*batch)  # a forward whose backward never runs, and one under no_grad: the plain model stays plain
    with torch.no_grad():
        sm(*batch)
    assert _plain_grad_is_local(model, batch)
    # the sharded program's backward averages (two forwards, one backward)
    model.zero_grad(set_to_none=True)
    (sm(*batch).sum() + sm(*batch).sum()).backward()
    grads = [torch.empty_like(p.grad) for _ in range(world)]
    dist.all_gather(grads, p.grad)
    assert all(torch.equal(g, grads[0]) for g in grads)
    # re-sharding: the dropped ShardedModel is freed and takes its hooks along
    dropped = weakref.ref(sm)
    sm = _shard(model, batch)
    gc.collect()
    assert dropped() is None and _hooks(p) == 1
    del sm
    gc.collect()
    assert _hooks(p) == 0
    # a model dropped with its ShardedModel is freed, dense parameters included
    other = _model()
    sm = _shard(other, batch)
    sm(*batch).sum().backward()
    param = weakref.ref(next(other.top_l.parameters()))
    del other, sm
    gc.collect()
    assert param() is None


def test_dense_grad_hooks_act_for_the_sharded_program_only_and_go_with_it():
    run_workers(_grad_sync_worker, 2)


def _train_step(sm, ref, opts, case, batches, rank: int) -> None:
    """One SGD step of the sharded model on this rank's batch and of the unsharded `ref` on
    the global batch (mean square of the output)."""
    for run, opt, batch in zip((sm, ref), opts, (batches[rank], case.concat(batches))):
        opt.zero_grad()
        run(*batch).square().mean().backward()
        opt.step()


def _deepcopy_worker(rank: int, world: int) -> None:
    from torch.optim.swa_utils import AveragedModel

    from shard_models import assert_state_like

    case = CASES["dlrm_lists"]
    model, ref, batches, _ = case.setup(world, B, seed=1)
    # groups of their own (table_row_wise over 2 nodes of 1 rank), replicas, column shards
    constraints = {"emb_l.0": "column_wise", "emb_l.1": "table_row_wise", "emb_l.2": "data_parallel"}
    sm = fxrec.shard(model, fxrec.Topology(world, ranks_per_node=1), batches[rank], constraints=constraints,
                     sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sm, ref)]
    steps = [case.local_batches(world, B, seed=10 + s) for s in range(7)]
    _train_step(sm, ref, opts, case, steps[0], rank)
    copied, ref_copy = copy.deepcopy(sm), copy.deepcopy(ref)
    assert all(_hooks(p) == 1 for m in (sm, copied) for p in m.parameters())
    copy_opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (copied, ref_copy)]
    for s in range(1, 4):  # interleaved, on other batches: neither may move the other
        _train_step(copied, ref_copy, copy_opts, case, steps[s + 3], rank)
        _train_step(sm, ref, opts, case, steps[s], rank)
    assert_state_like(copied, ref_copy)
    assert_state_like(sm, ref)
    # torch's weight averaging deep-copies the model; its copy runs, and averages the dense parameters
    swa = AveragedModel(sm)
    swa.update_parameters(sm)  # the first takes the parameters as they are
    before = [p.detach().clone() for p in sm.parameters()]
    _train_step(sm, ref, opts, case, steps[0], rank)
    swa.update_parameters(sm)
    for avg, p, q in zip(swa.module.parameters(), before, sm.parameters()):
        torch.testing.assert_close(avg, (p + q) / 2)
    swa(*steps[1][rank]).sum().backward()
    # a dropped copy takes its hooks along and leaves the original's
    param = weakref.ref(next(copied.parameters()))
    del copied, swa, copy_opts
    gc.collect()
    assert param() is None and all(_hooks(p) == 1 for p in sm.parameters())


def test_a_deep_copy_trains_apart_as_the_unsharded_model():
    run_workers(_deepcopy_worker, 2)


def _resources() -> tuple[int, int, int]:
    """(process groups torch has registered, open files, OS threads) of this process."""
    gc.collect()
    return (len(dist.distributed_c10d._world.pg_map), len(os.listdir("/proc/self/fd")),
            len(os.listdir("/proc/self/task")))


def _pipeline_worker(rank: int, world: int) -> list:
    model, batch = _model(), _batch(rank)
    sm = _shard(model, batch)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    seen = []
    for epoch in range(4):
        pipe = TrainPipeline(sm, opt, lambda out, b: out.pow(2).mean())
        for _ in range(2):
            pipe.progress(iter([batch] * 2))
        assert pipe.overlapped  # the background thread used the pipeline's groups
        if epoch % 2:
            pipe.close()  # else dropped unclosed
        dropped = weakref.ref(pipe)
        del pipe
        assert dropped() is None  # freed where it is dropped (no cycle waiting for gc, no thread holding it)
        seen.append(_resources())
    return seen


def _flat(seen: list) -> bool:
    """No count grew after the first (each leaked pipeline or cycle added 3 groups or more, 14
    files or more, 9 threads or more; an unrelated file may come and go)."""
    return all(now <= first for later in seen[1:] for now, first in zip(later, seen[0]))


def test_pipelines_give_their_process_groups_back():
    for seen in run_workers(_pipeline_worker, 2):
        assert _flat(seen), seen


def _reinit_worker(rank: int, world: int, path: str) -> list:
    seen = []
    for _ in range(4):
        model, batch = _model(), _batch(rank)
        sm = _shard(model, batch)
        sm(*batch).sum().backward()
        fxrec.checkpoint.save(sm, path, background=True).result()  # on its own background group
        port = [free_port() if rank == 0 else None]
        dist.broadcast_object_list(port, src=0)
        del sm, model
        dist.destroy_process_group()
        seen.append(_resources())
        os.environ["MASTER_PORT"] = str(port[0])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    return seen


def test_destroyed_default_group_takes_fxrecs_groups_along(tmp_path):
    for seen in run_workers(_reinit_worker, 2, str(tmp_path / "ckpt")):
        assert _flat(seen), seen
