"""The output side of a sharded lookup unit (see dist_lookup.py for the whole pipeline).

`OutputPrep` cuts this rank's lookup results into the send buffers of the output
collectives; `CollectOutputs` cuts what came back into one result per slot. Buffers are 1-D
(shards differ in width). Orders, shared by both sides:

- all_to_all (table_wise / column_wise sums, every unpooled row): the block between a holder
  and a receiver holds first the pooled routes, then the unpooled ones, each in route order.
  Pooled routes that all carry the same number of bags (the usual case: every feature of a
  batch has one bag per sample) are laid out row-major, one row per bag holding every route's
  columns (`_block_layout`): that is how the holder's fused lookup output already lies, so
  when the buffer is the whole output (every a2a-served shard, every bag) it is sent as it
  is, without a copy, and its gradient needs none either. Otherwise each route's rows follow
  one another (``rows x width`` each). The gradients' 1/W (local_lookup.py) is applied by the
  receiver's `_Blocks` backward, which writes every gradient element of the buffer once
  anyway;
- reduce_scatter (row_wise): chunk s holds, for each row_wise slot in slot order, the partial
  sums of s's bags (chunks differ when the ranks fed different batch sizes: the collective
  pads them); after the sum each rank holds its own chunk;
- table_row_wise: on each node, chunk j of the node's reduce_scatter holds, for every node m
  and each of the node's table_row_wise slots, the partial sums of rank (m, j)'s bags; the
  cross-node all_to_all then sends node m's block to rank (m, j).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.passes.shard_ops import ColumnBlocks
from fxrec.runtime.dist_lookup import LookupState, SendState, UnitSpec

__all__ = ["OutputPrep", "CollectOutputs", "GroupTable", "reaching"]


def _grad_anchor(buf: Tensor) -> Tensor:
    if torch.is_grad_enabled() and not buf.requires_grad:
        # Every rank must run the collective's backward, also one that holds no shard
        # (its buffer is empty and would otherwise be cut from the autograd graph).
        buf = buf.detach().requires_grad_(True)
    return buf


class _HangFrom(torch.autograd.Function):
    """Identity on `buf` whose backward also reaches `token` (row_sync.py): the token's
    backward then runs after this buffer's collective's, on every rank."""

    @staticmethod
    def forward(ctx, buf, token):
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Reaches(torch.autograd.Function):
    """Identity on `buf` whose backward also gives `other` a zero gradient: `other`'s own
    collective's backward then runs on every rank."""

    @staticmethod
    def forward(ctx, buf, other):
        ctx.other_shape = other.shape
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.other_shape)


def reaching(buf: Optional[Tensor], received_weights: Optional[Tensor]) -> Optional[Tensor]:
    """`buf` (a unit's send buffer) such that its backward reaches the per-sample weights the
    unit received, when they take gradients. Their all-to-all's backward must run on every
    rank, also one whose shards read no weights (a table_wise unit's weighted table lives on
    one rank): without this, that rank left the collective out and its peers waited in it."""
    if buf is None or received_weights is None or not received_weights.requires_grad or not torch.is_grad_enabled():
        return buf
    return _Reaches.apply(buf, received_weights)


def _block_layout(counts: list[int], widths: list[int]) -> list[tuple[int, int, int]]:
    """Where the pooled routes of one all_to_all block lie, as (offset in the block, row
    width, first column) per route, given each route's bag count and width: row-major (one
    row of ``sum(widths)`` per bag) when every count is the same, else one ``count x width``
    piece per route in turn. Holder and receiver both call it, with the same numbers."""
    if counts and all(c == counts[0] for c in counts):
        total, col = sum(widths), 0
        out = []
        for w in widths:
            out.append((0, total, col))
            col += w
        return out
    out, o = [], 0
    for c, w in zip(counts, widths):
        out.append((o, w, 0))
        o += c * w
    return out


def _dst(buf: Tensor, pos: int, rows: int, width: int, col: int, cols: int) -> Tensor:
    """The ``rows x cols`` window at column `col` of the ``rows x width`` matrix at `pos` of `buf`."""
    return buf[pos:pos + rows * width].view(rows, width)[:, col:col + cols]


