"""User-item interactions: the container, splits, and a synthetic generator.

`Interactions` holds parallel 1-D tensors with ids already remapped to dense ranges
``0..num_users-1`` / ``0..num_items-1``; ``user_raw_ids[u]`` / ``item_raw_ids[i]`` give
the original ids back. Splits keep the id spaces (and the maps) of their parent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fxrec.types import whole


def _count(owner: str, what: str, value, low: Optional[int]) -> int:
    """`value` as an int >= `low` (any int for None: a seed); a fraction or a string is an
    error, not truncated by int() (num_test=1.5 moved users with 2 interactions wholly to test)."""
    count = whole(value)
    if count is None or (low is not None and count < low):
        rule = "a whole number" if low is None else f">= {low} and a whole number"
        raise ValueError(f"{owner}: {what} must be {rule}, got {value!r}")
    return count


def _real(owner: str, what: str, value) -> float:
    """`value` as a finite float (a Python, numpy or one-element torch number; not a str)."""
    try:
        number = float(value) if not isinstance(value, (str, bytes)) else math.nan
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise ValueError(f"{owner}: {what} must be a finite number, got {value!r}")
    return number


@dataclass
class Interactions:
    """Parallel tensors of length n: ``user_ids``, ``item_ids`` (int64, dense ids),
    ``ratings`` (float32), ``timestamps`` (int64); ``user_raw_ids`` (num_users,) and
    ``item_raw_ids`` (num_items,) map dense ids back to the source's ids."""

    user_ids: torch.Tensor
    item_ids: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    num_users: int
    num_items: int
    user_raw_ids: torch.Tensor
    item_raw_ids: torch.Tensor

    def __post_init__(self):
        n = self.user_ids.shape[0]
        for name in ("user_ids", "item_ids", "ratings", "timestamps"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"Interactions: {name} must be 1-D with {n} entries, got shape {tuple(t.shape)}")
        for name, ids, bound in (("user_ids", self.user_ids, self.num_users), ("item_ids", self.item_ids, self.num_items)):
            if n and (int(ids.min()) < 0 or int(ids.max()) >= bound):
                raise ValueError(f"Interactions: {name} must lie in [0, {bound}), got range [{int(ids.min())}, {int(ids.max())}]")
        if self.user_raw_ids.shape != (self.num_users,) or self.item_raw_ids.shape != (self.num_items,):
            raise ValueError("Interactions: user_raw_ids / item_raw_ids must have num_users / num_items entries")

    def __len__(self) -> int:
        return int(self.user_ids.shape[0])

    @classmethod
    def from_raw(cls, users, items, ratings, timestamps) -> Interactions:
        """Remap arbitrary integer ids to dense ranges (dense id order = sorted raw id order)."""
        users = torch.as_tensor(users, dtype=torch.int64)
        items = torch.as_tensor(items, dtype=torch.int64)
        user_raw, user_ids = torch.unique(users, sorted=True, return_inverse=True)
        item_raw, item_ids = torch.unique(items, sorted=True, return_inverse=True)
        return cls(
            user_ids=user_ids.reshape(-1),
            item_ids=item_ids.reshape(-1),
            ratings=torch.as_tensor(ratings, dtype=torch.float32),
            timestamps=torch.as_tensor(timestamps, dtype=torch.int64),
            num_users=int(user_raw.numel()),
            num_items=int(item_raw.numel()),
            user_raw_ids=user_raw,
            item_raw_ids=item_raw,
        )

    def subset(self, index: torch.Tensor) -> Interactions:
        """The interactions at ``index`` (int positions or bool mask), same id spaces."""
        return Interactions(
            self.user_ids[index],
            self.item_ids[index],
            self.ratings[index],
            self.timestamps[index],
            self.num_users,
            self.num_items,
            self.user_raw_ids,
            self.item_raw_ids,
        )

    def time_order(self) -> torch.Tensor:
        """Positions sorted by timestamp; ties keep their original order."""
        return torch.sort(self.timestamps, stable=True).indices


