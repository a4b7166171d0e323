"""Retrieval metrics: ``recall_at_k``, ``ndcg_at_k`` and their streaming twins
``RecallAtK``, ``NDCGAtK``.

``scores`` are (num_queries x num_candidates); ``targets`` are either the
(num_queries,) integer index of the one relevant candidate per query, or a
(num_queries x num_candidates) relevance matrix. Tied scores are averaged over every
order of the tied candidates.
"""
from __future__ import annotations

import abc
import operator
from typing import Any

import torch

from fxrec.metrics.base import Metric, _acc_dtype, _as_tensor, _one_shot, _reject

__all__ = ["recall_at_k", "ndcg_at_k", "RecallAtK", "NDCGAtK"]


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


class _RankingMetric(Metric):
    """Mean of a per-query value over the queries that have a relevant candidate."""

    _name, _binary, _width = "", True, 2

    def __init__(self, k: int, *, sync: bool = True, process_group=None) -> None:
        super().__init__(sync=sync, process_group=process_group)
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


def recall_at_k(scores: Any, targets: Any, k: int) -> float:
    """Mean recall@k over queries with a relevant candidate (see ``RecallAtK``)."""
    return _one_shot(RecallAtK(k, sync=False), scores, targets)


def ndcg_at_k(scores: Any, targets: Any, k: int) -> float:
    """Mean NDCG@k (linear gains) over queries with a relevant candidate (see ``NDCGAtK``)."""
    return _one_shot(NDCGAtK(k, sync=False), scores, targets)
