"""Command line: ``din train``, ``din evaluate``, ``din score``, ``din export``, ``din compare``, ``din prepare``
(also ``python -m din``)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .checkpoint import check_output_dir, load_checkpoint, run_lock, write_json_atomic, write_text_atomic
from .train import RESUME_FILE, load_resume
from .compare import (PAPER_VARIANTS, REGULARIZER_VARIANTS, VARIANTS, check_plot_available, format_markdown,
                      format_table, parse_seeds, parse_variants, plot_curves, selected_epoch, summarise)
from .data import carve_validation, load_data
from .features import EMBEDDING_INITS
from .model import ATTENTION_ACTIVATIONS, ModelConfig, build_model
from .search import SEARCH_MODES
from .prepare import add_prepare_parser
from .regularization import embedding_setup
from .train import OPTIMIZERS, TrainConfig, evaluate, train


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _units(text: str) -> Tuple[int, ...]:
    """``"200,80"`` -> (200, 80): layer widths, each a positive integer."""
    try:
        units = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        units = ()
    if not units or any(unit <= 0 for unit in units):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like '200,80', got {text!r}")
    return units


def _valid_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="movielens",
                        help="'movielens' (bundled ml-latest-small), 'synthetic', 'synthetic-long' (clicks "
                             "planted before the last 50 of 200-500 behaviours), or a PATH: a folder with "
                             "MovieLens ratings.csv + movies.csv, or one written by 'din prepare'")
    parser.add_argument("--max-len", type=_positive_int, default=50,
                        help="keep the last N behaviours of each history (default 50); with a history search "
                             "these are what the search looks through (e.g. --max-len 500 --top-k 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and shuffling")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")


def _default_threads() -> int:
    """$OMP_NUM_THREADS when the user set it, else 1 (see --threads)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=_default_threads(),
                        help="CPU threads of the attention (din_kernels' C++ op; default: $OMP_NUM_THREADS if "
                             "set, else 1). Give each job threads <= cores / jobs. Without the C++ op these are "
                             "torch's threads")
    parser.add_argument("--torch-threads", type=_positive_int, default=None,
                        help="torch's threads for everything else (default 1 where the C++ op runs: measured on "
                             "2 cores, Amazon Beauty, one job alone trained 1.1x faster with torch at 1 thread "
                             "and the attention at 2 than with torch at 2, and beside a busy neighbour 6x "
                             "faster, since every torch op's parallel region waits for a descheduled thread)")


