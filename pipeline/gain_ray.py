"""``gain executor=ray``: a study's generators and classifier children as a graph of Ray tasks.

A value study is many independent small training runs; this runs them on a Ray cluster (a local
instance started with the command, or ``ray.address=auto|ray://HOST:PORT``) instead of one after
another. The plan, the records, the keys and the table are the local executor's
(:class:`pipeline.gain.GainStudy`): each task rebuilds the study from its config in its worker,
trains its one item and writes that item's record, exactly as the local path does. The graph:

* each (fraction, seed)'s real child first (it judges that subset's generator and filter);
* a generator after its judge; a synthetic child after its generator; a filtered child after its
  judge too; real_dup, classical and real children depend on nothing.

A task whose worker dies is run again (``ray.max_retries``); a task that still fails is reported
by name, its dependents are not run, and every other item still finishes and is recorded. The
class fidelity of each generator, the table and the plots are made by the driver when the graph is
done. A study started with one executor continues with the other: the records are the same.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.infra.config import ConfigError, from_dict, to_dict
from pipeline.infra.study_configs import GainConfig


def _item_task(
    study_cls, spec: dict, cwd: str, parent_id: str, threads: int, kind: str, name: str, *deps
) -> dict:
    """In a Ray worker: rebuild the study, train the one item (unless recorded meanwhile) with
    ``threads`` torch threads (how a run executes, not what it computes: no key changes)."""
    os.chdir(cwd)  # the study's relative paths are the driver's
    study = study_cls(from_dict(GainConfig, spec))
    study.check_inputs()
    study.prepare_data(write=False)  # the driver wrote the study's manifests
    study.plan()
    study.parent_id = parent_id
    study.base.threads = threads
    for gen in study.generators.values():
        if gen.config is not None:
            gen.config.threads = threads
    t0 = time.time()
    if kind == "generators":
        study.ensure_generator(name)
    elif kind == "judges":  # a recorded real child whose weights are not on this file system
        study.ensure_judge(study.cell(name))
    else:
        item = study.children[name]
        if item.record is None:
            study.train_child(study.cell(name), item)
    return {"kind": kind, "name": name, "seconds": time.time() - t0, "pid": os.getpid()}


def graph(study) -> list[tuple[str, str, list[str]]]:
    """(kind, name, names it waits for) of every item to run, each listed after what it waits for:
    the unrecorded items, and a recorded generator or judge whose weights are not here (they are
    not committed) when an unrecorded item needs them, so that one task rebuilds them, not each
    item that needs them at once."""
    out: list[tuple[str, str, list[str]]] = []
    queued: set[str] = set()

    def judge(real) -> list[str]:
        """The task a judge's dependents wait for ([] when its weights are here)."""
        name = real.name
        if name in queued:
            return [name]
        if study.children[name].record is None:
            return []  # queued with its cell, before anything of the cell that needs it
        if (study.child_dir(real) / "classifier.pt").is_file():
            return []
        out.append(("judges", name, []))
        queued.add(name)
        return [name]

    for cell in study.cells():
        item = study.children[cell.name]
        if item.record is not None:
            continue
        deps: list[str] = []
        gname = study.generator_of(cell)
        if gname is not None and not gname.startswith("given-"):
            gen = study.generators[gname]
            present = Path(study.generator_path(gname)).is_file()
            if gname not in queued and (gen.record is None or not present):
                gdeps = judge(study.judge_cell(gname)) if gen.config.gate.every else []
                out.append(("generators", gname, gdeps))
                queued.add(gname)
            if gname in queued:
                deps.append(gname)
        if cell.filtered:  # its filter is the same subset's real child
            deps += judge(cell.real())
        out.append(("children", cell.name, deps))
        queued.add(cell.name)
    return out


def run_on_ray(study) -> list[str]:
    """Every unrecorded item of ``study`` as a Ray task; returns the names of the items that
    failed (after their retries) or were not run because what they wait for failed."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor=ray needs Ray: pip install '.[ray]' (or: pip install ray)") from None
    rc = study.cfg.ray
    spec = to_dict(study.cfg)
    # each task's torch threads: its CPU share, so N tasks on N cores do not oversubscribe them
    threads = max(1, int(rc.num_cpus))
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if rc.address:
            kwargs["address"] = rc.address
        elif rc.workers:
            kwargs["num_cpus"] = rc.workers
        ray.init(**kwargs)
    try:
        task = ray.remote(max_retries=rc.max_retries, num_cpus=rc.num_cpus, num_gpus=rc.num_gpus)(_item_task)
        refs: dict[str, Any] = {}
        for kind, name, deps in graph(study):
            refs[name] = task.remote(
                type(study), spec, os.getcwd(), study.parent_id, threads, kind, name, *(refs[d] for d in deps)
            )
        return _wait(ray, refs, study)
    finally:
        if started:
            ray.shutdown()


def _wait(ray, refs: dict[str, Any], study) -> list[str]:
    """Wait for every task, printing done / running / left and an estimate; the failed names."""
    pending = {ref: name for name, ref in refs.items()}
    total, done, failed, seconds = len(refs), 0, [], []
    t0 = time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=30)
        for ref in ready:
            name = pending.pop(ref)
            try:
                seconds.append(ray.get(ref)["seconds"])
                done += 1
            except Exception as e:  # noqa: BLE001 - a task's error: report it, the study goes on
                failed.append(name)
                print(
                    f"gain[ray]: {name} failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}",
                    flush=True,
                )
        left = len(pending)
        rate = (time.time() - t0) / max(done, 1)
        print(
            f"gain[ray]: {done}/{total} done, {len(failed)} failed, {left} left; about "
            f"{rate * left / 60:.0f} min to go at this pace",
            flush=True,
        )
    return failed
