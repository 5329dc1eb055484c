"""Issue 24: one generate call per output folder, models with NaN weights refused at every load,
generate's memory bounded whatever n, disk full while saving a checkpoint reported as such, and
class names that are not file names (``/``) or not ASCII."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pydicom
import pytest
import torch

import pipeline.generate as G
from pipeline.evaluate import load_vaegan
from pipeline.generate import GenerateConfig, generate, sample_chunks, to_uint8
from pipeline.infra import model_store
from pipeline.infra.checkpoint import CheckpointError, DiskFullError, load_checkpoint, save_checkpoint
from pipeline.infra.config import load_config
from pipeline.infra.loaders import (
    load_classifier,
    load_generator,
    resolve_labels,
    sample_images,
    synthetic_source,
)
from pipeline.infra.locks import RunBusyError
from transforms.io import pixel_hash


def _cfg(tmp_path, ckpt, out, *extra):
    return load_config(
        GenerateConfig,
        None,
        [f"checkpoint={ckpt}", f"out={tmp_path / out}", "log_mlflow=false", *extra],
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _poison(state: dict[str, torch.Tensor]) -> str:
    """Set one value of the first floating-point weight to NaN (a diverged step); its name."""
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    return name


# --------------------------------------------------------------- item 7: one call per folder
def test_a_second_generate_into_the_same_folder_is_refused_while_the_first_runs(
    tmp_path, phantom_generator, monkeypatch
):
    """The second call starts while the first writes its preview (after its images, before its
    swap). Before the lock both exited 0: the second swapped its set in, then the first replaced
    it without overwrite=true, and both MLflow runs named the survivor."""
    ck, out = phantom_generator["checkpoint"], tmp_path / "shared"
    real_save_grid, second = G.save_grid, {}

    def second_call_meanwhile(*args, **kwargs):
        if not second:
            second["started"] = True  # once: the second call writes a preview too
            try:
                second["result"] = generate(_cfg(tmp_path, ck, "shared", "n=2", "seed=9"))
            except RunBusyError as e:
                second["error"] = e
        return real_save_grid(*args, **kwargs)

    monkeypatch.setattr(G, "save_grid", second_call_meanwhile)
    generate(_cfg(tmp_path, ck, "shared", "n=5"))
    assert "result" not in second
    msg = str(second["error"])
    assert str(out.resolve()) in msg and f"pid {os.getpid()}" in msg and "out=" in msg
    # the first call's set, whole; no lock file or staging left beside it
    assert len(pd.read_csv(out / "generated.csv")) == 5 and len(list((out / "images").iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


# --------------------------------------------------------------- item 8: non-finite weights
@pytest.fixture(scope="module")
def nan_generator(phantom_generator, tmp_path_factory):
    """The phantom generator's checkpoint with one NaN in its decoder (last step's and average)."""
    payload = load_checkpoint(phantom_generator["checkpoint"])
    for states in (payload["models"], payload.get("ema") or {}):
        if "decoder" in states:
            _poison(states["decoder"])
    path = tmp_path_factory.mktemp("nan") / "diverged.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("stage", ["generate", "evaluate", "classify synthetic="])
def test_a_generator_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path, nan_generator, stage):
    """Before: generate wrote all-black images with exit 0, evaluate failed in scipy's sqrtm,
    classify synthetic= crashed with a traceback."""
    load = {
        "generate": lambda: generate(_cfg(tmp_path, nan_generator, "g", "n=2")),
        "evaluate": lambda: load_vaegan(nan_generator),
        "classify synthetic=": lambda: synthetic_source(nan_generator, 32),
    }[stage]
    with pytest.raises(CheckpointError, match="NaN or Inf") as e:
        load()
    assert str(nan_generator) in str(e.value) and "decoder" in str(e.value)
    assert not (tmp_path / "g").exists()


def test_a_classifier_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path, phantom_extractor):
    """Before: load_classifier returned a model that predicts NaN."""
    payload = load_checkpoint(phantom_extractor)
    bad = _poison(payload["model"])
    path = tmp_path / "nan_classifier.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="NaN or Inf") as e:
        load_classifier(path)
    assert str(path) in str(e.value) and bad in str(e.value)


def test_a_registered_generator_version_with_nan_weights_is_refused_naming_the_uri(
    tmp_path, phantom_generator
):
    """A registry version whose weights are NaN (diverged, or tampered) generated black images.
    The model's own loader (pyfunc_generator.load_data) now refuses it too; load_generator's check
    also covers models unpickled on explicit trust."""
    gen, mcfg = model_store.generator_from_checkpoint(phantom_generator["checkpoint"])
    with torch.no_grad():
        next(p for p in gen.decoder.parameters()).view(-1)[0] = float("nan")
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # a run made through a client of this store: the fluent API may remember an experiment id
    # of another test's store in this process
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("reg"))
    client.set_terminated(run.info.run_id)
    model_store.log_generator_model(run.info.run_id, gen, mcfg, registered_name="diverged")
    # refused by the model's own loader (pyfunc_generator.load_data) or by load_generator's check
    with pytest.raises(ValueError, match="NaN or Inf|non-finite") as e:
        load_generator("models:/diverged/1", tracking_uri=uri)
    assert "models:/diverged/1" in str(e.value)


# ------------------------------------------------------------- item 10: bounded memory
def test_chunks_are_bounded_and_hold_the_images_of_one_draw(phantom_generator, monkeypatch):
    """Before, generate drew all n images at once (n=3,000,000 at 32 px was OOM-killed). Chunks
    must stay small and give the very images sample_images draws at once (the codes of one
    seeded stream), the short tail included."""
    monkeypatch.setattr(G, "CHUNK_IMAGES", 16)
    lg = load_generator(phantom_generator["checkpoint"])
    labels = resolve_labels("balanced", 40, lg)
    chunks = list(sample_chunks(lg, labels, 3, batch_size=4))
    assert [(s, len(x)) for s, x in chunks] == [(0, 16), (16, 24)]  # the tail of 8 joins the last chunk
    torch.testing.assert_close(
        torch.cat([x for _, x in chunks]), sample_images(lg, labels, 3, 4), rtol=0, atol=0
    )


def test_a_chunked_generate_writes_the_same_files_as_an_unchunked_one(
    tmp_path, phantom_generator, monkeypatch
):
    """Same seed, same set: identical PNG bytes and manifest rows whatever the chunk size, and the
    pixels of one draw of all images (what generate wrote before it streamed)."""
    ck = phantom_generator["checkpoint"]
    whole = generate(_cfg(tmp_path, ck, "whole", "n=40", "seed=5", "batch_size=4"))
    monkeypatch.setattr(G, "CHUNK_IMAGES", 16)
    chunked = generate(_cfg(tmp_path, ck, "chunked", "n=40", "seed=5", "batch_size=4"))
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "chunked")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a if k.startswith("images/"))
    rows_a, rows_b = pd.read_csv(whole["manifest"]), pd.read_csv(chunked["manifest"])
    pd.testing.assert_frame_equal(rows_a, rows_b)
    lg = load_generator(ck)
    one_draw = sample_images(lg, resolve_labels("balanced", 40, lg), 5, 4)
    assert list(rows_b["pixel_hash"]) == [pixel_hash(to_uint8(x)) for x in one_draw]


# ------------------------------------------------------------- item 11: disk full, checkpoints
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB file system (tmpfs): writes beyond it fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a 64 KiB tmpfs to fill (needs root with CAP_SYS_ADMIN): {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def test_disk_full_while_saving_a_checkpoint_names_the_file_and_keeps_the_old_one(tiny_disk):
    """torch.save on a full disk raises RuntimeError("... unexpected pos N vs M"), errno lost:
    before, that traceback reached the user instead of README's "disk full at PATH"."""
    path = tiny_disk / "last.pt"
    save_checkpoint(path, {"w": torch.ones(16)})
    with pytest.raises(DiskFullError, match="disk full at") as e:
        save_checkpoint(path, {"w": torch.zeros(200_000)})
    assert str(path) in str(e.value)
    # the checkpoint already there is intact; no temp file is left taking the space
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(16))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last.pt"]


