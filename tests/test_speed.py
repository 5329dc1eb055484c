"""speed.mode=auto: the CPU measures are chosen by timing on the machine that runs, cached per
machine, and never change what a step computes."""

from __future__ import annotations

import copy
import json
import os
import threading
import time

import pytest
import torch

from pipeline.infra import speed
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.stage_configs import MEASURES, SpeedConfig
from pipeline.train import Groups, StepParts, TrainConfig, build_model, calibration_step, make_step_fn

CPU = torch.device("cpu")


def _tiny() -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.image_size = cfg.model.image_size = 32
    cfg.data.batch_size = 6
    cfg.model.num_classes, cfg.model.latent_dim, cfg.model.base_channels = 2, 8, 8
    cfg.model.max_channels, cfg.model.disc_channels = 16, 8
    return cfg


def _fake_build(cost: dict[str, float], calls: list | None = None):
    """A 'step' whose duration is 5 ms plus ``cost[m]`` for each measure m that is on (negative:
    the measure saves that much)."""

    def build(measures):
        if calls is not None:
            calls.append(dict(measures))
        delay = 0.005 + sum(c for m, c in cost.items() if measures[m])
        return lambda: time.sleep(max(delay, 0.0))

    return build


def test_calibration_keeps_what_helps_and_drops_what_costs():
    # gemm_convs saves 6 ms, fused_norm_act costs 6 ms, the others change nothing
    chosen, timings = speed.calibrate(
        _fake_build({"gemm_convs": -0.004, "fused_norm_act": 0.006}), CPU, log=lambda s: None
    )
    assert chosen["gemm_convs"] is True and chosen["fused_norm_act"] is False
    # a measure that buys nothing measurable is off: the plain PyTorch path is the reference
    assert chosen["channels_last"] is False
    assert set(timings) >= {"all on", "without fused_norm_act"}
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)


def test_choice_is_cached_per_machine_and_size(tmp_path):
    cfg = SpeedConfig(cache=str(tmp_path / "speed.json"))
    calls: list = []
    build = _fake_build({"gemm_convs": -0.004}, calls)
    first, line = speed.resolve(cfg, CPU, 32, 6, build, log=lambda s: None)
    assert calls and "calibrated" in line
    n = len(calls)
    again, line = speed.resolve(cfg, CPU, 32, 6, build, log=lambda s: None)
    assert again == first and len(calls) == n and "cached choice" in line  # nothing timed again
    entry = json.loads((tmp_path / "speed.json").read_text())[0]
    assert {"cpu_model", "isa", "threads", "torch", "image_size", "batch_size"} <= set(entry["key"])
    # another size is another key: timed again, the first entry kept
    speed.resolve(cfg, CPU, 64, 6, build, log=lambda s: None)
    assert len(calls) > n and len(json.loads((tmp_path / "speed.json").read_text())) == 2
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)


def test_a_damaged_cache_is_timed_again_and_rewritten(tmp_path):
    path = tmp_path / "speed.json"
    path.write_text("{not json")
    calls: list = []
    _, line = speed.resolve(
        SpeedConfig(cache=str(path)), CPU, 32, 6, _fake_build({}, calls), log=lambda s: None
    )
    assert calls and "calibrated" in line and isinstance(json.loads(path.read_text()), list)
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)


def test_mode_and_per_measure_keys_override_without_timing():
    def never(_):
        raise AssertionError("on/off modes time nothing")

    off, _ = speed.resolve(SpeedConfig(mode="off"), CPU, 32, 6, never)
    assert not any(off.values())
    one, line = speed.resolve(SpeedConfig(mode="off", fused_norm_act="on"), CPU, 32, 6, never)
    assert one == {**off, "fused_norm_act": True} and "set by key: fused_norm_act" in line
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)


def test_speed_config_validation():
    with pytest.raises(ConfigError, match="speed.mode must be auto, on or off"):
        load_config(TrainConfig, None, ["speed.mode=fast"])
    with pytest.raises(ConfigError, match="speed.channels_last must be auto, on or off"):
        load_config(TrainConfig, None, ["speed.channels_last=fastest"])


