"""`fxrec.shard`: the user's unsharded model in, this rank's `ShardedModel` out.

    model = DLRM(...)                                    # same seed on every rank
    sharded = fxrec.shard(model, fxrec.Topology(world_size=4), example_inputs,
                          sparse_optimizer=fxrec.optim.RowWiseAdagrad(lr=0.05))
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1)  # dense parameters only
    loss = loss_fn(sharded(*local_batch), labels); loss.backward(); opt.step()

Every rank calls `shard` (it is collective) with the same model and example inputs. The
model is captured, its lookups found and planned (rank 0's plan is broadcast so every rank
runs the same one), and `apply_plan` rewrites the graph into this rank's program.

Equivalence (DESIGN.md): W ranks each fed b local samples compute what the unsharded
model computes on the concatenated W*b global batch, and one step with the loss averaged
over each local batch leaves tables and dense parameters where the unsharded step on the
global batch (loss averaged over it) leaves them: dense gradients are averaged across
ranks in backward (`DenseGradSync`), sparse ones scaled by 1/W before the fused optimizer.
The dense buffers are DDP's: a training forward's batch statistics (BatchNorm) are its local
batch's, and every rank then holds rank 0's buffers (`BufferSync`).
Ranks may feed different local batch sizes (a job's last, short batch; an empty one), under
every sharding type: the bag counts travel with the ids, and row-wise reduce-scatters pad
their chunks to the largest batch.
This holds for RowWiseAdagrad on column_wise tables too (TorchRec/FBGEMM give each column
shard its own accumulator instead): the shards' per-row sums of g^2 are exchanged in
backward, so a row's accumulator sees its whole row (fxrec/runtime/row_sync.py).
"""
from __future__ import annotations

import copy
import itertools
import pickle
import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.fx import GraphModule

from fxrec.capture import capture, modes_kept
from fxrec.optim import NAMES, OPTIMIZERS, SGD, PerTable, RowWiseAdagrad, for_table, freeze
from fxrec.passes import lookup as L
from fxrec.passes.apply_plan import ROOT, apply_plan_pass, build_units, check_plan
from fxrec.passes.runner import PassContext, run_passes
from fxrec.runtime import comm
from fxrec.runtime.local_lookup import LocalLookup, ReplicatedLookup, shard_pieces, state_pieces
from fxrec.runtime.tables import deterministic_init, gather_full, shard_from_full
from fxrec.types import whole, wire_dtype

__all__ = ["shard", "ShardedModel", "DEFAULT_SPARSE_OPTIMIZER"]

# TorchRec's fused default: plain SGD on the touched rows.
DEFAULT_SPARSE_OPTIMIZER = SGD(lr=0.01)


