"""The scaffolding the two trainers share: CTRL/DDPO's ``algorithms.Trainer`` and ``qlearning.QLearningTrainer``.

Both run ``iterations`` steps of one batch each over the trainable parameters of a score model, with one
generator of their own for every random draw (rollouts, grids, minibatches), data-parallel through ``Dist``.
What is the same is here: the iteration loop, the resumable state (trainable weights, their optimiser, the
generator, the global RNG, the counters and the history; each trainer adds its own through ``extra_state``), the
learning-rate schedule, and the clipped optimiser step over gradients summed across ranks. The methods
themselves (the rollouts, advantages, critics and losses) stay in their modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .distributed import Dist


def lr_factor(decay: str, iteration: int, iterations: int) -> float:
    """Cosine decay to 10% of the learning rate at the last iteration (``decay="cosine"``), else 1:
    stochastic-approximation steps must shrink for the iterates to settle. Shared by every trainer."""
    if decay == "none" or iterations <= 1:
        return 1.0
    frac = min(iteration / (iterations - 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


class TrainerBase:
    """Subclasses set ``self.params`` (the trainable tensors) and ``self.opt`` (their optimiser) and implement
    ``step()``; ``config`` needs ``iterations``, ``batch_size``, ``seed``, ``lr_decay`` and ``max_grad_norm``."""

    #: The trainable tensors' key in the state (the name checkpoints have always used for this trainer).
    params_key = "policy"
    #: The per-iteration statistics' type, rebuilt from the state's history.
    stats_type: type = dict

    params: list[torch.Tensor]
    opt: torch.optim.Optimizer

    def __init__(self, config: Any, dist: Dist | None, block: str):
        """``block``: the parameter block that names the settings in error messages (optimize, qlearning)."""
        self.cfg = config
        self.dist = dist or Dist()
        if config.batch_size % self.dist.world:
            raise ValueError(
                f"{block}.batch_size ({config.batch_size}) must be a multiple of the number of processes "
                f"({self.dist.world})"
            )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.history: list = []

    def step(self):
        raise NotImplementedError

    def train(self, callback: Callable[[Any], None] | None = None) -> list:
        """Iterate until ``config.iterations`` (from where a restored state left off), calling ``callback`` with
        each iteration's statistics; returns the whole history."""
        while self.iteration < self.cfg.iterations:
            stats = self.step()
            if callback is not None:
                callback(stats)
        return self.history

    # -- resumable state (ctrl_core/resume.py) ------------------------------------------------------------------
    def extra_state(self) -> dict:
        """The subclass's own state (other networks, their optimisers, counters), stored after the optimiser."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` stored (called after the weights and the optimiser are restored)."""

    def state_dict(self) -> dict:
        """Everything the next iteration depends on: weights, optimiser moments, RNG states, counters, history.
        Restoring it into a trainer built from the same config continues the run bitwise (on the CPU)."""
        return {
            "iteration": self.iteration,
            self.params_key: [p.detach() for p in self.params],
            "opt": self.opt.state_dict(),
            **self.extra_state(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [dict(h.__dict__) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_params(state[self.params_key])
        self.opt.load_state_dict(state["opt"])
        self.load_extra_state(state)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.history = [self.stats_type(**h) for h in state["history"]]

    def _load_params(self, saved: list[torch.Tensor]) -> None:
        if len(saved) != len(self.params):
            raise ValueError(
                f"checkpoint has {len(saved)} {self.params_key} tensors, the model {len(self.params)}"
            )
        with torch.no_grad():
            for p, t in zip(self.params, saved, strict=True):
                if p.shape != t.shape:
                    raise ValueError(
                        f"checkpoint tensor of shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
                p.copy_(t)

    # -- optimisation -------------------------------------------------------------------------------------------
    def schedule_lr(self, opt: torch.optim.Optimizer, base_lr: float) -> None:
        """Set ``opt``'s learning rate for this iteration: ``base_lr`` times the ``lr_decay`` schedule."""
        for group in opt.param_groups:
            group["lr"] = base_lr * lr_factor(self.cfg.lr_decay, self.iteration, self.cfg.iterations)

    def clipped_step(
        self, opt: torch.optim.Optimizer, params: list[torch.Tensor], nonfinite: str = ""
    ) -> None:
        """Sum ``params``' gradients over the ranks, raise ``FloatingPointError(nonfinite)`` on a NaN/inf one (when
        a message is given: the weights are then untouched), clip their norm to ``max_grad_norm``, step."""
        self.dist.sync_grads(params)
        if nonfinite and not all(p.grad is None or torch.all(torch.isfinite(p.grad)) for p in params):
            raise FloatingPointError(nonfinite)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
