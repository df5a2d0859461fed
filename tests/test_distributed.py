"""Multi-process data-parallel training (din/distributed.py) against one process, on CPU with gloo.

``torchrun --nproc_per_node=2 -m din train`` (``python -m torch.distributed.run``) and one-process ``din train``
on the same small synthetic split and global batch must agree, epoch by epoch, on the training loss and on
every validation and test metric, and end with the same weights and predictions. They cannot agree bit for
bit: the dense gradients are summed in another order (each process's part, then across processes), so are
the BatchNorm / Dice statistics and the MBA rows.

Tolerances, from measurements (these four runs, 2 epochs): the losses (train, validation and test logloss)
1e-5 relative (measured <= 3e-8); the final models' test predictions 1e-5 (measured <= 2e-7); AUC and GAUC
2e-3, because they are step functions: two predictions closer than the rounding can swap order (measured 0
here; 8e-4 of GAUC once at a larger learning rate, one pair of one user); the weights, each tensor against
its largest entry, 1e-5 with SGD (measured 2.5e-7) and 1e-3 with Adam / Adagrad (measured <= 1.7e-4): these
optimisers divide by the gradient's own size, so rounding in a near-zero gradient becomes a step-sized
difference. One process run with torch at 2 threads instead of 1 (another summation order, nothing
distributed) differs from itself by as much (2e-7 with SGD, up to 1.4e-4 with Adagrad).
``attention.output.bias`` is left out under softmax attention: it shifts every score of a sample equally, so
its exact gradient is 0 and its value is accumulated rounding (35% of its size apart between those two
one-process runs), which no prediction depends on. Without the synchronised statistics (plain DDP) the runs
differed by 8e-4 in the loss and 0.1 in the weights. Op-level checks in float64: ``tests/_distributed_ops.py``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import din_kernels as dk
from din.cli import main
from din.data import make_synthetic, shard_bounds
from din.model import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
LOSS_RTOL = 1e-5
METRIC_ATOL = 2e-3
SGD_WEIGHT_RTOL, ADAPTIVE_WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-3, 1e-6
PREDICTION_ATOL = 1e-5


def _torchrun(args, processes=2, timeout=120):
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ARGS``: (exit code, output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # (torchrun's default; set here to keep its banner quiet)
    done = subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1920 training samples (1728 after the validation part): batches of 75 split 38/37 across 2
    processes, and the last batch (3 samples) 2/1, so unequal parts and a one-sample part are covered."""
    folder = tmp_path_factory.mktemp("distributed") / "synthetic"
    make_synthetic(num_users=400, num_goods=300, num_cates=12, samples_per_user=6, max_len=12, seed=3).save(folder)
    return folder


def _args(data, *extra):
    return ["train", "--data", str(data), "--max-len", "12", "--batch-size", "75", "--hidden-units", "32,16",
            "--attention-units", "16,8", "--patience", "3", "--quiet", *extra]


