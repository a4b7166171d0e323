"""The all_to_all block layout of dist_output.py: pooled routes of equal bag counts row-major
(so a holder's whole fused output is sent as it lies, without a copy either way), unequal
ones route by route. Numbers are checked by the equivalence suite (tests/test_shard_
equivalence.py, whose `uneven_bags` model sends unequal counts); here, the layout itself and
that the zero-copy buffer is really used."""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_workers
from fxrec.runtime import dist_output
from fxrec.runtime.dist_output import _block_layout, _whole
from shard_models import CASES


@pytest.mark.parametrize("counts, widths, layout", [
    ([4, 4, 4], [8, 16, 8], [(0, 32, 0), (0, 32, 8), (0, 32, 24)]),  # one row of 32 per bag
    ([5], [8], [(0, 8, 0)]),
    ([4, 8, 4], [8, 16, 8], [(0, 8, 0), (32, 16, 0), (160, 8, 0)]),  # 4x8, then 8x16, then 4x8
    ([0, 0], [4, 4], [(0, 8, 0), (0, 8, 4)]),  # no bags: nothing to place, either way
    ([], [], []),
])
def test_block_layout(counts, widths, layout):
    assert _block_layout(counts, widths) == layout


@pytest.mark.parametrize("boxes, whole", [
    # (tensor, r0, r1, c0, c1, pos, width, col) over a 6 x 8 tensor
    ([(0, 0, 3, 0, 4, 0, 8, 0), (0, 0, 3, 4, 8, 0, 8, 4), (0, 3, 6, 0, 8, 24, 8, 0)], True),
    ([(0, 0, 3, 0, 4, 0, 8, 0), (0, 0, 3, 4, 8, 0, 8, 4)], False),  # rows 3-5 not sent
    ([(0, 0, 6, 0, 4, 0, 4, 0), (0, 0, 6, 4, 8, 24, 4, 0)], False),  # column blocks: a transpose
    ([(0, 3, 6, 0, 8, 0, 8, 0), (0, 0, 3, 0, 8, 24, 8, 0)], False),  # rows swapped
    ([(1, 0, 6, 0, 8, 0, 8, 0)], False),  # another tensor
])
def test_whole(boxes, whole):
    assert _whole(boxes, (6, 8)) == whole


def _pieces_calls(rank: int, world: int) -> tuple[int, float]:
    """(how many times _Pieces ran in a forward + backward of table_wise DLRM, the loss) on
    this rank. DLRM with a list of nn.EmbeddingBag: no table read by two features (whose
    single shard stacks the features' bags, a layout the buffer cannot simply be)."""
    import fxrec
    from fxrec.topology import Topology

    calls = []
    real = dist_output._Pieces.apply
    dist_output._Pieces.apply = lambda *a: calls.append(1) or real(*a)
    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    model = case.build()
    batches = case.local_batches(world, 4, seed=1)
    tables = fxrec.find_tables(model, batches[0])
    sm = fxrec.shard(model, Topology(world), batches[rank], constraints={t.name: "table_wise" for t in tables},
                     sparse_optimizer=fxrec.optim.SGD(0.1))
    loss = sm(*batches[rank]).sum()
    loss.backward()
    return len(calls), float(loss)


def test_table_wise_sends_the_lookup_output_without_a_copy():
    assert [calls for calls, _ in run_workers(_pieces_calls, 2)] == [0, 0]
