"""`TrainPipeline`: batch i+1's ids travel to their shards while batch i trains.

A sharded training step first distributes the batch's ids (apply_plan's input_dist: counts
and ids all-to-all), then looks up, exchanges the pooled vectors, runs the dense layers and
backward. The id distribution reads only the batch, so, as TorchRec's
TrainPipelineSparseDist does, the pipeline runs it for the next batch while the current one
computes:

- the sharded program is split along the schedule_overlap pass's annotations into an input
  stage and a main stage (the same modules; the main stage reads the input stage's values
  from an inbox instead of computing them);
- the input stage of batch i+1 runs in a background thread on process groups of its own
  (`comm.groups_for_this_thread`: same ranks, a second stream of collectives, so the two
  threads' collectives never interleave on one group), while the main thread runs batch
  i's main stage, loss, backward and optimizer step;
- the results are the same as running the sharded model step by step: the input stage
  reads no parameter, and a batch's main stage waits for its own input stage.

`progress(batches)` takes the next batch from an iterator of batches, trains one step on it
and returns ``(loss, output)``; it raises StopIteration when the iterator is exhausted, and
what else the iterator raised when the step that asked for that batch comes (the current
batch has trained by then, as step by step). The steps equal step-by-step training bit for
bit as long as the batch stream draws no random numbers from torch's global generator, which
the model's dropout also draws from: the pipeline asks for batch i+1 before batch i's forward
(give the stream a ``torch.Generator`` of its own).
A batch is the model's arguments as a tuple, or anything `inputs(batch)` turns into them
(e.g. ``lambda b: (b.dense_features, b.sparse_features)`` for `fxrec.datasets.Batch`);
`loss_fn(output, batch)` sees the batch itself. Every rank feeds its own batches in step.
The first batch's input stage runs in the main thread; when one of its values requires grad
(per-sample weights that are trained), every batch's does (no overlap, the same results), as
gradients must then flow back through the stage's collectives on the main thread's groups.
"""
from __future__ import annotations

import concurrent.futures
import copy
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxrec.passes.lookup import carry_hooks
from fxrec.passes.schedule_overlap import INPUT, STAGE, handed_over
from fxrec.runtime import comm

__all__ = ["TrainPipeline", "split_stages"]


class _Inbox(nn.Module):
    """forward(i) -> the i-th value the input stage handed over for the current batch."""

    def __init__(self):
        super().__init__()
        self.values: Optional[tuple] = None

    def forward(self, i: int):
        return self.values[i]


def _with_outputs(graph: Graph, outputs: list[Node]) -> None:
    """Make the graph return `outputs` (a tuple)."""
    old = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(old):
        graph.output(tuple(outputs))
    graph.erase_node(old)