def configure_threads(threads: int, torch_threads: Optional[int] = None) -> None:
    """The CPU threads of a job (``--threads``, ``--torch-threads``): the C++ attention op at ``threads``, its
    blocks robust on a busy machine; torch's own ops at ``torch_threads`` (default 1). Where the C++ op is
    not built the attention is torch ops, and torch gets ``threads`` unless told otherwise."""
    import torch

    import din_kernels as dk

    if dk.cpu_op_available():
        dk.set_cpu_threads(threads)
        torch.set_num_threads(torch_threads or 1)
    else:
        torch.set_num_threads(torch_threads or threads)


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    _add_data_args(parser)
    _add_threads_arg(parser)
    parser.add_argument("--epochs", type=_positive_int, default=10,
                        help="the most epochs to train; early stopping (--patience) usually ends sooner "
                             "(default 10)")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="training samples per step")
    parser.add_argument("--lr", type=_positive_float, default=1e-3,
                        help="learning rate of every optimiser (the MBA tables' included)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="dense optimiser; with --mba-lambda the tables' MBA update follows it (sgd, "
                             "adagrad: fused into the tables' backward, row-wise; adam: SparseAdam)")
    parser.add_argument("--attention-normalize", choices=("softmax", "none"), default="softmax",
                        help="'softmax' (default) over the valid positions with scale D**-0.5, as the official "
                             "code; 'none' keeps the weights' sum as interest intensity, as the paper's text. "
                             "softmax scored higher GAUC on all three real data sets here (docs/results.md)")
    parser.add_argument("--l2-lambda", type=float, default=2e-5,
                        help="strength of the dense full-table L2 (--l2 full, or the din-l2 variant); the "
                             "default 2e-5 gives each row about the per-epoch pull of MBA at 0.01 on ~500 "
                             "batches an epoch (MBA charges a row lam/n_j in each of its ~n_j batches)")
    parser.add_argument("--valid-fraction", type=_valid_fraction, default=0.1,
                        help="carve a validation part from the training samples with the test's protocol (per "
                             "user, latest first; or by user where the test users are unseen) and keep the "
                             "epoch with the best validation GAUC; every test figure is that epoch's (default "
                             "0.1; 0: no validation, the last epoch is kept)")
    parser.add_argument("--patience", type=_positive_int, default=2,
                        help="stop after this many epochs without a better validation GAUC (default 2)")
    parser.add_argument("--lr-decay", type=_decay, default=1.0,
                        help="multiply the learning rates by this after each epoch without a better validation "
                             "GAUC (FuxiCTR: 0.1; default 1: fixed)")
    _add_model_shape_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_shape_args(parser: argparse.ArgumentParser) -> None:
    defaults = ModelConfig()
    group = parser.add_argument_group("model shape (recorded in model.pt and metrics.json)")
    group.add_argument("--goods-dim", type=_positive_int, default=defaults.goods_dim,
                       help=f"goods embedding width (default {defaults.goods_dim})")
    group.add_argument("--cate-dim", type=_positive_int, default=defaults.cate_dim,
                       help=f"category embedding width (default {defaults.cate_dim})")
    group.add_argument("--use-user", action="store_true",
                       help="add a user-id embedding to the prediction MLP's input (off by default: "
                            "MovieLens' test users are unseen in training)")
    group.add_argument("--user-dim", type=_positive_int, default=defaults.user_dim,
                       help=f"user embedding width with --use-user (default {defaults.user_dim})")
    group.add_argument("--hidden-units", type=_units, default=defaults.hidden_units,
                       help="prediction MLP widths (default " + ",".join(map(str, defaults.hidden_units)) + ")")
    group.add_argument("--attention-units", type=_units, default=defaults.attention_units,
                       help="local activation unit widths (default "
                            + ",".join(map(str, defaults.attention_units)) + ")")
    group.add_argument("--attention-activation", choices=ATTENTION_ACTIVATIONS,
                       default=defaults.attention_activation,
                       help=f"local activation unit activation (default {defaults.attention_activation})")
    group.add_argument("--no-head-norm", dest="head_input_norm", action="store_false",
                       help="no BatchNorm on the prediction MLP's input (DeepCTR-Torch and FuxiCTR have none)")
    group.add_argument("--no-product-term", dest="product_term", action="store_false",
                       help="leave pooled * candidate out of the prediction MLP's input (DeepCTR-Torch, FuxiCTR)")
    group.add_argument("--embedding-init", choices=EMBEDDING_INITS, default=defaults.embedding_init,
                       help=f"embedding initialisation (default {defaults.embedding_init}; 'torch' is "
                            "nn.Embedding's N(0, 1), 'glorot' the official TF code's)")
    group.add_argument("--embedding-init-std", type=_positive_float, default=defaults.embedding_init_std,
                       help=f"std of the normal/uniform embedding init (default {defaults.embedding_init_std:g}, "
                            "as DeepCTR-Torch and FuxiCTR)")
    group.add_argument("--top-k", type=_positive_int, default=defaults.search_top_k,
                       help=f"with a history search (din train --history-search, din compare's *-search "
                            f"variants): the most behaviours kept per candidate for the pooling (default "
                            f"{defaults.search_top_k})")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_optimisation_args(parser)
    parser.add_argument("--model", choices=("din", "base"), default="din",
                        help="'din' (attention pooling of the history) or 'base' (sum pooling, the paper's BaseModel)")
    parser.add_argument("--activation", choices=("dice", "prelu"), default="dice",
                        help="activation of the prediction MLP (default dice)")
    parser.add_argument("--history-search", choices=SEARCH_MODES, default="none",
                        help="search before attention (SIM): 'category' keeps, per candidate, the --top-k most "
                             "recent behaviours of the candidate's category, 'inner-product' the --top-k whose "
                             "item embedding has the largest inner product with the candidate's; the pooling "
                             "sees only those (default none: all of the last --max-len)")
    parser.add_argument("--mba-lambda", type=float, default=0.0,
                        help="mini-batch aware L2 on the goods and category tables (paper: 0.01); "
                             "0 (default) turns it off")
    parser.add_argument("--l2", choices=("none", "full"), default="none",
                        help="'full': dense L2 over every row of the tables each step, the baseline the "
                             "paper argues against (strength --l2-lambda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for metrics.json, model.pt and resume.pt (written after every epoch)")
    parser.add_argument("--checkpoint-every", type=_nonnegative_int, default=0, metavar="STEPS",
                        help="with --out, also write resume.pt every STEPS training steps (0: at the end of "
                             "each epoch only)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR (its --out) where its resume.pt was last written (an "
                             "epoch's end, or a --checkpoint-every step), with its options; --epochs N "
                             "extends a finished run to N epochs")


