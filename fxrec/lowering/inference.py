"""`fxrec.lower_for_inference`: the user's trained model as a module that serves with quantized tables.

The same compiler as `fxrec.shard`, without a topology: capture, detect_embeddings,
group_tables, fuse_lookups (for inference: no optimizer) and quantize_tables, which turns
each fused lookup's tables into row-wise quantized constants (fxrec/lowering/quant.py:
int8 / int4 / int2 with an fp16 scale and bias per row, or fp16 / fp32), looked up by one
fused kernel per group (Triton on a GPU, FBGEMM's IntNBit op where installed, torch).

The result is a `torch.fx.GraphModule` in eval mode taking the model's own arguments. It
owns its state: the quantized tables, and a copy of every dense module, parameter and
buffer, so the model is left as it was and its later training does not reach the lowered
module (whose parameters ask for no gradient). Its ``meta["fxrec_log"]`` holds the passes' log; `fxrec dump
--weight-dtype` shows the same graph.
"""
from __future__ import annotations

import copy
import warnings
from typing import Mapping, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule

from fxrec.lowering.quant_tbe import QuantizedEmbeddingBags
from fxrec.lowering.tbe import FusedEmbeddingBags
from fxrec.passes import lookup as L
from fxrec.passes.fuse_lookups import ROOT as FUSED_ROOT
from fxrec.passes.quantize_tables import FLOAT_TABLES, table_types
from fxrec.passes.runner import PassContext, run_passes

__all__ = ["lower_for_inference"]

LOG = "fxrec_log"


def _own_dense_state(gm: GraphModule) -> None:
    """Give `gm` its own copy of every module and tensor the capture shares with the user's
    model (a GraphModule holds the model's leaf modules themselves), so that the model is
    left as it was and its later training does not reach the lowered module. The fused
    lookups (fuse_lookups' subtree) are new objects already. One deepcopy memo for all:
    a module or tensor shared by two paths stays shared."""
    memo: dict = {}
    for name, child in list(gm._modules.items()):
        if child is not None and name != FUSED_ROOT:
            gm._modules[name] = copy.deepcopy(child, memo)
    for name, p in list(gm._parameters.items()):
        if p is not None:
            gm._parameters[name] = copy.deepcopy(p, memo)
    for name, b in list(gm._buffers.items()):
        if b is not None:
            gm._buffers[name] = copy.deepcopy(b, memo)
    gm.requires_grad_(False)


