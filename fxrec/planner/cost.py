"""Storage and time of one shard, as sympy expressions compiled once to numpy.

Each formula below is written once, in sympy, in terms of the shard (rows ``n`` of a
table of ``N`` rows, ``c`` of its ``C`` columns), the table (pooling factor ``pf``, bags
per sample ``u``, weight bytes per element ``eb``, output bytes per element ``ob`` (the
lookup's outputs, in the compute dtype) and ``wb`` (the same outputs on the wire between
ranks, `wire_bytes`), ``pooled`` 1/0), the kernel's efficiency ``eff``, the optimizer (its state ``opt_elem``,
``opt_row``, and ``opt_sync`` 1/0: whether it syncs split rows), the per-rank batch ``B``
and the topology (``W`` ranks, ``P`` per node, bandwidths ``bw_mem``, ``bw_intra``, ``bw_inter``,
``bw_ring``, and ``gran``, the bytes that one scattered row access moves at least).
`shard_expressions` gives them back with a table's numbers substituted, so a plan
explains itself and re-evaluates for another batch; `shard_costs` evaluates
them on numpy arrays of many shards at once (the planner's hot path never touches
sympy).

Model (per training step, seconds; a rank's time is the sum over its shards, with no
overlap assumed):
- every sample makes ``u`` bags of the table (`bags_per_sample`): one per feature that
  reads it, or fewer where a feature has a batch of its own (VBE). A bag holds ``pf`` ids;
  it is looked up, its ids and one length sent and its pooled sum returned once, however
  many samples share it; the expansion of the sums to the batch runs on the sample-owning
  rank after the output exchange, the same under every plan, so no shard is charged for
  it. An unpooled table's bag is a sample's sequence of one feature and returns ``pf``
  rows, one per id, so ``pf`` is the sequence's length (`TableInfo.pooling_factor`);
- ids are uniform over rows, so a row-wise shard sees the fraction n/N of the ids;
- lookup: bytes moved by forward (read rows, write outputs) and backward (read output
  grads, read+write rows and optimizer state) over ``bw_mem * eff``; a data-parallel
  table instead updates the whole table densely after its all-reduce. Rows are read
  and written at scattered addresses, so each access of a row of one array (weights,
  each fp32 optimizer-state array) moves at least ``gran`` bytes, however narrow the
  row (`ROW_ACCESS_BYTES`); outputs, ids and dense updates stream and are charged by
  their bytes;
- input_dist: the ids (8 bytes) and lengths (4 bytes per bag) the shard receives from
  the other ranks, over NVLink-class ``bw_intra`` from its node's P-1 peers and
  ``bw_inter`` from the W-P others;
- output_dist: what the shard sends forward and receives back in backward, ``wb`` bytes
  per element (fewer than ``ob`` under fxrec.shard's comm_dtype, which sends results and
  their gradients in 16 bits; the lookup still writes and reads them at ``ob``): pooled
  vectors by all-to-all (table/column-wise), a reduce-scatter over all ranks
  (row-wise, over the ring bandwidth), a reduce-scatter within the node followed by an
  all-to-all (table-row-wise); unpooled tables return one row per id;
- allreduce: a data-parallel table's gradient, 2(W-1)/W of it over the ring;
- row_sync: exact RowWiseAdagrad on a column_wise table (fxrec/runtime/row_sync.py): each
  column shard makes a second pass over the lookup gradient for its per-row sums of g**2
  (charged to lookup: per id, its bag's output-grad row gathered, and one fp32 partial
  written and read) and sends those sums, one fp32 per touched row, to the table's other k-1 = C/c - 1
  column shards, each at the average cost of a message to one other rank. Other sharding
  types hold whole rows, and ``rowwise_adagrad_per_shard`` (TorchRec's per-shard
  accumulator) does neither.
Communication is charged to the rank that holds the shard; the receiving side of the
pooled outputs is the same on every rank and is left out.
"""
from __future__ import annotations

import functools

import numpy as np
import sympy as sp

from fxrec.types import wire_dtype

SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "table_row_wise", "column_wise")
TERMS = ("lookup", "input_dist", "output_dist", "allreduce", "row_sync")
ID_BYTES, LENGTH_BYTES = 8, 4

