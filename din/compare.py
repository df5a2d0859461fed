"""``din compare``: the paper's model variants over several seeds, as in its Tables 3 to 5.

A *variant* fixes what the paper varies between rows (pooling, activation of the prediction MLP,
embedding regulariser); everything else (data, epochs, optimiser, batch size) is shared. Every variant is
trained once per seed on the same train/test split (the split seed is ``--seed``; the seeds vary the
initialisation and the shuffling), and the table reports the last epoch's test metrics as mean and
sample standard deviation over seeds. No epoch is picked on the test set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import metrics


@dataclass(frozen=True)
class Variant:
    """One row of the comparison table."""

    key: str           # command-line name
    label: str         # row label, as in the paper
    model: str         # "din" | "base"
    activation: str    # prediction-MLP activation: "prelu" | "dice"
    regularizer: str   # "none" | "mba" | "full"


VARIANTS: Dict[str, Variant] = {v.key: v for v in (
    Variant("base", "BaseModel", "base", "prelu", "none"),
    Variant("base-dice", "BaseModel+Dice", "base", "dice", "none"),
    Variant("din", "DIN", "din", "prelu", "none"),
    Variant("din-dice", "DIN+Dice", "din", "dice", "none"),
    Variant("din-mba", "DIN+MBA", "din", "prelu", "mba"),
    Variant("din-mba-dice", "DIN+MBA+Dice", "din", "dice", "mba"),
    Variant("din-l2", "DIN+L2(full)", "din", "prelu", "full"),
)}

#: ``--variants paper``: the rows of the paper's Tables 3 and 5.
PAPER_VARIANTS = ("base", "din", "din-dice", "din-mba", "din-mba-dice")
#: ``--variants regularizers``: the paper's Table 4 question, no regulariser against full L2 and MBA.
REGULARIZER_VARIANTS = ("din", "din-l2", "din-mba")
METRICS = ("auc", "gauc", "per_user_auc", "logloss")


def parse_variants(text: str) -> List[Variant]:
    """``"base,din"`` or one of the presets ``paper`` / ``regularizers`` into variants, order kept."""
    presets = {"paper": PAPER_VARIANTS, "regularizers": REGULARIZER_VARIANTS}
    keys: List[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        for key in presets.get(item, (item,)):
            if key not in VARIANTS:
                raise ValueError(f"--variants: unknown variant {key!r}; choose from "
                                 f"{', '.join(VARIANTS)} or the presets {', '.join(presets)}")
            if key not in keys:
                keys.append(key)
    if not keys:
        raise ValueError("--variants: give at least one variant")
    return [VARIANTS[key] for key in keys]


def parse_seeds(text: str) -> List[int]:
    """``"1,2,3"`` or a range ``"1-5"`` into distinct integer seeds."""
    seeds: List[int] = []
    try:
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if "-" in item[1:]:
                low, high = item.split("-", 1) if not item.startswith("-") else (None, None)
                if low is None:
                    raise ValueError
                seeds.extend(range(int(low), int(high) + 1))
            else:
                seeds.append(int(item))
    except ValueError:
        raise ValueError(f"--seeds: expected integers like '1,2,3' or '1-5', got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give distinct seeds, got {text!r}")
    return seeds


def summarise(variant: Variant, runs: Sequence[Dict]) -> Dict:
    """One table row: mean and sample std (0 for one seed) of the last epoch's metrics over ``runs``."""
    row: Dict = {"name": variant.label, "variant": variant.key, "seeds": [run["seed"] for run in runs]}
    for name in METRICS:
        values = np.array([run["history"]["epochs"][-1][name] for run in runs], dtype=np.float64)
        row[name] = float(values.mean())
        row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row[f"{name}_runs"] = values.tolist()
    row["samples_per_second"] = float(np.mean([run["history"]["epochs"][-1]["samples_per_second"]
                                               for run in runs]))
    return row


def format_table(rows: Sequence[Dict], base: Optional[Dict] = None) -> str:
    """The paper's Table 3 layout: AUC, user-weighted AUC, logloss, RelaImpr on GAUC against ``base``.

    With several seeds each cell is ``mean±std``. ``base`` defaults to the first row.
    """
    base = base if base is not None else rows[0]
    several = any(len(row.get("seeds", [0])) > 1 for row in rows)

    def cell(row: Dict, name: str) -> str:
        if several:
            return f"{row[name]:.4f}±{row.get(name + '_std', 0.0):.4f}"
        return f"{row[name]:.4f}"

    width = 15 if several else 7
    header = (f"{'Model':<14} {'AUC':>{width}} {'GAUC':>{width}} {'Logloss':>{width}} "
              f"{'RelaImpr':>9}")
    lines = [header]
    for row in rows:
        impr = metrics.rela_impr(row["gauc"], base["gauc"]) * 100
        lines.append(f"{row['name']:<14} {cell(row, 'auc'):>{width}} {cell(row, 'gauc'):>{width}} "
                     f"{cell(row, 'logloss'):>{width}} {impr:>+8.2f}%")
    seeds = rows[0].get("seeds", [])
    footer = (f"GAUC: user-weighted AUC (paper Eq. 10); RelaImpr on GAUC against {base['name']}; "
              f"last epoch, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
              + (" (mean±std)" if several else ""))
    return "\n".join(lines + [footer])


def format_markdown(rows: Sequence[Dict], base: Optional[Dict] = None) -> str:
    """The same table as :func:`format_table`, as a Markdown table (mean ± std, seeds listed per row)."""
    base = base if base is not None else rows[0]
    lines = ["| Model | AUC | user-weighted AUC | logloss | RelaImpr (GAUC) | seeds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"{row[name]:.4f} ± {row.get(name + '_std', 0.0):.4f}" for name in ("auc", "gauc", "logloss")]
        impr = metrics.rela_impr(row["gauc"], base["gauc"]) * 100
        seeds = ",".join(str(seed) for seed in row.get("seeds", []))
        lines.append(f"| {row['name']} | {' | '.join(cells)} | {impr:+.2f}% | {seeds} |")
    return "\n".join(lines)


def check_plot_available() -> None:
    """Raise before any training when ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'din-kernels[plot]' "
                         "(or pip install matplotlib)") from None


def plot_curves(results: Sequence[Dict], path: Path, title: str) -> None:
    """Training curves per variant: train loss and test GAUC per epoch (mean over seeds, band = min..max).

    Written to a temporary file, then renamed, so an interrupted run never leaves half an image.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    figure, (loss_axis, gauc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        curves = {name: np.array([[epoch[name] for epoch in run["history"]["epochs"]] for run in result["runs"]])
                  for name in ("train_loss", "gauc")}
        epochs = np.arange(1, curves["gauc"].shape[1] + 1)
        for axis, name in ((loss_axis, "train_loss"), (gauc_axis, "gauc")):
            values = curves[name]
            line, = axis.plot(epochs, values.mean(axis=0), marker="o", label=result["row"]["name"])
            if len(values) > 1:
                axis.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(),
                                  alpha=0.15)
    loss_axis.set(xlabel="epoch", ylabel="train logloss", title="training loss")
    gauc_axis.set(xlabel="epoch", ylabel="test user-weighted AUC", title="test GAUC")
    for axis in (loss_axis, gauc_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    gauc_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        figure.savefig(temporary, dpi=110)
        temporary.replace(path)
    finally:
        plt.close(figure)
        if temporary.exists():
            temporary.unlink()
