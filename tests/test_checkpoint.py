"""fxrec.checkpoint: a model sharded one way saves, and loads sharded another way (another plan,
another world size, the plain model), and training resumes exactly where it stopped.

Each job trains 2 steps on W=2 gloo ranks, saves (tables, sparse optimizer state, the dense
torch optimizer's state), and trains a 3rd step: the uninterrupted run. A fresh model (other
seed), sharded by the job's load plan on W=2 or W=4 ranks, loads the checkpoint and trains the
same 3rd step. By DESIGN.md's equivalence the two 3rd steps see the same global batch, so the
loaded tables equal the saved ones exactly and the resumed run's tables and dense parameters
equal the uninterrupted run's (fp32, 1e-5). Two jobs save in the background and train their
3rd step while the files are written. The 2-rank load run also checks the
``dcp.save(sharded.state_dict())`` / ``load_state_dict`` idioms and errors that must reach
every rank.
"""
from __future__ import annotations

import copy
import os
import re
import traceback

import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES
from test_shard_equivalence import MIXED

GLOBAL_B = 4  # samples per step, split over the ranks
LR = 0.05
RANKS_PER_NODE = {2: 1, 4: 2}
SPARSE = {"sgd": lambda: SGD(LR), "rowwise_adagrad": lambda: RowWiseAdagrad(LR, eps=1e-8),
          "rowwise_adagrad_per_shard": lambda: RowWiseAdagrad(LR, eps=1e-8, exact_column_wise=False),
          "adam": lambda: Adam(LR, betas=(0.9, 0.99), eps=1e-4), "adagrad": lambda: Adagrad(LR, eps=1e-8)}

# (job, model, sparse optimizer, saved as (W=2), loaded as (world, sharding), loaded on meta)
JOBS = [
    ("rw_to_cw", "dlrm_ebc", "rowwise_adagrad", "row_wise", (4, "column_wise"), False),
    ("mixed_to_tw", "dlrm_lists", "adam", "mixed", (4, "table_wise"), False),
    ("cw_to_dp", "two_tower", "rowwise_adagrad", "column_wise", (4, "data_parallel"), True),
    ("twrw_to_rw", "sequence_ec", "sgd", "table_row_wise", (4, "row_wise"), True),
    ("dp_to_twrw", "dlrm_ebc", "adam", "data_parallel", (4, "table_row_wise"), False),
    ("cw_per_shard", "dlrm_ebc", "rowwise_adagrad_per_shard", "column_wise", (2, "column_wise"), False),
    ("odd_rw_to_tw", "odd_tables", "rowwise_adagrad", "row_wise", (4, "table_wise"), False),
    ("cw_to_rw_adagrad", "dlrm_ebc", "adagrad", "column_wise", (4, "row_wise"), False),
]


BACKGROUND = {"rw_to_cw", "mixed_to_tw"}


def _local(case, step: int, world: int, rank: int) -> tuple:
    """This rank's part of step `step`'s global batch (the same samples for any world size)."""
    parts = case.local_batches(GLOBAL_B, 1, seed=100 + step)
    k = GLOBAL_B // world
    return case.concat(parts[rank * k:(rank + 1) * k])


def _build(name: str, optimizer: str, sharding: str, world: int, rank: int, seed: int, meta: bool = False):
    case = CASES[name]
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = case.build()
    else:
        model = case.build()
    example = _local(case, 0, world, rank)
    tables = fxrec.find_tables(case.build(), example)
    cons = MIXED[name] if sharding == "mixed" else {t.name: sharding for t in tables}
    sm = shard(model, Topology(world, ranks_per_node=RANKS_PER_NODE[world]), example, constraints=cons,
               sparse_optimizer=SPARSE[optimizer](), seed=seed)
    params = list(sm.parameters())  # none in a tables-only model: then no dense optimizer
    return sm, torch.optim.Adam(params, lr=0.01) if params else None


def _step(sm, opt, name: str, step: int, world: int, rank: int) -> None:
    sm(*_local(CASES[name], step, world, rank)).square().mean().backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()


def _save_worker(rank: int, world: int, root: str) -> dict:
    out = {}
    for job, name, optimizer, saved_as, _, _ in JOBS:
        try:
            sm, opt = _build(name, optimizer, saved_as, world, rank, seed=0)
            for step in (0, 1):
                _step(sm, opt, name, step, world, rank)
            # some jobs save in the background: the next step then runs while the files are
            # written, and the checkpoint must still hold the values of the moment of save
            background = job in BACKGROUND
            done = fxrec.checkpoint.save(sm, os.path.join(root, job), optimizer=opt, background=background)
            saved = sm.full_state_dict()
            _step(sm, opt, name, 2, world, rank)
            if background:
                done.result()
            out[job] = (saved, sm.full_state_dict())
        except Exception:  # noqa: BLE001 - reported per job; the other ranks fail their collective too
            out[job] = traceback.format_exc(limit=8)
            break
    return out


