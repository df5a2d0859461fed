"""The command line end to end, on tiny runs."""
import json
import subprocess
import sys

import pytest

from din.cli import main


def test_train_then_evaluate_synthetic(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "20",
                 "--out", str(out), "--quiet"])
    assert code == 0
    history = json.loads((out / "metrics.json").read_text())
    assert history["train"]["epochs"] == 1 and history["model"]["model"] == "din"
    epoch = history["epochs"][0]
    for key in ("auc", "gauc", "per_user_auc", "logloss", "samples_per_second", "train_loss"):
        assert key in epoch
    assert 0.5 < epoch["auc"] <= 1.0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "resume.pt"]
    capsys.readouterr()

    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--data", "synthetic"]) == 0
    printed = capsys.readouterr().out
    assert f"AUC {epoch['auc']:.4f}" in printed  # same split and model: the same figures


def test_compare_prints_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    # The synthetic click depends on how many related behaviours there are: interest intensity, which the
    # paper's unnormalised weights keep and softmax (the CLI default) removes.
    code = main(["compare", "--data", "synthetic", "--epochs", "3", "--batch-size", "512", "--max-len", "20",
                 "--attention-normalize", "none", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BaseModel" in printed and "DIN" in printed and "RelaImpr" in printed
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["BaseModel", "DIN"]
    # on the planted data, attention must beat sum pooling
    assert rows[1]["gauc"] > rows[0]["gauc"]


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "lbfgs"])
    assert main(["train", "--data", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "din", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "compare" in result.stdout


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
def test_train_with_mba_then_evaluate(tmp_path, capsys, optimizer):
    out = tmp_path / optimizer
    code = main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "20",
                 "--mba-lambda", "0.01", "--optimizer", optimizer, "--lr", "0.05" if optimizer != "adam" else "1e-3",
                 # N(0, 1) tables: one epoch of plain SGD learns little from the small default init
                 "--embedding-init", "torch", "--out", str(out), "--quiet"])
    assert code == 0
    history = json.loads((out / "metrics.json").read_text())
    assert history["train"]["regularizer"] == "mba" and history["train"]["reg_lambda"] == 0.01
    assert history["epochs"][0]["auc"] > 0.6
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--data", "synthetic"]) == 0


def test_full_l2_and_conflicting_regularisers(tmp_path, capsys):
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "20",
                 "--l2", "full", "--quiet"]) == 0
    assert main(["train", "--data", "synthetic", "--mba-lambda", "0.01", "--l2", "full", "--quiet"]) == 2
    assert "choose one regulariser" in capsys.readouterr().err


