"""Quality against a peer: DeepCTR-Torch 0.3.0's ``DIN`` beside our ``din train``, on the very same samples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_peer.py --data movielens --seeds 1-3 --out runs/peer/ml

The data is loaded exactly as ``din train`` loads it (``din.cli._load_split`` on a ``din train`` argument
namespace: ``din.data.load_data``, then ``carve_validation`` with ``--valid-fraction`` and ``--seed``). Each
part (train, validation, test) is turned into the padded arrays our model gets, ``InteractionData.batch``
over all its samples (histories left-aligned, cut to their last ``--max-len`` behaviours, 0-padded, with
their lengths), and those arrays are what DeepCTR-Torch is fed: ``{goods, cate, hist_goods, hist_cate,
seq_length}``. The script asserts (raises, also under ``python -O``) that they are identical to the batches
``din.train`` builds for evaluation and, as a multiset, for one shuffled training epoch; that they survive
DeepCTR's float32 input matrix exactly; that the history cut is the last ``max_len`` behaviours; and that
the test arrays are ``split.test``'s samples, labels and users. Every setting is scored by our metric code
(``din.metrics``: AUC, user-weighted GAUC of paper Eq. 10, per-user AUC, logloss, as ``din.train.evaluate``),
which is checked against scikit-learn on every run's test predictions (AUC and logloss to 1e-9; the
user-weighted GAUC, by a per-user ``roc_auc_score`` loop, once per invocation).

Settings (``--settings``, default all three):

``ours``           ``din train`` with its CLI defaults (DIN, Dice head, softmax attention with scale D**-0.5,
                   no embedding regulariser, widths 18+18, N(0, 1e-4) embeddings), trained by
                   ``din.cli._train_one`` with this script's ``--epochs/--patience/--batch-size/--lr``.
``peer-defaults``  ``deepctr_torch.models.DIN`` with every default of the peer: DNN (256, 128) relu, attention
                   (64, 16) Dice, att_weight_normalization False, l2_reg_embedding 1e-6, init_std 1e-4, no
                   BatchNorm, no dropout; ``compile('adam', 'binary_crossentropy')`` (Adam, lr 1e-3 whatever
                   ``--lr`` says).
``peer-matched``   the peer as close to our defaults as its options allow: DNN (200, 80), attention (80, 40)
                   sigmoid, att_weight_normalization True (softmax), l2_reg_embedding 0, init_std 1e-4, Adam
                   with ``--lr``. The DNN activation is PReLU: the peer's ``DNN`` builds Dice for 3-D inputs
                   (its ``dice_dim`` defaults to 3 and ``DIN`` does not pass one), so ``dnn_activation='dice'``
                   fails on DIN's 2-D head input (checked at run time; Dice is used if a version accepts it).
                   Differences that remain (``MATCHED_DIFFERENCES``): no softmax scale D**-0.5; no input
                   BatchNorm before the head; no ``pooled * candidate`` term in the head input; PReLU with one
                   shared slope per layer instead of our per-unit Dice; head and attention Linear weights
                   initialised N(0, 1e-4) (ours: PyTorch's default); no output bias in the last Linear (a
                   separate scalar bias instead); the padding row 0 of the embeddings is a trained row (ours:
                   zero, frozen), which matters only for empty histories, where the peer's softmax spreads
                   uniform weight over the padding positions (ours pools nothing); the loss is summed over
                   the batch (ours: mean), which Adam almost cancels; ids reach the peer as float32.

Both peer settings are trained with our protocol: per epoch one call of the peer's own ``fit(x, y,
batch_size, epochs=1, verbose=0, shuffle=True)`` (its optimiser persists across calls: ``compile`` made it
once; asserted via the object and Adam's step counts), then ``predict(x, batch_size=4096)`` on the
validation and test parts; the epoch with the best validation GAUC is kept and training stops after
``--patience`` epochs without a better one; the reported test figures are the kept epoch's. ``samples/s`` is
the training samples over the wall time of the ``fit`` call (ours: of ``din.train``'s epoch loop, batch
building included).

Output: a table (mean±std over ``--seeds`` of the test AUC, GAUC, logloss at each run's best validation
epoch, RelaImpr on GAUC against ``ours``, best epoch, samples/s) on stdout, progress on stderr, and with
``--out DIR`` ``peer.json`` (rows, per-epoch histories, checks, configurations) and ``peer.md``, both written
atomically (``peer.json`` after every run).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import import_deepctr  # noqa: E402
from din import metrics  # noqa: E402
from din.checkpoint import load_checkpoint, write_json_atomic, write_text_atomic  # noqa: E402
from din.cli import _load_split, _positive_int, _regularizer, _train_one, _valid_fraction, build_parser  # noqa: E402
from din.compare import METRICS, parse_seeds, selected_epoch, summarise_runs  # noqa: E402
from din.data import InteractionData  # noqa: E402
from din.train import EpochSelection, TrainConfig, prefixed  # noqa: E402
from din.train import predict as din_predict  # noqa: E402

SETTINGS = ("ours", "peer-defaults", "peer-matched")
LABELS = {"ours": "ours (din train)", "peer-defaults": "DeepCTR defaults", "peer-matched": "DeepCTR matched"}
PEER_VERSION = "0.3.0"
INSTALL_HINT = f"pip install --no-deps deepctr-torch=={PEER_VERSION}"
PREDICT_BATCH = 4096  # the peer's predict batch; din.train evaluates with TrainConfig.eval_batch_size, the same
FLOAT32_EXACT = 2 ** 24  # DeepCTR feeds ids as float32: exact below this
TOLERANCE = 1e-9  # our metrics against scikit-learn

MATCHED_DIFFERENCES = (
    "no softmax scale D**-0.5 (the peer's attention has none; ours multiplies the scores by 36**-0.5)",
    "no BatchNorm on the head's input (ours normalises the MLP input, as the official code)",
    "no pooled*candidate term in the head input (peer: [candidate, pooled], 72 wide; ours: "
    "[pooled, candidate, pooled*candidate], 108 wide)",
    "head activation PReLU with one shared slope per layer (the peer's DNN cannot run Dice on DIN's 2-D head "
    "input); ours: Dice per unit",
    "head and attention Linear weights initialised N(0, 1e-4) (the peer's DNN init_std); ours: PyTorch's default",
    "last Linear without bias plus a separate scalar output bias (same function class)",
    "embedding row 0 is a trained row, not a frozen zero padding row; with softmax an empty history pools the "
    "padding rows uniformly (ours: nothing)",
    "loss summed over the batch (ours: mean); Adam is nearly invariant to that scale",
    "ids fed as float32 (exact below 2**24, asserted)",
)


# --------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------

def _settings(text: str) -> List[str]:
    chosen: List[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item not in SETTINGS:
            raise ValueError(f"--settings: unknown setting {item!r}; choose from {', '.join(SETTINGS)}")
        if item not in chosen:
            chosen.append(item)
    if not chosen:
        raise ValueError("--settings: give at least one setting")
    return chosen


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="movielens",
                        help="a data spec as for 'din train': movielens, synthetic, amazon-csv:PATH, taobao:PATH, "
                             "a saved split folder ...")
    parser.add_argument("--max-len", type=_positive_int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="split seed (data, validation carve)")
    parser.add_argument("--seeds", default="1-3", help="training seeds, e.g. '1-3' or '1,2,3' (default 1-3)")
    parser.add_argument("--epochs", type=_positive_int, default=20,
                        help="the most epochs (default 20: the peer learns slower than ours and needs room)")
    parser.add_argument("--patience", type=_positive_int, default=2)
    parser.add_argument("--valid-fraction", type=_valid_fraction, default=0.1)
    parser.add_argument("--batch-size", type=_positive_int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr of ours and peer-matched (default 1e-3)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated: " + ", ".join(SETTINGS) + " (default all)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for peer.json and peer.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (progress lines still go to stderr)")
    return parser


def din_train_args(args) -> argparse.Namespace:
    """The namespace ``din train`` would parse for this run: its defaults plus our shared protocol flags."""
    argv = ["train", "--data", args.data, "--max-len", str(args.max_len), "--seed", str(args.seed),
            "--epochs", str(args.epochs), "--patience", str(args.patience),
            "--valid-fraction", repr(args.valid_fraction), "--batch-size", str(args.batch_size),
            "--lr", repr(args.lr), "--device", "cpu"]
    if args.quiet:
        argv.append("--quiet")
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------------------------------------
# the peer
# --------------------------------------------------------------------------------------------------------

def import_peer():
    """``(DIN, SparseFeat, VarLenSparseFeat, DNN, version)``; ValueError naming the install if missing.

    Its version check's line is kept off stdout, the table's stream (``_timing.import_deepctr``).
    """
    try:
        deepctr_torch = import_deepctr()
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.layers.core import DNN
        from deepctr_torch.models import DIN
    except ImportError as error:
        raise ValueError(f"deepctr_torch is not installed ({error}); install it with: {INSTALL_HINT}") from None
    version = getattr(deepctr_torch, "__version__", "?")
    if version != PEER_VERSION:
        print(f"warning: deepctr_torch {version}, this script was written against {PEER_VERSION} "
              f"({INSTALL_HINT})", file=sys.stderr)
    return DIN, SparseFeat, VarLenSparseFeat, DNN, version


def peer_dnn_supports_dice(DNN) -> bool:
    """Whether the peer's DNN, built as DIN builds it (no dice_dim), runs Dice on a 2-D input [B, F]."""
    try:
        layer = DNN(inputs_dim=8, hidden_units=(4,), activation="dice")
        layer.train()
        layer(torch.randn(3, 8))
    except AssertionError:
        return False
    return True