class ShardedModel(nn.Module):
    """This rank's part of a sharded model. ``forward`` takes the user's arguments (the
    local batch); ``parameters()`` are the dense parameters only (their gradients are
    averaged across ranks during backward); the tables' shards are buffers, trained by
    the fused sparse optimizer inside backward. ``module`` is the rewritten GraphModule."""

    def __init__(self, gm: GraphModule, plan, state_keys: list[str], tables: dict, extra: dict, grad_sync=None,
                 sparse_optimizer=None, frozen=(), other_mode: Optional[GraphModule] = None, buffer_sync=None):
        super().__init__()
        self.module = gm
        # the program of the other mode, for a forward that branches on self.training: it shares
        # `module`'s shards and dense modules, so it is kept out of the module tree (no state)
        self.__dict__["_other_mode"] = other_mode
        self._plan, self._keys, self._tables, self._extra = plan, list(state_keys), tables, extra
        self._sparse_optimizer = sparse_optimizer
        self.frozen = tuple(frozen)  # tables the user's model does not train (`fxrec.optim.freeze`)
        self._param_tables = gm.meta.get(L.PARAM_TABLES, {})
        self.grad_sync = grad_sync
        self.buffer_sync = buffer_sync  # rank 0's dense buffers to every rank after a training forward
        if grad_sync is not None:
            # The hooks sit on the user's own parameters: they go with this model (module doc of
            # fxrec.runtime.grad_sync), so a dropped ShardedModel frees its dense part's gradients
            # and buckets, and sharding the model again does not stack all-reduces. The callback
            # holds the DenseGradSync only, never this model.
            weakref.finalize(self, grad_sync.remove)
        # The process group the program was sharded on (a weak reference: a ProcessGroup cannot
        # be deep-copied), None without one. `_check_group` compares it with the current one.
        pg = comm.default_group()
        self.__dict__["_group"] = None if pg is None else weakref.ref(pg)

    def __deepcopy__(self, memo: dict) -> "ShardedModel":
        """``copy.deepcopy(sharded)`` (and ``torch.optim.swa_utils.AveragedModel(sharded)``,
        which copies it): an independent ShardedModel for the same plan and process groups
        (shared, not copied). It owns copies of the dense parameters and buffers, of the shards
        and of the sparse optimizer's state (the two programs of a forward that branches on
        self.training still share one set), and a DenseGradSync whose hooks average its own
        parameters' gradients; the original keeps its own. Local: each rank copies its part,
        and the copies then train together as the originals do."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for mine, theirs in ((self.module, new.module), (self._other_mode, new._other_mode)):
            if mine is not None:  # a GraphModule's deepcopy drops the model's hooks and class name
                L.carry_hooks(copy.deepcopy(L.carry_hooks(mine, nn.Module()), memo), theirs)
                type(theirs).__name__ = type(mine).__name__
        if new.grad_sync is not None:
            weakref.finalize(new, new.grad_sync.remove)  # as __init__ does: the hooks go with the copy
        return new

    @property
    def plan(self):
        """The `fxrec.Plan` this model was sharded with."""
        return self._plan

    def _apply(self, fn, recurse=True):
        """A cast that would change a table's dtype (`.float()` / `.to(torch.float32)` on fp16,
        bf16 or fp64 tables, `.half()`, `.bfloat16()`, `.double()`), or float32 (the fused
        optimizers' state), is refused before anything changes: the fused shards and their
        kernels were built for the tables' dtypes at shard time (a double model failed inside
        fbgemm's backward; `.float()` turned bf16 tables fp32 while full_state_dict still
        reported bf16). Device moves, and casts that change no table (`.float()` where every
        table is fp32), go through."""
        casts: dict = {}

        def cast(dtype: torch.dtype) -> torch.dtype:  # what `fn` makes of a tensor of `dtype`
            if dtype not in casts:
                casts[dtype] = fn(torch.zeros(1, dtype=dtype)).dtype
            return casts[dtype]

        changed = [f"table {name!r} from {info.dtype} into {cast(info.dtype)}"
                   for name, info in self._tables.items() if cast(info.dtype) != info.dtype]
        if not changed and cast(torch.float32) != torch.float32:
            changed = [f"the fused optimizers' float32 state into {cast(torch.float32)}"]
        if changed:
            raise TypeError(f"ShardedModel: its tables keep the dtypes they were sharded with "
                            f"({sorted({str(t.dtype) for t in self._tables.values()})}); this cast would turn "
                            f"{', '.join(changed)}; cast the model before fxrec.shard (e.g. model.double()), or "
                            f"give tables their dtype in its config")
        return super()._apply(fn, recurse)

    def forward(self, *args, **kwargs):
        self._check_group()
        return self._after_forward(self.program(self.training)(*args, **kwargs))

    @torch.compiler.disable
    def _after_forward(self, out):
        """`out`, the program's outputs, once every rank holds rank 0's dense buffers (after a
        forward in training mode, which BatchNorm's running statistics follow on each rank's
        local batch: `BufferSync`, as DDP's broadcast_buffers), and whose backward averages the
        dense gradients across ranks (`DenseGradSync.arm`): only a backward through the
        program's outputs does, not one of the user's plain model, which holds the same
        parameters. Kept out of dynamo's graphs (it hooks autograd nodes)."""
        if self.buffer_sync is not None:
            self.buffer_sync.after_forward()
        if self.grad_sync is not None:
            self.grad_sync.arm(out)
        return out

    @torch.compiler.disable
    def _check_group(self) -> None:
        """RuntimeError unless this process runs in the process group the model was sharded
        on. Without it (destroy_process_group was called, or another group of another size was
        made) the collectives see one rank or a group that is not the program's: data_parallel
        replicas trained apart silently, and row_wise tables failed with errors about split
        sizes. One identity test on the fast path; kept out of dynamo's graphs."""
        ref, pg = self._group, comm.default_group()
        if (ref() if ref is not None else None) is pg and (ref is None or pg is not None):
            return  # (a dead reference: the group it was sharded on is gone, even when none is current)
        sharded_for, now = self._plan.topology.world_size, comm.world_size()
        if sharded_for == 1 and now == 1:  # a one-rank program runs in any one-rank job
            return
        if pg is None:
            why = "torch.distributed is not initialised (was destroy_process_group called?)"
        elif now != sharded_for:
            why = f"this job's process group has {now} rank(s)"
        else:
            why = "the process group it was sharded on was destroyed and another made since"
        raise RuntimeError(f"ShardedModel: sharded for world_size {sharded_for}, but {why}; use it between "
                           f"init_process_group and destroy_process_group, or shard the model again in this "
                           f"process group")

    def program(self, training: bool) -> GraphModule:
        """The rewritten program that runs in this mode: `module`, or, for a forward that
        branches on self.training, the one captured in the other mode (same shards)."""
        baked = self.module.meta.get(L.TRAINING_BAKED)
        if baked is not None and bool(training) != baked[0] and self._other_mode is not None:
            return self._other_mode
        return self.module

    def train(self, mode: bool = True):
        """As nn.Module.train. The captured code follows the mode where it read
        ``self.training`` as a value; where it branched on it, each mode runs a program
        captured in that mode. Only where the two modes look up different tables (or the dense
        part was on the meta device) is there one program, and switching modes warns."""
        baked = self.module.meta.get(L.TRAINING_BAKED)
        if baked is not None and bool(mode) != baked[0] and self._other_mode is None:
            captured = "training" if baked[0] else "eval"
            warnings.warn(f"fxrec: {baked[1]}, so it was captured with the {captured}-mode branch, which the "
                          f"sharded model runs also in {'training' if mode else 'eval'} mode; shard the model in "
                          f"the mode you run it in, or make the branch a value (torch.where, F.dropout(x, p, "
                          f"self.training))", stacklevel=2)
        return super().train(mode)

    # -- the tables ----------------------------------------------------------------
    def _lookups(self):
        return [m for m in self.module.modules() if isinstance(m, (LocalLookup, ReplicatedLookup))]

    @property
    def sparse_optimizer(self):
        """The fused sparse optimizer (a `fxrec.optim` config, or a `fxrec.optim.PerTable`,
        which maps the `frozen` tables to None)."""
        return self._sparse_optimizer

    @sparse_optimizer.setter
    def sparse_optimizer(self, value) -> None:
        """Swap in configs of the same types per table (e.g. a new learning rate); state is
        kept. Tables that share a fused kernel (their configs were equal when sharded) must
        keep equal configs. The `frozen` tables stay untrained.

        Collective: every rank sets the same value at the same point. Each rank checks it
        against its own fused kernels, then one exchange (`_agree`): where any rank refuses
        it, or a rank was given another value than rank 0, every rank raises and none changes;
        else every rank applies it. Checked per rank alone, a table_wise plan let the rank
        holding a table refuse what the others took, so ranks trained on apart silently, or
        one stopped while the others waited in their next collective."""
        self._check_group()
        new = _agree({"sparse_optimizer": value}, lambda: self._checked_optimizer(value),
                     where="ShardedModel.sparse_optimizer", act="set")
        for m in self._lookups():
            if isinstance(m, ReplicatedLookup):
                m.optimizer = new
            else:
                for fused in m.fused_modules():
                    fused.optimizer = for_table(new, fused.layout.names[0].rpartition("@")[0])
        self._sparse_optimizer = new

    def _checked_optimizer(self, value):
        """`value` with the `frozen` tables mapped to None, once it fits this rank's lookups
        (ValueError otherwise); changes nothing."""
        value = freeze(value, self.frozen)
        if isinstance(value, PerTable):  # as shard does: a misspelt table would get the default silently
            value.check_tables(self._tables)
        for m in self._lookups():
            if isinstance(m, ReplicatedLookup):
                for name in m.tables:
                    _check_swap(name, for_table(value, name), for_table(m.optimizer, name))
                continue
            for fused in m.fused_modules():
                tables = [key.rpartition("@")[0] for key in fused.layout.names]
                configs = {t: for_table(value, t) for t in tables}
                if len(set(configs.values())) > 1:
                    raise ValueError(f"sparse_optimizer: tables {tables} share one fused kernel (their optimizers "
                                     f"were equal when sharded) and must keep equal optimizers, got {configs}")
                _check_swap(tables[0], configs[tables[0]], fused.optimizer)
        return value

    def local_shards(self) -> dict[str, list[tuple]]:
        """Table -> this rank's ``(rows, cols, live weight view)`` pieces."""
        return shard_pieces(self._lookups(), self._plan)

    def local_optimizer_state(self) -> dict[str, list[tuple]]:
        """Table -> this rank's ``(rows, cols, {state name: live view})`` pieces, aligned with
        `local_shards`: the fused sparse optimizer's state of each shard (empty dicts under
        SGD). Row state (``momentum``, ``step``) is ``rows``; the rest ``rows x width``."""
        return state_pieces(self._lookups(), self._plan)

    def full_state_dict(self) -> "OrderedDict[str, Tensor]":
        """The unsharded model's state_dict (same keys, same order), tables gathered from
        every rank. Collective: every rank calls it; every rank gets the whole dict."""
        self._check_group()
        mine = self.local_shards()
        full = {name: gather_full(mine.get(name, []), info.num_embeddings, info.embedding_dim, info.dtype)
                for name, info in self._tables.items()}
        dense = self.module.state_dict()
        out = OrderedDict()
        for key in self._keys:
            table = self._param_tables.get(key)
            if table in full:
                out[key] = full[table]
            else:
                out[key] = (dense[key] if key in dense else self._extra[key]).detach().clone()
        return out

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The unsharded model's keys on every rank, as TorchRec's DistributedModelParallel
        gives them: a sharded table as a ShardedTensor of this rank's live shards (none where
        it holds none), a data_parallel table and the dense parameters and buffers as tensors
        (a job of one process, without a process group: every table as a tensor).
        ``torch.distributed.checkpoint.save(sharded.state_dict(), ...)`` writes it, and
        ``dcp.load`` into it reads back in place, resharding; `full_state_dict` gathers
        instead, and `fxrec.checkpoint` adds the optimizers' state."""
        from fxrec.runtime.checkpoint import model_state

        if args:
            raise TypeError("ShardedModel.state_dict takes keyword arguments only (destination=, prefix=, keep_vars=)")
        self._check_group()
        out = OrderedDict() if destination is None else destination
        for key, value in model_state(self, keep_vars, every_key=True).items():
            out[prefix + key] = value
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy `state_dict` in: the unsharded model's (each shard takes its slice of each
        table) or a `state_dict()` of this model (a table's ShardedTensor must then hold this
        rank's pieces, as after ``dcp.load`` into it). Optimizer state is left as it is.
        Returns (missing keys, unexpected keys); with `strict`, either raises RuntimeError."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        if assign:
            raise ValueError("ShardedModel.load_state_dict: assign=True is not possible, the shards live in "
                             "fused buffers; their values are copied in")
        self._check_group()
        keys = set(self._keys)
        unexpected = [k for k in state_dict if k not in keys]
        missing, pieces = [], self.local_shards()
        dense = self.module.state_dict()
        self._check_loadable(state_dict, dense)
        for key in self._keys:
            table = self._param_tables.get(key)
            if table in self._tables:
                mine = pieces.get(table, [])
                if key not in state_dict:
                    missing += [key] if mine else []
                    continue
                value, info = state_dict[key], self._tables[table]
                for rows, cols, w in mine:
                    if isinstance(value, ShardedTensor):
                        src = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}.get(
                            (rows[0], cols[0]))
                        if src is None or tuple(src.shape) != tuple(w.shape):
                            raise ValueError(f"load_state_dict: {key!r} (table {table!r}) holds no local shard at "
                                             f"rows {rows}, cols {cols}; read a checkpoint into this model's own "
                                             "state_dict() (torch.distributed.checkpoint reshards) or pass whole "
                                             "tensors")
                    else:
                        if tuple(value.shape) != (info.num_embeddings, info.embedding_dim):
                            raise ValueError(f"load_state_dict: {key!r} (table {table!r}) is {tuple(value.shape)}, "
                                             f"the table {(info.num_embeddings, info.embedding_dim)}")
                        src = shard_from_full(value, rows, cols)
                    if src.data_ptr() != w.data_ptr():
                        w.copy_(src)
            elif key in dense or key in self._extra:
                if key not in state_dict:
                    missing.append(key)
                    continue
                target = dense[key] if key in dense else self._extra[key]
                if state_dict[key].data_ptr() != target.data_ptr():
                    target.copy_(state_dict[key])
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for ShardedModel: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _check_loadable(self, state_dict, dense: dict) -> None:
        """Each value `load_state_dict` would copy is a tensor of its key's shape (a ShardedTensor
        for a table too), checked before anything is copied. copy_ broadcasts: a 0-d tensor for
        a (1, 11) weight filled it silently, where nn.Module refuses the size mismatch."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        for key in self._keys:
            if key not in state_dict:
                continue
            value, table = state_dict[key], self._param_tables.get(key)
            if table in self._tables:
                info = self._tables[table]
                shape, what = (info.num_embeddings, info.embedding_dim), f"{key!r} (table {table!r})"
                if isinstance(value, ShardedTensor):
                    continue  # its pieces are checked against this rank's shards as they are copied
            elif key in dense or key in self._extra:
                shape, what = tuple((dense[key] if key in dense else self._extra[key]).shape), repr(key)
            else:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"load_state_dict: {what} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"load_state_dict: {what} is {tuple(value.shape)}, the model's is {tuple(shape)}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A parent module's load_state_dict reaches here, then recurses into `module` (the
        # rewritten graph, keyed differently): that cannot load the shards. Say so.
        error_msgs.append(f"{prefix or 'a ShardedModel'}: load it with its own load_state_dict (the "
                          "unsharded model's keys), not through a parent module's")

    def load_full_state_dict(self, state: dict) -> None:
        """Load an unsharded state_dict: each shard takes its slice of its table, dense
        parameters and buffers their values (`load_state_dict` with whole tensors; keys
        the model lacks are ignored). Optimizer state is left as it is."""
        missing = [k for k in self._keys if k not in state]
        if missing:
            raise KeyError(f"load_full_state_dict: missing key {missing[0]!r}")
        self.load_state_dict({k: state[k] for k in self._keys}, strict=False)


def _check_swap(table: str, new, old) -> None:
    """A swapped-in sparse optimizer keeps what the sharded program was built for: the type
    (its state) and RowWiseAdagrad's exact_column_wise (the row sync built at shard time, and the
    accumulators' layout in a checkpoint). A changed exact_column_wise was taken and ignored:
    training went on as before while a checkpoint described the other layout."""
    if type(new) is not type(old):
        raise ValueError(f"sparse_optimizer: table {table!r} must stay a {type(old).__name__}, got {new!r}")
    if isinstance(old, RowWiseAdagrad) and new.exact_column_wise != old.exact_column_wise:
        raise ValueError(f"sparse_optimizer: table {table!r} was sharded with exact_column_wise="
                         f"{old.exact_column_wise}, got {new!r}; exact_column_wise cannot change after shard "
                         f"(shard the model again with it)")


# ------------------------------------------------------------------ shard()
def _structure(module: nn.Module) -> list:
    return [(n, type(m).__name__) for n, m in module.named_modules()] + \
        [(n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()]


def _other_mode(model: nn.Module, inputs: tuple, gm: GraphModule, ctx) -> Optional[GraphModule]:
    """For a forward that branches on self.training: the sharded program captured in the
    other mode, built on meta and then given `gm`'s shards (ROOT) and, as any capture, the
    model's own dense modules. None where that cannot hold: the two modes look up other
    tables, or the dense part is on meta (materialised for `gm` alone)."""
    names = L.table_names_by_param(model)
    if any(t.is_meta for path, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if names.get(path) not in ctx.tables):
        return None
    with modes_kept(model):
        model.train(not model.training)
        other = capture(model, inputs)
    octx = PassContext(example_inputs=inputs, topology=ctx.topology, plan=ctx.plan)
    other = run_passes(other, octx, until="group_tables")
    if list(octx.tables) != list(ctx.tables):
        return None
    octx.options.update(ctx.options, device=torch.device("meta"), init=meta_shard,
                        kernel_device=ctx.options["device"])
    other = run_passes(other, octx, passes=_passes_from_apply_plan())
    if not hasattr(other, ROOT) or _structure(other.get_submodule(ROOT)) != _structure(gm.get_submodule(ROOT)):
        return None
    setattr(other, ROOT, gm.get_submodule(ROOT))
    return other


def meta_shard(table: str, rows: tuple, cols: tuple) -> Tensor:
    """A shard's stand-in on meta, for a program built only to be shown (`fxrec dump`: a 100 GB
    table dumps on a laptop) or to be given real shards afterwards (`_other_mode`)."""
    return torch.empty(rows[1] - rows[0], cols[1] - cols[0], device="meta")


def _passes_from_apply_plan() -> list:
    """apply_plan and the passes after it in the runner's list (apply_plan alone while the
    list does not hold it yet)."""
    from fxrec.passes import runner

    names = [name for name, _ in runner.PASSES]
    if "apply_plan" in names:
        return runner.PASSES[names.index("apply_plan"):]
    return [("apply_plan", apply_plan_pass)]


def _check_world(topology) -> tuple[int, int]:
    world, rank = comm.world_size(), comm.rank()
    if topology.world_size != world:
        raise ValueError(f"fxrec.shard: topology has world_size {topology.world_size} but this job has {world} "
                         f"rank(s) (torch.distributed {'is' if dist.is_initialized() else 'is not'} initialised)")
    return world, rank


def _agreed_plan(ctx: PassContext, topology, constraints, optimizer, world: int, wire):
    """Rank 0's plan on every rank (example batches, hence pooling factors, may differ),
    costed for the output collectives' dtype `wire` (shard's comm_dtype). A planning error
    on rank 0 is raised on every rank, so none waits for the others."""
    from fxrec.planner.plan import Plan, plan as make_plan

    box: list = [None]
    if comm.rank() == 0:
        try:
            box[0] = ("ok", make_plan(list(ctx.tables.values()), topology, constraints=constraints,
                                      sparse_optimizer=optimizer, comm_dtype=wire).to_json())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", e)
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return Plan.from_json(value)


def _initialiser(model: nn.Module, tables: dict, seed: int, device):
    """Shard values: sliced from the model's tables, or drawn by deterministic_init for a
    table on the meta device (never materialising the full table). Over several ranks, a
    table whose values differ from rank 0's (weights loaded on rank 0 only, no common seed)
    is sliced from rank 0's, as DDP starts every replica from rank 0's parameters
    (`_rank0_tables`); the user's model is left as it is."""
    weights = {}
    names = L.table_names_by_param(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    for path, table in names.items():
        if table in tables and path in params:
            weights.setdefault(table, params[path])
    if comm.world_size() > 1:
        weights.update(_rank0_tables(weights))

    def values(table: str, rows, cols) -> Tensor:
        w, info = weights[table], tables[table]
        if w.is_meta:
            return deterministic_init(table, info.num_embeddings, info.embedding_dim, rows, cols, seed=seed,
                                      dtype=info.dtype, device=device)
        return shard_from_full(w.detach(), rows, cols).to(device)
    return values


_BLOCK_BYTES = 64 * 2 ** 20  # a table is hashed and broadcast in row blocks of this size


def _row_blocks(w: Tensor):
    rows = max(1, _BLOCK_BYTES // max(1, w[0].numel() * w.element_size())) if w.shape[0] else 1
    return (slice(start, start + rows) for start in range(0, w.shape[0], rows))


def _digest(w: Tensor) -> Optional[str]:
    """A hash of `w`'s bytes (None on the meta device, whose values deterministic_init draws
    alike on every rank)."""
    import hashlib

    if w.is_meta:
        return None
    h = hashlib.blake2b(repr((tuple(w.shape), w.dtype)).encode(), digest_size=16)
    for block in _row_blocks(w):
        h.update(w.detach()[block].contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def _rank0_tables(weights: dict) -> dict:
    """{table: rank 0's values} for the tables whose values on some rank differ from rank 0's
    (collective). One all_gather_object of a hash per table finds them, so tables that agree
    (the usual case: a common seed) cost one read each and no copy; only those that differ
    are broadcast, in row blocks, into a copy on the other ranks."""
    digests = {t: _digest(w) for t, w in weights.items()}
    every: list = [None] * comm.world_size()
    dist.all_gather_object(every, digests)
    out = {t: torch.empty(w.shape, dtype=w.dtype, device="meta")  # rank 0 draws it: draw it here too
           for t, w in weights.items() if every[0][t] is None and not w.is_meta}
    differ = [t for t in weights if every[0][t] is not None and any(d[t] != every[0][t] for d in every)]
    comm_device = comm.collective_device()
    for t in differ:
        w = weights[t].detach()
        if comm.rank() != 0:
            w = torch.empty(w.shape, dtype=w.dtype, device="cpu" if w.is_meta else w.device)
        for block in _row_blocks(w):
            buf = w[block].to(comm_device).contiguous()
            dist.broadcast(buf, src=0)
            if comm.rank() != 0:
                w[block].copy_(buf)
        out[t] = w
    return out


def _materialise_dense(gm: GraphModule, device, seed: int) -> None:
    """Dense modules left on the meta device get storage and their own reset_parameters(),
    drawn from one generator stream seeded with `seed` (rank 0's values are broadcast
    afterwards). Buffers an __init__ computed are not recomputed."""
    metas = [(path, m) for path, m in gm.named_modules()
             if any(t.is_meta for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))]
    for path, mod in metas:
        if not hasattr(mod, "reset_parameters"):
            tensors = [f"{path}.{n}" if path else n for n, t in
                       list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)) if t.is_meta]
            raise ValueError(f"fxrec.shard: {', '.join(map(repr, tensors))} of module {path!r} ({type(mod).__name__}) "
                             f"is on the meta device and the module has no reset_parameters() to initialise it; "
                             f"build the model's dense part on a real device")
    if not metas:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, mod in metas:
            mod.to_empty(device=device, recurse=False)
            mod.reset_parameters()


