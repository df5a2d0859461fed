"""``din compare``: the paper's model variants over several seeds, as in its Tables 3 to 5.

A *variant* fixes what the paper varies between rows (pooling, activation of the prediction MLP,
embedding regulariser; and, beyond the paper, a search before attention, SIM's, see :mod:`din.search`);
everything else (data, epochs, optimiser, batch size, ``--max-len``, ``--top-k``) is shared. Every variant is
trained once per seed on the same train/validation/test split (the split seed is ``--seed``; the seeds
vary the initialisation and the shuffling), and the table reports, as mean and sample standard deviation
over seeds, the test metrics at each run's best validation epoch (BARS' protocol; the last epoch when
there is no validation part). No epoch is picked on the test set.
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
    search: str = "none"  # search before attention (din.search): "none" | "category" | "inner-product"


VARIANTS: Dict[str, Variant] = {v.key: v for v in (
    Variant("base", "BaseModel", "base", "prelu", "none"),
    Variant("base-dice", "BaseModel+Dice", "base", "dice", "none"),
    Variant("din", "DIN", "din", "prelu", "none"),
    Variant("din-dice", "DIN+Dice", "din", "dice", "none"),
    Variant("din-mba", "DIN+MBA", "din", "prelu", "mba"),
    Variant("din-mba-dice", "DIN+MBA+Dice", "din", "dice", "mba"),
    Variant("din-l2", "DIN+L2(full)", "din", "prelu", "full"),
    # SIM's search before attention over the last --max-len behaviours, --top-k kept per candidate
    Variant("din-search", "DIN+search", "din", "prelu", "none", "category"),
    Variant("din-search-ip", "DIN+search-ip", "din", "prelu", "none", "inner-product"),
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


def selected_epoch(history: Dict) -> Dict:
    """The epoch record a run reports: its best validation epoch (``history["best"]``), else its last."""
    return history.get("best") or history["epochs"][-1]


def summarise_runs(runs: Sequence[Dict]) -> Dict:
    """Mean, sample std (0 for one seed) and per-run values over ``runs`` (``{"seed", "history"}``) of the
    metrics at each run's selected epoch (:func:`selected_epoch`), test and (where recorded) validation, and
    of the selected epoch itself; plus the mean training samples/s."""
    row: Dict = {"seeds": [run["seed"] for run in runs]}
    chosen = [selected_epoch(run["history"]) for run in runs]
    names = list(METRICS) + [f"valid_{name}" for name in METRICS if all(f"valid_{name}" in c for c in chosen)]
    for name in names + ["epoch"]:
        values = np.array([record[name] for record in chosen], dtype=np.float64)
        row[name] = float(values.mean())
        row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row[f"{name}_runs"] = values.tolist()
    row["samples_per_second"] = float(np.mean([np.mean([e["samples_per_second"] for e in run["history"]["epochs"]])
                                               for run in runs]))
    return row


def summarise(variant: Variant, runs: Sequence[Dict]) -> Dict:
    """One table row of ``variant``: :func:`summarise_runs` with the row's name."""
    return {"name": variant.label, "variant": variant.key, **summarise_runs(runs)}


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
    chosen = "best validation epoch" if all("valid_gauc" in row for row in rows) else "last epoch"
    footer = (f"GAUC: user-weighted AUC (paper Eq. 10); RelaImpr on GAUC against {base['name']}; "
              f"test metrics at each run's {chosen}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
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
    """Training curves per variant: train loss, validation GAUC (when recorded) and test GAUC per epoch (mean over
    seeds, band = min..max; runs stopped early end early).

    Written to a temporary file, then renamed, so an interrupted run never leaves half an image.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    with_valid = all("valid_gauc" in run["history"]["epochs"][0] for result in results for run in result["runs"])
    panels = [("train_loss", "train logloss", "training loss")]
    if with_valid:
        panels.append(("valid_gauc", "validation user-weighted AUC", "validation GAUC (selects the epoch)"))
    panels.append(("gauc", "test user-weighted AUC", "test GAUC"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for result in results:
        epochs_run = [run["history"]["epochs"] for run in result["runs"]]
        longest = max(len(epochs) for epochs in epochs_run)
        epochs = np.arange(1, longest + 1)
        color = None
        for axis, (name, _, _) in zip(axes, panels):
            values = np.full((len(epochs_run), longest), np.nan)  # runs stopped early: NaN after their end
            for i, run_epochs in enumerate(epochs_run):
                values[i, :len(run_epochs)] = [epoch[name] for epoch in run_epochs]
            line, = axis.plot(epochs, np.nanmean(values, axis=0), marker="o", color=color,
                              label=result["row"]["name"])
            color = line.get_color()
            if len(values) > 1:
                axis.fill_between(epochs, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color,
                                  alpha=0.15)
    for axis, (_, ylabel, panel_title) in zip(axes, panels):
        axis.set(xlabel="epoch", ylabel=ylabel, title=panel_title)
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].legend(fontsize=8)
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
