"""Binary classification (CTR-style) metrics: ``auc``, ``auprc``, ``log_loss``,
``normalized_entropy``, ``accuracy`` and their streaming twins ``AUC``, ``AUPRC``, ``LogLoss``,
``NE``, ``Accuracy``.

``predictions`` are probabilities in [0, 1], or raw logits with ``from_logits=True``;
``labels`` are 0/1 of exactly the predictions' shape; ``weights`` are optional
non-negative per-example weights of that shape (see `fxrec.metrics`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

import torch.distributed as dist

from fxrec.metrics.base import (Metric, _acc_dtype, _group_device, _one_shot, _paired_inputs,
                                _reject, _weighted_mean)

__all__ = ["auc", "auprc", "log_loss", "normalized_entropy", "accuracy", "AUC", "AUPRC", "LogLoss", "NE",
           "Accuracy"]

DEFAULT_EPS = 1e-12


def _binary_inputs(predictions: Any, labels: Any, weights: Any, from_logits: bool):
    """Validated, flattened ``(p, y, w)`` on the predictions' device.

    ``p`` keeps its floating dtype, ``y`` is bool, ``w`` is None or float.
    """
    p, y, w = _paired_inputs(predictions, labels, weights)
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    _reject(y, (y != 0) & (y != 1), "labels", "must be 0 or 1")
    if from_logits:
        _reject(p, torch.isnan(p), "predictions", "must be logits, not NaN")
    else:
        _reject(p, ~((p >= 0) & (p <= 1)), "predictions",
                "must be probabilities in [0, 1] (pass from_logits=True for logits)")
    return p, y.bool(), w


def _log_loss_terms(p: torch.Tensor, y: torch.Tensor, from_logits: bool, eps: float):
    """Per-example binary cross entropy in the accumulation dtype, capped at -log(eps)."""
    p = p.to(_acc_dtype(p.device))
    if from_logits:  # logsigmoid is exact and stable, infinite logits included
        log_pos, log_neg = F.logsigmoid(p), F.logsigmoid(-p)
    else:
        log_pos, log_neg = torch.log(p), torch.log1p(-p)
    # Select the log term instead of mixing both with 0/1 factors: 0 * log(0) would be
    # NaN. Clamping each log at log(eps) is clamping p to [eps, 1 - eps].
    return -torch.where(y, log_pos, log_neg).clamp_min(math.log(eps))


def _check_eps(eps: float) -> float:
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    return float(eps)


def _weighted_auc(scores: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None) -> float:
    """Exact ROC AUC: P(score of a positive > score of a negative), ties counting 1/2,
    each pair weighted by the product of its weights. O(n log n): one sort of scores."""
    dtype = _acc_dtype(scores.device)
    values, group = torch.unique(scores.to(dtype), return_inverse=True)  # ascending
    w = torch.ones_like(scores, dtype=dtype) if w is None else w.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    pos_w = torch.zeros_like(values).index_add_(0, group, torch.where(pos, w, zero))
    neg_w = torch.zeros_like(values).index_add_(0, group, torch.where(pos, zero, w))
    # negative weight strictly below each distinct score (exclusive cumulative sum)
    neg_below = torch.cat([neg_w.new_zeros(1), torch.cumsum(neg_w, 0)[:-1]])
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if not (bool(total_pos > 0) and bool(total_neg > 0)):
        raise ValueError("AUC is undefined when only one class is present: total positive "
                         f"weight {total_pos.item():g}, total negative weight "
                         f"{total_neg.item():g}")
    wins = (pos_w * (neg_below + 0.5 * neg_w)).sum()
    return float(wins / (total_pos * total_neg))


class LogLoss(Metric):
    """Weighted mean binary cross entropy: sum_i w_i * -[y_i log p_i + (1 - y_i)
    log(1 - p_i)] / sum_i w_i, with p clamped to [eps, 1 - eps], i.e. each example's loss
    capped at -log(eps) (logits: log-probabilities by logsigmoid, then the same cap)."""

    _width = 3

    def __init__(self, from_logits: bool = False, eps: float = DEFAULT_EPS, *, sync: bool = True,
                 process_group=None) -> None:
        super().__init__(sync=sync, process_group=process_group)
        self.from_logits, self.eps = bool(from_logits), _check_eps(eps)

    def update(self, predictions: Any, labels: Any, weights: Any = None) -> None:
        p, y, w = _binary_inputs(predictions, labels, weights, self.from_logits)
        loss = _log_loss_terms(p, y, self.from_logits, self.eps)
        w = torch.ones_like(loss) if w is None else w
        # the positives' weight too, so that NE needs only its own compute()
        self._add(torch.stack([(w * loss).sum(), w.sum(), (w * y).sum()]))

    def compute(self) -> float:
        loss, weight, _ = self._sums()
        return _weighted_mean(loss, weight, "log loss")


class NE(LogLoss):
    """Normalized entropy (He et al. 2014, "Practical lessons from predicting clicks on
    ads at Facebook"): the log loss divided by the entropy of the weighted base rate
    r = sum w y / sum w, H(r) = -[r log r + (1 - r) log(1 - r)]. The constant predictor
    p = r scores exactly 1; lower is better. Undefined (ValueError) when r is 0 or 1."""

    def compute(self) -> float:
        loss, weight, positive = self._sums()
        mean_loss = _weighted_mean(loss, weight, "normalized entropy")
        rate = positive / weight
        if not 0 < rate < 1:
            raise ValueError("normalized entropy is undefined when only one class is "
                             f"present: base rate (weighted fraction of positives) = {rate:g}")
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))
        return mean_loss / entropy


class Accuracy(Metric):
    """Weighted fraction of examples whose predicted class (1 when the probability is
    >= threshold, sigmoid(logit) with from_logits) equals the label."""

    _width = 2

    def __init__(self, threshold: float = 0.5, from_logits: bool = False, *, sync: bool = True,
                 process_group=None) -> None:
        super().__init__(sync=sync, process_group=process_group)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold, self.from_logits = float(threshold), bool(from_logits)

    def update(self, predictions: Any, labels: Any, weights: Any = None) -> None:
        p, y, w = _binary_inputs(predictions, labels, weights, self.from_logits)
        p = p.to(_acc_dtype(p.device))
        prob = torch.sigmoid(p) if self.from_logits else p
        correct = ((prob >= self.threshold) == y).to(p.dtype)
        w = torch.ones_like(correct) if w is None else w
        self._add(torch.stack([(w * correct).sum(), w.sum()]))

    def compute(self) -> float:
        correct, weight = self._sums()
        return _weighted_mean(correct, weight, "accuracy")


class AUC(Metric):
    """Exact ROC AUC over every example seen: the weighted probability that a random
    positive outscores a random negative, ties counting one half.

    Memory: it keeps every example (the scores in their dtype, labels as bool, weights as
    float64 when given), about 5 bytes per example for float32 scores without weights;
    compute() needs roughly 40 bytes per example more while it runs.
    With from_logits the logits are ranked directly (sigmoid is monotone, and ranking
    logits avoids ties that float rounding of sigmoid would create).
    """

    def __init__(self, from_logits: bool = False, *, sync: bool = True, process_group=None) -> None:
        super().__init__(sync=sync, process_group=process_group)
        self.from_logits = bool(from_logits)
        self.reset()

    def reset(self) -> None:
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def update(self, predictions: Any, labels: Any, weights: Any = None) -> None:
        p, y, w = _binary_inputs(predictions, labels, weights, self.from_logits)
        if self._batches:
            device = self._batches[0][0].device
            p, y, w = p.to(device), y.to(device), None if w is None else w.to(device)
        self._batches.append((p, y, w))

    def compute(self) -> float:
        group = self._group()
        if not self._batches and group is None:
            raise ValueError("AUC.compute() called with no data: call update() first")
        scores = torch.cat([p.to(_acc_dtype(p.device)) for p, _, _ in self._batches]) if self._batches else \
            torch.zeros(0, dtype=torch.float64)
        pos = torch.cat([y for _, y, _ in self._batches]) if self._batches else torch.zeros(0, dtype=torch.bool)
        w = None
        if any(b[2] is not None for b in self._batches):
            w = torch.cat([torch.ones_like(p, dtype=scores.dtype) if w is None else w
                           for p, _, w in self._batches])
        if group is not None:
            scores, pos, w = _gathered(group, scores, pos, w)
            if scores.numel() == 0:
                raise ValueError(f"{type(self).__name__}.compute() called with no data on any rank: "
                                 f"call update() first")
        return self._area(scores, pos, w)

    @staticmethod
    def _area(scores: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None) -> float:
        return _weighted_auc(scores, pos, w)


class AUPRC(AUC):
    """Exact area under the precision-recall curve over every example seen, as average
    precision: ``sum_t (R_t - R_{t-1}) * P_t`` over the distinct scores t, highest first, where
    P_t and R_t are the weighted precision and recall of predicting positive at score >= t
    (tied scores enter together; scikit-learn's ``average_precision_score``). The step rule,
    not the trapezoid, which overstates the area between distant points. Undefined
    (ValueError) without positive weight. Memory and `from_logits` as `AUC`'s."""

    @staticmethod
    def _area(scores: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None) -> float:
        return _weighted_auprc(scores, pos, w)


def _weighted_auprc(scores: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None) -> float:
    """Average precision over the distinct scores (`AUPRC`). O(n log n): one sort."""
    dtype = _acc_dtype(scores.device)
    values, group = torch.unique(scores.to(dtype), return_inverse=True)  # ascending
    w = torch.ones_like(scores, dtype=dtype) if w is None else w.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    pos_w = torch.zeros_like(values).index_add_(0, group, torch.where(pos, w, zero)).flip(0)  # highest first
    all_w = torch.zeros_like(values).index_add_(0, group, w).flip(0)
    total_pos = pos_w.sum()
    if not bool(total_pos > 0):
        raise ValueError(f"AUPRC is undefined without positives: total positive weight {total_pos.item():g}")
    tp, predicted = torch.cumsum(pos_w, 0), torch.cumsum(all_w, 0)
    # a threshold that takes only zero-weight examples adds no recall; its 0/0 precision is skipped
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(torch.finfo(dtype).tiny), zero)
    return float((pos_w / total_pos * precision).sum())


def _gathered(group, scores: torch.Tensor, pos: torch.Tensor, w):
    """Every rank's examples, in rank order: ``(scores, pos, w)`` on this rank's device (the
    AUC is exact, so it needs them all, not sums). Weights are ones where a rank gave none,
    and None where no rank did. The ranks may hold different numbers of examples."""
    from fxrec.runtime import comm
    dev, home = _group_device(group), scores.device
    # one float64 row per example: score, label, weight (exact: labels are 0/1, scores float64)
    local = torch.stack([scores.to(dev, torch.float64), pos.to(dev, torch.float64),
                         torch.ones_like(scores, dtype=torch.float64, device=dev) if w is None
                         else w.to(dev, torch.float64)], dim=1)
    weighted = torch.tensor([float(w is not None)], dtype=torch.float64, device=dev)
    dist.all_reduce(weighted, group=group)
    rows = comm.all_gather(local, group).to(home)
    return rows[:, 0].to(scores.dtype), rows[:, 1] > 0.5, rows[:, 2] if weighted.item() else None


def log_loss(predictions: Any, labels: Any, weights: Any = None, *,
             from_logits: bool = False, eps: float = DEFAULT_EPS) -> float:
    """Weighted mean binary cross entropy (see ``LogLoss``)."""
    return _one_shot(LogLoss(from_logits=from_logits, eps=eps, sync=False), predictions, labels, weights)


def normalized_entropy(predictions: Any, labels: Any, weights: Any = None, *,
                       from_logits: bool = False, eps: float = DEFAULT_EPS) -> float:
    """Log loss / entropy of the weighted base rate (see ``NE``); 1.0 for the base-rate
    predictor, ValueError when only one class is present."""
    return _one_shot(NE(from_logits=from_logits, eps=eps, sync=False), predictions, labels, weights)


def accuracy(predictions: Any, labels: Any, threshold: float = 0.5, *,
             weights: Any = None, from_logits: bool = False) -> float:
    """Weighted fraction with (probability >= threshold) == label (see ``Accuracy``)."""
    return _one_shot(Accuracy(threshold=threshold, from_logits=from_logits, sync=False), predictions, labels,
                     weights)


def auc(predictions: Any, labels: Any, weights: Any = None, *,
        from_logits: bool = False) -> float:
    """Exact ROC AUC in O(n log n); tied scores count one half (the trapezoid rule /
    average rank); pairs weighted by w_pos * w_neg. ValueError when only one class is
    present (after weighting)."""
    p, y, w = _binary_inputs(predictions, labels, weights, from_logits)
    return _weighted_auc(p, y, w)


def auprc(predictions: Any, labels: Any, weights: Any = None, *, from_logits: bool = False) -> float:
    """Exact area under the precision-recall curve as average precision (see ``AUPRC``);
    ValueError without positives."""
    p, y, w = _binary_inputs(predictions, labels, weights, from_logits)
    return _weighted_auprc(p, y, w)