def _process_groups(topology):
    """(ProcessGroups, a group for dense-gradient all-reduces), created once per default
    process group and ranks_per_node: creating a group is collective and slow (gloo
    connects every pair), and a job may shard several models. They go with the default group
    (`comm.per_default_group`): an init / destroy cycle leaves none of its groups behind."""
    return comm.per_default_group(("fxrec.shard", topology.ranks_per_node), lambda: (
        comm.ProcessGroups(topology), dist.new_group(list(range(topology.world_size)))))


def _broadcast_dense(gm: GraphModule) -> None:
    # As DDP does at construction: every replica starts from rank 0's dense state.
    for t in list(gm.parameters()) + [b for name, b in gm.named_buffers() if not name.startswith(ROOT)]:
        dist.broadcast(t.data, src=0)


def _check_dense_tables(model: nn.Module, dense: dict, tables: dict) -> None:
    """Warn about looked-up tables detect_embeddings left dense; refuse a model with no
    table to shard (all tables dense, or none), naming why."""
    why = "; ".join(f"{t!r}: {reason}" for t, reason in sorted(dense.items()))
    if not tables:
        found = f"each of its lookups is left dense ({why})" if dense else (
            "it calls no nn.EmbeddingBag, nn.Embedding, F.embedding_bag, F.embedding or fxrec "
            "EmbeddingBagCollection / EmbeddingCollection")
        raise ValueError(f"fxrec.shard: {type(model).__name__} has no embedding table to shard: {found}. "
                         f"A model without one trains data-parallel with torch's DistributedDataParallel")
    if dense:
        warnings.warn(f"fxrec.shard: table(s) {sorted(dense)} stay dense parameters (whole on every rank, trained "
                      f"by the dense optimizer, gradients averaged): {why}", stacklevel=3)