def _add_compare_args(parser: argparse.ArgumentParser) -> None:
    _add_optimisation_args(parser)
    parser.add_argument("--variants", default="base,din",
                        help="comma-separated rows: " + ", ".join(VARIANTS) + "; or the presets 'paper' ("
                             + ",".join(PAPER_VARIANTS) + ") and 'regularizers' (" + ",".join(REGULARIZER_VARIANTS)
                             + "). Default: base,din")
    parser.add_argument("--seeds", default=None,
                        help="training seeds, e.g. '1,2,3' or '1-5' (default: --seed); the train/test split "
                             "always uses --seed")
    parser.add_argument("--mba-lambda", type=float, default=0.01,
                        help="MBA strength for the *-mba variants (default 0.01, the paper's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for compare.json and, per variant and seed, metrics.json and model.pt")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write training curves (train loss, test GAUC per epoch) to this image; "
                             "needs matplotlib (pip install 'din-kernels[plot]')")


def _check_top_k_used(args, searching: bool, where: str) -> None:
    """--top-k given on a command line that runs no search: an error rather than a silently ignored option."""
    if "top_k" in getattr(args, "explicit", ()) and not searching:
        raise ValueError(f"--top-k applies to a history search only: {where}")


def _model_config(args, model: str, activation: str, split, search: str = "none") -> ModelConfig:
    train = split.train
    dim = args.goods_dim + args.cate_dim
    scale = dim ** -0.5 if args.attention_normalize == "softmax" else None  # the official code's D**-0.5
    return ModelConfig(model=model, num_goods=train.num_goods, num_cates=train.num_cates,
                       num_users=train.num_users, goods_dim=args.goods_dim, cate_dim=args.cate_dim,
                       user_dim=args.user_dim, use_user=args.use_user, hidden_units=args.hidden_units,
                       activation=activation, attention_units=args.attention_units,
                       attention_activation=args.attention_activation,
                       attention_normalize=args.attention_normalize, attention_scale=scale,
                       embedding_init=args.embedding_init, embedding_init_std=args.embedding_init_std,
                       head_input_norm=args.head_input_norm, product_term=args.product_term,
                       history_search=search, search_top_k=args.top_k)


def _load_split(args):
    """The data, with the validation part carved once (seeded by --seed, shared by every run on it)."""
    split = load_data(args.data, max_len=args.max_len, seed=args.seed)
    if args.valid_fraction > 0:
        split = carve_validation(split, args.valid_fraction, seed=args.seed)
    return split


def _check_strengths(args, *, allow_zero: bool) -> None:
    """--mba-lambda and --l2-lambda finite and >= 0 (> 0 unless ``allow_zero``)."""
    for name in ("mba_lambda", "l2_lambda"):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {value}")


def _regularizer(args) -> Tuple[str, float]:
    """``din train``'s regulariser flags as (name, strength)."""
    _check_strengths(args, allow_zero=True)
    if args.mba_lambda > 0 and args.l2 == "full":
        raise ValueError("choose one regulariser: --mba-lambda or --l2 full, not both")
    if args.mba_lambda > 0:
        return "mba", args.mba_lambda
    if args.l2 == "full":
        return "full", args.l2_lambda
    return "none", 0.0


