"""A weighted sum of registered rewards, and its trainable copy for the value's residual."""

from __future__ import annotations

import torch
from torch import Tensor

from . import RewardFn, bind_prompts, make_reward


def weighted_sum(terms: dict[str, dict] | None = None) -> RewardFn:
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
