"""Checkpoints: save a model sharded under one plan, load it under any other.

    fxrec.checkpoint.save(sharded, "ckpt/step_1000", optimizer=dense_opt)  # every rank calls it
    ...
    fxrec.checkpoint.load(sharded, "ckpt/step_1000", optimizer=dense_opt)  # any plan, any world size

A checkpoint is a torch.distributed.checkpoint (DCP) directory keyed as the unsharded model:

- the unsharded model's state_dict keys. Each rank writes only what it holds: a sharded table
  goes to DCP as a ShardedTensor over the live shard views (no table is gathered or copied);
  a replicated table, the dense parameters and buffers, equal on every rank, are written once
  (DCP keeps one copy of a key that several ranks write whole);
- ``sparse_optimizer.<table key>.<state>``: the fused optimizer's state, tiled like its table:
  RowWiseAdagrad's ``momentum`` and Adam's ``step`` per row (``rows``), Adam's ``exp_avg`` and
  ``exp_avg_sq`` per element (``rows x dim``). A column_wise table's shards all see the same ids,
  so they hold the same per-row state, written once. The exception is
  ``RowWiseAdagrad(exact_column_wise=False)``, TorchRec's accumulator per column shard: its
  ``momentum`` is ``rows x shards`` and loads only into as many column shards;
- ``dense_optimizer``: the torch optimizer's state over the dense parameters, keyed by their
  paths (torch's ``get_optimizer_state_dict``), when `save` is given the optimizer;
- ``fxrec_extra.<key>``: the caller's values (`save`'s ``extra``, returned by `load`).

A model key under one of these prefixes (a submodule named ``sparse_optimizer``,
``dense_optimizer`` or ``fxrec_extra``) would be mistaken for them: save and load refuse it.

Loading reshards: for each piece this rank holds under *its* plan, DCP reads the overlapping
parts of the saved pieces, in place into the live shards. So a checkpoint written by 2 ranks
loads on 4, under another plan, into a model built on the meta device, or into the plain
unsharded model (`load(model, path)` with an ``nn.Module``: whole tables, no process group).
The keys and shapes are checked against the checkpoint's metadata before anything is read,
so a mismatch names the key (and table) and both shapes instead of failing half-loaded.

Save and load of a ShardedModel are collective (every rank calls them); of a plain module,
local (one process). A module that holds a ShardedModel is neither, and refused: save the
ShardedModel itself.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from fxrec.lowering.sparse_update import ROW_STATE
from fxrec.optim import RowWiseAdagrad, for_table
from fxrec.runtime import comm
from fxrec.shard import ShardedModel

__all__ = ["save", "load", "read_extra", "state_dict", "SPARSE_PREFIX", "DENSE_OPTIMIZER"]

SPARSE_PREFIX = "sparse_optimizer"
DENSE_OPTIMIZER = "dense_optimizer"
EXTRA = "fxrec_extra"  # not "extra": a submodule may well be named so

PathLike = Union[str, os.PathLike]

# A background save runs DCP in a thread of its own, past `_quiet`'s reach (warning filters are
# process-wide, and catch_warnings is not thread-safe), so the two notices that fxrec's own use
# of DCP triggers there are filtered for torch's modules once, here (see `_quiet` for why they
# are not news to an fxrec user).
for _notice in ("torch.distributed is .*unavailable or uninitialized, assuming the intent is to save",
                "Please use DTensor instead and we are deprecating ShardedTensor"):
    warnings.filterwarnings("ignore", message=_notice, module=r"torch\.")


# ------------------------------------------------------------------ the state dict
def _placed(size: tuple, local: list, everyone: list, rank: int,
            always: Optional[tuple[torch.dtype, torch.device]] = None) -> Optional[Tensor]:
    """This rank's pieces of one global tensor of `size`, as DCP takes them.

    local: ``(offsets, live view)`` of this rank; everyone: ``(rank, offsets, sizes)`` of every
    piece on every rank, tiling `size` without overlap (DCP's ShardedTensor needs the whole
    layout). None when this rank holds nothing; the view itself when it holds the whole.
    always: ``(dtype, device)``: a ShardedTensor on every rank instead, with no local shard
    where this rank holds none (TorchRec's state_dict: the same keys on every rank)."""
    local = [(tuple(o), t) for o, t in local if t.numel()]
    if always is None:
        if not local:
            return None
        if len(local) == 1 and tuple(local[0][1].shape) == tuple(size):
            return local[0][1]
    device = local[0][1].device if local else always[1]
    metas = [ShardMetadata(list(o), list(z), f"rank:{r}/{device}") for r, o, z in everyone if math.prod(z)]
    views = dict(local)
    shards = [Shard(views[tuple(m.shard_offsets)], m) for m in metas if m.placement.rank() == rank]
    props = TensorProperties.create_from_tensor(local[0][1]) if local else \
        TensorProperties(dtype=always[0], layout=torch.strided, requires_grad=False)
    layout = ShardedTensorMetadata(metas, torch.Size(size), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, layout)


def _layout(model: ShardedModel, table: str) -> tuple:
    """(rows, dim, every shard as (rank, offsets, sizes), by rows only, column starts)."""
    info, shards = model._tables[table], model.plan[table].shards
    tiles = [(s.rank, (s.rows[0], s.cols[0]), (s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])) for s in shards]
    rows = [(s.rank, (s.rows[0],), (s.rows[1] - s.rows[0],)) for s in shards]
    return info.num_embeddings, info.embedding_dim, tiles, rows, sorted({s.cols[0] for s in shards})


