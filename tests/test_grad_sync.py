"""fxrec.runtime.grad_sync.DenseGradSync on 2 and 4 gloo ranks against the full-batch gradient.

Each rank builds the same model (same seed) and sees its own slice of a global batch that every
rank generates from one seeded generator; after backward and sync, every rank's grads must equal
the gradients of the loss averaged over the global batch, computed in one process.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dist_harness import run_workers
from fxrec.runtime.grad_sync import DenseGradSync

B = 3  # samples per rank


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = nn.Linear(5, 8)
        self.aux = nn.Linear(8, 8)  # used only by samples whose flag is set
        self.never = nn.Linear(8, 8)  # used by no rank in these steps: grad must stay None
        self.top = nn.Linear(8, 1)

    def forward(self, x, use_aux: bool):
        h = torch.relu(self.bottom(x))
        if use_aux:
            h = h + self.aux(h)
        return self.top(h).squeeze(1)


def _batches(w: int, step: int):
    """The global batch of a step as per-rank (x, y, use_aux); aux runs on rank 0 only, on even steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(B, 5, generator=gen), torch.randn(B, generator=gen), r == 0 and step % 2 == 0)
            for r in range(w)]


def _loss(model, x, y, use_aux):
    return ((model(x, use_aux) - y) ** 2).mean()


def _reference_grads(model, w: int, steps: list[int]) -> dict:
    """Gradient of the global-batch mean loss, summed over ``steps`` (no zero_grad between)."""
    ref = copy.deepcopy(model)
    for step in steps:
        # mean over W*B samples == mean over ranks of each rank's local mean (equal B)
        total = sum(_loss(ref, *batch) for batch in _batches(w, step)) / w
        total.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _check(model, sync, rank, w, steps, auto_finish):
    for step in steps:
        _loss(model, *_batches(w, step)[rank]).backward()
        if not auto_finish:
            sync.finish()
    for name, grad in _reference_grads(model, w, steps).items():
        got = dict(model.named_parameters())[name].grad
        if grad is None:
            assert got is None, name
        else:
            assert_close(got, grad, rtol=1e-5, atol=1e-6, msg=name)


def _grad_sync_worker(rank, w):
    for bucket_bytes in (1, 200, 25 * 2 ** 20):  # a bucket per param, a few params each, one bucket
        for auto_finish in (True, False):
            torch.manual_seed(0)
            model = _Net()
            sync = DenseGradSync(list(model.parameters()), bucket_bytes=bucket_bytes, auto_finish=auto_finish)
            if bucket_bytes == 1:
                assert len(sync.buckets) == 8
                assert sync.buckets[0].params[0] is model.top.bias  # reverse registration order
            _check(model, sync, rank, w, [0], auto_finish)  # aux used on rank 0 only
            model.zero_grad(set_to_none=True)
            _check(model, sync, rank, w, [1], auto_finish)  # aux used by no rank: None everywhere
            # Accumulating two steps without zero_grad (aux grad exists but rank 1.. add nothing).
            model.zero_grad(set_to_none=True)
            _check(model, sync, rank, w, [0, 1], auto_finish)
            sync.remove()
    return len(sync.buckets)


@pytest.mark.parametrize("world_size", [2, 4])
def test_grads_equal_full_batch_grads(world_size):
    assert run_workers(_grad_sync_worker, world_size) == [1] * world_size


def _low_precision_worker(rank, w):
    """Per-rank grads 40000 (fp16 in range): their 2-rank sum, 80000, is not."""
    grads = {}
    for dtype in (torch.float16, torch.bfloat16):
        p = nn.Parameter(torch.zeros(4, dtype=dtype))
        sync = DenseGradSync([p])
        (p * torch.tensor([40000.0, 40000.0, 1.0, 3.0 + rank], dtype=dtype)).sum().backward()
        sync.remove()
        grads[dtype] = p.grad
    return grads


def test_low_precision_grads_are_averaged_without_overflow():
    for grads in run_workers(_low_precision_worker, 2):
        for dtype, got in grads.items():
            # the exact average, rounded once to the parameter's dtype (as DDP's pre-division gives)
            want = torch.tensor([40000.0, 40000.0, 1.0, 3.5]).to(dtype)
            assert got.dtype == dtype
            assert_close(got, want, rtol=0, atol=0, msg=str(dtype))


def test_single_process_is_a_no_op_and_errors():
    model = _Net()
    sync = DenseGradSync(model.parameters())
    assert sync.world_size == 1 and sync._handles == []
    _loss(model, torch.randn(2, 5), torch.randn(2), True).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    sync.finish()
    for n, p in model.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        DenseGradSync(model.parameters(), bucket_bytes=0)


def test_buckets_follow_reverse_order_and_size_limit():
    model = _Net()
    sync = DenseGradSync(model.parameters(), bucket_bytes=(8 * 8 + 8) * 4)
    names = {id(p): n for n, p in model.named_parameters()}
    layout = [[names[id(p)] for p in b.params] for b in sync.buckets]
    assert layout == [["top.bias", "top.weight", "never.bias", "never.weight"],
                      ["aux.bias", "aux.weight"], ["bottom.bias", "bottom.weight"]]


def _freeze_worker(rank, w):
    """A layer frozen when fxrec.shard runs and unfrozen later, and another frozen after it, on
    the sharded model and the unsharded one alike: every step equals the unsharded step."""
    import fxrec
    from shard_models import CASES, assert_state_like

    case = CASES["dlrm_lists"]
    model, ref, batches, _ = case.setup(w, B, seed=1)
    for m in (model, ref):
        m.bot_l.requires_grad_(False)
    sm = fxrec.shard(model, fxrec.Topology(w), batches[rank], sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sm, ref)]
    for step in range(4):
        for m in (model, ref):
            if step == 1:
                m.bot_l.requires_grad_(True)  # its gradients are averaged from here on
            if step == 2:
                m.top_l[0].requires_grad_(False)
        batches = case.local_batches(w, B, seed=10 + step)
        for run, opt, batch in zip((sm, ref), opts, (batches[rank], case.concat(batches))):
            opt.zero_grad(set_to_none=True)
            run(*batch).square().mean().backward()
            opt.step()
        grad = model.bot_l[0].weight.grad
        assert (grad is None) == (step == 0)
        if grad is not None:
            assert_close(grad, ref.bot_l[0].weight.grad, rtol=1e-5, atol=1e-6)
        assert (model.top_l[0].weight.grad is None) == (step >= 2)
        assert_state_like(sm, ref)


def test_layers_frozen_or_unfrozen_after_shard_train_as_the_unsharded_model():
    run_workers(_freeze_worker, 2)
