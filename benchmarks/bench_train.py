"""VAE-GAN training speed: the project's step against a naive reference, in one process.

    python benchmarks/bench_train.py                      # 64/128/256 px steps + a Kermany 64 px epoch
    python benchmarks/bench_train.py --sizes 64 --epoch-images 0 --json out.json

Part 1, the training step at each size (random images, the real model and losses), two arms:
  naive      float32, NCHW tensors, and the host reads every loss with ``.item()`` after every
             step to log it (the tutorial-style loop)
  project    ``pipeline.train.make_step_fn`` as ``train`` runs it: channels_last, bf16 autocast on
             CUDA, no host sync inside the step (the engine syncs every ``log_every`` steps)
  compiled   (``--compile``) the project arm with ``torch.compile`` on the three networks
For each: images/s, step time (median of ``--repeats`` blocks of ``--steps`` steps, each block
synchronised at its end), peak memory (CUDA: allocator peak; CPU: peak RSS growth, sampled),
FLOPs per image (``torch.utils.flop_counter`` over one whole step, forward and backward), the
machine's dense matmul FLOP/s measured in the same run, and achieved / matmul FLOP/s.

Part 2, one training epoch end-to-end on a manifest (Kermany 64 px by default; skipped with a
reason when the manifest is absent):
  naive      MONAI ``Dataset`` that decodes and preprocesses every image every epoch, the naive
             step, a log line every step
  project    ``CacheDataset`` (filled once; the fill is reported on its own), the project step,
             logging every ``log_every`` steps
plus the loader alone over the cached training set with its augmentation, as a rate to compare
with the training rate (the loader must not be what the GPU or CPU waits on).

Speed-ups are ratios between arms of the same run. Results go to stdout as a table and to
``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.infra import engine, speed  # noqa: E402
from pipeline.infra.stage_configs import MEASURES  # noqa: E402
from pipeline.train import Groups, StepParts, TrainConfig, build_model, calibration_step, make_step_fn  # noqa: E402


# ----------------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_reader():
    """Bytes malloc has handed out and not had back (glibc >= 2.33 ``mallinfo2``), else the RSS.

    The resident set cannot measure an arm that runs with the allocator cache on: freed memory
    stays resident, so a later arm would show no growth at all."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return _rss
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


_heap_in_use = _heap_reader()


