"""CPU speed measures chosen by measurement on the machine that runs, never assumed.

Each measure changes how a training step is computed, never what it computes (tests hold every
combination to the all-off losses, up to float rounding):

* ``cache_allocations``: freed memory stays in the process (glibc ``mallopt``, :func:`engine.cache_cpu_allocations`);
* ``gemm_convs``: few-channel convolutions as GEMMs (:mod:`networks.layers`, ``VAEGAN.use_gemm_convs``);
* ``fused_norm_act``: norm + (Leaky)ReLU as one C++ kernel (:mod:`networks.fused`, ``VAEGAN.fuse_norm_act``);
* ``channels_last``: NHWC activations (oneDNN's preferred layout);
* ``split_discriminator``: three discriminator calls instead of one (:mod:`networks.objective`).

What helps depends on the CPU: on an AVX-512 EPYC every measure paid; on an AVX2 EPYC the fused
kernel (before it was built with -fno-trapping-math) and channels_last made the step slower
(docs/benchmarks.md). So
``speed.mode=auto`` (the default) times each measure on and off for a few steps of the real model
at the run's image size and batch, keeps the fastest set, and caches it in a JSON file keyed by
CPU model, ISA, thread count, torch version, size and batch: the next run on that machine reads
the choice in a millisecond. ``on`` and ``off`` switch every measure; ``speed.<measure>=on|off``
overrides one. On CUDA the CPU measures are not timed: ``channels_last`` and the split
discriminator keep their defaults there, the CPU-only ones are moot.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.infra import engine
from pipeline.infra.stage_configs import MEASURES, SpeedConfig
from transforms.manifest import atomic_write_text

CACHE_ENV = "CXR_VAEGAN_SPEED_CACHE"
CACHE_VERSION = 1
# a measure stays on only if the step without it is at least this much slower: below that, the
# difference is noise on a shared machine (two timings of one set differ by up to ~6 % on a busy
# 2-core VM, docs/benchmarks.md), and "off" is the plain PyTorch path
MARGIN = 1.03
# the cache holds a few hundred bytes per machine, size and batch: anything larger is not ours
MAX_CACHE_BYTES = 1 << 20
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """CPU model, the ISA flags that matter to PyTorch's kernels, and PyTorch's own pick."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu_model": model,
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_key(image_size: int, batch_size: int) -> dict[str, Any]:
    """What a cached choice is valid for."""
    return {
        **cpu_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_size": image_size,
        "batch_size": batch_size,
        "version": CACHE_VERSION,
    }


def cache_path(cfg: SpeedConfig) -> Path:
    if cfg.cache:
        return Path(cfg.cache)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cxr-vaegan" / "speed.json"


def _read_cache(path: Path, log: Callable[[str], None] | None = None) -> list[dict]:
    """The cache's entries; ``[]`` when it is absent, and (saying so through ``log``) when it is
    not a small regular file (a FIFO would block the run, a device or a huge file exhaust it) or
    not a JSON list (deeply nested JSON raises RecursionError): calibrate again and rewrite it."""

    def ignore(why: str) -> list[dict]:
        if log is not None:
            log(f"speed: warning: ignoring the cache {path} ({why}); timing the measures again")
        return []

    try:
        st = os.stat(path)  # follows a symlink: its target must be a regular file
    except FileNotFoundError:
        return []  # the first run on this machine
    except (OSError, RuntimeError) as e:  # a symlink loop, no permission
        return ignore(f"{type(e).__name__}: {e}")
    if not stat.S_ISREG(st.st_mode):
        return ignore("not a regular file")
    if st.st_size > MAX_CACHE_BYTES:
        return ignore(f"{st.st_size} bytes, over {MAX_CACHE_BYTES}")
    try:
        # non-blocking, and checked again once open: a FIFO swapped in after the stat cannot hang the run
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return ignore("not a regular file")
            raw = f.read(MAX_CACHE_BYTES + 1)
        if len(raw) > MAX_CACHE_BYTES:
            return ignore(f"over {MAX_CACHE_BYTES} bytes")
        entries = json.loads(raw.decode("utf-8"))
    except (
        OSError,
        ValueError,
        RecursionError,
    ) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return ignore(f"{type(e).__name__}: {str(e)[:200]}")
    if not isinstance(entries, list):
        return ignore(f"a JSON {type(entries).__name__}, not a list")
    return entries


def cached_choice(path: Path, key: dict, log: Callable[[str], None] | None = None) -> dict[str, bool] | None:
    for e in _read_cache(path, log):
        if isinstance(e, dict) and e.get("key") == key and isinstance(e.get("measures"), dict):
            chosen = e["measures"]
            if set(chosen) == set(MEASURES) and all(isinstance(v, bool) for v in chosen.values()):
                return dict(chosen)
    return None


def store_choice(path: Path, key: dict, measures: dict[str, bool], timings: dict[str, float]) -> None:
    """Add (or replace) this key's entry; atomic, so a concurrent reader sees old or new."""
    entries = [e for e in _read_cache(path) if isinstance(e, dict) and e.get("key") != key]
    entries.append({"key": key, "measures": measures, "step_s": timings, "when": time.strftime("%Y-%m-%d")})
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a calibration
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1) + "\n")


