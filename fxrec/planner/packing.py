"""Per-rank loads under construction: placing options' shards, moving, swapping and
re-choosing them, with an undo log so that a trial change can be taken back.

A `Packing` holds, per rank, the time (seconds per step) and memory (bytes) of the
shards placed on it. Shards of "all" options (row_wise, data_parallel) are fixed; those
of "node" options (table_row_wise) move as one group; the single shards of "one" and
"distinct" options (table_wise, column_wise) are items that local search moves and
swaps. Every accepted move or swap strictly lowers the sum of squared loads, so local
search terminates.

Every operation also adds what it cost to a `Work` counter (about one unit per Python-level
step: a load update, a candidate looked at, a rank scanned). The search's later phases are
bounded by these units, never by the clock, so a busy machine gets the same plan, only later.
"""
from __future__ import annotations

import bisect
import heapq

import numpy as np


class Work:
    """Units of search work done so far, shared by the packings of one search."""

    __slots__ = ("units",)

    def __init__(self):
        self.units = 0


class Packing:
    def __init__(self, topology, cap: float, work: Work | None = None):
        self.W, self.P, self.cap = topology.world_size, topology.ranks_per_node, float(cap)
        self.num_nodes = topology.num_nodes
        self.load = [0.0] * self.W
        self.mem = [0.0] * self.W
        self.chosen = {}  # table -> Option
        self.where = {}  # table -> list of ranks (one per shard) / node index / None
        self.items = {}  # table -> item ids
        self.item_time, self.item_mem, self.item_table, self.item_rank = [], [], [], []
        self.rank_items = [set() for _ in range(self.W)]
        self.log: list[tuple] | None = None  # undo log while a trial runs
        self._heap = None
        self.work = work if work is not None else Work()

    # -- primitive, undoable operations ---------------------------------------------------
    def _bump(self, r: int, t: float, m: float) -> None:
        self.work.units += 1
        self.load[r] += t
        self.mem[r] += m
        if self._heap is not None:
            heapq.heappush(self._heap, (self.load[r], r))

    def _record(self, *op) -> None:
        if self.log is not None:
            self.log.append(op)

    def _set_choice(self, table: int, opt, where) -> None:
        self._record("choice", table, self.chosen.get(table), self.where.get(table), list(self.items.get(table, ())))
        if opt is None:
            self.chosen.pop(table, None)
            self.where.pop(table, None)
            self.items.pop(table, None)
        else:
            self.chosen[table], self.where[table] = opt, where

    def _add_item(self, table: int, r: int, t: float, m: float) -> int:
        i = len(self.item_time)
        self.item_time.append(t)
        self.item_mem.append(m)
        self.item_table.append(table)
        self.item_rank.append(r)
        self.rank_items[r].add(i)
        self.items.setdefault(table, []).append(i)
        self._bump(r, t, m)
        self._record("add", i)
        return i

    def _drop_item(self, i: int) -> None:
        r = self.item_rank[i]
        self.rank_items[r].discard(i)
        self._bump(r, -self.item_time[i], -self.item_mem[i])
        self._record("drop", i)

    def _move(self, i: int, q: int) -> None:
        r = self.item_rank[i]
        t, m = self.item_time[i], self.item_mem[i]
        self.rank_items[r].discard(i)
        self._bump(r, -t, -m)
        self.rank_items[q].add(i)
        self.item_rank[i] = q
        self._bump(q, t, m)
        ranks = self.where[self.item_table[i]]
        ranks[ranks.index(r)] = q
        self._record("move", i, r)

    def _spread(self, shards, sign: float) -> None:
        for r, t, m in shards:
            self._bump(r, sign * t, sign * m)
        self._record("spread", shards, sign)

    def undo(self, mark: int) -> None:
        """Take back every operation logged after ``mark`` (a length of ``log``)."""
        log, self.log = self.log, None
        self.work.units += len(log) - mark
        while len(log) > mark:
            op = log.pop()
            if op[0] == "move":
                self._move(op[1], op[2])
            elif op[0] == "add":
                i = op[1]
                self.rank_items[self.item_rank[i]].discard(i)
                self._bump(self.item_rank[i], -self.item_time[i], -self.item_mem[i])
                self.items[self.item_table[i]].remove(i)
            elif op[0] == "drop":
                i = op[1]
                self.rank_items[self.item_rank[i]].add(i)
                self._bump(self.item_rank[i], self.item_time[i], self.item_mem[i])
            elif op[0] == "spread":
                for r, t, m in op[1]:
                    self._bump(r, -op[2] * t, -op[2] * m)
            elif op[0] == "choice":
                _, table, opt, where, items = op
                if opt is None:
                    self.chosen.pop(table, None)
                    self.where.pop(table, None)
                    self.items.pop(table, None)
                else:
                    self.chosen[table], self.where[table], self.items[table] = opt, where, items
        self.log = log

    # -- placing and removing whole options ---------------------------------------------------
    def all_shards(self, opt, times=None):
        """(rank, time, bytes) of an "all" option's shards; ``times`` replaces
        ``opt.times`` (the hedge's pessimistic ones)."""
        k0, times = opt.counts[0], times or opt.times
        return [(r, times[r >= k0], opt.mems[r >= k0]) for r in range(self.W)]

    def node_shards(self, opt, node: int, times=None):
        """(rank, time, bytes) of a "node" option's shards on ``node``."""
        k0, base, times = opt.counts[0], node * self.P, times or opt.times
        return [(base + i, times[i >= k0], opt.mems[i >= k0]) for i in range(self.P)]

    def start_heap(self) -> None:
        """Use a heap of loads while many shards are placed in a row (initial packing)."""
        self._heap = [(self.load[r], r) for r in range(self.W)]
        heapq.heapify(self._heap)

    def stop_heap(self) -> None:
        self._heap = None

    def _least_loaded(self, m: float, allowed, exclude) -> int | None:
        """The least-loaded rank with room for ``m`` bytes, in ``allowed`` (None: any),
        not in ``exclude``."""
        if allowed is not None or self._heap is None:
            best = None
            self.work.units += len(allowed) if allowed is not None else self.W
            for r in (allowed if allowed is not None else range(self.W)):
                if r in exclude or self.mem[r] + m > self.cap:
                    continue
                if best is None or self.load[r] < self.load[best]:
                    best = r
            return best
        stash, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            if entry[0] != self.load[entry[1]]:
                continue  # stale: a fresher entry for this rank is in the heap
            stash.append(entry)
            if entry[1] not in exclude and self.mem[entry[1]] + m <= self.cap:
                found = entry[1]
                break
        self.work.units += len(stash) + 1
        for entry in stash:
            heapq.heappush(self._heap, entry)
        return found

    def place(self, opt) -> bool:
        """Put the option's shards where they fit best; False (nothing placed) if they
        do not fit."""
        if opt.placement == "all":
            shards = self.all_shards(opt)
            if any(self.mem[r] + m > self.cap for r, _, m in shards):
                return False
            self._spread(shards, 1.0)
            self._set_choice(opt.table, opt, None)
            return True
        if opt.placement == "node":
            return self._place_node(opt)
        t, m = opt.times[0], opt.mems[0]
        ranks: list[int] = []
        for _ in range(opt.num_shards):
            r = self._least_loaded(m, opt.allowed, ranks)
            if r is None:
                return False
            ranks.append(r)
        self._set_choice(opt.table, opt, ranks)
        for r in ranks:
            self._add_item(opt.table, r, t, m)
        return True

    def _place_node(self, opt) -> bool:
        """table_row_wise: the node whose busiest rank ends least busy."""
        best, best_peak = None, None
        nodes = opt.nodes if opt.nodes is not None else range(self.num_nodes)
        self.work.units += len(nodes) * self.P
        for node in nodes:
            shards = self.node_shards(opt, node)
            if any(self.mem[r] + m > self.cap for r, _, m in shards):
                continue
            peak = max(self.load[r] + t for r, t, _ in shards)
            if best is None or peak < best_peak:
                best, best_peak = node, peak
        if best is None:
            return False
        self._spread(self.node_shards(opt, best), 1.0)
        self._set_choice(opt.table, opt, best)
        return True

    def remove(self, table: int) -> None:
        opt = self.chosen[table]
        if opt.placement == "all":
            self._spread(self.all_shards(opt), -1.0)
        elif opt.placement == "node":
            self._spread(self.node_shards(opt, self.where[table]), -1.0)
        else:
            for i in self.items[table]:
                self._drop_item(i)
        self._set_choice(table, None, None)

    def tables_on(self, r: int) -> list[int]:
        """Tables with a shard on rank r, busiest shard first."""
        on = {}
        self.work.units += len(self.rank_items[r]) + len(self.chosen)
        for i in self.rank_items[r]:
            on[self.item_table[i]] = self.item_time[i]
        P = self.P
        for table, opt in self.chosen.items():
            if opt.placement == "all":
                on[table] = opt.times[r >= opt.counts[0]]
            elif opt.placement == "node" and self.where[table] == r // P:
                on[table] = opt.times[(r % P) >= opt.counts[0]]
        return sorted(on, key=lambda t: -on[t])

    def makespan(self) -> float:
        self.work.units += self.W
        return max(self.load)

    def score(self) -> tuple[float, int]:
        """(busiest load, how many ranks are within 1e-9 of it): smaller is better."""
        self.work.units += self.W
        top = max(self.load)
        return top, sum(1 for x in self.load if x >= top * (1 - 1e-9))

    # -- local search -----------------------------------------------------------------------
    def _can_host(self, r: int, i: int, leaving: int | None = None) -> bool:
        """Whether rank r may take item i (pins, memory, one shard of a table per rank);
        ``leaving`` is an item r gives up in the same step."""
        opt = self.chosen[self.item_table[i]]
        if opt.allowed is not None and r not in opt.allowed:
            return False
        freed = self.item_mem[leaving] if leaving is not None else 0.0
        if self.mem[r] - freed + self.item_mem[i] > self.cap:
            return False
        if opt.num_shards > 1:
            table = self.item_table[i]
            self.work.units += len(self.rank_items[r])
            return not any(j != leaving and self.item_table[j] == table for j in self.rank_items[r])
        return True

    def _busiest_and_idlest(self, k: int) -> tuple[int, list[int]]:
        """The busiest rank and the k least busy others (numpy beyond a few ranks)."""
        self.work.units += self.W
        if self.W <= 32:
            order = sorted(range(self.W), key=self.load.__getitem__)
            return order[-1], order[:min(k, self.W - 1)]
        arr = np.array(self.load)
        r = int(arr.argmax())
        idle = np.argpartition(arr, k)[:k + 1]
        idle = sorted((int(q) for q in idle if q != r), key=self.load.__getitem__)
        return r, idle[:k]

    def _best_move(self, r: int, qs: list[int]):
        Lr = self.load[r]
        best, best_peak = None, Lr * (1 - 1e-12)
        items = sorted(self.rank_items[r], key=self.item_time.__getitem__, reverse=True)
        self.work.units += len(items) * (len(qs) + 1)
        for q in qs:
            gap = Lr - self.load[q]
            for i in items:
                t = self.item_time[i]
                peak = max(Lr - t, self.load[q] + t)
                if t < gap and peak < best_peak and self._can_host(q, i):
                    best, best_peak = (i, q), peak
        return best

    def _best_swap(self, r: int, qs: list[int]):
        Lr = self.load[r]
        best, best_peak = None, Lr * (1 - 1e-12)
        mine = list(self.rank_items[r])
        for q in qs:
            Lq = self.load[q]
            gap = Lr - Lq
            theirs = sorted(self.rank_items[q], key=self.item_time.__getitem__)
            self.work.units += len(theirs) + 4 * len(mine)
            times = [self.item_time[j] for j in theirs]
            for i in mine:
                t = self.item_time[i]
                pos = bisect.bisect_left(times, t - gap / 2)  # the ideal partner moves gap/2
                for j in theirs[max(0, pos - 2):pos + 2]:
                    d = t - self.item_time[j]
                    if not 0 < d < gap:
                        continue
                    peak = max(Lr - d, Lq + d)
                    if peak < best_peak and self._can_host(q, i, leaving=j) and self._can_host(r, j, leaving=i):
                        best, best_peak = (i, j), peak
        return best

    def local_search(self, max_steps: int = 100_000, fanout: int = 8) -> None:
        """Move or swap items off the busiest rank while that lowers its load without
        making another rank as busy."""
        for _ in range(max_steps):
            r, qs = self._busiest_and_idlest(fanout)
            mv = self._best_move(r, qs)
            if mv is not None:
                self._move(*mv)
                continue
            sw = self._best_swap(r, qs)
            if sw is None:
                return
            i, j = sw
            q = self.item_rank[j]
            self._move(i, q)
            self._move(j, r)
