"""The tracking outbox: the MLflow calls a run could not send, kept on disk in order.

An outbox is the folder ``<run_dir>/tracking_outbox`` (:data:`OUTBOX_NAME`) with

- ``ops.jsonl``: one operation a line, each ``{"op": KIND, FIELD: VALUE, ..., "seq": N}``. The first
  line names the run the outbox writes to (``{"op": "run", "run_id": ID, "seq": 0}``) or is that
  run's start; an outbox writes to that run only.
- ``state.json``: the tracking URI, the experiment and the run id (None until the run exists).
- ``files/``: copies of the files that file operations log, taken when they were buffered (the
  checkpoint, for one, is overwritten later). A file operation read back from an outbox may only
  send a regular file inside this folder.

Every kind of operation is one entry of :data:`OPS`: its fields and what each value must be, the
reason a malformed one is refused, and how it is sent. Building (:func:`build_op`), validating
(:func:`validate_op`) and sending (:func:`send_op`) all read that one table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.infra import checkpoint as ckpt
from pipeline.infra import model_store
from transforms.manifest import atomic_write_text

OUTBOX_NAME = "tracking_outbox"
# the first line of an outbox whose run exists: {"op": "run", "run_id": ID, "seq": 0}
BIND_OP = "run"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class OutboxError(ValueError):
    """An outbox operation that is malformed or reaches outside its outbox; nothing was sent."""


class Destination(Protocol):
    """Where operations are sent: a tracking store and the run in it (None until a start creates
    it; sending a start sets it)."""

    uri: str
    run_id: str | None

    @property
    def client(self) -> Any: ...


# ---------------------------------------------------------------------------- what values must be
_ABSENT = object()  # what a field check is given for a field the operation lacks


def _str_map(d: Any, values=(str,)) -> bool:
    return isinstance(d, dict) and all(
        isinstance(k, str) and isinstance(v, values) and not isinstance(v, bool) for k, v in d.items()
    )


def _relative_name(name: Any) -> bool:
    return (
        isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts
    )


def _of(*types: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, types)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A field that may be left out (an explicit null still has to pass ``check``)."""
    return lambda v: v is _ABSENT or check(v)


def _number_map(d: Any) -> bool:
    return _str_map(d, (int, float))


def _artifact_path(ap: Any) -> bool:
    return ap is _ABSENT or ap is None or _relative_name(ap)


# ------------------------------------------------------------------------------------ senders
def _send_start(dest: Destination, op: dict) -> None:
    if dest.run_id:
        return
    exp_id = experiment_id(dest.client, dest.uri, op["experiment"])
    dest.run_id = dest.client.create_run(exp_id, run_name=op["run_name"], tags=op["tags"]).info.run_id


def _send_params(dest: Destination, op: dict) -> None:
    from mlflow.entities import Param

    dest.client.log_batch(dest.run_id, params=[Param(k, v) for k, v in op["data"].items()])


def _send_tags(dest: Destination, op: dict) -> None:
    from mlflow.entities import RunTag

    dest.client.log_batch(dest.run_id, tags=[RunTag(k, v) for k, v in op["data"].items()])


def _send_dict(dest: Destination, op: dict) -> None:
    dest.client.log_dict(dest.run_id, op["data"], op["name"])


def _send_metrics(dest: Destination, op: dict) -> None:
    from mlflow.entities import Metric

    ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["data"].items()]
    dest.client.log_batch(dest.run_id, metrics=ms)


def _send_dataset(dest: Destination, op: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(
        name=op["name"],
        digest=op["digest"],
        source_type="local",
        source=json.dumps({"uri": op["source"]}),
        schema=json.dumps({"columns": op["columns"]}),
        profile=json.dumps({"num_rows": op["rows"]}),
    )
    tags = [InputTag("mlflow.data.context", op["context"])]
    dest.client.log_inputs(dest.run_id, datasets=[DatasetInput(ds, tags)])


def _send_artifact(dest: Destination, op: dict) -> None:
    path = Path(op["path"])
    if "name" in op and path.name != op["name"]:
        # a buffered copy: send it under its original file name
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / op["name"]).symlink_to(path.resolve())
            dest.client.log_artifact(dest.run_id, str(Path(d) / op["name"]), op["artifact_path"])
    else:
        dest.client.log_artifact(dest.run_id, str(path), op["artifact_path"])


def _send_generator(dest: Destination, op: dict) -> None:
    """The checkpoint's generator as an MLflow model, stored as data (``pipeline.infra.model_store``)."""
    import mlflow

    payload = ckpt.load_checkpoint(op["path"])
    gen, mcfg = model_store.generator_from_checkpoint(op["path"], payload)
    metrics = mlflow.tracking.MlflowClient().get_run(dest.run_id).data.metrics
    text, tags = model_store.describe_generator(payload, metrics)
    model_store.log_generator_model(dest.run_id, gen, mcfg, op["registered_name"], text, tags)