def apply_process_measures(measures: dict[str, bool], device: torch.device) -> None:
    """The one process-wide measure, ``cache_allocations`` (how glibc hands memory back); the
    others are the model's (``pipeline.train.build_model``: ``VAEGAN.use_gemm_convs``,
    ``fuse_norm_act``, ``to_channels_last``, ``VAEGAN(disc_calls=...)``)."""
    if device.type == "cpu":
        engine.cache_cpu_allocations(measures["cache_allocations"])


def _time_step(step: Callable[[], Any], steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def _compare(
    build: Callable[[dict[str, bool]], Callable[[], Any]],
    device: torch.device,
    on: dict[str, bool],
    off: dict[str, bool],
    steps: int,
    repeats: int,
) -> tuple[float, float]:
    """Median step times of two measure sets, timed in interleaved blocks after one warm-up step
    each (first-call allocation, kernel build, oneDNN primitives), so a busy moment of a shared
    machine falls on both."""
    variants = []
    for measures in (on, off):
        apply_process_measures(measures, device)
        step = build(measures)
        step()
        variants.append((measures, step, []))
    for _ in range(repeats):
        for measures, step, blocks in variants:
            apply_process_measures(measures, device)
            blocks.append(_time_step(step, steps))
    # the fastest block: other load only ever adds time, so the minimum is the least disturbed
    return min(variants[0][2]), min(variants[1][2])


def calibrate(
    build: Callable[[dict[str, bool]], Callable[[], Any]],
    device: torch.device,
    steps: int = 1,
    repeats: int = 5,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, bool], dict[str, float]]:
    """Coordinate search from all-on. Pass 1: switch each measure off in turn and keep it off
    unless the step is at least :data:`MARGIN` slower without it. Pass 2: try each measure pass 1
    switched off once more, against the final set (measures interact: the fused kernel decides
    the discriminator's memory layout), and switch it back on if the step is :data:`MARGIN`
    faster with it. ``build(measures)`` returns a zero-argument training step of the real model
    under those measures. Returns the chosen set and the fastest step time of each set tried."""
    current = dict.fromkeys(MEASURES, True)
    timings: dict[str, float] = {}
    plan = [(name, 1) for name in MEASURES]
    k = 0
    while k < len(plan):
        name, rnd = plan[k]
        k += 1
        t_on, t_off = _compare(
            build, device, {**current, name: True}, {**current, name: False}, steps, repeats
        )
        keep = t_off >= MARGIN * t_on
        current[name] = keep
        timings[f"{'without' if rnd == 1 else 'again, without'} {name}"] = t_off
        timings.setdefault("all on", t_on)
        if k == len(MEASURES):  # pass 1 done: plan pass 2 over what it switched off
            plan += [(m, 2) for m in MEASURES if not current[m]]
        log(
            f"speed: [{k}/{len(plan)}] {name}{' (again)' if rnd == 2 else ''}: "
            f"{t_on * 1e3:.0f} ms on, {t_off * 1e3:.0f} ms off -> {'on' if keep else 'off'}"
        )
    apply_process_measures(current, device)
    return current, timings


def resolve(
    cfg: SpeedConfig,
    device: torch.device,
    image_size: int,
    batch_size: int,
    build: Callable[[dict[str, bool]], Callable[[], Any]],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, bool], str]:
    """The measures this run uses, and a one-line account of where they came from. Applies the
    process-wide ones. Calibrates (``mode=auto`` on CPU, no cached choice) with the RNG state
    saved and restored, so a seeded run computes the same whichever way its measures were found."""
    overrides = {m: getattr(cfg, m) == "on" for m in MEASURES if getattr(cfg, m) != "auto"}
    if cfg.mode in ("on", "off") or device.type != "cpu":
        measures = dict.fromkeys(MEASURES, cfg.mode != "off")
        source = f"mode={cfg.mode}" if device.type == "cpu" else f"{device.type}: CPU measures not timed"
    else:
        path, key = cache_path(cfg), machine_key(image_size, batch_size)
        cached = cached_choice(path, key, log)
        if cached is not None:
            measures, source = cached, f"cached choice for this machine ({path})"
        else:
            log(
                f"speed: timing the CPU measures once for {key['cpu_model']} at {image_size} px, batch {batch_size}"
            )
            t0 = time.time()
            with torch.random.fork_rng(devices=[]):
                measures, timings = calibrate(build, device, log=log)
            store_choice(path, key, measures, timings)
            source = f"calibrated in {time.time() - t0:.0f} s, cached in {path}"
    measures.update(overrides)
    apply_process_measures(measures, device)
    on = [m for m in MEASURES if measures[m]]
    off = [m for m in MEASURES if not measures[m]]
    line = f"speed: on = {', '.join(on) or 'none'}; off = {', '.join(off) or 'none'} ({source})"
    if overrides:
        line += f"; set by key: {', '.join(sorted(overrides))}"
    return measures, line
