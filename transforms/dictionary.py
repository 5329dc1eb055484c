"""MONAI dictionary transforms for chest radiographs (keys ``image``/``label``).

Each transform copies the input dict and never mutates it, like MONAI's own ``MapTransform``s.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from transforms.io import read_image


class LoadCXRd(MapTransform):
    """Read the file at ``d[key]`` into an upright ``[1, H, W]`` float32 :class:`MetaTensor`.

    DICOM goes through pydicom (modality LUT, VOI LUT/window, MONOCHROME1 inverted, compressed
    transfer syntaxes via the pylibjpeg plugins and Pillow); PNG/JPEG through Pillow (colour
    collapsed to grey); 2D NIfTI through nibabel. Raises :class:`transforms.io.CXRReadError`
    naming the file and the problem.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            arr, info = read_image(path)
            meta = {
                "filename_or_obj": path,
                "format": info.format,
                "photometric": info.photometric,
                "bits_stored": info.bits_stored,
                "original_shape": (info.height, info.width),
            }
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr))[None], meta=meta)
        return d


class CLAHEd(MapTransform):
    """Contrast-limited adaptive histogram equalisation (scikit-image) on an image already in [0, 1]."""

    def __init__(
        self, keys: KeysCollection = "image", clip_limit: float = 0.01, kernel_fraction: float = 0.125
    ) -> None:
        super().__init__(keys)
        if not 0 < clip_limit <= 1:
            raise ValueError(f"clip_limit must be in (0, 1], got {clip_limit}")
        self.clip_limit = clip_limit
        self.kernel_fraction = kernel_fraction

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from skimage.exposure import equalize_adapthist

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float64)
            ks = max(8, int(min(arr.shape[-2:]) * self.kernel_fraction))
            out = np.stack(
                [
                    equalize_adapthist(np.clip(c, 0, 1), kernel_size=ks, clip_limit=self.clip_limit)
                    for c in arr
                ]
            )
            out_t = torch.as_tensor(out, dtype=torch.float32)
            d[key] = MetaTensor(out_t, meta=img.meta) if isinstance(img, MetaTensor) else out_t
        return d


class ToPlainTensord(MapTransform):
    """Drop MONAI metadata and make the label a tensor: cheaper to cache and to collate."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            v = d[key]
            d[key] = v.as_tensor() if isinstance(v, MetaTensor) else torch.as_tensor(v)
        if "label" in d:
            d["label"] = torch.as_tensor(int(d["label"]), dtype=torch.long)
        return d
