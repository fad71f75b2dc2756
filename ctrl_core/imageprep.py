"""Image preprocessing shared by the reward models: CLIP's, with Pillow's bicubic resize reproduced in torch.

Reward models published with PIL-based preprocessing (CLIPProcessor for the aesthetic predictor, torchvision's
Resize on PIL images for ImageReward) see uint8 images resized by Pillow. Our rewards receive float tensors on
the reward's device; ``clip_pixel_values`` gives them exactly the pixel values those pipelines compute, and
``pil_bicubic_resize`` exactly the pixels Pillow's resize would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIPImageProcessor's defaults; BLIP/ImageReward use them too)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2 bits for its fixed-point 8-bit filter weights


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil_bicubic(t: Tensor) -> Tensor:
    """Pillow's bicubic_filter (a = -0.5, support 2)."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


@lru_cache(maxsize=32)
def pil_resample_weights(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) float64 matrix of Pillow's integer filter weights for one axis (precompute_coeffs +
    normalize_coeffs_8bpc): the kernel is widened by the downscale factor, each row renormalised to sum 1 over
    the pixels it covers, then rounded (half away from zero) to multiples of 2^-22, stored times 2^22."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        k = _pil_bicubic((torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / filter_scale)
        if k.sum() != 0:
            k = k / k.sum()
        weights[i, lo:hi] = torch.trunc(k * 2**PIL_PRECISION_BITS + torch.where(k < 0, -0.5, 0.5))
    return weights


@lru_cache(maxsize=1)
def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


def pillow_height_first(
    in_hw: tuple[int, int], out_hw: tuple[int, int], pillow_major: int | None = None
) -> bool:
    """Does Pillow filter height before width for this resize? Before Pillow 13: never. Pillow 13
    (python-pillow/Pillow#9549, "if height is scaled down significantly more than width, resize vertically
    first"): when the height shrinks and the width changes, and the height loses more than twice as many pixels
    as the width, ``H - h > 2 (W - w)``. The rule is inferred from Pillow 13.0.0's output, not read from its
    source (not available here): it reproduced Pillow exactly on 2,100 random size pairs, RGB and L, with
    624 more on a grid where 203 go height first."""
    (H, W), (h, w) = in_hw, out_hw
    major = _pillow_major() if pillow_major is None else pillow_major
    return major >= 13 and h < H and w != W and (H - h) > 2 * (W - w)


def pil_bicubic_resize(x: Tensor, size: tuple[int, int], pillow_major: int | None = None) -> Tensor:
    """Pillow's ``Image.resize(size[::-1], BICUBIC)`` of uint8 images, on float tensors (B, C, H, W) of levels
    0..255 -> (B, C, *size).

    Pillow (src/libImaging/Resample.c) filters one axis then the other, each pass a fixed-point sum
    ``(2^21 + sum_j v_j K_ij) >> 22`` clipped to 0..255, so the intermediate is uint8 too. Here each pass is a
    float64 matmul by ``pil_resample_weights`` (integers below 2^53: exact) and the same shift and clip: equal
    to Pillow's output bit for bit. The order of the passes matters through that uint8 intermediate (up to ~25
    levels on pixel noise, <= 2 on smooth images): width first, except where the installed Pillow (or
    ``pillow_major``) filters height first (``pillow_height_first``). torch's one-pass antialiased bicubic (same
    filter, float) differs by up to ~13 levels on noisy images.
    """
    out = x.double()
    passes = [(-1, size[1]), (-2, size[0])]  # width first, as Pillow
    if pillow_height_first(tuple(x.shape[-2:]), tuple(size), pillow_major):
        passes.reverse()
    for dim, new in passes:
        old = out.shape[dim]
        if old == new:
            continue
        weights = pil_resample_weights(old, new).to(out.device)
        out = (out.movedim(dim, -1) @ weights.T).movedim(-1, dim)
        out = torch.floor((out + 2 ** (PIL_PRECISION_BITS - 1)) / 2**PIL_PRECISION_BITS).clamp(0, 255)
    return out.to(x.dtype)


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing: resize the shortest side to ``shortest_edge`` (bicubic), center crop
    ``crop_height`` x ``crop_width``, scale to [0, 1], normalise with ``mean`` / ``std`` per channel.

    ``round_crop_offset``: the crop's offset is ``(H - h) // 2`` in transformers' CLIPImageProcessor (False),
    ``round((H - h) / 2)`` in torchvision's CenterCrop (True, ImageReward's transform); they differ when
    ``H - h`` is 3 mod 4."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    round_crop_offset: bool = False


def clip_pixel_values(images: Tensor, pre: ClipPreprocess) -> Tensor:
    """(B, C, H, W) in [-1, 1], C in {1, 3} -> CLIP pixel values (B, 3, crop_height, crop_width): what CLIP's
    preprocessing does to the same image as an 8-bit PIL image.

    1. to uint8 levels, round((x + 1) * 127.5) (as ``to_uint8``; DDPO's ``(x * 255).round()`` on [0, 1]
       images), kept as float; grayscale repeated to RGB (convert_rgb);
    2. resize the shortest side to ``shortest_edge``, long side ``int(S * long / short)``, exactly as Pillow
       does (``pil_bicubic_resize``; an axis already at its size is not filtered);
    3. center crop (offsets as ``pre.round_crop_offset`` says);
    4. ``(x / 255 - mean) / std``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"CLIP preprocessing: expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round()  # uint8 levels 0..255, kept as float
    h, w = x.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(pre.shortest_edge * long / short)
    h, w = (pre.shortest_edge, new_long) if h <= w else (new_long, pre.shortest_edge)
    x = pil_bicubic_resize(x, (h, w))
    if pre.round_crop_offset:
        top, left = int(round((h - pre.crop_height) / 2.0)), int(round((w - pre.crop_width) / 2.0))
    else:
        top, left = (h - pre.crop_height) // 2, (w - pre.crop_width) // 2
    x = x[..., top : top + pre.crop_height, left : left + pre.crop_width]
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std