def test_threads_flag_sets_torch_threads(monkeypatch, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "10",
                     "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["train", "--threads", "0"])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    from din.cli import build_parser
    assert build_parser().parse_args(["train"]).threads == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert build_parser().parse_args(["train"]).threads == 1


def test_evaluate_defaults_to_the_checkpoints_data_and_refuses_data_that_does_not_fit(tmp_path, capsys):
    """The checkpoint stores its data spec and vocabulary sizes: ``din evaluate`` without ``--data`` scores
    the data the model was trained on; data whose ids overflow a table is refused, naming the table."""
    import torch

    from din.data import make_synthetic

    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "20",
                 "--out", str(out), "--quiet"]) == 0
    auc = json.loads((out / "metrics.json").read_text())["epochs"][0]["auc"]
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["data"]["spec"] == "synthetic" and payload["data"]["num_goods"] > 1
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "model.pt")]) == 0
    assert f"AUC {auc:.4f}" in capsys.readouterr().out
    bigger = tmp_path / "bigger"
    make_synthetic(num_goods=3000, max_len=20).save(bigger)
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--data", str(bigger)]) == 2
    error = capsys.readouterr().err
    assert "goods table" in error and "trained on synthetic" in error and error.count("\n") == 1
    # a checkpoint from before the data was stored needs --data
    del payload["data"]
    torch.save(payload, tmp_path / "old.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "old.pt")]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_a_bad_out_fails_before_any_training(tmp_path, capsys, monkeypatch):
    import din.cli as cli

    monkeypatch.setattr(cli, "_load_split", lambda args: pytest.fail("work started before --out was checked"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for command in ("train", "compare"):
        assert main([command, "--data", "synthetic", "--out", str(a_file), "--quiet"]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
        assert main([command, "--data", "synthetic", "--out", str(a_file / "sub"), "--quiet"]) == 2
        assert "cannot be created" in capsys.readouterr().err


def test_written_files_follow_the_umask(tmp_path):
    import os

    from din.checkpoint import write_json_atomic

    before = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(before)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    import din.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_split", interrupted)
    assert main(["train", "--data", "synthetic", "--quiet"]) == 130
    assert capsys.readouterr().err == "din train: interrupted\n"


TRAIN = ["train", "--data", "synthetic", "--batch-size", "512", "--max-len", "20", "--quiet"]
TIMING = ("train_seconds", "samples_per_second")


def _run_record(out):
    """metrics.json's epochs without the timings, and model.pt's weights."""
    import torch

    history = json.loads((out / "metrics.json").read_text())
    epochs = [{k: v for k, v in record.items() if k not in TIMING} for record in history["epochs"]]
    return epochs, torch.load(out / "model.pt", weights_only=True)["state_dict"]


def _assert_same_run(a, b):
    import torch

    epochs_a, state_a = _run_record(a)
    epochs_b, state_b = _run_record(b)
    assert epochs_a == epochs_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def _interrupting_bar(real_tqdm, epoch: int, batch: int):
    """A stand-in for the epochs' progress bar that raises KeyboardInterrupt (Ctrl-C) as batch ``batch``
    (0-based) of epoch ``epoch`` comes up."""
    epochs_started = []

    class Interrupting:
        def __init__(self, iterable, **kwargs):
            epochs_started.append(1)
            self.bar = real_tqdm(iterable, **kwargs)

        def __iter__(self):
            for index, item in enumerate(self.bar):
                if len(epochs_started) == epoch and index == batch:
                    raise KeyboardInterrupt
                yield item

        def set_postfix(self, **kwargs):
            self.bar.set_postfix(**kwargs)

    return Interrupting


@pytest.mark.parametrize("extra", [[], ["--mba-lambda", "0.01", "--optimizer", "adagrad", "--lr", "0.05"]],
                         ids=["adam", "mba-adagrad"])
def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tmp_path, capsys, monkeypatch, extra):
    """Killed (Ctrl-C) in the middle of epoch 2 of 3, then ``--resume``: the same metrics and weights, bit
    for bit, as the run that was never interrupted; ``--resume --epochs 4`` of a finished 3-epoch run equals
    4 epochs at once."""
    import din.train as train_module

    assert main(TRAIN + ["--epochs", "3", "--out", str(tmp_path / "whole")] + extra) == 0
    real_tqdm = train_module.tqdm
    monkeypatch.setattr(train_module, "tqdm", _interrupting_bar(real_tqdm, epoch=2, batch=3))
    assert main(TRAIN + ["--epochs", "3", "--out", str(tmp_path / "cut")] + extra) == 130
    monkeypatch.setattr(train_module, "tqdm", real_tqdm)
    assert not (tmp_path / "cut" / "model.pt").exists() and (tmp_path / "cut" / "resume.pt").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")

    assert main(TRAIN + ["--epochs", "4", "--out", str(tmp_path / "four")] + extra) == 0
    assert main(["train", "--resume", str(tmp_path / "whole"), "--epochs", "4", "--quiet"]) == 0
    _assert_same_run(tmp_path / "four", tmp_path / "whole")


def test_a_run_interrupted_inside_an_epoch_resumes_from_its_last_step_checkpoint(tmp_path, capsys, monkeypatch):
    """``--checkpoint-every 3``: interrupted at the eighth batch of epoch 2, resume.pt holds epoch 1 and 6
    steps of epoch 2; ``--resume`` skips those 6 batches and ends bit for bit as the uninterrupted run."""
    import torch

    import din.train as train_module

    extra = ["--mba-lambda", "0.01", "--optimizer", "adagrad", "--lr", "0.05"]  # fused sparse states too
    assert main(TRAIN + ["--epochs", "2", "--out", str(tmp_path / "whole")] + extra) == 0
    real_tqdm = train_module.tqdm
    monkeypatch.setattr(train_module, "tqdm", _interrupting_bar(real_tqdm, epoch=2, batch=7))
    cut = TRAIN + ["--epochs", "2", "--checkpoint-every", "3", "--out", str(tmp_path / "cut")] + extra
    assert main(cut) == 130
    monkeypatch.setattr(train_module, "tqdm", real_tqdm)
    payload = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert (payload["epoch"], payload["step"]) == (1, 6) and payload["partial"]["seen"] == 6 * 512
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_killed_run_resumes_mid_epoch(tmp_path):
    """SIGKILL (no clean-up at all) while epoch 1 runs, after a --checkpoint-every checkpoint: the stale lock
    is taken over and --resume ends with the uninterrupted run's metrics and weights."""
    import os
    import signal
    import time

    import torch

    args = ["train", "--data", "synthetic", "--batch-size", "64", "--max-len", "20", "--quiet", "--epochs", "2"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "din", *args, "--checkpoint-every", "4", "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # a step checkpoint of epoch 1 exists and the epoch has not ended (metrics.json comes at its end)
        while not ((cut / "resume.pt").exists() and not (cut / "metrics.json").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    payload = torch.load(cut / "resume.pt", weights_only=True)
    assert payload["epoch"] == 0 and payload["step"] > 0 and payload["step"] % 4 == 0
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_resume_refuses_a_missing_or_corrupt_file(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "resume.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "is not a resumable din run" in error and str(tmp_path / "resume.pt") in error


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    import os

    out = tmp_path / "run"
    out.mkdir()
    (out / ".din.lock").write_text(f"{os.getppid()}\n")  # a live process holds it
    assert main(TRAIN + ["--epochs", "1", "--out", str(out)]) == 2
    assert "in use by another din run" in capsys.readouterr().err
    (out / ".din.lock").write_text("999999999\n")  # a process that is gone: taken over
    assert main(TRAIN + ["--epochs", "1", "--out", str(out)]) == 0
    assert not (out / ".din.lock").exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "score", "export", "compare"])
def test_help_shows_every_default(command, capsys):
    """Every option with a default says it in --help (the parser's own text or the formatter's)."""
    import argparse

    from din.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    with pytest.raises(SystemExit):
        sub.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            if action.default not in (None, False):
                assert "default" in action.help or f"(default: {action.default})" in text, action.option_strings


def test_divergence_and_damaged_checkpoints_are_one_line_errors(tmp_path, capsys):
    import torch

    assert main(TRAIN + ["--epochs", "1", "--optimizer", "sgd", "--lr", "1e30"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: training diverged") and error.count("\n") == 1
    out = tmp_path / "run"
    assert main(TRAIN + ["--epochs", "1", "--out", str(out)]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    for damage in ("missing key", "wrong shape", "no config"):
        broken = dict(payload, state_dict=dict(payload["state_dict"]))
        name = next(iter(broken["state_dict"]))
        if damage == "missing key":
            del broken["state_dict"][name]
        elif damage == "wrong shape":
            broken["state_dict"][name] = torch.zeros(3, 1)
        else:
            del broken["model_config"]
        torch.save(broken, tmp_path / "broken.pt")
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(tmp_path / "broken.pt")]) == 2, damage
        error = capsys.readouterr().err
        assert "is a damaged din checkpoint" in error and error.count("\n") == 1, (damage, error)
    with pytest.raises(ValueError, match="damaged"):
        main(["--debug", "evaluate", "--checkpoint", str(tmp_path / "broken.pt")])


def test_a_last_batch_of_one_sample_is_left_out(tmp_path):
    """The head's BatchNorm cannot train on one sample: with len(train) % batch == 1 that sample is skipped
    (it was a crash after a whole epoch)."""
    from din.data import make_synthetic
    from din.model import ModelConfig, build_model
    from din.train import TrainConfig, train

    split = make_synthetic(num_users=60, num_goods=50, num_cates=5, max_len=10, seed=0)
    size = len(split.train)
    history = train(build_model(ModelConfig(num_goods=split.num_goods, num_cates=split.num_cates)), split,
                    TrainConfig(epochs=1, batch_size=size - 1, max_len=10, valid_fraction=0.0, progress=False),
                    log=lambda line: None)
    assert history["epochs"][0]["train_loss"] > 0
