"""MLflow set-up: an embedded sqlite store under ``mlflow/store`` unless told otherwise.

Order of precedence: ``tracking.uri`` in the config, then ``MLFLOW_TRACKING_URI``, then the
embedded store ``sqlite:///<cwd>/mlflow/store/mlflow.db`` with artifacts in
``<cwd>/mlflow/store/artifacts`` (both git-ignored; ``CXR_VAEGAN_STORE`` moves them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.infra import checkpoint as ckpt
from pipeline.infra.outbox import (
    OUTBOX_NAME,
    RUN_STATUSES,
    Outbox,
    OutboxError,
    build_op,
    experiment_id,
    send_op,
)
from pipeline.infra.stage_configs import (
    TrackingConfig,
)

# the code's own checkout, for the commit hash recorded with every run ("unknown" when installed)
REPO_ROOT = Path(__file__).resolve().parents[2]


def store_dir() -> Path:
    """The embedded store's folder: ``./mlflow/store`` in the working directory (never beside
    installed code), or ``CXR_VAEGAN_STORE`` when set."""
    return Path(os.environ.get("CXR_VAEGAN_STORE") or Path.cwd() / "mlflow" / "store")


def embedded_uri(folder: Path | None = None) -> str:
    folder = store_dir() if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that shows a store's runs in the MLflow UI (one worker: ~0.5 GB)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    art = ""
    if uri.startswith("sqlite:///"):
        art = f" --default-artifact-root {Path(uri[len('sqlite:///') :]).parent / 'artifacts'}"
    return f"mlflow ui --workers 1 --backend-store-uri {uri}{art} --host 127.0.0.1 --port 5000"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or embedded_uri()


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # models are registered in the same store the runs go to
    mlflow.set_registry_uri(uri)
    exp_id = experiment_id(
        mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri), uri, cfg.experiment
    )
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    """The code version: commit hash, with '-dirty' when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------ outage-tolerant logging
def fail_fast_http() -> None:
    """MLflow retries a failed HTTP request 7 times with exponential back-off (minutes) and
    waits 120 s for an answer. A training loop must not stall that long on a dead server: fail
    at once and let the outbox keep the data (it is retried every ``retry_s``). Explicit settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class Tracker:
    """Logs one run to MLflow and keeps going when the tracking server cannot be reached.

    Every call is sent at once when the server answers. When a call fails (the server is down at
    start, killed mid-run, the disk behind it is full, ...), that call and every later one go to an
    outbox on disk, in order (``<run_dir>/tracking_outbox/ops.jsonl``, :class:`Outbox`; logged
    files are copied there, so a file overwritten later, such as the checkpoint, is sent as it was). Every
    ``retry_s`` seconds the next call first tries to send the outbox; the end of the run tries once
    more. What still cannot be sent stays on disk, a warning says where, and
    ``python -m pipeline.run sync OUTBOX`` sends it later. A run that could not be created on the
    server at start is created when the outbox is first sent, with the original metric timestamps.

    Beside the outbox, every metric logged is appended to ``<run_dir>/metrics.jsonl``: the local
    record a resumed run reads its highest logged step from, and the loss curve is drawn from,
    whether or not the server is up.

    ``enabled=False`` (replicas other than rank 0 under torchrun) makes every call a no-op.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: Path, enabled: bool = True) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.run_dir = Path(run_dir)
        self.box = Outbox(self.run_dir / OUTBOX_NAME)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.uri = resolve_uri(cfg) if enabled else ""
        self.run_id: str | None = None
        self.pending: list[dict] = []
        self.online = True
        self.next_retry = 0.0
        self.sent_late = 0
        self.last_error = ""
        self._seq = 0
        self._client = None
        if enabled:
            if self.uri.startswith(("http://", "https://")):
                fail_fast_http()
            import mlflow

            # no server contact here: the experiment is looked up or created by the start op
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)

    # ------------------------------------------------------------------ public API (train uses)
    def start(self, run_id: str | None, run_name: str, tags: dict[str, str] | None = None) -> str | None:
        """Begin (or, with ``run_id``, continue) the run. Returns the run id, or None while the
        server has not been reached yet."""
        if not self.enabled:
            return None
        try:
            self._load()
            if run_id and (self.run_id or self.pending) and run_id != self.run_id:
                owner = f"MLflow run {self.run_id}" if self.run_id else "a run it starts itself"
                raise OutboxError(
                    f"{self.box.folder} holds the tracking of {owner}, but this process continues run "
                    f"{run_id} (its checkpoint's): an outbox writes to its own run only; nothing was "
                    f"sent. Move {self.box.folder} away (after python -m pipeline.run sync {self.box.folder}, "
                    "if what it holds should reach the server)"
                )
        except OutboxError:
            self.enabled = False  # nothing goes to any run, not even an end
            raise
        continuing = bool(run_id or self.run_id)
        self.run_id = run_id or self.run_id
        self._mark_run_folder()
        if self.run_id is None and not any(op["op"] == "start" for op in self.pending):
            self._submit(
                build_op("start", experiment=self.cfg.experiment, run_name=run_name, tags=tags or {})
            )
        elif continuing:
            self._reopen()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self._submit(build_op("params", data=dict(items[i : i + 100])))

    def log_tags(self, tags: dict[str, str]) -> None:
        self._submit(build_op("tags", data={k: str(v)[:5000] for k, v in tags.items()}))

    def log_dict(self, data: dict, name: str) -> None:
        self._submit(build_op("dict", data=data, name=name))

    def log_dataset(self, manifest: str | Path, context: str = "train") -> None:
        """Record a manifest as the run's dataset input (name, content digest, rows, columns): the
        MLflow UI shows which data a run used and whether two runs used the same."""
        if not self.enabled:
            return
        import hashlib

        manifest = Path(manifest)
        raw = manifest.read_bytes()
        header = raw.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        self._submit(
            build_op(
                "dataset",
                name=manifest.stem,
                digest=hashlib.sha256(raw).hexdigest()[:16],
                source=str(manifest.resolve()),
                rows=max(raw.count(b"\n") - 1, 0),
                columns=header.split(","),
                context=context,
            )
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        data = {k: float(v) for k, v in metrics.items()}  # numpy and tensor scalars included
        self._submit(build_op("metrics", data=data, step=step, ts=ts))
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "ts": ts, "metrics": data}) + "\n")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit(build_op("artifact", path=str(path), artifact_path=artifact_path))

    def log_generator(self, checkpoint: str | Path, registered_name: str = "") -> None:
        """Log the generator of a train checkpoint as an MLflow pyfunc model stored as data
        (``pipeline.infra.model_store``: JSON spec + weights-only state dict), and register it."""
        self._submit(build_op("generator", path=str(checkpoint), registered_name=registered_name))

    def end_if_running(self, run_id: str, status: str = "KILLED") -> None:
        """Mark an earlier run ``status`` if the store still shows it RUNNING (its process died:
        the caller holds the run folder's lock). Best effort: an unreachable store is only noted."""
        if not self.enabled or not run_id or run_id == self.run_id:
            return
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status)
                print(f"tracking: earlier run {run_id} of a dead process marked {status}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - the store may be down or the run gone
            print(
                f"WARNING tracking: could not check earlier run {run_id} ({type(e).__name__})",
                file=sys.stderr,
            )

    def max_logged_step(self) -> int:
        """The highest step this run has logged so far, by any process: the larger of the local
        record and, when it answers, the server (a process killed between sending a metric and
        appending it to the local record sent one step the record lacks)."""
        local = max((s for s, _ in self._records()), default=-1)
        if not self.enabled or not self.run_id or self.pending:
            return local
        try:
            run = self.client.get_run(self.run_id)
            server = max(
                (m.step for k in run.data.metrics for m in self.client.get_metric_history(self.run_id, k)),
                default=-1,
            )
        except Exception as e:  # noqa: BLE001 - unreachable: the local record is what we have
            self._went_offline(e)
            return local
        return max(local, server)

    def history(self) -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {}
        for step, metrics in self._records():
            for k, v in metrics.items():
                out.setdefault(k, []).append((step, float(v)))
        return out

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")

    def close(self, status: str = "FINISHED") -> dict[str, Any]:
        """End the run; try to send what is buffered; warn clearly about whatever is left."""
        if not self.enabled:
            return {}
        self._submit(build_op("end", status=status))
        if self.pending:
            self.flush()
        summary = {"pending": len(self.pending), "sent_late": self.sent_late, "outbox": str(self.box.folder)}
        if self.pending:
            kinds: dict[str, int] = {}
            for op in self.pending:
                kinds[op["op"]] = kinds.get(op["op"], 0) + 1
            print(
                f"WARNING tracking: {self.uri} could not be reached; {len(self.pending)} operations "
                f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}) are kept in {self.box.folder}. "
                f"Nothing is lost: send them when the server is back with\n"
                f"    python -m pipeline.run sync {self.box.folder}",
                file=sys.stderr,
                flush=True,
            )
        elif self.sent_late:
            print(
                f"tracking: {self.sent_late} operations buffered during the outage were sent to {self.uri}",
                file=sys.stderr,
                flush=True,
            )
        return summary

    def flush(self) -> bool:
        """Send the outbox in order; True when it is empty afterwards."""
        if not self.pending:
            return True
        n_before = len(self.pending)
        while self.pending:
            try:
                self._send(self.pending[0])
            except Exception as e:  # noqa: BLE001 - any failure of the store keeps the op
                self._went_offline(e)
                break
            self.pending.pop(0)
            self.sent_late += 1
        self._rewrite()
        if not self.pending:
            if not self.online:
                print(
                    f"tracking: {self.uri} is reachable again; sent {n_before} buffered operations",
                    file=sys.stderr,
                    flush=True,
                )
            self.online = True
            return True
        return False

    # ------------------------------------------------------------------------------ internals
    def _mark_run_folder(self) -> None:
        """The run marker (``ckpt.RUN_ID_FILE``) in the run folder from the start, empty until the
        server has seen the run: ``engine.set_aside`` moves only folders that carry it."""
        marker = self.run_dir / ckpt.RUN_ID_FILE
        with contextlib.suppress(OSError):
            if not marker.is_file() or (self.run_id and not marker.read_text().strip()):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                marker.write_text(self.run_id or "")

    def _reopen(self) -> None:
        """A run this process continues (a resume) shows RUNNING again while it trains: ``sync``
        never writes into an ended run, so a resumed FINISHED or FAILED run would otherwise leave
        an outbox that could not be sent. Best effort, like every call; what an earlier process
        of the run left in the outbox goes first."""
        if self.pending and not self.flush():
            return
        try:
            if self.client.get_run(self.run_id).info.status != "RUNNING":
                self.client.update_run(self.run_id, "RUNNING")
        except Exception as e:  # noqa: BLE001 - the store may be down
            self._went_offline(e)

    def _submit(self, op: dict) -> None:
        if not self.enabled:
            return
        self._seq += 1
        op = {**op, "seq": self._seq}
        if self.pending and time.monotonic() >= self.next_retry:
            self.flush()
        if not self.pending:
            try:
                self._send(op)
                return
            except Exception as e:  # noqa: BLE001
                self._went_offline(e)
        self._enqueue(op)

    def _went_offline(self, err: Exception) -> None:
        self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if self.online:
            print(
                f"WARNING tracking: {self.uri} failed ({self.last_error}); training goes on, "
                f"logging is kept in {self.box.folder} and retried every {self.cfg.retry_s:g} s",
                file=sys.stderr,
                flush=True,
            )
        self.online = False
        self.next_retry = time.monotonic() + self.cfg.retry_s

    def _enqueue(self, op: dict) -> None:
        op = self.box.keep_file(op)
        self.pending.append(op)
        if not self.box.state_file.is_file():
            self._save_state()
        self.box.append(op, self.run_id)

    def _rewrite(self) -> None:
        if not self.box.folder.is_dir():
            return
        self.box.rewrite(self.pending, self.run_id)
        self._save_state()

    def _save_state(self) -> None:
        self.box.save_state(self.uri, self.cfg.experiment, self.run_id)

    def _load(self) -> None:
        """Pick up an outbox left by an earlier process of this run (a crash during an outage).

        The outbox writes to the run it was made for (:meth:`Outbox.load`: its ``state.json`` must
        name the same run, or none yet; otherwise :class:`OutboxError`). A last line cut short by a
        kill or a full disk is dropped from the file (:meth:`Outbox.read` reports it), so that the
        next operation is not appended to it."""
        run_id, ops = self.box.load()
        if ops is not None:
            self.pending = ops
            self._seq = max((op["seq"] for op in ops), default=0)
            self.online = not ops
        self.run_id = run_id or self.run_id
        if self.box.cut_short():
            self._rewrite()  # the cut line goes: the next operation must not be appended to it

    def _records(self):
        if not self.metrics_file.is_file():
            return
        for line in self.metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            yield int(rec["step"]), rec["metrics"]

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.tracking.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _send(self, op: dict) -> None:
        had_run = self.run_id
        send_op(self, op)
        if self.run_id != had_run:
            self._run_created()

    def _run_created(self) -> None:
        """The start just sent created the run: the run folder and the outbox name it."""
        # the folder names its run at once: a later run under the same name can end it
        # (engine.previous_run_id) even when this process dies before its first checkpoint
        with contextlib.suppress(OSError):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / ckpt.RUN_ID_FILE).write_text(self.run_id)
        if self.box.folder.is_dir():
            # an outbox is being sent: bind it to the new run before anything else is sent
            self.box.bind(self.pending, self.run_id)
            self._save_state()


