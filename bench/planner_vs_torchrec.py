"""fxrec's planner against TorchRec's EmbeddingShardingPlanner on the same table sets
and topologies.

Each plan is scored two ways: under fxrec's cost model (the plan converted to an
fxrec Plan and evaluated by `Plan.per_rank`) and under TorchRec's own estimators (the
fxrec plan's sharding types forced through TorchRec's enumerator, each shard put on
the rank fxrec chose, per-rank sums of TorchRec's perf and HBM estimates). Both use the
same per-rank batch and the same bandwidths (fxrec's topology handed to TorchRec in its
units, bytes/ms), no storage reservation, and HBM-only kernels (TorchRec: fused, and
dense for data-parallel; fxrec: its default kernel, which the TorchRec plan is scored
with too, so only placement and sharding differ).

Needs TorchRec, which fxrec never depends on: run it from a separate environment,

    python3 -m venv /work/torchrec-venv
    /work/torchrec-venv/bin/pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0 numpy sympy \\
        networkx==3.6.1 tqdm tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions iopath
    /work/torchrec-venv/bin/pip install --no-deps torchrec==1.8.0
    /work/torchrec-venv/bin/pip install --no-deps -e .
    /work/torchrec-venv/bin/python bench/planner_vs_torchrec.py [--quick]

TorchRec plans with compute_device="cuda" although no GPU is present: its planner only
estimates, so a cuda topology (where it offers row-wise sharding) works on a CPU host.

The two models differ, so a plan balanced under one is not balanced under the other.
TorchRec's estimate (torchrec 1.8.0) charges a table-/column-wise shard's whole
all-to-all payload, the part for its own rank and its node's NVLink peers included, at
the inter-host bandwidth once the world spans nodes (fxrec: nothing for itself, NVLink
for its node, the NIC for the rest); it charges a row at least 32 elements wide and
multiplies the lookup compute of shards narrower than 128 elements by an FBGEMM
thread-block penalty (1.15, or 1.75 below 64 wide). fxrec's model shares the floor, as
a scattered row access moving at least one memory line (`cost.ROW_ACCESS_BYTES`), and
not the rest.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections import Counter, defaultdict

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner import Topology as TRTopology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation

import fxrec
from fxrec import Topology
from fxrec.planner.spec import Shard, TablePlan
from planner_quality import random_tables

# TorchRec names its 2-D shardings differently; the closest fxrec type scores them.
TR_TO_FX = {"table_wise": "table_wise", "row_wise": "row_wise", "table_row_wise": "table_row_wise",
            "column_wise": "column_wise", "table_column_wise": "column_wise", "data_parallel": "data_parallel",
            "grid_shard": "table_row_wise"}


def tr_topology(topo: Topology) -> TRTopology:
    return TRTopology(world_size=topo.world_size, local_world_size=topo.ranks_per_node, compute_device=topo.device,
                      hbm_cap=topo.memory_per_rank, ddr_cap=topo.host_memory_per_rank,
                      hbm_mem_bw=topo.hbm_bandwidth / 1e3, ddr_mem_bw=topo.hbm_bandwidth / 1e3,
                      intra_host_bw=topo.intra_node_bandwidth / 1e3, inter_host_bw=topo.inter_node_bandwidth / 1e3)


def ebc_for(tables) -> EmbeddingBagCollection:
    cfgs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                               feature_names=[f"f_{t.name}"]) for t in tables]
    return EmbeddingBagCollection(tables=cfgs, device=torch.device("meta"))


def constraint(t, **kw) -> ParameterConstraints:
    kw.setdefault("compute_kernels", ["fused", "dense"])
    return ParameterConstraints(pooling_factors=[t.pooling_factor], **kw)


def torchrec_plan(tables, topo: Topology, batch: int):
    planner = EmbeddingShardingPlanner(topology=tr_topology(topo), batch_size=batch, debug=False,
                                       storage_reservation=FixedPercentageStorageReservation(0.0),
                                       constraints={t.name: constraint(t) for t in tables})
    t0 = time.perf_counter()
    planner.plan(ebc_for(tables), [EmbeddingBagCollectionSharder()])
    return planner._best_plan, time.perf_counter() - t0  # the chosen ShardingOptions, with ranks and perf


def _rank(shard) -> int:
    return int(shard.rank)


def as_fxrec_plan(options, tables, topo: Topology, batch: int, kernel: str) -> fxrec.Plan:
    info = {t.name: t for t in tables}
    out = {}
    for so in options:
        t = info[so.name]
        if so.sharding_type == "data_parallel":
            shards = [Shard(r, (0, t.num_embeddings), (0, t.embedding_dim)) for r in range(topo.world_size)]
        else:
            shards = [Shard(_rank(s), (s.offset[0], s.offset[0] + s.size[0]), (s.offset[1], s.offset[1] + s.size[1]))
                      for s in so.shards]
        out[so.name] = TablePlan(so.name, TR_TO_FX[so.sharding_type], kernel, shards, t)
    return fxrec.Plan({t.name: out[t.name] for t in tables}, topo, batch)


def per_rank_torchrec(options, world: int):
    time_, hbm = [0.0] * world, [0.0] * world
    for so in options:
        for s in so.shards:
            time_[_rank(s)] += s.perf.total
            hbm[_rank(s)] += s.storage.hbm
    return time_, hbm


def torchrec_estimate_of(plan: fxrec.Plan, tables, topo: Topology, batch: int):
    """fxrec's plan under TorchRec's estimators: per-rank perf (ms) and HBM, or None for
    tables TorchRec cannot express the same way."""
    cons = {}
    for t in tables:
        tp = plan[t.name]
        kernel = "dense" if tp.sharding == "data_parallel" else "fused"
        kw = dict(sharding_types=[tp.sharding], compute_kernels=[kernel])
        if tp.sharding == "column_wise":
            kw["min_partition"] = tp.shards[0].num_cols
        cons[t.name] = constraint(t, **kw)
    enum = EmbeddingEnumerator(topology=tr_topology(topo), batch_size=batch, constraints=cons)
    options = enum.enumerate(ebc_for(tables), [EmbeddingBagCollectionSharder()])
    by_name = defaultdict(list)
    for so in options:
        by_name[so.name].append(so)
    chosen, missing = [], []
    for t in tables:
        tp = plan[t.name]
        fits = [so for so in by_name[t.name] if len(so.shards) == len(tp.shards)]
        if not fits:
            missing.append(t.name)
            continue
        so = fits[0]
        for s, mine in zip(so.shards, sorted(tp.shards, key=lambda x: (x.rows, x.cols))):
            s.rank = mine.rank
        chosen.append(so)
    return per_rank_torchrec(chosen, topo.world_size), missing


SETS = {
    "50 tables / 16 cuda (2x8)": (50, 16, None),
    "200 tables / 32 cuda (4x8)": (200, 32, None),
    "100 tables / 8 cuda (1x8)": (100, 8, None),
    "400 tables / 64 cuda (8x8)": (400, 64, None),
    "100 tables / 16 cuda, 2 GB per rank": (100, 16, "2GB"),
}


def compare(name: str, seed: int, batch: int) -> dict:
    count, world, memory = SETS[name]
    tables = random_tables(seed, count)
    topo = Topology(world, ranks_per_node=8, device="cuda", memory_per_rank=memory)
    t0 = time.perf_counter()
    fx = fxrec.plan(tables, topo, batch_size=batch)
    fx_time = time.perf_counter() - t0
    tr_options, tr_time = torchrec_plan(tables, topo, batch)
    tr = as_fxrec_plan(tr_options, tables, topo, batch, fx[tables[0].name].kernel)
    (fx_tr_time, fx_tr_hbm), missing = torchrec_estimate_of(fx, tables, topo, batch)
    tr_tr_time, tr_tr_hbm = per_rank_torchrec(tr_options, world)
    row = dict(
        fx_fx=fx.max_rank_time() * 1e3, tr_fx=tr.max_rank_time() * 1e3,
        fx_tr=max(fx_tr_time), tr_tr=max(tr_tr_time),
        fx_mem=max(r["memory_bytes"] for r in fx.per_rank()) / 2**30,
        tr_mem=max(r["memory_bytes"] for r in tr.per_rank()) / 2**30,
        fx_trmem=max(fx_tr_hbm) / 2**30, tr_trmem=max(tr_tr_hbm) / 2**30,
        fx_s=fx_time, tr_s=tr_time, missing=missing,
        fx_kinds=dict(Counter(tp.sharding for tp in fx.tables.values())),
        tr_kinds=dict(Counter(so.sharding_type for so in tr_options)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, the three smaller sets")
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # TorchRec warns about dry runs and topology factories
    warnings.filterwarnings("ignore")
    names = list(SETS)[:3] if args.quick else list(SETS)
    seeds = [0] if args.quick else [0, 1]
    print("max rank time in ms (lower is better); memory: busiest rank's GiB (fxrec model / TorchRec estimate)")
    print(f"{'set':40s} {'seed':>4} | {'fxrec model: fx':>15} {'tr':>8} | {'TorchRec est: fx':>16} {'tr':>8} | "
          f"{'mem fx':>12} {'mem tr':>12} | {'plan s fx':>9} {'tr':>6}")
    wins, tr_wins = [], []
    for name in names:
        for seed in seeds:
            r = compare(name, seed, args.batch_size)
            wins.append(r["fx_fx"] < r["tr_fx"])
            tr_wins.append(r["fx_tr"] < r["tr_tr"])
            print(f"{name:40s} {seed:>4} | {r['fx_fx']:>15.4f} {r['tr_fx']:>8.4f} | {r['fx_tr']:>16.4f} "
                  f"{r['tr_tr']:>8.4f} | {r['fx_mem']:>5.2f}/{r['fx_trmem']:<6.2f} "
                  f"{r['tr_mem']:>5.2f}/{r['tr_trmem']:<6.2f}"
                  f" | {r['fx_s']:>9.2f} {r['tr_s']:>6.2f}")
            print(f"{'':46s} fxrec {r['fx_kinds']}; TorchRec {r['tr_kinds']}"
                  + (f"; not expressible in TorchRec: {r['missing']}" if r["missing"] else ""))
    print(f"fxrec's plan has the lower max rank time under fxrec's model on {sum(wins)}/{len(wins)} sets, "
          f"under TorchRec's estimate on {sum(tr_wins)}/{len(tr_wins)}")


if __name__ == "__main__":
    main()