def _prepare(model: nn.Module, topology, inputs: tuple, plan, constraints, sparse_optimizer, seed):
    """This rank's part of `shard` before any collective: the arguments checked, the model
    captured and its tables found. (gm, ctx, the sparse optimizer with the frozen tables
    mapped to None, the model's state_dict keys, the device.)"""
    _check_types(model, topology, plan)
    _check_world(topology)
    _check_seed(seed)
    if plan is not None and constraints is not None:
        raise ValueError("fxrec.shard: give a plan or constraints to plan with, not both")
    optimizer = DEFAULT_SPARSE_OPTIMIZER if sparse_optimizer is None else sparse_optimizer
    if not isinstance(optimizer, OPTIMIZERS + (PerTable,)):
        raise ValueError(f"fxrec.shard: sparse_optimizer must be {NAMES} or a "
                         f"fxrec.optim.PerTable, got {optimizer!r}")
    device = _device(topology)
    state_keys = list(model.state_dict().keys())
    gm = capture(model, inputs)
    ctx = PassContext(example_inputs=inputs, topology=topology)
    gm = run_passes(gm, ctx, until="group_tables")
    _check_dense_tables(model, gm.meta.get(L.DENSE_TABLES, {}), ctx.tables)
    build_units(gm)  # unsupported lookups fail here with their own ValueError, before any planning
    frozen = gm.meta[L.FROZEN_TABLES]  # the capture reads the model's own parameters
    optimizer = freeze(optimizer, frozen)  # a sparse optimizer must not train what the model freezes
    if isinstance(optimizer, PerTable):
        optimizer.check_tables(ctx.tables)  # a misspelt table, or one without an optimizer
    if constraints is not None:  # on every rank: a constraint on a table left dense, said as such
        from fxrec.planner.plan import refuse_dense_constraints
        refuse_dense_constraints(constraints, gm.meta.get(L.DENSE_TABLES, {}))
    return gm, ctx, optimizer, state_keys, device


