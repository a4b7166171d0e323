"""The streaming metrics in a distributed job: compute() on every rank gives the metric over
every rank's batches (what one process gives on all of them), on 2 and 4 gloo ranks with
ranks of different sizes, one rank without any batch, and weights on some ranks only."""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_workers
from fxrec import metrics

SIZES = [7, 0, 5, 9]  # examples per rank: rank 1 sees no batch


def _data(world: int):
    """Per rank: (probabilities, labels, weights or None), the same on every rank."""
    g = torch.Generator().manual_seed(0)
    out = []
    for r, n in enumerate(SIZES[:world]):
        p = torch.rand(n, generator=g)
        p[:2] = 0.5  # ties across ranks: AUC counts them one half wherever they come from
        y = torch.randint(0, 2, (n,), generator=g)
        w = torch.rand(n, generator=g) + 0.1 if r == 0 else None
        out.append((p, y, w))
    return out


def _retrieval(world: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(n, 6, generator=g), torch.randint(0, 6, (n,), generator=g)) for n in SIZES[:world]]


BINARY = {"auc": lambda **kw: metrics.AUC(**kw), "log_loss": lambda **kw: metrics.LogLoss(**kw),
          "ne": lambda **kw: metrics.NE(**kw), "accuracy": lambda **kw: metrics.Accuracy(**kw),
          "auprc": lambda **kw: metrics.AUPRC(**kw), "ctr": lambda **kw: metrics.CTR(**kw),
          "calibration": lambda **kw: metrics.Calibration(**kw), "precision": lambda **kw: metrics.Precision(**kw),
          "recall": lambda **kw: metrics.Recall(**kw), "mse": lambda **kw: metrics.MSE(**kw),
          "rmse": lambda **kw: metrics.RMSE(**kw), "mae": lambda **kw: metrics.MAE(**kw)}
RETRIEVAL = {"recall@3": lambda **kw: metrics.RecallAtK(3, **kw), "ndcg@3": lambda **kw: metrics.NDCGAtK(3, **kw)}


def _worker(rank: int, world: int) -> dict:
    data, ret = _data(world), _retrieval(world)
    out = {}
    for name, make in BINARY.items():
        m, local = make(), make(sync=False)
        p, y, w = data[rank]
        if p.numel():
            m.update(p, y, w)
            local.update(p, y, w)
        out[name] = m.compute()
        out[name + " local"] = local.compute() if p.numel() else None
    for name, make in RETRIEVAL.items():
        m = make()
        if ret[rank][0].numel():
            m.update(*ret[rank])
        out[name] = m.compute()
    collection = metrics.MetricCollection({"auc": metrics.AUC(), "ne": metrics.NE()})
    if data[rank][0].numel():
        collection.update(*data[rank])
    out["collection"] = collection.compute()
    empty = metrics.LogLoss()
    try:
        empty.compute()
    except ValueError as e:
        out["empty"] = str(e)
    return out


def _one_process(world: int) -> dict:
    data, ret = _data(world), _retrieval(world)
    want = {}
    for name, make in BINARY.items():
        m = make()
        for p, y, w in data:
            if p.numel():
                m.update(p, y, torch.ones(p.numel()) if w is None else w)  # a rank without weights: weight 1
        want[name] = m.compute()
    for name, make in RETRIEVAL.items():
        m = make()
        for s, t in ret:
            if s.numel():
                m.update(s, t)
        want[name] = m.compute()
    return want


@pytest.mark.parametrize("world", [2, 4])
def test_compute_is_over_every_ranks_batches(world):
    results = run_workers(_worker, world, timeout=120)
    want = _one_process(world)
    for rank, got in enumerate(results):
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-12), (rank, name)
        assert got["collection"] == pytest.approx({"auc": want["auc"], "ne": want["ne"]}, rel=1e-12)
        assert got["empty"] == "LogLoss.compute() called with no data on any rank: call update() first"
    # sync=False: this rank's batches alone, as before
    p, y, w = _data(world)[0]
    assert results[0]["auc local"] == pytest.approx(metrics.auc(p, y, w))
    assert results[1]["auc local"] is None


def test_one_process_is_unchanged_and_sync_is_checked():
    p, y = torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0, 1, 1])
    m = metrics.AUC()
    m.update(p, y)
    assert m.compute() == metrics.auc(p, y) == 1.0
    with pytest.raises(ValueError, match="AUC.compute\\(\\) called with no data: call update"):
        metrics.AUC().compute()
    with pytest.raises(ValueError, match="sync must be True or False, got 'yes'"):
        metrics.NE(sync="yes")
