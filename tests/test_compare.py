"""``din compare``: variants, seeds, the mean±std table, compare.json and the training-curve plot."""
import builtins
import json

import pytest

from din.cli import main
from din.compare import PAPER_VARIANTS, VARIANTS, format_table, parse_seeds, parse_variants

TINY = ["--data", "synthetic", "--epochs", "2", "--batch-size", "512", "--max-len", "20", "--quiet"]


def test_parse_variants_presets_order_and_duplicates():
    assert [v.key for v in parse_variants("paper")] == list(PAPER_VARIANTS)
    assert [v.key for v in parse_variants("din-l2, regularizers")] == ["din-l2", "din", "din-mba"]
    assert parse_variants("din-mba-dice")[0] == VARIANTS["din-mba-dice"]
    with pytest.raises(ValueError, match="unknown variant 'dien'"):
        parse_variants("base,dien")
    with pytest.raises(ValueError, match="at least one"):
        parse_variants(" , ")


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("3") == [3]
    assert parse_seeds("1,2, 5") == [1, 2, 5]
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    for bad in ("a", "1,1", "", "-3-2", "1-"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_format_table_mean_std_and_rela_impr():
    rows = [{"name": "BaseModel", "variant": "base", "seeds": [1, 2], "auc": 0.70, "auc_std": 0.01,
             "gauc": 0.60, "gauc_std": 0.002, "logloss": 0.6, "logloss_std": 0.0},
            {"name": "DIN", "variant": "din", "seeds": [1, 2], "auc": 0.72, "auc_std": 0.01,
             "gauc": 0.62, "gauc_std": 0.003, "logloss": 0.59, "logloss_std": 0.001}]
    table = format_table(rows)
    assert "0.6200±0.0030" in table
    assert "+20.00%" in table  # (0.62-0.5)/(0.60-0.5) - 1
    assert "2 seeds (mean±std)" in table


def test_compare_seeds_variants_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "cmp", tmp_path / "plots" / "curves.png"
    code = main(["compare", *TINY, "--variants", "base,din-mba-dice,din-l2", "--seeds", "1-2",
                 "--out", str(out), "--plot", str(plot)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "DIN+MBA+Dice" in printed and "±" in printed and "RelaImpr" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [1, 2] and [r["variant"] for r in saved["rows"]] == ["base", "din-mba-dice", "din-l2"]
    for row in saved["rows"]:
        assert len(row["gauc_runs"]) == 2 and row["gauc_std"] >= 0
        assert abs(row["gauc"] - sum(row["gauc_runs"]) / 2) < 1e-12
    for variant in ("base", "din-mba-dice", "din-l2"):
        for seed in (1, 2):
            history = json.loads((out / variant / f"seed{seed}" / "metrics.json").read_text())
            assert history["train"]["seed"] == seed and len(history["epochs"]) == 2
            assert (out / variant / f"seed{seed}" / "model.pt").is_file()
    mba = json.loads((out / "din-mba-dice" / "seed1" / "metrics.json").read_text())
    assert mba["train"]["regularizer"] == "mba" and mba["train"]["reg_lambda"] == 0.01
    assert mba["model"]["activation"] == "dice"
    l2 = json.loads((out / "din-l2" / "seed1" / "metrics.json").read_text())
    assert l2["train"]["regularizer"] == "full" and l2["model"]["activation"] == "prelu"
    # different seeds train differently
    runs = saved["rows"][0]["gauc_runs"]
    assert runs[0] != runs[1]
    markdown = (out / "compare.md").read_text()
    assert markdown.startswith("| Model |") and "| DIN+MBA+Dice |" in markdown and " ± " in markdown
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(plot.parent.glob(".*tmp*"))


def test_compare_bad_arguments_fail_before_training(tmp_path, capsys, monkeypatch):
    assert main(["compare", *TINY, "--variants", "din,nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert main(["compare", *TINY, "--seeds", "x"]) == 2
    assert main(["compare", *TINY, "--mba-lambda", "-1"]) == 2
    assert "--mba-lambda" in capsys.readouterr().err

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["compare", *TINY, "--plot", str(tmp_path / "c.png"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'din-kernels[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing trained


def test_plot_curves_handles_runs_stopped_early_and_keeps_the_title(tmp_path, monkeypatch):
    """Runs of one variant may stop at different epochs (early stopping); the figure keeps its own title."""
    import matplotlib.figure

    from din.compare import plot_curves

    titles = []
    real_suptitle = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, text, **kw: titles.append(text) or real_suptitle(self, text, **kw))

    def run(seed, gaucs):
        epochs = [{"train_loss": 0.6 - 0.1 * i, "valid_gauc": g, "gauc": g - 0.01} for i, g in enumerate(gaucs)]
        return {"seed": seed, "history": {"epochs": epochs}}

    results = [{"row": {"name": "DIN"}, "runs": [run(1, [0.6, 0.7, 0.65]), run(2, [0.6, 0.62, 0.7, 0.69, 0.68])]}]
    plot_curves(results, tmp_path / "curves.png", title="my data: 2 seeds")
    assert titles == ["my data: 2 seeds"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
