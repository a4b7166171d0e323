"""fxrec.runtime.comm on real gloo processes (2 and 4 ranks), plus the harness itself.

Every rank generates every rank's inputs from the same seeded generator, so each computes
the expected result of a collective locally. Backward is checked on the total loss
``sum_r sum(out_r * weight_r)``, whose gradient on each rank's input is known in closed form.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.testing import assert_close

from dist_harness import WorkerError, WorkerTimeout, run_workers
from fxrec.runtime import comm

DTYPES = (torch.float32, torch.float16, torch.int64)


def _rand(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def _split_matrix(w: int, seed: int) -> list[list[int]]:
    """send[i][j] rows from rank i to rank j: uneven, with empty splits and rank 1 sending nothing."""
    gen = torch.Generator().manual_seed(seed)
    send = torch.randint(0, 4, (w, w), generator=gen)
    send[0, 1] = 0
    send[1, :] = 0
    return send.tolist()


# ------------------------------------------------------------------ checks run in every rank
def _check_all_to_all(rank, w, dtype, trail, seed):
    send = _split_matrix(w, seed)
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand(gen, (sum(send[i]), *trail), dtype) for i in range(w)]
    recv = [send[i][rank] for i in range(w)]
    pieces = [xs[i].split(send[i])[rank] for i in range(w)]
    x = xs[rank].clone().requires_grad_(dtype.is_floating_point)
    out = comm.all_to_all(x, recv, send[rank])
    assert_close(out.detach(), torch.cat(pieces), rtol=0, atol=0)
    if not dtype.is_floating_point:
        return
    weights = [_rand(gen, (sum(send[i][j] for i in range(w)), *trail), dtype) for j in range(w)]
    (out * weights[rank]).sum().backward()
    # Row block sent to rank j meets weights[j]'s block that came from this rank.
    expected = torch.cat([weights[j].split([send[i][j] for i in range(w)])[rank] for j in range(w)])
    assert_close(x.grad, expected, rtol=0, atol=0)


def _check_counts(rank, w, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 3
    cs = [torch.randint(0, 100, (w * k,), generator=gen) for _ in range(w)]
    out = comm.all_to_all_counts(cs[rank])
    assert_close(out, torch.cat([cs[j][rank * k:(rank + 1) * k] for j in range(w)]))


def _check_reduce_scatter_all_gather(rank, w, dtype, m, seed):
    gen = torch.Generator().manual_seed(seed)
    tol = dict(rtol=0, atol=0) if dtype == torch.int64 else dict(rtol=1e-2, atol=1e-2)
    xs = [_rand(gen, (w * m, 2, 3), dtype) for _ in range(w)]
    x = xs[rank].clone().requires_grad_(dtype.is_floating_point)
    out = comm.reduce_scatter(x)
    total = torch.stack([t.to(torch.float64) for t in xs]).sum(0).to(dtype)
    assert_close(out.detach(), total[rank * m:(rank + 1) * m], **tol)
    ys = [_rand(gen, (m, 2, 3), dtype) for _ in range(w)]
    y = ys[rank].clone().requires_grad_(dtype.is_floating_point)
    gathered = comm.all_gather(y)
    assert_close(gathered.detach(), torch.cat(ys), rtol=0, atol=0)
    if not dtype.is_floating_point:
        return
    g_rs = [_rand(gen, (m, 2, 3), dtype) for _ in range(w)]
    g_ag = [_rand(gen, (w * m, 2, 3), dtype) for _ in range(w)]
    ((out * g_rs[rank]).sum() + (gathered * g_ag[rank]).sum()).backward()
    assert_close(x.grad, torch.cat(g_rs), rtol=0, atol=0)  # d/dx of a reduce-scatter: all-gather
    expected = torch.stack([g[rank * m:(rank + 1) * m].to(torch.float64) for g in g_ag]).sum(0).to(dtype)
    assert_close(y.grad, expected, **tol)


def _check_reduce_scatter_uneven(rank, w, seed):
    """Chunks of different sizes (one empty): rank r gets the sum of every rank's chunk r;
    backward hands each rank's chunk r the gradient rank r saw."""
    gen = torch.Generator().manual_seed(seed)
    splits = [(r * 2 + 1) % 4 for r in range(w)]  # 1, 3, 1, 3: uneven
    splits[-1] = 0
    xs = [torch.randn(sum(splits), 2, generator=gen) for _ in range(w)]
    gs = [torch.randn(splits[r], 2, generator=gen) for r in range(w)]
    x = xs[rank].clone().requires_grad_(True)
    out = comm.reduce_scatter(x, split_sizes=splits)
    start = sum(splits[:rank])
    assert_close(out.detach(), sum(xs)[start:start + splits[rank]])
    (out * gs[rank]).sum().backward()
    assert_close(x.grad, torch.cat(gs), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"reduce_scatter: split_sizes \[.*\] sum to .* but x has"):
        comm.reduce_scatter(torch.zeros(sum(splits) + 1, 2), split_sizes=splits)
    with pytest.raises(ValueError, match="reduce_scatter: split_sizes has 1 entries"):
        comm.reduce_scatter(torch.zeros(4), split_sizes=[4])