# Fraction of the memory bandwidth each kernel reaches on a lookup (assumed, not
# measured here): Triton and FBGEMM's table-batched kernels stream rows near the
# roofline on GPU; the plain-torch fallback launches per table and gathers in two
# passes. On CPU Triton only runs in its interpreter, hence the tiny factor.
KERNEL_EFFICIENCY = {
    "cuda": {"triton": 0.80, "fbgemm": 0.75, "torch": 0.25},
    "cpu": {"fbgemm": 0.50, "torch": 0.20, "triton": 0.002},
}
# The least a scattered row access moves from memory, in bytes. CPU: one 64-byte cache
# line. GPU: one 128-byte L2 line; a narrower row is no cheaper to gather, since the
# lookup is bound by the number of rows in flight, not by their bytes (TorchRec's
# calibrated estimator charges the same floor: rows narrower than 32 fp32 elements
# cost as 32). It makes narrow column shards (a 64-wide fp32 table cut 16 ways has
# 16-byte rows) as expensive as they are.
ROW_ACCESS_BYTES = {"cuda": 128, "cpu": 64}
DEFAULT_KERNELS = {"cuda": ("triton", "fbgemm"), "cpu": ("fbgemm", "torch")}
KERNELS = ("fbgemm", "triton", "torch")

# Optimizer state: (bytes per element, bytes per row), as fxrec.optim keeps it: fp32
# state; Adagrad's accumulator per element; Adam's two moments per element plus an int32
# step count per row. Every state
# array holds 4-byte entries, so bytes / 4 is the number of arrays a row update touches.
# "rowwise_adagrad" is RowWiseAdagrad(exact_column_wise=True), fxrec's default;
# "rowwise_adagrad_per_shard" is exact_column_wise=False (TorchRec's): same state.
OPTIMIZER_STATE = {"sgd": (0, 0), "rowwise_adagrad": (0, 4), "rowwise_adagrad_per_shard": (0, 4), "adagrad": (4, 0),
                   "adam": (8, 4)}
# 1 where a column_wise table's shards exchange per-row sums of g**2 in backward so that
# each row's accumulator sees the whole row (the row_sync term); 0 elsewhere.
OPTIMIZER_ROW_SYNC = {"sgd": 0, "rowwise_adagrad": 1, "rowwise_adagrad_per_shard": 0, "adagrad": 0, "adam": 0}

# Symbols. Table/shard parameters vary per shard; the rest per plan.
N, n, c, C, pf, u, eb, ob, wb, pooled, eff, opt_elem, opt_row, opt_sync = sp.symbols(
    "N n c C pf u eb ob wb pooled eff opt_elem opt_row opt_sync", nonnegative=True)
B = sp.Symbol("B", positive=True)
W, P = sp.symbols("W P", positive=True, integer=True)
bw_mem, bw_intra, bw_inter, bw_ring = sp.symbols("bw_mem bw_intra bw_inter bw_ring", positive=True)
gran = sp.Symbol("gran", positive=True)
OPT_ARGS = (opt_elem, opt_row, opt_sync)  # from the optimizer's name, not given per shard
SHARD_ARGS = (N, n, c, C, pf, u, eb, ob, wb, pooled, eff) + OPT_ARGS
GIVEN_ARGS = SHARD_ARGS[:-len(OPT_ARGS)]  # what a shard dict carries
# what a shard dict may leave out, and the argument it then takes the value of: without a
# narrower wire dtype the outputs travel as they are computed
DEFAULT_ARGS = {wb.name: ob.name}
PLAN_ARGS = (B, W, P, bw_mem, bw_intra, bw_inter, bw_ring, gran)
STATE_ENTRY_BYTES = 4


def row_access_bytes():
    """Bytes moved per id by one read of its rows: (weights, per-element optimizer
    state, per-row optimizer state); each state array is its own scattered access."""
    weights = sp.Max(c * eb, gran)
    elem_state = sp.Max(c * opt_elem, gran * opt_elem / STATE_ENTRY_BYTES)
    row_state = gran * opt_row / STATE_ENTRY_BYTES
    return weights, elem_state, row_state


