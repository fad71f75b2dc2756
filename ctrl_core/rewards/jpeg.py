"""JPEG file size as a reward (DDPO's compressibility and incompressibility)."""

from __future__ import annotations

import io

import torch
from torch import Tensor

from ..imageprep import to_uint8
from . import RewardFn


def jpeg_bytes(images: Tensor, quality: int = 95, upscale: int = 1) -> Tensor:
    """JPEG size in bytes of each image (DDPO's compressibility measure)."""
    from PIL import Image

    sizes = []
    for arr in to_uint8(images):
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        if upscale > 1:
            img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(quality: int = 95, upscale: int = 4, scale_bytes: float = 100.0) -> RewardFn:
    """-JPEG size / scale_bytes: smaller files score higher (DDPO's 'compressibility').

    8x8 images are upscaled (nearest) before encoding, else one JPEG block holds the whole image and the
    size barely varies; scale_bytes keeps rewards of order one.
    """
    return lambda images, conditions=None: -jpeg_bytes(images, quality, upscale) / scale_bytes


def jpeg_incompressibility(quality: int = 95, upscale: int = 4, scale_bytes: float = 100.0) -> RewardFn:
    """+JPEG size / scale_bytes: larger files score higher (DDPO's 'incompressibility')."""
    return lambda images, conditions=None: jpeg_bytes(images, quality, upscale) / scale_bytes