def _check_all_gather_uneven(rank, w, seed):
    """Blocks of different lengths (one empty), as a last short batch gives: the concatenation
    in rank order; backward hands each rank the sum of every rank's gradient for its block.
    Other dims that differ raise on every rank, naming the shapes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(r * 3 + 2) % 5 for r in range(w)]  # 2, 0, 3, 1
    xs = [torch.randn(sizes[r], 3, generator=gen) for r in range(w)]
    gs = [torch.randn(sum(sizes), 3, generator=gen) for _ in range(w)]
    x = xs[rank].clone().requires_grad_(True)
    out = comm.all_gather(x)
    assert_close(out.detach(), torch.cat(xs), rtol=0, atol=0)
    (out * gs[rank]).sum().backward()
    start = sum(sizes[:rank])
    assert_close(x.grad, sum(gs)[start:start + sizes[rank]])
    with pytest.raises(ValueError, match=r"all_gather: every rank's tensor must have the same shape past dim 0; "
                                         r"the ranks' shapes are \[\(2, 3\), \(2, 4\)"):
        comm.all_gather(torch.zeros(2, 3 + rank))


def _check_all_reduce(rank, w, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, generator=gen) for _ in range(w)]
    gs = [torch.randn(4, 3, generator=gen) for _ in range(w)]
    x = xs[rank].clone().requires_grad_(True)
    before = x.detach().clone()
    s, a = comm.all_reduce(x), comm.all_reduce(x, op="avg")
    assert_close(x.detach(), before)  # not modified in place
    assert_close(s.detach(), sum(xs))
    assert_close(a.detach(), sum(xs) / w)
    ((s + a) * gs[rank]).sum().backward()
    assert_close(x.grad, sum(gs) * (1 + 1 / w))
    ints = torch.arange(5) * (rank + 1)
    assert_close(comm.all_reduce(ints), torch.arange(5) * sum(range(1, w + 1)))


def _check_meta_and_errors(rank, w):
    out = comm.all_to_all(torch.empty(3 * w, 4, device="meta"), [2] * w, [3] * w)
    assert out.is_meta and out.shape == (2 * w, 4)
    assert comm.reduce_scatter(torch.empty(2 * w, 5, device="meta")).shape == (2, 5)
    assert comm.all_gather(torch.empty(2, 5, device="meta")).shape == (2 * w, 5)
    with pytest.raises(ValueError, match="sum to 5 but x has 4 rows"):
        comm.all_to_all(torch.zeros(4), [1] * w, [5] + [0] * (w - 1))
    with pytest.raises(ValueError, match="expected one per rank"):
        comm.all_to_all(torch.zeros(4), [4], [4])
    with pytest.raises(ValueError, match="not a multiple of the world size"):
        comm.reduce_scatter(torch.zeros(w + 1, 2))


def _comm_worker(rank, w):
    seed = 0
    for dtype in DTYPES:
        for trail in ((), (3,), (2, 2)):
            seed += 1
            _check_all_to_all(rank, w, dtype, trail, seed)
        for m in (0, 1, 3):
            seed += 1
            _check_reduce_scatter_all_gather(rank, w, dtype, m, seed)
    _check_counts(rank, w, 100)
    _check_all_reduce(rank, w, 101)
    _check_reduce_scatter_uneven(rank, w, 102)
    _check_all_gather_uneven(rank, w, 103)
    _check_meta_and_errors(rank, w)
    # Zero-size rows (trailing dim 0) and a fully empty exchange.
    assert comm.all_to_all(torch.zeros(w, 0), [1] * w, [1] * w).shape == (w, 0)
    assert comm.all_to_all(torch.zeros(0, 3), [0] * w, [0] * w).shape == (0, 3)
    # One spawn per world size (start-up dominates): world 4 also checks the two-node groups.
    return _check_groups(rank, w) if w == 4 else rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_forward_backward(world_size):
    results = run_workers(_comm_worker, world_size)
    if world_size == 4:  # ProcessGroups(Topology(4, ranks_per_node=2)), see _check_groups
        assert "intra_node=[2, 3], cross_node=[1, 3]" in results[3]
    else:
        assert results == [0, 1]


# ------------------------------------------------------------------ process groups
def _check_groups(rank, w):
    from fxrec.topology import Topology
    pg = comm.ProcessGroups(Topology(w, ranks_per_node=2))
    node, local = divmod(rank, 2)
    assert (pg.node, pg.local_rank, pg.num_nodes) == (node, local, 2)
    assert pg.intra_node_ranks == [2 * node, 2 * node + 1]
    assert pg.cross_node_ranks == [local, local + 2]
    assert comm.world_size(pg.intra_node) == 2 and comm.world_size(pg.cross_node) == 2
    value = torch.tensor([10.0 ** rank])
    assert_close(comm.all_reduce(value, group=pg.intra_node), torch.tensor([sum(10.0 ** r for r in pg.intra_node_ranks)]))
    assert_close(comm.all_reduce(value, group=pg.cross_node), torch.tensor([sum(10.0 ** r for r in pg.cross_node_ranks)]))
    assert_close(comm.all_reduce(value, group=pg.world), torch.tensor([1111.0]))
    # Collectives inside a node index peers by their rank in the group.
    sent = torch.tensor([rank * 10.0, rank * 10.0 + 1])
    got = comm.all_to_all(sent, [1, 1], [1, 1], group=pg.intra_node)
    assert_close(got, torch.tensor([20.0 * node + local, 20.0 * node + 10 + local]))
    rs = comm.reduce_scatter(torch.tensor([1.0, 2.0]) * (rank + 1), group=pg.intra_node)
    assert_close(rs, torch.tensor([1.0 + local]) * sum(r + 1 for r in pg.intra_node_ranks))
    # Graph code names groups by string (a ProcessGroup cannot be a constant of generated code).
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(comm.all_reduce, (x,), {"group": "intra_node"})
    node.meta["fxrec_comm"] = "all_reduce"
    graph.output(graph.call_function(comm.all_gather, (node,), {"group": "cross_node"}))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    node_sums = [sum(10.0 ** r for r in range(2 * k, 2 * k + 2)) for k in range(2)]
    assert_close(gm(value), torch.tensor(node_sums))
    with pytest.raises(ValueError, match="unknown process group name 'rack'"):
        comm.all_reduce(value, group="rack")
    return repr(pg)


def test_process_groups_rejects_bad_topology_single_process():
    with pytest.raises(ValueError, match="world size 1 is not a multiple of ranks_per_node 2"):
        comm.ProcessGroups(ranks_per_node=2)
    pg = comm.ProcessGroups()
    assert (pg.intra_node, pg.cross_node, pg.intra_node_ranks) == (None, None, [0])


# ------------------------------------------------------------------ world size 1, no process group
def test_single_process_identity_and_errors():
    x = torch.randn(5, 3, requires_grad=True)
    assert comm.all_to_all(x, [5], [5]) is x
    assert comm.reduce_scatter(x) is x and comm.all_gather(x) is x and comm.all_reduce(x, op="avg") is x
    assert_close(comm.all_to_all_counts(torch.tensor([3, 4])), torch.tensor([3, 4]))
    assert comm.all_gather(x, group="intra_node") is x  # names need no registry without a process group
    with pytest.raises(ValueError, match=r"output_split_sizes \[4\] must equal input_split_sizes \[5\]"):
        comm.all_to_all(x, [4], [5])
    with pytest.raises(ValueError, match="negative size"):
        comm.all_to_all(x, [-1], [5])
    with pytest.raises(ValueError, match="op must be 'sum' or 'avg', got 'max'"):
        comm.all_reduce(x, op="max")
    with pytest.raises(ValueError, match="needs a floating-point tensor"):
        comm.all_reduce(torch.arange(3), op="avg")
    with pytest.raises(ValueError, match="at least one dimension"):
        comm.all_gather(torch.tensor(1.0))


def test_collectives_trace_as_graph_nodes():
    def f(x):
        return comm.all_to_all(x, [x.shape[0]], [x.shape[0]]) + comm.all_reduce(x)

    gm = torch.fx.symbolic_trace(f)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert comm.all_to_all in targets and comm.all_reduce in targets


# ------------------------------------------------------------------ agree: one rank's error, raised on every rank
class _ThreeArgumentError(RuntimeError):
    """Not rebuildable from a message alone (as fxrec's PassError): travels as its base."""

    def __init__(self, what, where, why):
        super().__init__(f"{what} at {where}: {why}")


def _agree_outcome(error, value=None, **kwargs):
    """comm.agree's result, or what it raised: (type, message, type of its __cause__)."""
    try:
        return comm.agree(error, value, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type and message are what the test checks
        return type(e).__name__, str(e), type(e.__cause__).__name__


def _agree_worker(rank, w):
    mine = ValueError(f"bad id 7 on rank {rank}")
    return {
        "none_fails": _agree_outcome(None, f"rank {rank}'s value"),
        "rank_1_fails": _agree_outcome(mine if rank == 1 else None, rank),
        "both_fail": _agree_outcome(KeyError(f"no key on rank {rank}")),
        "not_rebuildable": _agree_outcome(_ThreeArgumentError("t", "x", "y") if rank == 1 else None),
        "this_process_alone": _agree_outcome(mine, collective=False),
        "after": _agree_outcome(None, rank, group="world"),  # every rank left each exchange in step
    }


@pytest.fixture(scope="module")
def agreed():
    return run_workers(_agree_worker, 2)


def test_agree_raises_the_first_failing_ranks_error_on_every_rank(agreed):
    # chained from the original error on the rank that had it
    assert [r["rank_1_fails"] for r in agreed] == [("ValueError", "rank 1: bad id 7 on rank 1", "NoneType"),
                                                   ("ValueError", "rank 1: bad id 7 on rank 1", "ValueError")]
    assert [r["both_fail"][:2] for r in agreed] == [("KeyError", "'rank 0: no key on rank 0'")] * 2
    assert [r["not_rebuildable"][:2] for r in agreed] == [("RuntimeError", "rank 1: t at x: y")] * 2
    assert [r["this_process_alone"] for r in agreed] == [("ValueError", f"bad id 7 on rank {r}", "NoneType")
                                                         for r in range(2)]


def test_agree_returns_every_ranks_value_when_no_rank_fails(agreed):
    for r in agreed:
        assert r["none_fails"] == ["rank 0's value", "rank 1's value"]
        assert r["after"] == [0, 1]


def test_agree_in_one_process_raises_the_error_itself():
    error = _ThreeArgumentError("t", "x", "y")
    with pytest.raises(_ThreeArgumentError) as info:
        comm.agree(error, "value")
    assert info.value is error
    assert comm.agree(None, "value") == ["value"]


# ------------------------------------------------------------------ the harness itself
def _raising_worker(rank, w):
    if rank == 1:
        raise ValueError(f"table 'emb_l.0': bad id 7 on rank {rank}")
    torch.distributed.barrier()  # left waiting for rank 1: the harness must kill it
    return rank


def _hanging_worker(rank, w):
    time.sleep(600)


def test_harness_reraises_child_exception():
    with pytest.raises(ValueError, match="table 'emb_l.0': bad id 7 on rank 1") as info:
        run_workers(_raising_worker, 2, timeout=60)
    assert isinstance(info.value.__cause__, WorkerError)
    assert "_raising_worker" in info.value.__cause__.child_traceback


def test_harness_kills_hung_children():
    start = time.monotonic()
    with pytest.raises(WorkerTimeout, match=r"ranks \[0, 1\] did not finish within 4 s"):
        run_workers(_hanging_worker, 2, timeout=4)
    assert time.monotonic() - start < 30


def test_groups_for_this_thread_replace_names_in_this_thread_only():
    """The pipeline's background thread sends its collectives to groups of its own: names
    (and None for WORLD) resolve to them inside the block, in that thread only."""
    import threading

    mine = object()
    seen = {}
    with comm.groups_for_this_thread({"world": mine, "fxrec_test_other": mine}):
        seen["none"], seen["named"] = comm.resolve_group(None), comm.resolve_group("fxrec_test_other")

        def elsewhere():
            seen["thread"] = comm.resolve_group(None)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
    assert seen == {"none": mine, "named": mine, "thread": None}
    assert comm.resolve_group(None) is None  # the block restored this thread's view
