"""fxrec.runtime.grad_sync.DenseGradSync on 2 and 4 gloo ranks against the full-batch gradient.

Each rank builds the same model (same seed) and sees its own slice of a global batch that every
rank generates from one seeded generator; after backward and sync, every rank's grads must equal
the gradients of the loss averaged over the global batch, computed in one process. Through
fxrec.shard: layers frozen and unfrozen after shard, and BatchNorm's running statistics
(fxrec.runtime.buffer_sync), which follow rank 0's as under DDP.
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


class _BatchNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(30, 8, mode="sum")
        self.bot = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.top = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, dense, ids):
        return self.top(torch.cat([self.bot(dense), self.emb(ids)], 1)).squeeze(1)


def _bn_batches(w: int, step: int, b: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(b, 4, generator=g) * (r + 1), torch.randint(0, 30, (b, 3), generator=g)) for r in range(w)]


def _buffers(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.named_buffers()}


def _ddp_step(ref: nn.Module, opt, batches: list) -> None:
    """One step as DDP takes it, in one process: every replica starts from rank 0's buffers,
    normalises with its own batch's statistics, and the gradients are averaged; the buffers
    are then rank 0's replica's."""
    start, rank0 = _buffers(ref), None
    opt.zero_grad()
    for r, batch in enumerate(batches):
        ref.load_state_dict(start, strict=False)
        (ref(*batch).square().mean() / len(batches)).backward()
        rank0 = _buffers(ref) if r == 0 else rank0
    ref.load_state_dict(rank0, strict=False)
    opt.step()


def _gathered(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return out


def _batchnorm_worker(rank, w):
    import fxrec

    torch.manual_seed(0)
    model = _BatchNormed()
    ref = copy.deepcopy(model)
    sm = fxrec.shard(model, fxrec.Topology(w), _bn_batches(w, 0)[rank], sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        batches = _bn_batches(w, step)
        opt.zero_grad()
        sm(*batches[rank]).square().mean().backward()
        opt.step()
        _ddp_step(ref, ref_opt, batches)
        full = sm.full_state_dict()
        for key, want in ref.state_dict().items():
            assert_close(full[key], want, rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
        for key, mine in _buffers(model).items():  # every rank holds rank 0's
            assert all(torch.equal(mine, theirs) for theirs in _gathered(mine)), key
    sm.eval()
    ref.eval()
    with torch.no_grad():
        same = _bn_batches(1, 7)[0]
        out = sm(*same)
        assert_close(out, ref(*same), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(out, theirs) for theirs in _gathered(out))
    # two forwards before one backward: the broadcast after the first leaves its graph intact
    sm.train()
    (sm(*_bn_batches(w, 5)[rank]).square().mean() + sm(*_bn_batches(w, 6)[rank]).square().mean()).backward()
    for key, mine in _buffers(model).items():
        assert all(torch.equal(mine, theirs) for theirs in _gathered(mine)), key
    return int(model.top[1].num_batches_tracked)


def test_batchnorm_statistics_follow_rank_0s_as_under_ddp():
    assert run_workers(_batchnorm_worker, 2) == [5, 5]