def model_state(model: ShardedModel, keep_vars: bool = False, every_key: bool = False) -> dict:
    """`ShardedModel.state_dict`'s entries (unprefixed): the unsharded model's keys, a table as
    this rank's live pieces (`_placed`; absent where it holds none), dense values as tensors.
    every_key: in a process group of several ranks, every sharded table as a ShardedTensor on
    every rank, without local shards where the rank holds none, as TorchRec's state_dict
    gives it (a data_parallel table, whole on every rank, stays a tensor)."""
    rank, out = _rank(), {}
    dense = model.module.state_dict(keep_vars=keep_vars)
    weights = model.local_shards()
    spread = every_key and dist.is_initialized() and dist.get_world_size() > 1
    device = torch.device("cuda", torch.cuda.current_device()) if model.plan.topology.device == "cuda" \
        else torch.device("cpu")
    for key in model._keys:
        table = model._param_tables.get(key)
        if table in model._tables:
            n, d, tiles, _, _ = _layout(model, table)
            always = (model._tables[table].dtype, device) \
                if spread and model.plan[table].sharding != "data_parallel" else None
            value = _placed((n, d), [((r[0], c[0]), w) for r, c, w in weights.get(table, [])], tiles, rank,
                            always)
            if value is not None:
                out[key] = value
        elif key in dense or key in model._extra:
            out[key] = dense[key] if key in dense else model._extra[key]
    return out