def peer_columns(SparseFeat, VarLenSparseFeat, num_goods: int, num_cates: int, goods_dim: int, cate_dim: int,
                 max_len: int) -> list:
    return [
        SparseFeat("goods", num_goods, embedding_dim=goods_dim),
        SparseFeat("cate", num_cates, embedding_dim=cate_dim),
        VarLenSparseFeat(SparseFeat("hist_goods", num_goods, embedding_dim=goods_dim, embedding_name="goods"),
                         maxlen=max_len, length_name="seq_length"),
        VarLenSparseFeat(SparseFeat("hist_cate", num_cates, embedding_dim=cate_dim, embedding_name="cate"),
                         maxlen=max_len, length_name="seq_length"),
    ]


def peer_config(setting: str, args, dice_ok: bool) -> Dict:
    """DIN(...) keyword arguments and the optimiser of a peer setting (JSON-friendly)."""
    if setting == "peer-defaults":
        return {"din_kwargs": {}, "optimizer": "adam (compile('adam'): torch.optim.Adam, lr 1e-3)", "lr": 1e-3}
    return {"din_kwargs": {"dnn_hidden_units": [200, 80], "dnn_activation": "dice" if dice_ok else "prelu",
                           "att_hidden_size": [80, 40], "att_activation": "sigmoid",
                           "att_weight_normalization": True, "l2_reg_embedding": 0.0, "init_std": 1e-4},
            "optimizer": f"torch.optim.Adam(lr={args.lr})", "lr": args.lr}


