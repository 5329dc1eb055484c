"""No PHI anywhere: ingest, train and generate from DICOM files whose patient and study tags hold
marker strings, then search every manifest, log line, MLflow param, tag, metric name and artifact
(and the tracking database itself) for the markers."""

from __future__ import annotations

import os
import subprocess
import sys

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
