"""The planner: where each embedding table goes.

- cost.py        storage and time of one shard (sympy, compiled once to numpy)
- enumerate.py   every allowed (sharding type, kernel, shard sizes) per table
- packing.py     per-rank loads; placing, moving and swapping shards
- bounds.py      lower bounds on the busiest rank's time (simple, split-aware, cover-aware)
- partition.py   the heuristic: split thresholds, largest-first placement, local search
- hedge.py       after the heuristic: stay balanced if every remote byte crossed the NIC
- exact.py       branch and bound for small instances
- feasibility.py PlanError messages: what does not fit and what would make it fit
- evaluate.py    a finished plan's costs per shard / table / rank, at any batch size
- report.py      JSON and text (explain)
- validate.py    the structural rules of a plan
- plan.py        fxrec.plan(), Plan, TablePlan, Shard, Constraint, PlanError
- calibrate.py   measure memory and collective bandwidth for a Topology profile
"""
from __future__ import annotations

from fxrec.planner.plan import Constraint, Plan, PlanError, Shard, TablePlan, plan

__all__ = ["plan", "Plan", "TablePlan", "Shard", "Constraint", "PlanError"]