# --------------------------------------------------------------------------------------------------------
# inputs: the peer's arrays are our batches
# --------------------------------------------------------------------------------------------------------

FIELDS = (("goods", "goods"), ("cate", "cate"), ("hist_goods", "hist_goods"), ("hist_cate", "hist_cates"),
          ("seq_length", "lengths"))  # peer name, Batch attribute


def peer_inputs(data: InteractionData, max_len: int):
    """The peer's ``x`` dict and ``y`` from one ``batch()`` over every sample, plus the users."""
    batch = data.batch(np.arange(len(data)), max_len)
    x = {name: getattr(batch, attr).numpy() for name, attr in FIELDS}
    return x, batch.label.numpy(), batch.user.numpy()


def _fail(message: str) -> None:
    raise AssertionError(message)


def _rows(x: Dict[str, np.ndarray], order: Sequence[str], *extra: np.ndarray) -> np.ndarray:
    n = len(x["goods"])
    return np.concatenate([x[name].reshape(n, -1).astype(np.int64) for name in order]
                          + [np.asarray(e).reshape(n, -1).astype(np.int64) for e in extra], axis=1)


def check_inputs(part: str, data: InteractionData, x: Dict[str, np.ndarray], y: np.ndarray, users: np.ndarray,
                 max_len: int, feature_index: Dict, *, train_batch: Optional[int] = None,
                 train_seed: Optional[int] = None) -> Dict:
    """Raise unless the peer's arrays of ``part`` are exactly what our model gets; returns what was checked."""
    n = len(data)
    checks = []
    for name, array in list(x.items()) + [("label", y), ("user", users)]:
        if len(array) != n:
            _fail(f"{part}: {name} has {len(array)} rows, the data {n} samples")
    if not (np.array_equal(y, data.label) and np.array_equal(users, data.user)):
        _fail(f"{part}: labels or users differ from the data's")
    checks.append("labels and users are the part's, in order")
    # 1. the batches din.train's evaluate/predict build (shuffle=False, eval batch size)
    reference = list(data.batches(TrainConfig().eval_batch_size, max_len, shuffle=False))
    for name, attr in FIELDS:
        joined = torch.cat([getattr(b, attr) for b in reference]).numpy()
        if joined.shape != x[name].shape or not np.array_equal(joined, x[name]):
            _fail(f"{part}: {name} differs from din.train's evaluation batches")
    if not np.array_equal(torch.cat([b.label for b in reference]).numpy(), y):
        _fail(f"{part}: labels differ from din.train's evaluation batches")
    checks.append("identical to din.train's evaluation batches (batches(4096, shuffle=False))")
    # 2. the history cut and padding, from the flat behaviour arrays directly
    lengths = x["seq_length"]
    if not np.array_equal(lengths, np.minimum(data.hist_end - data.hist_start, max_len)):
        _fail(f"{part}: seq_length is not min(history length, max_len)")
    if x["hist_goods"].shape != (n, max_len):
        _fail(f"{part}: hist_goods has shape {x['hist_goods'].shape}, expected {(n, max_len)}")
    offsets = np.arange(max_len)
    valid = offsets[None, :] < lengths[:, None]
    positions = np.clip((data.hist_end - lengths)[:, None] + offsets[None, :], 0, max(data.num_behaviours - 1, 0))
    for name, flat in (("hist_goods", data.behaviour_goods), ("hist_cate", data.behaviour_cates)):
        expected = np.where(valid, flat[positions] if data.num_behaviours else 0, 0)
        if not np.array_equal(x[name], expected):
            _fail(f"{part}: {name} is not the last max_len behaviours, left-aligned and 0-padded")
        if np.any(x[name][valid] == 0) or np.any(x[name][~valid] != 0):
            _fail(f"{part}: {name} has a 0 inside a history or a non-0 in the padding")
    checks.append("histories = the last max_len behaviours of hist_start:hist_end, left-aligned, 0-padded")
    # 3. what the peer actually computes on: its float32 input matrix, sliced by its feature_index
    matrix = np.concatenate([x[name].reshape(n, -1) for name in feature_index], axis=-1)
    if matrix.size and int(matrix.max()) >= FLOAT32_EXACT:
        _fail(f"{part}: an id >= 2**24 would not survive DeepCTR's float32 inputs")
    as_float = torch.from_numpy(matrix).float()
    for name, (begin, end) in feature_index.items():
        if not np.array_equal(as_float[:, begin:end].long().numpy(), x[name].reshape(n, -1)):
            _fail(f"{part}: {name} changes in DeepCTR's float32 input matrix")
    checks.append("unchanged in DeepCTR's float32 input matrix (sliced by its feature_index)")
    # 4. training: the rows of one shuffled epoch of din.train, as a multiset
    if train_batch is not None:
        order = [name for name, _ in FIELDS]
        epoch = list(data.batches(train_batch, max_len, shuffle=True, seed=train_seed))
        ours = np.concatenate([_rows({name: getattr(b, attr).numpy() for name, attr in FIELDS}, order,
                                     b.label.numpy(), b.user.numpy()) for b in epoch])
        theirs = _rows(x, order, y, users)
        if ours.shape != theirs.shape or not np.array_equal(np.unique(ours, axis=0, return_counts=True)[1],
                                                            np.unique(theirs, axis=0, return_counts=True)[1]) \
                or not np.array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0)):
            _fail(f"{part}: the peer's training rows are not those of din.train's shuffled epoch")
        checks.append(f"as a multiset, the rows of din.train's shuffled epoch (batch {train_batch})")
    empty = int(np.sum(lengths == 0))
    return {"samples": n, "positives": int(y.sum()), "users": int(len(np.unique(users))), "empty_histories": empty,
            "mean_length": float(lengths.mean()) if n else 0.0, "checks": checks}


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------

