"""Training and evaluation loops for DIN and BaseModel."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import din_kernels as dk

from . import metrics
from .checkpoint import atomic_file, save_checkpoint, write_json_atomic
from .data import InteractionData, Split, carve_validation, shard_bounds
from .model import ModelConfig
from .regularization import REGULARIZERS, table_parameters

OPTIMIZERS = ("adam", "adagrad", "sgd")
DEVICES = ("cpu", "cuda")


@dataclass
class TrainConfig:
    epochs: int = 10            # the most; early stopping on the validation part usually ends sooner
    batch_size: int = 256
    eval_batch_size: int = 4096
    lr: float = 1e-3
    optimizer: str = "adam"
    max_len: int = 50
    seed: int = 0
    device: str = "cpu"
    regularizer: str = "none"   # "none" | "full" (dense L2 over the tables) | "mba" (paper Eq. 4)
    reg_lambda: float = 0.0
    # Model selection on a validation part carved from the training samples (din.data.carve_validation):
    # the kept model and every reported test figure are those of the epoch with the best validation
    # GAUC; training stops after ``patience`` epochs without a better one. 0: no validation, last epoch.
    valid_fraction: float = 0.1
    patience: int = 2
    # Multiply every learning rate by this after each epoch without a better validation GAUC (FuxiCTR's
    # reduce-on-plateau uses 0.1); 1.0 keeps the rate fixed.
    lr_decay: float = 1.0
    progress: bool = True
    # With an output folder: also write resume.pt every this many steps (0: at the end of each epoch only),
    # so that a run killed mid-epoch resumes from its last such step
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not (isinstance(self.reg_lambda, (int, float)) and math.isfinite(self.reg_lambda)
                and self.reg_lambda >= 0):
            raise ValueError(f"reg_lambda must be a finite number >= 0, got {self.reg_lambda!r}")
        if isinstance(self.valid_fraction, bool) or not (isinstance(self.valid_fraction, (int, float))
                                                         and 0 <= self.valid_fraction < 1):
            raise ValueError(f"valid_fraction must be a number in [0, 1), got {self.valid_fraction!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience <= 0:
            raise ValueError(f"patience must be a positive int, got {self.patience!r}")
        if isinstance(self.lr_decay, bool) or not (isinstance(self.lr_decay, (int, float))
                                                   and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be a number in (0, 1], got {self.lr_decay!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) or \
                self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_optimizer(parameters, name: str, lr: float) -> torch.optim.Optimizer:
    """The dense optimiser, torch's fused implementation where the parameters allow it (one kernel per
    parameter instead of about ten: Adam over DIN's parameters on one CPU thread 0.15 ms a step against
    0.48 ms; the same update rule)."""
    parameters = [p for p in parameters if p.requires_grad]
    classes = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    fusable = bool(parameters) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                       for p in parameters)
    if fusable:
        try:
            return classes[name](parameters, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a torch or a dtype without the fused kernel
            pass
    return classes[name](parameters, lr=lr)


@torch.no_grad()
def predict(model: nn.Module, data: InteractionData, max_len: int, batch_size: int = 4096,
            device: str = "cpu") -> np.ndarray:
    """Click probabilities for every sample of ``data``, in order.  -> [N] float64"""
    was_training = model.training
    model.eval()
    scores = []
    for batch in data.batches(batch_size, max_len, shuffle=False):
        scores.append(torch.sigmoid(model(batch.to(device)).float()).cpu().numpy())
    model.train(was_training)
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


def evaluate(model: nn.Module, data: InteractionData, max_len: int, batch_size: int = 4096,
             device: str = "cpu", distributed=None) -> Dict[str, float]:
    """AUC, user-weighted AUC (paper Eq. 10), per-user mean AUC (official GAUC) and logloss on ``data``.

    ``distributed`` (a :class:`din.distributed.Distributed`): each process predicts its contiguous share of
    ``data`` and the predictions are gathered in order, so every process returns the metrics of the whole
    set (in eval mode a sample's prediction does not depend on the others in its batch)."""
    if distributed is not None:
        from .distributed import gather_predictions

        start, stop = shard_bounds(len(data), distributed.rank, distributed.world_size)
        local = predict(model, data.subset(np.arange(start, stop)), max_len, batch_size, device)
        probs = gather_predictions(local, distributed)
    else:
        probs = predict(model, data, max_len, batch_size, device)
    labels, users = np.asarray(data.label), np.asarray(data.user)
    return {
        "auc": metrics.auc(labels, probs),
        "gauc": metrics.user_weighted_auc(users, labels, probs),
        "per_user_auc": metrics.per_user_auc(users, labels, probs),
        "logloss": metrics.logloss(labels, probs),
        "samples": int(len(data)),
    }


def _scale_learning_rates(model: nn.Module, optimizers: List[torch.optim.Optimizer], factor: float) -> None:
    """Every optimiser's rate times ``factor``, the fused MBA tables' own rate included."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] *= factor
    for module in model.modules():
        if isinstance(module, dk.MBAEmbedding) and module.optimizer is not None:
            module.lr = module.lr * factor


RESUME_FILE = "resume.pt"
RESUME_FORMAT = 2  # 2: a checkpoint may sit inside an epoch ("step", "partial") and holds torch's RNG state


def _mba_tables(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, dk.MBAEmbedding) and m.optimizer is not None]


def _save_resume(path: Path, epoch: int, model: nn.Module, optimizers: List[torch.optim.Optimizer],
                 history: Dict, best_state: Optional[Dict], step: int = 0, partial: Optional[Dict] = None) -> None:
    """``epoch``: the last complete epoch; ``step``: batches of the next one already trained (0 at an epoch's
    end), ``partial``: that epoch's running sums (samples seen, loss sum, seconds)."""
    payload = {"format": RESUME_FORMAT, "epoch": epoch, "step": step, "partial": partial,
               "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
               "mba_lrs": [float(m.lr) for m in _mba_tables(model)], "history": history, "best_state": best_state,
               "torch_rng": torch.get_rng_state()}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_resume(path: Path) -> Dict:
    """``resume.pt`` of an earlier run, checked: a missing, truncated or foreign file is a one-line
    ValueError naming it, never a silent restart."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: nothing to resume (a run writes it after each epoch)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a resumable din run (truncated or foreign: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a resumable din run of this version (format {RESUME_FORMAT} expected, "
                         f"got {payload.get('format') if isinstance(payload, dict) else 'none'})")
    return payload


def _restore(resume: Dict, model: nn.Module, optimizers: List[torch.optim.Optimizer], history: Dict,
             selection: "EpochSelection", config: "TrainConfig"):
    """Load a ``resume.pt`` payload into the run; returns (first epoch to train, best weights so far, batches
    of that epoch already trained, their running sums or None)."""
    saved = resume["history"]
    # (through ModelConfig, so that a run saved before a config field existed compares with its default)
    if ModelConfig.from_dict(saved["model"]).to_dict() != history["model"]:
        raise ValueError("the resumed run's model differs from the saved one (same --data and model options "
                         "are needed)")
    if len(resume["optimizers"]) != len(optimizers):
        raise ValueError("the resumed run's optimisers differ from the saved ones (same --optimizer and "
                         "regulariser are needed)")
    model.load_state_dict(resume["model"])
    for opt, state in zip(optimizers, resume["optimizers"]):
        opt.load_state_dict(state)
    for table, lr in zip(_mba_tables(model), resume["mba_lrs"]):
        table.lr = lr
    for record in saved["epochs"]:  # the selection rule's state, as those epochs left it
        history["epochs"].append(record)
        selection.observe(record)
    torch.set_rng_state(resume["torch_rng"])
    return resume["epoch"] + 1, resume["best_state"], resume["step"], resume["partial"]


def prefixed(prefix: str, values: Dict[str, float]) -> Dict[str, float]:
    """``values`` with every key prefixed (``valid_auc``, ...)."""
    return {f"{prefix}{name}": value for name, value in values.items()}


class EpochSelection:
    """The model-selection rule, in one place: the epoch with the best validation GAUC is kept (the last
    epoch when there is no validation part), and training stops after ``patience`` epochs without a better
    one. Keeps ``history["best"]``, ``history["last"]`` and ``history["stopped_early"]`` up to date."""

    def __init__(self, history: Dict, selects: bool, patience: int, max_epochs: int):
        self.history, self.selects, self.patience, self.max_epochs = history, selects, patience, max_epochs
        self.best_score, self.best_epoch, self.since_best, self.stop = -math.inf, None, 0, False

    def observe(self, record: Dict) -> bool:
        """Take one epoch's record; returns whether it is the new best."""
        score = record["valid_gauc"] if self.selects else float(record["epoch"])
        improved = self.best_epoch is None or score > self.best_score  # a NaN score never displaces a best
        if improved:
            self.best_score, self.best_epoch, self.since_best = score, record["epoch"], 0
            self.history["best"] = record
        else:
            self.since_best += 1
        self.history["last"] = record
        self.stop = self.selects and self.since_best >= self.patience and record["epoch"] < self.max_epochs
        self.history["stopped_early"] = bool(self.stop)
        return improved

    def stop_message(self) -> str:
        return (f"stopping: no better validation GAUC for {self.patience} epochs; "
                f"keeping epoch {self.best_epoch}")


def train(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    out_dir: Optional[Path] = None,
    extra_optimizers: Optional[List[torch.optim.Optimizer]] = None,
    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None,
    log: Callable[[str], None] = print,
    data_spec: Optional[str] = None,
    resume: Optional[Dict] = None,
    command: Optional[Dict] = None,
    distributed=None,
) -> Dict:
    """Train ``model`` on ``split.train``, select the epoch on ``split.valid``, report ``split.test``.

    Model selection never looks at the test set: after each epoch the model is scored on the validation
    part (``split.valid``; carved here with ``config.valid_fraction`` and ``config.seed`` when the split has
    none, see :func:`din.data.carve_validation`) and on the test part; the epoch with the best validation
    GAUC is kept, training stops after ``config.patience`` epochs without a better one, and the model is
    left holding (and ``model.pt`` saves) the best epoch's weights. With ``valid_fraction=0`` and no
    ``split.valid`` the last epoch is the one kept.

    Writes ``out_dir/metrics.json`` after every epoch (config, per-epoch train loss, validation and test
    metrics, throughput; ``best``: the selected epoch's validation and test metrics; ``last``: the last
    epoch's) and ``out_dir/model.pt`` at the end, both atomically. ``regularizer(model)`` adds a penalty to
    each batch's loss (e.g. full-table L2); MBA tables have their own update rule (fused inside backward,
    or one of ``extra_optimizers``) and stay out of the dense optimiser. Returns the metrics dictionary.

    With ``out_dir``, ``out_dir/resume.pt`` is written (atomically) after every epoch, and every
    ``config.checkpoint_every`` steps inside one: the model, every optimiser, the MBA tables' rates, torch's
    RNG state, the metrics so far, the best epoch's weights and, inside an epoch, the batches trained and
    their running sums. ``resume`` (that file, loaded by :func:`load_resume`) continues such a run where it
    was written, up to ``config.epochs``: an interrupted run resumed ends with the metrics and weights of an
    uninterrupted one (the batch order of an epoch is a function of the seed and the epoch, so the resumed
    epoch skips the batches already trained).

    ``distributed`` (a :class:`din.distributed.Distributed`, see that module): this process is one of
    several training the same model on the same global batches of ``config.batch_size``, each on its part;
    the model's BatchNorm / Dice layers are replaced by synchronised ones before the optimisers are built,
    the dense parameters train under DistributedDataParallel, the MBA tables update from every process's
    rows, metrics cover the whole sets, and only rank 0 logs and writes files. ``log`` is called on rank 0
    only. A last batch with fewer samples than ``max(2, processes)`` is left out (one process would have
    none; with one process: a last batch of one sample, see below).
    """
    if split.valid is None and config.valid_fraction > 0:
        split = carve_validation(split, config.valid_fraction, seed=config.seed)
    world = distributed.world_size if distributed is not None else 1
    main = distributed is None or distributed.is_main
    if distributed is not None:
        if config.batch_size < world:
            raise ValueError(f"batch_size ({config.batch_size}) must be at least the number of processes "
                             f"({world}): each process trains its part of every batch")
        distributed.check_same_data(split)
        from .distributed import synchronise_batch_statistics

        synchronise_batch_statistics(model, distributed.group)
    if not main:
        log = lambda line: None  # noqa: E731 (rank 0 speaks for the run)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    tables = {id(p) for p in table_parameters(model)}
    dense = [p for p in model.parameters() if id(p) not in tables]
    optimizer = make_optimizer(dense, config.optimizer, config.lr)
    optimizers = [optimizer] + list(extra_optimizers or [])
    loss_fn = nn.BCEWithLogitsLoss()
    selects = split.valid is not None
    history = {"model": model.config.to_dict(), "train": config.to_dict(), "data": split.summary(),
               "selection": "best validation GAUC" if selects else "last epoch (no validation part)",
               "epochs": []}
    if data_spec is not None:
        history["data_spec"] = data_spec
    if distributed is not None:  # (not in ``train``: a run may be resumed on another number of processes)
        history["distributed"] = {"processes": world, "backend": distributed.backend}
    if command is not None:  # the CLI's arguments, kept in metrics.json and resume.pt (``din train --resume``)
        history["command"] = command
    selection = EpochSelection(history, selects, config.patience, config.epochs)
    best_state = None  # the best validation epoch's weights (without validation the last epoch is kept as is)
    first_epoch, first_step, partial = 1, 0, None
    if resume is not None:
        first_epoch, best_state, first_step, partial = _restore(resume, model, optimizers, history, selection,
                                                                config)
    step_model = model
    if distributed is not None:
        from .distributed import replicate

        step_model = replicate(model, distributed)
    for epoch in range(first_epoch, config.epochs + 1):
        if selection.stop:  # (a resumed run that had stopped early)
            break
        model.train()
        epoch_lr = optimizer.param_groups[0]["lr"]
        # (a run resumed inside this epoch continues its sums and skips the batches it trained)
        seen, loss_sum, earlier_seconds = ((partial["seen"], partial["loss_sum"], partial["seconds"]) if partial
                                           else (0, 0.0, 0.0))
        started = time.perf_counter() - earlier_seconds
        # a last batch of one sample cannot train the head's BatchNorm (torch refuses one value per
        # channel): then that one sample of the epoch's shuffled order is left out; with several processes
        # a last batch with fewer samples than processes too (a process would have nothing to train on)
        remainder = len(split.train) % config.batch_size
        drop_last = 0 < remainder < max(2, world)
        stop = len(split.train) - remainder if drop_last else len(split.train)
        num_batches = math.ceil(stop / config.batch_size)
        batches = split.train.batches(config.batch_size, config.max_len, shuffle=True,
                                      seed=config.seed * 1000 + epoch, drop_last=drop_last,
                                      shard=distributed.shard() if distributed is not None else None,
                                      start=first_step)
        bar = tqdm(batches, total=num_batches, initial=first_step, desc=f"epoch {epoch}/{config.epochs}",
                   unit="batch", disable=not (config.progress and main), leave=False)
        for step, batch in enumerate(bar, start=first_step):
            batch = batch.to(device)
            logits = step_model(batch)
            if distributed is None:
                loss = loss_fn(logits, batch.label)
            else:
                # DDP averages the processes' gradients: this part's summed loss times N / B makes that
                # average the gradient of the global batch's mean loss (B = the global batch, parts unequal)
                global_size = min(config.batch_size, stop - step * config.batch_size)
                part_sum = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum")
                loss = part_sum * (world / global_size)
            # (a penalty such as full L2 is added on every process alike: averaged, it counts once)
            total = loss + regularizer(model) if regularizer is not None else loss
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in optimizers:
                opt.step()
            if distributed is None:
                batch_loss, batch_samples = loss.item(), len(batch.label)
            else:  # the global batch's mean loss, the same number on every process (so is the check below)
                batch_loss, batch_samples = distributed.sum(part_sum).item() / global_size, global_size
            if not math.isfinite(batch_loss):
                raise FloatingPointError(f"training diverged at epoch {epoch}: loss {batch_loss} "
                                         f"(try a smaller --lr)")
            seen += batch_samples
            loss_sum += batch_loss * batch_samples
            elapsed = time.perf_counter() - started
            # refresh=False: the bar redraws at its own pace (mininterval), not once per batch
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", samples_per_s=f"{seen / max(elapsed, 1e-9):,.0f}",
                            refresh=False)
            every = config.checkpoint_every
            if every and out_dir is not None and main and (step + 1) % every == 0 and step + 1 < num_batches:
                _save_resume(Path(out_dir) / RESUME_FILE, epoch - 1, model, optimizers, history, best_state,
                             step=step + 1, partial={"seen": seen, "loss_sum": loss_sum, "seconds": elapsed})
        first_step, partial = 0, None
        train_seconds = time.perf_counter() - started
        record = {"epoch": epoch, "lr": epoch_lr, "train_loss": loss_sum / max(seen, 1),
                  "train_seconds": train_seconds, "samples_per_second": seen / max(train_seconds, 1e-9)}
        if distributed is not None:
            distributed.check_replicas(model, epoch)
        if selects:
            record.update(prefixed("valid_", evaluate(model, split.valid, config.max_len,
                                                       config.eval_batch_size, config.device, distributed)))
        record.update(evaluate(model, split.test, config.max_len, config.eval_batch_size, config.device,
                               distributed))
        history["epochs"].append(record)
        improved = selection.observe(record)
        if improved and selects:
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        elif not improved and config.lr_decay < 1:
            _scale_learning_rates(model, optimizers, config.lr_decay)
        if out_dir is not None and main:
            _save_resume(Path(out_dir) / RESUME_FILE, epoch, model, optimizers, history, best_state)
        valid_text = f"valid GAUC {record['valid_gauc']:.4f}{' *' if improved else '  '}  " if selects else ""
        log(f"epoch {epoch}: loss {record['train_loss']:.4f}  {valid_text}test AUC {record['auc']:.4f}  "
            f"GAUC {record['gauc']:.4f}  logloss {record['logloss']:.4f}  "
            f"({record['samples_per_second']:,.0f} samples/s)")
        if out_dir is not None and main:
            write_json_atomic(Path(out_dir) / "metrics.json", history)
        if selection.stop:
            log(selection.stop_message())
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if out_dir is not None and main:
        # the data it was trained on, so that ``din evaluate`` defaults to it and can refuse data that does
        # not fit (``data_spec``: the ``--data`` spec; vocabulary sizes include the padding id)
        data = {"spec": data_spec, "name": split.name, "num_goods": split.num_goods,
                "num_cates": split.num_cates, "num_users": split.num_users}
        save_checkpoint(Path(out_dir) / "model.pt", model, train_config=config.to_dict(),
                        metrics=history["best"], data=data)
    return history
