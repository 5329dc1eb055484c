"""No PHI anywhere: ingest, train and generate from DICOM files whose patient and study tags hold
marker strings, then search every manifest, log line, MLflow param, tag, metric name and artifact
(and the tracking database itself) for the markers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from cxr_factory import REPO, chest_like, make_dicom

MARKERS = {
    "PatientID": "MRN-PHI-4711",
    "PatientName": "Doe^Janet",
    "PatientBirthDate": "19450607",
    "StudyDate": "20190304",
    "AccessionNumber": "ACC-PHI-99",
    "InstitutionName": "PHI General Hospital",
    "ReferringPhysicianName": "Dr^Phiphysician",
    "StudyID": "STUDY-PHI-77",
}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI="", TQDM_DISABLE="0")
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_markers_never_leave_the_source_files(tmp_path):
    import mlflow

    src = tmp_path / "src"
    for i in range(24):
        cls = "normal" if i % 2 == 0 else "pneumonia"
        (src / cls).mkdir(parents=True, exist_ok=True)
        tags = dict(MARKERS, PatientID=f"{MARKERS['PatientID']}-{i % 6}")
        make_dicom(
            src / cls / f"img{i:02d}.dcm",
            chest_like(48, 48, np.uint16, seed=i),
            patient_id=tags.pop("PatientID"),
            patient_name=tags.pop("PatientName"),
            extra=tags,
        )
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    manifest = work / "manifests" / "phi.csv"
    logs = [_run("ingest", str(src), "--out", str(manifest))]
    logs.append(
        _run(
            "train",
            f"data.manifest={manifest}",
            "data.image_size=32",
            "data.batch_size=8",
            "model.latent_dim=8",
            "model.base_channels=8",
            "model.num_classes=2",
            "epochs=1",
            "grid_size=4",
            f"out_dir={work / 'out'}",
            f"tracking.uri={uri}",
            "tracking.experiment=phi",
            "tracking.register_model=phi-gen",
        )
    )
    ckpt = next((work / "out").rglob("last.pt"))
    logs.append(
        _run(
            "generate",
            f"checkpoint={ckpt}",
            "n=4",
            "dicom=true",
            f"out={work / 'gen'}",
            f"tracking.uri={uri}",
        )
    )

    texts = [p.stdout + p.stderr for p in logs]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            texts += [
                repr(run.data.params),
                repr(run.data.tags),
                repr(list(run.data.metrics)),
                run.info.run_name or "",
            ]
    blobs = [f.read_bytes() for f in work.rglob("*") if f.is_file()]
    assert len(blobs) > 20  # manifests, checkpoints, grids, plots, artifacts, model, generated DICOM, the db
    for marker in MARKERS.values():
        for variant in {marker, marker.replace("^", " ")}:
            assert not any(variant in t for t in texts), f"{variant} in a log, param or tag"
            assert not any(variant.encode() in b for b in blobs), f"{variant} in a file under {work}"
    # the pseudonymised patients still group the images: 6 patients, none in two splits
    import pandas as pd

    df = pd.read_csv(manifest)
    assert df["patient_id"].nunique() == 6
    assert df.groupby("patient_id")["split"].nunique().max() == 1 or set(df["split"]) <= {"train", "val"}


# ------------------------------------------------------------------------------------------ the salt
def _salt_in_process(folders: list[str], barrier, queue) -> None:
    """Spawned process: for each fresh folder, wait for the others, then ask for its salt."""
    import os

    os.environ.pop("CXR_VAEGAN_SALT", None)
    from transforms import phi

    got = []
    for folder in folders:
        barrier.wait()
        got.append(phi.get_salt(Path(folder) / ".phi_salt"))
    queue.put(got)


def test_threads_racing_on_a_fresh_folder_get_one_salt(tmp_path, monkeypatch):
    import threading

    from transforms import phi

    monkeypatch.delenv(phi.SALT_ENV, raising=False)
    for attempt in range(8):  # the race is timing-dependent: several fresh folders
        folder = tmp_path / f"f{attempt}"
        folder.mkdir()
        barrier = threading.Barrier(16)
        got: list[bytes] = []

        def ask(folder=folder, barrier=barrier, got=got):
            barrier.wait()
            got.append(phi.get_salt(folder / ".phi_salt"))

        threads = [threading.Thread(target=ask) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 16 and len(set(got)) == 1, f"threads got {len(set(got))} different salts"
        assert len(got[0]) >= 16
        assert (folder / ".phi_salt").read_bytes() == got[0]
        assert [p.name for p in folder.iterdir()] == [".phi_salt"]  # no temp file left behind


def test_processes_racing_on_a_fresh_folder_get_one_salt(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = 4
    folders = [tmp_path / f"f{i}" for i in range(10)]  # the race is timing-dependent: 10 rounds
    for f in folders:
        f.mkdir()
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    args = ([str(f) for f in folders], barrier, queue)
    procs = [ctx.Process(target=_salt_in_process, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for i, folder in enumerate(folders):
        salts = {g[i] for g in got}
        assert len(salts) == 1, f"{len(salts)} different salts for one folder"
        salt = salts.pop()
        assert len(salt) >= 16 and (folder / ".phi_salt").read_bytes().strip() == salt


def test_default_salt_file_is_in_the_working_directory(tmp_path, monkeypatch):
    from transforms import phi

    monkeypatch.delenv(phi.SALT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    salt = phi.get_salt()
    assert (tmp_path / ".phi_salt").read_bytes().strip() == salt
    monkeypatch.setenv(phi.SALT_ENV, "x" * 20)  # the variable still wins over the file
    assert phi.get_salt() == b"x" * 20


def test_an_empty_salt_file_is_refused(tmp_path, monkeypatch):
    import pytest

    from transforms import phi

    monkeypatch.delenv(phi.SALT_ENV, raising=False)
    (tmp_path / ".phi_salt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?i)\.phi_salt.*delete"):
        phi.get_salt(tmp_path / ".phi_salt")
    (tmp_path / ".phi_salt").write_bytes(b"tooshort\n")
    with pytest.raises(ValueError, match=r"\.phi_salt"):
        phi.get_salt(tmp_path / ".phi_salt")


def test_a_short_salt_variable_is_refused(tmp_path, monkeypatch):
    import pytest

    from transforms import phi

    monkeypatch.setenv(phi.SALT_ENV, "short")
    with pytest.raises(ValueError, match="CXR_VAEGAN_SALT"):
        phi.get_salt(tmp_path / ".phi_salt")
    assert not (tmp_path / ".phi_salt").exists()


def test_ingest_resolves_the_salt_once_before_its_threads_start(tmp_path, monkeypatch):
    """A fresh working directory without a salt file, several decoding threads: the salt is read
    or created once, on the calling thread, and every file of a patient gets the same pseudonym."""
    import threading

    import pandas as pd

    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.stage import ingest
    from transforms import phi

    monkeypatch.delenv(phi.SALT_ENV, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        make_dicom(src / f"img{i:02d}.dcm", chest_like(32, 32, np.uint16, seed=i), patient_id=f"MRN-{i % 3}")
    callers: list[str] = []
    real = phi.get_salt

    def spy(*args, **kwargs):
        callers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(phi, "get_salt", spy)
    ingest(IngestConfig(source=str(src), out=str(work / "m.csv"), workers=6, val_fraction=0.0))
    assert callers and set(callers) == {threading.main_thread().name}, callers
    salt = (work / ".phi_salt").read_bytes().strip()
    assert len(salt) >= 16
    df = pd.read_csv(work / "m.csv")
    expected = {f"img{i:02d}.dcm": phi.pseudonymise(f"MRN-{i % 3}", salt) for i in range(12)}
    assert dict(zip(df["path"], df["patient_id"], strict=True)) == expected
    assert df["patient_id"].nunique() == 3


# ------------------------------------------------------------------------------- values in messages
def test_dicom_tag_values_never_reach_logs_warnings_or_quarantine(tmp_path, monkeypatch, capfd, caplog):
    """pydicom warns with the raw value of a non-conformant element ("Invalid value for VR UI:
    '1.2.840.MRN-SECRET-4711'"), and exception texts carry values too: neither may reach the
    terminal, a log record, a warning, the manifest or the (shared) quarantine report."""
    import logging
    import warnings

    import pydicom

    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.stage import ingest

    monkeypatch.chdir(tmp_path)
    uid_marker, pid_marker, rows_marker = "MRN-SECRET-4711", "PID-SECRET-0815", "ROWS-SECRET-0042"
    src = tmp_path / "src"
    src.mkdir()
    with pydicom.config.disable_value_validation():
        for i in range(3):
            make_dicom(
                src / f"uid{i}.dcm",
                chest_like(40, 40, np.uint16, seed=i),
                patient_id="" if i == 0 else pid_marker,  # file 0: the study UID is the patient key
                extra={"StudyInstanceUID": f"1.2.840.{uid_marker}"},
            )
        bad = make_dicom(src / "bad_rows.dcm", chest_like(40, 40, np.uint16, seed=9), patient_id=pid_marker)
        ds = pydicom.dcmread(bad)
        del ds.Rows
        ds.add_new(0x00280010, "LO", rows_marker)  # Rows holding text: int() fails quoting the value
        ds.save_as(bad)
    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "out" / "m.csv"), workers=3))
        # the quiet reading switched process-wide state off and back on: nothing is left behind
        assert warnings.filters == filters
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN
    assert logging.getLogger("pydicom").propagate and not logging.getLogger("pydicom").filters
    out, err = capfd.readouterr()
    assert res.rows == 3 and len(res.quarantined) == 1
    texts = [out, err, caplog.text] + [str(w.message) for w in caught]
    texts += [r for _, r in res.quarantined]
    blobs = [f.read_bytes() for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert len(blobs) >= 4
    for marker in (uid_marker, pid_marker, rows_marker):
        assert not any(marker in t for t in texts), f"{marker} in a log line, warning or reason"
        assert not any(marker.encode() in b for b in blobs), f"{marker} in an output file"


def test_an_unwritable_folder_gets_one_salt_per_process_and_one_warning(tmp_path, monkeypatch, capsys):
    import errno

    from transforms import phi

    monkeypatch.delenv(phi.SALT_ENV, raising=False)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(phi.tempfile, "mkstemp", read_only)
    salts = {phi.get_salt(tmp_path / ".phi_salt") for _ in range(3)}
    assert len(salts) == 1 and len(salts.pop()) >= 16
    assert not (tmp_path / ".phi_salt").exists()
    err = capsys.readouterr().err
    assert err.count("warning: cannot create the PHI salt file") == 1 and "CXR_VAEGAN_SALT" in err
