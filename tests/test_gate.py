"""The validation gate (train's gate.*): every N epochs the averaged generator's samples are scored
against the validation images by a real-only classifier, and the best epoch is kept as best.pt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cxr_factory import tiny_train_config

from pipeline.infra.checkpoint import load_checkpoint
from pipeline.infra.config import ConfigError, load_config
from pipeline.train import TrainConfig, train


def test_a_gate_without_a_judge_is_refused():
    with pytest.raises(ConfigError, match="gate.judge"):
        load_config(TrainConfig, None, ["gate.every=1"])


def test_the_gate_keeps_the_epoch_with_the_lowest_fd_among_label_faithful_ones(
    tmp_path, phantom_manifest, phantom_extractor
):
    cfg = tiny_train_config(
        phantom_manifest,
        tmp_path,
        "model.num_classes=2",
        "epochs=3",
        "gate.every=1",
        f"gate.judge={phantom_extractor}",
        "gate.n=32",
        "gate.min_fidelity=0.0",  # the tiny generator is not label-faithful yet: compare on FD alone
    )
    res = train(cfg)
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").open()]
    fds = [r["metrics"]["gate/fd"] for r in rows if "gate/fd" in r["metrics"]]
    assert len(fds) == 3 and all(math.isfinite(f) for f in fds)
    best = load_checkpoint(res["checkpoint"].replace("last.pt", "best.pt"))
    # best.pt is the epoch whose samples came closest to the validation images
    assert best["epoch"] == 1 + min(range(3), key=lambda i: fds[i])
    assert best["gate"]["epoch"] == best["epoch"] and best["gate"]["fd"] == min(fds)
    last = load_checkpoint(res["checkpoint"])
    assert last["gate"] == best["gate"]  # the last checkpoint remembers the best so far
    fid = [r["metrics"]["gate/class_fidelity"] for r in rows if "gate/class_fidelity" in r["metrics"]]
    assert len(fid) == 3 and all(0.0 <= f <= 1.0 for f in fid)
    assert isinstance(best["models"]["decoder"], dict) and torch.is_tensor(
        next(iter(best["models"]["decoder"].values()))
    )


def test_the_gate_only_watches(tmp_path, phantom_manifest, phantom_extractor):
    """Sampling and scoring draw no random numbers from the training stream and move no batch-norm
    statistics: a run with the gate ends with the weights of the same run without it."""
    common = ["model.num_classes=2", "epochs=2", "speed.mode=on"]
    gated = train(
        tiny_train_config(
            phantom_manifest,
            tmp_path / "a",
            *common,
            "gate.every=1",
            f"gate.judge={phantom_extractor}",
            "gate.n=16",
        )
    )
    plain = train(tiny_train_config(phantom_manifest, tmp_path / "b", *common))
    a, b = load_checkpoint(gated["checkpoint"])["models"], load_checkpoint(plain["checkpoint"])["models"]
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
