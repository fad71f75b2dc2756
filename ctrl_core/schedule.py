"""Continuous-time VP-SDE view of a diffusion noise schedule.

Notation (arXiv 2502.01819 §2, App. B; docs/method.md#notation)
---------------------------------------------------------------
- ``s`` in [0, 1] is the *forward* (noising) time: s = 0 is data, s = 1 is noise. The RL time of the paper
  runs the other way, t = T - s with T = 1; every public function here takes ``s``.
- Forward VP-SDE: dX = f(s, X) ds + g(s) dB with f(s, x) = -1/2 beta(s) x and g^2(s) = beta(s).
- alpha_bar(s) = exp(-int_0^s beta), alpha_s = sqrt(alpha_bar), sigma_s = sqrt(1 - alpha_bar),
  lambda_s = log(alpha_s^2 / sigma_s^2) (log-SNR).

A discrete scheduler (``alphas_cumprod`` of length N, as in diffusers) is made continuous by linear
interpolation of log alpha_bar on the grid s_k = k / N, with log alpha_bar(0) = 0. Why log alpha_bar and not
log-SNR: log alpha_bar is finite at s = 0 (log-SNR is +inf there), it is exact at every training timestep,
and its derivative is the piecewise-constant beta(s) = N * (-log(1 - beta_k)), i.e. the DDPM chain is the
exact solution of the interpolated SDE's mean and variance at the grid points. Any real s, any step count and
any time grid are then possible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _as_tensor(s: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(s, Tensor):
        return s.to(torch.float64)
    return torch.tensor(float(s), dtype=torch.float64, device=None if like is None else like.device)


def broadcast_to(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar coefficient so that it broadcasts against x (B, ...)."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class VPSchedule:
    """Base class: subclasses define ``log_alpha_bar(s)`` and ``beta(s)`` (= g^2(s)) in float64."""

    #: how many integer timesteps the network was trained on (used to map s to the network's time input)
    num_train_timesteps: int = 1000

    def log_alpha_bar(self, s: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def beta(self, s: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- derived quantities (all float64) -----------------------------------------------------------
    def alpha(self, s: Tensor | float) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(s))

    def sigma(self, s: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(s)))

    def log_snr(self, s: Tensor | float) -> Tensor:
        """lambda_s = log(alpha^2 / sigma^2); +inf at s = 0."""
        lab = self.log_alpha_bar(s)
        return lab - torch.log(-torch.expm1(lab))

    def g2(self, s: Tensor | float) -> Tensor:
        """g^2(s) = beta(s): squared diffusion coefficient of the forward SDE."""
        return self.beta(s)

    def drift(self, s: Tensor | float, x: Tensor) -> Tensor:
        """f(s, x) = -1/2 beta(s) x, the forward drift."""
        return -0.5 * broadcast_to(self.beta(s), x) * x

    def model_time(self, s: Tensor) -> Tensor:
        """The time value a network trained on integer timesteps 0..N-1 expects: s = (k + 1) / N <-> k."""
        return (s.to(torch.float64) * self.num_train_timesteps - 1.0).clamp(min=0.0)

    #: smallest s at which a network is evaluated (DiscreteVPSchedule: s = 1/N, timestep 0)
    min_model_time_s: float = 0.0

    def default_s_start(self, num_steps: int) -> float:
        """Where a num_steps sampler starts; 1.0 for a continuous schedule (see DiscreteVPSchedule)."""
        return 1.0

    def time_grid(self, num_steps: int, s_start: float | None = None, s_end: float = 0.0) -> Tensor:
        """The sampling grid s_0 = s_start > ... > s_K = s_end with K = num_steps steps."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.linspace(
            self.default_s_start(num_steps) if s_start is None else s_start,
            s_end,
            num_steps + 1,
            dtype=torch.float64,
        )

    def random_time_grid(
        self,
        num_steps: int,
        generator: torch.Generator | None = None,
        s_start: float | None = None,
        s_end: float = 0.0,
    ) -> Tensor:
        """A stratified random grid: every interior point of ``time_grid`` is moved uniformly inside its cell.

        Training on such grids samples the time integral of eq. 21-22 at random times in [0, T] instead of
        on one fixed discretisation, so the policy does not over-fit one step count (paper Fig. 1 vs 7a).
        """
        grid = self.time_grid(num_steps, s_start, s_end)
        if num_steps == 1:
            return grid
        gaps = (grid[:-1] - grid[1:]).abs()  # gaps[i] = grid[i] - grid[i+1]
        half_cell = 0.49 * torch.minimum(gaps[:-1], gaps[1:])  # stay strictly between the neighbours
        if self.min_model_time_s > 0:  # never below the first timestep the network was trained on
            half_cell[-1] = torch.clamp(grid[-2] - self.min_model_time_s, min=0.0).clamp(max=half_cell[-1])
        u = torch.rand(num_steps - 1, generator=generator, dtype=torch.float64) * 2 - 1
        grid[1:-1] = grid[1:-1] + u * half_cell
        return grid


