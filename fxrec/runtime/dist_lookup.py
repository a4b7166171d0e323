"""The per-rank pieces of a sharded lookup unit, called by the graph `apply_plan` writes.

A *unit* is a set of lookup nodes served together (apply_plan.py). Its slots
(`fxrec.passes.shard_ops.SlotSpec`) are the (lookup, table, feature) reads; a *route* sends
one slot's ids to one shard of its table (a table_wise table has one shard, a column_wise
table one per column block, a row_wise / table_row_wise table one per row range, and those
ids are bucketized by row and re-based to the shard). Every route of the unit travels in
one ids all-to-all; the graph is

    InputDist -> comm.all_to_all_counts -> RecvSplits -> comm.all_to_all (ids, lengths)
      [-> comm.all_to_all (per-sample weights)] -> Unpack -> LocalLookup (local_lookup.py:
      fused kernel + sparse optimizer in backward) -> OutputPrep -> comm.all_to_all (pooled
      sums of table_wise / column_wise shards, and every unpooled row) | comm.reduce_scatter
      (row_wise partial sums) | comm.reduce_scatter on the node + comm.all_to_all across
      nodes (table_row_wise) -> CollectOutputs (OutputPrep and CollectOutputs: dist_output.py)

Counts block per destination: the local bag count of every slot (K ints: every rank learns
every rank's batch), then (lengths, ids) sizes per route
(2R ints, zero for routes to other ranks), then the sender's input fault
(`shard_ops.InputFault`, zeros when its ids and lengths passed the check): InputDist checks
the unit's inputs, and RecvSplits raises the first faulty rank's error on every rank, before
any data moves. Received pieces are ordered by source rank, then route order. A shard's
bags in the fused lookup are ordered (source rank, route, bag), so a source's bags are
contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.passes.shard_ops import InputFault, SlotInput, SlotSpec, find_fault
from fxrec.ranges import span_property

__all__ = ["RouteSpec", "LocalShard", "UnitSpec", "InputDist", "RecvSplits", "Unpack", "SendState", "RecvState",
           "LookupState", "bucketize", "FaultSend", "FaultCheck", "raise_first_fault"]

OUTPUT_KINDS = ("a2a", "rs", "twrw")


@dataclass(frozen=True)
class RouteSpec:
    """Slot `slot`'s ids go to shard `shard` (index in the table's plan) on `rank`.
    `output`: how results come back: "a2a" (rows or table/column-wise sums), "rs" (row_wise
    partial sums), "twrw" (table_row_wise partial sums)."""

    slot: int
    table: str
    shard: int
    rank: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    bucketized: bool
    pooled: bool
    weighted: bool
    output: str

    @property
    def width(self) -> int:
        return self.cols[1] - self.cols[0]


@dataclass(frozen=True)
class LocalShard:
    """A shard this rank holds (one table of its fused lookup); `routes` feed it."""

    key: str
    table: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    pooled: bool
    routes: tuple[int, ...]

    num_rows = span_property("rows")
    num_cols = span_property("cols")


@dataclass(frozen=True)
class UnitSpec:
    """Everything static about one unit on one rank (the same on every rank but `rank`)."""

    name: str
    rank: int
    world_size: int
    ranks_per_node: int
    slots: tuple[SlotSpec, ...]
    routes: tuple[RouteSpec, ...]
    twrw_node: dict = field(default_factory=dict)  # table -> node holding it (table_row_wise)
    # table -> its sparse optimizer's group (`fxrec.optim.PerTable`: one fused kernel per
    # group); absent: group 0. Local shards are ordered by group, so a group's tables are
    # contiguous in the fused lookup's inputs and output
    groups: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @cached_property
    def _by_slot(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.slots]
        for i, r in enumerate(self.routes):
            out[r.slot].append(i)
        return out

    def routes_of_slot(self, k: int) -> list[int]:
        return self._by_slot[k]

    @cached_property
    def _mine(self) -> list[int]:
        return [i for i, r in enumerate(self.routes) if r.rank == self.rank]

    def my_routes(self) -> list[int]:
        return self._mine

    @cached_property
    def _local(self) -> list[LocalShard]:
        seen: dict[tuple[str, int], list[int]] = {}
        for i in self._mine:
            r = self.routes[i]
            seen.setdefault((r.table, r.shard), []).append(i)
        shards = [LocalShard(f"{t}@{s}", t, self.routes[ids[0]].rows, self.routes[ids[0]].cols,
                             self.routes[ids[0]].pooled, tuple(ids)) for (t, s), ids in seen.items()]
        return sorted(shards, key=lambda s: (not s.pooled, self.groups.get(s.table, 0)))  # stable: route order

    def local_shards(self) -> list[LocalShard]:
        """This rank's shards, pooled ones first, then by optimizer group, each once, in
        route order."""
        return self._local

    def slots_by_output(self, kind: str, node: Optional[int] = None) -> list[int]:
        """Slots whose results come back by `kind` ("rs"/"twrw"), in slot order; for twrw
        only those whose table lives on `node`."""
        out = []
        for k, ids in enumerate(self._by_slot):
            r = self.routes[ids[0]] if ids else None
            if r is not None and r.output == kind and (node is None or self.twrw_node[r.table] == node):
                out.append(k)
        return out

    def route_to(self, k: int, rank: int) -> int:
        return next(i for i in self._by_slot[k] if self.routes[i].rank == rank)


def bucketize(values: Tensor, lengths: Optional[Tensor], weights: Optional[Tensor], starts: list[int]):
    """Split ids by row range (shard s holds rows ``[starts[s], starts[s+1])``), keeping
    their order within a shard, re-based to the shard's first row. Returns per shard
    (lengths per bag or None, ids, weights or None) and the permutation applied."""
    S = len(starts)
    values = values.contiguous()  # sliced ids (seq[:, -1]): bucketize would copy them anyway, and warn
    bucket = torch.bucketize(values, values.new_tensor(starts[1:]), right=True)
    order = torch.sort(bucket, stable=True).indices
    b_sorted = bucket[order]
    ids = values[order] - values.new_tensor(starts)[b_sorted]
    counts = torch.bincount(bucket, minlength=S).tolist()
    id_parts = ids.split(counts)
    w_parts = weights[order].split(counts) if weights is not None else [None] * S
    if lengths is None:
        len_parts = [None] * S
    else:
        nb = lengths.numel()
        bag = torch.repeat_interleave(torch.arange(nb, device=values.device), lengths, output_size=values.numel())
        len_parts = torch.bincount(bucket * nb + bag, minlength=S * nb).view(S, nb).unbind(0)
    return list(zip(len_parts, id_parts, w_parts)), order


def raise_first_fault(rows: list[list[int]], slots) -> None:
    """Raise the error of the first rank whose row (what it sent this rank) ends in an
    `InputFault`: every rank receives every rank's fault, so all raise the same error."""
    for s, row in enumerate(rows):
        fault = InputFault.from_ints(row[-InputFault.WIDTH:])
        if fault is not None:
            raise fault.error(slots)((f"rank {s}'s batch: " if len(rows) > 1 else "") + fault.message(slots))


