"""A disk cache of preprocessed images that survives processes and is never unpickled.

:class:`DiskCached` wraps the deterministic head of a transform chain (read, normalise, resize,
pad): the first time an image is seen its ``[1, S, S]`` float32 result is written as a plain
``.npy`` file; every later call, in this process or another, reads it back with
``np.load(allow_pickle=False)``. A file is keyed by the head's settings and by the image file's
identity (path, size and modification time), so an image changed after ingest is decoded again.
Writes are atomic (temporary file, then rename): two processes filling one cache at once each
write whole files. MONAI's ``PersistentDataset`` pickles its cache; this one stores arrays only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

from transforms.manifest import atomic_writer


class DiskCached(Transform):
    """``d -> head(d)`` with ``d["image"]`` (a file path) cached on disk after ``head``."""

    def __init__(self, head: Callable[[dict], dict], cache_dir: str | Path, settings: str) -> None:
        self.head, self.settings = head, settings
        self.dir = Path(cache_dir) / hashlib.sha1(settings.encode()).hexdigest()[:12]

    def path_for(self, image: str) -> Path:
        st = os.stat(image)
        ident = f"{os.path.realpath(image)}|{st.st_size}|{st.st_mtime_ns}|{self.settings}"
        h = hashlib.sha1(ident.encode()).hexdigest()
        return self.dir / h[:2] / f"{h}.npy"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        f = self.path_for(str(d["image"]))
        if f.is_file():
            try:
                d["image"] = torch.from_numpy(np.load(f, allow_pickle=False))
                return d
            except (OSError, ValueError):  # a damaged cache file: decode again and replace it
                pass
        out = self.head(d)
        arr = np.ascontiguousarray(torch.as_tensor(out["image"]).numpy(), dtype=np.float32)
        f.parent.mkdir(parents=True, exist_ok=True)
        # a full or read-only cache costs speed, never the run; not fsynced: a cache file lost in
        # a crash is decoded again
        with contextlib.suppress(OSError), atomic_writer(f, binary=True, fsync=False) as fh:
            np.save(fh, arr, allow_pickle=False)
        out["image"] = torch.from_numpy(arr)
        return out