def _train_one(args, split, out: Optional[Path], *, model_name: str, activation: str, regularizer: str,
               reg_lambda: float, seed: int, tag: str, search: str = "none", resume: Optional[Dict] = None,
               distributed=None) -> Dict:
    import torch

    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               optimizer=args.optimizer, max_len=args.max_len, seed=seed, device=args.device,
                               regularizer=regularizer, reg_lambda=reg_lambda, valid_fraction=args.valid_fraction,
                               patience=args.patience, lr_decay=args.lr_decay,
                               checkpoint_every=getattr(args, "checkpoint_every", 0),  # ('din compare': none)
                               progress=not args.quiet and sys.stderr.isatty())  # bars on a terminal only
    torch.manual_seed(seed)
    model_config = _model_config(args, model_name, activation, split, search)
    setup = embedding_setup(train_config.regularizer, train_config.reg_lambda, split.train, train_config.max_len,
                            train_config.optimizer, train_config.lr, model_config.goods_dim, model_config.cate_dim)
    model = build_model(model_config, goods_table=setup.goods_table, cate_table=setup.cate_table)
    command = {key: (list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value)
               for key, value in vars(args).items() if key not in ("handler", "explicit")}
    history = train(model, split, train_config, out_dir=out, extra_optimizers=setup.make_optimizers(model),
                    regularizer=setup.penalty, log=lambda line: print(f"[{tag}] {line}", file=sys.stderr),
                    data_spec=args.data, resume=resume, command=command, distributed=distributed)
    if out is not None and (distributed is None or distributed.is_main):
        write_json_atomic(out / "metrics.json", history)
    return history


# what ``--resume`` takes from the command line rather than from the run it continues
_RESUME_OVERRIDES = ("resume", "out", "quiet", "threads", "torch_threads", "device")


def _resumed_args(args):
    """``args`` of the run ``--resume DIR`` continues: its saved arguments, with this command line's
    --epochs (when given), threads, device and verbosity; ``out`` is DIR."""
    payload = load_resume(args.resume / RESUME_FILE)
    saved = payload["history"].get("command")
    if saved is None:
        raise ValueError(f"{args.resume / RESUME_FILE} holds no command line to resume")
    merged = argparse.Namespace(**vars(args))
    for key, value in saved.items():
        if key in _RESUME_OVERRIDES or (key == "epochs" and "epochs" in args.explicit):
            continue
        setattr(merged, key, tuple(value) if isinstance(value, list) else value)
    merged.out = args.resume
    return merged, payload


@contextlib.contextmanager
def _output_folder(out: Optional[Path], distributed=None):
    """``--out`` checked and locked for the block (nothing without ``--out``). Under torchrun rank 0 alone checks
    and locks it (a second rank would find the lock held by a live process) and tells the others the outcome,
    so that a refused folder ends every process with the same one-line error instead of leaving them waiting
    for rank 0 at the first collective."""
    if out is None:
        yield
        return
    if distributed is None:
        check_output_dir(out)
        with run_lock(out):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if distributed.is_main:
            try:
                check_output_dir(out)
                stack.enter_context(run_lock(out))
            except ValueError as refused:
                error = str(refused)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        yield


def cmd_train(args) -> int:
    from .distributed import from_environment

    distributed = from_environment(args.device)  # None unless started by torchrun with several processes
    try:
        return _train_command(args, distributed)
    finally:
        if distributed is not None:
            distributed.close()


def _train_command(args, distributed) -> int:
    resume = None
    if getattr(args, "resume", None) is not None:
        args, resume = _resumed_args(args)  # every process reads it
    main = distributed is None or distributed.is_main
    with _output_folder(args.out, distributed):
        regularizer, reg_lambda = _regularizer(args)
        search = getattr(args, "history_search", "none")  # (a run saved before the option: none)
        _check_top_k_used(args, search != "none", "add --history-search category or inner-product")
        split = _load_split(args)
        history = _train_one(args, split, args.out, model_name=args.model, activation=args.activation,
                             regularizer=regularizer, reg_lambda=reg_lambda, seed=args.seed, tag=args.model,
                             search=search, resume=resume, distributed=distributed)
    if not main:
        return 0
    best = selected_epoch(history)
    chosen = f"epoch {best['epoch']}, best validation GAUC {best['valid_gauc']:.4f}" if "valid_gauc" in best \
        else f"epoch {best['epoch']}, the last"
    print(f"{args.model} ({chosen}): test AUC {best['auc']:.4f}  GAUC {best['gauc']:.4f}  "
          f"logloss {best['logloss']:.4f}")
    if args.out is not None:
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'model.pt'}")
    return 0


