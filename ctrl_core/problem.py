"""The problem type: everything a trainer or evaluator needs about one task (recipes.py builds them, latent.py
extends them to latent text-to-image models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .policy import GaussianScorePolicy


@dataclass
class Problem:
    """Everything a trainer/evaluator needs about one task."""

    policy: GaussianScorePolicy
    x_shape: tuple[int, ...]
    condition_sampler: Callable[[int, torch.Generator], Tensor | None]
    eval_conditions: Callable[[int], Tensor | None]
    make_residual: Callable[[], torch.nn.Module]
