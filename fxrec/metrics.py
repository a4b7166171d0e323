"""Evaluation metrics for recommendation models, on torch tensors (CPU or any device).

Binary classification (CTR-style): ``auc``, ``log_loss``, ``normalized_entropy``,
``accuracy``. ``predictions`` are probabilities in [0, 1]; pass ``from_logits=True``
for raw logits. ``labels`` are 0/1 (bool, int or float) of exactly the predictions'
shape (no broadcasting: a (B, 1) vs (B,) mix-up is an error, not a silent outer
product). ``weights`` are optional non-negative per-example weights of the same shape.
Labels, weights and targets are moved to the device of the predictions / scores.

Retrieval: ``recall_at_k``, ``ndcg_at_k`` over ``scores`` (num_queries x
num_candidates) with ``targets`` either the (num_queries,) integer index of the one
relevant candidate per query, or a (num_queries x num_candidates) relevance matrix.

Each function has a streaming twin (``AUC``, ``LogLoss``, ``NE``, ``Accuracy``,
``RecallAtK``, ``NDCGAtK``) with ``update(...)``, ``compute() -> float`` and
``reset()``; the functions are one update plus compute, so both give the same
number. ``MetricCollection`` updates several at once. Sums are accumulated in float64
(float32 on MPS, which has no float64) on the device of the inputs, and read back to
the host only in ``compute()``. Bad input raises ``ValueError`` naming the argument and
the offending value or shape.
"""
from __future__ import annotations

import abc
import math
import operator
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "auc", "log_loss", "normalized_entropy", "accuracy", "recall_at_k", "ndcg_at_k",
    "Metric", "AUC", "LogLoss", "NE", "Accuracy", "RecallAtK", "NDCGAtK",
    "MetricCollection",
]

DEFAULT_EPS = 1e-12


# ----------------------------------------------------------------------------- checks

def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums over many millions of examples exact enough; MPS lacks it.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}") from err
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    return x.detach()


def _reject(flat: torch.Tensor, bad: torch.Tensor, name: str, rule: str) -> None:
    """Raise naming the first flat index where the 1-D mask ``bad`` is set."""
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} {rule}, got {flat[i].item()} at flat index {i}")