def score(data: InteractionData, probs: np.ndarray) -> Dict[str, float]:
    """din.train.evaluate's figures for ``probs`` on ``data``."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    labels, users = np.asarray(data.label), np.asarray(data.user)
    return {"auc": metrics.auc(labels, probs), "gauc": metrics.user_weighted_auc(users, labels, probs),
            "per_user_auc": metrics.per_user_auc(users, labels, probs), "logloss": metrics.logloss(labels, probs),
            "samples": int(len(data))}


def check_sklearn(labels: np.ndarray, probs: np.ndarray, users: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Raise unless din.metrics agrees with scikit-learn (AUC, logloss; with ``users`` the GAUC too)."""
    from sklearn.metrics import log_loss, roc_auc_score

    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    result = {"auc": metrics.auc(labels, probs), "auc_sklearn": float(roc_auc_score(labels, probs)),
              "logloss": metrics.logloss(labels, probs),
              "logloss_sklearn": float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))}
    if users is not None:
        users = np.asarray(users).reshape(-1)
        total, weight = 0.0, 0
        for user in np.unique(users):
            mask = users == user
            if 0 < labels[mask].sum() < mask.sum():
                total += roc_auc_score(labels[mask], probs[mask]) * mask.sum()
                weight += int(mask.sum())
        result.update(gauc=metrics.user_weighted_auc(users, labels, probs), gauc_sklearn=total / weight)
    for name in [key for key in result if not key.endswith("_sklearn")]:
        if not abs(result[name] - result[f"{name}_sklearn"]) <= TOLERANCE:
            _fail(f"din.metrics {name} {result[name]!r} != scikit-learn's {result[name + '_sklearn']!r}")
    return result


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------


