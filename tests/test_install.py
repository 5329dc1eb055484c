"""A non-editable install works: the wheel ships the configs and the console script, and an
installed copy run from another folder finds its configs and keeps its MLflow store and PHI salt
in that working folder, never beside the installed code."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from cxr_factory import REPO


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-500:]}")
    (wheel,) = out.glob("cxr_vaegan-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        names = z.namelist()
    return {"site": site, "names": names}


def test_wheel_ships_configs_and_the_console_script(unpacked_wheel):
    names = unpacked_wheel["names"]
    assert "pipeline/configs/kermany64.yaml" in names and "pipeline/configs/phantoms64.yaml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cxr-vaegan = pipeline.run:cli" in (unpacked_wheel["site"] / entry).read_text()


def test_installed_copy_finds_configs_and_keeps_state_in_the_working_folder(unpacked_wheel, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked_wheel["site"]), "HOME": str(tmp_path)}
    show = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "train", "configs/kermany64.yaml", "--print-config"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr[-1500:]
    assert "run_name: kermany64-vaegan" in show.stdout
    code = (
        "from pipeline.infra import tracking; from transforms import phi; import pipeline; "
        "print(pipeline.__file__); print(tracking.resolve_uri(tracking.TrackingConfig())); "
        "phi.get_salt(); print('salt ok')"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-1500:]
    installed, uri, _ = probe.stdout.splitlines()
    assert installed.startswith(str(unpacked_wheel["site"]))  # the installed copy ran, not the checkout
    assert uri == f"sqlite:///{work / 'mlflow' / 'store' / 'mlflow.db'}"
    assert (work / ".phi_salt").is_file()
    assert not list(unpacked_wheel["site"].rglob("mlflow.db")) and not list(
        unpacked_wheel["site"].rglob(".phi_salt")
    )