def _binary_inputs(predictions: Any, labels: Any, weights: Any, from_logits: bool):
    """Validated, flattened ``(p, y, w)`` on the predictions' device.

    ``p`` keeps its floating dtype, ``y`` is bool, ``w`` is None or float.
    """
    p = _as_tensor(predictions, "predictions")
    y = _as_tensor(labels, "labels").to(p.device)
    if y.shape != p.shape:
        raise ValueError(
            f"labels shape {tuple(y.shape)} does not match predictions shape {tuple(p.shape)}")
    w = None if weights is None else _as_tensor(weights, "weights").to(p.device)
    if w is not None and w.shape != p.shape:
        raise ValueError(
            f"weights shape {tuple(w.shape)} does not match predictions shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"predictions is empty (shape {tuple(p.shape)})")
    p, y = p.reshape(-1), y.reshape(-1)
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    _reject(y, (y != 0) & (y != 1), "labels", "must be 0 or 1")
    if from_logits:
        _reject(p, torch.isnan(p), "predictions", "must be logits, not NaN")
    else:
        _reject(p, ~((p >= 0) & (p <= 1)), "predictions",
                "must be probabilities in [0, 1] (pass from_logits=True for logits)")
    if w is not None:
        w = w.reshape(-1).to(_acc_dtype(p.device))
        _reject(w, ~(torch.isfinite(w) & (w >= 0)), "weights", "must be finite and >= 0")
    return p, y.bool(), w


def _check_k(k: Any) -> int:
    try:
        k = operator.index(k)
    except TypeError as err:
        raise ValueError(f"k must be an integer, got {k!r}") from err
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    return k


def _retrieval_inputs(scores: Any, targets: Any, k: int, binary: bool):
    """Validated ``(scores, relevance)``, both float (num_queries x num_candidates)."""
    s = _as_tensor(scores, "scores")
    if s.dim() != 2:
        raise ValueError("scores must be 2-D (num_queries, num_candidates), "
                         f"got shape {tuple(s.shape)}")
    q, c = s.shape
    if q == 0 or c == 0:
        raise ValueError(f"scores is empty (shape {tuple(s.shape)})")
    if k > c:
        raise ValueError(f"k={k} exceeds num_candidates={c} (scores shape {tuple(s.shape)})")
    s = s.to(_acc_dtype(s.device))
    _reject(s.reshape(-1), torch.isnan(s).reshape(-1), "scores", "must not be NaN")
    t = _as_tensor(targets, "targets").to(s.device)
    if t.shape == (q,):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError("targets of shape (num_queries,) are candidate indices and must "
                             f"be an integer tensor, got dtype {t.dtype}")
        _reject(t, (t < 0) | (t >= c), "targets", f"must be candidate indices in [0, {c})")
        return s, torch.zeros_like(s).scatter_(1, t.long().unsqueeze(1), 1.0)
    if t.shape != (q, c):
        raise ValueError(f"targets shape {tuple(t.shape)} must be (num_queries,) = {(q,)} or "
                         f"(num_queries, num_candidates) = {(q, c)}")
    rel = t.to(s.dtype)
    flat = rel.reshape(-1)
    if binary:
        _reject(flat, (flat != 0) & (flat != 1), "targets", "must be 0/1 relevance")
    else:
        _reject(flat, ~(torch.isfinite(flat) & (flat >= 0)), "targets",
                "must be finite relevance >= 0")
    return s, rel


# ------------------------------------------------------------------------ computations

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


def _tie_groups(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of the (Q x C) scores: how many candidates of its row score strictly
    higher, and how many score the same (itself included)."""
    s = s.contiguous()
    ascending = torch.sort(s, dim=1).values
    below_or_equal = torch.searchsorted(ascending, s, right=True)
    below = torch.searchsorted(ascending, s, right=False)
    return s.shape[1] - below_or_equal, below_or_equal - below


def _recall_per_query(s: torch.Tensor, rel: torch.Tensor, k: int) -> torch.Tensor:
    higher, tied = _tie_groups(s)
    # Under a uniformly random order of a tied group at ranks higher+1 .. higher+tied,
    # min(max(k - higher, 0), tied) of its members make the top k: each with that / tied.
    in_top = torch.minimum((k - higher).clamp_min(0), tied).to(s.dtype) / tied
    n_rel = rel.sum(1)
    keep = n_rel > 0
    return (rel * in_top).sum(1)[keep] / n_rel[keep]


def _ndcg_per_query(s: torch.Tensor, rel: torch.Tensor, k: int) -> torch.Tensor:
    higher, tied = _tie_groups(s)
    ranks = torch.arange(1, s.shape[1] + 1, dtype=s.dtype, device=s.device)
    discount = 1.0 / torch.log2(ranks + 1.0)
    prefix = torch.cat([discount.new_zeros(1), torch.cumsum(discount, 0)])
    # A tied member's expected discount is the mean of the top-k discounts over the ranks
    # its group occupies (McSherry & Najork 2008), so ties are neither lucky nor unlucky.
    group_sum = prefix[(higher + tied).clamp_max(k)] - prefix[higher.clamp_max(k)]
    dcg = (rel * group_sum / tied).sum(1)
    idcg = (rel.topk(k, dim=1).values * discount[:k]).sum(1)
    keep = idcg > 0
    return dcg[keep] / idcg[keep]


# --------------------------------------------------------------------------- streaming

class Metric(abc.ABC):
    """A streaming metric: ``update(...)`` adds a batch, ``compute()`` returns the value
    over every batch since construction or ``reset()``, ``reset()`` forgets them.

    Running sums live in one tensor on the first batch's device; later batches are moved
    there. ``compute()`` before any ``update()`` raises ValueError.
    """

    def __init__(self) -> None:
        self._totals: torch.Tensor | None = None

    def reset(self) -> None:
        self._totals = None

    def _add(self, sums: torch.Tensor) -> None:
        if self._totals is None:
            self._totals = sums
        else:
            self._totals = self._totals + sums.to(self._totals.device)

    def _sums(self) -> list[float]:
        if self._totals is None:
            raise ValueError(f"{type(self).__name__}.compute() called with no data: "
                             "call update() first")
        return self._totals.tolist()

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one batch (validated; ValueError on bad input, state unchanged)."""

    @abc.abstractmethod
    def compute(self) -> float:
        """The metric over every batch since construction or reset()."""


def _weighted_mean(total: float, weight: float, name: str) -> float:
    if weight <= 0:
        raise ValueError(f"{name} is undefined: weights sum to {weight:g}")
    return total / weight


class LogLoss(Metric):
    """Weighted mean binary cross entropy: sum_i w_i * -[y_i log p_i + (1 - y_i)
    log(1 - p_i)] / sum_i w_i, with p clamped to [eps, 1 - eps], i.e. each example's loss
    capped at -log(eps) (logits: log-probabilities by logsigmoid, then the same cap)."""

    def __init__(self, from_logits: bool = False, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
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

    def __init__(self, threshold: float = 0.5, from_logits: bool = False) -> None:
        super().__init__()
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

    def __init__(self, from_logits: bool = False) -> None:
        super().__init__()
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
        if not self._batches:
            raise ValueError("AUC.compute() called with no data: call update() first")
        scores = torch.cat([p.to(_acc_dtype(p.device)) for p, _, _ in self._batches])
        pos = torch.cat([y for _, y, _ in self._batches])
        w = None
        if any(b[2] is not None for b in self._batches):
            w = torch.cat([torch.ones_like(p, dtype=scores.dtype) if w is None else w
                           for p, _, w in self._batches])
        return _weighted_auc(scores, pos, w)


class _RankingMetric(Metric):
    """Mean of a per-query value over the queries that have a relevant candidate."""

    _name, _binary = "", True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = _check_k(k)

    @abc.abstractmethod
    def _per_query(self, s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """The value of each query that has a relevant candidate."""

    def update(self, scores: Any, targets: Any) -> None:
        s, rel = _retrieval_inputs(scores, targets, self.k, self._binary)
        values = self._per_query(s, rel)
        self._add(torch.stack([values.sum(), s.new_tensor(float(values.numel()))]))

    def compute(self) -> float:
        total, queries = self._sums()
        if queries == 0:
            raise ValueError(f"{self._name}@{self.k} is undefined: no query has a relevant "
                             "candidate (targets are all 0)")
        return total / queries


class RecallAtK(_RankingMetric):
    """Mean over queries of |relevant candidates in the top k| / |relevant candidates|.

    With index targets this is the hit rate: the fraction of queries whose one relevant
    candidate ranks in the top k. Relevance must be 0/1. Queries with no relevant
    candidate are skipped (all skipped: ValueError). Tied scores are averaged over every
    order of the tied candidates, so a constant scorer gets a random ranker's recall,
    never a lucky one.
    """

    _name, _binary = "recall", True

    def _per_query(self, s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        return _recall_per_query(s, rel, self.k)


class NDCGAtK(_RankingMetric):
    """Mean over queries of DCG@k / IDCG@k, with linear gains: DCG@k = sum over the top
    k ranks r of rel / log2(r + 1), and IDCG@k the DCG@k of the relevance sorted in
    decreasing order. Relevance may be graded (any finite value >= 0). Queries with no
    relevant candidate are skipped (all skipped: ValueError); ties are averaged over
    every order of the tied candidates (McSherry & Najork 2008)."""

    _name, _binary = "NDCG", False  # graded relevance allowed

    def _per_query(self, s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        return _ndcg_per_query(s, rel, self.k)


class MetricCollection:
    """Several metrics fed the same batches: ``update(*args, **kwargs)`` passes its
    arguments to each metric (so they must share an update signature, e.g. all binary
    or all retrieval), ``compute()`` returns ``{name: value}``, ``reset()`` resets all.

    If one metric rejects a batch, metrics before it in the collection may already have
    taken it; ``reset()`` before reusing the collection.
    """

    def __init__(self, metrics: Mapping[str, Metric]) -> None:
        if not metrics:
            raise ValueError("metrics must name at least one metric")
        for name, metric in metrics.items():
            if not isinstance(metric, Metric):
                raise ValueError(f"metrics[{name!r}] must be an fxrec.metrics.Metric, "
                                 f"got {type(metric).__name__}")
        self._metrics = dict(metrics)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for metric in self._metrics.values():
            metric.update(*args, **kwargs)

    def compute(self) -> dict[str, float]:
        return {name: metric.compute() for name, metric in self._metrics.items()}

    def reset(self) -> None:
        for metric in self._metrics.values():
            metric.reset()

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)


# --------------------------------------------------------------------------- one shot

def log_loss(predictions: Any, labels: Any, weights: Any = None, *,
             from_logits: bool = False, eps: float = DEFAULT_EPS) -> float:
    """Weighted mean binary cross entropy (see ``LogLoss``)."""
    metric = LogLoss(from_logits=from_logits, eps=eps)
    metric.update(predictions, labels, weights)
    return metric.compute()


def normalized_entropy(predictions: Any, labels: Any, weights: Any = None, *,
                       from_logits: bool = False, eps: float = DEFAULT_EPS) -> float:
    """Log loss / entropy of the weighted base rate (see ``NE``); 1.0 for the base-rate
    predictor, ValueError when only one class is present."""
    metric = NE(from_logits=from_logits, eps=eps)
    metric.update(predictions, labels, weights)
    return metric.compute()


def accuracy(predictions: Any, labels: Any, threshold: float = 0.5, *,
             weights: Any = None, from_logits: bool = False) -> float:
    """Weighted fraction with (probability >= threshold) == label (see ``Accuracy``)."""
    metric = Accuracy(threshold=threshold, from_logits=from_logits)
    metric.update(predictions, labels, weights)
    return metric.compute()


def auc(predictions: Any, labels: Any, weights: Any = None, *,
        from_logits: bool = False) -> float:
    """Exact ROC AUC in O(n log n); tied scores count one half (the trapezoid rule /
    average rank); pairs weighted by w_pos * w_neg. ValueError when only one class is
    present (after weighting)."""
    p, y, w = _binary_inputs(predictions, labels, weights, from_logits)
    return _weighted_auc(p, y, w)


def recall_at_k(scores: Any, targets: Any, k: int) -> float:
    """Mean recall@k over queries with a relevant candidate (see ``RecallAtK``)."""
    metric = RecallAtK(k)
    metric.update(scores, targets)
    return metric.compute()


def ndcg_at_k(scores: Any, targets: Any, k: int) -> float:
    """Mean NDCG@k (linear gains) over queries with a relevant candidate (see ``NDCGAtK``)."""
    metric = NDCGAtK(k)
    metric.update(scores, targets)
    return metric.compute()
