"""Bounds checks for the lookups the fxrec backend leaves unfused.

A graph whose lookups are not fused (training without a sparse optimizer, or a lookup fusing
would not speed up) goes to inductor as it is, and inductor's own embedding kernels check
ids with an assert inside their parallel loop: on the CPU an out-of-range id there ended the
process ("terminate called ... index out of bounds"), and where it raised, the error named
no table. Eager, fxrec's collections raise a ValueError naming the table and the id; so does
every fused kernel. `guard_ids` gives the unfused lookups the same check: each reads its ids
through ``fxrec::checked_ids``, an opaque op that inductor calls as it is (a Python call,
outside any generated loop), so a bad id raises that ValueError before the lookup runs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxrec.sparse_checks import out_of_range_id


@torch.library.custom_op("fxrec::checked_ids", mutates_args=())
def checked_ids(ids: Tensor, num_embeddings: int, table: str) -> Tensor:
    """`ids` (a copy: an op may not return its input), or ValueError naming `table` and the
    first offending id when one is outside ``[0, num_embeddings)``."""
    bad = out_of_range_id(ids, num_embeddings)
    if bad is not None:
        raise ValueError(f"{table}: id {bad} outside [0, {num_embeddings})")
    return ids.clone()


@checked_ids.register_fake
def _(ids: Tensor, num_embeddings: int, table: str) -> Tensor:
    return torch.empty_like(ids)


def _rows(weight: Node) -> Optional[int]:
    """The rows of a table the graph computes or reads as a buffer, from its example value."""
    value = weight.meta.get("example_value", weight.meta.get("val"))
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 2 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


def guard_ids(gm: GraphModule, lookups: tuple, tables: dict, name_of: Callable[[Node], str]) -> int:
    """Route the ids of every lookup (a call of one of `lookups`) through `checked_ids`: a
    parameter table's (a key of `tables`: its node -> (name, parameter)), and one the graph
    computes or reads as a buffer (rows from its example value, named by `name_of`).
    Returns how many lookups it guarded."""
    guarded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in lookups:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        ids = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(ids, Node) or not isinstance(weight, Node):
            continue
        if weight in tables:
            name, rows = tables[weight][0], int(tables[weight][1].shape[0])
        else:
            name, rows = name_of(weight), _rows(weight)
            if rows is None:
                continue
        with gm.graph.inserting_before(node):
            checked = gm.graph.call_function(
                torch.ops.fxrec.checked_ids.default, (ids, rows, f"table {name!r} (lookup %{node.name})"))
        checked.meta.update({k: v for k, v in ids.meta.items() if k in ("val", "example_value", "tensor_meta")})
        if node.args:
            node.args = (checked,) + tuple(node.args[1:])
        else:
            node.kwargs = {**node.kwargs, "input": checked}
        guarded += 1
    if guarded:
        gm.recompile()
    return guarded