def sync(outbox: str | Path, uri: str = "") -> dict[str, Any]:
    """Send an outbox left by a run whose tracking server was unreachable (``pipeline.run sync``)."""
    outbox = Path(outbox)
    state_file = outbox / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{outbox} is not a tracking outbox (no state.json)")
    if outbox.name != OUTBOX_NAME:
        raise FileNotFoundError(f"{outbox} is not a tracking outbox (its folder must be named {OUTBOX_NAME})")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise OutboxError(f"{state_file}: not JSON ({e.msg}); nothing was sent") from e
    if not (
        isinstance(state, dict)
        and isinstance(state.get("uri"), str)
        and isinstance(state.get("experiment"), str)
        and isinstance(state.get("run_id"), (str, type(None)))
    ):
        raise OutboxError(f"{state_file}: needs uri, experiment (strings) and run_id; nothing was sent")
    cfg = TrackingConfig(uri=uri or state["uri"], experiment=state["experiment"])
    tr = Tracker(cfg, outbox.parent)
    tr._load()  # refuses an outbox whose state.json names another run than its operations
    n = len(tr.pending)
    reachable = True
    if tr.pending and tr.run_id:
        try:
            status = tr.client.get_run(tr.run_id).info.status
        except Exception as e:  # noqa: BLE001 - unreachable, or no such run there: nothing is sent
            tr._went_offline(e)
            reachable = False
        else:
            if status in RUN_STATUSES:
                raise OutboxError(
                    f"{outbox}: MLflow run {tr.run_id} has already ended ({status}) on {tr.uri}; sync never "
                    "writes into or re-ends an ended run: nothing was sent. If this is that run's own "
                    "outbox (a resumed run whose server was down when it resumed), continue the run with "
                    "train resume=auto: its process reopens the run and sends the outbox"
                )
    ok = tr.flush() if reachable else False
    print(
        f"sync {outbox}: sent {tr.sent_late} of {n} operations to {tr.uri}"
        + ("" if ok else f"; {len(tr.pending)} still pending ({tr.last_error})")
        + (f"; run id {tr.run_id}" if tr.run_id else ""),
        flush=True,
    )
    return {"sent": tr.sent_late, "pending": len(tr.pending), "run_id": tr.run_id}
