"""Data-parallel training over several processes: ``torchrun --nproc_per_node=N -m din train ...``.

PyTorch's own engine: ``torch.distributed`` (gloo on CPU, nccl on CUDA) and DistributedDataParallel. The aim
is that N processes train the same model, step for step, as one process with the same ``--batch-size``:

* **Replicated**: the data (every process loads all of it, so the MBA frequencies ``n_j`` are counted over
  the whole training part on each; :meth:`Distributed.check_same_data` refuses processes that loaded
  different data) and the model (every process holds all of it, the embedding tables included).
* **Sharded**: each global batch. Every process draws the same shuffled order of an epoch (the seed), and
  process r trains the r-th contiguous part of each batch (``InteractionData.batches(shard=...)``), so the
  N parts of a step are exactly the one-process batch.
* **Dense gradients**: DistributedDataParallel averages them over the processes; each process's loss is
  its part's summed loss times ``N / B`` (B the global batch), so that the average is the gradient of the
  global batch's mean loss, as one process computes it.
* **MBA tables** stay out of DistributedDataParallel: ``din_kernels.MBAEmbedding.process_group`` makes their
  backward gather every process's rows (unique ids and gradient sums) and apply the MBA term and the update
  once per unique row of the global batch (fused SGD / row-wise Adagrad, or the identical sparse gradient for
  ``SparseAdam``), the same update on every process.
* **Batch statistics** (the head's BatchNorm and Dice) are those of the global batch:
  :class:`SyncBatchNorm1d` and :class:`SyncDice` all-reduce each layer's sums. ``nn.SyncBatchNorm`` would
  not do: it refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on GPU"), and it
  does not cover Dice. The attention's Dice (``--attention-activation dice``) runs inside the fused
  attention op on the local part's statistics, which nothing here can synchronise: it is refused.
* **Evaluation**: each process predicts a contiguous share of the validation / test set; the probabilities
  are gathered in order, and every process computes the same metrics from the whole set (so every process
  takes the same model-selection and early-stopping decision).
* **Files and output**: only rank 0 writes (``metrics.json``, ``model.pt``, ``resume.pt``, the lock) and
  prints; every process reads ``--resume``.

Not bit-identical to one process: the dense gradients are summed in another order (per process, then
across), and the statistics' sums too; ``tests/test_distributed.py`` bounds the difference.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import din_kernels as dk

from .data import Split, shard_bounds

Tensor = torch.Tensor
ENV_WORLD_SIZE, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started this one among ($WORLD_SIZE; 1 outside torchrun)."""
    text = os.environ.get(ENV_WORLD_SIZE, "1")
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"${ENV_WORLD_SIZE} must be a positive integer, got {text!r}") from None
    if world <= 0:
        raise ValueError(f"${ENV_WORLD_SIZE} must be a positive integer, got {text!r}")
    return world


def launched_rank() -> int:
    """This process's rank among them ($RANK; 0 outside torchrun)."""
    try:
        return int(os.environ.get(ENV_RANK, "0"))
    except ValueError:
        return 0


