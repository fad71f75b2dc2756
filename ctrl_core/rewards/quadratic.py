"""The tilted-Gaussian problem's analytic reward."""

from __future__ import annotations

import torch
from torch import Tensor

from . import RewardFn


def quadratic(target: float | list[float] = 0.0, k: float = 1.0) -> RewardFn:
    """-k ||x - target||^2 (the tilted-Gaussian problem's reward)."""
    if k < 0:
        raise ValueError(f"quadratic reward: k must be >= 0, got {k}")
    tgt = torch.as_tensor(target, dtype=torch.float32)

    def fn(x: Tensor, conditions: Tensor | None = None) -> Tensor:
        return -k * (x.float() - tgt).flatten(1).pow(2).sum(1)

    return fn
