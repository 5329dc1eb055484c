"""Smaller faults of issue 24 item 13: files written with the umask's mode, one PHI salt for a
team, and inputs that are no radiograph (complex NIfTI, a 1:312 strip) refused at reading."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from transforms import phi
from transforms.io import CXRReadError, read_image
from transforms.manifest import atomic_write_text


def test_written_files_take_the_umask_mode_not_0600(tmp_path):
    # mkstemp makes 0600 files: a manifest in a team's shared folder was unreadable to the team
    import torch

    from pipeline.infra.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.csv", "path,label\n")
        save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o644


def test_a_new_salt_says_so_and_a_team_shares_one_salt_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(phi.SALT_ENV, raising=False)
    monkeypatch.delenv(phi.SALT_FILE_ENV, raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    salt_a = phi.get_salt()
    assert "created a new salt" in capsys.readouterr().err  # before: silent
    monkeypatch.chdir(b)
    assert phi.get_salt() != salt_a  # two folders, two salts: the message tells the user
    capsys.readouterr()
    # one salt file for every ingest of a team, whatever folder it runs in
    monkeypatch.setenv(phi.SALT_FILE_ENV, str(a / phi.SALT_FILE_NAME))
    assert phi.get_salt() == salt_a
    monkeypatch.chdir(a)
    assert phi.get_salt() == salt_a and "created" not in capsys.readouterr().err


def test_complex_nifti_is_refused(tmp_path):
    data = (np.random.default_rng(0).normal(size=(32, 32)) + 1j).astype(np.complex64)
    path = tmp_path / "kspace.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(CXRReadError, match="complex"):
        read_image(path)


def test_a_strip_of_1_to_312_is_no_radiograph(tmp_path):
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((2, 624), 128, np.uint8)).save(path)
    with pytest.raises(CXRReadError, match="aspect ratio of 1:312"):
        read_image(path)