def _sparse_state(model: ShardedModel) -> dict:
    """``sparse_optimizer.<key>.<state>`` for every table key this rank holds a piece of."""
    rank, out = _rank(), {}
    states = model.local_optimizer_state()
    for key in model._keys:
        table = model._param_tables.get(key)
        pieces = states.get(table, []) if table in model._tables else []
        if not pieces:
            continue
        n, d, tiles, rows, col_starts = _layout(model, table)
        opt = for_table(model.sparse_optimizer, table)
        per_shard = isinstance(opt, RowWiseAdagrad) and not opt.exact_column_wise and len(col_starts) > 1
        for name in pieces[0][2]:
            if name in ROW_STATE and per_shard and name == "momentum":
                cols = [(r, (0, col_starts.index(o[1])), (n, 1)) for r, o, _ in tiles]
                local = [((0, col_starts.index(c[0])), st[name].unsqueeze(1)) for r, c, st in pieces]
                value = _placed((n, len(col_starts)), local, cols, rank)
            elif name in ROW_STATE:
                # column shards hold whole rows, equal across shards: each is the whole tensor
                value = _placed((n,), [((r[0],), st[name]) for r, c, st in pieces], rows, rank)
            else:
                value = _placed((n, d), [((r[0], c[0]), st[name]) for r, c, st in pieces], tiles, rank)
            if value is not None:
                out[f"{SPARSE_PREFIX}.{key}.{name}"] = value
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               sparse_optimizer: bool = True, *, template: bool = False) -> dict:
    """What `save` writes and `load` reads, as live views (DCP's ``state_dict`` argument).

    model: a `ShardedModel` (its ``state_dict()``: this rank's pieces, see the module doc) or a
    plain module (its ``state_dict()``). optimizer: the torch optimizer over the dense
    parameters, under ``dense_optimizer``. sparse_optimizer: include the fused optimizer's
    state (a ShardedModel's). template: what `load` reads into (an optimizer without state
    yet gets a stand-in for DCP to overwrite; saved, it has none)."""
    _check_not_wrapped(model)
    if isinstance(model, ShardedModel):  # save and load are collective: in the group it was sharded on
        model._check_group()
    # a ShardedModel's pieces: only what this rank holds. Not its state_dict(), whose shard-less
    # ShardedTensors (TorchRec's keys on every rank) made DCP's load of a checkpoint beside the
    # dense optimizer's state fail ("Missing key in checkpoint state_dict: dense_optimizer.param_groups")
    out = model_state(model) if isinstance(model, ShardedModel) else dict(model.state_dict())
    reserved = [k for k in out if k == DENSE_OPTIMIZER or k.startswith((DENSE_OPTIMIZER + ".", SPARSE_PREFIX + ".",
                                                                         EXTRA + "."))]
    if reserved:
        raise ValueError(f"fxrec.checkpoint: the model's key {reserved[0]!r} starts like the checkpoint's own "
                         f"entries ({SPARSE_PREFIX}., {DENSE_OPTIMIZER}, {EXTRA}.); rename that submodule")
    if isinstance(model, ShardedModel) and sparse_optimizer:
        out.update(_sparse_state(model))
    module = model.module if isinstance(model, ShardedModel) else model
    if optimizer is not None:
        out[DENSE_OPTIMIZER] = _dense_state(module, optimizer, template)
    return out


def _check_not_wrapped(model: nn.Module) -> None:
    """A module holding a ShardedModel is neither: saved as a plain module, each rank wrote its
    own pieces locally into the same files (a corrupt checkpoint, silently). Refused, on every
    rank alike (the module tree is the same on each), before anything is written or read."""
    if isinstance(model, ShardedModel):
        return
    inner = next((name for name, m in model.named_modules() if isinstance(m, ShardedModel)), None)
    if inner is not None:
        raise ValueError(f"fxrec.checkpoint: the {type(model).__name__} holds a ShardedModel at {inner!r}; a "
                         "checkpoint is of a ShardedModel itself (every rank calls save and load) or of a plain "
                         f"module (one process). Save and load model.{inner} itself, and the rest of the "
                         f"{type(model).__name__} apart (its tensors in extra=, say)")


def _dense_state(module: nn.Module, optimizer: torch.optim.Optimizer, template: bool) -> dict:
    """torch's get_optimizer_state_dict, without its side effect: an optimizer with no state
    yet (before its first step) gets state made by a step with zero gradients, which moves
    Adam's step count and seeds momentum buffers, so training after a save would differ from
    training without it. Such an optimizer is put back as it was; it is saved without state,
    and for a load (`template`) the state made serves only as what DCP reads into."""
    _check_dense_params(module, optimizer)
    if optimizer.state:
        return get_optimizer_state_dict(module, optimizer)
    before = optimizer.state_dict()
    osd = get_optimizer_state_dict(module, optimizer)
    optimizer.load_state_dict(before)
    if not template:
        osd["state"] = {}
    return osd


