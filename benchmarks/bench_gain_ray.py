"""A small study with executor=ray (N single-thread workers) against executor=local (N threads), in
one run: the ratio of wall times.

    python benchmarks/bench_gain_ray.py [--workers 2] [--fraction 0.1] [--seeds 0 1]
        [--generator-steps 300] [--out docs/benchmarks/bench_gain_ray.json]

The same study twice (Kermany 64 px, arms real, classical, real_dup, synthetic; its own records
folder and tracking store each, nothing reused): once in this process one item after another with
N torch threads per item, once as a graph of Ray tasks on a local Ray instance of N CPUs, one
thread each. Needs data_manifests/kermany_pneumonia_224.csv (`python -m pipeline.run ingest
../shared/data/kermany_pneumonia_224`). What it predicts for more workers: the study's items are
independent except a generator after its judge and the synthetic children after their generator,
so with W workers the wall time approaches max(critical path, total item time / W).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from pipeline.gain import GainConfig, gain
from pipeline.infra.config import load_config


def study(tmp: Path, name: str, a, *extra: str) -> float:
    cfg = load_config(
        GainConfig,
        "configs/gain64.yaml",
        [
            "arms=[real,classical,real_dup,synthetic]",
            f"fractions=[{a.fraction}]",
            f"seeds=[{','.join(map(str, a.seeds))}]",
            "generators=[]",
            f"generator_steps={a.generator_steps}",
            "gate_checks=0",
            f"classify.tracking.uri=sqlite:///{tmp / (name + '.db')}",
            f"classify.data.cache_dir={tmp / 'cache'}",
            "classify.data.cache=disk",
            f"out_dir={tmp / name}",
            f"records={tmp / name / 'records'}",
            "tracking.run_name=bench",
            *extra,
        ],
    )
    t0 = time.perf_counter()
    gain(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--generator-steps", type=int, default=300)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        gen = "vaegan_overrides=[data.batch_size=32,tracking.log_model=false,ckpt_every=0]"
        # the decoded-image cache is filled before either is timed (both read it): one real child
        study(tmp, "warm", a, gen, "arms=[real]", "seeds=[0]")
        local = study(tmp, "local", a, gen, f"classify.threads={a.workers}")
        ray_s = study(tmp, "ray", a, gen, "executor=ray", f"ray.workers={a.workers}", "ray.num_cpus=1")
    out = {
        "cpu": platform.processor() or platform.machine(),
        "workers": a.workers,
        "study": {"fraction": a.fraction, "seeds": a.seeds, "arms": 4, "generator_steps": a.generator_steps},
        "local_s": round(local, 1),
        "ray_s": round(ray_s, 1),
        "ratio_local_over_ray": round(local / ray_s, 2),
    }
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
