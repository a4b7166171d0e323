"""The bounds check through every lookup kernel: the same error, naming the table and the id
(or the offsets' fault), whether the module checks the batch before the lookup (torch and
fbgemm: `check_inputs`) or the kernel checks the ids as it loads them (Triton: kernels.py's
CHECK, then one read of its fault record).

Triton runs only in the Triton interpreter, which must be switched on before triton is
imported, so `test_triton_interpreter_suite` reruns this file in a child pytest with
TRITON_INTERPRET=1 and FXREC_TEST_KERNELS=triton. There an id of 2**40 would be read far
outside the table if the kernel loaded it, so the table below also shows bad ids are never
loaded.
"""
from __future__ import annotations

import os

import pytest
import torch

from fxrec.lowering import FusedEmbeddingBags, NoKernelError
from fxrec.lowering import layout as layout_mod
from fxrec.lowering.quant_tbe import QuantizedEmbeddingBags
from fxrec.optim import SGD
from fxrec.types import TableInfo
from triton_child import assert_interpreter_child_passes

KERNELS_UNDER_TEST = os.environ.get("FXREC_TEST_KERNELS", "torch,fbgemm").split(",")
CHILD = "triton" in KERNELS_UNDER_TEST
ROWS = (("a", 10), ("b", 10), ("c", 5), ("d", 10), ("e", 10))  # B = 1: one bag per table


def tables(pooling: str) -> list[TableInfo]:
    return [TableInfo(n, r, 4, pooling=pooling) for n, r in ROWS]


MODULES = {  # kind -> module builder (kernel, bounds_check, device)
    "pooled": lambda k, check, dev="cpu": FusedEmbeddingBags(tables("sum"), optimizer=SGD(0.1), kernel=k,
                                                            bounds_check=check, device=dev),
    "mean": lambda k, check, dev="cpu": FusedEmbeddingBags(tables("mean"), kernel=k, bounds_check=check, device=dev),
    "unpooled": lambda k, check, dev="cpu": FusedEmbeddingBags(tables("none"), optimizer=SGD(0.1), kernel=k,
                                                              bounds_check=check, device=dev),
    "quant_pooled": lambda k, check, dev="cpu": QuantizedEmbeddingBags(tables("sum"), "int8", kernel=k,
                                                                      bounds_check=check, device=dev),
    "quant_unpooled": lambda k, check, dev="cpu": QuantizedEmbeddingBags(tables("none"), "int4", kernel=k,
                                                                        bounds_check=check, device=dev),
}


def serving(kernel: str, kind: str) -> bool:
    try:
        MODULES[kind](kernel, True)
    except NoKernelError:  # fbgemm-gpu-cpu declines some of these (fxrec/lowering/fbgemm.py)
        return False
    return True


CASES = [  # (ids, offsets, None: valid / the error's pattern)
    ([9, 9, 4, 9, 9], [0, 1, 2, 3, 4, 5], None),  # every table's last row
    ([3], [0, 0, 0, 1, 1, 1], None),
    ([], [0, 0, 0, 0, 0, 0], None),
    ([9, 9, 5, 9, 9], [0, 1, 2, 3, 4, 5], r"table 'c': id 5 out of range \[0, 5\)"),
    ([9, 9, 4, 9, 10], [0, 1, 2, 3, 4, 5], r"table 'e': id 10 out of range \[0, 10\)"),
    ([4, 10], [0, 0, 0, 1, 1, 2], r"table 'e': id 10 out of range"),
    ([-1, 0], [0, 0, 0, 0, 1, 2], r"table 'd': id -1 out of range \[0, 10\)"),
    ([2 ** 40, 0], [0, 0, 0, 0, 1, 2], r"table 'd': id 1099511627776 out of range"),
    ([1, 2, 3], [0, 1, 2, 3, 3, 4], r"end at len\(indices\)=3; got first=0, last=4, 0 decreasing"),
    ([1, 2, 3], [0, 2, 1, 3, 3, 3], r"never decrease.*got first=0, last=3, 1 decreasing step"),
    ([1, 2, 3], [1, 1, 2, 3, 3, 3], r"start at 0.*got first=1, last=3, 0 decreasing"),
    ([], [0, 0, 0, 0, 0, 1], r"len\(indices\)=0; got first=0, last=1"),
    ([1, 2, 3], [0, 1, 2, 3, 3, -3], r"got first=0, last=-3, 1 decreasing"),
]
PARAMS = [pytest.param(k, kind, i, id=f"{k}-{kind}-{i}") for k in KERNELS_UNDER_TEST for kind in MODULES
          if serving(k, kind) for i in range(len(CASES))]


