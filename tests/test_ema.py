"""The averaged encoder and decoder (model.ema_decay, networks/ema.py): the update rule, eval mode
kept, and a run's checkpoint, exported generator and evaluation model using the averaged weights."""

from __future__ import annotations

import pytest
import torch
from cxr_factory import tiny_train_config
from torch import nn

from networks.config import ModelConfig
from networks.ema import EMA
from pipeline.infra.checkpoint import inference_state, load_checkpoint
from pipeline.infra.model_store import generator_from_checkpoint
from pipeline.train import train


def test_update_moves_each_weight_by_one_minus_decay_and_copies_buffers():
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA({"net": live}, decay=0.9)
    before = [p.detach().clone() for p in ema.nets["net"].parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
        live[1].running_mean.fill_(3.0)
    ema.update({"net": live})
    for b, a, w in zip(before, ema.nets["net"].parameters(), live.parameters(), strict=True):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * w)
    assert torch.equal(ema.nets["net"][1].running_mean, live[1].running_mean)
    assert not any(p.requires_grad for p in ema.parameters())


def test_averaged_networks_stay_in_eval_mode():
    ema = EMA({"net": nn.BatchNorm1d(2)}, decay=0.5)
    parent = nn.ModuleDict({"ema": ema})
    parent.train()  # what model.train() does every epoch
    assert not ema.nets["net"].training


def test_decay_outside_the_open_interval_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        ModelConfig(ema_decay=1.0)


def test_a_run_with_an_average_exports_and_evaluates_the_averaged_weights(tmp_path, phantom_manifest):
    cfg = tiny_train_config(phantom_manifest, tmp_path, "model.ema_decay=0.5", "epochs=2")
    res = train(cfg)
    payload = load_checkpoint(res["checkpoint"])
    avg, last = payload["ema"]["decoder"], payload["models"]["decoder"]
    # after real steps the average differs from the last step's weights
    assert any(not torch.equal(avg[k], last[k]) for k in avg if avg[k].is_floating_point())
    gen, _ = generator_from_checkpoint(res["checkpoint"])
    for k, v in gen.decoder.state_dict().items():
        assert torch.equal(v, inference_state(payload, "decoder")[k]), k
        if k in avg:
            assert torch.equal(v, avg[k]), k