def _check_types(model, topology, plan) -> None:
    """TypeErrors naming shard's argument: a wrong type failed with an AttributeError on it
    ('int' object has no attribute 'world_size'; a plan given as its JSON text: 'str' object
    has no attribute 'check')."""
    from fxrec.planner.plan import Plan
    from fxrec.topology import Topology

    if not isinstance(model, nn.Module):
        raise TypeError(f"fxrec.shard: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(topology, Topology):
        raise TypeError(f"fxrec.shard: topology must be a fxrec.Topology (e.g. Topology(world_size=2) or "
                        f"Topology.from_env()), got {type(topology).__name__} {topology!r}")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"fxrec.shard: plan must be a fxrec.Plan (Plan.from_json(text) reads a saved one), got "
                        f"{type(plan).__name__}")


def _check_seed(seed) -> None:
    """A whole number torch.manual_seed takes. The seed matters only for tables and dense
    modules on the meta device, so a bad one passed silently elsewhere, and there 1.5 was
    truncated to 1 while "a" or None failed inside a pass."""
    value = whole(seed)
    if value is None or not -(2 ** 63) <= value < 2 ** 64:
        raise ValueError(f"fxrec.shard: seed must be a whole number (torch.manual_seed's range), got {seed!r} "
                         f"({type(seed).__name__})")