def _without(gm: GraphModule, names: set[str]) -> GraphModule:
    """`gm` without the nodes named `names` (none of them may be read by a node that stays)
    and the submodules only they called. Not dead-code elimination: a node the program runs
    for its effect alone stays where it is."""
    for node in reversed(list(gm.graph.nodes)):
        if node.name in names:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def split_stages(gm: GraphModule) -> Optional[tuple[GraphModule, GraphModule, _Inbox]]:
    """(input stage, main stage, the main stage's inbox) of a sharded program, split along
    the schedule_overlap pass's marks, both taking the program's own arguments; None when
    no node distributes ids (nothing to overlap)."""
    if not any(STAGE in n.meta for n in gm.graph.nodes):
        raise ValueError("split_stages: the program carries no schedule_overlap marks (run the pass, or build it "
                         "with fxrec.shard, which does)")
    stage = {n for n in gm.graph.nodes if n.meta.get(STAGE) == INPUT}
    frontier = handed_over(gm, stage)
    if not frontier:
        return None
    # input stage: the same graph, returning the handed-over values
    g_in = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in g_in.nodes}
    _with_outputs(g_in, [by_name[n.name] for n in frontier])
    info = getattr(g_in._codegen, "pytree_info", None)
    if info is not None:  # the model's out_spec does not describe a tuple of handed-over values
        g_in._codegen.pytree_info = info._replace(out_spec=None)
    keep = {n.name for n in stage}
    input_gm = _without(GraphModule(gm, g_in, "InputStage"),
                        {n.name for n in g_in.nodes if n.op not in ("placeholder", "output") and n.name not in keep})
    # main stage: the handed-over nodes read from the inbox, the rest of the input stage gone
    g_main = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in g_main.nodes}
    inbox = _Inbox()
    main_root = nn.Module()
    for name, child in gm.named_children():
        main_root.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        main_root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        main_root.register_buffer(name, b)
    main_root.add_module("fxrec_inbox", inbox)
    for i, node in enumerate(frontier):
        old = by_name[node.name]
        with g_main.inserting_before(old):
            new = g_main.call_module("fxrec_inbox", (i,))
        new.meta.update(old.meta)
        old.replace_all_uses_with(new)
    # the model's hooks (capture carried them onto the program) run around the main stage's call
    main_gm = carry_hooks(gm, _without(GraphModule(main_root, g_main, "MainStage"), keep))
    return input_gm, main_gm, inbox


def _ranks_per_node() -> int:
    """Ranks per node of the running job, from its registered intra-node group."""
    intra = comm._GROUPS.get("intra_node")
    if intra is None:
        return comm.world_size()
    return len(dist.get_process_group_ranks(intra))