def cmd_evaluate(args) -> int:
    model, payload = load_checkpoint(args.checkpoint, map_location=args.device)
    train_config = payload.get("train_config", {})
    max_len = args.max_len or train_config.get("max_len", 50)
    seed = args.seed if args.seed is not None else train_config.get("seed", 0)
    trained_on = (payload.get("data") or {}).get("spec")
    data = args.data or trained_on
    if data is None:
        raise ValueError(f"{args.checkpoint} does not record the data it was trained on (a checkpoint from "
                         "before that was stored): pass --data")
    split = load_data(data, max_len=max_len, seed=seed)
    config = model.config
    test = split.test
    tables = [("goods", test.num_goods, config.num_goods), ("category", test.num_cates, config.num_cates)]
    if config.use_user:
        tables.append(("user", test.num_users, config.num_users))
    for table, needed, rows in tables:
        if needed > rows:
            raise ValueError(f"--data {data} has ids up to {needed - 1} for the {table} table, which has "
                             f"{rows} rows in {args.checkpoint}"
                             + (f" (trained on {trained_on})" if trained_on and trained_on != data else "")
                             + ": evaluate on the data the model was trained on")
    model.to(args.device)
    result = evaluate(model, test, max_len, device=args.device)
    print(f"{config.model}: AUC {result['auc']:.4f}  GAUC {result['gauc']:.4f}  "
          f"per-user AUC {result['per_user_auc']:.4f}  logloss {result['logloss']:.4f}  "
          f"({result['samples']} test samples)")
    return 0


def _input_lines(path: Path):
    """(line number, text) of each non-blank line of ``path``; a ValueError naming the line for bytes that
    are not UTF-8."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{number}: not UTF-8 text") from None
            if text.strip():
                yield number, text


def _check_output_file(path: Optional[Path], flag: str, suffix: Optional[str] = None) -> None:
    """``path`` usable as an output file: checked before any work starts."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{flag} {path} must end in {suffix}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: its folder is not writable")


