"""Collectives as graph-insertable, autograd-aware functions.

Each public function is a plain module-level function, so a pass inserts it with
``graph.call_function(comm.all_to_all, ...)`` and later passes can see and move it; each is
also registered with `torch.fx.wrap`, so code that calls ``comm.X(...)`` traces to a single
call_function node. Guarantees shared by all of them:

- ``group=None`` is the default (WORLD) group. ``group`` may also be a registered name
  ("world", "intra_node", "cross_node", see `register_group`): a ProcessGroup object cannot be
  a constant of generated graph code, a string can. With no initialised process group, or a group
  of one rank, each is the identity (after the same argument checks), so a program rewritten
  for W ranks also runs in one process with W=1.
- dim 0 is the split / concatenation dimension; other dims are kept. Any dtype torch.distributed
  carries works (tested: float32, float16, int64). Empty splits and zero-size tensors are fine.
- Meta tensors (shape propagation on a model built on the meta device) return a meta tensor of
  the result's shape without communicating.
- Gradients: all_to_all, reduce_scatter, all_gather and all_reduce are differentiable (the
  adjoint collective runs in backward); all_to_all_counts is not (integer counts).

Only ``all_to_all_single``, ``reduce_scatter_single`` / ``all_gather_single`` (formerly
``*_tensor``) and ``all_reduce`` are used: gloo's list all_to_all rejects uneven sizes, while all
four of these work on gloo (CPU) and NCCL (GPU).

`agree` is host-side, not a graph node: it exchanges each rank's error (or a picklable value)
so that one rank's error is raised on every rank, before a collective it would never reach.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.fx
from torch import Tensor

__all__ = ["all_to_all", "all_to_all_counts", "reduce_scatter", "all_gather", "all_reduce",
           "world_size", "rank", "default_group", "ProcessGroups", "COMM_KINDS", "register_group", "resolve_group",
           "groups_for_this_thread", "destroy_groups", "per_default_group", "agree", "collective_device"]

# The kinds a pass writes into node.meta["fxrec_comm"].
COMM_KINDS = ("all_to_all", "all_to_all_counts", "reduce_scatter", "all_gather", "all_reduce")

Splits = Union[Sequence[int], Tensor]

# torch 2.13 renamed the *_tensor collectives (the old names warn); keep both working.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# Named groups for graph code; "world" is the default group. ProcessGroups fills in the rest.
_GROUPS: dict[str, object] = {"world": None}


def register_group(name: str, group) -> None:
    """Make ``group`` (a ProcessGroup, or None for WORLD) reachable as ``group=name``; a later
    registration of the same name replaces the earlier one (this process only)."""
    _GROUPS[name] = group


def destroy_groups(groups) -> None:
    """Destroy each of `groups` that torch still has registered (None, non-member stand-ins,
    repeats and groups a global destroy_process_group already dropped are skipped), and forget
    the names they are registered under. Local: no collective, so each rank may call it when it
    is done with them; the C++ group (gloo: its threads and sockets) is freed once the last
    Python reference to it goes."""
    groups = [g for g in groups if g is not None]
    registered = dist.distributed_c10d._world.pg_map if dist.is_available() else {}
    done: list = []
    for g in groups:
        if any(g is d for d in done) or g is default_group() or g not in registered:
            continue
        done.append(g)
        dist.destroy_process_group(g)
    for name, g in list(_GROUPS.items()):
        if name != "world" and any(g is d for d in groups):
            del _GROUPS[name]


# Values made once per default process group (`per_default_group`) and that group, held weakly.
_PER_DEFAULT: dict = {}
_PER_DEFAULT_OWNER: Optional[weakref.ref] = None


def per_default_group(key, make: Callable[[], Any]) -> Any:
    """`make()`'s value for `key`, made at the first call under the current default process
    group and kept while it is current: creating groups is collective and slow (gloo connects
    every pair), so code that needs its own groups makes them once (every rank calls at the same
    point, as `make` is collective). Values made under an earlier default group go as soon as
    it is freed (destroy_process_group), or else at the next call here, and the groups among
    them that torch still has registered are destroyed: a process that initialises and destroys
    torch.distributed several times keeps no old group's threads and sockets. Not cached
    without an initialised default group."""
    global _PER_DEFAULT_OWNER
    pg = default_group()
    if pg is None:
        return make()
    owner = _PER_DEFAULT_OWNER() if _PER_DEFAULT_OWNER is not None else None
    if owner is not pg:
        _drop_per_default()
        _PER_DEFAULT_OWNER = weakref.ref(pg, _owner_freed)
    if key not in _PER_DEFAULT:
        _PER_DEFAULT[key] = make()
    return _PER_DEFAULT[key]


def _owner_freed(ref) -> None:
    if ref is _PER_DEFAULT_OWNER:
        _drop_per_default()


def _drop_per_default() -> None:
    values = list(_PER_DEFAULT.values())
    _PER_DEFAULT.clear()
    destroy_groups(_groups_in(values))


def _groups_in(value) -> list:
    """The ProcessGroups in `value` (a group, a `ProcessGroups`, or lists / tuples of them)."""
    if isinstance(value, (list, tuple)):
        return [g for v in value for g in _groups_in(v)]
    if isinstance(value, ProcessGroups):
        return [value.intra_node, value.cross_node]
    return [value] if dist.is_available() and isinstance(value, dist.ProcessGroup) else []


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


# This thread's replacements for named groups (and "world" for None): a pipeline's
# background thread runs its collectives on groups of its own (`groups_for_this_thread`).
_THREAD = threading.local()


@contextlib.contextmanager
def groups_for_this_thread(groups: dict):
    """Within the block, collectives this thread issues on group name ``k`` (``"world"`` also
    for ``group=None``) use ``groups[k]`` instead: a second stream of collectives, on groups
    with the same ranks, that runs beside the main thread's without interleaving with it."""
    before = getattr(_THREAD, "groups", None)
    _THREAD.groups = dict(groups)
    try:
        yield
    finally:
        _THREAD.groups = before