def _formulas(sharding: str) -> dict:
    """The sympy time terms and ``memory`` of one shard of this sharding type."""
    dp = sharding == "data_parallel"
    remote = (P - 1) / bw_intra + (W - P) / bw_inter  # s/byte for one message to every peer
    Bu = B * u  # the bags of the table a rank's batch makes (`bags_per_sample`)
    samples = Bu if dp else W * Bu
    frac = n / N
    ids = samples * pf * frac
    out_rows = pooled * samples + (1 - pooled) * ids
    out_bytes = out_rows * c * ob
    row_w, row_elem, row_state = row_access_bytes()
    fwd = ids * row_w + out_bytes
    if dp:  # gradient scattered densely, then the whole table updated (streamed) after the all-reduce
        bwd = out_bytes + ids * row_w + N * c * (3 * eb + 2 * opt_elem) + 2 * N * opt_row
    else:  # fused sparse update of the touched rows: read and write weights and state
        bwd = out_bytes + 2 * ids * (row_w + row_elem + row_state)
    terms = {t: sp.Integer(0) for t in TERMS}
    if sharding == "column_wise":
        # exact RowWiseAdagrad, only where the row is split (C > c, `RowSync.needed`; column
        # shards sit on distinct ranks, so that needs W > 1): a second pass (`row_sq_sums`)
        # gathers, per id, its bag's output-grad row (a scattered access of at least `gran`
        # bytes) and writes and reads one fp32 partial, an upper bound since unique rows <= ids
        sync = opt_sync * sp.Heaviside(C - c, 0) * sp.Heaviside(W - 1, 0)
        bwd += sync * ids * (sp.Max(c * ob, gran) + 2 * STATE_ENTRY_BYTES)
        terms["row_sync"] = sync * _row_sync(ids, remote)
    terms["lookup"] = (fwd + bwd) / (bw_mem * eff)
    if not dp:
        terms["input_dist"] = Bu * (pf * frac * ID_BYTES + LENGTH_BYTES) * remote
    unpooled_rows = 2 * Bu * pf * frac * c * wb * remote  # one row per id, all-to-all both ways
    if sharding in ("table_wise", "column_wise"):
        terms["output_dist"] = 2 * Bu * c * wb * (pooled + (1 - pooled) * pf) * remote
    elif sharding == "row_wise":
        terms["output_dist"] = pooled * 2 * (W - 1) * Bu * c * wb / bw_ring + (1 - pooled) * unpooled_rows
    elif sharding == "table_row_wise":
        within_node = (P - 1) * W * Bu * c * wb / (P * bw_intra) + Bu * c * wb * remote / P
        terms["output_dist"] = pooled * 2 * within_node + (1 - pooled) * unpooled_rows
    elif dp:
        terms["allreduce"] = 2 * (W - 1) / W * N * c * eb / bw_ring
    memory = n * c * (eb + opt_elem) + n * opt_row
    memory += samples * pf * frac * ID_BYTES + samples * LENGTH_BYTES + 2 * out_bytes
    if dp:
        memory += N * c * eb  # the dense gradient the all-reduce needs
    return {**terms, "memory": memory}


def _row_sync(ids, remote):
    """Seconds a column shard spends sending its per-row sums of g**2 to the table's other
    column shards (fxrec/runtime/row_sync.py), before the sync flag.

    One fp32 per unique touched row goes to each of the k-1 = C/c - 1 other shards (the
    planner cuts a table into equal column shards, so C/c is k; k = 1: nothing). Unique
    rows are not known ahead of time: min(ids, n) bounds them from above (a column shard
    holds every row, n = N; the ids bound is the one that binds on large tables, the rows
    one keeps a small hot table from being charged thousands of times its rows).

    The peers' ranks are chosen by the partitioner after shards are costed, so each peer
    is charged the average cost of a message to one other rank, ``remote / (W-1)``:
    (P-1)/(W-1) of the other ranks are on the node, (W-P)/(W-1) off it. That is the exact
    expectation when the k-1 peers are distinct ranks drawn uniformly (column shards sit
    on distinct ranks); the all-peers-off-node worst case would overcharge placements
    that keep a table's shards on one node. Max(W-1, 1): at W = 1 ``remote`` is 0 and
    there is no peer, so the term is 0 rather than 0/0. As for the other collectives,
    only the sending side is charged to the shard.
    """
    peers = C / c - 1
    unique_rows = sp.Min(ids, n)
    return peers * unique_rows * STATE_ENTRY_BYTES * remote / sp.Max(W - 1, 1)


@functools.lru_cache(maxsize=None)
def formulas(sharding: str) -> dict:
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding type {sharding!r}; expected one of {SHARDING_TYPES}")
    return _formulas(sharding)


@functools.lru_cache(maxsize=None)
def _compiled(sharding: str):
    args = SHARD_ARGS + PLAN_ARGS
    return {k: sp.lambdify(args, e, modules="numpy") for k, e in formulas(sharding).items()}


def plan_values(topology, batch_size: int) -> dict:
    """The numbers that the per-plan symbols take."""
    return {B: batch_size, W: topology.world_size, P: topology.ranks_per_node,
            bw_mem: topology.hbm_bandwidth, bw_intra: topology.intra_node_bandwidth,
            bw_inter: topology.inter_node_bandwidth, bw_ring: topology.ring_bandwidth,
            gran: ROW_ACCESS_BYTES[topology.device]}


def optimizer_state(optimizer: str) -> tuple[int, int]:
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}; expected one of {tuple(OPTIMIZER_STATE)}")
    return OPTIMIZER_STATE[optimizer]


def optimizer_values(optimizer: str) -> dict:
    """The numbers that `OPT_ARGS` take for this optimizer."""
    oe, orow = optimizer_state(optimizer)
    return {opt_elem: oe, opt_row: orow, opt_sync: OPTIMIZER_ROW_SYNC[optimizer]}


def kind_for(optimizer, table: str) -> str:
    """Table `table`'s optimizer kind: `optimizer` is one kind for every table, or a dict of
    them by table name (`fxrec.optim.PerTable`)."""
    return optimizer if isinstance(optimizer, str) else optimizer[table]