def _send_end(dest: Destination, op: dict) -> None:
    dest.client.set_terminated(dest.run_id, op["status"])


# ------------------------------------------------------------------------------- the op table
def _malformed(op: dict) -> str:
    return f"malformed {op['op']}"


@dataclass(frozen=True)
class OpKind:
    """One kind of operation: its fields in order, each with what its value must be; how it is
    sent; why a malformed one is refused; and whether ``path`` names a file that is buffered."""

    fields: dict[str, Callable[[Any], bool]]
    send: Callable[[Destination, dict], None]
    why: Callable[[dict], str] = _malformed
    buffered: bool = False


OPS: dict[str, OpKind] = {
    "start": OpKind({"experiment": _of(str), "run_name": _of(str), "tags": _optional(_str_map)}, _send_start),
    "params": OpKind({"data": _str_map}, _send_params),
    "tags": OpKind({"data": _str_map}, _send_tags),
    "dict": OpKind(
        {"data": _of(dict), "name": _relative_name},
        _send_dict,
        lambda op: "malformed dict (the name must be a relative artifact path)",
    ),
    "metrics": OpKind({"data": _number_map, "step": _of(int), "ts": _of(int)}, _send_metrics),
    "dataset": OpKind(
        {
            "name": _of(str),
            "digest": _of(str),
            "source": _of(str),
            "rows": _of(int),
            "columns": _of(list),
            "context": _of(str),
        },
        _send_dataset,
    ),
    "artifact": OpKind(
        {"path": _of(str), "artifact_path": _artifact_path},
        _send_artifact,
        lambda op: f"bad artifact path {op.get('artifact_path')!r}",
        buffered=True,
    ),
    "generator": OpKind(
        {"path": _of(str), "registered_name": _optional(_of(str))}, _send_generator, buffered=True
    ),
    "end": OpKind(
        {"status": lambda s: s in RUN_STATUSES}, _send_end, lambda op: f"bad run status {op.get('status')!r}"
    ),
}


def build_op(kind: str, **values: Any) -> dict:
    """A new operation of ``kind`` (without its sequence number): every field of its kind, in order."""
    fields = OPS[kind].fields
    if set(values) != set(fields):
        raise TypeError(f"a {kind} operation takes {', '.join(fields)}; got {', '.join(values)}")
    return {"op": kind, **{name: values[name] for name in fields}}


def _buffered_file_problem(op: dict, outbox: Path) -> str:
    raw = op.get("path")
    if not isinstance(raw, str):
        return "no file path"
    files = (outbox / "files").resolve()
    path = Path(raw)
    real = Path(os.path.realpath(path if path.is_absolute() else outbox / path))
    if path.is_symlink() or not real.is_relative_to(files) or not real.is_file():
        return f"file {raw!r} is not a buffered file inside {files}"
    if "name" in op and not (isinstance(op["name"], str) and op["name"] == Path(op["name"]).name != ".."):
        return f"bad file name {op['name']!r}"
    return ""


def validate_op(op: Any, outbox: Path) -> str:
    """Why ``op`` may not be sent ("" when it may). A file op may only send a regular file that
    lies inside ``outbox/files`` (where the Tracker copies what it buffers); nothing else on the
    machine can be uploaded through a crafted outbox, and nothing is ever unpickled."""
    kind = op.get("op") if isinstance(op, dict) else None
    if not isinstance(kind, str) or kind not in OPS:
        return f"unknown operation {op.get('op') if isinstance(op, dict) else op!r}"
    if not isinstance(op.get("seq"), int):
        return "no sequence number"
    spec = OPS[kind]
    why = _buffered_file_problem(op, outbox) if spec.buffered else ""
    if not why and not all(check(op.get(name, _ABSENT)) for name, check in spec.fields.items()):
        why = spec.why(op)
    return why


def send_op(dest: Destination, op: dict) -> None:
    """Send one operation to ``dest``; a start creates the run (unless it exists) and sets its id."""
    kind = op["op"]
    if kind != "start" and dest.run_id is None:
        raise RuntimeError("no run yet: the start of the run has not been sent")
    if kind not in OPS:
        raise ValueError(f"unknown outbox operation {kind!r}")
    OPS[kind].send(dest, op)


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created if missing; with an sqlite store its artifacts are kept beside
    the database rather than in ./mlruns."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = (
        (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()
        if uri.startswith("sqlite:///")
        else None
    )
    return client.create_experiment(name, artifact_location=loc)


# ------------------------------------------------------------------------------- the folder
def _bind_op(run_id: str) -> dict:
    """The first line of an outbox whose run exists: the only run it may write to."""
    return {"op": BIND_OP, "run_id": run_id, "seq": 0}


