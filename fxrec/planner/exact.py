"""Exact search for small instances (about 12 tables on 4 ranks): branch and bound over
every option and every placement of its shards, in the same option space as the
heuristic, so tests can bound the heuristic's gap.

Pruning: a node is cut when ``max(busiest rank, (placed load + cheapest totals of the
rest) / W, least-loaded rank + largest indivisible shard of the rest)``, or the
split-aware bound of the rest on top of the placed load (`bounds.split_bound`),
cannot beat the best plan found.
Symmetry: two ranks are interchangeable for the rest of the search when they carry the
same load and memory and every remaining option treats them alike (same size group of
every row-wise split, same node, same pins); states equal up to such swaps are searched
once.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from fxrec.planner.bounds import bound_from_events, split_events


@dataclass
class ExactResult:
    assignment: list | None  # per table (option, where), as partition.assignment; None if none beat `upper`
    makespan: float
    optimal: bool  # False when the node budget ran out
    nodes: int  # steps counted against the budget: nodes visited and placements refused for memory


def _signatures(options, topology) -> list[tuple]:
    """Per rank, everything (besides load and memory) that distinguishes it."""
    W, P = topology.world_size, topology.ranks_per_node
    bounds = sorted({o.counts[0] for opts in options for o in opts if o.placement == "all"})
    node_bounds = sorted({o.counts[0] for opts in options for o in opts if o.placement == "node"})
    pins = [o.allowed for opts in options for o in opts[:1] if o.allowed is not None]
    uses_nodes = bool(node_bounds)
    return [(tuple(r < b for b in bounds), tuple(r % P < b for b in node_bounds),
             r // P if uses_nodes else 0, tuple(r in a for a in pins)) for r in range(W)]


class _Search:
    def __init__(self, options, topology, cap, upper, node_budget):
        self.W, self.P, self.cap = topology.world_size, topology.ranks_per_node, cap
        self.num_nodes = topology.num_nodes
        # big tables first: they decide the bound soonest
        self.order = sorted(range(len(options)), key=lambda i: -min(o.total_time for o in options[i]))
        self.opts = [sorted(options[i], key=lambda o: o.total_time) for i in self.order]
        T = len(self.order)
        self.rest_total = [0.0] * (T + 1)
        self.rest_largest = [0.0] * (T + 1)
        for k in range(T - 1, -1, -1):
            self.rest_total[k] = self.rest_total[k + 1] + min(o.total_time for o in self.opts[k])
            self.rest_largest[k] = max(self.rest_largest[k + 1], min(o.max_time for o in self.opts[k]))
        self.sig = _signatures(options, topology)
        # split-aware bound of the tables from depth k on (tables renumbered by depth)
        self.events = [split_events([[] for _ in range(k)] + self.opts[k:]) for k in range(T + 1)]
        self.best = upper if upper is not None else math.inf
        self.best_stack = None
        self.load, self.mem = [0.0] * self.W, [0.0] * self.W
        self.stack = []
        self.nodes, self.budget = 0, node_budget
        self.unit = (upper or 1.0) * 1e-9
        self.seen = set()

    def _key(self, k: int):
        u = self.unit
        return k, tuple(sorted((self.sig[r], round(self.load[r] / u), round(self.mem[r])) for r in range(self.W)))

    def _placements(self, opt):
        """(where, [(rank, time, bytes)]) for every placement of the option."""
        if opt.placement == "all":
            k0 = opt.counts[0]
            yield None, [(r, opt.times[r >= k0], opt.mems[r >= k0]) for r in range(self.W)]
        elif opt.placement == "node":
            k0 = opt.counts[0]
            for node in (opt.nodes if opt.nodes is not None else range(self.num_nodes)):
                yield node, [(node * self.P + i, opt.times[i >= k0], opt.mems[i >= k0]) for i in range(self.P)]
        else:
            ranks = sorted(opt.allowed if opt.allowed is not None else range(self.W))
            for combo in itertools.combinations(ranks, opt.num_shards):
                yield list(combo), [(r, opt.times[0], opt.mems[0]) for r in combo]

    def run(self, k: int = 0) -> None:
        self.nodes += 1
        if self.nodes > self.budget:
            return
        if k == len(self.opts):
            span = max(self.load)
            if span < self.best * (1 - 1e-12):
                self.best, self.best_stack = span, list(self.stack)
            return
        # some rank takes the largest remaining indivisible shard on top of its load
        bound = max(max(self.load), (sum(self.load) + self.rest_total[k]) / self.W,
                    min(self.load) + self.rest_largest[k])
        if bound >= self.best * (1 - 1e-12):
            return
        if len(self.opts) - k > 2:  # worth its cost where a cut saves a subtree
            split = bound_from_events(self.events[k], len(self.opts) - k, self.W, sum(self.load))
            if split >= self.best * (1 - 1e-12):
                return
        key = self._key(k)
        if key in self.seen:
            return
        if len(self.seen) < 2_000_000:
            self.seen.add(key)
        for opt in self.opts[k]:
            for where, shards in self._placements(opt):
                if self.nodes > self.budget:
                    return  # a spent budget stops the loops too: each child would return at once
                if any(self.mem[r] + m > self.cap for r, _, m in shards):
                    # a step too: tight memory can reject millions of column shard placements
                    self.nodes += 1
                    continue
                for r, t, m in shards:
                    self.load[r] += t
                    self.mem[r] += m
                self.stack.append((opt, where))
                self.run(k + 1)
                self.stack.pop()
                for r, t, m in shards:
                    self.load[r] -= t
                    self.mem[r] -= m


def search(options, topology, cap: float, upper: float | None = None, node_budget: int = 300_000) -> ExactResult:
    """The plan with the smallest busiest-rank time, if one beats ``upper``."""
    s = _Search(options, topology, cap, upper, node_budget)
    s.run()
    optimal = s.nodes <= s.budget
    if s.best_stack is None:
        return ExactResult(None, s.best, optimal, s.nodes)
    assignment = [None] * len(options)
    for k, (opt, where) in enumerate(s.best_stack):
        assignment[s.order[k]] = (opt, where)
    return ExactResult(assignment, s.best, optimal, s.nodes)