def _load_worker(rank: int, world: int, root: str, jobs: list) -> dict:
    out = {}
    try:
        out.update(_mismatches(rank, world, root))
        if world == 2:
            out.update(_idioms(rank, world, root))
    except Exception:  # noqa: BLE001
        out["mismatches"] = traceback.format_exc(limit=8)
        return out
    for job, name, optimizer, _, (_, sharding), meta in jobs:
        try:
            sm, opt = _build(name, optimizer, sharding, world, rank, seed=7, meta=meta)
            fxrec.checkpoint.load(sm, os.path.join(root, job), optimizer=opt)
            loaded = sm.full_state_dict()
            _step(sm, opt, name, 2, world, rank)
            out[job] = (loaded, sm.full_state_dict())
        except Exception:  # noqa: BLE001
            out[job] = traceback.format_exc(limit=8)
            break
    return out


def _raised(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "nothing raised"


def _mismatches(rank: int, world: int, root: str) -> dict:
    """Checkpoints that do not fit the model: every rank raises, also one that holds no piece of
    the offending table (it would otherwise wait in DCP's collectives for the others)."""
    out = {}
    if world == 4:
        # the plain model's checkpoint has no sparse optimizer state; table_wise puts dlrm_ebc's
        # 3 tables on 3 of the 4 ranks
        sm, _ = _build("dlrm_ebc", "rowwise_adagrad", "table_wise", world, rank, seed=3)
        out["no_sparse_state"] = _raised(lambda: fxrec.checkpoint.load(sm, os.path.join(root, "plain")))
        # not strict: the weights load, the absent state is left (each rank skips its own keys)
        fxrec.checkpoint.load(sm, os.path.join(root, "plain"), strict=False)
        out["plain_to_tw"] = sm.full_state_dict()
    if world == 2:
        # one accumulator per column shard does not load into the exact (one per row) layout
        sm, _ = _build("dlrm_ebc", "rowwise_adagrad", "column_wise", world, rank, seed=3)
        out["per_shard_to_exact"] = _raised(lambda: fxrec.checkpoint.load(sm, os.path.join(root, "cw_per_shard")))
    return out


def _idioms(rank: int, world: int, root: str) -> dict:
    """`ShardedModel.state_dict` / `load_state_dict` as torch and TorchRec users write them."""
    import torch.distributed.checkpoint as dcp

    out = {}
    rw, _ = _build("dlrm_ebc", "sgd", "row_wise", world, rank, seed=0)
    dcp.save(rw.state_dict(), checkpoint_id=os.path.join(root, "idiom"))
    tw, _ = _build("dlrm_ebc", "sgd", "table_wise", world, rank, seed=3)
    sd = tw.state_dict()
    dcp.load(sd, checkpoint_id=os.path.join(root, "idiom"))  # in place, resharded
    tw.load_state_dict(sd)
    out["dcp_idiom"] = (rw.full_state_dict(), tw.full_state_dict())
    # the other way: table_wise holds each table on one rank, a shard-less ShardedTensor elsewhere
    out["keys"] = sorted(tw.state_dict())
    tw2, _ = _build("dlrm_ebc", "sgd", "table_wise", world, rank, seed=7)
    dcp.save(tw2.state_dict(), checkpoint_id=os.path.join(root, "idiom_tw"))
    sd = rw.state_dict()
    dcp.load(sd, checkpoint_id=os.path.join(root, "idiom_tw"))
    rw.load_state_dict(sd)
    out["dcp_idiom_tw"] = (tw2.full_state_dict(), rw.full_state_dict())
    torch.manual_seed(5)
    plain = CASES["dlrm_ebc"].build()
    tw.load_state_dict(plain.state_dict())  # the unsharded model's
    out["from_plain"] = (plain.state_dict(), tw.full_state_dict())
    out["other_layout"] = _raised(lambda: tw.load_state_dict(rw.state_dict()))
    partial = dict(plain.state_dict())
    del partial["top.0.bias"]
    try:
        tw.load_state_dict(partial)
        out["missing"] = "nothing raised"
    except RuntimeError as e:
        out["missing"] = str(e)
    out["lenient"] = tw.load_state_dict(partial, strict=False).missing_keys
    parent = torch.nn.Sequential(tw)
    out["parent_keys"] = sorted(parent.state_dict())[:2]
    try:
        parent.load_state_dict(parent.state_dict())
        out["through_parent"] = "nothing raised"
    except RuntimeError as e:
        out["through_parent"] = str(e)
    return out


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The save run on 2 ranks, then each load world's run: rank 0's results per job."""
    if not _RUNS:
        root = str(tmp_path_factory.mktemp("ckpt"))
        _RUNS["root"] = root
        _RUNS["saved"] = run_workers(_save_worker, 2, root, timeout=600)[0]
        torch.manual_seed(5)
        plain = CASES["dlrm_ebc"].build()
        fxrec.checkpoint.save(plain, os.path.join(root, "plain"))  # one process, no process group
        _RUNS["plain"] = plain.state_dict()
        for world in (2, 4):
            jobs = [j for j in JOBS if j[4][0] == world]
            per_rank = run_workers(_load_worker, world, root, jobs, timeout=600)
            _RUNS[world] = per_rank[0]
            _RUNS[world, "errors"] = [r.get("no_sparse_state", r.get("per_shard_to_exact")) for r in per_rank]
            _RUNS[world, "all"] = per_rank
    return _RUNS


def _result(runs, job: str, where) -> tuple:
    res = where.get(job)
    assert res is not None, f"{job} did not run (an earlier job failed)"
    assert not isinstance(res, str), res
    return res


@pytest.mark.parametrize("job", [j[0] for j in JOBS])
def test_resume_under_another_plan_equals_uninterrupted(runs, job):
    spec = next(j for j in JOBS if j[0] == job)
    saved, uninterrupted = _result(runs, job, runs["saved"])
    loaded, resumed = _result(runs, job, runs[spec[4][0]])
    assert list(loaded) == list(saved)
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), f"{job}: {key} differs after load"
    for key in uninterrupted:
        assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{job} {key}: {m}")


def test_a_plain_models_checkpoint_loads_sharded(runs):
    """Saved by the unsharded model in one process; loaded table_wise on 4 ranks."""
    got = _result(runs, "plain_to_tw", runs[4])
    want = runs["plain"]
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("world, match", [
    (4, r"rank \d: .*'sparse_optimizer\.sparse_arch\.ebc\.embedding_bags\.t_\w+\.weight\.momentum' "
        r"\(table 'sparse_arch\.ebc\.embedding_bags\.t_\w+'\).*sparse_optimizer=False"),
    (2, r"rank 0: .*'sparse_optimizer\.sparse_arch\.ebc\.embedding_bags\.t_user\.weight\.momentum' "
        r"\(table 'sparse_arch\.ebc\.embedding_bags\.t_user'\) is \(\d+, 2\) in .* and \(\d+,\) in this model"),
])
def test_a_checkpoint_that_does_not_fit_raises_on_every_rank(runs, world, match):
    errors = runs[world, "errors"]
    assert len(errors) == world
    for rank, message in enumerate(errors):
        assert re.search(match, message), f"rank {rank}: {message}"
    assert len(set(errors)) == 1  # the first failing rank's message, everywhere


def test_a_sharded_checkpoint_loads_into_the_plain_model(runs):
    """Saved row_wise on 2 ranks; the unsharded model (one process, no process group) reads
    whole tables."""
    saved, _ = _result(runs, "rw_to_cw", runs["saved"])
    torch.manual_seed(9)
    plain = CASES["dlrm_ebc"].build()
    fxrec.checkpoint.load(plain, os.path.join(runs["root"], "rw_to_cw"))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved[key]), key


def _error(fn) -> tuple:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are what the test checks
        return type(e).__name__, str(e)
    return "nothing raised", ""


class _Wrapped(torch.nn.Module):
    def __init__(self, sharded):
        super().__init__()
        self.sm = sharded
        self.head = torch.nn.Linear(1, 1)


def _refused_worker(rank: int, world: int, root: str) -> dict:
    """Saves that cannot start: rank 0 finds out clearing the old metadata, and every rank must
    raise its error rather than wait for it; a save after them still works. And a module that
    wraps a ShardedModel, refused on every rank rather than written locally by each."""
    sm, opt = _build("dlrm_ebc", "sgd", "row_wise", world, rank, seed=0)
    out = {
        "wrapped_save": _error(lambda: fxrec.checkpoint.save(_Wrapped(sm), os.path.join(root, "wrapped"))),
        "wrapped_load": _error(lambda: fxrec.checkpoint.load(_Wrapped(sm), os.path.join(root, "good"))),
        "wrapped_written": os.path.exists(os.path.join(root, "wrapped")),
        "file": _error(lambda: fxrec.checkpoint.save(sm, os.path.join(root, "file"), optimizer=opt)),
        "file_background": _error(lambda: fxrec.checkpoint.save(sm, os.path.join(root, "file"), background=True)),
        "metadata_dir": _error(lambda: fxrec.checkpoint.save(sm, os.path.join(root, "metadata_dir"))),
    }
    remove = os.remove

    def denied(path, *args, **kwargs):
        if path.endswith(".metadata"):
            raise PermissionError(13, "Permission denied", path)
        return remove(path, *args, **kwargs)

    os.remove = denied  # a directory this user may not write in (the tests may run as root)
    try:
        out["denied"] = _error(lambda: fxrec.checkpoint.save(sm, os.path.join(root, "good")))
    finally:
        os.remove = remove
    fxrec.checkpoint.save(sm, os.path.join(root, "good"))
    out["then"] = "saved"
    return out


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    (root / "file").write_text("not a checkpoint")
    (root / "metadata_dir" / ".metadata").mkdir(parents=True)
    fxrec.checkpoint.save(_Tables(10), root / "good")  # so that there is a .metadata to remove
    return run_workers(_refused_worker, 2, str(root), timeout=120)


@pytest.mark.parametrize("case, kind, match", [
    ("file", "NotADirectoryError", r"'.*file' is a file, not a checkpoint directory"),
    ("file_background", "NotADirectoryError", r"'.*file' is a file, not a checkpoint directory"),
    ("metadata_dir", "IsADirectoryError", r"'.*metadata_dir/\.metadata' is a directory"),
    ("denied", "PermissionError", r"cannot write a checkpoint at '.*good': PermissionError"),
])
def test_a_save_that_cannot_start_raises_on_every_rank(refused, case, kind, match):
    errors = [res[case] for res in refused]
    assert errors[0] == errors[1]  # rank 0's error, also where rank 1 had nothing to do
    assert errors[0][0] == kind and re.search(r"fxrec\.checkpoint\.save: " + match, errors[0][1]), errors[0]
    assert all(res["then"] == "saved" for res in refused)


@pytest.mark.parametrize("case", ["wrapped_save", "wrapped_load"])
def test_a_module_wrapping_a_sharded_model_is_refused_on_every_rank(refused, case):
    errors = [res[case] for res in refused]
    assert not any(res["wrapped_written"] for res in refused)
    assert errors[0] == errors[1]
    assert errors[0][0] == "ValueError" and re.search(r"the _Wrapped holds a ShardedModel at 'sm'.*model\.sm itself",
                                                      errors[0][1]), errors[0]


# ------------------------------------------------------------------ one process
def test_world_one_sharded_round_trip_with_dense_optimizer(tmp_path):
    """A ShardedModel of one rank (no process group): save after 2 steps, load into a fresh one,
    and the 3rd step matches."""
    runs_ = []
    for seed, load in ((0, False), (4, True)):
        sm, opt = _world_one(seed)
        if load:
            fxrec.checkpoint.load(sm, tmp_path / "w1", optimizer=opt)
        else:
            for step in (0, 1):
                _step(sm, opt, "dlrm_lists", step, 1, 0)
            fxrec.checkpoint.save(sm, tmp_path / "w1", optimizer=opt)
        _step(sm, opt, "dlrm_lists", 2, 1, 0)
        runs_.append(sm.full_state_dict())
    for key in runs_[0]:
        assert_close(runs_[1][key], runs_[0][key], rtol=1e-5, atol=1e-6)


def _world_one(seed: int):
    case = CASES["dlrm_lists"]
    torch.manual_seed(seed)
    sm = shard(case.build(), Topology(1), _local(case, 0, 1, 0), sparse_optimizer=SPARSE["adam"](), seed=seed)
    return sm, torch.optim.Adam(sm.parameters(), lr=0.01)


def test_no_checkpoint_at_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at '.*nowhere'"):
        fxrec.checkpoint.load(CASES["dlrm_ebc"].build(), tmp_path / "nowhere")


class _Tables(torch.nn.Module):
    def __init__(self, rows: int, device=None):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(rows, 4, mode="sum", device=device)


def test_a_table_of_another_size_names_the_key_and_both_shapes(tmp_path):
    fxrec.checkpoint.save(_Tables(10), tmp_path / "t")
    with pytest.raises(ValueError, match=r"'emb\.weight' is \(10, 4\) in .* and \(12, 4\) in this model"):
        fxrec.checkpoint.load(_Tables(12), tmp_path / "t")
    with pytest.raises(ValueError, match=r"has no 'user_tower\.user\.weight'"):
        fxrec.checkpoint.load(CASES["two_tower"].build(), tmp_path / "t")


def test_a_dense_layer_of_another_shape_is_not_called_a_table(tmp_path):
    """World 1: a dense weight of another shape is named as the key alone; a table's key also
    names its table."""
    plain = CASES["dlrm_lists"].build()
    plain.bot_l[0] = torch.nn.Linear(4, 6)
    fxrec.checkpoint.save(plain, tmp_path / "t")
    sm, _ = _world_one(0)
    with pytest.raises(ValueError, match=r"'bot_l\.0\.weight' is \(6, 4\) in .* and \(8, 4\) in this model") as e:
        fxrec.checkpoint.load(sm, tmp_path / "t")
    assert "table" not in str(e.value)
    plain = CASES["dlrm_lists"].build()
    plain.emb_l[0] = torch.nn.EmbeddingBag(13, 8, mode="sum")
    fxrec.checkpoint.save(plain, tmp_path / "u")
    with pytest.raises(ValueError, match=r"'emb_l\.0\.weight' \(table 'emb_l\.0'\) is \(13, 8\) in"):
        fxrec.checkpoint.load(sm, tmp_path / "u", sparse_optimizer=False)


def test_a_plain_module_on_meta_is_refused(tmp_path):
    fxrec.checkpoint.save(_Tables(10), tmp_path / "t")
    with pytest.raises(ValueError, match=r"'emb\.weight' is on the meta device"):
        fxrec.checkpoint.load(_Tables(10, device="meta"), tmp_path / "t")


def test_loading_a_dense_optimizer_that_was_not_saved(tmp_path):
    model = _Tables(10)
    fxrec.checkpoint.save(model, tmp_path / "t")
    with pytest.raises(ValueError, match=r"saved without a dense optimizer's state"):
        fxrec.checkpoint.load(model, tmp_path / "t", optimizer=torch.optim.Adam(model.parameters()))


def _adam_checkpoint(path, groups: bool = False):
    torch.manual_seed(0)
    model = _WithExtra()
    params = [{"params": model.main.parameters(), "lr": 0.1}, {"params": model.extra.parameters(), "lr": 0.2}] \
        if groups else model.parameters()
    opt = torch.optim.Adam(params, lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    fxrec.checkpoint.save(model, path, optimizer=opt)
    return model


@pytest.mark.parametrize("make, key", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "dense_optimizer.param_groups.0.dampening"),
    (lambda ps: torch.optim.Adagrad(ps, lr=0.1), "dense_optimizer.param_groups.0.initial_accumulator_value"),
])
def test_a_dense_optimizer_of_another_type_is_named_not_called_damage(tmp_path, make, key):
    """Saved with Adam, loaded with another type: refused before anything is read, naming a key
    the checkpoint lacks; not strict, the weights load and the optimizer is left as it was."""
    saved = _adam_checkpoint(tmp_path / "t")
    fresh = _WithExtra()
    opt = make(fresh.parameters())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"dense optimizer state in '.*t' was saved by another optimizer type "
                                         rf"or param-group layout \(it has no '{key}'.*without optimizer="):
        fxrec.checkpoint.load(fresh, tmp_path / "t", optimizer=opt)
    with pytest.warns(UserWarning, match=r"another optimizer type .* left as it was"):
        fxrec.checkpoint.load(fresh, tmp_path / "t", optimizer=opt, strict=False)
    assert torch.equal(fresh.main.weight, saved.main.weight)
    assert str(opt.state_dict()) == str(before)


def test_a_dense_optimizer_with_other_param_groups_is_refused(tmp_path):
    _adam_checkpoint(tmp_path / "two", groups=True)
    fresh = _WithExtra()
    with pytest.raises(ValueError, match=r"param-group layout \(2 param group\(s\) there, 1 in this optimizer\)"):
        fxrec.checkpoint.load(fresh, tmp_path / "two", optimizer=torch.optim.Adam(fresh.parameters(), lr=0.01))
    _adam_checkpoint(tmp_path / "one")
    opt = torch.optim.Adam([{"params": fresh.main.parameters()}, {"params": fresh.extra.parameters()}], lr=0.01)
    with pytest.raises(ValueError, match=r"\(1 param group\(s\) there, 2 in this optimizer\)"):
        fxrec.checkpoint.load(fresh, tmp_path / "one", optimizer=opt)


def test_a_scheduler_saved_with_the_optimizer_does_not_make_it_another_type(tmp_path):
    """An LR scheduler adds `initial_lr` to the groups the optimizer saves, and a resume loads
    the optimizer before it builds the scheduler again: the extra setting is not another type."""
    model = _WithExtra()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    fxrec.checkpoint.save(model, tmp_path / "s", optimizer=opt)
    fresh = _WithExtra()
    again = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fxrec.checkpoint.load(fresh, tmp_path / "s", optimizer=again)
    for key, value in opt.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(again.state_dict()["state"][key][name], tensor), name


def test_a_write_that_fails_midway_is_an_os_error_naming_the_path(tmp_path, monkeypatch):
    """DCP wraps a failing write (a full disk) in its CheckpointException, a BaseException that
    `except Exception` misses: save raises an OSError naming the path, sync or in the background."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(OSError, match=r"writing '.*full' failed \(rank 0: OSError: .*No space left"):
        fxrec.checkpoint.save(_Tables(10), tmp_path / "full")
    fxrec.checkpoint.save(_Tables(10), tmp_path / "later", background=True)
    with pytest.raises(OSError, match=r"writing '.*later' failed"):  # at the next save, which waits for it
        fxrec.checkpoint.save(_Tables(10), tmp_path / "next")


def test_extra_values_come_back(tmp_path):
    model = _Tables(10)
    fxrec.checkpoint.save(model, tmp_path / "t", extra={"step": 41, "seen": torch.arange(3), "name": "run-a"})
    got = fxrec.checkpoint.load(_Tables(10), tmp_path / "t")
    assert got["step"] == 41 and got["name"] == "run-a" and torch.equal(got["seen"], torch.arange(3))
    fxrec.checkpoint.save(model, tmp_path / "u")
    assert fxrec.checkpoint.load(model, tmp_path / "u") == {}
    with pytest.raises(ValueError, match=r"extra must map str keys .* got 'loader': dict"):
        fxrec.checkpoint.save(model, tmp_path / "v", extra={"loader": {"pos": 3}})
    with pytest.raises(ValueError, match=r"nor lists holding tensors.* got 'rng': list"):
        fxrec.checkpoint.save(model, tmp_path / "v", extra={"rng": [torch.get_rng_state()]})


class _WithExtra(torch.nn.Module):
    def __init__(self, name: str = "extra"):
        super().__init__()
        self.main = torch.nn.Linear(3, 2)
        self.add_module(name, torch.nn.Linear(2, 2))

    def forward(self, x):
        return self.extra(self.main(x))


def test_a_submodule_named_extra_is_the_models(tmp_path):
    """The caller's extras live apart from the model's keys; a submodule named like the
    checkpoint's own entries is refused rather than mistaken for them."""
    torch.manual_seed(0)
    saved = _WithExtra()
    fxrec.checkpoint.save(saved, tmp_path / "t", extra={"weight": torch.zeros(2, 2), "step": 3})
    torch.manual_seed(1)
    fresh = _WithExtra()
    got = fxrec.checkpoint.load(fresh, tmp_path / "t")
    assert torch.equal(fresh.extra.weight, saved.extra.weight) and torch.equal(got["weight"], torch.zeros(2, 2))
    assert sorted(got) == ["step", "weight"] == sorted(fxrec.checkpoint.read_extra(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"the model's key 'dense_optimizer.weight' starts like the checkpoint's "
                                         r"own entries"):
        fxrec.checkpoint.save(_WithExtra("dense_optimizer"), tmp_path / "u")


def test_a_dense_optimizer_over_a_parameter_outside_the_model_is_refused(tmp_path):
    model = _WithExtra()
    temperature = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.Adam([{"params": model.parameters()}, {"params": [temperature]}])
    match = r"dense optimizer holds a parameter that is not the model's \(param_groups\[1\]\['params'\]\[0\], shape \(\)\)"
    with pytest.raises(ValueError, match=match):
        fxrec.checkpoint.save(model, tmp_path / "t", optimizer=opt)
    with pytest.raises(ValueError, match=match):
        fxrec.checkpoint.load(model, tmp_path / "t", optimizer=opt)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.1),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1)])
