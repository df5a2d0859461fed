"""Soak: a bounded training run on synthetic data with random batch shapes (B, T and the histories' lengths
change every step, the MBA tables step inside backward) must not grow its memory step over step: every
buffer the ops keep (C++ workspaces, the kept-activation pool, allocator caches) is bounded by the largest
step, not by the number of steps. Resident memory is read from /proc (Linux, as CI)."""
import os
import time

import numpy as np
import pytest
import torch

from din.cli import keep_freed_memory
from din.data import make_synthetic
from din.model import ModelConfig, build_model
from din.regularization import embedding_setup
from din.train import make_optimizer


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_memory_does_not_grow_over_random_shaped_steps():
    keep_freed_memory()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    split = make_synthetic(num_users=400, num_goods=500, num_cates=12, max_len=60, seed=0)
    train = split.train
    setup = embedding_setup("mba", 0.01, train, 60, "adagrad", 0.05, 8, 8)
    config = ModelConfig(num_goods=split.num_goods, num_cates=split.num_cates, goods_dim=8, cate_dim=8,
                         hidden_units=(32, 16), attention_units=(16, 8))
    model = build_model(config, goods_table=setup.goods_table, cate_table=setup.cate_table)
    optimizers = [make_optimizer(list(model.head_parameters()) if hasattr(model, "head_parameters") else
                                 [p for n, p in model.named_parameters() if not n.startswith("items.")],
                                 "adagrad", 0.05)] + setup.make_optimizers(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        size = int(rng.integers(2, 300))  # (one sample cannot train the head's BatchNorm)
        max_len = int(rng.integers(1, 60))
        batch = train.batch(rng.choice(len(train), size), max_len)
        loss = loss_fn(model(batch), batch.label)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    started = time.perf_counter()
    for _ in range(150):  # warm-up: caches and pools reach the largest shapes
        step()
    after_warmup = _resident_mb()
    for _ in range(450):
        step()
    grown = _resident_mb() - after_warmup
    assert time.perf_counter() - started < 60
    print(f"resident {after_warmup:.0f} MB after the warm-up, {grown:+.1f} MB over 450 more steps")
    assert grown < 40, f"resident memory grew {grown:.1f} MB over 450 steps after the warm-up"