def _opt_args(optimizer) -> list:
    """`OPT_ARGS`' values: scalars for one kind, arrays for a kind per shard."""
    if isinstance(optimizer, str):
        opt = optimizer_values(optimizer)
        return [float(opt[s]) for s in OPT_ARGS]
    per = [optimizer_values(k) for k in optimizer]
    return [np.asarray([v[s] for v in per], dtype=np.float64) for s in OPT_ARGS]


def shard_params(info, n: int, c: int, pf: float, eff: float, element_bytes: int | None = None,
                 wire: int | None = None) -> dict:
    """`GIVEN_ARGS` of an ``n`` x ``c`` shard of the table ``info`` (a TableInfo), at pooling
    factor ``pf`` and kernel efficiency ``eff``; ``element_bytes`` overrides the table's
    dtype (feasibility's "what if fp16"); ``wire``: the bytes per element of the plan's
    comm_dtype (`wire_bytes`), None for none."""
    eb = element_bytes or info.element_bytes
    ob = output_bytes(eb)
    # a wire dtype only ever narrows what is sent (fxrec.passes.apply_plan.comm_dtype): a
    # 16-bit table sends in its own dtype under comm_dtype="fp32"
    wb = min(ob, wire) if wire else ob
    return dict(N=info.num_embeddings, n=n, c=c, C=info.embedding_dim, pf=pf, u=bags_per_sample(info), eb=eb,
                ob=ob, wb=wb, pooled=0 if info.pooling == "none" else 1, eff=eff)


def bags_per_sample(info) -> float:
    """``u``: the bags of the table ``info`` one sample makes, its `uses` unless the front
    end measured (or the user gave) fewer: `TableInfo.bags_per_sample`."""
    return info.uses if info.bags_per_sample is None else info.bags_per_sample


def _given(shard: dict, what: str) -> list:
    missing = [s.name for s in GIVEN_ARGS if s.name not in shard and s.name not in DEFAULT_ARGS]
    if missing:
        raise ValueError(f"{what}: shard parameter(s) {missing} missing; expected {[s.name for s in GIVEN_ARGS]}")
    return [shard[s.name] if s.name in shard else shard[DEFAULT_ARGS[s.name]] for s in GIVEN_ARGS]


def output_bytes(element_bytes: int) -> int:
    """Outputs are computed in the weights' dtype when it is 16-bit, else fp32."""
    return 2 if element_bytes == 2 else 4


def wire_bytes(comm_dtype) -> int | None:
    """Bytes per element of a comm_dtype (a `fxrec.types.WIRE_DTYPES` name or dtype; None:
    none given, the outputs travel in their own dtype)."""
    dtype = wire_dtype(comm_dtype, "fxrec.plan")
    return None if dtype is None else dtype.itemsize


def shard_costs(sharding: str, shards: dict, topology, batch_size: int, optimizer) -> dict:
    """Evaluate every term and ``memory`` for many shards at once.

    ``shards`` maps the names of `GIVEN_ARGS` (``N n c C pf u eb ob wb pooled eff``; ``C``
    is the table's full dim; ``wb`` may be left out, for ``ob``) to equal-length arrays (or
    scalars). ``optimizer``: one kind
    for every shard, or a sequence of kinds, one per shard. Returns numpy float arrays of
    seconds per step (one per term, plus ``time``, their sum) and bytes (``memory``).
    """
    values = plan_values(topology, batch_size)
    args = [np.asarray(v, dtype=np.float64) for v in _given(shards, "shard_costs")]
    size = max(a.size for a in args)
    args += _opt_args(optimizer) + [float(values[s]) for s in PLAN_ARGS]
    out = {}
    for key, fn in _compiled(sharding).items():
        out[key] = np.broadcast_to(np.asarray(fn(*args), dtype=np.float64), (size,)).copy()
    out["time"] = sum(out[t] for t in TERMS)
    return out


def shard_expressions(sharding: str, shard: dict, topology, optimizer: str,
                      symbolic=(B, bw_mem, bw_intra, bw_inter, bw_ring)) -> dict:
    """The terms (and ``memory``) of one shard as sympy expressions with the shard's
    numbers substituted and the symbols in ``symbolic`` (by default the batch size and
    the bandwidths) left free."""
    subs = dict(zip(GIVEN_ARGS, _given(shard, "shard_expressions")))
    subs.update(optimizer_values(optimizer))
    subs.update({k: v for k, v in plan_values(topology, 1).items() if k not in symbolic})
    return {k: e.subs(subs) for k, e in formulas(sharding).items()}


def kernel_efficiency(device: str, kernel: str, overrides: dict | None = None) -> float:
    if overrides and kernel in overrides:
        return float(overrides[kernel])
    table = KERNEL_EFFICIENCY[device]
    if kernel not in table:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return table[kernel]