class _Pieces(torch.autograd.Function):
    """Rectangles ``boxes`` = [(tensor, r0, r1, c0, c1, pos, width, col)] of 2-D `tensors`,
    each written once into one 1-D buffer of `numel`, at column `col` of the ``(r1 - r0) x
    width`` matrix starting at `pos` (``width = c1 - c0, col = 0``: the flattened rectangle).
    Backward writes every piece's gradient, times `scale`, into one gradient per input
    (zero-filled only where the boxes leave gaps): slicing piece by piece would allocate and
    zero-fill a gradient the size of the whole lookup output per piece, quadratic in the
    number of pieces."""

    @staticmethod
    def forward(ctx, boxes, scale, numel, *tensors):
        ctx.boxes, ctx.scale, ctx.shapes = boxes, scale, [t.shape for t in tensors]
        out = tensors[0].new_empty(numel)
        for t, r0, r1, c0, c1, pos, width, col in boxes:
            _dst(out, pos, r1 - r0, width, col, c1 - c0).copy_(tensors[t][r0:r1, c0:c1])
        return out

    @staticmethod
    def backward(ctx, grad):
        # Boxes never overlap (each is one (source, route) place), so boxes whose areas add
        # up to a tensor's size cover all of it: its gradient needs no zero fill.
        covered = [0] * len(ctx.shapes)
        for t, r0, r1, c0, c1, *_ in ctx.boxes:
            covered[t] += (r1 - r0) * (c1 - c0)
        grads = [grad.new_empty(shape) if covered[t] == shape.numel() else grad.new_zeros(shape)
                 for t, shape in enumerate(ctx.shapes)]
        for t, r0, r1, c0, c1, pos, width, col in ctx.boxes:
            src, dst = _dst(grad, pos, r1 - r0, width, col, c1 - c0), grads[t][r0:r1, c0:c1]
            if ctx.scale == 1.0:
                dst.copy_(src)
            else:
                torch.mul(src, ctx.scale, out=dst)
        return (None, None, None, *grads)


def _whole(boxes, shape) -> bool:
    """Whether `boxes` place every element of the one 2-D tensor of `shape` exactly where it
    lies in memory (row-major), so that the buffer is that tensor, flattened."""
    C = shape[1]
    return all(t == 0 and width == C and col == c0 and pos == r0 * C for t, r0, _, c0, _, pos, width, col in boxes) \
        and sum((r1 - r0) * (c1 - c0) for _, r0, r1, c0, c1, *_ in boxes) == shape[0] * C


class _Blocks(torch.autograd.Function):
    """Views ``rows x cols`` of the 1-D `buf` at `blocks` = [(offset, rows, width, col,
    cols)]: from column `col` of the ``rows x width`` matrix at `offset`. Backward writes each
    block's gradient once, times `scale`, into one buffer (plain split + view would copy a
    non-contiguous block gradient twice: in the view's backward, then the cat)."""

    @staticmethod
    def forward(ctx, blocks, scale, buf):
        ctx.blocks, ctx.scale, ctx.numel = blocks, scale, buf.numel()
        return tuple(_dst(buf, o, n, width, col, cols) for o, n, width, col, cols in blocks)

    @staticmethod
    def backward(ctx, *grads):
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None, None
        full = all(g is not None for g in grads) and sum(n * c for _, n, _, _, c in ctx.blocks) == ctx.numel
        out = ref.new_empty(ctx.numel) if full else ref.new_zeros(ctx.numel)
        for (o, n, width, col, cols), g in zip(ctx.blocks, grads):
            if g is not None:
                dst = _dst(out, o, n, width, col, cols)
                if ctx.scale == 1.0:
                    dst.copy_(g)
                else:
                    torch.mul(g, ctx.scale, out=dst)
        return None, None, out