def _epoch_line(record: Dict, improved: bool, selects: bool) -> str:
    valid = f"valid GAUC {record['valid_gauc']:.4f}{' *' if improved else '  '}  " if selects else ""
    return (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  {valid}test AUC {record['auc']:.4f}  "
            f"GAUC {record['gauc']:.4f}  logloss {record['logloss']:.4f}  "
            f"({record['samples_per_second']:,.0f} samples/s)")


def train_peer(setting: str, split, inputs: Dict, peer, config: Dict, args, seed: int,
               log: Callable[[str], None]) -> Dict:
    """One peer run with our protocol; returns a din.train-style history (epochs, best, last)."""
    DIN, SparseFeat, VarLenSparseFeat, _, _ = peer
    columns = peer_columns(SparseFeat, VarLenSparseFeat, split.num_goods, split.num_cates, args.goods_dim,
                           args.cate_dim, args.max_len)
    torch.manual_seed(seed)
    model = DIN(columns, ["goods", "cate"], device="cpu", seed=seed, **config["din_kwargs"])
    if setting == "peer-defaults":
        model.compile("adam", "binary_crossentropy")
    else:
        model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), "binary_crossentropy")
    optimizer = model.optim
    x_train, y_train, _ = inputs["train"]
    n_train = len(y_train)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    selects = split.valid is not None
    history = {"setting": setting, "peer": config, "seed": seed,
               "selection": "best validation GAUC" if selects else "last epoch (no validation part)", "epochs": []}
    selection = EpochSelection(history, selects, args.patience, args.epochs)  # din train's rule
    for epoch in range(1, args.epochs + 1):
        chatter = io.StringIO()  # fit prints the device and "Train on N samples" every call
        started = time.perf_counter()
        with contextlib.redirect_stdout(chatter):
            fit_history = model.fit(dict(x_train), y_train, batch_size=args.batch_size, epochs=1, verbose=0,
                                    shuffle=True)
        seconds = time.perf_counter() - started
        if model.optim is not optimizer:
            _fail(f"{setting}: fit replaced the optimiser")
        steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
        if steps != {epoch * steps_per_epoch}:
            _fail(f"{setting}: Adam step counts {sorted(steps)} after epoch {epoch}, expected "
                  f"{epoch * steps_per_epoch}: the optimiser state did not persist across fit calls")
        record = {"epoch": epoch, "train_loss": float(fit_history.history["loss"][-1]), "train_seconds": seconds,
                  "samples_per_second": n_train / max(seconds, 1e-9), "adam_steps": epoch * steps_per_epoch}
        started = time.perf_counter()
        if selects:
            x_valid = inputs["valid"][0]
            record.update(prefixed("valid_", score(split.valid, model.predict(dict(x_valid), PREDICT_BATCH))))
        test_probs = model.predict(dict(inputs["test"][0]), PREDICT_BATCH).reshape(-1)
        record.update(score(split.test, test_probs))
        record["predict_seconds"] = time.perf_counter() - started
        if epoch == 1:  # our metric code against scikit-learn on this run's predictions
            history["sklearn_check"] = check_sklearn(split.test.label, test_probs)
        history["epochs"].append(record)
        improved = selection.observe(record)
        if improved:
            history["best_test_probs"] = test_probs
        log(_epoch_line(record, improved, selects))
        if selection.stop:
            log(selection.stop_message())
            break
    return history