@dataclass
class Distributed:
    """This process's place in a data-parallel run and din's collectives.

    ``group`` carries din's own collectives (loss, statistics, MBA rows, predictions, checks) apart from
    DistributedDataParallel's default group, so that their order never interleaves with DDP's bucket
    all-reduces, which run asynchronously during backward."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where collective tensors live (CPU for gloo, this process's GPU for nccl)
    group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self) -> Tuple[int, int]:
        return self.rank, self.world_size

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over processes of ``tensor`` (a copy; no gradient)."""
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, group=self.group)
        return out

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` (any first dimension, the rest equal) concatenated in rank order."""
        tensor = tensor.detach().to(self.device).contiguous()
        count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=self.device)
        counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (picklable)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group, device=self.device)
        return box[0]

    def _differs(self, values: Tensor) -> Optional[Tuple[int, int]]:
        """(first rank, first entry) where a process's float64 ``values`` differ from rank 0's, or None."""
        gathered = self.gather_rows(values.double().reshape(1, -1)).cpu()
        for rank in range(1, self.world_size):
            unequal = (gathered[rank] != gathered[0]).nonzero()
            if unequal.numel():
                return rank, int(unequal[0])
        return None

    def check_same_data(self, split: Split) -> None:
        """Every process loaded the same data: its sizes and column sums equal rank 0's (a cheap fingerprint,
        O(samples)). Different data would silently train N different models' worth of gradients into one."""
        names, values = [], []
        for part in ("train", "valid", "test"):
            data = getattr(split, part)
            if data is None:
                names.append(part)
                values.append(-1.0)
                continue
            columns = {"samples": len(data), "labels": np.asarray(data.label, dtype=np.float64).sum(),
                       "goods": np.asarray(data.goods, dtype=np.float64).sum(),
                       "categories": np.asarray(data.cate, dtype=np.float64).sum(),
                       "users": np.asarray(data.user, dtype=np.float64).sum(),
                       "behaviours": np.asarray(data.history_lengths, dtype=np.float64).sum(),
                       "vocabulary": float(data.num_goods * 1e6 + data.num_cates)}
            names += [f"{part} {name}" for name in columns]
            values += [float(v) for v in columns.values()]
        differs = self._differs(torch.tensor(values, dtype=torch.float64))
        if differs is not None:
            rank, entry = differs
            raise ValueError(f"process {rank} loaded other data than process 0 ({names[entry]} differ): every "
                             "process must read the same --data with the same --seed and --max-len")

    def check_replicas(self, model: nn.Module, epoch: int) -> None:
        """Every process's weights, optimiser-free buffers and MBA states equal rank 0's, bit for bit (one
        float64 sum per entry of the state dict): the updates are meant to be identical everywhere, and a
        replica that drifted would make rank 0's checkpoint a lie about the others."""
        state = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
        sums = torch.stack([value.detach().double().sum() for value in state.values()])
        differs = self._differs(sums)
        if differs is not None:
            rank, entry = differs
            raise RuntimeError(f"after epoch {epoch} process {rank}'s model differs from process 0's (first in "
                               f"{list(state)[entry]}): the replicas diverged")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: str) -> Optional[Distributed]:
    """Join the run ``torchrun`` started (its environment: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...), or
    None when this is the only process. gloo for ``device="cpu"``, nccl with one GPU per process (LOCAL_RANK)
    for ``"cuda"``."""
    world = launched_world_size()
    if world == 1:
        return None
    try:
        rank, local_rank = int(os.environ[ENV_RANK]), int(os.environ.get(ENV_LOCAL_RANK, "0"))
    except (KeyError, ValueError):
        raise ValueError(f"${ENV_WORLD_SIZE}={world} but ${ENV_RANK} is missing or not an integer: start "
                         "several processes with torchrun --nproc_per_node=N -m din train ...") from None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {rank} (local rank {local_rank}) has no GPU of its own: "
                             f"{torch.cuda.device_count()} visible; start at most that many per machine")
        torch.cuda.set_device(local_rank)
        backend, where = "nccl", torch.device("cuda", local_rank)
    else:
        backend, where = "gloo", torch.device("cpu")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: multi-process training is unavailable")
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot join the {world}-process run ({backend}): {first}") from error
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=where,
                       group=dist.new_group(backend=backend))


# ----------------------------------------------------------------------------------------------------------
# Batch statistics over the global batch
# ----------------------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """``y = sum over processes of x`` (every process gets y); backward: ``dx = sum over processes of dy``,
    the gradient of everyone's loss with respect to this process's x."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        dx = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


def global_moments(rows: Tensor, group) -> Tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of the rows of every process ([n_r, C] here), differentiable,
    and the global row count. One all-reduce of ``[sum x, sum x^2, n]`` in float64: the one-pass variance
    loses ``eps * (mean / std)^2`` relatively, harmless in float64 (1e-16 * ratio^2) where float32 would not
    be."""
    wide = rows.double()
    local = torch.cat([wide.sum(0), wide.square().sum(0), wide.new_tensor([rows.shape[0]])])
    total = _AllReduceSum.apply(local, group)
    channels = rows.shape[1]
    count = int(total[-1].item())
    mean = total[:channels] / max(count, 1)
    var = (total[channels:2 * channels] / max(count, 1) - mean.square()).clamp_min(0.0)
    return mean.to(rows.dtype), var.to(rows.dtype), count


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on [N, C] whose training statistics (and running averages) are those of every
    process's rows together, on any device; eval mode and a missing ``group`` are plain BatchNorm1d. Same
    parameters and buffers, so its state dict is a BatchNorm1d's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.group = group

    @classmethod
    def from_batch_norm(cls, module: nn.BatchNorm1d, group) -> "SyncBatchNorm1d":
        sync = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   group=group)
        reference = next((t for t in module.state_dict().values() if t.is_floating_point()), None)
        if reference is not None:  # (load_state_dict would round a float64 layer's values into float32 ones)
            sync.to(device=reference.device, dtype=reference.dtype)
        sync.load_state_dict(module.state_dict())
        return sync.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None:
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d takes [N, C] inputs, got shape {tuple(x.shape)}")
        mean, var, count = global_moments(x, self.group)
        if count <= 1:  # as nn.BatchNorm1d, on the global batch
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} in all")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * var.detach() * (count / (count - 1)))
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


class SyncDice(dk.Dice):
    """``din_kernels.Dice`` whose training statistics (and running averages) are those of every process's
    valid rows together; eval mode and a missing ``group`` are ``Dice`` itself. Composed of torch ops (the
    fused Dice op computes its statistics inside); same parameters and buffers as ``Dice``."""

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False,
                 group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.group = group

    @classmethod
    def from_dice(cls, module: dk.Dice, group) -> "SyncDice":
        sync = cls(module.num_features, module.eps, module.momentum, module.affine, group=group)
        sync.to(device=module.alpha.device, dtype=module.alpha.dtype)
        sync.load_state_dict(module.state_dict())
        return sync.train(module.training)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not self.training or self.group is None:
            return super().forward(x, mask)
        channels = self.num_features
        if x.shape[-1] != channels:
            raise ValueError(f"x must have num_features={channels} channels in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        rows = x.reshape(-1, channels)
        if mask is not None:
            rows = rows[mask.reshape(-1)]
        mean, var, count = global_moments(rows, self.group)
        if count > 0:  # the reference's rule: running averages with the unbiased variance
            with torch.no_grad():
                unbiased = var.detach() * (count / max(count - 1, 1))
                self.running_mean.mul_(1.0 - self.momentum).add_(self.momentum * mean.detach())
                self.running_var.mul_(1.0 - self.momentum).add_(self.momentum * unbiased)
        normalized = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            normalized = normalized * self.weight + self.bias
        p = torch.sigmoid(normalized)
        return p * x + (1.0 - p) * self.alpha * x


def synchronise_batch_statistics(model: nn.Module, group) -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm1d`` by :class:`SyncBatchNorm1d` and every ``din_kernels.Dice``
    by :class:`SyncDice` (weights and running statistics kept). Build the optimisers afterwards: the new
    layers hold new parameter objects. A layer with batch statistics that cannot be synchronised (the
    attention's fused Dice, other norms) is a ValueError: it would normalise by one process's part only."""
    for module in model.modules():
        if isinstance(module, dk.LocalActivationUnit) and module.activation == "dice":
            raise ValueError("--attention-activation dice normalises with batch statistics inside the fused "
                             "attention op, which are not synchronised across processes: under torchrun use "
                             "sigmoid, relu, prelu or identity (the head's Dice is synchronised)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (SyncBatchNorm1d, SyncDice)):
                continue
            if type(child) is nn.BatchNorm1d:
                setattr(parent, name, SyncBatchNorm1d.from_batch_norm(child, group))
            elif type(child) is dk.Dice:
                setattr(parent, name, SyncDice.from_dice(child, group))
    unsynchronised = [name for name, module in model.named_modules()
                      if isinstance(module, (nn.modules.batchnorm._NormBase, dk.Dice))
                      and not isinstance(module, (SyncBatchNorm1d, SyncDice))]
    if unsynchronised:
        raise ValueError(f"{unsynchronised[0]} uses batch statistics that cannot be synchronised across "
                         "processes (only BatchNorm1d and din_kernels.Dice can)")
    return model


def mba_tables(model: nn.Module) -> List[Tuple[str, dk.MBAEmbedding]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, dk.MBAEmbedding)]


def replicate(model: nn.Module, distributed: Distributed) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel for its dense parameters; its MBA tables left out of DDP
    and given ``distributed.group`` (their backward gathers every process's rows), and set to rank 0's values
    once here as DDP does for the rest. Buffers are not broadcast at each step: the running statistics are
    computed from all-reduced sums, equal everywhere (:meth:`Distributed.check_replicas` checks it)."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = []
    for name, table in mba_tables(model):
        table.process_group = distributed.group
        for tensor_name, tensor in list(table.named_parameters(recurse=False)) + \
                list(table.named_buffers(recurse=False)):
            ignored.append(f"{name}.{tensor_name}")
            with torch.no_grad():
                dist.broadcast(tensor.data, src=0, group=distributed.group)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # torch 2.13 renamed the switch (the old name warns); the torch >= 2.4 that setup.py allows has the old one
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=None, **no_buffer_sync)


def gather_predictions(probs: np.ndarray, distributed: Distributed) -> np.ndarray:
    """Every process's predictions (its contiguous share of a set, :func:`din.data.shard_bounds`), in order."""
    return distributed.gather_rows(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float64))).cpu().numpy()


__all__ = ["Distributed", "SyncBatchNorm1d", "SyncDice", "from_environment", "gather_predictions",
           "global_moments", "launched_rank", "launched_world_size", "replicate", "shard_bounds",
           "synchronise_batch_statistics"]
