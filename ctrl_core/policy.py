"""The Gaussian score policy and the samplers that roll it out (paper eq. 10-13, App. B).

Score as action
---------------
The backward SDE in RL time t = T - s is  dX = [-f(T-t, X) + g^2(T-t) a] dt + g(T-t) dB  (eq. 10),
with the action a ~ pi(. | t, x, c) = N(mu_theta(t, x, c), Sigma_t)  (eq. 12).

Every stochastic solver here takes one step from s to s' < s as an affine map of the action plus Gaussian
noise,
    x' = A x + B a,   a ~ N(mu, Sigma),   Sigma = (std / B)^2 I,
i.e. x' ~ N(A x + B mu, std^2 I). The solver therefore *defines* the exploration covariance Sigma_t of the
policy, and the exact log-probability of an action is that of the transition (summed over dimensions) up to
the constant d log|B|, which cancels in every likelihood ratio. Solvers:

- ``euler_maruyama``: Euler-Maruyama on eq. 13: A = 1 + beta Delta / 2, B = beta Delta, std = sqrt(beta Delta).
- ``ddpm`` / ``ddim`` (eta): the DDIM family, eta = 1 is DDPM's ancestral posterior step, eta = 0 the
  deterministic DDIM step, i.e. the exponential integrator of the probability-flow ODE (eq. 29, 36).
- ``heun``: a deterministic second-order (Heun) solver of the probability-flow ODE in s.

``sde`` and ``ode`` are aliases of ``ddpm`` and ``ddim``. The last step into s = 0 has std = 0 (x' = Tweedie's
x_hat): it is deterministic, carries no log-probability and is excluded from the policy gradient; that is the
guard against the tiny-sigma log-prob blow-up others hit (flow_grpo #62).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SOLVER_ALIASES, SOLVERS  # the names, declared with the config (torch-free)
from .models import ScoreModel
from .schedule import VPSchedule, tweedie_x0


def canonical_solver(name: str) -> str:
    name = SOLVER_ALIASES.get(name, name)
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: choose one of {sorted(SOLVERS + tuple(SOLVER_ALIASES))}")
    return name


@dataclass
class StepCoefficients:
    """x' = A x + B mu + std xi (float64 scalars)."""

    A: Tensor
    B: Tensor
    std: Tensor

    @property
    def stochastic(self) -> bool:
        return bool(self.std > 0)


