"""The benchmark scripts run (tiny settings) and report what they promise; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cxr_factory import REPO


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_bench_train_reports_every_arm(tmp_path, phantom_manifest):
    out = tmp_path / "bt.json"
    tiny = [
        "--sizes",
        "16",
        "--batch",
        "4",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--matmul-n",
        "256",
        "--epoch-images",
        "16",
    ]
    p = _run(
        "bench_train.py", *tiny, "--ablate", "--bf16", "--manifest", str(phantom_manifest), "--json", str(out)
    )
    res = json.loads(out.read_text())
    ab = res["ablation"][0]
    chosen = [m for m, on in ab["auto"].items() if on]
    # speed=auto's choice beside every measure on and off, and each chosen measure taken away
    assert set(ab["variants"]) == {"auto", "all on", "all off", *(f"auto without {m}" for m in chosen)}
    assert ab["variants"]["auto"]["slowdown"] == 1.0 and all(v["step_s"] > 0 for v in ab["variants"].values())
    assert "speed=auto chose" in p.stdout and "| all off |" in p.stdout
    # the machine it ran on: what the choice is keyed by
    assert res["cpu"]["cpu_model"] and isinstance(res["cpu"]["isa"], list)
    step = res["steps"][0]
    assert {"naive", "project"} <= set(step["arms"])
    for a in step["arms"].values():
        assert a["images_per_s"] > 0 and a["flops_per_image"] > 0 and a["ratio_to_matmul_peak"] > 0
    assert step["arms"]["naive"]["speedup_vs_naive"] == 1.0
    # the opt-in bf16 arm runs under bf16 autocast and is measured against the bf16 matmul peak
    b = step["arms"]["project-bf16"]
    assert b["amp"] == "bfloat16" and set(res["matmul_flops"]) == {"fp32", "bf16"}
    assert b["ratio_to_matmul_peak"] == pytest.approx(b["achieved_flops"] / res["matmul_flops"]["bf16"])
    e = res["epoch"]
    assert e["images"] == 16 and e["loader_images_per_s"] > 0 and e["speedup_steady"] > 0
    assert "| 16 | project |" in p.stdout  # the printed table


def test_bench_data_reports_formats_and_workers(tmp_path, phantom_manifest):
    out = tmp_path / "bd.json"
    tiny = [
        "--size",
        "32",
        "--limit",
        "8",
        "--formats",
        "jpeg",
        "png",
        "dicom",
        "dicom-rle",
        "--workers",
        "0",
        "1",
    ]
    _run("bench_data.py", *tiny, "--manifest", str(phantom_manifest), "--json", str(out))
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {f"{f} workers={w}" for f in ("jpeg", "png", "dicom", "dicom-rle") for w in (0, 1)}
    for v in arms.values():
        assert set(v) == {"cold", "cache-fill", "cached", "cached+aug", "disk-warm"} and min(v.values()) > 0


def test_bench_fused_reports_every_shape_with_the_cpu(tmp_path):
    out = tmp_path / "bf.json"
    p = _run("bench_fused.py", "--batch", "2", "--repeats", "1", "--json", str(out))
    res = json.loads(out.read_text())
    assert {"cpu_model", "isa", "torch_cpu_capability"} <= set(res)
    assert len(res["rows"]) == 7 and all(r["eager_ms"] > 0 and r["fused_ms"] > 0 for r in res["rows"])
    assert "fused speed-up" in p.stdout
