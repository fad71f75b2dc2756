"""Reward-directed score-based diffusion by continuous-time q-learning, trained from data (arXiv 2409.04832).

The score is the action, as in CTRL, but no pretrained score is needed: the running reward is built from a
*ratio estimator* of the true score computed from m data samples. One module, top to bottom.

Notation (docs/method.md#notation; forward time s in [0, 1] as in all of ctrl_core, RL time t = T - s, T = 1)
-------------------------------------------------------------------------------------------------------------
- dynamics (CTRL eq. 10):  dY = [-f(T-t, Y) + g^2(T-t) a] dt + g(T-t) dW,  Y_0 ~ N(0, I),
- objective:  J(t, y; pi) = E[ int_t^T (r(u, Y_u, a_u) - theta log pi(a_u | u, Y_u)) du + beta h(Y_T) ],
- running reward  r(t, y, a) = -g^2(T-t)/2 ||grad log p_{T-t}(y) - a||^2: by Girsanov, its integral is minus
  the KL between the controlled path and the true backward path (the engine's Theorem 3.1 rate),
- beta convention (the paper's; its config key is ``qlearning.reward_weight``): beta >= 0 *weights the reward*
  h. beta = 0: the optimum is the true score, so the samples reproduce the data; beta > 0: the optimum tilts
  the data, p*(x) ∝ p_data(x) exp(beta h(x)) (for the SDE sampler with a start nearly independent of the sample). CTRL's beta is the inverse: a KL weight.

Prop. 1 (optimal policy). The exploratory Hamiltonian is quadratic in a, so the Gibbs policy
pi* ∝ exp(H(t, y, a, dJ*) / theta) is Gaussian:  N(mu*(t, y), Sigma_t I),  mu* = grad log p + grad_y J*,
Sigma_t = theta / g^2(T-t). (The exploration variance is fixed by theta and by the weight g^2/2 of the running
reward; the formula "theta2g2(T-t)" in a summary of arXiv 2409.04832 is garbled, see
docs/method.md#deliberate-deviations-of-this-code. With g^2/2 as the weight, which
makes beta = 0 exact data reproduction and beta a plain exponential tilt, it is theta / g^2.)

q-function (Jia & Zhou's q-learning). With a Gaussian policy of known covariance the parametrised q-function
    q_psi(t, y, a) = theta log pi_psi(a | t, y) = -g^2/2 ||a - mu_psi(t, y)||^2 + (t-only constant)
meets the consistency condition int exp(q / theta) da = 1 and has the exact a-dependence of the true q.

Martingale orthogonality (paper eq. 34). (J_Theta, q_psi) = (J^pi, q^pi) iff
M_t = J(t, Y_t) + int_0^t (r - q) du is a martingale; we solve the conditions
    E int xi_t dM_t = 0  (critic, xi = dJ_Theta/dTheta),    E int zeta_t dM_t = 0  (actor, zeta = w_t dq_psi/dpsi)
on the discretised increments  delta_k = J(t_{k+1}, Y_{k+1}) - J(t_k, Y_k) + (r_hat - q_psi)(t_k, Y_k, a_k) Delta_k,
with r_hat the running reward at the ratio estimate of the score and J(T, .) = beta h exactly.

Two variance reductions that keep the same conditions (documented deviations from the plain algorithm):
- ``baseline = "counterfactual"``: the actor's delta is replaced by delta - delta|_{a = mu}, its value for the
  mean action with the *same* Brownian increment. Given Y_k that value does not depend on a_k, so it is
  orthogonal to zeta (E[(a - mu) b] = 0): the condition is unchanged, but the Brownian noise of J(Y_{k+1})
  cancels. Expected actor step: theta g^2 Delta (s_hat + grad J - mu) dmu/dpsi, i.e. mu regresses on
  s_hat + grad J = the ratio-estimated score plus the critic's reward guidance. ``"none"``: the paper's plain delta.
- ``test_weight = "eps"``: zeta carries the positive adapted weight w_t = sigma_s^2 / (theta g^2 Delta), which
  makes every time step count like an epsilon-prediction error (any positive weight is a valid test function);
  ``"uniform"`` is the paper's w = 1 (it emphasises the data end, where g^2 / sigma^2 ~ 1 / s).
- ``delta_clip``: the actor's delta is clipped at +-5 of its per-step std (the ratio estimate has heavy tails
  at states far from the data, which early rollouts visit; without it the first iterations diverge).

What the critic carries (``value_terms``), a measured deviation:
- ``"full"`` (the paper): J_Theta is the value of the whole objective, beta h plus the running reward
  r_hat - q, i.e. minus the policy's remaining (ratio-estimated) KL. From scratch on the 1-D mixture this was
  unstable on 2 CPU cores: grad_y J of the remaining KL of an imperfect policy pushes mass to the mode the
  actor already fits (reverse-KL mode seeking), and with TD(0) samples collapsed onto one mode (KS p < 1e-50);
  with Monte-Carlo targets and a warm-up the two-sample p-value stayed at 0.004 (tests/bench: 0.64).
- ``"reward"`` (default): J_Theta carries beta h only (the reward-to-go); the running reward still enters the
  actor's delta~ exactly through r_hat - q at every step. At beta = 0 both agree at the optimum (grad_y J* = 0,
  so the critic is not needed and is not trained); for beta > 0 the fixed point mu = s + grad_y beta E[h | Y_t]
  agrees with the optimum s + grad_y log E[exp(beta h) | Y_t] to first order in beta and undershoots the exact
  tilt for large beta (bench/results/qlearning_gmm1d.json compares the masses with the closed form).

How the critic is parametrised (``critic``), measured on two kinds of reward:
- ``"linked"``: CTRL's value network (eq. 19), J = c_skip(s) beta h(x_hat) + c_out(s) F_Theta, with x_hat the
  Tweedie prediction of the model's frozen reference (``LinkedCritic``). The actor's counterfactual delta is a
  finite difference of J across one step, so a critic that starts flat gives the actor no reward signal; the
  linked one carries h's variation from the first iteration. Digits with the JPEG reward (m = 1, beta = 10, 40
  iterations): DDIM gains +0.10 +- 0.03 where the free critic gains nothing (bench/results/qlearning_digits.json).
- ``"free"``: a residual net alone. Better for indicator rewards: h(x_hat) is flat almost everywhere, the
  finite differences vanish, and the smooth free critic learns the slope (gmm1d reward-region masses at
  beta = 1/2/4: free 0.63/0.75/0.88, linked 0.53/0.63/0.68).

SDE and ODE: training rolls out with a stochastic solver (``ddpm`` / ``euler_maruyama``, the SDE of eq. 10) or
with ``ddim`` (the probability-flow ODE, deterministic given the actions: paper §9). Sampling uses the mean
action with any engine solver: ``sde`` (DDPM), ``ode`` (DDIM = exponential integrator of the probability-flow
ODE) or ``heun``, through ``GaussianScorePolicy`` so that the pipeline's evaluation runs unchanged.

Start from scratch (``QLearningScoreModel`` over an epsilon-net, with the data's own ratio score as the
"pretrained" reference for evaluation) or from a pretrained model (any ``ScoreModel`` with trainable
parameters, e.g. the LoRA'd digits UNet, or ``QLearningScoreModel.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import CRITICS, QLearningConfig
from .distributed import Dist
from .models import ScoreModel, sinusoidal_time_features
from .policy import GaussianScorePolicy, canonical_solver, sample, step_coefficients
from .schedule import DiscreteVPSchedule, LinearVPSchedule, VPSchedule, score_from_model_output
from .trainer_base import TrainerBase

RewardFn = Callable[[Tensor, Tensor | None], Tensor]


# --- 1. the ratio estimator of the score (paper §5) ------------------------------------------------------------
def ratio_score(
    schedule: VPSchedule,
    s: Tensor | float,
    y: Tensor,
    data: Tensor,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    conditions: Tensor | None = None,
    data_labels: Tensor | None = None,
    idx: Tensor | None = None,
) -> Tensor:
    """Self-normalised estimate of grad log p_s(y) from data samples x_i (paper §5):

        grad log p_s(y) ≈ sum_i w_i (alpha_s x_i - y) / sigma_s^2,   w = softmax_i(-||y - alpha_s x_i||^2 / (2 sigma_s^2))

    i.e. E[grad log phi_s(y | X_0) phi_s(y | X_0)] / E[phi_s(y | X_0)] with the expectations over the data.

    s: scalar or (B,) forward times; y: (B, ...) states; data: (N, ...) samples. ``num_samples`` m: each row uses
    m samples drawn with replacement (None: all N, then the estimate is the exact score of the noised empirical
    distribution). With ``conditions`` (B,) and ``data_labels`` (N,), row b only uses samples of its class
    (the conditional score). ``idx`` (B, m): the sample indices, drawn beforehand by :func:`ratio_sample_index`
    (data-parallel ranks draw them for the global batch and keep their rows). Log-sum-exp stable; returns (B, ...)
    in y's dtype.
    """
    B = y.shape[0]
    s_vec = s.to(torch.float64) if isinstance(s, Tensor) else torch.full((B,), float(s), dtype=torch.float64)
    s_vec = s_vec.expand(B) if s_vec.ndim == 0 else s_vec
    alpha = schedule.alpha(s_vec).to(torch.float64)[:, None]  # (B, 1)
    var = (schedule.sigma(s_vec).to(torch.float64) ** 2)[:, None]
    yf = y.flatten(1).to(torch.float64)  # (B, D)
    xf = data.flatten(1).to(torch.float64)  # (N, D)
    if (conditions is None) != (data_labels is None):
        raise ValueError(
            "ratio_score: conditions and data_labels go together (conditional score) or not at all"
        )
    if num_samples is None:
        # logits_i = (alpha y.x_i - alpha^2 ||x_i||^2 / 2) / sigma^2 (the ||y||^2 term cancels in the softmax)
        logits = (alpha * (yf @ xf.T) - 0.5 * alpha**2 * xf.pow(2).sum(1)[None, :]) / var  # (B, N)
        if conditions is not None:
            same = conditions.view(-1, 1).to(data_labels.device) == data_labels.view(1, -1)
            if not torch.all(same.any(1)):
                raise ValueError("ratio_score: a condition has no data samples")
            logits = logits.masked_fill(~same, -math.inf)
        w = torch.softmax(logits, dim=1)
        x_bar = w @ xf  # (B, D): posterior mean of X_0 under the empirical prior
    else:
        if idx is None:
            idx = ratio_sample_index(xf.shape[0], B, num_samples, generator, conditions, data_labels)
        if idx.shape != (B, num_samples):
            raise ValueError(f"ratio_score: idx has shape {tuple(idx.shape)}, expected {(B, num_samples)}")
        xs = xf[idx]  # (B, m, D)
        logits = (alpha * torch.einsum("bd,bmd->bm", yf, xs) - 0.5 * alpha**2 * xs.pow(2).sum(2)) / var
        w = torch.softmax(logits, dim=1)
        x_bar = torch.einsum("bm,bmd->bd", w, xs)
    score = (alpha * x_bar - yf) / var
    return score.reshape(y.shape).to(y.dtype)


def ratio_sample_index(
    num_data: int,
    B: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    conditions: Tensor | None = None,
    data_labels: Tensor | None = None,
) -> Tensor:
    """(B, m) indices of the data samples each row's ratio estimate uses, drawn with replacement (with
    ``conditions``: among the samples of the row's class)."""
    if num_samples < 1:
        raise ValueError(f"ratio_score: num_samples must be >= 1, got {num_samples}")
    if conditions is None:
        return torch.randint(0, num_data, (B, num_samples), generator=generator)
    same = (conditions.view(-1, 1).to(data_labels.device) == data_labels.view(1, -1)).to(torch.float64)
    if not torch.all(same.sum(1) > 0):
        raise ValueError("ratio_score: a condition has no data samples")
    return torch.multinomial(same, num_samples, replacement=True, generator=generator)