def _check_arguments(model, optimizer, loss_fn, inputs) -> None:
    """Checked at construction: each failed at the first progress() with an AttributeError or
    'NoneType object is not callable', a missing optimizer only after the batch was taken and
    its forward ran."""
    from fxrec.shard import ShardedModel

    if not isinstance(model, ShardedModel):
        raise TypeError(f"TrainPipeline takes a fxrec.ShardedModel (fxrec.shard(...)), got {type(model).__name__}")
    if not (callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))):
        raise TypeError(f"TrainPipeline: optimizer must be a torch optimizer over sharded.parameters() (with step "
                        f"and zero_grad), got {type(optimizer).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("inputs", inputs)):
        if not callable(fn):
            raise TypeError(f"TrainPipeline: {name} must be callable, got {fn!r} ({type(fn).__name__})")


def _input_stage(input_gm: GraphModule, groups: dict, args: tuple):
    with comm.groups_for_this_thread(groups):
        return input_gm(*args)


def _release(pool: concurrent.futures.ThreadPoolExecutor, groups: list) -> None:
    """Wait for the pending input stage and stop the pool's thread, then destroy the groups
    (TrainPipeline.close, or the collection of a pipeline never closed). No collective: this
    rank's collectives on the groups are over then, and a peer still finishing its side of the
    last one has had all of this rank's data sent, which gloo delivers after this end closes."""
    if threading.current_thread() in getattr(pool, "_threads", ()):
        return  # collected by gc on the stage's own thread: leave the groups rather than pull them from under it
    pool.shutdown(wait=True)
    comm.destroy_groups(groups)


class TrainPipeline:
    """Trains a `fxrec.ShardedModel`, overlapping the next batch's id distribution with the
    current batch's step (module doc).

    optimizer: the dense parameters' optimizer (``sharded.parameters()``); the tables train
    inside backward as usual. loss_fn(output, batch) -> scalar loss. inputs(batch) -> the
    model's arguments (default: the batch is that tuple). Collective: every rank constructs
    its pipeline at the same point (it creates process groups)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any, Any], torch.Tensor],
                 inputs: Callable[[Any], tuple] = tuple):
        _check_arguments(model, optimizer, loss_fn, inputs)
        self.model, self.optimizer, self.loss_fn, self.inputs = model, optimizer, loss_fn, inputs
        split = split_stages(model.program(True))  # the training-mode program
        self._stages = split
        self._groups: dict = {}
        if split is not None and comm.world_size() > 1:
            pgs = comm.ProcessGroups(ranks_per_node=_ranks_per_node(), register=False)  # collective
            world = dist.new_group(list(range(comm.world_size())))  # collective
            self._groups = {"world": world, "intra_node": pgs.intra_node, "cross_node": pgs.cross_node}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fxrec-input-dist")
        # The groups are this pipeline's alone (two pipelines alive at once must not interleave
        # their input stages' collectives on one group), so they go with it: close() destroys
        # them, and so does the collection of a pipeline never closed (one per epoch leaked 3
        # gloo groups, their sockets and threads, each time). See _release.
        self._release = weakref.finalize(self, _release, self._pool, list(self._groups.values()))
        self._release.atexit = False  # at exit there is nothing to give back
        self._next: Optional[tuple] = None  # (batch, its model arguments, future of its input stage's values)
        self._background: Optional[bool] = None  # input stages in the background thread (set at the first)
        self.overlapped = 0  # input stages started in the background
        self._raised: Optional[BaseException] = None  # what the iterator raised when asked ahead
        self._closed = False

    def _start(self, batch) -> tuple:
        args = tuple(self.inputs(batch))
        # the task holds the stage and the groups, not the pipeline: a dropped pipeline is
        # released where it is dropped, not later on the pool's thread
        return batch, args, self._pool.submit(_input_stage, self._stages[0], self._groups, args)

    def progress(self, batches: Iterator) -> tuple[torch.Tensor, Any]:
        """One training step on the next batch of `batches` (module doc); RuntimeError,
        taking no batch, once the pipeline is closed."""
        # Checked before next(batches): a closed pool refuses the next batch's input stage
        # only after that batch was taken, and every other batch would be lost silently.
        if self._closed:
            raise RuntimeError("TrainPipeline: the pipeline is closed (close() was called); build a new one to "
                               "train on")
        self.model._check_group()  # the stages below are the program's, past ShardedModel.forward
        if self._raised is not None:  # asked ahead for this batch, the iterator raised: raise it now
            raised, self._raised = self._raised, None
            raise raised
        if self._stages is None:  # nothing distributes ids: a plain step
            batch = next(batches)
            return self._step(batch, self.model(*self.inputs(batch)))
        input_gm, main_gm, inbox = self._stages
        if self._next is None:  # the first batch, or every batch when the stage carries gradients
            batch = next(batches)
            args = tuple(self.inputs(batch))
            values = input_gm(*args)
            if self._background is None:
                self._background = not any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
        else:
            (batch, args, pending), self._next = self._next, None
            # this batch's input stage; what it raised (a bad id: on every rank, by the input
            # check's exchange) is raised here, and the next call goes on with the next batch
            values = pending.result()
        if self._background:
            try:  # the next batch's ids travel while this one trains
                self._next = self._start(next(batches))
                self.overlapped += 1
            except StopIteration:
                pass
            except Exception as e:  # noqa: BLE001 - the iterator's error belongs to the next step, as
                self._raised = e     # step by step: this batch still trains, the next call raises it
        inbox.values = tuple(values)
        try:
            out = self.model._after_forward(main_gm(*args))  # past ShardedModel.forward, as _check_group
        finally:
            inbox.values = None
        return self._step(batch, out)

    def _step(self, batch, out) -> tuple[torch.Tensor, Any]:
        loss = self.loss_fn(out, batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss, out

    def close(self) -> None:
        """Wait for a pending input stage (its batch is not trained; what it raised is
        dropped with it), stop the background thread and destroy the pipeline's process groups
        (local, no collective); progress() then refuses to train. Closing twice is harmless."""
        self._closed = True
        if self._next is not None:
            concurrent.futures.wait([self._next[2]])
            self._next = None
        self._pool.shutdown(wait=True)
        self._groups = {}
        self._release()
