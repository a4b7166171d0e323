"""Sharded table storage: allocate, initialise, slice and reassemble embedding shards.

A shard is the block ``rows=(r0, r1)``, ``cols=(c0, c1)`` (half-open) of a table of
``num_embeddings x embedding_dim``. Nothing here ever materialises a full table except
`gather_full` (whose job it is) and whatever the caller passes to `shard_from_full`.

`deterministic_init` is counter-based: the table is cut into fixed blocks of ``ROW_BLOCK x
COL_BLOCK`` and each block is drawn from its own generator, seeded by a stable hash of
(seed, table name, block row, block column). Any shard is therefore the same slice of the
same full table on every rank, in every process and on every run, and costs time in
proportion to its own size (plus the partial blocks on its edges).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fxrec.runtime import comm

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["ROW_BLOCK", "COL_BLOCK", "deterministic_init", "gather_full", "shard_from_full", "allocate_shard"]

ROW_BLOCK = 4096
COL_BLOCK = 64

Range = tuple[int, int]
Piece = tuple[Range, Range, Tensor]


def _check_range(table: str, what: str, rng, size: int) -> Range:
    start, end = int(rng[0]), int(rng[1])
    if not 0 <= start <= end <= size:
        raise ValueError(f"table {table!r}: {what} range {tuple(rng)} is not within [0, {size}]")
    return start, end


def block_seed(seed: int, table_name: str, block_row: int, block_col: int) -> int:
    """A 63-bit seed from (seed, table, block) via blake2b: the same in every process
    (Python's hash() of a str is salted per process)."""
    key = f"{int(seed)}\x1f{table_name}\x1f{block_row}\x1f{block_col}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2 ** 63 - 1)


def _block(table: str, seed: int, n: int, d: int, br: int, bc: int, bound: float) -> Tensor:
    rows = min(ROW_BLOCK, n - br * ROW_BLOCK)
    cols = min(COL_BLOCK, d - bc * COL_BLOCK)
    gen = torch.Generator().manual_seed(block_seed(seed, table, br, bc))
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=gen)


def deterministic_init(table_name: str, num_embeddings: int, embedding_dim: int, rows: Range, cols: Range,
                       seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The shard ``[rows, cols]`` of the table ``table_name`` initialised like fxrec's default
    (uniform in +-sqrt(1/num_embeddings)), as a new contiguous tensor of ``dtype`` on ``device``.

    Values are drawn on the CPU in float32 (identical on every device), then cast and moved.
    Equal arguments give equal values in any process; the shards of any tiling concatenate to
    ``deterministic_init(name, n, d, (0, n), (0, d))``.
    """
    n, d = int(num_embeddings), int(embedding_dim)
    if n <= 0 or d <= 0:
        raise ValueError(f"table {table_name!r}: shape must be positive, got {n} x {d}")
    r0, r1 = _check_range(table_name, "rows", rows, n)
    c0, c1 = _check_range(table_name, "cols", cols, d)
    bound = math.sqrt(1.0 / n)
    out = torch.empty(r1 - r0, c1 - c0)
    for br in range(r0 // ROW_BLOCK, -(-r1 // ROW_BLOCK)):
        b_r0 = br * ROW_BLOCK
        lo_r, hi_r = max(r0, b_r0), min(r1, b_r0 + ROW_BLOCK)
        for bc in range(c0 // COL_BLOCK, -(-c1 // COL_BLOCK)):
            b_c0 = bc * COL_BLOCK
            lo_c, hi_c = max(c0, b_c0), min(c1, b_c0 + COL_BLOCK)
            block = _block(table_name, seed, n, d, br, bc, bound)
            out[lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0] = block[lo_r - b_r0:hi_r - b_r0, lo_c - b_c0:hi_c - b_c0]
    return out.to(dtype=dtype, device=device)


def shard_from_full(full: Tensor, rows: Range, cols: Range) -> Tensor:
    """A contiguous copy of ``full[r0:r1, c0:c1]`` (never a view: the shard owns its memory)."""
    if full.dim() != 2:
        raise ValueError(f"shard_from_full: expected a 2-D table, got shape {tuple(full.shape)}")
    r0, r1 = _check_range("<full>", "rows", rows, full.shape[0])
    c0, c1 = _check_range("<full>", "cols", cols, full.shape[1])
    return full[r0:r1, c0:c1].clone(memory_format=torch.contiguous_format)


def allocate_shard(num_rows: int, num_cols: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Uninitialised storage for one shard: exactly ``num_rows * num_cols`` elements."""
    if num_rows < 0 or num_cols < 0:
        raise ValueError(f"allocate_shard: sizes must be non-negative, got {num_rows} x {num_cols}")
    return torch.empty(int(num_rows), int(num_cols), dtype=dtype, device=device)


# ------------------------------------------------------------------ gather_full
def _unique_pieces(metas: list[list[tuple[Range, Range]]], n: int, d: int) -> dict:
    """{(rows, cols): (owner rank, index in its list)}: each distinct block once, from the
    lowest rank that holds it (data-parallel tables repeat the whole table on every rank).
    Raises unless the distinct blocks tile the table exactly."""
    owner: dict = {}
    for r, pieces in enumerate(metas):
        for i, (rows, cols) in enumerate(pieces):
            _check_range("<gather_full>", "rows", rows, n)
            _check_range("<gather_full>", "cols", cols, d)
            owner.setdefault((tuple(rows), tuple(cols)), (r, i))
    keys = list(owner)
    area = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in keys)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            (ar, ac), (br, bc) = keys[a], keys[b]
            if ar[0] < br[1] and br[0] < ar[1] and ac[0] < bc[1] and bc[0] < ac[1]:
                raise ValueError(f"gather_full: pieces rows={ar} cols={ac} and rows={br} cols={bc} overlap")
    if area != n * d:
        raise ValueError(f"gather_full: the pieces cover {area} of the table's {n * d} elements "
                         f"({n} x {d}); some shard is missing")
    return owner