class RatioScoreModel(ScoreModel):
    """The data's own score by the ratio estimator over all samples: the score of the noised empirical measure.

    No trainable parameters. It is the "pretrained" reference of a q-learning model trained from scratch, so
    that the engine's evaluation (base vs tuned) compares the learned model with the data distribution.
    """

    def __init__(self, schedule: VPSchedule, data: Tensor, data_labels: Tensor | None = None):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("data", data.detach().float().clone())
        self.register_buffer(
            "data_labels", None if data_labels is None else data_labels.detach().long().clone()
        )

    def score(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        labels = self.data_labels if c is not None else None
        return ratio_score(
            self.schedule, s, x, self.data, None, None, c if labels is not None else None, labels
        )

    def pretrained(self):
        return contextlib.nullcontext()


# --- 2. the policy mean mu_psi (an epsilon-net) and the critic J_Theta -----------------------------------------
class EpsMLP(nn.Module):
    """epsilon(s, x) for vector data: an MLP of (Fourier time features, x)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_features: int = 16):
        super().__init__()
        self.spec = {
            "kind": "mlp",
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "time_features": time_features,
        }
        layers: list[nn.Module] = [nn.Linear(dim + time_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)
        self.time_features = time_features

    def forward(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = torch.cat([x.flatten(1).float(), sinusoidal_time_features(s, self.time_features)], dim=1)
        return self.net(h).reshape(x.shape).to(x.dtype)


class EpsConvNet(nn.Module):
    """epsilon(s, x, c) for small images: a 3-layer residual CNN with time (and class) conditioning."""

    def __init__(self, channels: int = 1, width: int = 32, num_classes: int = 0, time_features: int = 16):
        super().__init__()
        self.spec = {"kind": "conv", "channels": channels, "width": width, "num_classes": num_classes,
                     "time_features": time_features}  # fmt: skip
        self.time_features = time_features
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(time_features, width)
        self.cls = nn.Embedding(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(3)])
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        e = self.emb(sinusoidal_time_features(s, self.time_features))
        if self.cls is not None and c is not None:
            e = e + self.cls(c.long())
        h = self.inp(x.float()) + e[:, :, None, None]
        for conv in self.blocks:
            h = h + conv(nn.functional.silu(h))
        return self.out(nn.functional.silu(h)).to(x.dtype)


NETS = {"mlp": EpsMLP, "conv": EpsConvNet}


class QLearningScoreModel(ScoreModel):
    """mu_psi(s, y, c) = -eps_psi(s, y, c) / sigma_s (eq. 31), with an optional frozen reference score for
    ``pretrained()`` (the model it was initialised from, or the data's ``RatioScoreModel``)."""

    def __init__(self, net: nn.Module, schedule: VPSchedule, reference: ScoreModel | None = None):
        super().__init__()
        self.net, self.schedule = net, schedule
        self.reference = reference
        if reference is not None:
            for p in reference.parameters():
                p.requires_grad_(False)
        self._use_reference = False

    @classmethod
    def from_pretrained(cls, pretrained: QLearningScoreModel) -> QLearningScoreModel:
        """Start from a pretrained model: a trainable copy of its network, the original frozen as reference."""
        ref = copy.deepcopy(pretrained)
        ref.reference = None
        return cls(copy.deepcopy(pretrained.net), pretrained.schedule, reference=ref)

    def score(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        if self._use_reference:
            return self.reference.score(s, x, c)
        out = self.net(s, x, c)
        return score_from_model_output(out, x, self.schedule.alpha(s), self.schedule.sigma(s), "epsilon")

    @contextlib.contextmanager
    def pretrained(self) -> Iterator[None]:
        if self.reference is None:
            raise ValueError(
                "this q-learning model has no reference score (pass reference=RatioScoreModel(...))"
            )
        prev, self._use_reference = self._use_reference, True
        try:
            yield
        finally:
            self._use_reference = prev

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    # safetensors only (io.py): model.safetensors (+ the schedule's alphas_cumprod) and qlearning_config.json
    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        from .io import atomic_save_weights, atomic_write_json

        d = Path(directory)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if isinstance(self.schedule, DiscreteVPSchedule):
            sched = {"kind": "discrete"}
            tensors["schedule.alphas_cumprod"] = self.schedule.alphas_cumprod.clone()
        elif isinstance(self.schedule, LinearVPSchedule):
            sched = {"kind": "linear", "beta_min": self.schedule.beta_min, "beta_max": self.schedule.beta_max,
                     "num_train_timesteps": self.schedule.num_train_timesteps}  # fmt: skip
        else:
            raise TypeError(f"cannot save schedule {type(self.schedule).__name__}")
        atomic_save_weights(tensors, d / "model.safetensors")
        atomic_write_json(
            {"format": "qlearning-score-model/1", "net": self.net.spec, "schedule": sched, **(extra or {})},
            d / "qlearning_config.json",
        )

    @classmethod
    def load(cls, directory: str | Path, reference: ScoreModel | None = None) -> QLearningScoreModel:
        from .io import load_weights

        d = Path(directory)
        cfg = json.loads((d / "qlearning_config.json").read_text())
        tensors = load_weights(d / "model.safetensors")
        spec = dict(cfg["net"])
        net = NETS[spec.pop("kind")](**spec)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        sc = cfg["schedule"]
        if sc["kind"] == "discrete":
            schedule: VPSchedule = DiscreteVPSchedule(tensors["schedule.alphas_cumprod"])
        else:
            schedule = LinearVPSchedule(sc["beta_min"], sc["beta_max"], sc["num_train_timesteps"])
        return cls(net.eval(), schedule, reference)


class Critic(nn.Module):
    """J_Theta(s, y, c): a residual net from value.py (MLPResidual for vectors, ConvResidual for images)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, s: Tensor, y: Tensor, c: Tensor | None = None, terms: None = None) -> Tensor:
        return self.net(s, y, c).float()  # terms: a linked critic's precomputed reward terms (none here)


class LinkedCritic(nn.Module):
    """J_Theta(s, y, c) = c_skip(s) beta h(x_hat(s, y, c)) + c_out(s) F_Theta(s, y, c): CTRL's value network
    (eq. 19, value.ValueFunction) as the q-learning critic, with x_hat Tweedie's prediction under the model's
    frozen reference score (the pretrained model, or the data's exact ratio score for a model from scratch).

    The critic is still trained by the martingale conditions; only its parametrisation changes. The reward term
    carries the direction in which h changes with y from the start, which a free network must learn from a few
    thousand noisy returns: the actor's counterfactual delta J(Y_{k+1}) - J(Y'_{k+1}) is a finite difference of
    J, so a flat early critic gives the actor no reward signal. h need not be differentiable (J is only
    evaluated). ``reward_terms`` computes beta h(x_hat) once per state; ``forward`` accepts it precomputed.
    """

    def __init__(self, residual: nn.Module, reward_fn: RewardFn, beta: float, reference_score: Callable,
                 schedule: VPSchedule, link: str = "cos_sin"):  # fmt: skip
        super().__init__()
        from .value import ValueFunction

        self.beta, self.schedule = float(beta), schedule
        self.value = ValueFunction(lambda x, c: self.beta * reward_fn(x, c).float(), residual, link)
        self._reference_score = reference_score  # a plain callable: the actor's weights are not the critic's

    @torch.no_grad()
    def x_hat(self, s: Tensor, y: Tensor, c: Tensor | None) -> Tensor:
        from .policy import x_hat

        s64 = s.to(torch.float64)
        return x_hat(self.schedule, s64, y, self._reference_score(s64, y, c).to(y.dtype))

    @torch.no_grad()
    def reward_terms(self, s: Tensor, y: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        xh = self.x_hat(s, y, c)
        return xh, self.value.reward_fn(xh, c).float()

    def forward(
        self, s: Tensor, y: Tensor, c: Tensor | None = None, terms: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        xh, rm = terms if terms is not None else self.reward_terms(s, y, c)
        return self.value(s.float(), y, c, xh, rm)


def make_critic(
    x_shape: tuple[int, ...],
    num_classes: int = 0,
    kind: str = "free",
    model: ScoreModel | None = None,
    reward_fn: RewardFn | None = None,
    beta: float = 0.0,
    link: str = "cos_sin",
) -> nn.Module:
    """The critic J_Theta: ``free`` a residual net alone; ``linked`` (``LinkedCritic``) CTRL's value network with
    the reward at the reference model's Tweedie prediction (needs model, reward_fn and beta > 0)."""
    from .value import ConvResidual, MLPResidual

    if kind not in CRITICS:
        raise ValueError(f"unknown critic {kind!r}: choose one of {CRITICS}")
    residual = (
        MLPResidual(x_shape[0])
        if len(x_shape) == 1
        else ConvResidual(channels=x_shape[0], width=32, num_classes=num_classes)
    )
    if kind == "free" or beta == 0:
        return Critic(residual)
    if model is None or reward_fn is None:
        raise ValueError("a linked critic needs the model (its reference score gives x_hat) and the reward")

    def reference_score(s: Tensor, y: Tensor, c: Tensor | None) -> Tensor:
        with model.pretrained():
            return model.score(s, y, c)

    return LinkedCritic(residual, reward_fn, beta, reference_score, model.schedule, link)


def _rows(terms: tuple[Tensor, Tensor] | None, idx) -> tuple[Tensor, Tensor] | None:
    """The rows ``idx`` of a linked critic's (x_hat, beta h(x_hat)), or None (a free critic)."""
    return None if terms is None else (terms[0][idx], terms[1][idx])


# --- 3. configuration -------------------------------------------------------------------------------------------
# The trainer's settings, QLearningConfig, are the qlearning block of params.yaml (less where the actor and the
# data come from), declared with the other blocks in ctrl_core/config.py.


# --- 4. the trainer --------------------------------------------------------------------------------------------
@dataclass
class QRollout:
    """One batch of exploratory paths. K steps; tensors indexed [k, b, ...]."""

    grid: Tensor  # (K+1,) forward times
    states: Tensor  # (K+1, B, ...) Y at the grid times
    actions: Tensor  # (K, B, ...) a_k ~ N(mu_k, Sigma_k)
    means: Tensor  # (K, B, ...) mu_psi at the rollout
    counterfactual: Tensor  # (K, B, ...) Y'_{k+1}: the step with a = mu and the same Brownian increment
    score_hat: Tensor  # (K, B, ...) ratio estimate of the score at (s_k, Y_k)
    conditions: Tensor | None


@dataclass
class QStats:
    iteration: int
    reward_mean: float  # h(Y_T) of the exploratory rollout
    objective: float  # beta h + int (r_hat - q) dt, per path, mean (the critic's target at s = 1)
    running: float  # int r_hat - q dt: minus the (ratio-estimated) path KL, up to a t-only constant
    score_error: float  # mean sigma^2 ||mu - s_hat||^2 / d: epsilon-space distance to the ratio estimate
    td_error: float  # mean |delta_k|
    critic_loss: float
    actor_loss: float
    sample_s: float
    critic_s: float
    actor_s: float
    extra: dict = field(default_factory=dict)


class QLearningTrainer(TrainerBase):
    """Continuous-time q-learning of mu_psi (the score) and J_Theta from data.

    model:   the actor, any ``ScoreModel`` with trainable parameters (its ``score`` is mu_psi).
    data:    (m, ...) data samples for the ratio estimator; ``data_labels`` (m,) for class-conditional models.
    reward_fn: h(x, c) -> (B,); may be None when beta = 0.
    dist:    data parallelism (``distributed.Dist``), as the CTRL trainer's: every rank draws the random numbers of
             the global batch (initial states, conditions, actions, noise, ratio-estimator samples, permutations)
             and computes its own paths; the critic's and the actor's gradients are summed over ranks before
             clipping and each step, and the statistics the updates use (the actor's delta clip) and log are
             taken over the global batch. W processes then run the one-process run, up to summation order.
    """

    params_key = "actor"
    stats_type = QStats

    def __init__(
        self,
        model: ScoreModel,
        data: Tensor,
        reward_fn: RewardFn | None,
        config: QLearningConfig,
        x_shape: tuple[int, ...] | None = None,
        critic: nn.Module | None = None,
        condition_sampler: Callable[[int, torch.Generator], Tensor | None] = lambda n, g: None,
        data_labels: Tensor | None = None,
        dist: Dist | None = None,
    ):
        if config.reward_weight > 0 and reward_fn is None:
            raise ValueError("qlearning.reward_weight > 0 needs a reward function")
        super().__init__(config, dist, "qlearning")
        self.rows = self.dist.shard(config.batch_size)  # this rank's paths of the global batch
        self.model, self.schedule = model, model.schedule
        self.data = data.detach().float()
        self.data_labels = None if data_labels is None else data_labels.detach().long()
        self.reward_fn = reward_fn
        self.x_shape = tuple(x_shape) if x_shape is not None else tuple(self.data.shape[1:])
        if self.x_shape != tuple(self.data.shape[1:]):
            raise ValueError(
                f"data samples have shape {tuple(self.data.shape[1:])}, the model's x_shape is {self.x_shape}"
            )
        self.critic = critic if critic is not None else make_critic(self.x_shape, kind=config.critic, model=model,
                                                                    reward_fn=reward_fn, beta=config.reward_weight)  # fmt: skip
        self.condition_sampler = condition_sampler
        self.params = model.trainable_parameters()
        if not self.params:
            raise ValueError("the actor has no trainable parameters")
        self.opt = torch.optim.Adam(self.params, lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.solver = canonical_solver(config.rollout_solver)
        self.d = int(torch.tensor(self.x_shape).prod())

    # -- helpers ----------------------------------------------------------------------------------------------
    def grid(self) -> Tensor:
        cfg, sch = self.cfg, self.schedule
        s_end = max(cfg.s_min, sch.min_model_time_s)
        if cfg.time_sampling == "random":
            return sch.random_time_grid(cfg.train_steps, self.generator, s_end=s_end)
        return sch.time_grid(cfg.train_steps, s_end=s_end)

    def score_hat(self, s: Tensor, y: Tensor, c: Tensor | None, c_global: Tensor | None) -> Tensor:
        """The ratio estimate at this rank's rows ``y`` of the global batch (``c`` their conditions, ``c_global``
        the batch's): the data samples are drawn for the global batch and sliced, as one process draws them."""
        m = self.cfg.ratio_samples or None
        labels = self.data_labels if c is not None else None
        idx = None
        if m is not None:
            idx = ratio_sample_index(len(self.data), self.cfg.batch_size, m, self.generator,
                                     c_global if labels is not None else None, labels)[self.rows]  # fmt: skip
        return ratio_score(
            self.schedule, s, y, self.data, m, None, c if labels is not None else None, labels, idx=idx
        )

    def terminal(self, y: Tensor, c: Tensor | None) -> Tensor:
        """J(T, y) = beta h(y), the boundary condition."""
        if self.cfg.reward_weight == 0:
            return torch.zeros(y.shape[0])
        return self.cfg.reward_weight * self.reward_fn(y, c).float()

    def reward(self, y: Tensor, c: Tensor | None) -> Tensor:
        return torch.zeros(y.shape[0]) if self.reward_fn is None else self.reward_fn(y, c).float()

    def running(self, g2: float, score_hat: Tensor, a: Tensor, mu: Tensor) -> Tensor:
        """(r_hat - q_psi)(t, y, a) per path, without q's t-only constant (it shifts J by a function of t and
        changes no delta difference): -g^2/2 ||s_hat - a||^2 + g^2/2 ||a - mu||^2 -> (B,), float64."""
        sh, a, mu = score_hat.flatten(1).double(), a.flatten(1).double(), mu.flatten(1).double()
        return 0.5 * g2 * ((a - mu).pow(2).sum(1) - (sh - a).pow(2).sum(1))

    # -- rollout ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> QRollout:
        cfg, sch, gen, rows = self.cfg, self.schedule, self.generator, self.rows
        grid = self.grid()
        K, B_all = cfg.train_steps, cfg.batch_size
        draw = lambda: torch.randn((B_all, *self.x_shape), generator=gen)[rows]  # noqa: E731  (global draws)
        c_all = self.condition_sampler(B_all, gen)
        c = None if c_all is None else c_all[rows]
        y = draw()
        B = y.shape[0]  # this rank's paths
        states = torch.empty((K + 1, B, *self.x_shape))
        actions, means, cf, sh = (torch.empty((K, B, *self.x_shape)) for _ in range(4))
        states[0] = y
        for k in range(K):
            s, s_next = float(grid[k]), float(grid[k + 1])
            s_vec = torch.full((B,), s, dtype=torch.float64)
            mu = self.model.score(s_vec, y, c).float()
            var = cfg.theta / float(sch.g2(s))  # Prop. 1: Sigma_t = theta / g^2(T - t)
            a = mu + math.sqrt(var) * draw()
            coef = step_coefficients(sch, self.solver, s, s_next)
            noise = coef.std.float() * draw() if coef.std > 0 else 0.0
            base = coef.A.float() * y + noise
            y_next = base + coef.B.float() * a
            actions[k], means[k] = a, mu
            cf[k] = base + coef.B.float() * mu
            sh[k] = self.score_hat(s_vec, y, c, c_all)
            states[k + 1] = y = y_next
        return QRollout(grid, states, actions, means, cf, sh, c)

    # -- martingale increments ----------------------------------------------------------------------------------
    @torch.no_grad()
    def increments(self, ro: QRollout) -> dict[str, Tensor]:
        """delta_k (critic), delta~_k (actor, with the baseline), r_hat - q, and the critic's TD/MC targets."""
        cfg, sch, K = self.cfg, self.schedule, self.cfg.train_steps
        grid, c = ro.grid, ro.conditions
        B = ro.states.shape[1]
        J = torch.empty(K + 1, B)
        # one batched critic call for the states at t_0..t_{K-1} and the counterfactual states at t_1..t_{K-1}
        s_all = torch.cat([grid[:K].repeat_interleave(B), grid[1:K].repeat_interleave(B)])
        y_all = torch.cat(
            [
                ro.states[:K].reshape(K * B, *self.x_shape),
                ro.counterfactual[: K - 1].reshape((K - 1) * B, *self.x_shape),
            ]
        )
        c_all = None if c is None else c.repeat(2 * K - 1)
        terms = self._reward_terms(s_all, y_all, c_all)  # a linked critic's beta h(x_hat): once per state
        chunks = [slice(j, j + 4096) for j in range(0, len(s_all), 4096)]
        v = torch.cat([self.critic(s_all[i], y_all[i], None if c is None else c_all[i], terms=_rows(terms, i))
                       for i in chunks])  # fmt: skip
        J[:K] = v[: K * B].view(K, B)
        J_cf = torch.empty(K, B)  # J(t_{k+1}, Y'_{k+1})
        J_cf[: K - 1] = v[K * B :].view(K - 1, B)
        h = self.reward(
            ro.states[K], c
        )  # the samples' reward: J(T, .) = beta h, and the iteration's statistic
        J[K] = cfg.reward_weight * h if cfg.reward_weight != 0 else torch.zeros(B)
        J_cf[K - 1] = self.terminal(ro.counterfactual[K - 1], c)
        rq = torch.empty(K, B, dtype=torch.float64)
        rq_mean = torch.empty(K, B, dtype=torch.float64)
        dt = (grid[:-1] - grid[1:]).double()
        for k in range(K):
            g2 = float(sch.g2(float(grid[k])))
            rq[k] = self.running(g2, ro.score_hat[k], ro.actions[k], ro.means[k]) * dt[k]
            rq_mean[k] = self.running(g2, ro.score_hat[k], ro.means[k], ro.means[k]) * dt[k]
        # value_terms = "reward": the critic carries only beta h (the running reward enters delta~ directly)
        rq_critic = rq if cfg.value_terms == "full" else torch.zeros_like(rq)
        delta = (J[1:] - J[:-1]).double() + rq_critic
        if (
            self.iteration < cfg.critic_warmup
        ):  # beta = 0's exact solution has grad_y J* = 0: no critic needed
            delta_actor = rq - rq_mean
        elif cfg.baseline == "counterfactual":
            delta_actor = (J[1:] - J_cf).double() + rq - rq_mean
        else:
            delta_actor = delta
        td_target = J[1:].double() + rq_critic
        mc_target = J[K].double()[None] + torch.flip(torch.cumsum(torch.flip(rq_critic, [0]), 0), [0])
        full_return = J[K].double() + rq.sum(0)
        return {"delta": delta, "delta_actor": delta_actor, "rq": rq, "J": J,
                "target": td_target if cfg.critic_target == "td" else mc_target, "return": full_return, "reward": h,
                # the critic update's states are the first K * B here (step-major, as _flat orders them)
                "terms": _rows(terms, slice(0, K * B))}  # fmt: skip

    @torch.no_grad()
    def _reward_terms(self, s: Tensor, y: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(x_hat, beta h(x_hat)) of a linked critic at these states (None for a free critic), in chunks."""
        if not hasattr(self.critic, "reward_terms"):
            return None
        parts = [self.critic.reward_terms(s[j : j + 4096], y[j : j + 4096], None if c is None else c[j : j + 4096])
                 for j in range(0, len(s), 4096)]  # fmt: skip
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # -- critic: E int dJ/dTheta dM = 0 ----------------------------------------------------------------------
    def _flat(self, ro: QRollout, steps: list[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(s, y, c) of the (step, path) pairs of ``steps``, flattened step-major -> (len(steps) * B, ...)."""
        B = ro.states.shape[1]
        s = ro.grid[steps].repeat_interleave(B)
        y = ro.states[steps].reshape(len(steps) * B, *self.x_shape)
        c = None if ro.conditions is None else ro.conditions.repeat(len(steps))
        return s, y, c

    def _my_pairs(self, idx: Tensor) -> Tensor:
        """This rank's pairs among ``idx``, indices of (step, path) pairs of the global batch (step-major), as
        indices into its own step-major rows (in one process: ``idx`` itself)."""
        B_all, r = self.cfg.batch_size, self.rows
        k, b = idx // B_all, idx % B_all
        mine = (b >= r.start) & (b < r.stop)
        return k[mine] * (r.stop - r.start) + (b[mine] - r.start)

    def _minibatch_updates(
        self,
        n: int,
        epochs: int,
        opt: torch.optim.Optimizer,
        params: list,
        loss_sum: Callable[[Tensor], Tensor],
        finite: str = "",
    ) -> float:
        """``epochs`` passes over minibatches (``minibatch_size``, 0: all) of the global batch's ``n`` (step,
        path) pairs: each rank sums ``loss_sum`` over its own pairs (indices into its rows), divided by the global
        minibatch size; gradients are summed over ranks, checked finite (raising ``finite`` when given), clipped,
        stepped. Returns the mean minibatch loss."""
        mb, losses = self.cfg.minibatch_size or n, []
        for _ in range(epochs):
            perm = torch.randperm(n, generator=self.generator)
            for j in range(0, n, mb):
                idx = perm[j : j + mb]
                i = self._my_pairs(idx)
                opt.zero_grad(set_to_none=True)
                part = 0.0
                if len(i):
                    loss = loss_sum(i) / len(idx)
                    loss.backward()
                    part = float(loss.detach())
                self.clipped_step(opt, params, nonfinite=finite)
                losses.append(part)
        return self.dist.sum(sum(losses)) / len(losses)  # (each rank's parts: one reduction)

    def critic_update(
        self, ro: QRollout, target: Tensor, terms: tuple[Tensor, Tensor] | None = None
    ) -> float:
        """``terms``: a linked critic's (x_hat, beta h(x_hat)) at these states, as ``increments`` computed them
        (computed here when not given). Minibatches are drawn over the global batch's (step, path) pairs; each
        rank backpropagates its own and the gradients are summed over ranks."""
        cfg, K = self.cfg, self.cfg.train_steps
        s, y, c = self._flat(ro, list(range(K)))
        tgt = target.reshape(-1).float()
        n = K * cfg.batch_size
        if terms is None:
            terms = self._reward_terms(s, y, c)

        def loss_sum(i: Tensor) -> Tensor:
            # semi-gradient: the gradient of 1/2 (J - sg(target))^2 is -dJ/dTheta * delta (test function xi)
            J = self.critic(s[i], y[i], None if c is None else c[i], terms=_rows(terms, i))
            return 0.5 * (J - tgt[i]).pow(2).sum()

        return self._minibatch_updates(
            n, cfg.critic_epochs, self.critic_opt, list(self.critic.parameters()), loss_sum
        )

    # -- actor: E int zeta dM = 0, zeta = w dq_psi/dpsi --------------------------------------------------------
    def actor_update(self, ro: QRollout, delta_actor: Tensor) -> float:
        cfg, sch, K, B = self.cfg, self.schedule, self.cfg.train_steps, ro.states.shape[1]
        steps = list(range(K))
        if cfg.train_timesteps and cfg.train_timesteps < K:
            pick = torch.randperm(K, generator=self.generator)[: cfg.train_timesteps]
            steps = sorted(int(i) for i in pick)
        s, y, c = self._flat(ro, steps)
        a = ro.actions[steps].reshape(len(steps) * B, *self.x_shape)
        delta = delta_actor[steps].float()
        if cfg.delta_clip > 0:  # robustness against the heavy tails of the ratio estimate far from the data
            every = self.dist.gather_rows(delta.T.contiguous()).T.contiguous()  # (steps, global paths)
            lim = cfg.delta_clip * every.std(dim=1, keepdim=True)
            delta = torch.maximum(torch.minimum(delta, lim), -lim)
        delta = delta.reshape(-1)
        s_k, dt = ro.grid[steps], (ro.grid[steps] - ro.grid[[k + 1 for k in steps]])
        g2 = sch.g2(s_k).float()
        w = (
            (sch.sigma(s_k) ** 2 / (cfg.theta * sch.g2(s_k) * dt)).float()
            if cfg.test_weight == "eps"
            else torch.ones(len(steps))
        )
        g2, w = g2.repeat_interleave(B), w.repeat_interleave(B)
        n = len(steps) * cfg.batch_size

        def loss_sum(i: Tensor) -> Tensor:
            mu = self.model.score(s[i], y[i], None if c is None else c[i])
            q = -0.5 * g2[i] * (a[i] - mu).flatten(1).pow(2).sum(1)  # q_psi = theta log pi_psi + t-only const
            # ascent on sum_k zeta_k delta_k: minimise -w q_psi sg(delta) (gradient: -w dq/dpsi delta)
            return -(w[i] * q * delta[i]).sum()

        return self._minibatch_updates(
            n,
            cfg.actor_epochs,
            self.opt,
            self.params,
            loss_sum,
            finite="non-finite actor gradient: the step was skipped, weights are unchanged",
        )

    # -- one iteration ---------------------------------------------------------------------------------------
    def step(self) -> QStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        ro = self.rollout()
        t1 = time.perf_counter()
        inc = self.increments(ro)
        self.schedule_lr(self.opt, cfg.lr)
        self.schedule_lr(self.critic_opt, cfg.critic_lr)
        critic_loss = 0.0
        if cfg.value_terms == "full" or cfg.reward_weight > 0:  # else J = 0 exactly (no reward to carry)
            critic_loss = self.critic_update(ro, inc["target"], inc["terms"])
        t2 = time.perf_counter()
        actor_loss = self.actor_update(ro, inc["delta_actor"])
        t3 = time.perf_counter()
        sig2 = (self.schedule.sigma(ro.grid[:-1]) ** 2).float().view(-1, *([1] * (ro.means.ndim - 1)))
        # statistics of the global batch: per-path values gathered over ranks (equal counts per path)
        every = lambda per_path: float(self.dist.gather_rows(per_path.contiguous()).mean())  # noqa: E731
        stats = QStats(
            iteration=self.iteration,
            reward_mean=every(inc["reward"]),
            objective=every(inc["return"]),
            running=every(inc["rq"].sum(0)),
            score_error=every((sig2 * (ro.means - ro.score_hat).pow(2)).transpose(0, 1).flatten(1).mean(1)),
            td_error=every(inc["delta"].abs().mean(0)),
            critic_loss=critic_loss,
            actor_loss=actor_loss,
            sample_s=t1 - t0,
            critic_s=t2 - t1,
            actor_s=t3 - t2,
        )
        self.history.append(stats)
        self.iteration += 1
        return stats

    # -- resumable state (TrainerBase.state_dict: actor, its optimiser, RNG states, iteration, history) ---------
    def extra_state(self) -> dict:
        return {"critic": dict(self.critic.state_dict()), "critic_opt": self.critic_opt.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_opt.load_state_dict(state["critic_opt"])

    def sample(
        self,
        num: int,
        steps: int = 100,
        sampler: str = "sde",
        conditions: Tensor | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Samples of the learned model (mean action; sde = DDPM, ode = DDIM, or heun)."""
        return sample_model(self.model, num, self.x_shape, steps, sampler, conditions, seed)


# --- 5. sampling and the engine adapter ---------------------------------------------------------------------------
@torch.no_grad()
def sample_model(
    model: ScoreModel,
    num: int,
    x_shape: tuple[int, ...],
    steps: int = 100,
    sampler: str = "sde",
    conditions: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    use_pretrained: bool = False,
) -> Tensor:
    """(num, *x_shape) samples with the engine's solvers: ``sde`` (DDPM), ``ode`` (DDIM), ``heun``, ..."""
    policy = GaussianScorePolicy(model, sampler)
    grid = model.schedule.time_grid(steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(0, num, batch_size):
        n = min(batch_size, num - j)
        c = None if conditions is None else conditions[j : j + n]
        x0 = torch.randn((n, *x_shape), generator=g)
        out.append(sample(policy, x0, c, grid, g, use_pretrained=use_pretrained).sample)
    return torch.cat(out)


def qlearning_problem(
    model: ScoreModel,
    x_shape: tuple[int, ...],
    solver: str = "ddpm",
    num_classes: int = 0,
):
    """A ``problem.Problem`` over a q-learning model, so that ``ctrl_core.evaluate.evaluate`` (base = the
    reference score, tuned = mu_psi) and the rest of the pipeline run unchanged."""
    from .problem import Problem

    def make_residual():
        return make_critic(x_shape, num_classes).net

    return Problem(
        policy=GaussianScorePolicy(model, solver),
        x_shape=tuple(x_shape),
        condition_sampler=(lambda n, g: torch.randint(0, num_classes, (n,), generator=g))
        if num_classes
        else (lambda n, g: None),
        eval_conditions=(lambda n: torch.arange(n) % num_classes) if num_classes else (lambda n: None),
        make_residual=make_residual,
    )


def scratch_model(
    schedule: VPSchedule,
    data: Tensor,
    data_labels: Tensor | None = None,
    width: int = 128,
    num_classes: int = 0,
) -> QLearningScoreModel:
    """A from-scratch actor for data of this shape (EpsMLP for vectors, EpsConvNet for images) with the data's
    ratio score as its reference."""
    x_shape = tuple(data.shape[1:])
    net = (
        EpsMLP(x_shape[0], hidden=width)
        if len(x_shape) == 1
        else EpsConvNet(x_shape[0], width=width, num_classes=num_classes)
    )
    return QLearningScoreModel(net, schedule, reference=RatioScoreModel(schedule, data, data_labels))


__all__ = [
    "ratio_score",
    "RatioScoreModel",
    "EpsMLP",
    "EpsConvNet",
    "QLearningScoreModel",
    "Critic",
    "make_critic",
    "QLearningConfig",
    "QLearningTrainer",
    "QStats",
    "sample_model",
    "qlearning_problem",
    "scratch_model",
]
