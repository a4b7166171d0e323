"""quantize_tables: the fused lookups' tables become row-wise quantized constants (inference).

Runs only when ``ctx.options["weight_dtype"]`` is set (`fxrec.lower_for_inference` sets it):
one type for every table ("int8", "int4", "int2", "fp16", "fp32"), or a mapping table name
-> type that names every table. In each local lookup that fuse_lookups left (a `LocalLookup`
node), every `FusedEmbeddingBags` becomes a `QuantizedEmbeddingBags` holding its tables
quantized (fxrec/lowering/quant.py), with the same inputs and outputs, so the graph around
it is unchanged. The values come from the user's weights that fuse_lookups kept for this
(`source_weights`, its float modules then being on meta: no float copy is ever made; the
reference is dropped here), else from the float module's own copy. Lookups of ``ctx.options["output_dtype"]``
(default None: the tables' own float dtype, what the model's lookups return, so a half-precision
model's dense layers get half-precision inputs) come out of the kernel chosen by the registry for the quant_* ops
(``ctx.options["kernel"]`` forces one), recorded in ``node.meta[fuse_lookups.KERNEL]``
(``{"pooled": {"quant_pooled_forward": kernel}, ...}``), which `fxrec dump` shows.
``ctx.options["bounds_check"]`` (default True) switches the unit's input check (ids, bag
lengths, weights; `GatherInputs`) on or off; the quantized module itself does not check again.

Tables whose lookups fuse_lookups left unfused (it logged why: a weight tied to a dense
layer, lookups at several stages, an aten-level capture) keep their float weights; they are
listed in ``gm.meta[FLOAT_TABLES]`` (table -> reason) for the caller to report.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.fx import GraphModule

from fxrec.lowering.layout import in_table_order
from fxrec.lowering.quant import check_dim, quant_type
from fxrec.lowering.quant_tbe import QuantizedEmbeddingBags
from fxrec.passes import lookup as L
from fxrec.passes.apply_plan import LOCAL_LOOKUP
from fxrec.passes.fuse_lookups import KERNEL, _weighted
from fxrec.passes.shard_ops import GatherInputs
from fxrec.runtime.local_lookup import FusedGroups, LocalLookup

NAME = "quantize_tables"
FLOAT_TABLES = "fxrec_float_tables"  # gm.meta: {table: why it stays float}


def table_types(weight_dtype, tables: dict) -> dict:
    """Table name -> QuantType, checked against the model's tables (a mapping must name each
    of them and no other); a bad type or a dim the type cannot pack raises ValueError naming
    the table."""
    per_table = in_table_order(tables, weight_dtype, "weight_dtype") if isinstance(weight_dtype, Mapping) \
        else [weight_dtype] * len(tables)
    types = {t: quant_type(w, t) for t, w in zip(tables, per_table)}
    for name, qtype in types.items():
        check_dim(name, tables[name].embedding_dim, qtype)
    return types


def _own_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lookups' output dtype when none is asked for: the tables' own, where a kernel can
    write it (float32, float16, bfloat16), else float32 (a float64 table)."""
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _quantized(fused, keys_to_tables: dict, types: dict, opts: dict, source):
    """`fused`'s tables quantized: from the user's weights when fuse_lookups kept them
    (`source`, its modules then on meta), else from `fused`'s own copy. A `FusedGroups`
    (tables of several dtypes) gets each part quantized, each returning its tables' dtype."""
    if isinstance(fused, FusedGroups):
        parts = [_quantized(p, keys_to_tables, types, opts, source) for p in fused.parts]
        return FusedGroups(parts, fused.members, fused.dims, fused.pooled)
    types = {n: types[keys_to_tables[n]] for n in fused.layout.names}
    # the unit's GatherInputs checks every id already, naming the lookup (bounds_check below)
    out = opts.get("output_dtype") or _own_dtype(fused.weights.dtype)
    kw = dict(output_dtype=out, kernel=opts.get("kernel"), bounds_check=False)
    if source is None:
        return QuantizedEmbeddingBags.from_fused(fused, types, **kw)
    weights = {n: source[n] for n in fused.layout.names}
    return QuantizedEmbeddingBags.from_float(fused.layout._specs(), weights, types,
                                             device=next(iter(weights.values())).device, **kw)


def quantize_tables_pass(gm: GraphModule, ctx) -> GraphModule:
    """Quantize every fused lookup's tables (module doc); a no-op without options['weight_dtype']."""
    opts = ctx.options
    if opts.get("weight_dtype") is None:
        return gm
    tables = gm.meta.get(L.TABLES, ctx.tables)
    types = table_types(opts["weight_dtype"], tables)
    served = set()
    for node in gm.graph.nodes:
        if LOCAL_LOOKUP not in node.meta or node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, LocalLookup):
            continue
        keys = {k: k.split("@")[0] for k in node.meta[LOCAL_LOOKUP]["shards"]}
        source = getattr(mod, "source_weights", None)
        record = {}
        for role in ("pooled", "unpooled"):
            fused = getattr(mod, role)
            if fused is None:
                continue
            q = _quantized(fused, keys, types, opts, source)
            setattr(mod, role, q)
            parts = q.fused_modules() if isinstance(q, FusedGroups) else [q]
            records = [p.kernel_record(_weighted(gm, node) and role == "pooled", opts.get("kernel_device"))
                       for p in parts]
            record[role] = {op: "+".join(dict.fromkeys(r[op] for r in records)) for op in records[0]}
            for p in parts:
                served.update(keys[n] for n in p.layout.names)
                kinds = ", ".join(f"{n}:{t.name}" for n, t in zip(p.layout.names, p.layout.types))
                ctx.log.append(f"{NAME}: %{node.name} {role} tables [{kinds}], {p.layout.numel:,} bytes, "
                               f"kernel {records[parts.index(p)]}")
        node.meta[KERNEL] = record
        if source is not None:
            del mod.source_weights  # the lowered module must not keep the user's tables alive
        gather = getattr(gm.get_submodule(node.target.rpartition(".")[0]), "gather", None)
        if isinstance(gather, GatherInputs):  # ids, offsets and weights checked on every call, or not
            gather.check = bool(opts.get("bounds_check", True))
    unfused = {t: "its lookups were left unfused (see fuse_lookups' log)" for t in tables if t not in served}
    gm.meta[FLOAT_TABLES] = unfused
    for t, why in unfused.items():
        ctx.log.append(f"{NAME}: table {t!r} stays {tables[t].dtype}: {why}")
    return gm