def resolve_group(group):
    """The ProcessGroup (or None = WORLD) that ``group`` names. Names are looked up only when
    torch.distributed is initialised: without it every group is the one-rank identity."""
    mine = getattr(_THREAD, "groups", None)
    if mine is not None and (group is None or isinstance(group, str)):
        key = "world" if group is None else group
        if key in mine:
            return mine[key]
    if not isinstance(group, str):
        return group
    if not _initialised():
        return None
    if group not in _GROUPS:
        raise ValueError(f"comm: unknown process group name {group!r}; registered: {sorted(_GROUPS)}")
    return _GROUPS[group]


def default_group():
    """The default process group, or None when torch.distributed is not initialised. Cheap:
    `fxrec.ShardedModel` compares it with the one it was sharded on at every forward."""
    return dist.group.WORLD if dist.is_available() else None


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not _initialised():
        return 1
    return dist.get_world_size(resolve_group(group))


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not _initialised():
        return 0
    return dist.get_rank(resolve_group(group))


def collective_device(group=None) -> torch.device:
    """Where a host-side collective over `group` takes its tensors: the current GPU under NCCL
    (it moves only CUDA tensors), else the CPU (gloo, or no process group)."""
    if _initialised() and dist.get_backend(resolve_group(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_splits(splits: Splits, what: str, w: int, op: str = "all_to_all") -> list[int]:
    if isinstance(splits, Tensor):
        splits = splits.tolist()
    splits = [int(s) for s in splits]
    if len(splits) != w:
        raise ValueError(f"{op}: {what} has {len(splits)} entries, expected one per rank ({w})")
    if any(s < 0 for s in splits):
        raise ValueError(f"{op}: {what} has a negative size: {splits}")
    return splits


def _rows(x: Tensor, n: int) -> tuple[int, ...]:
    return (n, *x.shape[1:])


def _need_dim0(x: Tensor, op: str) -> None:
    if x.dim() == 0:
        raise ValueError(f"{op}: expected a tensor with at least one dimension, got a scalar")


def _eager(fn):
    """Kept out of dynamo's graphs (`torch.compile` of a sharded model): a collective runs
    eagerly between the graphs around it. Traced, its host-side split sizes became symbolic
    once a new batch size made dynamo recompile with dynamic shapes, and the graph it built
    around the autograd Function failed (values of one graph used in another)."""
    return torch.compiler.disable(fn)


# ------------------------------------------------------------------ all_to_all
def _a2a(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty(_rows(x, sum(out_splits)))
    if x.is_meta:
        return out
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        # The adjoint sends each received block back where it came from.
        return _a2a(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


@_eager
def all_to_all(x: Tensor, output_split_sizes: Splits, input_split_sizes: Splits, group=None) -> Tensor:
    """Rank r sends rows ``x[sum(in[:i]) : sum(in[:i+1])]`` to rank i and receives
    ``output_split_sizes[i]`` rows from rank i, concatenated in rank order.

    Split sizes are lists of W non-negative ints (or int tensors); ``sum(input_split_sizes)``
    must equal ``x.shape[0]``, and each rank's output size for i must equal rank i's input
    size for this rank (the caller's contract, usually established by `all_to_all_counts`).
    Backward: the all-to-all of the gradient with the splits swapped.
    """
    _need_dim0(x, "all_to_all")
    group = resolve_group(group)
    w = world_size(group)
    out_splits = _as_splits(output_split_sizes, "output_split_sizes", w)
    in_splits = _as_splits(input_split_sizes, "input_split_sizes", w)
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: input_split_sizes {in_splits} sum to {sum(in_splits)} "
                         f"but x has {x.shape[0]} rows")
    if w == 1:
        if out_splits != in_splits:
            raise ValueError(f"all_to_all: with one rank output_split_sizes {out_splits} "
                             f"must equal input_split_sizes {in_splits}")
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


@_eager
def all_to_all_counts(counts: Tensor, group=None) -> Tensor:
    """Exchange equal blocks of counts: ``counts`` has W*k entries, block i (entries
    ``i*k:(i+1)*k``) goes to rank i; the result holds rank j's block for this rank at
    ``j*k:(j+1)*k``. Same dtype as ``counts`` (int64 in practice); not differentiable."""
    group = resolve_group(group)
    w = world_size(group)
    if counts.dim() != 1 or counts.numel() % w:
        raise ValueError(f"all_to_all_counts: expected a 1-D tensor with a multiple of {w} "
                         f"(world size) entries, got shape {tuple(counts.shape)}")
    if w == 1:
        return counts
    counts = counts.detach().contiguous()
    out = torch.empty_like(counts)
    if not counts.is_meta:
        dist.all_to_all_single(out, counts, group=group)
    return out


# ------------------------------------------------------------------ reduce_scatter / all_gather
def _rs(x: Tensor, w: int, group) -> Tensor:
    out = x.new_empty(_rows(x, x.shape[0] // w))
    if not x.is_meta:
        _reduce_scatter_single(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def _ag(x: Tensor, w: int, group) -> Tensor:
    out = x.new_empty(_rows(x, x.shape[0] * w))
    if not x.is_meta:
        _all_gather_single(out, x.contiguous(), group=group)
    return out


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group):
        ctx.w, ctx.group = w, group
        return _rs(x, w, group)

    @staticmethod
    def backward(ctx, grad):
        return _ag(grad, ctx.w, ctx.group), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group):
        ctx.w, ctx.group = w, group
        return _ag(x, w, group)

    @staticmethod
    def backward(ctx, grad):
        return _rs(grad, ctx.w, ctx.group), None, None


def _rs_v(x: Tensor, splits: list[int], rank: int, group) -> Tensor:
    """reduce_scatter of uneven chunks: each chunk padded (zeros) to the largest, the
    collective on equal chunks, this rank's part kept."""
    width = max(splits)
    padded = x.new_zeros(_rows(x, width * len(splits)))
    for r, part in enumerate(x.split(splits)):
        padded[r * width:r * width + splits[r]] = part
    return _rs(padded, len(splits), group)[:splits[rank]]


def _ag_v(x: Tensor, sizes: list[int], group) -> Tensor:
    """all_gather of uneven blocks (rank r's has sizes[r] rows): each padded to the largest,
    the collective on equal blocks, the padding dropped."""
    width = max(sizes)
    mine = x.new_zeros(_rows(x, width))
    mine[:x.shape[0]] = x
    every = _ag(mine, len(sizes), group)
    return torch.cat([every[r * width:r * width + n] for r, n in enumerate(sizes)])


class _ReduceScatterV(torch.autograd.Function):
    """`_rs_v`; backward `_ag_v` of the gradients. Only for uneven splits: equal ones take
    `_ReduceScatter` as they are."""

    @staticmethod
    def forward(ctx, x, splits, rank, group):
        ctx.splits, ctx.group = splits, group
        return _rs_v(x, splits, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _ag_v(grad, ctx.splits, ctx.group), None, None, None


@_eager
def reduce_scatter(x: Tensor, group=None, split_sizes: Optional[Splits] = None) -> Tensor:
    """Sum ``x`` over the ranks of ``group``; dim 0 is cut into W chunks and rank r gets the
    sum of every rank's chunk r. Chunks are equal (``x.shape[0]`` a multiple of W) unless
    `split_sizes` gives each rank's (W non-negative ints, the same on every rank, summing to
    ``x.shape[0]``): uneven chunks travel padded to the largest. Backward: all_gather of the
    grad."""
    _need_dim0(x, "reduce_scatter")
    group = resolve_group(group)
    w = world_size(group)
    if split_sizes is not None:
        splits = _as_splits(split_sizes, "split_sizes", w, "reduce_scatter")
        if sum(splits) != x.shape[0]:
            raise ValueError(f"reduce_scatter: split_sizes {splits} sum to {sum(splits)} but x has "
                             f"{x.shape[0]} rows")
        if w > 1 and len(set(splits)) > 1:
            return _ReduceScatterV.apply(x, splits, dist.get_rank(group), group)
    if x.shape[0] % w:
        raise ValueError(f"reduce_scatter: dim 0 of x ({x.shape[0]}) is not a multiple of the "
                         f"world size {w}")
    if w == 1:
        return x
    return _ReduceScatter.apply(x, w, group)


class _AllGatherV(torch.autograd.Function):
    """`_ag_v`; backward `_rs_v` of the gradient (the transpose of `_ReduceScatterV`)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _ag_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _rs_v(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


_MAX_DIMS = 8


def _shapes(x: Tensor, w: int, group) -> list[tuple[int, ...]]:
    """Every rank's shape of `x` (one small all_gather)."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather: at most {_MAX_DIMS} dimensions, got {x.dim()}")
    mine = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=x.device)
    mine[0] = x.dim()
    mine[1:x.dim() + 1] = torch.tensor(x.shape, dtype=torch.int64)
    every = mine.new_empty(w * (_MAX_DIMS + 1))
    _all_gather_single(every, mine, group=group)
    rows = every.view(w, _MAX_DIMS + 1).tolist()
    return [tuple(r[1:r[0] + 1]) for r in rows]


@_eager
def all_gather(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``x`` on dim 0 in rank order. The first dims may differ (a
    last, shorter batch); the others must match on every rank, else every rank raises a
    ValueError naming each rank's shape (one small exchange of shapes comes first).
    Backward: reduce_scatter (sum) of the grad, so each rank gets the sum of every rank's
    gradient for its own block."""
    _need_dim0(x, "all_gather")
    group = resolve_group(group)
    w = world_size(group)
    if w == 1:
        return x
    shapes = _shapes(x, w, group) if not x.is_meta else [tuple(x.shape)] * w
    if len({s[1:] for s in shapes}) > 1:
        raise ValueError(f"all_gather: every rank's tensor must have the same shape past dim 0; the ranks' "
                         f"shapes are {shapes}")
    sizes = [s[0] for s in shapes]
    if len(set(sizes)) == 1:
        return _AllGather.apply(x, w, group)
    return _AllGatherV.apply(x, sizes, rank(group), group)


# ------------------------------------------------------------------ all_reduce
def _ar(x: Tensor, op: str, w: int, group) -> Tensor:
    out = x.detach().clone(memory_format=torch.contiguous_format)
    if not x.is_meta:
        # SUM then divide rather than ReduceOp.AVG: the same numbers on every backend.
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        if op == "avg":
            out.div_(w)
    return out


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, w, group):
        ctx.op, ctx.w, ctx.group = op, w, group
        return _ar(x, op, w, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's output depends on every input alike: the adjoint is the same reduction.
        return _ar(grad, ctx.op, ctx.w, ctx.group), None, None, None


@_eager
def all_reduce(x: Tensor, op: str = "sum", group=None) -> Tensor:
    """A new tensor holding the sum ("sum") or mean ("avg") of ``x`` over the ranks of
    ``group``; ``x`` is not modified. "avg" needs a floating dtype. Differentiable (the
    backward is the same reduction of the grad)."""
    if op not in ("sum", "avg"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'avg', got {op!r}")
    if op == "avg" and not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"all_reduce: op='avg' needs a floating-point tensor, got {x.dtype}")
    group = resolve_group(group)
    w = world_size(group)
    if w == 1:
        return x
    if x.requires_grad:
        return _AllReduce.apply(x, op, w, group)
    return _ar(x, op, w, group)


for _name in ("all_to_all", "all_to_all_counts", "reduce_scatter", "all_gather", "all_reduce"):
    torch.fx.wrap(_name)


# ------------------------------------------------------------------ errors, agreed
def agree(error: Optional[Exception], value: Any = None, group=None, collective: bool = True) -> list:
    """Every rank's `value`, in rank order, from one exchange (``all_gather_object``, so every
    rank of `group` calls it at the same point) when no rank has an `error`. Where one does,
    every rank raises the first failing rank's: its type (or nearest base that a message
    rebuilds, `_portable`) with ``"rank r: "`` before its message, chained from `error` on
    that rank. A rank that raised alone left the others waiting, until the process group's
    timeout, in a collective it never reached. With one rank, or ``collective=False`` (this
    process alone), no exchange: `error` itself is raised, else ``[value]`` returned. `value`
    must pickle (all_gather_object pickles on this rank alone)."""
    group = resolve_group(group)
    w = world_size(group)
    if not collective or w == 1:
        if error is not None:
            raise error
        return [value]
    everyone: list = [None] * w
    dist.all_gather_object(everyone, (None if error is None else _portable(error), value), group=group)
    for r, (failed, _) in enumerate(everyone):
        if failed is not None:
            kind, message = failed
            raise kind(f"rank {r}: {message}") from error
    return [v for _, v in everyone]


def _portable(e: Exception) -> tuple[type, str]:
    """(an exception type another rank can rebuild from a message alone, `e`'s message): `e`'s
    own type where it takes one message and pickles (ValueError, PlanError, ExampleIdError),
    else its nearest builtin base (PassError's __init__ takes three arguments)."""
    message = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    for kind in type(e).__mro__:
        try:
            kind(message)
            pickle.dumps(kind)
            return kind, message
        except Exception:  # noqa: BLE001 - not rebuildable: try its base
            continue
    return RuntimeError, message


# ------------------------------------------------------------------ process groups
class ProcessGroups:
    """The groups a sharded program talks over, built from ``ranks_per_node``.

    - ``world``: the default group (None, which every function here reads as WORLD).
    - ``intra_node``: this rank's node, ranks ``[node*rpn, (node+1)*rpn)``.
    - ``cross_node``: the ranks with this rank's local index on every node
      (``local_rank, local_rank + rpn, ...``).
    ``intra_node_ranks`` / ``cross_node_ranks`` list the global ranks of each. Every rank must
    construct ProcessGroups at the same point of the program (``dist.new_group`` is collective
    and creation order must match). With ``register=True`` the groups are also registered as
    "intra_node" and "cross_node" for ``group=<name>`` in graph code. Without an initialised process group (one process), the
    groups are None and every collective is the identity.
    """

    def __init__(self, topology=None, ranks_per_node: Optional[int] = None, register: bool = True):
        w = world_size()
        rpn = ranks_per_node if ranks_per_node is not None else getattr(topology, "ranks_per_node", None)
        if topology is not None and topology.world_size != w:
            raise ValueError(f"ProcessGroups: topology has world_size {topology.world_size} but the "
                             f"process group has {w} ranks")
        rpn = w if rpn is None else int(rpn)
        if rpn < 1 or w % rpn:
            raise ValueError(f"ProcessGroups: world size {w} is not a multiple of ranks_per_node {rpn}")
        self.world_size, self.ranks_per_node, self.rank = w, rpn, rank()
        self.num_nodes = w // rpn
        self.node, self.local_rank = divmod(self.rank, rpn)
        self.intra_node_ranks = list(range(self.node * rpn, (self.node + 1) * rpn))
        self.cross_node_ranks = list(range(self.local_rank, w, rpn))
        self.world = None
        self.intra_node = self.cross_node = None
        if dist.is_available() and dist.is_initialized():
            # Creation is collective: every rank creates every group, in the same order.
            for node in range(self.num_nodes):
                g = dist.new_group(list(range(node * rpn, (node + 1) * rpn)))
                if node == self.node:
                    self.intra_node = g
            for local in range(rpn):
                g = dist.new_group(list(range(local, w, rpn)))
                if local == self.local_rank:
                    self.cross_node = g
        if register:
            register_group("intra_node", self.intra_node)
            register_group("cross_node", self.cross_node)

    def __deepcopy__(self, memo: dict) -> "ProcessGroups":
        """Itself: a deep copy of a sharded program (``copy.deepcopy(sharded)``) talks over the
        same groups, and a ProcessGroup cannot be copied."""
        return self

    def __repr__(self) -> str:
        return (f"ProcessGroups(rank={self.rank}, world_size={self.world_size}, "
                f"ranks_per_node={self.ranks_per_node}, intra_node={self.intra_node_ranks}, "
                f"cross_node={self.cross_node_ranks})")