def test_the_auto_choice_computes_what_all_off_computes(tmp_path):
    """Three seeded steps under the measures speed=auto picks on this machine end at the losses
    and weights of three steps with every measure off (float rounding only)."""
    cfg = _tiny()
    auto, _ = speed.resolve(
        SpeedConfig(cache=str(tmp_path / "speed.json")),
        CPU,
        32,
        6,
        lambda m: calibration_step(cfg, CPU, None, m),
        log=lambda s: None,
    )
    torch.manual_seed(0)
    start = build_model(cfg, CPU, dict.fromkeys(MEASURES, False)).state_dict()
    batch = {"image": torch.rand(6, 1, 32, 32) * 2 - 1, "label": torch.tensor([0, 1, 0, 1, 1, 0])}

    def run(measures):
        speed.apply_process_measures(measures, CPU)
        model = build_model(cfg, CPU, measures)
        model.load_state_dict(copy.deepcopy(start))
        step = make_step_fn(StepParts(model, Groups(model, cfg.optim), cfg, CPU))
        torch.manual_seed(1)  # the steps' noise
        losses = [{k: float(v) for k, v in step(batch).items()} for _ in range(3)]
        return losses, model.state_dict()

    (l_auto, w_auto), (l_off, w_off) = run(auto), run(dict.fromkeys(MEASURES, False))
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)
    for a, b in zip(l_auto, l_off, strict=True):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
    for name in w_off:
        torch.testing.assert_close(w_auto[name], w_off[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_measure_dropped_early_is_tried_again_against_the_final_set():
    """gemm_convs costs 4 ms while fused_norm_act is on and saves 4 ms once it is off: the first
    pass drops it (fused is still on then), the second pass, against the final set, keeps it."""

    def build(measures):
        gemm = 0.004 if measures["fused_norm_act"] else -0.004
        delay = (
            0.01 + (gemm if measures["gemm_convs"] else 0.0) + (0.006 if measures["fused_norm_act"] else 0.0)
        )
        return lambda: time.sleep(delay)

    lines: list[str] = []
    chosen, timings = speed.calibrate(build, CPU, log=lines.append)
    assert chosen["fused_norm_act"] is False and chosen["gemm_convs"] is True
    assert "again, without gemm_convs" in timings and any("gemm_convs (again)" in line for line in lines)
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)


def _resolve_logged(path):
    """resolve() with a fake step, through the cache at ``path``: (calls, line, log lines)."""
    calls: list = []
    lines: list[str] = []
    _, line = speed.resolve(
        SpeedConfig(cache=str(path)), CPU, 32, 6, _fake_build({}, calls), log=lines.append
    )
    speed.apply_process_measures(dict.fromkeys(MEASURES, True), CPU)
    return calls, line, lines


def test_a_deeply_nested_cache_is_ignored_with_a_warning(tmp_path):
    # json.loads raised RecursionError (not a ValueError) on 100 000 nested lists: train crashed
    path = tmp_path / "speed.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    calls, line, lines = _resolve_logged(path)
    assert calls and "calibrated" in line and any("warning: ignoring the cache" in s for s in lines)
    assert isinstance(json.loads(path.read_text()), list)  # rewritten


def test_a_fifo_cache_is_ignored_without_blocking(tmp_path):
    # reading a FIFO waits for a writer that never comes: train hung before its first step
    path = tmp_path / "speed.json"
    os.mkfifo(path)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_resolve_logged(path)), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "resolve() blocked on a FIFO cache"
    calls, line, lines = result[0]
    assert calls and any("not a regular file" in s for s in lines)


def test_an_oversized_cache_is_ignored_with_a_warning(tmp_path):
    # the cache holds a few hundred bytes per machine: a huge file is not ours and is not read
    path = tmp_path / "speed.json"
    path.write_text("[" + " " * speed.MAX_CACHE_BYTES + "]")
    calls, _, lines = _resolve_logged(path)
    assert calls and any(f"over {speed.MAX_CACHE_BYTES}" in s for s in lines)


def test_a_symlinked_cache_is_read_through_its_link(tmp_path):
    # a symlink to a regular file (a dotfiles setup) is followed, not mistaken for something else
    real = tmp_path / "real.json"
    _resolve_logged(real)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    calls, line, lines = _resolve_logged(link)
    assert not calls and "cached choice" in line and not lines