def lower_for_inference(model: nn.Module, example_inputs, weight_dtype: Union[str, Mapping[str, str]] = "int8", *,
                        output_dtype: Optional[torch.dtype] = None, kernel: Optional[str] = None,
                        bounds_check: bool = True) -> GraphModule:
    """`model` (unchanged) as an eval-mode module whose embedding tables are quantized.

    weight_dtype: "int8" (default), "int4", "int2", "fp16" or "fp32" for every table, or a
    mapping table name (`fxrec.find_tables`) -> type naming every table. intN types need
    dims that pack whole bytes (int4: even, int2: multiples of 4).
    output_dtype: what the lookups return (float32, float16, bfloat16); default: each
    table's own dtype, as the model's lookups return it. Another dtype reaches the dense
    layers as it is (they must take it: an fp32 Linear refuses fp16 inputs).
    kernel: force "triton", "fbgemm" or "torch" for the lookups (else FXREC_KERNEL, else the
    registry's choice); bounds_check: check ids against the tables on every call.

    Tables whose lookups cannot be fused (a weight tied to a dense layer, lookups at several
    stages, a torch.export capture) stay float; a warning names them and why.
    Raises ValueError for a bad weight_dtype or dim (naming the table), tables on the meta
    device (nothing to quantize), and CaptureError when the model cannot be captured.
    """
    from fxrec.capture import capture, modes_kept  # fxrec.capture imports the lowering package
    from fxrec.shard import ShardedModel

    if isinstance(model, ShardedModel):
        raise ValueError("fxrec.lower_for_inference takes the unsharded model: load the sharded one's tables into "
                         "it first (model.load_state_dict(sharded.full_state_dict()), a collective, then lower "
                         "on one rank)")
    fused = next((path for path, m in model.named_modules()
                  if isinstance(m, (QuantizedEmbeddingBags, FusedEmbeddingBags))), None)
    if fused is not None:
        raise ValueError(f"fxrec.lower_for_inference: the model holds fxrec's fused tables already (at "
                         f"{fused or 'its root'!r}): it was lowered or fused before; lower the original model")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with modes_kept(model):
        model.eval()  # traced code may read self.training (F.dropout(..., training=self.training))
        gm = capture(model, inputs)
    ctx = PassContext(example_inputs=inputs, options={
        "inference": True, "weight_dtype": weight_dtype, "output_dtype": output_dtype, "kernel": kernel,
        "bounds_check": bounds_check})
    gm = run_passes(gm, ctx, until="group_tables")
    table_types(weight_dtype, ctx.tables)  # bad types and dims raise here, naming the table, not in a pass
    wide = sorted(t for t, info in ctx.tables.items() if info.dtype == torch.float64)
    if wide and output_dtype is None:
        raise ValueError(f"fxrec.lower_for_inference: table(s) {wide} are float64, and quantized lookups return "
                         f"float32, float16 or bfloat16, which float64 dense layers would refuse: lower a float32 "
                         f"copy of the model (copy.deepcopy(model).float()), or pass output_dtype= for dense "
                         f"layers that take it")
    meta = sorted({r.table for n in gm.graph.nodes if L.LOOKUP in n.meta for r in n.meta[L.LOOKUP].reads
                   if L.fetch_attr(gm, r.weight_path).is_meta})
    if meta:
        raise ValueError(f"table(s) {meta} are on the meta device: there are no values to quantize "
                         f"(load the trained weights first)")
    gm = run_passes(gm, ctx, passes=_after("group_tables"))
    if gm.meta.get(L.CAPTURED_BY) == "export":
        gm.register_forward_pre_hook(_exported_call_check(model, len(inputs)), with_kwargs=True, prepend=True)
    _own_dense_state(gm)
    try:
        gm.eval()
    except NotImplementedError:  # a torch.export capture: the mode was fixed (eval) when it was captured
        pass
    floats, dense = gm.meta.get(FLOAT_TABLES, {}), gm.meta.get(L.DENSE_TABLES, {})
    if floats or dense:
        why = [line for line in ctx.log if "left unfused" in line] + [f"{t!r}: {r}" for t, r in sorted(dense.items())]
        warnings.warn(f"fxrec.lower_for_inference: table(s) {sorted({*floats, *dense})} stay unquantized: "
                      f"{'; '.join(why) or 'their lookups were not fused'}", stacklevel=2)
    gm.meta[LOG] = list(ctx.log)
    return gm


def _exported_call_check(model: nn.Module, arity: int):
    """A pre-hook refusing, by name, the arguments torch.export fixed: it captured forward
    with the example's `arity` positional inputs, and the rest of forward's parameters (a
    float `scale`, a flag) at their defaults, as constants of the graph."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    fixed = [f"{p.name}={p.default!r}" for p in params[arity:] if p.default is not inspect.Parameter.empty]

    def hook(_module, args, kwargs):
        if len(args) != arity or kwargs:
            got = f"{len(args)} positional argument(s)" + (f" and keyword(s) {sorted(kwargs)}" if kwargs else "")
            raise TypeError(f"fxrec.lower_for_inference: the model was captured by torch.export (fx could not "
                            f"trace it) with its {arity} example input(s), which fixes the other arguments at "
                            f"their values then" + (f" ({', '.join(fixed)})" if fixed else "")
                            + f"; call it with {arity} positional input(s), got {got}")
    return hook


def _after(name: str) -> list:
    """The runner's passes after `name` (apply_plan does nothing without a topology)."""
    from fxrec.passes import runner

    names = [n for n, _ in runner.PASSES]
    return runner.PASSES[names.index(name) + 1:]
