"""AUPRC, CTR, calibration, precision, recall and the regression metrics against plain
references on random data (weighted and not, from logits), streaming against one-shot, and the
errors for undefined values and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from fxrec import metrics as M


def _data(seed: int, n: int = 200, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        p = (p * 8).round() / 8  # few distinct scores, positives and negatives among them
    y = torch.randint(0, 2, (n,), generator=g)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return p, y, w


def _ap_reference(p, y, w) -> float:
    """Average precision by its definition: every distinct threshold, highest first."""
    total = float((w * y).sum())
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(p.tolist()), reverse=True):
        chosen = p >= t
        tp = float((w * y * chosen).sum())
        predicted = float((w * chosen).sum())
        recall = tp / total
        ap += (recall - prev_recall) * (tp / predicted)
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed, weighted, ties", [(0, False, False), (1, True, False), (2, False, True),
                                                  (3, True, True)])
def test_auprc_is_average_precision_by_its_definition(seed, weighted, ties):
    p, y, w = _data(seed, ties=ties)
    want = _ap_reference(p, y, w if weighted else torch.ones_like(p))
    assert M.auprc(p, y, w if weighted else None) == pytest.approx(want, rel=1e-12)


def test_auprc_hand_examples():
    assert M.auprc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    assert M.auprc([0.2, 0.2, 0.2], [1, 0, 0]) == pytest.approx(1 / 3)  # one tied threshold
    assert M.auprc([0.1, 0.4], [1, 1]) == 1.0  # no negatives: every threshold is precise
    # logits are ranked as they are
    assert M.auprc([-2.0, 3.0, 0.5], [0, 1, 0], from_logits=True) == 1.0


@pytest.mark.parametrize("seed, weighted, from_logits", [(10, False, False), (11, True, False), (12, True, True)])
def test_rates_match_their_sums(seed, weighted, from_logits):
    p, y, w = _data(seed)
    x = torch.logit(p) if from_logits else p
    ww = w if weighted else torch.ones_like(p)
    yf = y.double()
    pred = (p >= 0.3).double()
    kw = dict(from_logits=from_logits)
    weights = w if weighted else None
    assert M.ctr(x, y, weights, **kw) == pytest.approx(float((ww * yf).sum() / ww.sum()), rel=1e-12)
    assert M.calibration(x, y, weights, **kw) == pytest.approx(float((ww * p).sum() / (ww * yf).sum()), rel=1e-9)
    assert M.precision(x, y, 0.3, weights=weights, **kw) == pytest.approx(
        float((ww * pred * yf).sum() / (ww * pred).sum()), rel=1e-12)
    assert M.recall(x, y, 0.3, weights=weights, **kw) == pytest.approx(
        float((ww * pred * yf).sum() / (ww * yf).sum()), rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_regression_metrics_match_torch(weighted):
    g = torch.Generator().manual_seed(5)
    p, y = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g) * 4
    w = torch.rand(50, 3, generator=g) if weighted else torch.ones(50, 3)
    mse = float((w * (p - y) ** 2).sum() / w.sum())
    assert M.mse(p, y, w if weighted else None) == pytest.approx(mse, rel=1e-6)
    assert M.rmse(p, y, w if weighted else None) == pytest.approx(math.sqrt(mse), rel=1e-6)
    assert M.mae(p, y, w if weighted else None) == pytest.approx(float((w * (p - y).abs()).sum() / w.sum()), rel=1e-6)
    if not weighted:
        assert M.mse(p, y) == pytest.approx(float(torch.nn.functional.mse_loss(p, y)), rel=1e-6)


STREAMING = [(M.AUPRC, M.auprc), (M.CTR, M.ctr), (M.Calibration, M.calibration), (M.Precision, M.precision),
             (M.Recall, M.recall), (M.MSE, M.mse), (M.RMSE, M.rmse), (M.MAE, M.mae)]


@pytest.mark.parametrize("make, one_shot", STREAMING, ids=[m.__name__ for m, _ in STREAMING])
def test_streaming_over_batches_equals_one_shot(make, one_shot):
    p, y, w = _data(20)
    m = make()
    for i in range(0, 200, 64):  # batches of uneven size
        m.update(p[i:i + 64], y[i:i + 64], w[i:i + 64])
    weights = {"weights": w} if one_shot in (M.precision, M.recall) else {}
    got = one_shot(p, y, **weights) if weights else one_shot(p, y, w)
    assert m.compute() == pytest.approx(got, rel=1e-12)
    m.reset()
    with pytest.raises(ValueError, match="called with no data"):
        m.compute()


BAD = [
    (lambda: M.auprc([0.2, 0.4], [0, 0]), "AUPRC is undefined without positives: total positive weight 0"),
    (lambda: M.calibration([0.2, 0.4], [0, 0]), "Calibration is undefined: no positive label"),
    (lambda: M.precision([0.2, 0.4], [1, 0]), "Precision is undefined: no example predicted positive"),
    (lambda: M.recall([0.7, 0.4], [0, 0]), "Recall is undefined: no positive label"),
    (lambda: M.ctr([0.2, 0.4], [1, 0], [0.0, 0.0]), "CTR is undefined: weights sum to 0"),
    (lambda: M.precision([0.2], [1], threshold=1.5), r"threshold must be in \[0, 1\], got 1.5"),
    (lambda: M.calibration([0.2, 1.5], [1, 0]), r"predictions must be probabilities in \[0, 1\].*got 1.5"),
    (lambda: M.ctr([0.2, 0.4], [1, 2]), "labels must be 0 or 1, got 2 at flat index 1"),
    (lambda: M.mse([0.2, float("nan")], [1.0, 2.0]), "predictions must be finite, got nan at flat index 1"),
    (lambda: M.mae([0.2, 0.1], [1.0, float("inf")]), "labels must be finite, got inf at flat index 1"),
    (lambda: M.rmse([0.2, 0.1], [[1.0], [2.0]]), r"labels shape \(2, 1\) does not match predictions shape \(2,\)"),
    (lambda: M.mse([0.2, 0.1], [1.0, 2.0], [1.0, -1.0]), "weights must be finite and >= 0, got -1.0"),
    (lambda: M.mse([], []), r"predictions is empty"),
]


@pytest.mark.parametrize("call, match", BAD, ids=range(len(BAD)))
def test_undefined_values_and_bad_input_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