@eager_under_dynamo
class FaultSend(nn.Module):
    """forward(inputs) -> int64 ``W * InputFault.WIDTH``: this rank's input fault (zeros when
    its inputs pass the check) once for every rank. A unit without routes (every table
    replicated) has no counts exchange to carry it: apply_plan gives it this small
    all-to-all instead, so that one rank's bad ids do not leave the others waiting in the
    dense gradients' all-reduce."""

    def __init__(self, slots: list[SlotSpec], world_size: int):
        super().__init__()
        self.slots, self.world_size = list(slots), world_size

    def forward(self, inputs: list[SlotInput]) -> Tensor:
        fault = find_fault(self.slots, inputs)
        ints = fault.ints() if fault is not None else [0] * InputFault.WIDTH
        dev = inputs[0].values.device if inputs else None
        return torch.tensor(ints * self.world_size, dtype=torch.int64, device=dev)


@eager_under_dynamo
class FaultCheck(nn.Module):
    """forward(received faults, inputs) -> the inputs, once no rank's were faulty
    (`raise_first_fault`); the lookups take them from here, so they run after the check."""

    def __init__(self, slots: list[SlotSpec]):
        super().__init__()
        self.slots = list(slots)

    def forward(self, faults: Tensor, inputs: list[SlotInput]) -> list[SlotInput]:
        raise_first_fault(faults.view(-1, InputFault.WIDTH).tolist(), self.slots)
        return inputs