class LinearVPSchedule(VPSchedule):
    """Song et al.'s VP-SDE: beta(s) = beta_min + s (beta_max - beta_min), in closed form."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, num_train_timesteps: int = 1000):
        if not (0 < beta_min <= beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.num_train_timesteps = num_train_timesteps

    def log_alpha_bar(self, s):
        s = _as_tensor(s)
        return -(self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s)

    def beta(self, s):
        s = _as_tensor(s)
        return self.beta_min + s * (self.beta_max - self.beta_min)


class DiscreteVPSchedule(VPSchedule):
    """Continuous view of a discrete schedule's ``alphas_cumprod`` (diffusers' convention: index k = 0..N-1)."""

    def __init__(self, alphas_cumprod: Sequence[float] | Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)) or not torch.all(ac[1:] < ac[:-1]):
            raise ValueError("alphas_cumprod must be a strictly decreasing sequence in (0, 1) of length >= 2")
        self.alphas_cumprod = ac
        self.num_train_timesteps = ac.numel()
        self.min_model_time_s = 1.0 / ac.numel()
        # log alpha_bar at the knots s_k = k / N, k = 0..N, with log alpha_bar(0) = 0 (clean data)
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])
        self._betas = -torch.diff(self._log_ab) * ac.numel()  # piecewise-constant beta(s) on (s_{k-1}, s_k]

    def default_s_start(self, num_steps: int) -> float:
        """diffusers' "leading" spacing: n steps use timesteps (N/n)*i, i = n-1..0, then step to x_0.

        The grid therefore starts at s = 1 - 1/n + 1/N, not at s = 1: schedules such as squaredcos_cap_v2
        cap beta at 0.999 at the last timestep, where alpha ~ 0 and g^2 ~ 7000, which would make the first
        step's log-probability and KL weight explode. With this start our DDIM/DDPM samplers visit exactly
        the timesteps diffusers' schedulers visit (the last step then runs from s = 1/N to 0).
        """
        n, big_n = num_steps, self.num_train_timesteps
        return 1.0 if n >= big_n else 1.0 - 1.0 / n + 1.0 / big_n

    def time_grid(self, num_steps: int, s_start: float | None = None, s_end: float = 0.0) -> Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if s_start is not None or num_steps == 1:
            return super().time_grid(num_steps, s_start, s_end)
        first = self.default_s_start(num_steps)
        if (
            s_end >= 1.0 / self.num_train_timesteps
        ):  # stopping early (e.g. q-learning's s_min): uniform to s_end
            return super().time_grid(num_steps, first, s_end)
        body = torch.linspace(first, 1.0 / self.num_train_timesteps, num_steps, dtype=torch.float64)
        return torch.cat([body, torch.tensor([s_end], dtype=torch.float64)])

    @classmethod
    def from_scheduler(cls, scheduler) -> DiscreteVPSchedule:
        """Build from any diffusers scheduler that exposes ``alphas_cumprod`` (DDPM, DDIM, Euler, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod: not a VP (DDPM-family) schedule"
            )
        return cls(scheduler.alphas_cumprod)

    def log_alpha_bar(self, s):
        s = _as_tensor(s).clamp(0.0, 1.0)
        n = self.num_train_timesteps
        idx = torch.clamp(torch.ceil(s * n).long(), 1, n)  # s in (s_{idx-1}, s_idx]
        s0 = (idx - 1).to(torch.float64) / n
        w = (s - s0) * n
        return self._log_ab[idx - 1] * (1 - w) + self._log_ab[idx] * w

    def beta(self, s):
        s = _as_tensor(s).clamp(0.0, 1.0)
        n = self.num_train_timesteps
        idx = torch.clamp(torch.ceil(s * n).long(), 1, n)
        return self._betas[idx - 1]


# --- score <-> network output, Tweedie ----------------------------------------------------------------
def score_from_model_output(
    output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """eq. 31: s = -eps / sigma. v-prediction: eps = sigma x + alpha v. x0-prediction: s = (alpha x0 - x)/sigma^2."""
    a, sg = broadcast_to(alpha, x), broadcast_to(sigma, x)
    if prediction_type == "epsilon":
        eps = output
    elif prediction_type == "v_prediction":
        eps = sg * x + a * output
    elif prediction_type == "sample":
        return (a * output - x) / (sg * sg)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")
    return -eps / sg


def tweedie_x0(score: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eq. 19: x_hat = (sigma^2 s + x) / alpha, the posterior mean E[X_0 | X_s = x] (Tweedie's formula)."""
    a, sg = broadcast_to(alpha, x), broadcast_to(sigma, x)
    return (sg * sg * score + x) / a


__all__ = [
    "VPSchedule",
    "LinearVPSchedule",
    "DiscreteVPSchedule",
    "broadcast_to",
    "score_from_model_output",
    "tweedie_x0",
]
