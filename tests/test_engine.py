"""pipeline.infra.engine helpers: the autocast rule and the CPU allocator cache."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from pipeline.infra import engine
from pipeline.infra.data import DataConfig, batches_per_epoch, make_train_loader
from pipeline.infra.distributed import DistInfo


def test_amp_auto_is_bf16_on_cuda_from_128_px_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert engine.amp_dtype("auto", cpu, 256) is None
    assert engine.amp_dtype("auto", cuda, 64) is None  # launch-bound: float32 measured faster
    assert engine.amp_dtype("auto", cuda, 128) == torch.bfloat16
    assert engine.amp_dtype("auto", cuda) == torch.bfloat16  # callers without an image size
    assert engine.amp_dtype("bf16", cuda, 64) == torch.bfloat16  # an explicit choice wins
    assert engine.amp_dtype("fp16", cuda, 64) == torch.float16
    assert engine.amp_dtype("off", cuda, 256) is None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _freed_bytes() -> int:
    """How much the resident set shrinks when a 64 MiB tensor is freed."""
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    before = _rss()
    del x
    return before - _rss()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_allocator_cache_keeps_freed_memory_in_the_process():
    if not engine.cache_cpu_allocations(False):
        pytest.skip("this libc has no mallopt (not glibc)")
    try:
        assert _freed_bytes() > 32 * 2**20  # glibc's default: a big block goes back to the kernel
        assert engine.cache_cpu_allocations(True)
        _freed_bytes()  # the first block under the cache grows the heap
        assert _freed_bytes() < 8 * 2**20  # now it stays, ready for the next step
    finally:
        engine.cache_cpu_allocations(False)


def test_run_epoch_stops_after_max_batches():
    """A fixed step budget over a larger data set: the epoch ends after max_batches steps."""
    seen = []
    out, step = engine.run_epoch(
        [{"x": i} for i in range(10)],
        lambda b: seen.append(b["x"]) or {"loss": torch.tensor(1.0)},
        5,
        engine.EpochPlan(desc="t", log_every=100, max_batches=4),
    )
    assert seen == [0, 1, 2, 3] and step == 9 and out["loss"] == 1.0


@pytest.mark.parametrize("n", [5, 16, 17, 33, 48, 50])
def test_batches_per_epoch_is_the_training_loaders_length(n):
    """gain's equal step budgets count the real arm's batches without building its loader: the
    count must be exactly what make_train_loader yields (it drops a trailing partial batch)."""
    cfg = DataConfig(batch_size=16)
    one = DistInfo()  # one process
    loader, _, _ = make_train_loader(list(range(n)), cfg, 0, one)
    assert batches_per_epoch(n, cfg, one) == len(loader)