# ------------------------------------------------------------- item 13: awkward class names
def test_class_names_with_a_slash_or_beyond_ascii_give_safe_files_and_utf8_dicoms(
    tmp_path, phantom_generator
):
    """A class named "a/b" trained and registered, then broke generate (images/syn_0_a/b.png is in
    a folder that does not exist); a DICOM for "Lungenentzündung" was written without a
    character set, so readers decode its UTF-8 bytes as ASCII/Latin-1."""
    payload = load_checkpoint(phantom_generator["checkpoint"])
    payload["label_names"] = {0: "a/b", 1: "Lungenentzündung"}
    ck = tmp_path / "names.pt"
    torch.save(payload, ck)
    res = generate(_cfg(tmp_path, ck, "g", "n=2", "dicom=true"))
    rows = pd.read_csv(res["manifest"])
    assert list(rows["label_name"]) == ["a/b", "Lungenentzündung"]  # the manifest keeps the real names
    assert list(rows["path"]) == ["images/syn_000000_a_b.png", "images/syn_000001_Lungenentzündung.png"]
    assert all((tmp_path / "g" / p).is_file() for p in rows["path"])
    plain, accented = (pydicom.dcmread(p) for p in sorted((tmp_path / "g" / "dicom").glob("*.dcm")))
    assert "SpecificCharacterSet" not in plain and plain.ImageComments == "synthetic; label=a/b"
    assert accented.SpecificCharacterSet == "ISO_IR 192"
    assert accented.ImageComments == "synthetic; label=Lungenentzündung"
    raw = next((tmp_path / "g" / "dicom").glob("syn_000001_*.dcm")).read_bytes()
    assert "Lungenentzündung".encode() in raw