def _area(key) -> int:
    (r0, r1), (c0, c1) = key
    return (r1 - r0) * (c1 - c0)


def _layout(metas, owner: dict) -> list[list[tuple]]:
    """Per rank, the pieces it sends as (key, index in its list, offset in its flat buffer)."""
    layout = []
    for rank, pieces in enumerate(metas):
        offset, sends = 0, []
        for i, key in enumerate(pieces):
            key = (tuple(key[0]), tuple(key[1]))
            if owner[key] == (rank, i):
                sends.append((key, i, offset))
                offset += _area(key)
        layout.append(sends)
    return layout


def gather_full(shards: list[Piece], num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                group=None, dst: Optional[int] = None) -> Optional[Tensor]:
    """Reassemble a table from every rank's ``(rows, cols, tensor)`` pieces.

    Collective: every rank of ``group`` calls it (a rank holding nothing passes ``[]``).
    Returns the full ``num_embeddings x embedding_dim`` tensor of ``dtype`` on every rank
    (``dst=None``) or only on global rank ``dst`` (None elsewhere). Identical pieces held by
    several ranks (a data-parallel table) are sent once, by the lowest such rank.

    Memory: piece shapes travel with ``all_gather_object``; the values travel as one flat
    buffer per rank padded to the largest rank's share P (at most the table's size, when one
    rank holds it all), so each receiving rank holds W x P elements plus the full table.
    Raises ValueError unless the distinct pieces tile the table exactly.
    """
    n, d = int(num_embeddings), int(embedding_dim)
    mine = [((int(r[0]), int(r[1])), (int(c[0]), int(c[1]))) for r, c, _ in shards]
    for key, (_, _, t) in zip(mine, shards):
        if tuple(t.shape) != (key[0][1] - key[0][0], key[1][1] - key[1][0]):
            raise ValueError(f"gather_full: piece rows={key[0]} cols={key[1]} has shape {tuple(t.shape)}")
    w = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    metas: list = [mine]
    if w > 1:
        metas = [None] * w
        dist.all_gather_object(metas, mine, group=group)
    owner = _unique_pieces(metas, n, d)
    layout = _layout(metas, owner)
    sizes = [sum(_area(key) for key, _, _ in sends) for sends in layout]
    pad, me, device = max(sizes), (dist.get_rank(group) if w > 1 else 0), comm.collective_device(group)
    buf = torch.zeros(pad, dtype=dtype, device=device)
    for key, i, offset in layout[me]:
        buf[offset:offset + _area(key)] = shards[i][2].detach().reshape(-1)
    if w == 1:
        flats = [buf]
    elif dst is None:
        gathered = torch.empty(w * pad, dtype=dtype, device=device)
        _all_gather_single(gathered, buf, group=group)
        flats = list(gathered.split(pad))
    else:
        recv = [torch.empty(pad, dtype=dtype, device=device) for _ in range(w)] if dist.get_rank() == dst else None
        dist.gather(buf, recv, dst=dst, group=group)
        if recv is None:
            return None
        flats = recv
    full = torch.empty(n, d, dtype=dtype, device=device)
    for rank, sends in enumerate(layout):
        for ((r0, r1), (c0, c1)), _, offset in sends:
            full[r0:r1, c0:c1] = flats[rank][offset:offset + _area(((r0, r1), (c0, c1)))].view(r1 - r0, c1 - c0)
    return full