def train_ours(train_args, split, out: Optional[Path], seed: int, log_tag: str) -> Dict:
    """``din train`` with its defaults (via din.cli._train_one); checks its kept model reproduces its figures."""
    regularizer, reg_lambda = _regularizer(train_args)
    with contextlib.ExitStack() as stack:
        folder = out if out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        history = _train_one(train_args, split, folder, model_name=train_args.model,
                             activation=train_args.activation, regularizer=regularizer, reg_lambda=reg_lambda,
                             seed=seed, tag=log_tag)
        model, _ = load_checkpoint(folder / "model.pt")  # the best validation epoch's weights
    probs = din_predict(model, split.test, train_args.max_len, TrainConfig().eval_batch_size)
    again = score(split.test, probs)
    best = selected_epoch(history)
    for name in METRICS:
        if not abs(again[name] - best[name]) <= 1e-12:
            _fail(f"ours: the kept model scores {name} {again[name]!r}, its history {best[name]!r}")
    if again["samples"] != len(split.test) or history["data"] != split.summary():
        _fail("ours: trained or scored on another split than the peer's")
    history["best_test_probs"] = probs
    history["sklearn_check"] = check_sklearn(split.test.label, probs)
    return history


# --------------------------------------------------------------------------------------------------------
# summary and tables
# --------------------------------------------------------------------------------------------------------

def summarise(setting: str, runs: Sequence[Dict]) -> Dict:
    """din.compare's row statistics over seeds of each run's selected epoch, with the epochs each run took."""
    row = {"name": LABELS[setting], "setting": setting, **summarise_runs(runs)}
    row["epochs_run"] = [len(run["history"]["epochs"]) for run in runs]
    return row


def _base(rows: Sequence[Dict]) -> Dict:
    return next((row for row in rows if row["setting"] == "ours"), rows[0])