def _check_dense_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The dense optimizer's state is keyed by its parameters' paths in the model; one that is
    not the model's has none (torch's get_optimizer_state_dict fails with a bare KeyError)."""
    mine = {id(p) for p in module.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in mine:
                raise ValueError(f"fxrec.checkpoint: the dense optimizer holds a parameter that is not the model's "
                                 f"(param_groups[{g}]['params'][{i}], shape {tuple(p.shape)}), so its state has no "
                                 "key; make it a parameter of a submodule, or give it an optimizer of its own and "
                                 "save its tensors in extra=")


# ------------------------------------------------------------------ save / load
def _collective(model: nn.Module) -> bool:
    return isinstance(model, ShardedModel) and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process save/load that it assumes one process; here that is
    the documented intent (a plain module, or a ShardedModel of one rank), not a surprise. It
    also warns that ShardedTensor is deprecated for DTensor, each time it touches one; but a
    DTensor's placements cannot say "rows 0-99 on rank 3, columns 8-15 on rank 1" (uneven
    row ranges, a table on a chosen rank), which a plan does, and ShardedTensor can."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
        yield


def _flag(fn: str, name: str, value) -> None:
    """A flag is True or False: anything else was read as truthy (background="yes" saved in the
    background, strict="no" loaded strictly, sparse_optimizer="adam" did not pick an optimizer)."""
    if not isinstance(value, bool):
        raise TypeError(f"fxrec.checkpoint.{fn}: {name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")


def _arguments(fn: str, model, path, optimizer, extra=None) -> None:
    """TypeErrors naming save's / load's argument: a wrong type failed further on with an
    AttributeError on it ('str' object has no attribute 'param_groups'), or, for the path,
    os.fspath's message, which names no argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxrec.checkpoint.{fn}: model must be the ShardedModel (or a plain torch.nn.Module), "
                        f"got {type(model).__name__}")
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"fxrec.checkpoint.{fn}: path must be a directory path (str or os.PathLike), got "
                        f"{type(path).__name__} {path!r}")
    if optimizer is not None and not (hasattr(optimizer, "state_dict") and hasattr(optimizer, "param_groups")):
        raise TypeError(f"fxrec.checkpoint.{fn}: optimizer must be the dense torch.optim optimizer (or None), got "
                        f"{type(optimizer).__name__} {optimizer!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"fxrec.checkpoint.{fn}: extra must be a dict of str keys, got {type(extra).__name__}")


def save(model: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[dict] = None, background: bool = False) -> Optional[Future]:
    """Write `model` (and the dense `optimizer`'s state) to the DCP directory `path`.

    extra: the caller's own values (a step count, a data loader's position), a flat dict of
    str keys to tensors or picklable values (no dicts, no lists holding tensors: DCP would
    split them into keys of their own), given back by `load`; under ``fxrec_extra.<key>``.
    background: copy this rank's state to CPU memory now, write it in a background thread,
    and return at once a Future that completes when the checkpoint is whole (the next save or
    load waits for it; call ``.result()`` before the process exits). Training may go on
    meanwhile: the checkpoint holds the values of the moment `save` was called. The copy
    costs memory for this rank's pieces; ranks coordinate on a gloo group of their own, so
    the writes never interleave with the model's collectives.
    A checkpoint already at `path` is replaced: its metadata is removed first, so a save that
    does not finish leaves no checkpoint there rather than a mix of the old and the new (save
    elsewhere to keep the last one while writing the next). Collective for a ShardedModel:
    every rank calls it with the same path, extra and background."""
    _flag("save", "background", background)
    _arguments("save", model, path, optimizer, extra)
    sd = state_dict(model, optimizer)
    for key, value in (extra or {}).items():
        nested = isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value)
        if not isinstance(key, str) or isinstance(value, dict) or nested:
            raise ValueError(f"fxrec.checkpoint.save: extra must map str keys to tensors or picklable "
                             f"values (not dicts, nor lists holding tensors: give each tensor a key of its "
                             f"own); got {key!r}: {type(value).__name__}")
        sd[f"{EXTRA}.{key}"] = value
    _wait_for_background()
    collective = _collective(model)
    group = _background_group() if background and collective else None
    _clear(os.fspath(path), collective, group)
    # _clear removed the old metadata; overwrite=True spells out that old data files may stay
    writer = dcp.FileSystemWriter(os.fspath(path), overwrite=True)
    with _quiet():
        if not background:
            try:
                dcp.save(sd, storage_writer=writer, no_dist=not collective)
            except dcp.api.CheckpointException as e:  # a BaseException: a full disk, a failing write
                raise _write_failed(os.fspath(path), e) from e
            return None
        if collective:
            done = dcp.async_save(sd, storage_writer=writer, process_group=group)
        else:
            done = dcp.async_save(sd, storage_writer=writer, no_dist=True)
    _BACKGROUND[0] = (done, os.fspath(path))
    return done


_BACKGROUND: list = [None]  # this process's last background save: (its Future, its path)


