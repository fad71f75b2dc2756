"""Rewards as a registry of named factories: ``make_reward(name, **options) -> fn(images, conditions) -> (B,)``.

Images are float tensors (B, C, H, W) in [-1, 1] (or vectors (B, D) for the analytic rewards); conditions are
whatever the model is conditioned on (class labels for the embedded default). A reward need not be
differentiable: CTRL only evaluates it. Plug a new reward model in with ``@register_reward("name")`` on a
factory; the name then works everywhere a reward is chosen (params.yaml, CLI, KFP parameters).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

RewardFn = Callable[[Tensor, Tensor | None], Tensor]
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = factory
        return factory

    return deco


def make_reward(name: str, **options) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: choose one of {sorted(REWARDS)}")
    return REWARDS[name](**options)


def bind_prompts(reward_fn: RewardFn, prompts) -> RewardFn:
    """Text-conditioned rewards (ImageReward, say) expose ``bind_prompts(prompts) -> RewardFn``: the bound
    function maps conditions (prompt indices, as the latent backend uses) to the prompt texts. Other rewards are
    returned unchanged; a text reward with no prompt list is an error, not a silent mis-score."""
    bind = getattr(reward_fn, "bind_prompts", None)
    if bind is None:
        return reward_fn
    if not prompts:
        raise ValueError("this reward reads prompt text: use it with a text-to-image model (a prompt list)")
    return bind(list(prompts))


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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


@register_reward("jpeg_compressibility")
def _jpeg_compressibility(quality: int = 95, upscale: int = 4, scale_bytes: float = 100.0) -> RewardFn:
    """-JPEG size / scale_bytes: smaller files score higher (DDPO's 'compressibility').

    8x8 images are upscaled (nearest) before encoding, else one JPEG block holds the whole image and the
    size barely varies; scale_bytes keeps rewards of order one.
    """
    return lambda images, conditions=None: -jpeg_bytes(images, quality, upscale) / scale_bytes


@register_reward("jpeg_incompressibility")
def _jpeg_incompressibility(quality: int = 95, upscale: int = 4, scale_bytes: float = 100.0) -> RewardFn:
    return lambda images, conditions=None: jpeg_bytes(images, quality, upscale) / scale_bytes


@register_reward("classifier")
def _classifier(weights: str | None = None, temperature: float = 1.0) -> RewardFn:
    """log p(c | x) under the project's own digit classifier (trained on its data; ships as safetensors)."""
    from .embedded import WEIGHTS_DIR, load_builtin_classifier

    clf = load_builtin_classifier(WEIGHTS_DIR if weights is None else weights)
    for p in clf.parameters():
        p.requires_grad_(False)

    def fn(images: Tensor, conditions: Tensor | None) -> Tensor:
        if conditions is None:
            raise ValueError("the classifier reward needs class labels as conditions")
        with torch.no_grad():
            logp = torch.log_softmax(clf(images.float().clamp(-1, 1)) / temperature, dim=1)
        return logp.gather(1, conditions.long().view(-1, 1)).squeeze(1)

    return fn


@register_reward("quadratic")
def _quadratic(target: float | list[float] = 0.0, k: float = 1.0) -> RewardFn:
    """-k ||x - target||^2 (the tilted-Gaussian problem's reward)."""
    if k < 0:
        raise ValueError(f"quadratic reward: k must be >= 0, got {k}")
    tgt = torch.as_tensor(target, dtype=torch.float32)

    def fn(x: Tensor, conditions: Tensor | None = None) -> Tensor:
        return -k * (x.float() - tgt).flatten(1).pow(2).sum(1)

    return fn


@register_reward("weighted_sum")
def _weighted_sum(terms: dict[str, dict] | None = None) -> RewardFn:
    """sum_i w_i * reward_i: ``terms = {name: {"weight": w, **options}}``."""
    if not terms:
        raise ValueError("weighted_sum needs at least one term")
    parts = []
    for name, opts in terms.items():
        opts = dict(opts)
        w = float(opts.pop("weight", 1.0))
        parts.append((w, make_reward(name, **opts)))
    return _weighted(parts)


def _weighted(parts: list[tuple[float, RewardFn]]) -> RewardFn:
    def fn(images: Tensor, conditions: Tensor | None = None) -> Tensor:
        return sum(w * f(images, conditions) for w, f in parts)

    if any(hasattr(f, "bind_prompts") for _, f in parts):  # text terms get the prompt list too
        fn.bind_prompts = lambda prompts: _weighted([(w, bind_prompts(f, prompts)) for w, f in parts])
    copyable = [(w, f.trainable_copy) for w, f in parts if hasattr(f, "trainable_copy")]
    if copyable:  # value.residual=reward_copy: the weighted sum of the terms' copies (see WeightedRewardCopy)
        fn.trainable_copy = lambda prompts, frozen_fraction: WeightedRewardCopy(
            [(w, make(prompts, frozen_fraction)) for w, make in copyable]
        )
    return fn


class WeightedRewardCopy(torch.nn.Module):
    """The paper's F_phi for a weighted sum of rewards: sum_i w_i copy_i(images, c) over the terms that have a
    network to copy (imagereward, aesthetic); terms without one (jpeg, classifier) add nothing to F_phi, which
    is a residual approximator, not the reward. Each copy keeps its own leading frozen share."""

    def __init__(self, parts: list[tuple[float, torch.nn.Module]]):
        super().__init__()
        self.weights = [float(w) for w, _ in parts]
        self.copies = torch.nn.ModuleList([m for _, m in parts])

    def forward(self, images: Tensor, conditions: Tensor | None = None) -> Tensor:
        return sum(w * m(images, conditions).float() for w, m in zip(self.weights, self.copies, strict=True))


# reward models that live in their own modules register themselves on import (transformers loads lazily)
from . import aesthetic as _aesthetic_reward  # noqa: E402,F401  registers "aesthetic"
from . import imagereward as _imagereward_reward  # noqa: E402,F401  registers "imagereward"


# --- the registry's contract for ctrl_core.config (temporary shim: the rewards package provides these torch-free)
def reward_names() -> tuple[str, ...]:
    """The registered reward names (what ``reward.name`` may be)."""
    return tuple(sorted(REWARDS))


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory registered as ``name`` (``reward.options`` are its keyword arguments)."""
    return REWARDS[name]
