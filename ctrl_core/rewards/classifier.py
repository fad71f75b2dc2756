"""The project's own digit classifier as a reward: log p(c | x)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import RewardFn


def classifier(weights: str | None = None, temperature: float = 1.0) -> RewardFn:
    """log p(c | x) under the project's own digit classifier (trained on its data; ships as safetensors)."""
    from ..embedded import WEIGHTS_DIR, load_builtin_classifier

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
