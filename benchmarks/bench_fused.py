"""The fused norm + (Leaky)ReLU kernel against eager PyTorch, forward and backward, on this CPU.

    python benchmarks/bench_fused.py [--repeats 20] [--batch 64] [--json out.json]

For each activation shape of the 64 px VAE-GAN step at batch 64 (the encoder's and decoder's batch
norms, channels_last; the discriminator's instance norms, channels_last and NCHW), the time of one
forward and backward pass through :class:`networks.fused.FusedBatchNormAct` /
``FusedInstanceNormAct`` and through ``nn.BatchNorm2d``/``nn.InstanceNorm2d`` then ``leaky_relu``,
each the fastest of ``--repeats`` (other load only adds time), and their ratio (> 1: the kernel
is faster). Records the CPU model and ISA flags beside the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from networks import fused  # noqa: E402
from pipeline.infra.speed import cpu_info  # noqa: E402

CL = torch.channels_last
# (norm, shape, layout): the 64 px step's shapes at batch 64 (decoder full resolution first)
SHAPES = [
    ("batch", (64, 32, 64, 64), CL),
    ("batch", (64, 64, 32, 32), CL),
    ("batch", (64, 128, 16, 16), CL),
    ("batch", (64, 256, 8, 8), CL),
    ("instance", (64, 64, 32, 32), CL),
    ("instance", (64, 128, 16, 16), CL),
    ("instance", (64, 64, 32, 32), torch.contiguous_format),
]


def _time(fn, x: torch.Tensor, g: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call builds and warms up
        xi = x.detach().requires_grad_()
        t = time.perf_counter()
        fn(xi).backward(g)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--slope", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=64, help="the shapes' batch size (64: the training step's)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if fused.extension() is None:
        raise SystemExit("the fused kernel could not be built on this machine (no C++ compiler?)")
    rows = []
    for norm, shape, layout in SHAPES:
        shape = (args.batch, *shape[1:])
        torch.manual_seed(0)
        x = torch.randn(*shape).contiguous(memory_format=layout)
        g = torch.randn(*shape).contiguous(memory_format=layout)
        c = shape[1]
        if norm == "batch":
            ref, kern = nn.BatchNorm2d(c), fused.FusedBatchNormAct(c)
        else:
            ref, kern = nn.InstanceNorm2d(c), fused.FusedInstanceNormAct(c)
        kern.negative_slope = args.slope
        eager_s = _time(lambda t, ref=ref: nn.functional.leaky_relu(ref(t), args.slope), x, g, args.repeats)
        fused_s = _time(kern, x, g, args.repeats)
        rows.append(
            {
                "norm": norm,
                "shape": list(shape),
                "layout": "channels_last" if layout is CL else "NCHW",
                "eager_ms": eager_s * 1e3,
                "fused_ms": fused_s * 1e3,
                "speedup": eager_s / fused_s,
            }
        )
    res = {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    print(
        f"{res['cpu_model']} ({', '.join(res['isa'])}; PyTorch {res['torch_cpu_capability']}), {res['threads']} threads"
    )
    print("| norm | shape | layout | eager fwd+bwd (ms) | fused fwd+bwd (ms) | fused speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['norm']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['eager_ms']:.1f} "
            f"| {r['fused_ms']:.1f} | {r['speedup']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