@pytest.mark.parametrize("kernel,kind,case", PARAMS)
def test_every_kernel_gives_the_same_error(kernel, kind, case):
    ids, offsets, match = CASES[case]
    m = MODULES[kind](kernel, True)
    args = torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets)
    if match is not None:
        with pytest.raises(ValueError, match=match):
            m(*args)
        return
    unchecked = MODULES[kind](kernel, False)
    unchecked.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(*args), unchecked(*args), rtol=0, atol=0)


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def random_batch(gen, B: int = 6):
    """(ids int32, offsets int64, the table given one bad id, that id) on fresh random bags."""
    lengths = torch.randint(0, 6, (len(ROWS) * B,), generator=gen)
    t = int(torch.randint(0, len(ROWS), (1,), generator=gen))
    lengths[t * B + int(torch.randint(0, B, (1,), generator=gen))] += 1  # the bad id's table has one
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.cat([torch.randint(0, r, (int(lengths[i * B:(i + 1) * B].sum()),), generator=gen)
                     for i, (_, r) in enumerate(ROWS)])
    s, e = int(offsets[t * B]), int(offsets[(t + 1) * B])
    bad = ROWS[t][1] + int(torch.randint(0, 3, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.5 else -1
    ids[s + int(torch.randint(0, e - s, (1,), generator=gen))] = bad
    return ids.to(torch.int32), offsets, ROWS[t][0], bad


@pytest.mark.parametrize("kernel,kind", [(k, kind) for k in KERNELS_UNDER_TEST for kind in MODULES
                                         if serving(k, kind)])
def test_one_bad_id_in_a_random_batch_is_named(kernel, kind, gen):
    m = MODULES[kind](kernel, True)
    for _ in range(3):
        ids, offsets, table, bad = random_batch(gen)
        with pytest.raises(ValueError, match=rf"table '{table}': id {bad} out of range \[0, "):
            m(ids, offsets)


@pytest.mark.parametrize("kernel", KERNELS_UNDER_TEST)
@pytest.mark.parametrize("kind", ["pooled", "unpooled"])
def test_a_rejected_training_batch_updates_nothing(kernel, kind, gen):
    m = MODULES[kind](kernel, True)
    before = m.weights.clone()
    ids, offsets, _, _ = random_batch(gen)
    with pytest.raises(ValueError, match="out of range"):
        m(ids, offsets).sum().backward()
    assert torch.equal(m.weights, before)
    ids = ids.clamp(0, 4)  # every table has rows 0..4: the same batch made valid trains
    m(ids, offsets).sum().backward()
    assert not torch.equal(m.weights, before)


def strided(x: torch.Tensor, junk: int) -> torch.Tensor:
    """x's values as a strided view (every other element of a buffer holding `junk` between)."""
    buf = torch.full((2 * x.numel(),), junk, dtype=x.dtype)
    buf[::2] = x
    return buf[::2]


@pytest.mark.parametrize("kernel,kind", [(k, kind) for k in KERNELS_UNDER_TEST for kind in MODULES
                                         if serving(k, kind)])
def test_strided_inputs_are_read_as_their_values(kernel, kind, gen):
    """Ids, offsets and per-sample weights that are strided views (a column of a 2-D batch) give
    what their packed copies give: Triton's kernels read raw memory, and took the junk between."""
    m = MODULES[kind](kernel, True)
    ids, offsets, _, _ = random_batch(gen)
    ids = ids.clamp(0, 4).long()
    pooled = kind in ("pooled", "mean", "quant_pooled")
    psw = torch.rand(ids.numel(), generator=gen) if pooled else None
    args = (ids, offsets, psw) if pooled else (ids, offsets)
    views = (strided(ids, 10 ** 6), strided(offsets, 7), strided(psw, 100.0)) if pooled else \
        (strided(ids, 10 ** 6), strided(offsets, 7))
    with torch.no_grad():
        torch.testing.assert_close(m(*views), m(*args), rtol=0, atol=0)


@pytest.mark.skipif(not CHILD, reason="runs in test_triton_interpreter_suite's child")
@pytest.mark.parametrize("kind", list(MODULES))
def test_triton_checks_ids_in_the_kernel(kind, monkeypatch):
    """A valid batch never runs the host check: the kernel's fault record says it is sound. A
    bad one runs it once, after the kernel, for the error message."""
    calls = []
    check = layout_mod._check_values
    monkeypatch.setattr(layout_mod, "_check_values", lambda *a: (calls.append(a), check(*a)))
    m = MODULES[kind]("triton", True)
    m(torch.tensor([9, 9, 4, 9, 9]), torch.tensor([0, 1, 2, 3, 4, 5]))
    assert calls == []
    with pytest.raises(ValueError, match="table 'c': id 5 out of range"):
        m(torch.tensor([9, 9, 5, 9, 9]), torch.tensor([0, 1, 2, 3, 4, 5]))
    assert len(calls) == 1


@pytest.mark.skipif(not CHILD, reason="runs in test_triton_interpreter_suite's child")
@pytest.mark.parametrize("kind", ["pooled", "mean"])
def test_triton_multi_bag_kernel_checks_the_same(kind, monkeypatch):
    """The pooled kernel of several bags per program (config bags, for the GPU sweep) checks as
    the one-bag kernel does: the same errors, and valid batches' outputs unchanged."""
    from fxrec.lowering.triton import kernels, ops

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the one-bag kernel ran")

    monkeypatch.setattr(ops, "_POOLED_BAGS", 4)
    monkeypatch.setattr(kernels, "pooled_forward_kernel", NotLaunched())
    for ids, offsets, match in CASES:
        m = MODULES[kind]("triton", True)
        args = torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets)
        if match is not None:
            with pytest.raises(ValueError, match=match):
                m(*args)
            continue
        want = MODULES[kind]("torch", False)
        want.load_state_dict(m.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(m(*args), want(*args))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(MODULES))
def test_gpu_kernels_check_in_the_kernel(kind, monkeypatch):
    """The compiled kernels (the interpreter does not run the GPU compiler): the table's errors
    from the in-kernel check, valid batches as the unchecked kernel computes them, and the host
    check run only for a bad batch's message."""
    calls = []
    check = layout_mod._check_values
    monkeypatch.setattr(layout_mod, "_check_values", lambda *a: (calls.append(a), check(*a)))
    m = MODULES[kind](None, True, "cuda")
    for ids, offsets, match in CASES:
        args = torch.tensor(ids, dtype=torch.int64, device="cuda"), torch.tensor(offsets, device="cuda")
        if match is not None:
            before = len(calls)
            with pytest.raises(ValueError, match=match):
                m(*args)
            assert len(calls) == before + 1
            continue
        unchecked = MODULES[kind](None, False, "cuda")  # the same kernel, row format and tables
        unchecked.load_state_dict(m.state_dict())
        before = len(calls)
        with torch.no_grad():
            torch.testing.assert_close(m(*args), unchecked(*args), rtol=0, atol=0)
        if ids:  # (a batch without ids launches nothing: its offsets are checked on the host)
            assert len(calls) == before
    assert set(m.kernels.values()) == {"triton"}


def test_triton_interpreter_suite():
    """This file's tests for kernel "triton", in a child pytest under TRITON_INTERPRET=1."""
    if CHILD:
        return  # we are the child
    assert_interpreter_child_passes(__file__, "interpreter_suite or gpu")
