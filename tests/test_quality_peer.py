"""benchmarks/quality_peer.py end to end on a tiny saved synthetic split: DeepCTR-Torch's DIN beside ours."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("deepctr_torch")  # prints a version-check line offline
pytest.importorskip("sklearn")

from din.data import make_synthetic  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_peer.py"


@pytest.fixture(scope="module")
def quality_peer():
    spec = importlib.util.spec_from_file_location("quality_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_peer"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("quality_peer", None)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "tiny"
    make_synthetic(num_users=80, num_goods=60, num_cates=6, samples_per_user=8, max_len=10, seed=0).save(folder)
    return folder


def test_end_to_end(quality_peer, tiny_split, tmp_path, capsys):
    out = tmp_path / "peer"
    code = quality_peer.main(["--data", str(tiny_split), "--max-len", "10", "--seeds", "1", "--epochs", "2",
                              "--batch-size", "64", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for label in ("ours (din train)", "DeepCTR defaults", "DeepCTR matched", "RelaImpr", "best epoch"):
        assert label in printed
    result = json.loads((out / "peer.json").read_text())
    assert (out / "peer.md").read_text().startswith("| Setting |")
    rows = {row["setting"]: row for row in result["rows"]}
    assert list(rows) == ["ours", "peer-defaults", "peer-matched"]
    for row in rows.values():
        assert 0.0 <= row["gauc"] <= 1.0 and math.isfinite(row["gauc"])
        assert 0.0 <= row["auc"] <= 1.0 and math.isfinite(row["logloss"])
        assert row["seeds"] == [1] and 1 <= row["epoch"] <= 2
    # every run records its epochs, with the validation figures that select the kept one
    for setting, runs in result["runs"].items():
        (run,) = runs
        epochs = run["history"]["epochs"]
        assert 1 <= len(epochs) <= 2 and all("valid_gauc" in e and "samples_per_second" in e for e in epochs)
        best = max(epochs, key=lambda e: e["valid_gauc"])
        assert run["history"]["best"]["epoch"] == best["epoch"]
    # the peer's Adam kept its state across the per-epoch fit calls
    peer_epochs = result["runs"]["peer-matched"][0]["history"]["epochs"]
    assert [e["adam_steps"] for e in peer_epochs] == [e["epoch"] * peer_epochs[0]["adam_steps"] for e in peer_epochs]
    # the inputs were asserted identical to our batches, part by part
    checks = result["checks"]
    split = result["split"]
    tested = {runs[0]["history"]["best"]["samples"] for runs in result["runs"].values()}
    assert tested == {checks["inputs"]["test"]["samples"]} == {split["test_samples"]}  # one test set for all
    assert checks["inputs"]["train"]["samples"] == split["train_samples"]
    assert checks["inputs"]["valid"]["samples"] == split["valid_samples"]
    for part in ("train", "valid", "test"):
        assert any("evaluation batches" in check for check in checks["inputs"][part]["checks"])
    assert any("shuffled epoch" in check for check in checks["inputs"]["train"]["checks"])
    order = [name for name, _, _ in checks["feature_index"]]
    assert order == ["goods", "cate", "hist_goods", "seq_length", "hist_cate"]
    # our metric code against scikit-learn, every run, and the GAUC once
    assert len(checks["sklearn"]) == 3
    for check in checks["sklearn"]:
        assert abs(check["auc"] - check["auc_sklearn"]) <= 1e-9
        assert abs(check["logloss"] - check["logloss_sklearn"]) <= 1e-9
    assert abs(checks["sklearn_gauc"]["gauc"] - checks["sklearn_gauc"]["gauc_sklearn"]) <= 1e-9
    # the matched setting is what the docstring says; the peer's DNN cannot run Dice on DIN's 2-D head input
    matched = result["peer_configs"]["peer-matched"]["din_kwargs"]
    assert matched["att_weight_normalization"] is True and matched["att_hidden_size"] == [80, 40]
    assert matched["dnn_activation"] == ("dice" if result["peer_dnn_supports_dice"] else "prelu")
    assert (out / "ours" / "seed1" / "model.pt").is_file()


def test_check_inputs_catches_a_changed_history(quality_peer, tiny_split):
    from din.data import load_data

    _, SparseFeat, VarLenSparseFeat, _, _ = quality_peer.import_peer()
    from deepctr_torch.inputs import build_input_features

    data = load_data(str(tiny_split), max_len=10).test
    columns = quality_peer.peer_columns(SparseFeat, VarLenSparseFeat, data.num_goods, data.num_cates, 18, 18, 10)
    index = build_input_features(columns)
    x, y, users = quality_peer.peer_inputs(data, 10)
    quality_peer.check_inputs("test", data, x, y, users, 10, index)  # passes as built
    row = int(np.flatnonzero(x["seq_length"] > 1)[0])
    shifted = dict(x, hist_goods=x["hist_goods"].copy())
    shifted["hist_goods"][row] = np.roll(shifted["hist_goods"][row], 1)  # padding moved to the front
    with pytest.raises(AssertionError, match="evaluation batches"):
        quality_peer.check_inputs("test", data, shifted, y, users, 10, index)
    with pytest.raises(AssertionError, match="labels"):
        quality_peer.check_inputs("test", data, x, 1 - y, users, 10, index)


def test_sklearn_check_fails_loudly(quality_peer):
    labels = np.array([0, 1, 0, 1, 1, 0])
    probs = np.array([0.1, 0.8, 0.4, 0.3, 0.9, 0.2])
    result = quality_peer.check_sklearn(labels, probs, np.array([1, 1, 1, 2, 2, 2]))
    assert result["auc"] == pytest.approx(result["auc_sklearn"], abs=1e-12)
    original = quality_peer.metrics.auc
    quality_peer.metrics.auc = lambda y, p: original(y, p) + 1e-6
    try:
        with pytest.raises(AssertionError, match="scikit-learn"):
            quality_peer.check_sklearn(labels, probs)
    finally:
        quality_peer.metrics.auc = original


def test_missing_peer_is_a_clear_error(quality_peer, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepctr_torch", None)  # import deepctr_torch -> ImportError
    assert quality_peer.main(["--data", "synthetic", "--settings", "peer-defaults"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "pip install --no-deps deepctr-torch==0.3.0" in err


def test_bench_train_runs_end_to_end(quality_peer, tiny_split, capsys):
    """benchmarks/bench_train.py (built on this script's peer helpers): one quiet and one loaded condition."""
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT.parent / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    assert bench_train.main(["--data", str(tiny_split), "--samples", "300", "--max-len", "10", "--batch-size", "64",
                             "--repeats", "1", "--threads", "1", "--busy", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| quiet") or "busy" in line]
    assert len(rows) == 2 and all(line.rstrip().endswith("x |") for line in rows)
    with pytest.raises(SystemExit):
        bench_train.main(["--threads", "0"])