@dataclass
class SendState:
    bags: list[int]            # per slot: local bags (ids for row-served slots)
    sizes: list[tuple[int, int]]  # per route: (lengths entries, ids) sent
    perms: dict                # slot -> permutation applied by bucketize (row-served slots)


@eager_under_dynamo
class InputDist(nn.Module):
    """forward(inputs) -> (counts, ids+lengths buffer, weights buffer or None, SendState).
    Inputs that fail the check send nothing but the fault (module doc)."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.spec = spec
        self.weighted = any(r.weighted for r in spec.routes)

    def _payloads(self, inputs: list[SlotInput]):
        spec, per_route, perms = self.spec, [None] * len(self.spec.routes), {}
        for k, inp in enumerate(inputs):
            ids = spec.routes_of_slot(k)
            if not ids:
                continue
            first = spec.routes[ids[0]]
            lengths = inp.lengths if first.pooled else None
            if first.bucketized:
                parts, order = bucketize(inp.values, lengths, inp.weights, [spec.routes[i].rows[0] for i in ids])
                if not first.pooled:
                    perms[k] = order
            else:
                parts = [(lengths, inp.values, inp.weights)] * len(ids)
            for i, part in zip(ids, parts):
                per_route[i] = part
        return per_route, perms

    def forward(self, inputs: list[SlotInput]):
        spec, W = self.spec, self.spec.world_size
        dev = inputs[0].values.device if inputs else None
        fault = find_fault(spec.slots, inputs)
        bags = [inp.num_bags for inp in inputs]
        if fault is not None:  # send no ids: RecvSplits raises on every rank
            counts = (bags + [0] * (2 * len(spec.routes)) + fault.ints()) * W
            empty = torch.zeros(0, dtype=torch.int64, device=dev)
            return (torch.tensor(counts, dtype=torch.int64, device=dev), empty,
                    torch.zeros(0, device=dev) if self.weighted else None,
                    SendState(bags, [(0, 0)] * len(spec.routes), {}))
        per_route, perms = self._payloads(inputs)
        sizes = [(0 if p[0] is None else p[0].numel(), p[1].numel()) for p in per_route]
        counts = []
        data, weights = [], []
        for d in range(W):
            block = list(bags)
            for i, r in enumerate(spec.routes):
                block += list(sizes[i]) if r.rank == d else [0, 0]
                if r.rank == d:
                    lens, ids, w = per_route[i]
                    data += ([lens] if lens is not None else []) + [ids]
                    if r.weighted:
                        weights.append(w)
            counts += block + [0] * InputFault.WIDTH
        buf = torch.cat(data) if data else torch.zeros(0, dtype=torch.int64, device=dev)
        wbuf = None
        if self.weighted:
            wbuf = torch.cat(weights) if weights else torch.zeros(0, device=dev)
        return torch.tensor(counts, dtype=torch.int64, device=dev), buf, wbuf, SendState(bags, sizes, perms)


def send_splits(spec: UnitSpec, state: SendState) -> tuple[list[int], list[int]]:
    """Per destination: ids+lengths entries, and weights entries, this rank sends."""
    data, w = [0] * spec.world_size, [0] * spec.world_size
    for r, (n_len, n_ids) in zip(spec.routes, state.sizes):
        data[r.rank] += n_len + n_ids
        w[r.rank] += n_ids if r.weighted else 0
    return data, w


@dataclass
class RecvState:
    bags: list[list[int]]                   # [source][slot] local bag counts
    sizes: dict                             # (source, route) -> (lengths entries, ids)


@eager_under_dynamo
class RecvSplits(nn.Module):
    """forward(send_state, received counts) -> (data out splits, data in splits, weights out
    splits, weights in splits, RecvState). Raises the first faulty rank's input error on
    every rank."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.spec = spec

    def forward(self, state: SendState, recv_counts: Tensor):
        spec, W, K = self.spec, self.spec.world_size, len(self.spec.slots)
        rows = recv_counts.view(W, -1).tolist()
        raise_first_fault(rows, spec.slots)
        bags = [row[:K] for row in rows]
        mine = spec.my_routes()
        sizes = {(s, i): (rows[s][K + 2 * i], rows[s][K + 2 * i + 1]) for s in range(W) for i in mine}
        out_data = [sum(sizes[(s, i)][0] + sizes[(s, i)][1] for i in mine) for s in range(W)]
        out_w = [sum(sizes[(s, i)][1] for i in mine if spec.routes[i].weighted) for s in range(W)]
        in_data, in_w = send_splits(spec, state)
        return out_data, in_data, out_w, in_w, RecvState(bags, sizes)