def _wait_for_background() -> None:
    """Finish this process's last background save (its error, if any, is raised here): a
    save or load must not overlap it, on disk or on the background group's collectives."""
    last, _BACKGROUND[0] = _BACKGROUND[0], None
    if last is not None:
        done, path = last
        try:
            done.result()
        except dcp.api.CheckpointException as e:
            raise _write_failed(path, e) from e


def _failures(e) -> str:
    """DCP's per-rank failures of `e` (a CheckpointException), one clause each."""
    return "; ".join(f"rank {r}: {type(err[0]).__name__}: {err[0]}" if isinstance(err, tuple) else
                     f"rank {r}: {err}" for r, err in sorted(e.failures.items()))


def _write_failed(where: str, e) -> OSError:
    """A save that failed while writing, as an OSError naming where and why: DCP's own
    exception is a BaseException (an `except Exception` misses it) whose text ends in the
    bare error. The metadata is written last, so no checkpoint was left there."""
    return OSError(f"fxrec.checkpoint.save: writing {where!r} failed ({_failures(e)}); no checkpoint was left "
                   f"there")


def _clear(path: str, collective: bool, group) -> None:
    """A save replaces the checkpoint at `path`, whose metadata goes first: DCP writes the
    new metadata last, so a save cut short leaves no checkpoint there (`load` says so) rather
    than the old metadata over half-rewritten data, which would load a silent mix of both.
    Rank 0 removes it; the others wait, so none sees the old one while planning. Where rank 0
    cannot, every rank raises its error (the others would otherwise wait for it forever)."""
    error, why = None, _cleared(path) if _rank() == 0 else None
    if why is not None:
        kind, message = why
        error = kind(f"fxrec.checkpoint.save: {message}")
    comm.agree(error, group=group, collective=collective)  # the exchange is also the wait


def _cleared(path: str) -> Optional[tuple]:
    """Make `path` a directory without metadata that this process can write into; None, or
    why not as (an OSError type, message). Probed before DCP starts, so a path that is a file,
    a `.metadata` that is a directory or a directory without write permission is named here,
    not met midway by one rank."""
    metadata = os.path.join(path, ".metadata")
    if os.path.exists(path) and not os.path.isdir(path):
        return NotADirectoryError, f"{path!r} is a file, not a checkpoint directory"
    try:
        os.makedirs(path, exist_ok=True)
        if os.path.isdir(metadata):
            return IsADirectoryError, f"{metadata!r} is a directory, where a checkpoint has its metadata file"
        with contextlib.suppress(FileNotFoundError):
            os.remove(metadata)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".fxrec_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return type(e), f"cannot write a checkpoint at {path!r}: {type(e).__name__}: {e}"
    return None


def _background_group():
    """A gloo group over all ranks for background saves, made once per default process group
    (collectively: every rank's first background save makes it at the same point) and gone
    with it (`comm.per_default_group`)."""
    return comm.per_default_group("fxrec.checkpoint.background", lambda: dist.new_group(backend="gloo"))