def test_saving_before_the_first_step_changes_nothing(tmp_path, make):
    """torch's get_optimizer_state_dict makes an empty optimizer's state by a zero step (Adam's
    count moves, momentum buffers appear): a save, or a load, must not leave that behind."""
    torch.manual_seed(0)
    model = _WithExtra()
    runs = []
    for save in (False, True):
        m = copy.deepcopy(model)
        opt = make(m.parameters())
        if save:
            fxrec.checkpoint.save(m, tmp_path / "t", optimizer=opt)
            fxrec.checkpoint.load(m, tmp_path / "t", optimizer=opt)
        for step in range(3):
            opt.zero_grad()
            m(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
        runs.append(m.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_a_damaged_data_file_names_the_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fxrec.checkpoint.save(model, tmp_path / "t")
    (data,) = [f for f in (tmp_path / "t").iterdir() if f.suffix == ".distcp"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"fxrec.checkpoint.load: reading '.*t' failed \(rank 0: EOFError.*damaged"):
        fxrec.checkpoint.load(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), tmp_path / "t")


def test_saving_again_to_a_path_replaces_the_checkpoint(tmp_path, recwarn):
    model = _Tables(10)
    fxrec.checkpoint.save(model, tmp_path / "latest", extra={"step": 1})
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    fxrec.checkpoint.save(model, tmp_path / "latest", extra={"step": 2})
    other = _Tables(10)
    assert fxrec.checkpoint.load(other, tmp_path / "latest") == {"step": 2}
    assert torch.equal(other.emb.weight, model.emb.weight)
    assert not [w for w in recwarn if "checkpoint" in str(w.message)]


def test_state_dict_and_load_state_dict_as_users_write_them(runs):
    """dcp.save(sharded.state_dict()) / dcp.load + load_state_dict across plans, the unsharded
    model's state_dict, and the errors of keys that do not fit."""
    for rank, res in enumerate(runs[2, "all"]):
        assert "mismatches" not in res, res.get("mismatches")
        for idiom in ("dcp_idiom", "dcp_idiom_tw"):
            want, got = res[idiom]
            for key in want:
                assert torch.equal(got[key], want[key]), f"rank {rank}: {idiom} {key}"
        assert res["keys"] == runs[2, "all"][0]["keys"]  # TorchRec's: every key on every rank
        want, got = res["from_plain"]
        for key in want:
            assert torch.equal(got[key], want[key]), f"rank {rank}: {key}"
        assert "missing keys ['top.0.bias']" in res["missing"]
        assert res["lenient"] == ["top.0.bias"]
        assert res["parent_keys"] == ["0.bot.0.bias", "0.bot.0.weight"]
        assert "load it with its own load_state_dict" in res["through_parent"]
    other = runs[2, "all"][0]["other_layout"]
    assert re.search(r"'sparse_arch\.ebc\.embedding_bags\.t_\w+\.weight' \(table .*\) holds no local shard at "
                     r"rows", other), other


def test_a_background_save_keeps_the_values_of_its_moment(tmp_path):
    model = _Tables(10)
    want = model.emb.weight.detach().clone()
    done = fxrec.checkpoint.save(model, tmp_path / "bg", extra={"step": 7}, background=True)
    with torch.no_grad():
        model.emb.weight.add_(1.0)  # training goes on while the files are written
    done.result()
    other = _Tables(10)
    assert fxrec.checkpoint.load(other, tmp_path / "bg") == {"step": 7}
    assert torch.equal(other.emb.weight, want)


class _Grown(torch.nn.Module):  # _Tables plus a table and a layer added since the checkpoint
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(10, 4, mode="sum")
        self.new_emb = torch.nn.EmbeddingBag(7, 4, mode="sum")
        self.head = torch.nn.Linear(4, 1)


def test_a_grown_model_warm_starts_from_an_older_checkpoint(tmp_path):
    old = _Tables(10)
    fxrec.checkpoint.save(old, tmp_path / "old")
    grown = _Grown()
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    with pytest.raises(ValueError, match=r"has no 'new_emb\.weight'"):
        fxrec.checkpoint.load(grown, tmp_path / "old")
    with pytest.warns(UserWarning, match=r"lacks 4 key\(s\) of this model, left as they were: "
                                         r"dense_optimizer, head\.bias, head\.weight, new_emb\.weight"):
        fxrec.checkpoint.load(grown, tmp_path / "old", optimizer=torch.optim.Adam(grown.parameters()), strict=False)
    assert torch.equal(grown.emb.weight, old.emb.weight)
    for key in ("new_emb.weight", "head.weight", "head.bias"):
        assert torch.equal(grown.state_dict()[key], before[key])
    with pytest.raises(ValueError, match=r"'emb\.weight' is \(10, 4\) in .* and \(12, 4\) in this model"):
        fxrec.checkpoint.load(_Tables(12), tmp_path / "old", strict=False)  # a shape still has to fit


def test_another_sparse_optimizers_state_is_left_when_not_strict(tmp_path, recwarn):
    """World 1: saved under RowWiseAdagrad, loaded under Adam: the weights come, Adam's state
    stays as it was (zeros), and the warning names the missing state."""
    case = CASES["dlrm_lists"]
    example = _local(case, 0, 1, 0)
    torch.manual_seed(0)
    adagrad = shard(case.build(), Topology(1), example, sparse_optimizer=SPARSE["rowwise_adagrad"]())
    _step(adagrad, None, "dlrm_lists", 0, 1, 0)
    fxrec.checkpoint.save(adagrad, tmp_path / "a")
    torch.manual_seed(1)
    adam = shard(case.build(), Topology(1), example, sparse_optimizer=SPARSE["adam"]())
    fxrec.checkpoint.load(adam, tmp_path / "a", strict=False)
    (warning,) = [w for w in recwarn if "fxrec.checkpoint.load" in str(w.message)]
    assert "sparse_optimizer.emb_l.0.weight.exp_avg" in str(warning.message)
    saved, got = adagrad.full_state_dict(), adam.full_state_dict()
    for key in saved:
        assert torch.equal(got[key], saved[key]), key
    state = fxrec.checkpoint.state_dict(adam)
    assert not state["sparse_optimizer.emb_l.0.weight.exp_avg"].any()
    recwarn.clear()
    fxrec.checkpoint.load(adam, tmp_path / "a", sparse_optimizer=False)  # weights only: nothing lacks
    assert not [w for w in recwarn if "fxrec.checkpoint.load" in str(w.message)]


def test_a_save_cut_short_leaves_no_checkpoint_rather_than_a_mix(tmp_path, monkeypatch):
    """The old metadata goes before the new files are written (DCP writes metadata last): a
    save that fails midway leaves nothing `load` would take for a checkpoint."""
    import torch.distributed.checkpoint as dcp

    model = _Tables(10)
    fxrec.checkpoint.save(model, tmp_path / "latest")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        fxrec.checkpoint.save(model, tmp_path / "latest")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*latest"):
        fxrec.checkpoint.load(_Tables(10), tmp_path / "latest")


def test_the_next_save_or_load_waits_for_a_background_save(tmp_path):
    model = _Tables(10)
    fxrec.checkpoint.save(model, tmp_path / "a", extra={"step": 1}, background=True)
    fxrec.checkpoint.save(model, tmp_path / "a", extra={"step": 2}, background=True)  # waits for the first
    assert fxrec.checkpoint.load(_Tables(10), tmp_path / "a") == {"step": 2}  # waits for the second


def test_fxrec_checkpoint_imports_as_a_module():
    """README: fxrec.checkpoint.save / load. The import forms work too, and give the one module
    (fxrec.runtime.checkpoint), not a copy."""
    import importlib

    import fxrec.runtime.checkpoint as runtime_checkpoint

    module = importlib.import_module("fxrec.checkpoint")
    from fxrec.checkpoint import load, save

    assert module is runtime_checkpoint is fxrec.checkpoint
    assert (save, load) == (runtime_checkpoint.save, runtime_checkpoint.load)


@pytest.mark.parametrize("call, name, value", [
    ("save", "background", "yes"),
    ("load", "strict", "no"),
    ("load", "sparse_optimizer", "adam"),
    ("load", "strict", None),
])
def test_a_flag_that_is_not_a_bool_is_refused(tmp_path, call, name, value):
    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    model = case.build()
    sm = shard(model, Topology(1), case.draw(torch.Generator().manual_seed(0), 3))
    fxrec.checkpoint.save(sm, tmp_path / "ckpt")
    with pytest.raises(TypeError, match=rf"fxrec.checkpoint.{call}: {name} must be True or False, got "
                                        rf"{re.escape(repr(value))}"):
        getattr(fxrec.checkpoint, call)(sm, tmp_path / "ckpt", **{name: value})


@pytest.mark.parametrize("call, arguments, error", [
    ("save", {"optimizer": "adam"}, r"fxrec.checkpoint.save: optimizer must be the dense torch.optim optimizer"),
    ("load", {"optimizer": "adam"}, r"fxrec.checkpoint.load: optimizer must be the dense torch.optim optimizer"),
    ("save", {"model": None}, r"fxrec.checkpoint.save: model must be the ShardedModel .*got NoneType"),
    ("load", {"model": None}, r"fxrec.checkpoint.load: model must be the ShardedModel .*got NoneType"),
    ("save", {"extra": [1, 2]}, r"fxrec.checkpoint.save: extra must be a dict of str keys, got list"),
    ("save", {"path": None}, r"fxrec.checkpoint.save: path must be a directory path .*got NoneType None"),
])
def test_arguments_of_the_wrong_type_are_named(tmp_path, call, arguments, error):
    """They failed with AttributeErrors on the argument ('str' object has no attribute
    'param_groups') or os.fspath's message, which names none."""
    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    sm = shard(case.build(), Topology(1), case.draw(torch.Generator().manual_seed(0), 3))
    fxrec.checkpoint.save(sm, tmp_path / "ckpt")
    given = {"model": sm, "path": tmp_path / "ckpt"} | arguments
    with pytest.raises(TypeError, match=error):
        getattr(fxrec.checkpoint, call)(given.pop("model"), given.pop("path"), **given)