def _device(topology) -> torch.device:
    """Where this rank's shards and dense part go. A CUDA topology on a host without CUDA is
    refused here, naming it: torch.cuda.current_device() failed with torch's own assertion."""
    if topology.device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"fxrec.shard: topology.device={topology.device!r} but torch.cuda.is_available() is False "
                         f"on this host; use Topology(..., device='cpu') or a CUDA build of torch")
    return torch.device("cuda", torch.cuda.current_device())


def _placement(plan):
    """What of a given plan must agree across ranks: each table's sharding, kernel and shards
    (not its costs, which follow each rank's example batch)."""
    try:
        return {name: (tp.sharding, tp.kernel, [(sh.rank, tuple(sh.rows), tuple(sh.cols)) for sh in tp.shards])
                for name, tp in plan.tables.items()}
    except Exception:  # noqa: BLE001 - None, or not a Plan: `_prepare` / check_plan say what it is
        return repr(plan)


def _layout(topology):
    """What of the topology must agree across ranks: its ranks, nodes and device (each rank
    builds its own, e.g. Topology.from_env(), whose LOCAL_WORLD_SIZE may differ between
    launchers); a rank whose plan check then failed alone left the others waiting."""
    try:
        return (topology.world_size, topology.ranks_per_node, topology.device)
    except AttributeError:  # not a Topology: `_prepare` says what it is
        return repr(topology)


