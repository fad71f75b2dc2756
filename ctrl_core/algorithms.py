"""CTRL policy optimisation (paper §3, eq. 16-22) and the DDPO and GRPO baselines, in one loop.

One iteration, top to bottom:
 1. Draw a time grid: a stratified *random* grid on [0, T] for CTRL (the time integral of eq. 21-22 is then
    estimated at random times, not at one discretisation), the fixed uniform grid for DDPO.
 2. Roll out B paths with the current policy; at K random steps also record mu_pre (adapter off).
 3. Terminal reward h = RM(X_T, c); KL running reward r_k = -beta/2 g^2 ||mu_theta - mu_pre||^2 Delta_k
    (Theorem 3.1, eq. 16) at those K steps, rescaled by N/K to an unbiased estimate of the integral. With
    ``kl_form: exact`` r_k = -beta KL_k instead, KL_k = B^2 ||mu_theta - mu_pre||^2 / (2 std^2) the exact KL of
    the discrete step's two Gaussian kernels (``policy.exact_kl_increment``; the two agree as Delta -> 0).
 4. Advantage rate at the K steps (CTRL):
      finite_difference (the paper, after eq. 21):  q = [V(t, x + lam B a) - V(t, x)] / (lam Delta)
        where B a = x' - A x is the action's displacement over the step (x' = A x + B a, policy.py);
      temporal_difference (the authors' code):       q = [r Delta + V(t', x') - V(t, x)] / Delta.
    DDPO: the per-condition whitened terminal reward, the same at every step.
    GRPO: G rollouts share each condition; A = (h - group mean) / (group std + 1e-4), the same at every step.
 5. Value net update on Monte-Carlo returns G_k = h + sum_{j >= k} r_j (eq. 17).
 6. PPO-clipped surrogate integrated over time (eq. 22):
      L = -sum_k min(rho_k q_k, clip(rho_k, 1 - eps, 1 + eps) q_k) Delta_k  +  beta KL_direct,
    rho_k = pi_theta(a_k) / pi_theta_old(a_k) from the exact Gaussian transition log-probs, gradient clipping,
    AdamW. KL_direct is the running reward's explicit dependence on theta (Thm 3.1 makes it differentiable).
    DDPO and GRPO average the clipped surrogate over their steps instead, with the advantage clipped to
    +-advantage_clip; GRPO adds grpo_kl * ||m_theta - m_ref||^2 / (2 std^2) averaged over dimensions per step,
    m = A x + B mu the transition's mean (Flow-GRPO's KL loss).

The baselines as their authors run them (``OptimizeConfig.resolved``: the keys at -1 / auto): DDPO is
ddpo-pytorch's recipe (every stochastic step of the fixed grid, log-probs averaged over dimensions with clip
range 1e-4, per-prompt reward statistics, advantages clipped at 5, four optimiser steps per iteration); GRPO is
Flow-GRPO's (the same, with group-relative advantages instead of the statistics, two optimiser steps per
iteration and the KL-to-reference loss) on this engine's DDPM-type solver.

PPO's pi_theta_old: ``old_log_probs: sampler`` (default, as ddpo-pytorch) takes the log-probs recorded while
sampling. Where the sampler computes differently from the update's forward (bf16 kernels chosen by batch shape
on a GPU, or a merged sampling copy) those differ by rounding, and on a 16k-dimensional Gaussian a rounding
gap in the mean is a large log-ratio: PPO then clips updates that never happened. ``trainer`` recomputes them
with the update's forward, in blocks of the minibatch size (K more forwards per path and iteration, ~K/N of
the sampling cost), so the first pass's ratios are 1 (bitwise on the CPU), as verl recomputes an LLM's old
log-probs; the sampler/trainer gap is then logged
(``extra["sampler_approx_kl"]``, ``sampler_clipfrac``) rather than silently clipped.

Advantage normalisation: ``scale`` (default) centres q per step and divides the *whole* loss, KL term
included, by one positive scalar (the std of q), so the gradient keeps the direction of the exact objective's
gradient; ``per_time`` whitens per step as the authors' code does (changes the reward/KL balance); ``center``
and ``none`` keep the raw scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import OptimizeConfig
from .distributed import Dist
from .policy import (
    GaussianScorePolicy,
    Trajectory,
    exact_kl_increment,
    gaussian_log_prob,
    kl_increment,
    sample,
    x_hat,
)
from .trainer_base import TrainerBase
from .value import ValueDataset, ValueFunction, fit_value

OptimConfig = OptimizeConfig  # the optimize block of params.yaml (ctrl_core/config.py) configures the trainer


@dataclass
class Rollout:
    """What one iteration sampled, restricted to the K training steps."""

    traj: Trajectory
    steps: list[int]  # the K step indices (all stochastic)
    reward: Tensor  # (B,) terminal reward h
    kl_terms: dict[int, Tensor]  # per step: the KL increment of kl_form (Trainer.kl_term), unscaled, (B,)
    kl_scale: float  # N_stochastic / K: rescales subset sums to the whole integral
    rm_xhat: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # k -> (x_hat, RM(x_hat)), shared

    @property
    def kl_measured(self) -> bool:
        """False where mu_pre was not computed (``Trainer.needs_reference_means``): kl_terms are zeros, the logged
        KL is None."""
        return bool(self.traj.ref_means)


@dataclass
class IterationStats:
    iteration: int
    reward_mean: float
    reward_std: float
    kl: float
    objective: float
    value_loss: float
    approx_kl: float
    clipfrac: float
    adv_scale: float
    sample_s: float
    value_s: float
    policy_s: float
    skipped: bool = False  # on_nonfinite=skip dropped this iteration's update (weights unchanged)
    extra: dict = field(default_factory=dict)


class Trainer(TrainerBase):
    """CTRL / DDPO / GRPO trainer over a ``GaussianScorePolicy`` (any score model with trainable parameters).
    ``config`` is run as ``config.resolved()`` (the algorithm's values for the keys left at -1 / auto)."""

    params_key = "policy"
    stats_type = IterationStats

    def __init__(
        self,
        policy: GaussianScorePolicy,
        reward_fn: Callable,
        config: OptimConfig,
        x_shape: tuple[int, ...],
        condition_sampler: Callable[[int, torch.Generator], Tensor | None] = lambda n, g: None,
        value: ValueFunction | None = None,
        dist: Dist | None = None,
    ):
        super().__init__(config.resolved(), dist, "optimize")
        config = self.cfg
        if config.algorithm == "ctrl" and value is None:
            raise ValueError("CTRL needs a value function (pretrain one with select_link / fit_value)")
        self.policy, self.reward_fn, self.value = policy, reward_fn, value
        self.x_shape, self.condition_sampler = tuple(x_shape), condition_sampler
        self.params = policy.model.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters (no LoRA adapter / correction)")
        # one fused kernel for the adapter's update on a GPU (the CPU keeps the default, and its committed numbers)
        fused = True if all(p.is_cuda for p in self.params) else None
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        self.value_opt = (
            torch.optim.AdamW(
                [p for p in value.residual.parameters() if p.requires_grad]
                or [torch.zeros(1, requires_grad=True)],
                lr=config.value_lr,
                weight_decay=1e-4,
            )
            if value is not None
            else None
        )
        # log_prob_reduce=mean: the log-ratio averaged over the x_shape dimensions (ddpo-pytorch, Flow-GRPO)
        self.log_prob_dims = math.prod(self.x_shape) if config.log_prob_reduce == "mean" else None
        self.stat_tracker = (
            PromptStatTracker(config.stat_buffer, config.stat_min_count)
            if config.algorithm == "ddpo" and config.stat_buffer > 0
            else None
        )
        self.skipped = 0

    # -- resumable state (TrainerBase.state_dict: weights, optimiser, RNG states, iteration, history) -------------
    def extra_state(self) -> dict:
        state: dict = {"skipped": self.skipped}
        if self.value is not None:
            state["value"] = dict(self.value.residual.state_dict())
            state["value_opt"] = self.value_opt.state_dict()
        if self.stat_tracker is not None:
            state["stat_tracker"] = self.stat_tracker.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.policy.model.adapter_changed()
        if self.value is not None:
            if "value" not in state:
                raise ValueError("the checkpoint holds no value network, this CTRL run needs one")
            self.value.residual.load_state_dict(state["value"])
            self.value_opt.load_state_dict(state["value_opt"])
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state.get("stat_tracker", {}))
        self.skipped = int(state["skipped"])

    # -- 1-3: rollout --------------------------------------------------------------------------------------
    def rollout(self) -> Rollout:
        cfg, sch = self.cfg, self.policy.schedule
        if cfg.algorithm == "ctrl" and cfg.time_sampling == "random":
            grid = sch.random_time_grid(cfg.train_steps, self.generator)
        else:
            grid = sch.time_grid(cfg.train_steps)
        stochastic = [
            k
            for k in range(cfg.train_steps)
            if self.policy.coefficients(float(grid[k]), float(grid[k + 1])).stochastic
        ]
        if not stochastic:
            raise ValueError(
                f"solver {self.policy.solver!r} (eta={self.policy.eta}) has no random steps: use ddpm or eta > 0"
            )
        K = len(stochastic) if cfg.train_timesteps == 0 else min(cfg.train_timesteps, len(stochastic))
        pick = torch.randperm(len(stochastic), generator=self.generator)[:K]
        steps = sorted(stochastic[int(i)] for i in pick)
        # every rank draws the global batch's random numbers and keeps its own rows (distributed.py)
        rows = self.dist.shard(cfg.batch_size)
        if cfg.algorithm == "grpo":  # batch_size / G conditions, each repeated for its group of G rows
            c = self.condition_sampler(cfg.batch_size // cfg.group_size, self.generator)
            c = None if c is None else c.repeat_interleave(cfg.group_size, dim=0)
        else:
            c = self.condition_sampler(cfg.batch_size, self.generator)
        c = None if c is None else c[rows]
        x0 = torch.randn((cfg.batch_size, *self.x_shape), generator=self.generator)[rows]
        ref_steps = steps if self.needs_reference_means() else []
        traj, reward = sample_and_score(self.policy, self.reward_fn, x0, c, grid, self.generator, ref_steps,
                                        (cfg.batch_size, rows), cfg.reward_chunks)  # fmt: skip
        if self.dist.any(not bool(torch.all(torch.isfinite(reward)))):
            raise FloatingPointError(
                f"the reward model returned a non-finite reward at iteration {self.iteration}"
            )
        kl_terms = {}
        for k in steps:
            s, s_next = float(grid[k]), float(grid[k + 1])
            if ref_steps:
                kl_terms[k] = self.kl_term(
                    s, s_next, traj.means[k].double(), traj.ref_means[k].double()
                ).float()
            else:  # not measured; with beta = 0 it enters nothing
                kl_terms[k] = torch.zeros(traj.states.shape[1])
        return Rollout(traj, steps, reward, kl_terms, len(stochastic) / K)

    def kl_term(self, s: float, s_next: float, mu: Tensor, mu_ref: Tensor) -> Tensor:
        """The KL increment of the step s -> s_next per path, (B,) in mu's dtype: -beta times it is the running
        reward r_k (eq. 16). ``kl_form`` continuous: Theorem 3.1's g^2/2 ||mu - mu_pre||^2 Delta; exact: the
        discrete step's Gaussian KL B^2 ||mu - mu_pre||^2 / (2 std^2), whose sum along a path is the exact KL
        of the two discrete chains (what the evaluation's kl_exact measures)."""
        if self.cfg.kl_form == "exact":
            coef = self.policy.coefficients(s, s_next)
            return exact_kl_increment(coef, mu, mu_ref).to(mu.dtype)
        return kl_increment(self.policy.schedule, s, s_next, mu, mu_ref)

    def needs_reference_means(self) -> bool:
        """mu_pre at the K training steps costs K extra (CFG) UNet calls per iteration. CTRL needs it for the KL
        running reward (beta > 0) and for x_hat from the pretrained score (value_xhat=pretrained); otherwise
        (DDPO; CTRL with beta = 0 and value_xhat=policy, the authors' ImageReward setting) only to log the KL,
        which ``kl_monitor`` keeps on by default (reward hacking shows there first). GRPO needs it for its KL loss
        (grpo_kl > 0), as Flow-GRPO calls the reference model at every training step."""
        cfg = self.cfg
        if cfg.algorithm == "ctrl" and (cfg.beta > 0 or cfg.value_xhat == "pretrained"):
            return True
        if cfg.algorithm == "grpo" and cfg.grpo_kl > 0:
            return True
        return cfg.kl_monitor

    # -- 4: advantage rates --------------------------------------------------------------------------------
    def _xhat_score(self, traj: Trajectory, k: int) -> Tensor:
        """The score whose Tweedie prediction feeds the value at step k (see OptimConfig.value_xhat)."""
        return traj.ref_means[k] if self.cfg.value_xhat == "pretrained" else traj.means[k]

    @torch.no_grad()
    def _value_at(
        self, s: float, x: Tensor, mu: Tensor | None, c, keep: dict | None = None, k: int = -1
    ) -> Tensor:
        """V(s, x) with x_hat from the score mu (computed when None); V(0, x) = RM(x). With ``keep``, x_hat and
        RM(x_hat) are stored under k, so the value data set of the same states reuses them (one decode and one
        reward-model call fewer per training step for a latent model)."""
        B = x.shape[0]
        s_vec = torch.full((B,), s, dtype=torch.float64)
        if s <= 0:
            return self.reward_fn(x, c).float()
        if mu is None:
            pretrained = self.cfg.value_xhat == "pretrained"
            mu = self.policy.reference_mean(s_vec, x, c) if pretrained else self.policy.mean(s_vec, x, c)
        xh = x_hat(self.policy.schedule, s_vec, x, mu)
        rm = None
        if keep is not None and self.value.uses_reward(s_vec):
            rm = self.value.reward_fn(xh, c).float()  # the value's reward model (a cheaper decoder, say)
            keep[k] = (xh, rm)
        return self.value(s_vec, x, c, xh, rm)

    @torch.no_grad()
    def advantages(self, ro: Rollout) -> dict[int, Tensor]:
        """Per training step k: the advantage rate times Delta_k (the integrand of eq. 22 before rho), (B,)."""
        cfg, traj, grid = self.cfg, ro.traj, ro.traj.grid
        if cfg.algorithm == "ddpo":
            conds = None if traj.conditions is None else self.dist.gather_rows(traj.conditions)
            rewards = self.dist.gather_rows(ro.reward)  # every rank sees (and tracks) the global batch
            if self.stat_tracker is not None:
                adv = self.stat_tracker.update(rewards, conds)
            else:
                adv = per_condition_whiten(rewards, conds)
            adv = adv[self.dist.shard(cfg.batch_size)]
            return {k: adv for k in ro.steps}
        if cfg.algorithm == "grpo":  # rows [j G, (j + 1) G) are group j (rollout), over the global batch
            rewards = self.dist.gather_rows(ro.reward)
            groups = torch.arange(cfg.batch_size) // cfg.group_size
            adv = group_relative_advantages(rewards, groups)[self.dist.shard(cfg.batch_size)]
            return {k: adv for k in ro.steps}
        out, here = {}, {}
        for k in sorted(
            ro.steps, reverse=True
        ):  # late steps first: step k's V(t', x') is step k + 1's V(t, x)
            s, s_next = float(grid[k]), float(grid[k + 1])
            x, x_next, mu = traj.states[k], traj.states[k + 1], self._xhat_score(traj, k)
            v_here = here[k] = self._value_at(s, x, mu, traj.conditions, keep=ro.rm_xhat, k=k)
            if cfg.advantage == "finite_difference":
                coef = self.policy.coefficients(s, s_next)
                lam = cfg.fd_scale
                displacement = x_next - coef.A.to(x.dtype) * x  # B a: the action's share of the step
                v_pert = self._value_at(s, x + lam * displacement, None, traj.conditions)
                out[k] = (v_pert - v_here) / lam  # = q * Delta
            else:
                if s_next <= 0:  # V(0, x) = RM(x): the rollout's terminal reward, already computed
                    v_next = ro.reward.float()
                elif (
                    k + 1 in here
                ):  # the same state, time and x_hat source: the same value, not evaluated again
                    v_next = here[k + 1]
                else:
                    mu_next = None
                    if k + 1 < traj.num_steps and (
                        self.cfg.value_xhat == "policy" or k + 1 in traj.ref_means
                    ):
                        mu_next = self._xhat_score(traj, k + 1)
                    v_next = self._value_at(s_next, x_next, mu_next, traj.conditions)
                out[k] = v_next - v_here - cfg.beta * ro.kl_terms[k]  # = q * Delta (TD error)
        return {k: out[k] for k in ro.steps}

    def normalise(self, adv: dict[int, Tensor]) -> tuple[dict[int, Tensor], float]:
        """Returns (advantages, scale): the PPO loss is divided by ``scale`` (see the module docstring)."""
        mode, clip = self.cfg.advantage_norm, self.cfg.advantage_clip
        if self.cfg.algorithm in (
            "ddpo",
            "grpo",
        ):  # already whitened; clipped as ddpo-pytorch and Flow-GRPO do
            return ({k: a.clamp(-clip, clip) for k, a in adv.items()} if clip > 0 else adv), 1.0
        if mode == "none":
            return adv, 1.0
        if self.dist.world > 1:  # batch statistics over the global batch, then back to this rank's rows
            rows = self.dist.shard(self.cfg.batch_size)
            self.dist, world = Dist(), self.dist
            try:
                full, scale = self.normalise({k: world.gather_rows(a) for k, a in adv.items()})
            finally:
                self.dist = world
            return {k: a[rows] for k, a in full.items()}, scale
        centred = {k: a - a.mean() for k, a in adv.items()}
        if mode == "center":
            return centred, 1.0
        if mode == "per_time":
            out = {k: a / (a.std() + 1e-8) for k, a in centred.items()}
            if self.cfg.advantage_clip > 0:
                out = {k: a.clamp(-self.cfg.advantage_clip, self.cfg.advantage_clip) for k, a in out.items()}
            return out, 1.0
        scale = float(torch.cat(list(centred.values())).std()) + 1e-8
        out = centred
        if self.cfg.advantage_clip > 0:
            lim = self.cfg.advantage_clip * scale
            out = {k: a.clamp(-lim, lim) for k, a in centred.items()}
        return out, scale

    # -- 5: value update --------------------------------------------------------------------------------------
    def value_dataset(self, ro: Rollout) -> ValueDataset:
        """Monte-Carlo returns G_k = h - beta * sum_{j >= k} KL_j (eq. 17) at the K training steps."""
        traj, sch = ro.traj, self.policy.schedule
        ss, xs, cs, xh, rm, gs = [], [], [], [], [], []
        for k in ro.steps:
            # unbiased return-to-go from the K random steps: step k itself is always in the subset, every later
            # step is with probability (K-1)/(N-1)
            K, N = len(ro.steps), round(ro.kl_scale * len(ro.steps))
            w_later = (N - 1) / (K - 1) if K > 1 else 0.0
            future_kl = ro.kl_terms[k] + w_later * sum(
                (ro.kl_terms[j] for j in ro.steps if j > k), torch.zeros(())
            )
            s_vec = torch.full((traj.states.shape[1],), float(traj.grid[k]), dtype=torch.float64)
            xk = traj.states[k]
            if k in ro.rm_xhat:  # computed for the advantage at the same state (same x_hat)
                xhat_k, rm_k = ro.rm_xhat[k]
            else:
                xhat_k = x_hat(sch, s_vec, xk, self._xhat_score(traj, k))
                rm_k = self.value.reward_fn(xhat_k, traj.conditions).float()
            ss.append(s_vec)
            xs.append(xk)
            cs.append(traj.conditions)
            xh.append(xhat_k)
            rm.append(rm_k)
            gs.append(ro.reward - self.cfg.beta * future_kl)
        c = None if traj.conditions is None else torch.cat(cs)
        n = len(ro.steps)
        g = lambda t: self.dist.gather_blocks(t, n)  # noqa: E731  (all ranks fit the value net on the global data)
        return ValueDataset(
            g(torch.cat(ss)),
            g(torch.cat(xs)),
            None if c is None else g(c),
            g(torch.cat(xh)),
            g(torch.cat(rm)),
            g(torch.cat(gs)),
        )

    # -- 6: PPO update ----------------------------------------------------------------------------------------
    def surrogate_loss(
        self, ro: Rollout, adv: dict[int, Tensor], k: int, idx: Tensor, denom: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """eq. 22 at step k for the paths ``idx``: (loss, new log-prob, ratio). ``loss`` is to be minimised; it
        averages over ``denom`` paths (default len(idx); data-parallel ranks pass the global minibatch size)."""
        denom = len(idx) if denom is None else denom
        cfg, traj = self.cfg, ro.traj
        s, s_next = float(traj.grid[k]), float(traj.grid[k + 1])
        logp, mu = self._log_prob(traj, k, idx)
        ratio = torch.exp(self.log_ratio(logp, traj.log_probs[k][idx]))
        a = adv[k][idx]
        surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range) * a)
        # CTRL: a Riemann sum of the time integral over the K random steps, rescaled to all steps;
        # DDPO, GRPO: the mean over their timesteps, as ddpo-pytorch and Flow-GRPO do
        weight = ro.kl_scale if cfg.algorithm == "ctrl" else 1.0 / len(ro.steps)
        loss = -surrogate.sum() / denom * weight
        if cfg.algorithm == "ctrl" and cfg.beta > 0:
            kl_direct = self.kl_term(s, s_next, mu, traj.ref_means[k][idx])
            loss = loss + cfg.beta * kl_direct.sum() / denom * ro.kl_scale
        if cfg.algorithm == "grpo" and cfg.grpo_kl > 0:
            kl_ref = self.kl_to_reference(traj, k, mu, traj.ref_means[k][idx])
            loss = loss + cfg.grpo_kl * kl_ref.sum().to(loss.dtype) / denom * weight
        return loss, logp, ratio

    def log_ratio(self, logp: Tensor, logp_old: Tensor) -> Tensor:
        """log(pi_theta / pi_old) per path from summed log-probs: as it is (log_prob_reduce=sum, the exact
        likelihood ratio), or divided by the dimension (mean: the log-probs averaged over dimensions, whose ratio
        ddpo-pytorch and Flow-GRPO clip at 1e-4)."""
        diff = logp - logp_old
        return diff if self.log_prob_dims is None else diff / self.log_prob_dims

    def kl_to_reference(self, traj: Trajectory, k: int, mu: Tensor, mu_ref: Tensor) -> Tensor:
        """GRPO's KL loss at step k (Flow-GRPO): ||m_theta - m_ref||^2 / (2 std^2) averaged over dimensions, with
        m = A x + B mu the transition means, i.e. the exact KL of the step's two Gaussian kernels divided by the
        dimension (``policy.exact_kl_increment``), per path -> (B,) float64."""
        coef = self.policy.coefficients(float(traj.grid[k]), float(traj.grid[k + 1]))
        return exact_kl_increment(coef, mu, mu_ref) / mu[0].numel()

    def policy_update(self, ro: Rollout, adv: dict[int, Tensor], scale: float) -> tuple[float, float]:
        """PPO epochs over minibatches of the global batch; each rank backpropagates its own paths of every
        minibatch and the gradients are summed over ranks before clipping and the optimiser step."""
        cfg, traj = self.cfg, ro.traj
        B, rows = cfg.batch_size, self.dist.shard(cfg.batch_size)
        kl_sum = clip_sum = count = 0.0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.generator)
            for j in range(0, B, cfg.minibatch_size):
                idx = perm[j : j + cfg.minibatch_size]
                mine = idx[(idx >= rows.start) & (idx < rows.stop)] - rows.start
                self.opt.zero_grad(set_to_none=True)
                for k in (
                    ro.steps if len(mine) else ()
                ):  # one backward per step: one step's graph in memory at a time
                    loss, logp, ratio = self.surrogate_loss(ro, adv, k, mine, denom=len(idx))
                    (loss / scale).backward()
                    with torch.no_grad():
                        kl_sum += float(0.5 * self.log_ratio(logp, traj.log_probs[k][mine]).pow(2).sum())
                        clip_sum += float(((ratio - 1).abs() > cfg.clip_range).float().sum())
                        count += len(mine)
                self.clipped_step(
                    self.opt,
                    self.params,
                    nonfinite=f"non-finite policy loss or gradient at iteration {self.iteration}",
                )
                self.policy.model.adapter_changed()  # (a fused step leaves the weights' version counters alone)
        count = self.dist.sum(count)
        return self.dist.sum(kl_sum) / count, self.dist.sum(clip_sum) / count

    def _log_prob(self, traj: Trajectory, k: int, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(log pi_theta(x_{k+1} | x_k, c), mu_theta) of the paths ``idx`` at step k: the training forward."""
        s, s_next = float(traj.grid[k]), float(traj.grid[k + 1])
        coef = self.policy.coefficients(s, s_next)
        x, x_next = traj.states[k][idx], traj.states[k + 1][idx]
        c = None if traj.conditions is None else traj.conditions[idx]
        mu = self.policy.mean(torch.full((len(idx),), s, dtype=torch.float64), x, c)
        return gaussian_log_prob(x_next, self.policy.transition_mean(coef, x, mu), coef.std), mu

    def trainer_log_probs(self, ro: Rollout, idx: Tensor | None = None) -> dict[int, Tensor]:
        """Log-probs at the K steps of this rank's paths ``idx`` (default: all) recomputed by the training forward
        (gradients on, as in the update, then dropped) in blocks of the update's minibatch size (per rank:
        minibatch / world, which the update's shares only match on average), before any update."""
        idx = torch.arange(ro.traj.states.shape[1]) if idx is None else idx
        n = len(idx)  # a rank's share of a minibatch is about minibatch / world rows (it varies)
        block = max(1, min(math.ceil(self.cfg.minibatch_size / self.dist.world), n))
        out = {}
        for k in ro.steps:
            parts = []
            for a in range(0, n, block):
                with torch.enable_grad():  # the update's numerics (a sampling copy serves no-grad calls)
                    logp, _ = self._log_prob(ro.traj, k, idx[a : a + block])
                parts.append(logp.detach())
            out[k] = torch.cat(parts)
        return out

    @torch.no_grad()
    def sampling_mismatch(
        self, ro: Rollout, idx: Tensor | None = None, recomputed: dict[int, Tensor] | None = None
    ) -> dict[str, float]:
        """How far the log-probabilities recorded while sampling are from the trainer's own at the same weights:
        the PPO ratios of a first pass before any update, which should be 1. Rounding makes them differ where
        the sampler computes differently from the training forward (a merged or lower-precision sampling copy,
        or kernels chosen by batch shape on a GPU). Returns the approx KL (mean of log-ratio^2 / 2), the share
        of ratios PPO would clip, and the largest |log-ratio|, over the K steps of the paths ``idx`` (default:
        all of this rank's; every rank's, gathered). Costs K forwards (none given ``recomputed``,
        ``trainer_log_probs`` of the same paths), no update."""
        traj = ro.traj
        idx = torch.arange(traj.states.shape[1]) if idx is None else idx
        recomputed = self.trainer_log_probs(ro, idx) if recomputed is None else recomputed
        local = torch.stack([self.log_ratio(recomputed[k], traj.log_probs[k][idx]) for k in ro.steps], dim=1)
        r = self.dist.gather_rows(local.contiguous()).double().flatten()
        return {
            "approx_kl": float(0.5 * r.pow(2).mean()),
            "clipfrac": float(((r.exp() - 1).abs() > self.cfg.clip_range).double().mean()),
            "max_abs_log_ratio": float(r.abs().max()),
        }

    # -- one iteration --------------------------------------------------------------------------------------
    def step(self) -> IterationStats:
        """One iteration. A NaN/inf reward, loss, gradient or value loss raises ``FloatingPointError`` before any
        weight changes are kept (on_nonfinite=error), or restores the iteration's starting weights and optimiser
        state and records a skipped iteration (on_nonfinite=skip, at most max_skipped times)."""
        if self.cfg.on_nonfinite == "error":
            return self._iterate()
        snapshot = _clone_state(
            {k: v for k, v in self.state_dict().items() if k not in ("generator", "torch_rng", "history")}
        )
        try:
            return self._iterate()
        except FloatingPointError as err:
            self._restore_weights(snapshot)
            self.skipped += 1
            if self.skipped > self.cfg.max_skipped:
                raise FloatingPointError(
                    f"{err} (iteration {self.iteration}: more than optimize.max_skipped="
                    f"{self.cfg.max_skipped} iterations dropped)"
                ) from err
            stats = IterationStats(
                self.iteration, *[None] * 8, 0.0, 0.0, 0.0, skipped=True, extra={"error": str(err)}
            )
            self.history.append(stats)
            self.iteration += 1
            return stats

    def _restore_weights(self, snapshot: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, snapshot["policy"], strict=True):
                p.copy_(saved)
        self.opt.load_state_dict(snapshot["opt"])
        self.policy.model.adapter_changed()
        if self.value is not None:
            self.value.residual.load_state_dict(snapshot["value"])
            self.value_opt.load_state_dict(snapshot["value_opt"])
        if self.stat_tracker is not None:  # a dropped iteration's rewards are not kept either
            self.stat_tracker.load_state_dict(snapshot["stat_tracker"])

    def _iterate(self) -> IterationStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        ro = self.rollout()
        t1 = time.perf_counter()
        value_loss = float("nan")
        if cfg.algorithm == "ctrl":
            adv, scale = self.normalise(self.advantages(ro))
            data = self.value_dataset(ro)
            value_loss = fit_value(
                self.value,
                data,
                cfg.value_epochs,
                batch_size=cfg.value_batch_size,
                generator=self.generator,
                optimizer=self.value_opt,
                dist=self.dist,
            )
            if not math.isfinite(value_loss):
                raise FloatingPointError(f"non-finite value loss at iteration {self.iteration}")
        else:
            adv, scale = self.normalise(self.advantages(ro))
        t2 = time.perf_counter()
        self.schedule_lr(self.opt, cfg.lr)
        if self.dist.any(
            not all(bool(torch.isfinite(a).all()) for a in adv.values()) or not math.isfinite(scale)
        ):
            raise FloatingPointError(f"non-finite advantages at iteration {self.iteration}")
        extra = {}
        if cfg.old_log_probs == "trainer":  # PPO's pi_old from the update's own forward (see OptimConfig)
            t_re = time.perf_counter()
            recomputed = self.trainer_log_probs(ro)
            gap = self.sampling_mismatch(ro, recomputed=recomputed)  # over the global batch
            extra = {f"sampler_{key}": value for key, value in gap.items()}
            for k in ro.steps:
                ro.traj.log_probs[k] = recomputed[k]
            extra["recompute_s"] = time.perf_counter() - t_re
        approx_kl, clipfrac = self.policy_update(ro, adv, scale)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise FloatingPointError(
                f"non-finite policy weights after the update at iteration {self.iteration}"
            )
        t3 = time.perf_counter()
        reward = self.dist.gather_rows(ro.reward)
        kl = (
            self.dist.gather_rows(sum(ro.kl_terms.values()) * ro.kl_scale).mean().item()
            if ro.kl_measured
            else None
        )
        stats = IterationStats(
            iteration=self.iteration,
            reward_mean=float(reward.mean()),
            reward_std=float(reward.std()),
            kl=kl,
            objective=float(reward.mean()) - cfg.beta * (kl or 0.0),
            value_loss=value_loss,
            approx_kl=approx_kl,
            clipfrac=clipfrac,
            adv_scale=scale,
            sample_s=t1 - t0,
            value_s=t2 - t1,
            policy_s=t3 - t2,
            extra=extra,
        )
        self.history.append(stats)
        self.iteration += 1
        return stats


def sample_and_score(
    policy,
    reward_fn: Callable,
    x0: Tensor,
    c: Tensor | None,
    grid: Tensor,
    generator: torch.Generator,
    reference_steps: list[int],
    noise_rows: tuple[int, slice],
    chunks: int = 1,
) -> tuple[Trajectory, Tensor]:
    """Roll out x0 (rows ``noise_rows[1]`` of a global batch of ``noise_rows[0]``) and score the samples.

    With ``chunks > 1`` the rows are sampled in that many blocks and each block's reward is computed in a worker
    thread while the next block samples (DDPO's asynchronous scoring: a CPU reward such as JPEG, or a reward
    model on another device, overlaps the UNet). The paths do not change: every block starts from the same
    generator state, draws the whole batch's noise and keeps its rows (the data-parallel mechanism of
    ``policy.sample``), and the generator ends where one full-batch rollout leaves it.
    """
    total, rows = noise_rows
    n = x0.shape[0]
    chunks = max(1, min(chunks, n))
    if chunks == 1:
        traj = sample(policy, x0, c, grid, generator, reference_steps=reference_steps,
                      noise_rows=None if n == total else (total, rows))  # fmt: skip
        return traj, reward_fn(traj.sample, c).float()
    from concurrent.futures import ThreadPoolExecutor

    start_state = generator.get_state()
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    parts, futures = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as pool:
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            generator.set_state(start_state)
            cc = None if c is None else c[a:b]
            t = sample(policy, x0[a:b], cc, grid, generator, reference_steps=reference_steps,
                       noise_rows=(total, slice(rows.start + a, rows.start + b)))  # fmt: skip
            parts.append(t)
            futures.append(pool.submit(reward_fn, t.sample, cc))
        reward = torch.cat([f.result().float() for f in futures])
    traj = Trajectory(
        parts[0].grid,
        torch.cat([t.states for t in parts], dim=1),
        torch.cat([t.means for t in parts], dim=1),
        torch.cat([t.log_probs for t in parts], dim=1),
        parts[0].stochastic,
        c,
        {k: torch.cat([t.ref_means[k] for t in parts]) for k in parts[0].ref_means},
    )
    return traj, reward


def _clone_state(x):
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_state(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_clone_state(v) for v in x)
    return x


def group_relative_advantages(reward: Tensor, groups: Tensor) -> Tensor:
    """GRPO's advantage (Flow-GRPO's per-prompt tracker, type grpo): A_i = (r_i - mean_g) / (std_g + 1e-4) over
    the rewards of row i's group g, std the population one (numpy's), in float64; ``groups`` (B,) labels each
    row's group, in any order -> (B,) in the reward's dtype. No critic: the group mean is the baseline."""
    r = reward.double()
    out = torch.empty_like(r)
    for g in groups.unique():
        m = groups == g
        out[m] = (r[m] - r[m].mean()) / (r[m].std(unbiased=False) + 1e-4)
    return out.to(reward.dtype)


def per_condition_whiten(reward: Tensor, conditions: Tensor | None) -> Tensor:
    """DDPO's per-prompt stat tracking within a batch: (r - mean_c) / std_c, falling back to batch stats
    for conditions seen fewer than 4 times."""
    out = (reward - reward.mean()) / (reward.std() + 1e-8)
    if conditions is None or conditions.ndim != 1:
        return out
    for c in conditions.unique():
        m = conditions == c
        if int(m.sum()) >= 4:
            r = reward[m]
            out[m] = (r - r.mean()) / (r.std() + 1e-8)
    return out


class PromptStatTracker:
    """DDPO's per-prompt reward statistics across iterations (ddpo-pytorch's ``PerPromptStatTracker``).

    Each condition keeps its last ``buffer_size`` rewards. A batch's rewards are first appended to their
    condition's buffer; a condition whose buffer then holds at least ``min_count`` rewards is whitened by the
    buffer's mean and (population) standard deviation, one with fewer by the whole batch's. With one condition per
    prompt index this is DDPO's advantage: a prompt that is easy for the model does not dominate the update, and
    a few samples of a prompt in one batch do not make a noisy baseline. Conditions that are not one label per row
    (``None``, embeddings) fall back to the batch statistics. The buffers are part of the trainer's checkpoint."""

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"need buffer_size >= 1 and 1 <= min_count <= buffer_size, got {buffer_size}, {min_count}"
            )
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[int, Tensor] = {}

    def update(self, reward: Tensor, conditions: Tensor | None) -> Tensor:
        r = reward.double()
        batch = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
        if conditions is None or conditions.ndim != 1 or conditions.is_floating_point():
            return batch.to(reward.dtype)
        out = torch.empty_like(r)
        for c in conditions.unique().tolist():
            m = conditions == c
            buf = torch.cat([self.buffers.get(c, r.new_empty(0)), r[m]])[-self.buffer_size :]
            self.buffers[c] = buf
            if buf.numel() < self.min_count:
                out[m] = batch[m]
            else:
                out[m] = (r[m] - buf.mean()) / (buf.std(unbiased=False) + 1e-6)
        return out.to(reward.dtype)

    def state_dict(self) -> dict:
        return {"buffers": {int(c): b.clone() for c, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {int(c): b.double().clone() for c, b in state.get("buffers", {}).items()}