class PeakMemory:
    """Peak memory over a block: the CUDA allocator's peak, or on CPU the peak growth of the
    bytes malloc has handed out above their level at entry (sampled every 2 ms by a thread)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self._stop = _heap_in_use(), threading.Event()
            self._max = self.base

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, _heap_in_use())
                    time.sleep(0.002)

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self._max, _heap_in_use()) - self.base


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Dense square matmul FLOP/s, the best of ``repeats``: the machine's practical peak (the best,
    not the median, so that a busy moment lowers the peak less than it would flatter the ratio)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def make_config(size: int, arm: str, device: torch.device, head: str = "") -> TrainConfig:
    """The Kermany 64 px recipe (configs/kermany64.yaml) at ``size``; ``arm`` switches the speed work.

    naive: float32, NCHW, and the decoder as first built (transposed-conv head); project: the
    defaults ``train`` uses; project-deconv: the defaults with the transposed-conv head (the
    architecture's share of the speed-up, when the default head is another).
    """
    cfg = TrainConfig()
    cfg.data.image_size = cfg.model.image_size = size
    cfg.model.num_classes, cfg.model.latent_dim, cfg.loss.kl_weight = 2, 128, 0.1
    cfg.amp = "off" if arm == "naive" else "auto"
    if arm in ("naive", "project-deconv"):
        cfg.model.decoder_head = "deconv"
    elif head:
        cfg.model.decoder_head = head
    cfg.device = device.type
    return cfg


def arm_measures(arm: str, cfg: TrainConfig, device: torch.device) -> dict[str, bool]:
    """The CPU speed measures of an arm (pipeline/infra/speed.py): none for the naive one; for every
    other arm what ``train`` runs with, i.e. ``speed.mode=auto``'s choice for this machine, size
    and batch (timed once and cached, as ``train`` does)."""
    if arm == "naive":
        return dict.fromkeys(MEASURES, False)
    amp = engine.amp_dtype(cfg.amp, device, cfg.data.image_size)
    measures, line = speed.resolve(
        cfg.speed,
        device,
        cfg.data.image_size,
        cfg.data.batch_size,
        lambda m: calibration_step(cfg, device, amp, m),
    )
    print(line, flush=True)
    return measures


def build(
    cfg: TrainConfig, device: torch.device, measures: dict[str, bool], compile_: bool = False, batch_aug=None
):
    """The step ``train`` builds under ``measures`` (the process-wide ones are applied here)."""
    speed.apply_process_measures(measures, device)
    torch.manual_seed(0)
    model = build_model(cfg, device, measures)
    groups = Groups(model, cfg.optim)
    if compile_:
        for m in groups.modules.values():
            m.compile()
    amp = engine.amp_dtype(cfg.amp, device, cfg.data.image_size)
    step_fn = make_step_fn(StepParts(model, groups, cfg, device, amp, batch_aug=batch_aug))
    return model, step_fn, amp


def naive_step(step_fn, log: io.StringIO):
    """The project step wrapped the tutorial way: every loss read on the host after every step."""

    def fn(batch: dict) -> dict[str, torch.Tensor]:
        out = step_fn(batch)
        log.write(" ".join(f"{k}={v.item():.4f}" for k, v in out.items()) + "\n")
        return out

    return fn


def random_batch(size: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    x = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    x = x.to(device)
    if device.type == "cuda":
        x = x.contiguous()
    return {"image": x, "label": torch.randint(0, 2, (batch,), generator=g).to(device)}


def time_steps(fn, batch: dict, device: torch.device, warmup: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` blocks of the mean step time in a block of ``steps`` steps."""
    for _ in range(warmup):
        fn(batch)
    _sync(device)
    blocks = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn(batch)
        _sync(device)
        blocks.append((time.perf_counter() - t) / steps)
    return statistics.median(blocks)


def count_flops(step_fn, batch: dict) -> int:
    with FlopCounterMode(display=False) as fc:
        step_fn(batch)
    return int(fc.get_total_flops())


def bench_step(size: int, args: argparse.Namespace, device: torch.device, peaks: dict[str, float]) -> dict:
    batch_size = args.batch
    batch = random_batch(size, batch_size, device)
    res: dict[str, Any] = {"size": size, "batch": batch_size, "arms": {}}
    arms = ["naive", "project"]
    if (args.project_head or TrainConfig().model.decoder_head) != "deconv":
        arms.append("project-deconv")
    arms += ["compiled"] if args.compile else []
    arms += ["project-bf16"] if args.bf16 and device.type == "cpu" else []
    flops_by_head: dict[str, int] = {}
    for arm in arms:
        cfg = make_config(
            size, "project" if arm in ("compiled", "project-bf16") else arm, device, args.project_head
        )
        if arm == "project-bf16":  # opt-in on CPU (amp=bf16): oneDNN's bf16 kernels where the CPU has them
            cfg.amp = "bf16"
        head = cfg.model.decoder_head
        cfg.data.batch_size = batch_size
        measures = arm_measures(arm, cfg, device)
        if head not in flops_by_head:  # counted on an uncompiled build (FLOPs do not depend on dtype)
            _, plain, _ = build(cfg, device, measures)
            flops_by_head[head] = count_flops(plain, batch)
            del plain
        flops = flops_by_head[head]
        model, step_fn, amp = build(cfg, device, measures, compile_=arm == "compiled")
        fn = naive_step(step_fn, io.StringIO()) if arm == "naive" else step_fn
        t = time_steps(
            fn, batch, device, args.warmup + (2 if arm == "compiled" else 0), args.steps, args.repeats
        )
        # memory in a separate, untimed step: on CPU the sampler thread would slow the timed ones
        with PeakMemory(device) as mem:
            fn(batch)
            _sync(device)
        peak = peaks["bf16" if amp == torch.bfloat16 else "fp32"]
        res["arms"][arm] = {
            "amp": str(amp).replace("torch.", "") if amp else "fp32",
            "measures": measures,
            "decoder_head": head,
            "flops_per_image": flops / batch_size,
            "step_s": t,
            "images_per_s": batch_size / t,
            "peak_mem_mib": mem.peak / 2**20,
            "achieved_flops": flops / t,
            "ratio_to_matmul_peak": flops / t / peak,
        }
        del model, step_fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["flops_per_image"] = res["arms"]["project"]["flops_per_image"]
    base = res["arms"]["naive"]["step_s"]
    for a in res["arms"].values():
        a["speedup_vs_naive"] = base / a["step_s"]
    return res


# ------------------------------------------------------------------------------------- ablation
ABLATIONS = {
    # measure: what switching it off means
    "cache_allocations": "freed memory goes back to the kernel (engine.cache_cpu_allocations(False))",
    "gemm_convs": "plain oneDNN for the few-in/few-out convolutions (networks.layers)",
    "fused_norm_act": "batch norm then (Leaky)ReLU as two eager ops (networks.fused)",
    "split_discriminator": "one discriminator call on the concatenated batch (VAEGAN(disc_calls='joint'))",
    "channels_last": "NCHW tensors everywhere",
}


def bench_ablation(size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """The step under ``speed.mode=auto``'s choice for this machine, beside every measure on and
    every measure off, and the auto choice with each measure it keeps switched off in turn: a row
    at or above 1.00x says that measure earns its place here. Timed in interleaved blocks (every
    variant's k-th block runs back to back), so a busy moment of a shared machine falls on all
    variants alike. Each variant's step time is its fastest block."""
    batch = random_batch(size, args.batch, device)
    cfg = make_config(size, "project", device, args.project_head)
    cfg.data.batch_size = args.batch
    auto = arm_measures("project", cfg, device)
    sets = {"auto": auto, "all on": dict.fromkeys(MEASURES, True), "all off": dict.fromkeys(MEASURES, False)}
    for m in MEASURES:
        if auto[m]:
            sets[f"auto without {m}"] = {**auto, m: False}
    variants: dict[str, Any] = {}
    for name, measures in sets.items():
        _, step_fn, amp = build(cfg, device, measures)

        def fn(b, step_fn=step_fn, measures=measures):
            speed.apply_process_measures(measures, device)
            return step_fn(b)

        for _ in range(args.warmup):
            fn(batch)
        variants[name] = {
            "fn": fn,
            "flops": count_flops(fn, batch),
            "blocks": [],
            "amp": amp,
            "measures": measures,
        }
    for _ in range(args.repeats):
        for v in variants.values():
            _sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                v["fn"](batch)
            _sync(device)
            v["blocks"].append((time.perf_counter() - t) / args.steps)
    speed.apply_process_measures(auto, device)
    out: dict[str, Any] = {"size": size, "batch": args.batch, "auto": auto, "variants": {}}
    # each variant's fastest block, as speed.mode=auto compares them: other load on a shared
    # machine only ever adds time, so the minimum is the least disturbed (the median is kept too)
    base = min(variants["auto"]["blocks"])
    for name, v in variants.items():
        t = min(v["blocks"])
        off = name.removeprefix("auto without ")
        out["variants"][name] = {
            "off": ABLATIONS.get(off, ""),
            "measures_on": [m for m in MEASURES if v["measures"][m]],
            "amp": str(v["amp"]).replace("torch.", "") if v["amp"] else "fp32",
            "step_s": t,
            "step_s_median": statistics.median(v["blocks"]),
            "images_per_s": args.batch / t,
            "flops_per_image": v["flops"] / args.batch,
            "slowdown": t / base,
        }
    return out


def ablation_table(ab: dict) -> str:
    lines = [
        f"\nablation at {ab['size']} px, batch {ab['batch']}: speed=auto chose "
        f"{', '.join(m for m in MEASURES if ab['auto'][m]) or 'nothing'}; each row's time against auto's",
        "| variant | images/s | step (ms, fastest block) | step (ms, median) | GFLOP/img | / matmul peak | time vs auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in ab["variants"].items():
        lines.append(
            f"| {name} | {v['images_per_s']:.1f} | {v['step_s'] * 1e3:,.1f} | {v.get('step_s_median', v['step_s']) * 1e3:,.1f} "
            f"| {v['flops_per_image'] / 1e9:.2f} | {v['ratio_to_matmul_peak']:.0%} | {v['slowdown']:.2f}x |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- epoch
def _items(manifest: str, limit: int) -> list[dict]:
    from pipeline.infra.data import records

    items = records(manifest, "train")
    return items[:limit] if limit > 0 else items


def bench_epoch(args: argparse.Namespace, device: torch.device) -> dict:
    from pipeline.infra.data import build_dataset, device_augment, make_train_loader
    from pipeline.infra.distributed import DistInfo

    items = _items(args.manifest, args.epoch_images)
    out: dict[str, Any] = {"manifest": args.manifest, "images": len(items), "size": 64, "arms": {}}
    for arm in ("naive", "project"):
        cfg = make_config(64, arm, device, args.project_head)
        cfg.data.batch_size = args.batch
        cfg.data.num_workers = 0 if arm == "naive" else args.workers
        # the naive loop augments in the loader; the project does what train does (on CUDA: on the GPU)
        cfg.data.augment_on = "loader" if arm == "naive" else cfg.data.augment_on
        batch_aug = device_augment(cfg.data, device)
        model, step_fn, _ = build(cfg, device, arm_measures(arm, cfg, device), batch_aug=batch_aug)
        t = time.perf_counter()
        ds = build_dataset(
            items, cfg.data, train=batch_aug is None, cache="none" if arm == "naive" else "memory"
        )
        fill = time.perf_counter() - t
        loader, _, gen = make_train_loader(ds, cfg.data, 0, DistInfo())  # as train builds it
        engine.seed_epoch(0, 0, gen, ds)
        log = io.StringIO()
        fn = naive_step(step_fn, log) if arm == "naive" else step_fn
        log_fn = (lambda m, s, log=log: log.write(f"{s} {m}\n")) if arm == "project" else None
        _sync(device)
        t = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bar inside a timing
            plan = engine.EpochPlan(
                desc=arm, log_every=1 if arm == "naive" else cfg.tracking.log_every, log_fn=log_fn
            )
            _, steps = engine.run_epoch(loader, fn, 0, plan)
        _sync(device)
        epoch = time.perf_counter() - t
        n = steps * args.batch
        arm_res = {
            "epoch_s": epoch,
            "images_per_s": n / epoch,
            "steps": steps,
            "num_workers": cfg.data.num_workers,
            "augment_on": "device" if batch_aug is not None else "loader",
        }
        if arm == "project":
            arm_res["cache_fill_s"] = fill
            arm_res["epoch_incl_cache_fill_s"] = epoch + fill
            # the loader alone, same settings, a later epoch: what it can deliver per second
            engine.seed_epoch(0, 1, gen, ds)
            t = time.perf_counter()
            m = sum(b["image"].shape[0] for b in loader)
            out["loader_images_per_s"] = m / (time.perf_counter() - t)
        out["arms"][arm] = arm_res
        del model, step_fn, loader, ds
    p, nv = out["arms"]["project"], out["arms"]["naive"]
    out["speedup_steady"] = nv["epoch_s"] / p["epoch_s"]
    out["speedup_incl_cache_fill"] = nv["epoch_s"] / p["epoch_incl_cache_fill_s"]
    out["loader_over_training_rate"] = out["loader_images_per_s"] / p["images_per_s"]
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--project-head",
        default="",
        choices=["", "deconv", "subpixel"],
        help="decoder head of the project arm",
    )
    ap.add_argument("--compile", action="store_true", help="also time the project step under torch.compile")
    ap.add_argument(
        "--ablate", action="store_true", help="also time the project step with each speed measure off in turn"
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="CPU: also time the project step under bf16 autocast (amp=bf16), against the bf16 matmul peak",
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    ap.add_argument(
        "--matmul-n",
        type=int,
        default=0,
        help="one matmul size for the peak (0: the best of 512, 1024 and 2048 on CPU, 4096 and 8192 on CUDA)",
    )
    ap.add_argument("--manifest", default="data_manifests/kermany_pneumonia_224.csv")
    ap.add_argument(
        "--epoch-images", type=int, default=-1, help="-1: the whole train split; 0: skip the epoch"
    )
    ap.add_argument("--workers", type=int, default=0, help="loader workers of the project arm")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    device = engine.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = (
        [args.matmul_n] if args.matmul_n else ([4096, 8192] if device.type == "cuda" else [512, 1024, 2048])
    )
    # bf16 is what the project arm runs on CUDA from 128 px; on CPU only the opt-in --bf16 arm does,
    # and its ratio is taken against the bf16 matmul peak (a bf16 step against the fp32 peak flatters)
    bf16_peak = device.type == "cuda" or args.bf16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} if bf16_peak else {"fp32": torch.float32}

    def measure_peaks() -> dict[str, dict[int, float]]:
        return {k: {n: matmul_flops(device, dt, n) for n in sizes} for k, dt in dtypes.items()}

    # the peak is the best over sizes and over two measurements (before and after the arms): a
    # busy moment on a shared machine must not lower the reference and so flatter the ratio
    by_size = measure_peaks()
    peaks = {k: max(v.values()) for k, v in by_size.items()}
    if not bf16_peak:
        peaks["bf16"] = peaks["fp32"]
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else speed.cpu_info()["cpu_model"],
        "cpu": speed.cpu_info(),  # model, ISA flags, PyTorch's kernel level: what speed=auto keys on
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_sizes": sizes,
        "matmul_flops": peaks,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
        "steps": [],
    }
    print(
        f"device {res['device']} (ISA {' '.join(res['cpu']['isa']) or '?'}, torch kernels "
        f"{res['cpu']['torch_cpu_capability']}) threads {res['threads']} torch {torch.__version__}",
        flush=True,
    )
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()), flush=True)
    for size in args.sizes:
        r = bench_step(size, args, device, peaks)
        res["steps"].append(r)
        print(f"size {size}: done", flush=True)
    if args.ablate:
        res["ablation"] = [bench_ablation(size, args, device) for size in args.sizes]
        print("ablation: done", flush=True)
    again = measure_peaks()
    for k, v in again.items():
        peaks[k] = max(peaks[k], *v.values())
    if not bf16_peak:
        peaks["bf16"] = peaks["fp32"]
    res["matmul_flops_by_size"] = {k: {n: max(by_size[k][n], again[k][n]) for n in sizes} for k in by_size}
    for r in res["steps"]:  # ratios against the final (highest) peak
        for a in r["arms"].values():
            a["ratio_to_matmul_peak"] = (
                a["achieved_flops"] / peaks["bf16" if a["amp"] == "bfloat16" else "fp32"]
            )
    for ab in res.get("ablation", []):
        for v in ab["variants"].values():
            key = "bf16" if v["amp"] == "bfloat16" else "fp32"
            v["ratio_to_matmul_peak"] = v["flops_per_image"] * ab["batch"] / v["step_s"] / peaks[key]
    print(
        "matmul peak (final): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    if args.epoch_images != 0:
        if Path(args.manifest).is_file():
            res["epoch"] = bench_epoch(args, device)
        else:
            res["epoch"] = {"skipped": f"{args.manifest} not found (run `python -m pipeline.run ingest ...`)"}
    print(table(res))
    for ab in res.get("ablation", []):
        print(ablation_table(ab))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def table(res: dict) -> str:
    lines = [
        f"\n{res['device']} (ISA {' '.join(res['cpu']['isa']) or '?'}), {res['threads']} threads, "
        f"torch {res['torch']}; matmul peak "
        + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in res["matmul_flops"].items()),
        "",
        "| size | arm | head | precision | images/s | step (ms) | peak mem (MiB) | GFLOP/img | achieved GFLOP/s "
        "| / matmul peak | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["steps"]:
        for arm, a in r["arms"].items():
            lines.append(
                f"| {r['size']} | {arm} | {a['decoder_head']} | {a['amp']} | {a['images_per_s']:,.1f} "
                f"| {a['step_s'] * 1e3:,.1f} | {a['peak_mem_mib']:,.0f} | {a['flops_per_image'] / 1e9:.2f} "
                f"| {a['achieved_flops'] / 1e9:,.0f} "
                f"| {a['ratio_to_matmul_peak']:.0%} | {a['speedup_vs_naive']:.2f}x |"
            )
    e = res.get("epoch")
    if e and "skipped" in e:
        lines.append(f"\nepoch: skipped, {e['skipped']}")
    elif e:
        nv, p = e["arms"]["naive"], e["arms"]["project"]
        lines += [
            "",
            f"epoch, {e['images']} images at 64 px ({e['manifest']}):",
            f"  naive    {nv['epoch_s']:.1f} s ({nv['images_per_s']:.1f} img/s)",
            f"  project  {p['epoch_s']:.1f} s ({p['images_per_s']:.1f} img/s) + cache fill {p['cache_fill_s']:.1f} s once",
            f"  speed-up {e['speedup_steady']:.2f}x steady, {e['speedup_incl_cache_fill']:.2f}x on the first epoch",
            f"  loader alone {e['loader_images_per_s']:.0f} img/s = {e['loader_over_training_rate']:.1f}x the training rate",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