def _picklable(value):
    """`value` where it pickles (configs compare by ==), else its repr: all_gather_object
    pickles on this rank alone, and a failure there would leave the others waiting."""
    try:
        pickle.dumps(value)
        return value
    except Exception:  # noqa: BLE001
        return repr(value)


def _agree(settings: dict, prepare, where: str = "fxrec.shard", act: str = "shard with"):
    """`prepare()` on this rank, then one exchange with every rank before `shard`'s first
    collective (rank 0's plan broadcast). Example batches differ per rank, so one rank's may
    fail (an id out of range) where the others' pass; that rank raised while the others waited
    in the broadcast until the process group's timeout. Now the first failing rank's error is
    raised on every rank, prefixed with its rank (`comm.agree`), as the sharded program does for
    a bad batch. The `settings` every rank must share (a sparse optimizer or seed of its own
    would train each rank's shards apart, silently) are compared with rank 0's: a ValueError
    names both values, as "`where`: ... every rank must `act` the same <setting>". Returns
    `prepare()`'s value on this rank. (Also the `ShardedModel.sparse_optimizer` setter's check.)"""
    value = error = None
    try:
        value = prepare()
    except Exception as e:  # noqa: BLE001 - raised by comm.agree, on every rank
        error = e
    everyone = comm.agree(error, {k: _picklable(v) for k, v in settings.items()})
    for r, theirs in enumerate(everyone[1:], start=1):
        for name, value0 in everyone[0].items():
            if theirs[name] != value0:
                raise ValueError(f"{where}: {name} differs between ranks: rank 0 has {value0!r}, rank {r} has "
                                 f"{theirs[name]!r}; every rank must {act} the same {name}")
    return value