@eager_under_dynamo
class OutputPrep(nn.Module):
    """forward(pooled out, unpooled outs, LookupState, SendState) -> (all_to_all buffer, its
    out splits, in splits, row_wise reduce_scatter buffer, its chunk sizes, table_row_wise
    reduce_scatter buffer, its chunk sizes, cross-node out splits, in splits); the
    table_row_wise four are None when the unit has no such table.

    grad_scale: the factor backward applies to the gradients of the lookup results sent by
    reduce_scatter (the 1/W of local_lookup.py, applied here because this backward writes
    every gradient element once anyway); those sent by all_to_all get it from the receiver's
    `CollectOutputs`, so that a buffer that is the lookup output itself needs no backward."""

    def __init__(self, spec: UnitSpec, dtype: torch.dtype, device=None, grad_scale: float = 1.0):
        super().__init__()
        self.spec, self.dtype, self.device, self.grad_scale = spec, dtype, device, float(grad_scale)
        self.shards = spec.local_shards()
        self.col0 = {}  # pooled shard position -> its first column in the fused output
        c = 0
        for pos, s in enumerate(self.shards):
            if s.pooled:
                self.col0[pos] = c
                c += s.num_cols

    def _rect(self, tensors: list, ls: LookupState, key) -> tuple[int, int, int, int, int]:
        """(tensor, r0, r1, c0, c1): where the lookup results of (source rank, route) `key` lie."""
        pos, start, n = ls.places[key]
        shard = self.shards[pos]
        if shard.pooled:
            c = self.col0[pos]
            return 0, start, start + n, c, c + shard.num_cols
        t = (1 if self.col0 else 0) + pos - len(self.col0)
        return t, start, start + n, 0, tensors[t].shape[1]

    @staticmethod
    def _buffer(boxes: list, numel: int, tensors: list, scale: float, empty: Tensor) -> Tensor:
        if not boxes:
            return _grad_anchor(empty)
        if scale == 1.0 and _whole(boxes, tensors[0].shape):
            # the fused output as it lies: no copy, nor in backward (anchored: a rank holding
            # only frozen tables has an output without grad, yet must join the backward)
            return _grad_anchor(tensors[0].reshape(-1))
        return _grad_anchor(_Pieces.apply(boxes, scale, numel, *tensors))

    def _flat_boxes(self, tensors: list, ls: LookupState, keys, boxes: list, pos: int) -> int:
        """Append the boxes of the (source rank, route) `keys`, each flattened, one after
        another from `pos`; returns the position after them."""
        for key in keys:
            t, r0, r1, c0, c1 = self._rect(tensors, ls, key)
            boxes.append((t, r0, r1, c0, c1, pos, c1 - c0, 0))
            pos += (r1 - r0) * (c1 - c0)
        return pos

    def _pieces(self, p_out, u_out, ls: LookupState, keys: list, empty: Tensor) -> Tensor:
        """The lookup results of the (source rank, route) `keys`, flattened and concatenated."""
        tensors = ([p_out] if p_out is not None else []) + list(u_out)
        boxes: list = []
        pos = self._flat_boxes(tensors, ls, keys, boxes, 0)
        return self._buffer(boxes, pos, tensors, self.grad_scale, empty)

    def _a2a_buffer(self, p_out, u_out, ls: LookupState, mine: list[int], empty: Tensor) -> Tensor:
        """The all_to_all send buffer: per receiver, the block of the module doc (its pooled
        routes as `_block_layout` places them, then its unpooled ones); gradients unscaled."""
        tensors = ([p_out] if p_out is not None else []) + list(u_out)
        routes = self.spec.routes
        pooled = [i for i in mine if routes[i].pooled]
        unpooled = [i for i in mine if not routes[i].pooled]
        boxes, pos = [], 0
        for s in range(self.spec.world_size):
            rects = [self._rect(tensors, ls, (s, i)) for i in pooled]
            layout = _block_layout([r1 - r0 for _, r0, r1, _, _ in rects], [c1 - c0 for *_, c0, c1 in rects])
            for (t, r0, r1, c0, c1), (o, width, col) in zip(rects, layout):
                boxes.append((t, r0, r1, c0, c1, pos + o, width, col))
            pos += sum((r1 - r0) * (c1 - c0) for _, r0, r1, c0, c1 in rects)
            pos = self._flat_boxes(tensors, ls, [(s, i) for i in unpooled], boxes, pos)
        return self._buffer(boxes, pos, tensors, 1.0, empty)

    def forward(self, p_out, u_out, ls: LookupState, send: SendState, sync=None):
        """sync: the unit's `RowSyncState` (or None); its token hangs from every buffer."""
        # a unit whose tables differ in dtype sends in the one they promote to (apply_plan.comm_dtype)
        p_out = p_out.to(self.dtype) if p_out is not None else None
        u_out = [u.to(self.dtype) for u in u_out]
        out = self._send_buffers(p_out, u_out, ls, send)
        if sync is None:
            return out
        a2a, a2a_out, a2a_in, rs, rs_splits, tw, tw_splits, tw_out, tw_in = out
        hang = [None if b is None else _HangFrom.apply(b, sync.token) for b in (a2a, rs, tw)]
        return hang[0], a2a_out, a2a_in, hang[1], rs_splits, hang[2], tw_splits, tw_out, tw_in

    def _send_buffers(self, p_out, u_out, ls: LookupState, send: SendState):
        spec, W = self.spec, self.spec.world_size
        mine = [i for i in spec.my_routes() if spec.routes[i].output == "a2a"]
        empty = torch.zeros(0, dtype=self.dtype, device=self.device)
        a2a = self._a2a_buffer(p_out, u_out, ls, mine, empty)
        a2a_in = [sum(ls.places[(s, i)][2] * spec.routes[i].width for i in mine) for s in range(W)]
        a2a_out = [0] * W
        for i, r in enumerate(spec.routes):
            if r.output == "a2a":
                a2a_out[r.rank] += send.sizes[i][0 if r.pooled else 1] * r.width
        rs, rs_splits = self._rs_buffer(p_out, u_out, ls, [[(s, spec.route_to(k, spec.rank))
                                                            for k in spec.slots_by_output("rs")] for s in range(W)],
                                        empty)
        return (a2a, a2a_out, a2a_in, rs, rs_splits) + self._twrw(p_out, u_out, ls, send, empty)

    def _rs_buffer(self, p_out, u_out, ls: LookupState, chunks: list[list], empty: Tensor):
        """(reduce_scatter send buffer, its chunk sizes): chunk j holds the lookup results of
        the (source rank, route) keys ``chunks[j]``, one after another. Chunks differ when the
        ranks fed different batch sizes; every rank of the group computes the same sizes (each
        holder got every source's bag counts) and `comm.reduce_scatter` pads them."""
        sizes = [sum(ls.places[key][2] * self.spec.routes[key[1]].width for key in keys) for keys in chunks]
        return self._pieces(p_out, u_out, ls, [key for keys in chunks for key in keys], empty), sizes

    def _twrw(self, p_out, u_out, ls, send: SendState, empty):
        spec, P, M = self.spec, self.spec.ranks_per_node, self.spec.num_nodes
        if not any(r.output == "twrw" for r in spec.routes):
            return None, None, None, None
        mine = spec.slots_by_output("twrw", spec.rank // P)
        route = {k: spec.route_to(k, spec.rank) for k in mine}
        parts, splits = self._rs_buffer(p_out, u_out, ls, [[(m * P + j, route[k]) for m in range(M) for k in mine]
                                                           for j in range(P)], empty)
        # after the node's reduce_scatter this rank (local index j) holds, per node m, the sums
        # of rank (m, j)'s bags for this node's tables: block m goes to rank (m, j); what comes
        # back from node n are this rank's own bags' sums for node n's tables
        j = spec.rank % P
        cross_in = [sum(ls.places[(m * P + j, route[k])][2] * spec.slots[k].dim for k in mine) for m in range(M)]
        cross_out = [sum(send.bags[k] * spec.slots[k].dim for k in spec.slots_by_output("twrw", n))
                     for n in range(M)]
        return parts, splits, cross_out, cross_in


@eager_under_dynamo
class CollectOutputs(nn.Module):
    """forward(inputs, SendState or None, all_to_all result, row_wise result, table_row_wise
    result, replicated outputs) -> per slot: pooled sums ``bags x dim`` (tables served
    pooled; possibly a strided view into the received buffer) or rows ``ids x dim`` in the
    slot's own id order.

    grad_scale: the factor the backward applies to the gradients of what all_to_all
    brought (the 1/W of local_lookup.py; see the module doc)."""

    def __init__(self, spec: UnitSpec, dp_slots: list[int], grad_scale: float = 1.0):
        super().__init__()
        self.spec, self.dp_slots, self.grad_scale = spec, list(dp_slots), float(grad_scale)

    def _a2a_pieces(self, a2a: Tensor, send: SendState) -> dict:
        """Route -> its received block, ``rows x width``."""
        spec, keys, blocks, o = self.spec, [], [], 0
        for d in range(spec.world_size):
            from_d = [i for i, r in enumerate(spec.routes) if r.rank == d and r.output == "a2a"]
            pooled = [i for i in from_d if spec.routes[i].pooled]
            counts = [send.sizes[i][0] for i in pooled]
            widths = [spec.routes[i].width for i in pooled]
            for i, (off, width, col), n, w in zip(pooled, _block_layout(counts, widths), counts, widths):
                keys.append(i)
                blocks.append((o + off, n, width, col, w))
            o += sum(n * w for n, w in zip(counts, widths))
            for i in from_d:
                if not spec.routes[i].pooled:
                    n, w = send.sizes[i][1], spec.routes[i].width
                    keys.append(i)
                    blocks.append((o, n, w, 0, w))
                    o += n * w
        return dict(zip(keys, _Blocks.apply(blocks, self.grad_scale, a2a))) if keys else {}

    def _chunks(self, buf: Optional[Tensor], slots: list[int], send: SendState) -> dict:
        if not slots:
            return {}
        dims = [self.spec.slots[k].dim for k in slots]
        parts = buf.split([send.bags[k] * d for k, d in zip(slots, dims)])
        return {k: p.view(send.bags[k], d) for k, p, d in zip(slots, parts, dims)}

    def _from_a2a(self, k: int, pieces: dict, send: SendState) -> Tensor:
        spec = self.spec
        routes = spec.routes_of_slot(k)
        blocks = [pieces[i] for i in routes]
        if spec.routes[routes[0]].bucketized:  # row-served row_wise: rows come back grouped by shard
            rows = torch.cat(blocks)
            perm = send.perms[k]
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(rows.shape[0], device=rows.device)
            return rows.index_select(0, inverse)
        # table_wise: one block; column_wise: the column blocks, in column order, which
        # FinishOutputs joins (with the other slots of a KeyedTensor in the same copy)
        return blocks[0] if len(blocks) == 1 else ColumnBlocks(blocks)

    def forward(self, inputs, send: Optional[SendState], a2a, rs, twrw, replicated):
        spec = self.spec
        out = dict(zip(self.dp_slots, replicated or []))
        if send is not None:
            out.update(self._chunks(rs, spec.slots_by_output("rs"), send))
            twrw_slots = [k for n in range(spec.num_nodes) for k in spec.slots_by_output("twrw", n)]
            out.update(self._chunks(twrw, twrw_slots, send))
            pieces = self._a2a_pieces(a2a, send) if a2a is not None else {}
            for k in range(len(spec.slots)):
                if k not in out:
                    out[k] = self._from_a2a(k, pieces, send)
        return [out[k] for k in range(len(spec.slots))]


@eager_under_dynamo
class GroupTable(nn.Module):
    """forward(name) -> the process group `name` ("intra_node" / "cross_node"), so that graph
    nodes name a group without holding the (unprintable) group object in the code."""

    def __init__(self, groups):
        super().__init__()
        self._groups = groups

    def forward(self, name: str):
        return getattr(self._groups, name) if self._groups is not None else None