def format_table(rows: Sequence[Dict]) -> str:
    base = _base(rows)
    several = any(len(row["seeds"]) > 1 for row in rows)

    def cell(row: Dict, name: str, digits: int = 4) -> str:
        return f"{row[name]:.{digits}f}±{row[name + '_std']:.{digits}f}" if several else f"{row[name]:.{digits}f}"

    width = 15 if several else 7
    lines = [f"{'Setting':<18} {'AUC':>{width}} {'GAUC':>{width}} {'Logloss':>{width}} {'RelaImpr':>9} "
             f"{'best epoch':>10} {'samples/s':>9}"]
    for row in rows:
        impr = metrics.rela_impr(row["gauc"], base["gauc"]) * 100
        epoch = cell(row, "epoch", 1) if several else f"{row['epoch']:.0f}"
        lines.append(f"{row['name']:<18} {cell(row, 'auc'):>{width}} {cell(row, 'gauc'):>{width}} "
                     f"{cell(row, 'logloss'):>{width}} {impr:>+8.2f}% {epoch:>10} {row['samples_per_second']:>9,.0f}")
    seeds = rows[0]["seeds"]
    chosen = "best validation epoch" if all("valid_gauc" in row for row in rows) else "last epoch"
    lines.append(f"GAUC: user-weighted AUC (paper Eq. 10); RelaImpr on GAUC against {base['name']}; test metrics at "
                 f"each run's {chosen}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
                 + (" (mean±std)" if several else "") + "; samples/s: training, one thread per --threads")
    return "\n".join(lines)


