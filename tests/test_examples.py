"""The demo scripts train for real: short runs must already learn the signal."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags", [[], ["--plain"], ["--model", "dcn"]])
def test_dlrm_demo_learns(flags, capsys):
    result = _load("dlrm_train").main(["--steps", "120", "--val-batches", "8", "--num-embeddings", "1000",
                                       "--batch-size", "256"] + flags)
    assert result["auc"] > 0.65, result
    assert 0 < result["ne"] < 1.0
    assert "validation: AUC" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--shard"], ["--plain"]])
def test_dlrm_demo_resumes_where_it_stopped(flags, tmp_path, capsys):
    """20 steps straight, or 10, a checkpoint, and 10 more from it: the same model."""
    common = ["--val-batches", "4", "--num-embeddings", "1000", "--batch-size", "128", *flags]
    demo = _load("dlrm_train")
    straight = demo.main(["--steps", "20", *common])
    demo.main(["--steps", "10", "--save", str(tmp_path / "ckpt"), "--save-every", "4", *common])
    resumed = demo.main(["--steps", "10", "--resume", str(tmp_path / "ckpt"), *common])
    assert f"resumed from {tmp_path / 'ckpt'} at step 10" in capsys.readouterr().out
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_dlrm_demo_reads_criteo_tsv(tmp_path):
    import random
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        label = rng.randint(0, 1)
        ints = [str(rng.randint(0, 9) + 5 * label) for _ in range(13)]
        cats = [format(rng.randint(0, 50), "x") for _ in range(26)]
        lines.append("\t".join([str(label)] + ints + cats))
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    result = _load("dlrm_train").main(["--criteo-tsv", str(path), "--steps", "30", "--val-batches", "4",
                                       "--batch-size", "64", "--num-embeddings", "64"])
    assert result["auc"] > 0.7  # the label is written into the dense features


def _npy_day(folder, rows: int):
    import numpy as np
    rng = np.random.default_rng(0)
    folder.mkdir()
    np.save(folder / "day_0_dense.npy", rng.random((rows, 13), dtype=np.float32))
    np.save(folder / "day_0_sparse.npy", rng.integers(0, 2**31 - 1, (rows, 26)).astype(np.int32))
    np.save(folder / "day_0_labels.npy", rng.integers(0, 2, (rows,)).astype(np.int32))
    return folder


def test_dlrm_demo_refuses_criteo_data_shorter_than_the_run(tmp_path):
    """9 batches cannot give 2 validation + 50 training ones: refused before training (it
    trained 7 steps and recorded step 50)."""
    data = str(_npy_day(tmp_path / "npy", 600))
    with pytest.raises(SystemExit, match=r"^dlrm_train: the data holds 9 batches of 64; need 52: "
                                         r"--val-batches 2 \+ --steps 50$"):
        _load("dlrm_train").main(["--criteo-npy", data, "--batch-size", "64", "--val-batches", "2",
                                  "--num-embeddings", "100", "--steps", "50", "--save", str(tmp_path / "ck")])
    assert not (tmp_path / "ck").exists()


def test_dlrm_demo_resumes_on_criteo_data_where_it_stopped(tmp_path):
    """On Criteo files, 6 steps straight or 3 + a checkpoint + 3 more: the same model scored
    on the same validation batches (the first --val-batches, whatever --steps), and the
    checkpoint records the steps trained."""
    import fxrec
    common = ["--criteo-npy", str(_npy_day(tmp_path / "npy", 640)), "--batch-size", "64", "--val-batches", "2",
              "--num-embeddings", "100", "--plain"]
    demo = _load("dlrm_train")
    straight = demo.main(["--steps", "6", *common])
    demo.main(["--steps", "3", "--save", str(tmp_path / "ck"), *common])
    assert fxrec.checkpoint.read_extra(str(tmp_path / "ck"))["step"] == 3
    resumed = demo.main(["--steps", "3", "--resume", str(tmp_path / "ck"), *common])
    assert resumed == pytest.approx(straight, abs=1e-6)
    with pytest.raises(SystemExit, match=r"holds 10 batches of 64; need 11: --val-batches 2 \+ 3 \(resumed at\) "
                                         r"\+ --steps 6"):
        demo.main(["--steps", "6", "--resume", str(tmp_path / "ck"), *common])


def test_dlrm_demo_rejects_too_little_data(tmp_path):
    path = tmp_path / "tiny.tsv"
    path.write_text("\t".join(["1"] + ["1"] * 13 + ["a"] * 26) + "\n")
    with pytest.raises(SystemExit, match="holds 0 batches"):
        _load("dlrm_train").main(["--criteo-tsv", str(path), "--batch-size", "64"])


DLRM_BASE = ["--steps", "3", "--batch-size", "32", "--val-batches", "2", "--num-embeddings", "100"]


@pytest.mark.parametrize("argv, message", [
    (["--val-batches", "0"], "--val-batches 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--steps", "-1"], "--steps -1: must be >= 0"),
    (["--num-embeddings", "0"], "--num-embeddings 0: must be >= 1"),
    (["--embedding-dim", "0"], "--embedding-dim 0: must be >= 1"),
    (["--embedding-dim", "-3"], "--embedding-dim -3: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be a finite number > 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--save-every", "-2", "--save", "{tmp}/ck"], "--save-every -2: must be >= 0"),
    (["--save-every", "2"], "--save-every 2: needs --save DIR"),
    (["--pipeline"], "--pipeline: trains a sharded model: add --shard"),
    (["--save", "{tmp}/afile"], "--save {tmp}/afile: a file, not a checkpoint directory"),
    (["--save", "{tmp}/afile/ck"], "--save {tmp}/afile/ck: cannot make a directory under {tmp}/afile, a file"),
])
def test_dlrm_demo_refuses_a_bad_flag_in_one_line_before_training(tmp_path, capsys, argv, message):
    """Exit status 2 and one line naming the flag and its value, before any data is read or
    step trained (not a traceback from torch or fxrec, nor one after training)."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as e:
        _load("dlrm_train").main(DLRM_BASE + [a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"dlrm_train: {message.format(tmp=tmp_path)}\n"


def test_dlrm_demo_names_a_failed_save_in_one_line(tmp_path, monkeypatch):
    """A save that fails where --save's check could not tell (a full disk, /proc/...): one line."""
    import fxrec

    def full_disk(*args, **kwargs):
        raise OSError("fxrec.checkpoint.save: cannot write: No space left on device")
    monkeypatch.setattr(fxrec.checkpoint, "save", full_disk)
    with pytest.raises(SystemExit, match=r"^dlrm_train: --save .*ck: fxrec.checkpoint.save: cannot write: No space"):
        _load("dlrm_train").main(DLRM_BASE + ["--save", str(tmp_path / "ck")])


@pytest.mark.parametrize("demo, argv, message", [
    ("dlrm_train", ["--resume", "{tmp}/none"], r"^dlrm_train: fxrec.checkpoint.read_extra: no checkpoint at '.*none'"),
    ("dlrm_train", ["--criteo-tsv", "{tmp}/none.tsv"], r"^dlrm_train: CriteoTsvReader: no such file .*none.tsv"),
    ("two_tower_train", ["--movielens", "{tmp}/none"], r"^two_tower_train: .*none: no such file or directory"),
])
def test_demos_name_a_missing_file_in_one_line(tmp_path, demo, argv, message):
    with pytest.raises(SystemExit, match=message):
        _load(demo).main([a.format(tmp=tmp_path) for a in argv])


TWO_TOWER_BASE = ["--epochs", "1", "--num-users", "100", "--num-items", "200", "--num-interactions", "3000",
                  "--batch-size", "64"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be >= 1"),
    (["--embedding-dim", "0"], "--embedding-dim 0: must be >= 1"),
    (["--history-length", "0"], "--history-length 0: must be >= 1"),
    (["--epochs", "-1"], "--epochs -1: must be >= 0"),
    (["--num-users", "0"], "--num-users 0: must be >= 1"),
    (["--num-items", "5"], "--num-items 5: must be >= 10 (recall@10 ranks the items)"),
    (["--num-interactions", "0"], "--num-interactions 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be a finite number > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number > 0"),
])
def test_two_tower_demo_refuses_a_bad_flag_in_one_line_before_training(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _load("two_tower_train").main(TWO_TOWER_BASE + argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"two_tower_train: {message}\n"


@pytest.mark.parametrize("records, argv, message", [
    ([], [], r"u\.data: no interactions$"),
    ([(u, u % 5, 3, u) for u in range(40)], [], r"u\.data: 5 items; recall@10 needs at least 10$"),
    ([(u, u, 3, u) for u in range(40)], [], r"u\.data: no user has 2 interactions, so none is held out"),
    (None, ["--num-interactions", "1"], r"^two_tower_train: the synthetic data \(--num-interactions 1\): no user has 2"),
])
def test_two_tower_demo_refuses_data_it_cannot_score(tmp_path, records, argv, message):
    """Data the run cannot score is one line naming its source, not a traceback (an empty
    u.data made a table of 0 rows; 5 items, k=10 past the candidates)."""
    if records is not None:
        (tmp_path / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in records))
        argv = ["--movielens", str(tmp_path / "u.data")]
    with pytest.raises(SystemExit, match=message):
        _load("two_tower_train").main(TWO_TOWER_BASE + argv)


def test_two_tower_demo_beats_chance(capsys):
    result = _load("two_tower_train").main(["--epochs", "2", "--num-users", "200", "--num-items", "300",
                                            "--num-interactions", "8000", "--batch-size", "256"])
    # chance recall@10 over 300 items is 10/300 = 0.033
    assert result["recall@10"] > 0.1, result
    assert 0 < result["ndcg@10"] <= result["recall@10"]
    assert "recall@10" in capsys.readouterr().out


def test_sharded_demo_under_torchrun_matches_one_process(capsys):
    """torchrun over 2 gloo ranks computes what one process computes on the global batch.

    Short on purpose: Adagrad's first step moves every element by about lr whatever its
    gradient's size, so rounding-level differences (another reduction order) in a near-zero
    gradient become lr-sized ones, and over long runs two correct programs drift apart. At
    this lr the per-step losses of 1 and 2 ranks agree to ~1e-7 for ~35 steps, under the
    fbgemm and the torch kernels alike."""
    import os
    import re
    import subprocess
    import sys
    flags = ["--shard", "--steps", "30", "--val-batches", "4", "--num-embeddings", "1000", "--quantize", "int8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLES / "dlrm_train.py"), "--batch-size", "128", *flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = re.search(r"validation: AUC ([\d.]+)  NE ([\d.]+)  \(4 batches of 256; 2 rank\(s\)", done.stdout)
    assert line, done.stdout[-2000:]
    assert "fxrec.shard: 26 tables over 2 rank(s)" in done.stdout
    single = _load("dlrm_train").main(["--batch-size", "256", *flags])
    assert abs(float(line.group(1)) - single["auc"]) < 2e-3
    assert abs(float(line.group(2)) - single["ne"]) < 2e-3
    # rank 0 gathers the shards and lowers the trained model with int8 tables
    quantized = re.search(r"validation, tables int8 \([\d.]+ MiB\): AUC ([\d.]+)  NE ([\d.]+)", done.stdout)
    assert quantized, done.stdout[-2000:]
    assert abs(float(quantized.group(1)) - single["auc_int8"]) < 2e-3
    # through the TrainPipeline (ids sent one batch ahead): the same training, to the digit
    piped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(EXAMPLES / "dlrm_train.py"), "--batch-size", "128", "--pipeline", *flags],
                           capture_output=True, text=True, timeout=300, env=env)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert line.group(0) in piped.stdout, piped.stdout[-2000:]


def test_dlrm_demo_quantized_inference_keeps_the_auc(capsys):
    """The trained model lowered with int8 / int4 tables scores the validation set as the
    float model does, up to the quantization's small loss."""
    result = _load("dlrm_train").main(["--steps", "120", "--val-batches", "8", "--num-embeddings", "1000",
                                       "--batch-size", "256", "--quantize", "int8", "--quantize", "int4"])
    assert abs(result["auc_int8"] - result["auc"]) < 2e-3 and abs(result["ne_int8"] - result["ne"]) < 2e-3
    assert abs(result["auc_int4"] - result["auc"]) < 1e-2
    assert "validation, tables int4" in capsys.readouterr().out