@torch.no_grad()
def load(model: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None,
         sparse_optimizer: bool = True, strict: bool = True) -> dict:
    """Read the checkpoint at `path` into `model` in place, whatever plan or world size wrote
    it (module doc). optimizer: restore the dense optimizer's state too (it must have been
    saved). sparse_optimizer=False: the tables' weights only, leaving the fused optimizer's
    state as it is (e.g. a checkpoint of the plain model, or of another sparse optimizer).
    strict=False: what the checkpoint lacks (a table or layer added since, another sparse
    optimizer's state, the dense optimizer's, or another dense optimizer type's or param-group
    layout's) is left as it is and named in a warning, to warm-start a grown model; a shape
    that differs still raises.

    Collective for a ShardedModel. Raises FileNotFoundError for a path that holds no
    checkpoint and ValueError for a key the checkpoint lacks (strict) or a shape that
    differs; on every rank, with the first failing rank's message, before anything is read.
    Returns the `extra` dict given to `save` (empty if none)."""
    _flag("load", "sparse_optimizer", sparse_optimizer)
    _flag("load", "strict", strict)
    _arguments("load", model, path, optimizer)
    path = os.fspath(path)
    _wait_for_background()
    sd = state_dict(model, optimizer, sparse_optimizer, template=True)
    with _quiet():
        problem, absent, saved = _problem(model, sd, path, strict)
    error = None
    if problem is not None:
        kind, message = problem
        error = (FileNotFoundError if kind == "missing" else ValueError)(f"fxrec.checkpoint.load: {message}")
    # one rank's problem stops every rank, not only that one; a key any rank skips is named
    everyone = comm.agree(error, absent, collective=_collective(model))
    skipped = sorted({k for keys in everyone for k in keys})
    for key in absent:
        sd.pop(key)
    if skipped and _rank() == 0:
        warnings.warn(f"fxrec.checkpoint.load: {path!r} lacks {len(skipped)} key(s) of this model, left as they "
                      f"were: {', '.join(skipped)}", stacklevel=3)  # the caller's line (past no_grad's wrapper)
    if DENSE_OPTIMIZER in absent:
        optimizer = None
    dropped = optimizer is not None and _only_saved_dense_state(sd[DENSE_OPTIMIZER], saved)
    sd.update(_extra_templates(saved))
    with _quiet():
        try:
            dcp.load(sd, storage_reader=dcp.FileSystemReader(path), no_dist=not _collective(model))
        except dcp.api.CheckpointException as e:  # a BaseException, whose text ends in the bare error
            raise ValueError(f"fxrec.checkpoint.load: reading {path!r} failed ({_failures(e)}); its data files are "
                             f"damaged or incomplete, and the model may be partly loaded") from e
    if optimizer is not None:
        set_optimizer_state_dict(model.module if isinstance(model, ShardedModel) else model, optimizer,
                                 sd[DENSE_OPTIMIZER], options=StateDictOptions(strict=not dropped))
    return {k[len(EXTRA) + 1:]: v for k, v in sd.items() if k.startswith(EXTRA + ".")}


def _only_saved_dense_state(osd: dict, saved: dict) -> bool:
    """Drop from the dense optimizer's template the parameters whose state the checkpoint
    lacks. torch's get_optimizer_state_dict gives a fresh optimizer state for every
    parameter, but one that never had a gradient (a layer applied under torch.no_grad(), an
    unused branch) had none when saved: it gets none now, as then. True if any was dropped."""
    prefix = f"{DENSE_OPTIMIZER}.state."
    kept = {k[len(prefix):] for k in saved if k.startswith(prefix)}
    dropped = [fqn for fqn in osd.get("state", {}) if not any(k.startswith(f"{fqn}.") for k in kept)]
    for fqn in dropped:
        del osd["state"][fqn]
    return bool(dropped)


def _other_dense_optimizer(osd: dict, saved: dict) -> Optional[str]:
    """Why the checkpoint's dense optimizer state (metadata `saved`) is not the template `osd`'s
    kind, or None. DCP fails on a key it lacks only while reading, after the model's weights
    may be read, with a message that reads like a damaged file; and a checkpoint with more
    param groups would load their hyperparameters into the wrong groups without a word. So the
    flattened keys are compared first: the groups' (their count, then each one's settings, which
    differ by optimizer type) and the state's of each parameter that had state when saved (one
    that had none gets none, see `_only_saved_dense_state`)."""
    groups = f"{DENSE_OPTIMIZER}.param_groups."
    saved_groups = {k for k in saved if k.startswith(groups)}
    count = len({k[len(groups):].partition(".")[0] for k in saved_groups})
    if count != len(osd["param_groups"]):
        return f"{count} param group(s) there, {len(osd['param_groups'])} in this optimizer"
    mine = {f"{groups}{i}.{name}" for i, group in enumerate(osd["param_groups"]) for name in group}
    # a group setting the checkpoint has beyond this optimizer's is no sign of another type: an
    # LR scheduler adds `initial_lr` to the groups it saves, and the optimizer is loaded before
    # the scheduler that needs it is built again; the groups are replaced whole, as torch does
    theirs = saved_groups & mine
    # the saved state's keys by parameter, in one pass (`<prefix>.state.<fqn>.<state name>`)
    states = f"{DENSE_OPTIMIZER}.state."
    saved_state: dict[str, set] = {}
    for key in saved:
        if key.startswith(states):
            saved_state.setdefault(key[len(states):].rpartition(".")[0], set()).add(key)
    for fqn, state in osd.get("state", {}).items():
        had = saved_state.get(fqn)
        if had:
            theirs |= had
            mine |= {f"{states}{fqn}.{name}" for name in state}
    missing, extra = sorted(mine - theirs), sorted(theirs - mine)
    if missing:
        return f"it has no {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra:
        return f"it has {extra[0]!r}, which this optimizer lacks" + (f", and {len(extra) - 1} more" if len(extra) > 1
                                                                       else "")
    return None