def format_markdown(rows: Sequence[Dict], matched_activation: str) -> str:
    base = _base(rows)
    lines = ["| Setting | AUC | user-weighted AUC | logloss | RelaImpr (GAUC) | best epoch | samples/s | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"{row[name]:.4f} ± {row[name + '_std']:.4f}" for name in ("auc", "gauc", "logloss")]
        impr = metrics.rela_impr(row["gauc"], base["gauc"]) * 100
        lines.append(f"| {row['name']} | {' | '.join(cells)} | {impr:+.2f}% | {row['epoch']:.1f} ± "
                     f"{row['epoch_std']:.1f} | {row['samples_per_second']:,.0f} | "
                     f"{','.join(str(s) for s in row['seeds'])} |")
    if any(row["setting"] == "peer-matched" for row in rows):
        lines += ["", f"DeepCTR matched (head activation {matched_activation}) still differs from ours in:"]
        lines += [f"- {difference}" for difference in MATCHED_DIFFERENCES]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------

def _jsonable(history: Dict) -> Dict:
    return {key: value for key, value in history.items() if key != "best_test_probs"}


def run(args) -> int:
    settings = _settings(args.settings)
    seeds = parse_seeds(args.seeds)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    torch.set_num_threads(args.threads)
    peer_wanted = any(s != "ours" for s in settings)
    peer = import_peer() if peer_wanted else None
    dice_ok = peer_dnn_supports_dice(peer[3]) if peer_wanted else False
    matched_activation = "dice" if dice_ok else "prelu"

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    train_args = din_train_args(args)
    args.goods_dim, args.cate_dim = train_args.goods_dim, train_args.cate_dim
    if train_args.use_user:  # pragma: no cover - din train's default is off; the peer is fed no user then
        raise ValueError("din train's defaults changed to use the user id: feed the peer 'user' too")
    split = _load_split(train_args)  # exactly din train's loading
    say(f"data {args.data}: {split.summary()}")

    inputs, input_checks, feature_index = {}, {}, None
    if peer_wanted:
        _, SparseFeat, VarLenSparseFeat, _, _ = peer
        from deepctr_torch.inputs import build_input_features
        feature_index = build_input_features(peer_columns(SparseFeat, VarLenSparseFeat, split.num_goods,
                                                          split.num_cates, args.goods_dim, args.cate_dim,
                                                          args.max_len))
        if list(feature_index) != ["goods", "cate", "hist_goods", "seq_length", "hist_cate"]:
            _fail(f"unexpected DeepCTR feature_index {list(feature_index)}")
        parts = [("train", split.train), ("valid", split.valid), ("test", split.test)]
        for part, data in parts:
            if data is None:
                continue
            x, y, users = peer_inputs(data, args.max_len)
            extra = {"train_batch": args.batch_size, "train_seed": seeds[0] * 1000 + 1} if part == "train" else {}
            input_checks[part] = check_inputs(part, data, x, y, users, args.max_len, feature_index, **extra)
            inputs[part] = (x, y, users)
        if inputs["test"][0]["goods"].shape[0] != len(split.test) or not np.array_equal(inputs["test"][1],
                                                                                        split.test.label):
            _fail("the peer's test set is not split.test")
        say("peer inputs identical to our batches: " + ", ".join(
            f"{part} {check['samples']} samples" for part, check in input_checks.items()))

    configs = {s: peer_config(s, args, dice_ok) for s in settings if s != "ours"}
    results: Dict[str, List[Dict]] = {s: [] for s in settings}
    gauc_check: Optional[Dict] = None
    started = time.perf_counter()

    def payload() -> Dict:
        rows = [summarise(s, results[s]) for s in settings if results[s]]
        return {
            "data": args.data, "split_seed": args.seed, "seeds": seeds, "settings": settings,
            "protocol": {"epochs": args.epochs, "patience": args.patience, "valid_fraction": args.valid_fraction,
                         "batch_size": args.batch_size, "lr": args.lr, "max_len": args.max_len,
                         "threads": args.threads, "predict_batch": PREDICT_BATCH,
                         "selection": "best validation GAUC, test figures of that epoch"},
            "split": split.summary(), "peer_version": peer[4] if peer else None,
            "peer_configs": configs, "peer_dnn_supports_dice": dice_ok,
            "matched_differences": list(MATCHED_DIFFERENCES),
            "ours_config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                            for k, v in vars(train_args).items() if k != "handler"},
            "checks": {"inputs": input_checks, "feature_index": [[k, *v] for k, v in (feature_index or {}).items()],
                       "sklearn": [{"setting": s, "seed": r["seed"], **r["history"]["sklearn_check"]}
                                   for s in settings for r in results[s]],
                       "sklearn_gauc": gauc_check},
            "rows": rows, "table": format_table(rows) if rows else "",
            "runs": {s: [{"seed": r["seed"], "history": _jsonable(r["history"])} for r in results[s]]
                     for s in settings},
            "wall_seconds": time.perf_counter() - started,
            "command": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }

    for setting in settings:
        for seed in seeds:
            tag = f"{setting} seed {seed}"
            say(f"[{tag}] training")
            log = (lambda tag: lambda line: say(f"[{tag}] {line}"))(tag)
            if setting == "ours":
                out = args.out / "ours" / f"seed{seed}" if args.out is not None else None
                history = train_ours(train_args, split, out, seed, tag)
            else:
                history = train_peer(setting, split, inputs, peer, configs[setting], args, seed, log)
            if gauc_check is None:  # once per invocation: the user-weighted GAUC by a scikit-learn loop
                gauc_check = check_sklearn(split.test.label, history["best_test_probs"], split.test.user)
                gauc_check["setting"], gauc_check["seed"] = setting, seed
            results[setting].append({"seed": seed, "history": history})
            best = selected_epoch(history)
            say(f"[{tag}] kept epoch {best['epoch']}: test AUC {best['auc']:.4f}  GAUC {best['gauc']:.4f}  "
                f"logloss {best['logloss']:.4f}")
            if args.out is not None:
                write_json_atomic(args.out / "peer.json", payload())

    final = payload()
    print(final["table"])
    if settings.count("peer-matched"):
        print(f"DeepCTR matched: head activation {matched_activation}; still differs from ours in: no softmax scale, "
              "no input BatchNorm, no pooled*candidate term, shared PReLU slope, N(0,1e-4) Linear init, trained "
              "padding row (see peer.md)")
    if args.out is not None:
        write_json_atomic(args.out / "peer.json", final)
        write_text_atomic(args.out / "peer.md", format_markdown(final["rows"], matched_activation) + "\n")
        print(f"wrote {args.out / 'peer.json'} and {args.out / 'peer.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
