"""Batches of (query, candidate) KeyedJaggedTensors for two-tower retrieval models.

Each interaction (user u, item i, time t) becomes one positive pair: the query holds
``user_id`` (one id per sample) and, with ``history_length > 0``, ``user_history``: the
items u interacted with strictly before t, up to ``history_length`` most recent, in
chronological order (most recent last; possibly empty). The candidate holds ``item_id``.
Negatives are left to the model (in-batch sampling is the usual choice).
"""
from __future__ import annotations

from typing import Iterator

import torch

from fxrec.datasets.interactions import Interactions, _count
from fxrec.sparse import KeyedJaggedTensor


class TwoTowerBatches:
    """An iterable of ``(query: KeyedJaggedTensor, candidate: KeyedJaggedTensor)``.

    ``history_from``: the interactions histories are drawn from (default: the
    interactions themselves; pass the training split when batching a test split so
    test queries see the training history). It must share the id spaces. With
    ``shuffle`` the order is a permutation seeded by ``(seed, epoch)``; call
    ``set_epoch`` between epochs for a fresh order, iterating twice without it repeats
    the same order.
    """

    def __init__(
        self,
        interactions: Interactions,
        batch_size: int = 256,
        history_length: int = 0,
        history_from: Interactions | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        batch_size = _count("TwoTowerBatches", "batch_size", batch_size, 1)
        history_length = _count("TwoTowerBatches", "history_length", history_length, 0)
        seed = _count("TwoTowerBatches", "seed", seed, None)
        pool = interactions if history_from is None else history_from
        if (pool.num_users, pool.num_items) != (interactions.num_users, interactions.num_items):
            raise ValueError(
                "TwoTowerBatches: history_from has (num_users, num_items) = "
                f"{(pool.num_users, pool.num_items)}, expected {(interactions.num_users, interactions.num_items)}"
            )
        self.interactions = interactions
        self.batch_size = batch_size
        self.history_length = history_length
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.history_length:
            self._hist_end, self._hist_len, self._pool_items = _history_index(interactions, pool, self.history_length)

    @property
    def query_keys(self) -> list[str]:
        return ["user_id", "user_history"] if self.history_length else ["user_id"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _count("TwoTowerBatches.set_epoch", "epoch", epoch, None)

    def __len__(self) -> int:
        full, rest = divmod(len(self.interactions), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[KeyedJaggedTensor, KeyedJaggedTensor]]:
        n = len(self.interactions)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for lo in range(0, n, self.batch_size):
            idx = order[lo : lo + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                return
            yield self.batch(idx)

    def batch(self, idx: torch.Tensor) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """The (query, candidate) pair for the interactions at positions ``idx``."""
        inter = self.interactions
        b = idx.numel()
        ones = torch.ones(b, dtype=torch.int32)
        users = inter.user_ids[idx]
        if self.history_length:
            lengths = self._hist_len[idx]
            ends = self._hist_end[idx]
            starts = torch.repeat_interleave(ends - lengths, lengths)
            within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            history = self._pool_items[starts + within]
            query = KeyedJaggedTensor(
                self.query_keys, torch.cat([users, history]), lengths=torch.cat([ones, lengths.to(torch.int32)]), stride=b
            )
        else:
            query = KeyedJaggedTensor(["user_id"], users, lengths=ones, stride=b)
        candidate = KeyedJaggedTensor(["item_id"], inter.item_ids[idx], lengths=ones.clone(), stride=b)
        return query, candidate


def _history_index(inter: Interactions, pool: Interactions, limit: int):
    """For every interaction: where its user's earlier pool items end in the pool's
    (user, time)-sorted item array, and how many of them (capped at ``limit``) to take."""
    # Rank timestamps over both sets so (user, time) packs into one int64 key.
    _, time_rank = torch.unique(torch.cat([pool.timestamps, inter.timestamps]), return_inverse=True)
    span = int(time_rank.max()) + 1 if time_rank.numel() else 1
    pool_key = pool.user_ids * span + time_rank[: len(pool)]
    query_key = inter.user_ids * span + time_rank[len(pool) :]
    sorted_key, order = torch.sort(pool_key, stable=True)
    # entries with key < query key: earlier users, or this user strictly before t
    end = torch.searchsorted(sorted_key, query_key, side="left")
    user_start = torch.searchsorted(sorted_key, inter.user_ids * span, side="left")
    length = torch.clamp(end - user_start, max=limit)
    return end, length, pool.item_ids[order]