def shard(model: nn.Module, topology, example_inputs, plan=None, constraints=None, sparse_optimizer=None, *,
          seed: int = 0, comm_dtype=None) -> ShardedModel:
    """Shard `model` for `topology` on this rank (collective: every rank calls it).

    plan: a `fxrec.Plan` (checked against the model's tables and the topology), else
    ``fxrec.plan(tables, topology, constraints=...)`` on rank 0, broadcast.
    sparse_optimizer: `fxrec.optim.SGD / RowWiseAdagrad / Adagrad / Adam`, fused into backward, or a
    `fxrec.optim.PerTable` of them (tables with equal configs share fused kernels); default
    `DEFAULT_SPARSE_OPTIMIZER` (SGD, lr 0.01, TorchRec's default).
    seed: for tables on the meta device (`fxrec.runtime.tables.deterministic_init`) and
    meta dense modules' reset_parameters().
    comm_dtype: "bf16" or "fp16" (or the torch dtype): the sharded tables' results, and their
    gradients in backward, travel between ranks in it (TorchRec's quantized comms; the ids and
    the data_parallel tables' gradients do not). It halves the output collectives' bytes and
    rounds what they carry to its precision; row_wise partial sums are also added in it. Tables
    already in a 16-bit dtype send in their own. None (default): in the tables' dtype.
    Raises ValueError when the job's world size differs from the topology's, or the plan
    misses a table, has another table's size or was made for another topology.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    world, rank = comm.world_size(), comm.rank()
    # every rank's own checks and capture first, then one exchange: the first collective
    # comes after it (module doc of `_agree`)
    try:
        wire, bad_wire = wire_dtype(comm_dtype, "fxrec.shard"), None
    except ValueError as e:  # raised in _agree's prepare, so that it reaches every rank
        wire, bad_wire = None, e

    def prepare():
        if bad_wire is not None:
            raise bad_wire
        return _prepare(model, topology, inputs, plan, constraints, sparse_optimizer, seed)
    settings = {"sparse_optimizer": sparse_optimizer, "constraints": constraints, "seed": seed,
                "plan": _placement(plan), "topology": _layout(topology), "comm_dtype": wire}
    gm, ctx, optimizer, state_keys, device = _agree(settings, prepare)
    seed = whole(seed)
    frozen = gm.meta[L.FROZEN_TABLES]
    ctx.plan = plan if plan is not None else _agreed_plan(ctx, topology, constraints, optimizer, world, wire)
    # here, so the user gets the ValueError / PlanError itself; on every rank at once, as `_agree` does
    _agree({}, lambda: check_plan(ctx.plan, ctx.tables, topology))
    groups, dense_group = _process_groups(topology) if world > 1 else (None, None)
    ctx.options.update(rank=rank, world_size=world, sparse_optimizer=optimizer, process_groups=groups,
                       device=device, init=_initialiser(model, ctx.tables, seed, device), comm_dtype=wire)
    gm = run_passes(gm, ctx, passes=_passes_from_apply_plan())
    other = _other_mode(model, inputs, gm, ctx) if L.TRAINING_BAKED in gm.meta else None
    _materialise_dense(gm, device, seed)
    if device.type != "cpu":  # as DistributedModelParallel does: the dense part joins the shards
        gm.to(device)
        if other is not None:
            other.to(device)
    # Keys the graph does not hold (a parameter forward never reads): kept as they are.
    own, names = gm.state_dict(), L.table_names_by_param(model)
    extra = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
             if k not in own and names.get(k) not in ctx.tables and not v.is_meta}
    grad_sync = buffer_sync = None
    if world > 1:
        from fxrec.runtime.buffer_sync import BufferSync
        from fxrec.runtime.grad_sync import DenseGradSync

        _broadcast_dense(gm)
        grad_sync = DenseGradSync(list(gm.parameters()), group=dense_group, gated=True)
        buffer_sync = BufferSync.of(gm, ROOT, group=dense_group)
    return ShardedModel(gm, ctx.plan, state_keys, dict(ctx.tables), extra, grad_sync, optimizer, frozen, other,
                        buffer_sync)