class Outbox:
    """One outbox folder: appending, rewriting and reading its operations, and its state."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.ops_file = self.folder / "ops.jsonl"
        self.state_file = self.folder / "state.json"
        self.files = self.folder / "files"

    def text(self, ops: list[dict], run_id: str | None) -> str:
        """The lines of ``ops``, opened by the run they write to when it exists."""
        head = [_bind_op(run_id)] if ops and run_id else []
        return "".join(json.dumps(op) + "\n" for op in [*head, *ops])

    def keep_file(self, op: dict) -> dict:
        """``op``, with the file it logs copied into the outbox now when it logs one: the
        checkpoint, for one, is overwritten later."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not OPS[op["op"]].buffered:
            return op
        src = Path(op["path"])
        dst = self.files / f"{op['seq']:06d}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return {**op, "path": str(dst), "name": src.name}

    def append(self, op: dict, run_id: str | None) -> None:
        """Add ``op`` to ``ops.jsonl``, on disk (fsynced) before this returns."""
        fresh = not self.ops_file.is_file() or self.ops_file.stat().st_size == 0
        with open(self.ops_file, "a") as f:
            # a new outbox opens with the run it writes to (or with that run's start)
            f.write(self.text([op], run_id) if fresh else json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, ops: list[dict], run_id: str | None) -> None:
        """``ops.jsonl`` holds ``ops`` only, and ``files/`` only the files they send."""
        keep = {op["path"] for op in ops if "path" in op}
        if self.files.is_dir():
            for p in self.files.iterdir():
                if str(p) not in keep:
                    p.unlink(missing_ok=True)
        atomic_write_text(self.ops_file, self.text(ops, run_id))

    def bind(self, ops: list[dict], run_id: str) -> None:
        """The outbox writes to ``run_id``, just created by its start: ``ops`` follow its name."""
        rest = [o for o in ops if o["op"] != "start"]
        atomic_write_text(self.ops_file, self.text(rest, run_id) or json.dumps(_bind_op(run_id)) + "\n")

    def save_state(self, uri: str, experiment: str, run_id: str | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"uri": uri, "experiment": experiment, "run_id": run_id}
        atomic_write_text(self.state_file, json.dumps(state))

    def load(self) -> tuple[str | None, list[dict] | None]:
        """The run this outbox writes to (None: not known yet) and its operations (None: no
        ``ops.jsonl``). The run named on its first line, or the run its first operation starts,
        and the run ``state.json`` names must agree (or the state name none yet); otherwise
        :class:`OutboxError`."""
        state_id = None
        if self.state_file.is_file():
            state_id = json.loads(self.state_file.read_text()).get("run_id") or None
        if not self.ops_file.is_file():
            return state_id, None
        bound, ops = self.read()
        if (bound or ops) and state_id and state_id != bound:
            made_for = f"run {bound}" if bound else "a run it starts itself (its first operation)"
            raise OutboxError(
                f"{self.state_file} names MLflow run {state_id}, but {self.ops_file} was made for "
                f"{made_for}: an outbox writes to its own run only; nothing was sent"
            )
        return bound or state_id, ops

    def cut_short(self) -> bool:
        """True when the last line of ``ops.jsonl`` lacks its newline (a kill or a full disk)."""
        return self.ops_file.is_file() and self.ops_file.read_bytes()[-1:] not in (b"", b"\n")

    def read(self) -> tuple[str | None, list[dict]]:
        """The run the outbox writes to (None: the run its first operation, a start, creates) and
        its operations, each validated; the first bad line refuses the whole outbox. A last line
        cut short (no newline after it: the process was killed, or the disk filled, while
        appending it) is skipped with a warning, as the local metric record's reader does; a bad
        line anywhere else is refused."""
        text = self.ops_file.read_text()
        lines = text.splitlines()
        bound: str | None = None
        ops: list[dict] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) and not text.endswith("\n"):
                    print(
                        f"WARNING tracking: {self.ops_file} line {n} was cut short (a kill or a full disk "
                        "while it was written); that operation is skipped",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                raise OutboxError(f"{self.ops_file} line {n}: not JSON ({e.msg}); nothing was sent") from e
            first = bound is None and not ops
            if isinstance(op, dict) and op.get("op") == BIND_OP:
                if not (first and isinstance(op.get("run_id"), str) and op["run_id"]):
                    raise OutboxError(
                        f"{self.ops_file} line {n}: the run an outbox writes to is named once, on its "
                        "first line; nothing was sent"
                    )
                bound = op["run_id"]
                continue
            self._check_line(n, op, first)
            ops.append(op)
        if ops and bound is None and ops[0]["op"] != "start":
            raise OutboxError(
                f"{self.ops_file} names no run: its first line is neither the run it writes to nor that "
                "run's start (an outbox writes to the run it was made for only); nothing was sent"
            )
        return bound, ops

    def _check_line(self, n: int, op: Any, first: bool) -> None:
        why = validate_op(op, self.folder)
        if not why and op["op"] == "start" and not first:
            why = "a start may only be the first operation (an outbox writes to one run)"
        if why:
            raise OutboxError(f"{self.ops_file} line {n}: {why}; nothing was sent")
