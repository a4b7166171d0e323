"""The records the front end leaves in the graph for later passes.

`detect_embeddings` puts a `Lookup` in ``node.meta[LOOKUP]`` of every node that reads an
embedding table, and the tables' `TableInfo` in ``gm.meta[TABLES]``; `group_tables`
adds `LookupGroup`s. The meta keys are constants here so that no pass spells them by
hand. fxrec/passes/README.md states the schema and the invariants.

Records hold names and argument positions, never `torch.fx.Node` objects: a node's meta
is copied (shallowly) when a graph is copied, and a Node reference would then point
into the old graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# node.meta keys
PASS = "fxrec_pass"          # str: "capture" or the pass that created the node
MODULE = "fxrec_module"      # str: path of the innermost user module that produced it ("" = root)
SOURCE = "fxrec_source"      # SourceLoc | None: the user's line that produced it
SHAPE = "fxrec_shape"        # TensorSpec | SparseSpec | tuple | dict | str (see fxrec.passes.shapes)
LOOKUP = "fxrec_lookup"      # Lookup
NODE_TABLES = "fxrec_tables"  # tuple[TableInfo, ...], aligned with Lookup.reads
NODE_GROUPS = "fxrec_groups"  # tuple[str, ...]: LookupGroup names, aligned with Lookup.reads
COMM = "fxrec_comm"          # truthy on nodes that communicate (set by later passes)
GRAD_MODE = "fxrec_grad_mode"  # "inherit" | True | False | "dynamic": the grad mode the node runs in (grad_mode.py)

# gm.meta keys
TABLES = "fxrec_tables"        # dict[str, TableInfo] in graph order
GROUPS = "fxrec_groups"        # list[LookupGroup]
CAPTURED_BY = "fxrec_capture"  # "fx" | "export"
CAPTURE_NOTE = "fxrec_capture_note"  # why fx tracing failed, when export was used
PARAM_TABLES = "fxrec_param_tables"  # dict[param or buffer path, table name]
DENSE_TABLES = "fxrec_dense_tables"  # dict[table name, why]: looked-up weights left as dense parameters
FROZEN_TABLES = "fxrec_frozen_tables"  # list[table name]: tables the model does not train (frozen_tables)
PASSES_RUN = "fxrec_passes_run"      # list[str], appended by the runner
TRAINING_BAKED = "fxrec_training_baked"  # (mode, why): the graph runs the code of that mode only
TRAINING_FLAG = "fxrec_training"     # the captured module's TrainingFlag (capture.py)
FIXED_TRAINING_FLAG = "fxrec_training_fixed"  # its FixedTrainingFlag: submodules captured in the other mode

KINDS = ("module_bag", "module_embedding", "functional_bag", "functional_embedding",
         "aten_bag", "aten_embedding", "ebc", "ec")
BAG_KINDS = ("module_bag", "functional_bag", "aten_bag")
EMBEDDING_KINDS = ("module_embedding", "functional_embedding", "aten_embedding")


@dataclass(frozen=True)
class ArgRef:
    """Where one input of a lookup sits in its node: positional index `pos` or keyword `kw`."""

    pos: Optional[int] = None
    kw: Optional[str] = None

    def pick(self, args: tuple, kwargs: dict) -> Any:
        """The value at this place in (args, kwargs): fx Nodes for a graph node, tensors
        when given the evaluated arguments of an Interpreter."""
        if self.pos is not None:
            return args[self.pos] if self.pos < len(args) else None
        return kwargs.get(self.kw)

    def of(self, node: torch.fx.Node) -> Any:
        return self.pick(node.args, node.kwargs)


@dataclass(frozen=True)
class TableRead:
    """One table read by a lookup node. `weight_path` is the attribute path, in the
    GraphModule, of the weight tensor this node reads (``emb_l.0.weight``,
    ``ebc.embedding_bags.t0.weight``, ``table``); `features` names the KJT features that
    feed it (EBC/EC) and is empty for the other kinds; `keys` the collection's output key
    of each (the feature, or ``feature@table`` for a feature several tables read)."""

    table: str
    pooling: str  # "sum" | "mean" | "none"
    weight_path: str
    features: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    def __post_init__(self):
        if self.keys and len(self.keys) != len(self.features):
            raise ValueError(f"TableRead {self.table!r}: {len(self.keys)} output keys for "
                             f"{len(self.features)} features")


@dataclass
class Lookup:
    """An embedding lookup node, whatever the user wrote.

    Guarantees: `reads` has exactly one entry except for kinds "ebc" / "ec", where it
    lists the collection's tables in the module's table order. `ids`, `offsets`,
    `per_sample_weights` and `weight` locate the node's inputs (None: absent; for
    "ebc"/"ec" `ids` is the KeyedJaggedTensor argument and carries offsets and weights).
    For the embedding kinds, `pool_node` names the sum/mean node the lookup folds into
    (the node's only user, reducing the ids' last dimension) and `reads[0].pooling` is
    that reduction (never with a padding_idx: see detect_embeddings); a folded "mean" divides
    by the full dimension.
    For "aten_bag", the pooled rows are element `output_index` of the node's tuple.
    """

    kind: str
    reads: tuple[TableRead, ...]
    ids: Optional[ArgRef] = None
    offsets: Optional[ArgRef] = None
    per_sample_weights: Optional[ArgRef] = None
    weight: Optional[ArgRef] = None
    padding_idx: Optional[int] = None
    include_last_offset: bool = False
    weighted: bool = False  # per-sample weights present on the example batch
    ignores_weights: bool = False  # an EmbeddingBagCollection built with is_weighted=False
    pool_node: Optional[str] = None
    pool_dim: Optional[int] = None
    output_index: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Lookup: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.reads:
            raise ValueError(f"Lookup ({self.kind}): reads no table")
        if len(self.reads) > 1 and self.kind not in ("ebc", "ec"):
            raise ValueError(f"Lookup ({self.kind}): reads {len(self.reads)} tables, only ebc/ec read several")

    @property
    def table(self) -> str:
        """The table of a single-table lookup."""
        if len(self.reads) != 1:
            raise ValueError(f"{self.kind} lookup reads {len(self.reads)} tables: {self.tables}")
        return self.reads[0].table

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(r.table for r in self.reads)

    @property
    def pooled(self) -> bool:
        return all(r.pooling != "none" for r in self.reads)


@dataclass
class LookupGroup:
    """Table reads that one fused kernel call can serve: same pooling family ("pooled"
    or "sequence"), weight dtype, device and weightedness, and none of them depending on
    another's output (`stage` counts the lookups upstream of the group's ids), and all run
    in one grad mode (`grad_mode`, grad_mode.py: a read inside ``torch.no_grad()`` must
    not share a call that autograd records)."""

    name: str
    family: str
    dtype: torch.dtype
    device: str
    weighted: bool
    stage: int
    members: list[tuple[str, str]] = field(default_factory=list)  # (node name, table name)
    grad_mode: Any = "inherit"  # GRAD_MODE of its lookups

    @property
    def tables(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.members))

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(n for n, _ in self.members))


def fetch_attr(gm: nn.Module, path: str) -> Any:
    """The object at dotted attribute `path` (a get_attr target, a `weight_path`)."""
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def frozen_tables(model: nn.Module, tables, names: Optional[dict] = None) -> list[str]:
    """The tables (names, of `tables`) that `model` does not train: no parameter reading them
    requires grad (``requires_grad=False``, ``nn.Embedding.from_pretrained``), or a buffer.
    `names`: `table_names_by_param(model)`, when the caller has it."""
    names = table_names_by_param(model) if names is None else names
    trained = {names.get(path, path) for path, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return [t for t in tables if t not in trained]


def table_names_by_param(model: nn.Module) -> dict[str, str]:
    """Map every parameter and buffer path of `model` (aliases included) to the name of
    the table it would be: the first path of an nn.Embedding / nn.EmbeddingBag whose
    weight it is, else its own first path. Tied weights thus share one name."""
    canonical: dict[int, str] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            # the model itself an nn.EmbeddingBag (path ""): its table is named by its weight's path
            canonical.setdefault(id(mod.weight), path or "weight")
    names: dict[str, str] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for fqn, t in tensors:
        names[fqn] = canonical.setdefault(id(t), fqn)
    return names


# the dicts nn.Module keeps a module's hooks in, and what each holds
HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
         "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
# and beside them, flags per hook (kwargs, always called)
_HOOK_ATTRS = (*HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def hooks_of(module: nn.Module) -> list[str]:
    """The kinds of hook `module` has ("forward hook", "backward pre-hook", ...)."""
    return [kind for attr, kind in HOOKS.items() if getattr(module, attr, None)]


def carry_hooks(src: nn.Module, dst: nn.Module) -> nn.Module:
    """`dst` sharing `src`'s hooks (the user's model's, with the captured program; a
    program's, with the one a pass rebuilds from it): calling `dst` runs them as calling
    `src` does, with `dst` as the module they are given. Shared, not copied, so a hook the
    user registers on the model later, or removes with its handle, is registered or removed
    for the program too. Returns `dst`."""
    for attr in _HOOK_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook
    return dst


# ------------------------------------------------------------------ functional lookups' arguments
# F.embedding_bag's and F.embedding's parameters, in signature order (a call node passes them
# by position or by name)
F_ARGS = {
    F.embedding_bag: ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode",
                      "sparse", "per_sample_weights", "include_last_offset", "padding_idx"),
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
}


def functional_arg(node, name: str, default=None):
    """Argument `name` of an F.embedding / F.embedding_bag call node, wherever it was passed."""
    pos = F_ARGS[node.target].index(name)
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def renormalising_call(node) -> bool:
    """Whether `node` is an F.embedding / F.embedding_bag call with a max_norm: it renormalises,
    in place, the rows of its weight that it reads."""
    return node.op == "call_function" and node.target in F_ARGS and functional_arg(node, "max_norm") is not None


def gather_args(node) -> list:
    """What a unit's GatherInputs reads of lookup `node` (from its `LOOKUP` meta): ``[kjt]`` for
    an EBC / EC, ``[ids]`` for an embedding, else ``[ids, offsets, per_sample_weights]`` (None
    where absent). Never the table's weight: the unit serves it from its own storage."""
    lk = node.meta[LOOKUP]
    if lk.kind in ("ebc", "ec") or lk.kind in EMBEDDING_KINDS:
        return [lk.ids.of(node)]
    return [ref.of(node) if ref is not None else None for ref in (lk.ids, lk.offsets, lk.per_sample_weights)]