def step_coefficients(
    schedule: VPSchedule, solver: str, s: float, s_next: float, eta: float | None = None
) -> StepCoefficients:
    """Coefficients of one step from forward time s to s_next < s. ``eta`` (DDIM family only) defaults to 1
    for ``ddpm`` and 0 for ``ddim``."""
    solver = canonical_solver(solver)
    if not s_next < s:
        raise ValueError(f"a step must go backwards in forward time: s={s}, s_next={s_next}")
    if solver == "euler_maruyama":
        # eq. 13 discretised at the step's start (RL time t = T - s): drift -f + g^2 a, diffusion g
        beta, delta = schedule.beta(s), torch.tensor(s - s_next, dtype=torch.float64)
        return StepCoefficients(A=1 + 0.5 * beta * delta, B=beta * delta, std=torch.sqrt(beta * delta))
    if solver == "heun":
        raise ValueError("heun is a two-stage solver: it has no single affine step")
    if eta is None:
        eta = 1.0 if solver == "ddpm" else 0.0
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    a, sg = schedule.alpha(s), schedule.sigma(s)
    a2, sg2 = schedule.alpha(s_next), schedule.sigma(s_next)
    # DDPM posterior std of q(x_{s'} | x_s, x_0): sigma'^2/sigma^2 (1 - alpha^2/alpha'^2)
    post_var = (sg2 * sg2) / (sg * sg) * (1 - (a * a) / (a2 * a2))
    std = eta * torch.sqrt(post_var.clamp(min=0.0))
    c_eps = torch.sqrt((sg2 * sg2 - std * std).clamp(min=0.0))
    # x' = a2 x_hat + c_eps eps_hat + std xi, with x_hat = (x + sg^2 mu)/a and eps_hat = -sg mu  (eq. 29 at eta=0)
    return StepCoefficients(A=a2 / a, B=a2 * sg * sg / a - c_eps * sg, std=std)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I) summed over every non-batch dimension -> (B,)."""
    d = x[0].numel()
    z = (x - mean) / std.to(x.dtype)
    return -0.5 * z.flatten(1).pow(2).sum(1) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi)).to(x.dtype)


class GaussianScorePolicy:
    """pi(a | t, x, c) = N(mu_theta, Sigma_t) over any ``ScoreModel`` (eq. 12).

    ``solver`` and ``eta`` fix Sigma_t (see the module docstring); ``min_std`` is the guard under which a step
    is treated as deterministic.
    """

    def __init__(
        self, model: ScoreModel, solver: str = "ddpm", eta: float | None = None, min_std: float = 1e-4
    ):
        self.model = model
        self.schedule = model.schedule
        self.solver = canonical_solver(solver)
        self.eta = eta
        self.min_std = min_std

    def with_solver(self, solver: str, eta: float | None = None) -> GaussianScorePolicy:
        """The same model rolled out with another solver (evaluation across samplers)."""
        return GaussianScorePolicy(self.model, solver, eta, self.min_std)

    def mean(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """mu_theta(t, x, c): the adapted model's score at forward time s."""
        return self.model.score(s, x, c)

    @torch.no_grad()
    def reference_mean(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """mu_pre: the same network with its adapter disabled."""
        with self.model.pretrained():
            return self.model.score(s, x, c)

    def coefficients(self, s: float, s_next: float) -> StepCoefficients:
        coef = step_coefficients(self.schedule, self.solver, s, s_next, self.eta)
        if coef.std < self.min_std:
            coef.std = torch.zeros((), dtype=torch.float64)
        return coef

    def transition_mean(self, coef: StepCoefficients, x: Tensor, mu: Tensor) -> Tensor:
        return coef.A.to(x.dtype) * x + coef.B.to(x.dtype) * mu

    def log_prob(self, coef: StepCoefficients, x: Tensor, x_next: Tensor, mu: Tensor) -> Tensor:
        """Exact Gaussian log-probability of the transition x -> x_next under mean mu (summed over dims)."""
        return gaussian_log_prob(x_next, self.transition_mean(coef, x, mu), coef.std)

    def action_variance(self, coef: StepCoefficients) -> Tensor:
        """Sigma_t = (std / B)^2: the exploration level the solver implies."""
        return (coef.std / coef.B) ** 2


@dataclass
class Trajectory:
    """A batch of sampled paths on one time grid.

    grid:        (K+1,) forward times s_0 = s_start > ... > s_K
    states:      (K+1, B, ...) x at each grid time; states[-1] is the sample
    means:       (K, B, ...) mu_theta used at each step
    log_probs:   (K, B) log-probability of each transition (0 where the step is deterministic)
    stochastic:  (K,) bool, steps with a random action
    ref_means:   {k: (B, ...)} mu_pre at the steps where it was computed
    """

    grid: Tensor
    states: Tensor
    means: Tensor
    log_probs: Tensor
    stochastic: Tensor
    conditions: Tensor | None
    ref_means: dict[int, Tensor]

    @property
    def sample(self) -> Tensor:
        return self.states[-1]

    @property
    def num_steps(self) -> int:
        return self.grid.numel() - 1


def kl_increment(schedule: VPSchedule, s: float, s_next: float, mu: Tensor, mu_ref: Tensor) -> Tensor:
    """Theorem 3.1's integrand over one step: g^2(T - t)/2 ||mu_theta - mu_pre||^2 Delta, per path -> (B,)."""
    diff = (mu - mu_ref).flatten(1)
    return 0.5 * float(schedule.g2(s)) * (s - s_next) * diff.pow(2).sum(1)


def _sum_over_steps(traj: Trajectory, steps: list[int] | None, increment) -> Tensor:
    """sum_k increment(k) over ``steps`` (default: every step with a recorded mu_pre), per path -> (B,). With
    ``steps`` a uniform random subset of the steps, the sum is rescaled to an unbiased estimate of the whole sum."""
    steps = sorted(traj.ref_means) if steps is None else steps
    if not steps:
        raise ValueError("no reference means were recorded: sample with reference_steps")
    total = torch.zeros(traj.states.shape[1], dtype=torch.float64)
    for k in steps:
        total += increment(k)
    return total * (traj.num_steps / len(steps))


def running_kl(schedule: VPSchedule, traj: Trajectory, steps: list[int] | None = None) -> Tensor:
    """Theorem 3.1 / eq. 15-16: sum_k g^2(T - t_k)/2 ||mu_theta - mu_pre||^2 Delta_k, per path -> (B,).

    With ``steps`` a uniform random subset of the steps, the sum is rescaled to an unbiased estimate of the
    whole integral.
    """

    def increment(k: int) -> Tensor:
        s, s_next = float(traj.grid[k]), float(traj.grid[k + 1])
        return kl_increment(schedule, s, s_next, traj.means[k].double(), traj.ref_means[k].double())

    return _sum_over_steps(traj, steps, increment)


def exact_kl_increment(coef: StepCoefficients, mu: Tensor, mu_ref: Tensor) -> Tensor:
    """KL of one step's transition kernels, KL(N(A x + B mu, std^2 I) || N(A x + B mu_pre, std^2 I))
    = B^2 ||mu_theta - mu_pre||^2 / (2 std^2), per path -> (B,); 0 at a deterministic step.

    Summed along paths drawn from the tuned chain, this is the exact KL between the two *discrete* path
    measures (the chain rule of KL), at any grid. Theorem 3.1's g^2/2 ||dmu||^2 Delta is its continuous-time
    limit: for Euler-Maruyama (B = g^2 Delta, std^2 = g^2 Delta) the two are equal term by term; for DDPM steps
    they differ on coarse grids (docs/method.md, "KL")."""
    if not coef.stochastic:
        return torch.zeros(mu.shape[0], dtype=torch.float64)
    diff = (mu - mu_ref).flatten(1).to(torch.float64)
    return (coef.B / coef.std).pow(2) * 0.5 * diff.pow(2).sum(1)


def exact_path_kl(policy: GaussianScorePolicy, traj: Trajectory, steps: list[int] | None = None) -> Tensor:
    """Exact KL between the tuned and the pretrained discrete chains on ``traj``'s grid, per path -> (B,):
    sum_k of ``exact_kl_increment`` along the sampled (tuned) paths. With ``steps`` a uniform random subset of
    the steps, rescaled like ``running_kl``. A chain with no random step (DDIM, Heun, one DDPM step; the
    sampler records which steps were random) has no path density, so it has no finite path KL: that is a
    ValueError, not a number."""
    if not bool(traj.stochastic.any()):
        raise ValueError(
            f"the {policy.solver!r} chain (eta={policy.eta}) is deterministic: it has no path KL"
        )

    def increment(k: int) -> Tensor:
        coef = policy.coefficients(float(traj.grid[k]), float(traj.grid[k + 1]))
        return exact_kl_increment(coef, traj.means[k], traj.ref_means[k])

    return _sum_over_steps(traj, steps, increment)


@torch.no_grad()
def sample(
    policy: GaussianScorePolicy,
    x_init: Tensor,
    conditions: Tensor | None,
    grid: Tensor,
    generator: torch.Generator | None = None,
    reference_steps: list[int] | None = None,
    use_pretrained: bool = False,
    noise_rows: tuple[int, slice] | None = None,
) -> Trajectory:
    """Roll the policy out on ``grid`` from x_init (usually N(0, I) at s = 1).

    ``reference_steps``: step indices at which mu_pre is also computed (for the KL running reward).
    ``use_pretrained``: sample the base model (adapter off) with the same solver.
    ``noise_rows``: (global batch, rows): x_init holds these rows of a larger batch; the step noise is drawn
    for the whole batch and sliced, so a data-parallel rank follows the same paths as a one-process run.
    """
    grid = grid.to(torch.float64)
    K = grid.numel() - 1
    if K < 1:
        raise ValueError("the time grid needs at least two points (one step)")
    model = policy.model
    ctx = model.pretrained() if use_pretrained else contextlib.nullcontext()
    B = x_init.shape[0]
    states = torch.empty((K + 1, *x_init.shape), dtype=x_init.dtype)
    means = torch.empty((K, *x_init.shape), dtype=x_init.dtype)
    log_probs = torch.zeros(K, B, dtype=x_init.dtype)
    stochastic = torch.zeros(K, dtype=torch.bool)
    ref_means: dict[int, Tensor] = {}
    ref_set = set(reference_steps or [])
    x = x_init
    states[0] = x
    with ctx:
        for k in range(K):
            s, s_next = float(grid[k]), float(grid[k + 1])
            s_vec = torch.full((B,), s, dtype=torch.float64)
            mu = policy.mean(s_vec, x, conditions)
            means[k] = mu
            if k in ref_set:
                ref_means[k] = mu if use_pretrained else policy.reference_mean(s_vec, x, conditions)
            if policy.solver == "heun":
                x = _heun_step(policy, x, mu, s, s_next, conditions)
            else:
                coef = policy.coefficients(s, s_next)
                mean = policy.transition_mean(coef, x, mu)
                if coef.stochastic:
                    if noise_rows is None:
                        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                    else:
                        noise = torch.randn(
                            (noise_rows[0], *x.shape[1:]), generator=generator, dtype=x.dtype
                        )[noise_rows[1]]
                    x_next = mean + coef.std.to(x.dtype) * noise
                    log_probs[k] = policy.log_prob(coef, x, x_next, mu)
                    stochastic[k] = True
                else:
                    x_next = mean
                x = x_next
            states[k + 1] = x
    return Trajectory(grid, states, means, log_probs, stochastic, conditions, ref_means)


def _heun_step(policy: GaussianScorePolicy, x: Tensor, mu: Tensor, s: float, s_next: float, c) -> Tensor:
    """Heun (trapezoidal predictor-corrector) on the probability-flow ODE dx/ds = -beta/2 (x + score)."""
    sch = policy.schedule
    if s_next <= 0.0:  # the model is not evaluated at sigma = 0: finish with Tweedie's x_hat, as DDIM does
        return tweedie_x0(mu, x, sch.alpha(s), sch.sigma(s)).to(x.dtype)

    def velocity(si: float, xi: Tensor, mui: Tensor) -> Tensor:
        return (-0.5 * sch.beta(si) * 1.0).to(xi.dtype) * (xi + mui)

    h = s_next - s
    d1 = velocity(s, x, mu)
    x_euler = x + h * d1
    mu2 = policy.mean(torch.full((x.shape[0],), s_next, dtype=torch.float64), x_euler, c)
    d2 = velocity(s_next, x_euler, mu2)
    return x + h * 0.5 * (d1 + d2)


def x_hat(schedule: VPSchedule, s: Tensor, x: Tensor, mu: Tensor) -> Tensor:
    """Tweedie's denoised prediction from the score at forward time s (per-sample s, shape (B,))."""
    return tweedie_x0(mu, x, schedule.alpha(s), schedule.sigma(s)).to(x.dtype)
