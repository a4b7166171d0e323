"""``torch.compile(sharded)``, as a user speeds up the dense part of a model they sharded:
on 2 gloo ranks it trains like the eager sharded model (outputs, tables, dense parameters).

Dynamo compiles the dense layers and runs fxrec's collectives and runtime modules eagerly
between its graphs (fxrec/eager.py), also after a change of batch size makes it recompile
with dynamic shapes; the dense gradients' all-reduce hooks and the fused sparse optimizer
must still run in the compiled backward."""
from __future__ import annotations

import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from shard_models import CASES


def _worker(rank: int, world: int) -> dict:
    case = CASES["dlrm_ebc"]
    batches = case.local_batches(world, 4, seed=1)
    cons = {t.name: kind for t, kind in zip(fxrec.find_tables(case.build(), batches[0]),
                                               ("row_wise", "table_wise", "column_wise"))}
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        sm = fxrec.shard(case.build(), fxrec.Topology(world), batches[rank], constraints=cons,
                         sparse_optimizer=fxrec.optim.RowWiseAdagrad(0.1))
        model = torch.compile(sm) if compiled else sm
        opt = torch.optim.SGD(sm.parameters(), lr=0.1)
        outs = []
        for step in range(4):
            # batch sizes that change between steps and differ between ranks: dynamo recompiles
            # with dynamic shapes, and fxrec's lookups and collectives stay outside its graphs
            size = (4, 2 + 3 * rank, 3, 1 + rank)[step]
            out = model(*case.local_batches(world, size, seed=10 + step)[rank])
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(out.detach())
        runs.append((outs, sm.full_state_dict()))
    return {"eager": runs[0], "compiled": runs[1]}


def test_compiled_sharded_model_trains_like_eager():
    for rank, res in enumerate(run_workers(_worker, 2, timeout=300)):
        (e_outs, e_state), (c_outs, c_state) = res["eager"], res["compiled"]
        for e, c in zip(e_outs, c_outs):
            assert_close(c, e, rtol=1e-5, atol=1e-6)
        assert list(c_state) == list(e_state)
        for key in e_state:
            assert_close(c_state[key], e_state[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}")