def leave_last_out(interactions: Interactions, num_test: int = 1) -> tuple[Interactions, Interactions]:
    """Split into (train, test): each user's ``num_test`` latest interactions (ties
    broken by position: the later row counts as later) go to test. Users with
    ``num_test`` or fewer interactions stay entirely in train. Both keep the original
    row order."""
    num_test = _count("leave_last_out", "num_test", num_test, 1)
    n = len(interactions)
    by_time = interactions.time_order()
    order = by_time[torch.sort(interactions.user_ids[by_time], stable=True).indices]
    users = interactions.user_ids[order]
    counts = torch.bincount(interactions.user_ids, minlength=interactions.num_users)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[users]
    from_end = counts[users] - 1 - rank
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[order] = (from_end < num_test) & (counts[users] > num_test)
    return interactions.subset(~is_test), interactions.subset(is_test)


def train_test_split_by_time(interactions: Interactions, test_fraction: float = 0.2) -> tuple[Interactions, Interactions]:
    """Split into (train, test) at a global time cut: the latest ``round(n *
    test_fraction)`` interactions are the test set (ties broken by position). Both keep
    the original row order."""
    test_fraction = _real("train_test_split_by_time", "test_fraction", test_fraction)
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"train_test_split_by_time: test_fraction must be in [0, 1], got {test_fraction}")
    n = len(interactions)
    num_test = int(round(n * test_fraction))
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[interactions.time_order()[n - num_test :]] = True
    return interactions.subset(~is_test), interactions.subset(is_test)


def synthetic_interactions(
    num_users: int = 1000,
    num_items: int = 2000,
    num_interactions: int = 50_000,
    seed: int = 0,
    dim: int = 8,
    sharpness: float = 3.0,
    popularity: float = 1.0,
    return_factors: bool = False,
):
    """Interactions with latent-factor structure that a two-tower model can learn.

    Hidden unit-variance factors ``U`` (num_users x dim) and ``V`` (num_items x dim);
    each interaction picks a user (activity varies log-normally across users), then an
    item with probability ``softmax(sharpness * U[u] . V / sqrt(dim) + popularity * b)``
    where ``b`` is a hidden standard-normal item bias. Ratings are integers 1..5 rising
    with the affinity; timestamps are distinct-ish seconds over one year. Deterministic
    given ``seed``. With ``return_factors`` returns ``(interactions, U, V)``.
    """
    owner = "synthetic_interactions"
    num_users, num_items, dim = (_count(owner, name, value, 1) for name, value in
                                 (("num_users", num_users), ("num_items", num_items), ("dim", dim)))
    num_interactions = _count(owner, "num_interactions", num_interactions, 0)
    seed = _count(owner, "seed", seed, None)
    sharpness, popularity = _real(owner, "sharpness", sharpness), _real(owner, "popularity", popularity)
    gen = torch.Generator().manual_seed(seed)
    user_f = torch.randn(num_users, dim, generator=gen)
    item_f = torch.randn(num_items, dim, generator=gen)
    item_bias = torch.randn(num_items, generator=gen) * popularity
    activity = torch.exp(torch.randn(num_users, generator=gen))
    users = torch.multinomial(activity, num_interactions, replacement=True, generator=gen) if num_interactions else torch.zeros(0, dtype=torch.int64)
    items, affinity = _sample_items(users, user_f, item_f, item_bias, sharpness, gen)
    noise = torch.randn(num_interactions, generator=gen) * 0.5
    ratings = torch.clamp(torch.round(3.0 + 1.2 * affinity + noise), 1, 5)
    span = 365 * 24 * 3600
    timestamps = 1_500_000_000 + torch.randint(0, span, (num_interactions,), generator=gen)
    result = Interactions(
        users, items, ratings.to(torch.float32), timestamps, int(num_users), int(num_items),
        torch.arange(num_users), torch.arange(num_items),
    )
    return (result, user_f, item_f) if return_factors else result


def _sample_items(users, user_f, item_f, item_bias, sharpness: float, gen: torch.Generator):
    """One item per entry of ``users`` from its softmax; returns (items, U.V/sqrt(dim))."""
    n, (num_items, dim) = users.numel(), item_f.shape
    items = torch.empty(n, dtype=torch.int64)
    affinity = torch.empty(n)
    chunk = max(1, (1 << 22) // num_items)  # bounds the chunk x num_items logits
    for lo in range(0, n, chunk):
        u = users[lo : lo + chunk]
        logits = sharpness / math.sqrt(dim) * (user_f[u] @ item_f.t()) + item_bias
        pick = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)
        items[lo : lo + chunk] = pick
        affinity[lo : lo + chunk] = (user_f[u] * item_f[pick]).sum(1) / math.sqrt(dim)
    return items, affinity