def cmd_score(args) -> int:
    import json

    from .checkpoint import atomic_file
    from .serve import Scorer, parse_request

    _check_output_file(args.out, "--out")
    if not args.input.is_file():
        raise FileNotFoundError(f"--input {args.input} does not exist")
    max_len = "trained" if args.max_len is None else (args.max_len or None)  # 0: every behaviour
    scorer = Scorer.from_checkpoint(args.checkpoint, device=args.device, max_len=max_len)

    def requests():
        for number, text in _input_lines(args.input):
            try:
                yield number, parse_request(text, scorer)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{args.input}:{number}: {error}") from None

    # every line is checked before any is scored: bad input costs no scoring and leaves no partial output
    count = candidates = 0
    for _, (_, (_, pairs, _)) in requests():
        count, candidates = count + 1, candidates + pairs.shape[0]
    if count == 0:
        raise ValueError(f"{args.input} holds no requests (one JSON object per line, see 'din score --help')")

    def write(stream) -> None:
        for number, (request_id, checked) in requests():
            scores = scorer.score_checked(*checked)
            record = {"line": number} if request_id is None else {"line": number, "id": request_id}
            record["scores"] = [float(format(p, ".7g")) for p in scores.tolist()]
            stream.write(json.dumps(record) + "\n")

    if args.out is None:
        write(sys.stdout)
        return 0
    with atomic_file(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            write(stream)
    print(f"scored {count} requests ({candidates} candidates): wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    import time

    import torch

    from .serve import PROGRAM_INPUTS, example_inputs, export_program, max_difference, save_aoti_package, save_program

    _check_output_file(args.out, "--out", ".pt2")
    _check_output_file(args.aoti, "--aoti", ".pt2")
    if args.aoti is not None and args.aoti.resolve() == args.out.resolve():
        raise ValueError("--out and --aoti must be two different files")
    model, _ = load_checkpoint(args.checkpoint, map_location="cpu")
    model.eval()
    start = time.perf_counter()
    try:
        program = export_program(model)
    except Exception as error:  # torch.export's own failures: one line, --debug for the trace
        raise ValueError(f"torch.export failed: {str(error).strip().splitlines()[0]}") from error
    # a request of its own shape, to check the dynamic sizes too: 3 histories of 7, 5 candidates each
    inputs = example_inputs(model.config, batch=3, seq_len=7, candidates=5, generator=torch.Generator().manual_seed(1))
    differences = {}

    def verify(kind: str):
        def check(program_fn) -> None:
            differences[kind] = max_difference(program_fn, model, inputs)
            if not differences[kind] <= args.tolerance:
                raise ValueError(f"the {kind} gives scores {differences[kind]:.2e} away from the eager model's "
                                 f"(more than --tolerance {args.tolerance:g}): not written")
        return check

    save_program(program, args.out, verify=verify("exported program"))
    print(f"wrote {args.out} (torch.export, {time.perf_counter() - start:.1f} s): inputs "
          f"{', '.join(PROGRAM_INPUTS)} (int64) -> probabilities [B, C]; largest difference from the eager "
          f"model {differences['exported program']:.1e}. Load it with din.serve.load_program, or "
          f"torch.export.load after 'import din_kernels'")
    if args.aoti is not None:
        start = time.perf_counter()
        try:
            save_aoti_package(program, args.aoti, verify=verify("AOTInductor package"))
        except ValueError:
            raise
        except Exception as error:  # no C++ compiler, a compile error: one line, --debug for the trace
            raise ValueError(f"AOTInductor packaging failed ({args.out} was written): "
                             f"{str(error).strip().splitlines()[0]}") from error
        print(f"wrote {args.aoti} (AOTInductor, {time.perf_counter() - start:.1f} s); largest difference from "
              f"the eager model {differences['AOTInductor package']:.1e}. Load it with din.serve.load_program, "
              f"or torch._inductor.aoti_load_package after 'import din_kernels'")
    return 0


def cmd_compare(args) -> int:
    variants = parse_variants(args.variants)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    _check_strengths(args, allow_zero=False)  # every variant that uses one needs it on
    _check_top_k_used(args, any(v.search != "none" for v in variants),
                      "add a *-search variant to --variants (e.g. din-search)")
    if args.plot is not None:
        check_plot_available()  # fail now, not after an hour of training
    if args.out is not None:
        check_output_dir(args.out)
    split = _load_split(args)
    strengths = {"none": 0.0, "mba": args.mba_lambda, "full": args.l2_lambda}
    results = []
    for variant in variants:
        runs = []
        for seed in seeds:
            out = args.out / variant.key / f"seed{seed}" if args.out is not None else None
            history = _train_one(args, split, out, model_name=variant.model, activation=variant.activation,
                                 regularizer=variant.regularizer, reg_lambda=strengths[variant.regularizer],
                                 seed=seed, tag=f"{variant.key} seed {seed}", search=variant.search)
            runs.append({"seed": seed, "history": history})
        results.append({"row": summarise(variant, runs), "runs": runs})
    rows = [result["row"] for result in results]
    base = next((row for row in rows if row["variant"] == "base"), rows[0])
    table = format_table(rows, base)
    print(table)
    if args.out is not None:
        write_json_atomic(args.out / "compare.json", {
            "data": args.data, "split_seed": args.seed, "seeds": seeds, "rows": rows, "table": table,
            "curves": {result["row"]["variant"]: [run["history"]["epochs"] for run in result["runs"]]
                       for result in results}})
        write_text_atomic(args.out / "compare.md", format_markdown(rows, base) + "\n")
    if args.plot is not None:
        seeds_text = f"{len(seeds)} seeds (mean, band min-max)" if len(seeds) > 1 else f"seed {seeds[0]}"
        plot_curves(results, args.plot, title=f"{args.data}: {seeds_text}, at most {args.epochs} epochs")
        print(f"wrote {args.plot}")
    return 0


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's default in ``--help``, unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="din", description="Train and evaluate the Deep Interest Network.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (before the command)")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train one model and evaluate it after each epoch",
                                       formatter_class=_DefaultsHelp)
    _add_train_args(train_parser)
    train_parser.set_defaults(handler=cmd_train)

    eval_parser = commands.add_parser("evaluate", help="evaluate a checkpoint on a data set's test split",
                                      formatter_class=_DefaultsHelp)
    eval_parser.add_argument("--checkpoint", type=Path, required=True, help="a model.pt written by 'din train'")
    eval_parser.add_argument("--data", default=None,
                             help="a data spec as for 'din train' (default: the one the checkpoint was trained on)")
    eval_parser.add_argument("--max-len", type=_positive_int, default=None,
                             help="default: the value the checkpoint was trained with")
    eval_parser.add_argument("--seed", type=int, default=None,
                             help="split seed (default: the checkpoint's, so the test split matches)")
    eval_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    _add_threads_arg(eval_parser)
    eval_parser.set_defaults(handler=cmd_evaluate)

    score_parser = commands.add_parser(
        "score", help="score candidates for users' histories with a checkpoint (JSON lines in and out)",
        description="Score each request of --input, one JSON object per line: {\"id\": \"r1\", \"user\": 7, "
                    "\"history_items\": [3, 9, 4], \"history_categories\": [1, 2, 1], \"candidates\": "
                    "[[12, 2], [40, 1]]} (ids: the model's dense ids, 1..N-1; 'id' optional and echoed; 'user' "
                    "needed only by models trained with --use-user). Writes one line per request: {\"line\": 1, "
                    "\"id\": \"r1\", \"scores\": [p1, p2]}, the click probabilities in the candidates' order. "
                    "Every line is checked before any is scored; a bad one is a one-line error naming it.",
        formatter_class=_DefaultsHelp)
    score_parser.add_argument("--checkpoint", type=Path, required=True, help="a model.pt written by 'din train'")
    score_parser.add_argument("--input", type=Path, required=True, help="requests, one JSON object per line")
    score_parser.add_argument("--out", type=Path, default=None,
                              help="write the scores here, atomically (default: standard output)")
    score_parser.add_argument("--max-len", type=_nonnegative_int, default=None,
                              help="read only the last N behaviours of each history; 0: all of them (default: "
                                   "the checkpoint's training --max-len)")
    score_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    _add_threads_arg(score_parser)
    score_parser.set_defaults(handler=cmd_score)

    export_parser = commands.add_parser(
        "export", help="export a checkpoint as a torch.export program (and an AOTInductor package)",
        description="Export the checkpoint's model (eval mode) as a torch.export program of plain int64 tensors: "
                    "history_items [B, T], history_categories [B, T], lengths [B], candidate_items [B, C], "
                    "candidate_categories [B, C], user [B] -> probabilities [B, C]; B, T and C dynamic. The custom "
                    "ops stay inside: a process that loads it must 'import din_kernels' first. Both files are "
                    "checked against the eager model before they are written.",
        formatter_class=_DefaultsHelp)
    export_parser.add_argument("--checkpoint", type=Path, required=True, help="a model.pt written by 'din train'")
    export_parser.add_argument("--out", type=Path, required=True, help="the program, a .pt2 file")
    export_parser.add_argument("--aoti", type=Path, default=None,
                               help="also compile it with AOTInductor into this .pt2 package (needs a C++ "
                                    "compiler; 7-17 s on 2 cores)")
    export_parser.add_argument("--tolerance", type=_positive_float, default=1e-5,
                               help="largest accepted difference from the eager model's probabilities")
    export_parser.set_defaults(handler=cmd_export)

    compare_parser = commands.add_parser(
        "compare", help="train the paper's variants over seeds on one split, print Table 3",
        description="Train each variant once per seed on one train/validation/test split and print the paper's "
                    "Table 3 layout (mean±std over seeds of the test metrics at each run's best validation "
                    "epoch).", formatter_class=_DefaultsHelp)
    _add_compare_args(compare_parser)
    compare_parser.set_defaults(handler=cmd_compare)

    add_prepare_parser(commands)
    return parser


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the system: a training step
    allocates and frees the same multi-MB tensors every time, and fresh pages cost a fault each (measured:
    filling a new 48 MB tensor 19 ms, a reused one 1.4 ms; ``din train`` on Amazon Beauty 1.06x samples/s).
    The process then holds up to 1 GB of freed heap. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 256 * 2 ** 20)  # blocks below this come from the heap, reusable
    mallopt(m_trim_threshold, 2 ** 30)  # give back only beyond 1 GB of free heap


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # the options given on this command line (``--resume`` keeps the saved run's others)
    args.explicit = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if getattr(args, "threads", None) is not None:
        configure_threads(args.threads, args.torch_threads)
        keep_freed_memory()
    from .distributed import launched_rank, launched_world_size

    # under torchrun every process prints its own failure (one may fail alone); ranks other than 0 say who
    rank = launched_rank()
    prefix = f"error (process {rank}): " if rank else "error: "
    try:
        if launched_world_size() > 1 and args.command != "train":
            raise ValueError(f"din {args.command} runs in one process; under torchrun only 'din train' does "
                             "(data-parallel, see README, 'Several processes')")
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        if args.debug:
            raise
        print(f"{prefix}{error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, no traceback
        print(f"din {args.command}: interrupted", file=sys.stderr)
        return 130