@dataclass
class LookupState:
    """Where each (source, route) landed in the local lookup's output."""

    places: dict          # (source, route) -> (shard position, first bag or row, count)
    batch: int            # bags per table in the pooled lookup (padded)


@eager_under_dynamo
class Unpack(nn.Module):
    """forward(data, weights, RecvState) -> (pooled indices, offsets, weights, unpooled
    indices, offsets, LookupState): the received pieces in the fused kernels' TBE layout."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.spec = spec
        self.shards = spec.local_shards()

    def _pieces(self, data: Tensor, weights: Optional[Tensor], st: RecvState):
        spec, W, mine = self.spec, self.spec.world_size, self.spec.my_routes()
        order, lens_sizes = [], []
        for s in range(W):
            for i in mine:
                n_len, n_ids = st.sizes[(s, i)]
                order.append((s, i))
                lens_sizes += [n_len, n_ids]
        parts = data.split(lens_sizes)
        got = {key: (parts[2 * j], parts[2 * j + 1]) for j, key in enumerate(order)}
        w_keys = [key for key in order if spec.routes[key[1]].weighted]
        w_parts = weights.split([st.sizes[key][1] for key in w_keys]) if weights is not None else []
        return got, dict(zip(w_keys, w_parts))

    def forward(self, data: Tensor, weights: Optional[Tensor], st: RecvState):
        got, w_got = self._pieces(data, weights, st)
        W, places = self.spec.world_size, {}
        pooled = [s for s in self.shards if s.pooled]
        batch = max([sum(st.sizes[(src, i)][0] for src in range(W) for i in s.routes) for s in pooled], default=0)
        p_len, p_ids, p_w, u_ids, u_counts = [], [], [], [], []
        for pos, shard in enumerate(self.shards):
            start, ids_n = 0, 0
            for src in range(W):
                for i in shard.routes:
                    lens, ids = got[(src, i)]
                    n = lens.numel() if shard.pooled else ids.numel()
                    places[(src, i)] = (pos, start, n)
                    start += n
                    (p_ids if shard.pooled else u_ids).append(ids)
                    ids_n += ids.numel()
                    if shard.pooled:
                        p_len.append(lens)
                        if weights is not None:  # unweighted slots of a weighted unit weigh 1
                            p_w.append(w_got.get((src, i), weights.new_ones(ids.numel())))
            if shard.pooled:
                p_len.append(torch.zeros(batch - start, dtype=torch.int64, device=data.device))
            else:
                u_counts.append(ids_n)
        p = _tbe_inputs(p_ids, torch.cat(p_len) if pooled else None, data, p_w if weights is not None else None)
        u = _tbe_inputs(u_ids, torch.tensor(u_counts, dtype=torch.int64, device=data.device) if u_counts else None,
                        data, None)
        return p[0], p[1], p[2], u[0], u[1], LookupState(places, batch)


def _tbe_inputs(ids: list[Tensor], lengths: Optional[Tensor], like: Tensor, weights):
    if lengths is None:
        return None, None, None
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    indices = torch.cat(ids) if ids else like.new_zeros(0)
    return indices, offsets, None if weights is None else torch.cat(weights)
