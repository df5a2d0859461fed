"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (not collected by pytest).

Each process holds a contiguous part of one batch; every synchronised piece must give, on its part, what one
process computes on the whole batch: the layers' outputs, input and parameter gradients and running
statistics, and the MBA tables' updates (fused) or sparse gradients. float64, so that the tolerance (1e-10)
measures the algebra and not float32 rounding. Exits 0 and prints "ok" when every check holds.
"""
import sys

import torch
import torch.distributed as dist
from torch import nn

import din_kernels as dk
from din.data import make_synthetic, shard_bounds
from din.distributed import Distributed, SyncBatchNorm1d, SyncDice

TOL = dict(rtol=1e-10, atol=1e-12)


def summed(tensor, group):
    """The sum over processes (a parameter's gradient under the 'sum of the parts' losses' convention)."""
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


def check_layer(make, sync_of, group, rank, world, shape, mask=None):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1  # off-centre: the mean matters
    upstream = torch.randn(*shape, dtype=torch.float64)
    single = make()
    sync = sync_of(single, group)  # a copy, before the single layer trains
    whole = x.clone().requires_grad_()
    out = single(whole, mask) if mask is not None else single(whole)
    (out * upstream).sum().backward()
    start, stop = shard_bounds(shape[0], rank, world)
    part = x[start:stop].clone().requires_grad_()
    part_mask = mask[start:stop] if mask is not None else None
    out_part = sync(part, part_mask) if mask is not None else sync(part)
    (out_part * upstream[start:stop]).sum().backward()
    torch.testing.assert_close(out_part, out[start:stop], **TOL)
    torch.testing.assert_close(part.grad, whole.grad[start:stop], **TOL)
    for (name, p_sync), p_single in zip(sync.named_parameters(), single.parameters()):
        torch.testing.assert_close(summed(p_sync.grad, group), p_single.grad, **TOL, msg=name)
    for (name, b_sync), b_single in zip(sync.named_buffers(), single.buffers()):
        torch.testing.assert_close(b_sync, b_single, **TOL, msg=name)
    sync.eval(), single.eval()  # eval: the running statistics, no collective
    torch.testing.assert_close(sync(part, part_mask) if mask is not None else sync(part),
                               (single(x, mask) if mask is not None else single(x))[start:stop], **TOL)


def check_mba(optimizer, group, rank, world, backend):
    dk.set_backend(backend)
    torch.manual_seed(2)
    rows, dim, size = 40, 6, 30
    counts = torch.randint(1, 5, (rows,))
    single = dk.MBAEmbedding(rows, dim, counts, lam=0.3, optimizer=optimizer, lr=0.1, dtype=torch.float64)
    sync = dk.MBAEmbedding(rows, dim, counts, lam=0.3, optimizer=optimizer, lr=0.1, dtype=torch.float64)
    sync.load_state_dict(single.state_dict())
    sync.process_group = group
    start, stop = shard_bounds(size, rank, world)
    for step in range(2):
        ids = torch.randint(0, 12, (size,))  # a small range: duplicates within and across parts, padding (0)
        upstream = torch.randn(size, dim, dtype=torch.float64)
        (single(ids) * upstream).sum().backward()
        # the averaging convention (as DDP): each process's loss times the number of processes
        (sync(ids[start:stop]) * upstream[start:stop]).sum().mul(world).backward()
        if optimizer is None:
            torch.testing.assert_close(sync.weight.grad.to_dense(), single.weight.grad.to_dense(), **TOL)
            for table in (single, sync):
                with torch.no_grad():
                    table.weight.sub_(0.1 * table.weight.grad.to_dense())
                table.weight.grad = None
        torch.testing.assert_close(sync.weight, single.weight, **TOL, msg=f"{optimizer} {backend} step {step}")
        if optimizer == "adagrad":
            torch.testing.assert_close(sync.state, single.state, **TOL)
    # a process whose part has no id at all (all padding) still takes part, and the others still step
    ids = torch.zeros(size, dtype=torch.int64)
    ids[-1] = 5
    before = single.weight.detach().clone()
    upstream = torch.randn(size, dim, dtype=torch.float64)
    (single(ids) * upstream).sum().backward()
    (sync(ids[start:stop]) * upstream[start:stop]).sum().mul(world).backward()
    if optimizer is not None:
        torch.testing.assert_close(sync.weight, single.weight, **TOL)
        assert not torch.equal(single.weight[5], before[5])
    dk.set_backend("cpp")


def check_same_data(distributed, rank):
    split = make_synthetic(num_users=30, num_goods=20, num_cates=4, samples_per_user=3, max_len=5,
                           seed=0 if rank == 0 else 1)
    try:
        distributed.check_same_data(split)
    except ValueError as error:
        assert "process 1 loaded other data than process 0" in str(error), error
    else:
        raise AssertionError("different data on the processes was not refused")
    distributed.check_same_data(make_synthetic(num_users=30, num_goods=20, num_cates=4, samples_per_user=3,
                                               max_len=5, seed=0))


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    try:
        def make_bn():
            bn = nn.BatchNorm1d(5).double()
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            return bn

        check_layer(make_bn, SyncBatchNorm1d.from_batch_norm, group, rank, world, (13, 5))
        check_layer(lambda: dk.Dice(5).double(), SyncDice.from_dice, group, rank, world, (13, 5))
        mask = torch.arange(7)[None, :] < torch.tensor([7, 0, 3, 5, 1])[:, None]  # [B=5, T=7]
        check_layer(lambda: dk.Dice(4, affine=True).double(), SyncDice.from_dice, group, rank, world, (5, 7, 4),
                    mask=mask)
        for backend in ("torch", "triton"):
            for optimizer in (None, "sgd", "adagrad"):
                check_mba(optimizer, group, rank, world, backend)
        check_same_data(Distributed(rank=rank, world_size=world, local_rank=rank, backend="gloo",
                                    device=torch.device("cpu"), group=group), rank)
    finally:
        dist.destroy_process_group()
    print(f"ok {rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
