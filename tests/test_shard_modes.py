"""train() / eval() of a sharded model reach code that reads self.training: as a value
(F.dropout(x, p, self.training)) through the captured TrainingFlag, and in a branch
(`if self.training:`) through a second program captured in the other mode, which shares the
first one's shards. One process and 2 gloo ranks, against the unsharded model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.optim import SGD
from fxrec.passes import lookup as L
from fxrec.passes.apply_plan import ROOT
from fxrec.shard import shard
from fxrec.topology import Topology
from test_capture import _Dropouts

LR = 0.1


class _Branch(nn.Module):
    """Extra scaling and a dropout only in training mode, behind `if self.training:`."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 8, mode="sum")
        self.seq = nn.Embedding(15, 8)
        self.lin = nn.Linear(8, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids, tokens):
        h = self.bag(ids) + self.seq(tokens).mean(1)
        if self.training:
            h = self.drop(h) * 0.5
        return self.lin(h)


class _TrainOnlyTable(_Branch):
    """A table looked up only in training mode: the two modes' programs differ."""

    def __init__(self):
        super().__init__()
        self.noise = nn.EmbeddingBag(10, 8, mode="sum")

    def forward(self, ids, tokens):
        h = self.bag(ids) + self.seq(tokens).mean(1)
        if self.training:
            h = h + self.noise(ids % 10)
        return self.lin(h)


def _batch(g, b):
    return torch.randint(0, 20, (b, 3), generator=g), torch.randint(0, 15, (b, 4), generator=g)


def test_dropout_written_with_self_training_follows_eval():
    example = (torch.randint(0, 20, (6,)), torch.tensor([0, 2, 4]))
    torch.manual_seed(0)
    model = _Dropouts()
    reference = copy.deepcopy(model).eval()
    sm = shard(model, Topology(1), example)
    sm.eval()
    with torch.no_grad():
        assert_close(sm(*example), reference(*example), rtol=0, atol=0)


def test_a_branch_gets_a_program_per_mode_sharing_the_shards():
    torch.manual_seed(0)
    model = _Branch()
    example = _batch(torch.Generator().manual_seed(0), 3)
    sm = shard(model, Topology(1), example)
    assert sm.module.meta[L.TRAINING_BAKED][0] is True
    assert sm.program(True) is sm.module and sm.program(False) is not sm.module
    assert sm.program(False).get_submodule(ROOT) is sm.module.get_submodule(ROOT)
    assert list(sm.state_dict()) == list(model.state_dict())  # the second program holds no state of its own


def test_a_deep_copy_keeps_one_set_of_shards_for_both_programs():
    torch.manual_seed(0)
    model = _Branch()
    model.register_forward_hook(lambda module, args, out: out + 1)  # runs around both programs
    example = _batch(torch.Generator().manual_seed(0), 3)
    sm = shard(model, Topology(1), example)
    copied = copy.deepcopy(sm)
    for training in (True, False):
        program = copied.program(training)
        assert program.get_submodule(ROOT) is copied.module.get_submodule(ROOT) is not sm.module.get_submodule(ROOT)
        assert program.lin is copied.module.lin is not model.lin
        assert type(program).__name__ == "_Branch"
    sm.eval()
    copied.eval()
    with torch.no_grad():
        assert_close(copied(*example), sm(*example), rtol=0, atol=0)  # the hook included


def test_modes_whose_tables_differ_keep_one_program_and_warn():
    example = _batch(torch.Generator().manual_seed(0), 3)
    sm = shard(_TrainOnlyTable(), Topology(1), example)
    assert sm.program(False) is sm.module
    with pytest.warns(UserWarning, match=r"_TrainOnlyTable.forward branches on self.training at "
                                         r"test_shard_modes.py:\d+ `if self.training:`, so it was captured with "
                                         r"the training-mode branch"):
        sm.eval()


def _train_then_eval(rank: int, world: int) -> float:
    torch.manual_seed(0)
    model = _Branch()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    local = [_batch(g, 2) for _ in range(world)]
    sm = shard(model, Topology(world), local[rank], constraints={"bag": "row_wise", "seq": "table_wise"},
               sparse_optimizer=SGD(LR))
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.lin.parameters(), lr=LR)
    for step in range(2):
        batches = [_batch(g, 2) for _ in range(world)]
        whole = tuple(torch.cat(parts) for parts in zip(*batches))
        sm.train()
        reference.train()
        torch.manual_seed(100 + step)  # dropout draws for the global batch: each rank keeps its own rows
        mask = (torch.rand(2 * world, 8) >= 0.5).float() * 2.0
        reference.drop.forward = lambda h, m=mask: h * m
        sm.module.drop.forward = lambda h, m=mask[rank * 2:(rank + 1) * 2]: h * m
        opt.zero_grad()
        sm(*batches[rank]).square().mean().backward()
        opt.step()
        ref_opt.zero_grad()
        reference.zero_grad()
        reference(*whole).square().mean().backward()
        ref_opt.step()
        with torch.no_grad():
            for table in (reference.bag, reference.seq):
                table.weight -= LR * table.weight.grad
    sm.eval()
    reference.eval()
    batches = [_batch(g, 2) for _ in range(world)]
    whole = tuple(torch.cat(parts) for parts in zip(*batches))
    with torch.no_grad():
        return (sm(*batches[rank]) - reference(*whole)[rank * 2:(rank + 1) * 2]).abs().max().item()


def test_a_branch_trains_then_evaluates_like_the_unsharded_model_on_two_ranks():
    assert max(run_workers(_train_then_eval, 2, timeout=120)) < 1e-5


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(x), 0.5, self.training)


class _WithTower(nn.Module):
    """A submodule that reads self.training as a value, and (branch=True) a root that branches on it."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch, self.e, self.tower, self.out = branch, nn.EmbeddingBag(20, 4), _Tower(), nn.Linear(4, 1)

    def forward(self, ids):
        h = self.e(ids)
        if self.branch:
            if self.training:
                h = torch.nn.functional.dropout(h, 0.5)
        else:
            h = torch.nn.functional.dropout(h, 0.5, self.training)
        return self.out(self.tower(h))


@pytest.mark.parametrize("branch", [False, True])
def test_a_submodule_put_in_eval_mode_apart_stays_so(branch):
    """model.train(); model.tower.eval(): the tower's dropout stays off in the captured program
    (a warning says its mode is fixed there) and the model's modes are as they were after
    shard and lower_for_inference (which capture it in both modes)."""
    torch.manual_seed(0)
    model = _WithTower(branch)
    model.train()
    model.tower.eval()
    ids = torch.randint(0, 20, (8, 3))
    if branch:  # the branch is captured per mode: each program fixes every module's mode
        sm = shard(model, Topology(1), (ids,), sparse_optimizer=SGD(LR))
    else:
        with pytest.warns(UserWarning, match=r"submodule\(s\) \['tower'\] in eval mode: .* keeps eval mode"):
            sm = shard(model, Topology(1), (ids,), sparse_optimizer=SGD(LR))
    fxrec.lower_for_inference(model, (ids,), "fp32")
    assert model.training and not model.tower.training
    with torch.no_grad():
        for mode in (True, False, True):
            sm.train(mode)
            model.train(mode)
            model.tower.eval()
            torch.manual_seed(1)
            want = model(ids)
            torch.manual_seed(1)
            assert_close(sm(ids), want)
