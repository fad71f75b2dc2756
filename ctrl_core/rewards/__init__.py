"""Rewards as a registry of named factories: ``make_reward(name, **options) -> fn(images, conditions) -> (B,)``.

Images are float tensors (B, C, H, W) in [-1, 1] (or vectors (B, D) for the analytic rewards); conditions are
whatever the model is conditioned on (class labels for the embedded default, prompt indices for a
text-to-image model). A reward need not be differentiable: CTRL only evaluates it.

The registry below says where each factory lives; its module (and torch, transformers) is imported only when
the reward is made or its factory looked up, so this package imports no torch and the config can list and
check reward names cheaply. The name works everywhere a reward is chosen (params.yaml, CLI, KFP parameters).
A reward from elsewhere registers with ``@register_reward("name")`` on its factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

RewardFn = Callable[["Tensor", "Tensor | None"], "Tensor"]

# name -> "module:factory" (imported on first use), or a factory registered with @register_reward
_FACTORIES: dict[str, str | Callable[..., RewardFn]] = {
    "jpeg_compressibility": "ctrl_core.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "ctrl_core.rewards.jpeg:jpeg_incompressibility",
    "classifier": "ctrl_core.rewards.classifier:classifier",
    "quadratic": "ctrl_core.rewards.quadratic:quadratic",
    "weighted_sum": "ctrl_core.rewards.weighted:weighted_sum",
    "aesthetic": "ctrl_core.rewards.aesthetic:aesthetic",
    "imagereward": "ctrl_core.rewards.imagereward:imagereward",
}


def reward_names() -> tuple[str, ...]:
    """The registered reward names, sorted."""
    return tuple(sorted(_FACTORIES))


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory of reward ``name`` (``factory(**options) -> RewardFn``), its module imported now."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}: choose one of {list(reward_names())}")
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def make_reward(name: str, **options) -> RewardFn:
    return reward_factory(name)(**options)


def register_reward(name: str):
    """Decorator: register a reward factory from outside this package under ``name``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return deco


class _Registry(Mapping[str, Callable[..., RewardFn]]):
    """name -> factory, read-only: membership and iteration import nothing, lookup imports the factory."""

    def __contains__(self, name: object) -> bool:
        return name in _FACTORIES

    def __getitem__(self, name: str) -> Callable[..., RewardFn]:
        if name not in _FACTORIES:
            raise KeyError(name)
        return reward_factory(name)

    def __iter__(self) -> Iterator[str]:
        return iter(reward_names())

    def __len__(self) -> int:
        return len(_FACTORIES)


REWARDS: Mapping[str, Callable[..., RewardFn]] = _Registry()


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