def _compare(one: Path, two: Path, data: Path, weight_rtol: float):
    """The two runs' per-epoch figures, weights and test predictions agree within the module's tolerances."""
    from din.checkpoint import load_checkpoint
    from din.data import load_data
    from din.train import predict

    single, multi = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert multi["distributed"] == {"processes": 2, "backend": "gloo"} and "distributed" not in single
    assert [e["epoch"] for e in single["epochs"]] == [e["epoch"] for e in multi["epochs"]]
    assert single["best"]["epoch"] == multi["best"]["epoch"]
    for a, b in zip(single["epochs"], multi["epochs"]):
        for key in ("train_loss", "valid_logloss", "logloss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (key, a["epoch"])
        for key in ("valid_auc", "valid_gauc", "auc", "gauc", "per_user_auc"):
            assert abs(b[key] - a[key]) <= METRIC_ATOL, (key, a["epoch"], a[key], b[key])
        assert a["samples"] == b["samples"] and a["valid_samples"] == b["valid_samples"]
    model_a, payload_a = load_checkpoint(one / "model.pt")
    model_b, payload_b = load_checkpoint(two / "model.pt")
    state_a, state_b = payload_a["state_dict"], payload_b["state_dict"]
    assert state_a.keys() == state_b.keys()
    shift_invariant = {"attention.output.bias"} if model_a.config.attention_normalize == "softmax" else set()
    for name, a in state_a.items():
        b = state_b[name]
        if not a.is_floating_point():
            assert torch.equal(a, b), name
        elif name not in shift_invariant:
            bound = WEIGHT_ATOL + weight_rtol * a.abs().max().item()
            assert (a - b).abs().max().item() <= bound, (name, (a - b).abs().max().item(), bound)
    test = load_data(str(data), max_len=12).test
    p_a, p_b = predict(model_a, test, 12), predict(model_b, test, 12)
    assert np.abs(p_a - p_b).max() <= PREDICTION_ATOL


def test_shard_bounds_cut_into_contiguous_parts_in_rank_order():
    for n in (0, 1, 2, 7, 75):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(5, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(5, 0, 0)


def test_sharded_batches_put_together_are_the_unsharded_batches():
    data = make_synthetic(num_users=20, num_goods=30, num_cates=4, samples_per_user=4, max_len=6, seed=1).train
    whole = list(data.batches(7, 6, shuffle=True, seed=5))
    parts = [list(data.batches(7, 6, shuffle=True, seed=5, shard=(rank, 3))) for rank in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for index, batch in enumerate(whole):
        for field in batch.__dataclass_fields__:
            joined = torch.cat([getattr(p[index], field) for p in parts])
            assert torch.equal(joined, getattr(batch, field)), field


def test_layers_and_mba_tables_across_two_processes():
    """SyncBatchNorm1d, SyncDice (masked too) and MBAEmbedding with a process group (SparseAdam's sparse
    gradient, fused SGD and row-wise Adagrad, torch and Triton paths) give on each part what one process
    gives on the whole batch, to 1e-10 in float64; processes that loaded different data are refused."""
    code, output = _torchrun([str(HERE / "_distributed_ops.py")])
    assert code == 0, output[-4000:]
    assert "ok 0" in output and "ok 1" in output


def test_default_model_with_adam_matches_one_process(tmp_path, data):
    """The default model: Dice head after BatchNorm (both synchronised), softmax attention, Adam at 1e-3."""
    args = _args(data, "--epochs", "2")
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun(["-m", "din"] + args + ["--out", str(tmp_path / "two")])
    assert code == 0, output[-4000:]
    assert output.count("epoch 1:") == 1  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.json", "model.pt", "resume.pt"]
    _compare(tmp_path / "one", tmp_path / "two", data, ADAPTIVE_WEIGHT_RTOL)


def test_mba_with_fused_adagrad_resumed_under_torchrun_matches_one_process(tmp_path, data):
    """MBA with the tables' fused row-wise Adagrad (states included) and Adagrad on the dense part: one epoch
    on two processes, then ``--resume --epochs 2`` on two processes, against two epochs in one."""
    args = _args(data, "--mba-lambda", "0.01", "--optimizer", "adagrad", "--lr", "0.02",
                 "--embedding-init-std", "0.1")
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun(["-m", "din"] + args + ["--epochs", "1", "--out", str(tmp_path / "two")])
    assert code == 0, output[-4000:]
    code, output = _torchrun(["-m", "din", "train", "--resume", str(tmp_path / "two"), "--epochs", "2", "--quiet"])
    assert code == 0, output[-4000:]
    assert "epoch 2:" in output and "epoch 1:" not in output
    _compare(tmp_path / "one", tmp_path / "two", data, ADAPTIVE_WEIGHT_RTOL)


def test_mba_with_fused_sgd_matches_one_process_closely(tmp_path, data):
    """MBA with fused SGD on the tables and SGD on the dense part, a PReLU head and a dense user table (in
    DDP): nothing divides by a gradient's size, so the weights agree to 1e-5 of each tensor's largest entry."""
    args = _args(data, "--mba-lambda", "0.01", "--optimizer", "sgd", "--lr", "0.1", "--embedding-init-std", "0.1",
                 "--activation", "prelu", "--use-user", "--epochs", "2")
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun(["-m", "din"] + args + ["--out", str(tmp_path / "two")])
    assert code == 0, output[-4000:]
    _compare(tmp_path / "one", tmp_path / "two", data, SGD_WEIGHT_RTOL)


def test_mba_with_sparse_adam_matches_one_process(tmp_path, data):
    """MBA with Adam: SparseAdam on the tables' gathered sparse gradient, Adam on the dense part."""
    args = _args(data, "--mba-lambda", "0.01", "--epochs", "2")
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun(["-m", "din"] + args + ["--out", str(tmp_path / "two")])
    assert code == 0, output[-4000:]
    _compare(tmp_path / "one", tmp_path / "two", data, ADAPTIVE_WEIGHT_RTOL)


def test_what_cannot_run_distributed_is_refused(tmp_path, monkeypatch, capsys):
    """The attention's fused Dice (its statistics cannot be synchronised), a batch smaller than the number of
    processes, and commands other than train: one-line errors naming the option."""
    from din.distributed import Distributed, synchronise_batch_statistics
    from din.train import TrainConfig, train

    model = build_model(ModelConfig(num_goods=10, num_cates=3, attention_activation="dice"))
    with pytest.raises(ValueError, match="--attention-activation dice"):
        synchronise_batch_statistics(model, group=None)
    split = make_synthetic(num_users=20, num_goods=9, num_cates=3, samples_per_user=2, max_len=5)
    four = Distributed(rank=0, world_size=4, local_rank=0, backend="gloo", device=torch.device("cpu"), group=None)
    with pytest.raises(ValueError, match=r"batch_size \(3\) must be at least the number of processes \(4\)"):
        train(build_model(ModelConfig(num_goods=split.num_goods, num_cates=split.num_cates)), split,
              TrainConfig(batch_size=3, epochs=1, progress=False), distributed=four)
    table = dk.MBAEmbedding(5, 2, torch.ones(5), lam=0.1)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup or None"):
        table.process_group = "world"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err.startswith("error (process 1): din evaluate runs in one process")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "--data", "synthetic", "--quiet"]) == 2
    assert "$WORLD_SIZE must be a positive integer" in capsys.readouterr().err


def test_a_refused_output_folder_ends_every_process(tmp_path, data):
    """Rank 0 alone takes ``--out``'s lock; when it is refused (another live run holds it) every process
    ends with the one-line error, none waits for rank 0."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".din.lock").write_text(f"{os.getpid()}\n")  # this live test process holds it
    code, output = _torchrun(["-m", "din"] + _args(data, "--epochs", "1", "--out", str(out)), timeout=60)
    assert code != 0
    assert "error: " in output and "error (process 1): " in output and "is in use by another din run" in output
    assert sorted(p.name for p in out.iterdir()) == [".din.lock"]
