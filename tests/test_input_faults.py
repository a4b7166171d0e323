"""`find_fault`, the check of a unit's inputs: its all-slots-at-once test (`_all_fine`) finds
every fault the slot-by-slot one (`_first_fault`) finds, and only those, on random inputs
with one planted fault of each kind."""
from __future__ import annotations

import pytest
import torch

from fxrec.passes.shard_ops import (ID_RANGE, LENGTHS_SUM, NEGATIVE_LENGTH, InputFault, SlotInput, SlotSpec,
                                    _as_given, _first_fault, find_fault)


def _slots(rows: list[int]) -> list[SlotSpec]:
    return [SlotSpec(f"n{k}", f"t{k}", None, "sum", True, r, 4, False) for k, r in enumerate(rows)]


def _inputs(g, rows: list[int], batch: int) -> list[SlotInput]:
    out = []
    for r in rows:
        lengths = torch.randint(0, 4, (batch,), generator=g)
        out.append(SlotInput(torch.randint(0, r, (int(lengths.sum()),), generator=g), lengths))
    return out


def _plant(kind: str, inp: SlotInput, rows: int) -> None:
    if kind == "id_high":
        inp.values = torch.cat([inp.values, torch.tensor([rows])])
        inp.lengths = inp.lengths.clone()
        inp.lengths[-1] += 1
    elif kind == "id_negative":
        inp.values = torch.cat([torch.tensor([-3]), inp.values])
        inp.lengths = inp.lengths.clone()
        inp.lengths[0] += 1
    elif kind == "negative_length":  # the sum still matches: only the sign is wrong
        inp.lengths = inp.lengths.clone()
        inp.lengths[-1] += inp.lengths[0] + 1
        inp.lengths[0] = -1
    elif kind == "sum":
        inp.lengths = inp.lengths.clone()
        inp.lengths[-1] += 1


# (planted fault, the kind find_fault reports)
CASES = [(None, None), ("id_high", ID_RANGE), ("id_negative", ID_RANGE), ("negative_length", NEGATIVE_LENGTH),
         ("sum", LENGTHS_SUM)]


# Slots of one table size share one min/max of their joined ids (`_all_fine`): sizes all
# different, and sizes shared by slots far apart
ROWS = {"distinct": [5, 1000, 17, 3, 64, 2, 9], "shared": [17, 5, 17, 1000, 5, 17, 9]}


@pytest.mark.parametrize("plant, kind", CASES)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sizes", list(ROWS))
def test_all_slots_at_once_finds_what_slot_by_slot_finds(plant, kind, batch, sizes):
    batch = max(batch, 2) if plant == "negative_length" else batch  # moving ids between bags needs two
    rows = ROWS[sizes]
    for seed in range(len(rows)):
        g = torch.Generator().manual_seed(seed)
        slots, inputs = _slots(rows), _inputs(g, rows, batch)
        bad = seed % len(rows)
        if plant is not None:
            _plant(plant, inputs[bad], rows[bad])
        got = find_fault(slots, inputs)
        assert got == _first_fault(slots, inputs, [_as_given(i) for i in inputs])
        if kind is None:
            assert got is None
        else:
            assert isinstance(got, InputFault) and (got.kind, got.slot) == (kind, bad)


def test_int32_lengths_empty_batches_and_bagless_ids():
    slots = _slots([10, 10, 10])
    inputs = [SlotInput(torch.tensor([1, 2, 3]), torch.tensor([2, 1], dtype=torch.int32)),
              SlotInput(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)),
              SlotInput(torch.tensor([9]), None)]
    assert find_fault(slots, inputs) is None
    inputs[0].lengths = torch.tensor([2, 2], dtype=torch.int32)
    assert find_fault(slots, inputs) == InputFault(LENGTHS_SUM, 0, 4, 3)
    inputs[0].lengths = torch.tensor([2, 1], dtype=torch.int32)
    inputs[2].values = torch.tensor([10])  # ids without bags (an unpooled read) are range-checked too
    assert find_fault(slots, inputs) == InputFault(ID_RANGE, 2, 10, 1)
    empty = [SlotInput(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) for _ in slots]
    assert find_fault(slots, empty) is None
    empty[1] = SlotInput(torch.tensor([4]), torch.zeros(0, dtype=torch.int64))  # an id, and no bag to hold it
    assert find_fault(slots, empty) == InputFault(LENGTHS_SUM, 1, 0, 1)