def _extra_templates(saved: dict) -> dict:
    """A value per ``extra.<key>`` of the checkpoint's metadata `saved`, for DCP to fill (it
    reads into what it is given)."""
    return {key: torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
            for key, md in saved.items() if key.startswith(EXTRA + ".")}


def read_extra(path: PathLike) -> dict:
    """`save`'s ``extra`` values alone, without a model (e.g. the step to resume from, before
    building the data stream). Local: any process may call it."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"fxrec.checkpoint.read_extra: no checkpoint at {path!r} (no .metadata file)")
    reader = dcp.FileSystemReader(path)
    sd = _extra_templates(reader.read_metadata().state_dict_metadata)
    if sd:
        with _quiet():
            dcp.load(sd, storage_reader=reader, no_dist=True)
    return {k[len(EXTRA) + 1:]: v for k, v in sd.items()}


def _problem(model: nn.Module, sd: dict, path: str, strict: bool = True):
    """(why this rank cannot read `path` into `sd`, as (kind, message), or None when it can: the
    checkpoint exists and has every key this rank reads, with this model's shape; the keys the
    checkpoint lacks, which a non-strict load leaves out; the checkpoint's metadata by key,
    read once here, or None when it could not be read)."""
    absent: list = []
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return ("missing", f"no checkpoint at {path!r} (no .metadata file)"), absent, None
    if not isinstance(model, ShardedModel):
        meta = [k for k, v in sd.items() if isinstance(v, Tensor) and v.is_meta]
        if meta:
            return ("model", (f"{meta[0]!r} is on the meta device; a plain module loads in place, so build "
                              "it on a real device (or shard it first)")), absent, None
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a damaged file: say which, and why
        return ("bad", f"cannot read the metadata of {path!r}: {type(e).__name__}: {e}"), absent, None
    # _param_tables maps every parameter and buffer (a dense one to its own path): keep the tables
    tables = {k: t for k, t in model._param_tables.items() if t in model._tables} \
        if isinstance(model, ShardedModel) else {}

    def what(key: str) -> str:
        base = key[len(SPARSE_PREFIX) + 1:].rpartition(".")[0] if key.startswith(SPARSE_PREFIX + ".") else key
        return f"{key!r} (table {tables[base]!r})" if base in tables else repr(key)

    if DENSE_OPTIMIZER in sd and not any(k.startswith(DENSE_OPTIMIZER + ".") for k in saved):
        if strict:
            return ("keys", f"{path!r} was saved without a dense optimizer's state; load it without "
                            "optimizer="), absent, saved
        absent.append(DENSE_OPTIMIZER)
    elif DENSE_OPTIMIZER in sd:
        other = _other_dense_optimizer(sd[DENSE_OPTIMIZER], saved)
        if other is not None:
            why = f"the dense optimizer state in {path!r} was saved by another optimizer type or param-group " \
                  f"layout ({other})"
            if strict:
                return ("keys", f"{why}; load it without optimizer= (or with strict=False) to leave this "
                                "optimizer as it is"), absent, saved
            if _rank() == 0:
                warnings.warn(f"fxrec.checkpoint.load: {why}; this optimizer is left as it was", stacklevel=4)
            absent.append(DENSE_OPTIMIZER)
    for key, value in sd.items():
        if key == DENSE_OPTIMIZER:
            continue
        if key not in saved:
            if not strict:
                absent.append(key)
                continue
            hint = ""
            if key.startswith(SPARSE_PREFIX + "."):
                hint = ("; it holds no such sparse optimizer state (saved with another sparse optimizer, or "
                        "from a plain model?): pass sparse_optimizer=False to load the weights only")
            return ("keys", f"{path!r} has no {what(key)}{hint}"), absent, saved
        md = saved[key]
        if isinstance(md, TensorStorageMetadata) and tuple(md.size) != tuple(value.size()):
            return ("shape", f"{what(key)} is {tuple(md.size)} in {path!r} and {tuple(value.size())} in "
                             "this model"), absent, saved
    return None, absent, saved
