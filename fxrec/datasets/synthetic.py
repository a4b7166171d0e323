"""A synthetic Criteo-like click log with a learnable signal.

Each table draws ids from a Zipf-skewed distribution over its rows (popular rows are
scattered over the table by a fixed affine permutation, as hashed ids are in real logs),
bag lengths vary around a pooling factor, and dense features look like Criteo's
log-transformed counts. Labels come from a hidden model:

    logit = scale * (w_d * z_dense + w_s * z_sparse + w_i * z_pairs) / norm + bias

where ``z_dense`` is a hidden linear function of the dense features, ``z_sparse`` sums
over tables the mean hidden score of the ids in each bag (empty bag: 0), ``z_pairs`` sums
products of those bag means over the table pairs (0, 1), (2, 3), ..., and each ``z`` is
scaled to unit variance once, on a calibration sample. A DLRM can learn all three terms.
Every batch is a pure function of ``(seed, split, batch index)``; the hidden model
depends on ``seed`` only, so the train and validation splits share it.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from fxrec.datasets.batch import Batch, make_batch
from fxrec.types import whole

_SPLITS = {"train": 0, "val": 1, "test": 2}
_BAG_LENGTHS = ("poisson", "uniform", "fixed")
_MAX_ROWS = 2**31  # keeps rank * multiplier inside int64
_CALIBRATION_SAMPLES = 8192
# Default scale: the generator's own (Bayes-optimal) AUC is about 0.82 with the defaults
# (measured on 40k samples; 0.82-0.83 across table sizes and pooling factors).
DEFAULT_SIGNAL_SCALE = 1.6


class TableSpec(NamedTuple):
    """One table of a synthetic dataset: build an embedding table with this many rows."""

    name: str
    num_embeddings: int
    feature_name: str


def _whole(value, what: str) -> int:
    """`value` as an int; a fraction (2.5 rows, a batch of 2.7) is an error, not truncated."""
    count = whole(value)
    if count is None:
        raise ValueError(f"SyntheticCriteo: {what} must be a whole number, got {value!r}")
    return count


def _finite(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"SyntheticCriteo: {what} must be finite, got {value}")
    return value


def _per_table(value, num_tables: int, what: str, cast) -> list:
    if not isinstance(value, (int, float, np.integer, np.floating)):
        value = list(value)
        if len(value) != num_tables:
            raise ValueError(f"SyntheticCriteo: {what} has {len(value)} entries, expected num_tables={num_tables}")
        return [cast(v) for v in value]
    return [cast(value)] * num_tables


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class SyntheticCriteo:
    """An iterable of `Batch` (``num_batches`` of them, or endless when None).

    Keys are ``cat_0 .. cat_{num_tables-1}``; ids of key i lie in
    ``[0, num_embeddings[i])``. ``zipf_alpha=None`` draws ids uniformly.
    ``bag_lengths``: "poisson" (Poisson(p): mean p, empty bags occur), "uniform"
    (uniform integer in [1, round(2p-1)], needs p >= 1, never empty) or "fixed"
    (round(p) ids per bag). ``split`` is "train", "val", "test" or an int stream id:
    different splits are independent samples of the same hidden model.
    ``signal_scale`` sets the label noise (the default gives a Bayes-optimal AUC near
    0.82), ``signal_weights`` the (dense, sparse, pairwise) mix, ``logit_bias`` the base
    rate. Tables larger than ``score_buckets`` rows share hidden scores by id modulo.
    """

    def __init__(
        self,
        num_embeddings: int | Sequence[int] = 10_000,
        num_tables: int = 26,
        num_dense: int = 13,
        pooling_factors: float | Sequence[float] = 1.0,
        batch_size: int = 512,
        num_batches: int | None = None,
        zipf_alpha: float | None = 1.05,
        seed: int = 0,
        split: str | int = "train",
        bag_lengths: str = "poisson",
        signal_scale: float = DEFAULT_SIGNAL_SCALE,
        signal_weights: tuple[float, float, float] = (1.0, 1.0, 0.5),
        logit_bias: float = 0.0,
        score_buckets: int = 2**20,
    ):
        if _whole(num_tables, "num_tables") < 1:
            raise ValueError(f"SyntheticCriteo: num_tables must be >= 1, got {num_tables}")
        self.num_tables = int(num_tables)
        self.num_embeddings = _per_table(num_embeddings, self.num_tables, "num_embeddings",
                                         lambda v: _whole(v, "num_embeddings"))
        self.pooling_factors = _per_table(pooling_factors, self.num_tables, "pooling_factors",
                                          lambda v: _finite(v, "a pooling factor"))
        self.num_dense = _whole(num_dense, "num_dense")
        self.batch_size = _whole(batch_size, "batch_size")
        self.num_batches = None if num_batches is None else _whole(num_batches, "num_batches")
        self.zipf_alpha = None if zipf_alpha is None else _finite(zipf_alpha, "zipf_alpha")
        self.seed = _whole(seed, "seed")
        self.split = split
        self.bag_lengths = bag_lengths
        self.signal_scale = _finite(signal_scale, "signal_scale")
        self.signal_weights = tuple(_finite(w, "signal_weights") for w in signal_weights)
        self.logit_bias = _finite(logit_bias, "logit_bias")
        self.score_buckets = _whole(score_buckets, "score_buckets")
        self._check()
        self._stream = _SPLITS[split] if isinstance(split, str) else int(split)
        self._build_hidden_model()

    def _check(self) -> None:
        for i, (n, p) in enumerate(zip(self.num_embeddings, self.pooling_factors)):
            if not 0 < n < _MAX_ROWS:
                raise ValueError(f"SyntheticCriteo: table t_cat_{i}: num_embeddings must be in [1, 2**31), got {n}")
            if not p >= 0:
                raise ValueError(f"SyntheticCriteo: table t_cat_{i}: pooling factor must be >= 0, got {p}")
            if self.bag_lengths == "uniform" and p < 1:
                raise ValueError(f"SyntheticCriteo: table t_cat_{i}: bag_lengths='uniform' needs pooling factor >= 1, got {p}")
        if self.num_dense < 0:
            raise ValueError(f"SyntheticCriteo: num_dense must be >= 0, got {self.num_dense}")
        if self.batch_size < 1:
            raise ValueError(f"SyntheticCriteo: batch_size must be >= 1, got {self.batch_size}")
        if self.num_batches is not None and self.num_batches < 0:
            raise ValueError(f"SyntheticCriteo: num_batches must be >= 0 or None, got {self.num_batches}")
        if self.zipf_alpha is not None and not self.zipf_alpha > 0:
            raise ValueError(f"SyntheticCriteo: zipf_alpha must be > 0 or None, got {self.zipf_alpha}")
        if self.bag_lengths not in _BAG_LENGTHS:
            raise ValueError(f"SyntheticCriteo: bag_lengths must be one of {_BAG_LENGTHS}, got {self.bag_lengths!r}")
        if not isinstance(self.split, str) and whole(self.split) is None:  # int(1.5) would pick stream 1
            raise ValueError(f"SyntheticCriteo: split must be one of {tuple(_SPLITS)} or a whole number, got {self.split!r}")
        if self.seed < 0 or (not isinstance(self.split, str) and int(self.split) < 0):
            raise ValueError(f"SyntheticCriteo: seed and an int split must be >= 0, got seed={self.seed}, split={self.split!r}")
        if isinstance(self.split, str) and self.split not in _SPLITS:
            raise ValueError(f"SyntheticCriteo: split must be one of {tuple(_SPLITS)} or an int, got {self.split!r}")
        if len(self.signal_weights) != 3 or not all(w >= 0 for w in self.signal_weights) or not any(self.signal_weights):
            raise ValueError(f"SyntheticCriteo: signal_weights must be 3 non-negative numbers, not all 0, got {self.signal_weights}")
        if self.score_buckets < 1:
            raise ValueError(f"SyntheticCriteo: score_buckets must be >= 1, got {self.score_buckets}")

    # ---- public helpers -------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        return [f"cat_{i}" for i in range(self.num_tables)]

    def table_configs(self) -> list[TableSpec]:
        """One `TableSpec(name="t_cat_i", num_embeddings, feature_name="cat_i")` per table."""
        return [TableSpec(f"t_cat_{i}", n, f"cat_{i}") for i, n in enumerate(self.num_embeddings)]

    def with_split(self, split: str | int, num_batches=...) -> SyntheticCriteo:
        """The same hidden model and shapes, sampling another split (e.g. "val"); as many
        batches as this one unless `num_batches` says (None: endless)."""
        other = object.__new__(SyntheticCriteo)
        other.__dict__.update(self.__dict__)
        other.split = split
        if num_batches is not ...:
            other.num_batches = None if num_batches is None else _whole(num_batches, "num_batches")
        other._check()
        other._stream = _SPLITS[split] if isinstance(split, str) else int(split)
        return other

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("SyntheticCriteo: endless stream (num_batches=None) has no len()")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        index = 0
        while self.num_batches is None or index < self.num_batches:
            yield self.batch(index)
            index += 1

    def batch(self, index: int) -> Batch:
        """Batch number ``index`` of this split: the same call always returns the same batch."""
        gen = torch.Generator().manual_seed(_seed_of(self.seed, self._stream, index))
        return self._sample(self.batch_size, gen)

    def true_logits(self, batch: Batch) -> torch.Tensor:
        """The hidden model's logits for ``batch`` (labels were drawn as
        Bernoulli(sigmoid(logits))); their AUC is the best any model can reach."""
        kjt = batch.sparse_features
        lengths = kjt.lengths().to(torch.int64).cpu()
        return self._logits(batch.dense_features.cpu(), kjt.values().cpu(), lengths, batch.batch_size)

    # ---- hidden model ---------------------------------------------------------------

    def _build_hidden_model(self) -> None:
        gen = torch.Generator().manual_seed(_seed_of(self.seed, 2**31 - 1))
        rows = torch.tensor(self.num_embeddings, dtype=torch.int64)
        # Affine permutation rank -> id: popular ranks land all over the table.
        mults, shifts = [], []
        for n in self.num_embeddings:
            mult = int(torch.randint(1, max(n, 2), (1,), generator=gen))
            while math.gcd(mult, n) != 1:
                mult = mult % n + 1
            mults.append(mult)
            shifts.append(int(torch.randint(0, n, (1,), generator=gen)))
        self._rows, self._mult, self._shift = rows, torch.tensor(mults), torch.tensor(shifts)
        buckets = [min(n, self.score_buckets) for n in self.num_embeddings]
        self._buckets = torch.tensor(buckets, dtype=torch.int64)
        self._score_base = torch.tensor([0] + buckets[:-1], dtype=torch.int64).cumsum(0)
        self._scores = torch.randn(sum(buckets), generator=gen)
        self._dense_w = torch.randn(self.num_dense, generator=gen)
        # Mean of the raw counts behind each dense feature: 1 .. 1000, log-spaced.
        self._dense_means = torch.logspace(0, 3, self.num_dense) if self.num_dense > 1 else torch.ones(self.num_dense)
        self._norm = None
        calib = self._sample(_CALIBRATION_SAMPLES, torch.Generator().manual_seed(_seed_of(self.seed, 2**31 - 2)), raw=True)
        dense, terms = calib
        self._dense_mu = dense.mean(0)
        self._dense_sd = dense.std(0).clamp(min=1e-6)
        terms = self._terms(dense, *terms)
        self._norm = [float(t.std().clamp(min=1e-6)) for t in terms]

    def _terms(self, dense, values, lengths, batch):
        """The three unnormalised signal terms, each of shape (batch,)."""
        t = self.num_tables
        if self.num_dense:
            z_dense = ((dense - self._dense_mu) / self._dense_sd) @ self._dense_w
        else:
            z_dense = torch.zeros(batch)
        table_of = torch.arange(t).repeat_interleave(lengths.view(t, batch).sum(1))
        slot = self._score_base[table_of] + values % self._buckets[table_of]
        bag = torch.arange(t * batch).repeat_interleave(lengths)
        sums = torch.zeros(t * batch).index_add_(0, bag, self._scores[slot])
        means = (sums / lengths.clamp(min=1)).view(t, batch)
        z_sparse = means.sum(0)
        pairs = t // 2
        z_pairs = (means[0 : 2 * pairs : 2] * means[1 : 2 * pairs : 2]).sum(0) if pairs else torch.zeros(batch)
        return z_dense, z_sparse, z_pairs

    def _logits(self, dense, values, lengths, batch) -> torch.Tensor:
        terms = self._terms(dense, values, lengths, batch)
        w = self.signal_weights
        mix = sum(wi * ti / ni for wi, ti, ni in zip(w, terms, self._norm))
        return self.signal_scale * mix / math.sqrt(sum(wi * wi for wi in w)) + self.logit_bias

    # ---- sampling -------------------------------------------------------------------

    def _sample(self, batch: int, gen: torch.Generator, raw: bool = False):
        dense = self._sample_dense(batch, gen)
        lengths = self._sample_lengths(batch, gen)
        counts = lengths.view(self.num_tables, batch).sum(1)
        values = self._sample_ids(counts, gen)
        if raw:
            return dense, (values, lengths, batch)
        logits = self._logits(dense, values, lengths, batch)
        labels = torch.bernoulli(torch.sigmoid(logits), generator=gen)
        per_key_ids = values.split(counts.tolist())
        per_key_lengths = lengths.view(self.num_tables, batch).unbind(0)
        return make_batch(self.keys, dense, per_key_ids, per_key_lengths, labels)

    def _sample_dense(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        # log(1 + count), count ~ floor(Exponential * mean): Criteo's dense features after
        # the reference log transform.
        expo = torch.empty(batch, self.num_dense).exponential_(generator=gen)
        return torch.log1p(torch.floor(expo * self._dense_means)).to(torch.float32)

    def _sample_lengths(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        p = torch.tensor(self.pooling_factors, dtype=torch.float64).repeat_interleave(batch)
        if self.bag_lengths == "poisson":
            lengths = torch.poisson(p, generator=gen)
        elif self.bag_lengths == "uniform":
            hi = torch.round(2 * p - 1)
            lengths = 1 + torch.floor(torch.rand(p.shape, generator=gen, dtype=torch.float64) * hi)
        else:
            lengths = torch.round(p)
        return lengths.to(torch.int64)

    def _sample_ids(self, counts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        table_of = torch.arange(self.num_tables).repeat_interleave(counts)
        n = self._rows[table_of]
        u = torch.rand(int(counts.sum()), generator=gen, dtype=torch.float64)
        if self.zipf_alpha is None:
            return torch.floor(u * n).to(torch.int64).clamp_(max=n - 1)
        rank = zipf_ranks(u, n.to(torch.float64), self.zipf_alpha)
        return (rank * self._mult[table_of] + self._shift[table_of]) % n


def zipf_ranks(u: torch.Tensor, n: torch.Tensor, alpha: float) -> torch.Tensor:
    """Map uniforms ``u`` in [0, 1) to ranks in [0, n) with P(rank k) proportional to
    the integral of x**-alpha over [k + 1/2, k + 3/2] (about (k + 1)**-alpha).

    Inverse CDF of the continuous power law on [1/2, n + 1/2): O(1) memory per table,
    so tables of any size cost nothing to set up.
    """
    lo = 0.5
    hi = n + 0.5
    if abs(alpha - 1.0) < 1e-9:
        x = lo * torch.pow(hi / lo, u)
    else:
        e = 1.0 - alpha
        a = lo**e
        x = torch.pow(a + u * (torch.pow(hi, e) - a), 1.0 / e)
    return torch.floor(x - 0.5).to(torch.int64).clamp_(min=0).clamp_(max=(n - 1).to(torch.int64))


def zipf_probabilities(n: int, alpha: float) -> torch.Tensor:
    """The exact rank distribution `zipf_ranks` samples from (float64, length n)."""
    edges = torch.arange(n + 1, dtype=torch.float64) + 0.5
    if abs(alpha - 1.0) < 1e-9:
        cdf = torch.log(edges)
    else:
        cdf = torch.pow(edges, 1.0 - alpha) / (1.0 - alpha)
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()
