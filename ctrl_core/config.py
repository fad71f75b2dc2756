"""The run configuration, declared once: one pydantic model per block of params.yaml.

Every field carries its default (equal to params.yaml's; a test compares them) and its help text. The engine
takes these models as its configuration (``algorithms.OptimConfig`` is :class:`OptimizeConfig`,
``qlearning.QLearningConfig`` is :class:`QLearningConfig`), and everything else is derived from them: the CLI's
``--set block.key=value``, the KFP pipeline parameters ``block__key`` with their UI descriptions
(``ctrl_core.params``, ``pipelines.pipeline``), the ``ctrl params`` table and docs/params.md. Cross-field rules
live in the models; an error names its key with its block (``optimize.beta: must be >= 0, got -1.0``).

This module imports neither torch nor the engine: the names the engine implements (solvers, link functions,
algorithms, ...) are declared here and imported by the engine modules, and the reward registry is asked for
its names only when a ``reward`` block is validated.
"""

import inspect
import typing
import warnings
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# --- the names the engine implements (policy.py, value.py, algorithms.py and qlearning.py import them) ---------
SOLVERS = ("ddpm", "ddim", "euler_maruyama", "heun")  # policy.sample's rollout solvers
SOLVER_ALIASES = {"sde": "ddpm", "ode": "ddim"}  # the evaluation's sampler names
LINK_NAMES = (
    "cos_sin",
    "linear",
    "rm_only",
    "f_only",
)  # value.LINKS (tests/test_config.py checks they agree)
ALGORITHMS = (
    "ctrl",
    "ddpo",
    "grpo",
    "qlearning",
)  # qlearning: settings in the qlearning block (ctrl_core/qlearning.py)
LOG_PROB_REDUCTIONS = ("auto", "sum", "mean")
ADVANTAGES = ("finite_difference", "temporal_difference")
KL_FORMS = ("continuous", "exact")  # the KL running reward: Theorem 3.1's rate | the discrete chain's
NORMALISATIONS = ("scale", "per_time", "center", "none")
TIME_SAMPLING = ("random", "grid")
ROLLOUT_SOLVERS = ("ddpm", "euler_maruyama", "ddim")  # q-learning's rollout dynamics
CRITIC_TARGETS = ("td", "monte_carlo")
CRITICS = ("linked", "free")
BASELINES = ("counterfactual", "none")
VALUE_TERMS = ("reward", "full")
TEST_WEIGHTS = ("eps", "uniform")

#: the old q-learning key and the message that refuses it
RENAMED = {
    ("qlearning", "beta"): "qlearning.beta was renamed qlearning.reward_weight (the weight of the reward; "
    "optimize.beta is CTRL's KL weight)"
}


class Block(BaseModel):
    """One block of params.yaml. ``_checks`` lists the rules that span fields or that name their block
    (``(field, ok, what it must be)``); each failing one becomes ``block.field: must be ..., got value``."""

    # allow_inf_nan=False: a NaN/inf parameter (tolerance=.inf waves every model through the gate,
    # max_grad_norm=.nan poisons the weights) is rejected here rather than discovered after hours of training
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    BLOCK: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [RENAMED[(cls.BLOCK, k)] for k in data if (cls.BLOCK, k) in RENAMED]
            if old:
                raise ValueError("\n  ".join(old))
        return data

    def _checks(self) -> list[tuple[str, bool, str]]:
        return []

    @model_validator(mode="after")
    def _cross_field(self):
        bad = [
            f"{self.BLOCK}.{name}: must be {want}, got {getattr(self, name)!r}"
            for name, ok, want in self._checks()
            if not ok
        ]
        if bad:
            raise ValueError("\n  ".join(bad))
        return self


class RunConfig(Block):
    BLOCK: ClassVar[str] = "run"

    name: str = Field("ctrl-digits", description="experiment name (MLflow experiment, output folder)")
    seed: int = Field(0, description="global seed")
    resume: bool = Field(
        True, description="resume a step from the latest checkpoint of the same run (same params and inputs)"
    )
    checkpoint_root: str = Field(
        "",
        description="folder for resumable step checkpoints (a PVC on Kubernetes); "
        "empty: CTRL_CHECKPOINT_ROOT or .ctrl-checkpoints",
    )


class CheckpointConfig(Block):
    BLOCK: ClassVar[str] = "checkpoint"

    source: str = Field(
        "builtin:digits", description="builtin:<name> | local path | s3://bucket/key | hf:org/name"
    )
    sha256: str = Field("", description="expected sha256 of the checkpoint (empty: not checked)")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower().removeprefix("sha256:")
        if v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 64 hex digits or empty")
        return v


class ModelConfig(Block):
    BLOCK: ClassVar[str] = "model"

    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank of the adapter on the UNet")
    prompts: str = Field(
        "",
        description="latent text-to-image checkpoints: prompt file, one prompt per line "
        "(empty: prompts.txt in the checkpoint folder)",
    )
    guidance_scale: float = Field(
        7.0,
        ge=0,
        le=100,
        description="latent text-to-image checkpoints: classifier-free guidance scale w (1: no guidance)",
    )
    autocast: Literal["", "bf16", "fp16"] = Field(
        "",
        description="latent text-to-image checkpoints: run the UNet "
        "under bf16/fp16 autocast (empty: float32)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="latent text-to-image checkpoints: recompute UNet "
        "activations in the backward pass (memory for time)",
    )
    compile: Literal["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "",
        description="torch.compile the UNet with this mode (reduce-overhead: CUDA graphs); empty: eager. "
        "Compiling takes minutes per batch shape",
    )
    channels_last: bool = Field(
        False,
        description="NHWC memory format for the UNet (measure first: slower for SD1.5 "
        "in eager mode on an H100)",
    )
    merged_sampling: bool = Field(
        False,
        description="sample rollouts through a copy of the UNet with the LoRA merged "
        "into its weights and q/k/v fused (SD UNets); training forwards and mu_pre keep the "
        "LoRA model. float32 only: with model.autocast the sampler's log-probs miss the "
        "trainer's (bench.merged_sampling)",
    )

    @field_validator("prompts")
    @classmethod
    def _prompt_file(cls, v: str) -> str:
        v = v.strip()
        if v and not v.endswith(".txt"):
            raise ValueError("must be a .txt file (one prompt per line) or empty")
        return v

    @model_validator(mode="after")
    def _merged_sampling_in_float32(self):
        if self.merged_sampling and self.autocast:
            raise ValueError(
                f"model.merged_sampling: must be false with model.autocast={self.autocast}: a merged copy rounds "
                f"W + BA once in {self.autocast} where the trainer's forward rounds W and adds BA, and the sampler's "
                "log-probs then miss the trainer's (tiny SD model: PPO clips 46% of the first pass's ratios instead "
                "of 0; python -m bench.merged_sampling). Use it in float32, or measure your model with python -m "
                "bench.gpu --merged-sampling (its sampling_mismatch) first"
            )
        return self


class RewardConfig(Block):
    BLOCK: ClassVar[str] = "reward"

    name: str = Field(
        "jpeg_compressibility",
        description="reward registry name (ctrl_core.rewards): "
        "jpeg_compressibility | jpeg_incompressibility | classifier | quadratic | weighted_sum | "
        "aesthetic | imagereward",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the reward factory")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .rewards import reward_names

        if v not in reward_names():
            raise ValueError(f"unknown reward {v!r}; choose one of {sorted(reward_names())}")
        return v

    @model_validator(mode="after")
    def _options_fit_the_factory(self):
        """reward.options must be keyword arguments of the reward factory (else it fails after value
        pretraining). Only non-empty options load the factory (and so torch): the defaults stay torch-free."""
        if self.options:
            from .rewards import reward_factory

            try:
                inspect.signature(reward_factory(self.name)).bind_partial(**self.options)
            except TypeError as err:
                raise ValueError(f"reward.options: {err} (reward {self.name!r})") from None
        return self


class ValueConfig(Block):
    BLOCK: ClassVar[str] = "value"

    candidates: list[str] = Field(list(LINK_NAMES), description="link functions to compare")
    num_paths: int = Field(256, ge=8, description="Monte-Carlo paths of the base model for value pretraining")
    steps: int = Field(20, ge=2, description="rollout step count for value data")
    points_per_path: int = Field(4, ge=1, description="random times per path in the value data")
    batch_size: int = Field(
        128, ge=1, description="paths sampled per batch (the data are checkpointed per batch)"
    )
    epochs: int = Field(10, ge=1, description="value pretraining epochs per candidate")
    lr: float = Field(1e-3, gt=0, description="value pretraining learning rate")
    residual: Literal["conv", "reward_copy"] = Field(
        "conv",
        description="F_phi: conv (a small CNN on the state and "
        "x_hat; latents for SD, no decode) | reward_copy (the paper's SD "
        "design: a copy of the reward model, partly frozen, on the "
        "decoded state)",
    )
    frozen_fraction: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="reward_copy: leading share of the copy's weights kept frozen (the authors: 70%)",
    )
    xhat_decoder: Literal["vae", "tiny"] = Field(
        "vae",
        description="latent checkpoints: decode x_hat for the value's "
        "RM(x_hat) with the full VAE or a tiny one (TAESD in the checkpoint's "
        "vae_tiny/); the terminal reward keeps the VAE",
    )

    @field_validator("candidates")
    @classmethod
    def _links(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one link function")
        bad = [c for c in v if c not in LINK_NAMES]
        if bad:
            raise ValueError(f"unknown link function(s) {bad}; choose from {sorted(LINK_NAMES)}")
        return v


class OptimizeConfig(Block):
    """Policy-optimisation settings: the ``optimize`` block, and the CTRL/DDPO trainer's configuration
    (``algorithms.OptimConfig``)."""

    BLOCK: ClassVar[str] = "optimize"

    algorithm: str = Field(
        "ctrl",
        description="ctrl | ddpo (ddpo-pytorch's recipe) | grpo (Flow-GRPO's, on this solver) | qlearning "
        "(trains from data; its settings: the qlearning block). Keys at -1 / auto take the algorithm's value",
    )
    iterations: int = Field(30, description="policy iterations")
    batch_size: int = Field(32, description="trajectories per iteration")
    train_steps: int = Field(20, description="step count of the rollout grid during training")
    time_sampling: str = Field(
        "random", description="random: a stratified random grid every iteration | grid: fixed uniform grid"
    )
    train_timesteps: int = Field(
        -1,
        description="K: time points per trajectory in the loss, a random subset of the stochastic steps; "
        "0: all of them; -1: the algorithm's (ctrl 8; ddpo and grpo all, as their authors train)",
    )
    solver: str = Field(
        "ddpm",
        description="stochastic rollout solver: ddpm | euler_maruyama | ddim (with eta > 0) "
        "| heun; sde and ode name ddpm and ddim",
    )
    eta: float = Field(
        -1.0,
        description="DDIM-family exploration level in [0, 1]; -1: the solver's default "
        "(ddpm 1, ddim 0). CTRL needs -1 or 1 (SDE exploration)",
    )
    beta: float = Field(
        0.01, description="KL weight β (Theorem 3.1 running reward); not qlearning.reward_weight"
    )
    kl_form: str = Field(
        "continuous",
        description="the KL running reward (and its direct term in the loss): continuous (Theorem 3.1's "
        "g^2/2 ||mu_theta - mu_pre||^2 Delta) | exact (the discrete chain's per-step Gaussian KL, "
        "B^2 ||mu_theta - mu_pre||^2 / (2 std^2): the KL the evaluation's kl_exact sums)",
    )
    advantage: str = Field(
        "finite_difference",
        description="finite_difference (the paper) | temporal_difference (the authors' code)",
    )
    fd_scale: float = Field(1.0, description="lam = sigma_bar / Delta of the finite-difference advantage")
    advantage_norm: str = Field("scale", description="scale | per_time | center | none")
    advantage_clip: float = Field(5.0, description="clip normalised advantages to +-this (0: no clipping)")
    clip_range: float = Field(
        -1.0,
        description="PPO ratio clip epsilon; -1: 0.2 with summed log-probs, 1e-4 with averaged ones "
        "(ddpo-pytorch's and Flow-GRPO's)",
    )
    log_prob_reduce: str = Field(
        "auto",
        description="the PPO ratio's log-probs: sum (the transition's exact log-density) | mean (over "
        "dimensions, as ddpo-pytorch and Flow-GRPO) | auto (ctrl sum; ddpo and grpo mean)",
    )
    ppo_epochs: int = Field(
        1,
        description="PPO passes over each iteration's paths (with 1 and minibatch_size = "
        "batch_size every update is at ratio 1: the clip never acts)",
    )
    minibatch_size: int = Field(
        -1,
        description="paths per optimiser step (of the global batch); -1: the algorithm's (ctrl 32; "
        "ddpo batch_size/4, grpo batch_size/2: ddpo-pytorch's 4 and Flow-GRPO's 2 optimiser steps per iteration)",
    )
    lr: float = Field(1e-3, description="policy (LoRA) learning rate")
    lr_decay: str = Field("cosine", description="cosine (to 10% of lr at the last iteration) | none")
    weight_decay: float = Field(0.0, description="AdamW weight decay of the adapter")
    max_grad_norm: float = Field(1.0, description="gradient-norm clip of the policy update")
    value_lr: float = Field(1e-3, description="value-net learning rate during policy optimisation")
    value_epochs: int = Field(2, description="value-net epochs per iteration on the fresh returns")
    value_batch_size: int = Field(256, description="value-net minibatch size")
    value_xhat: str = Field(
        "pretrained", description="Tweedie x_hat in the value skip term from: pretrained | policy (eq. 19)"
    )
    checkpoint_every: int = Field(
        10, description="resumable checkpoint (+ adapter snapshot) every N iterations (0: only at the end)"
    )
    on_nonfinite: str = Field(
        "error",
        description="a NaN/inf reward, loss or gradient: error (stop the step) | skip (drop the iteration)",
    )
    max_skipped: int = Field(3, description="with on_nonfinite=skip: stop after this many dropped iterations")
    reward_chunks: int = Field(
        1,
        description="sample each rank's rows in this many blocks, scoring one in a thread "
        "while the next samples",
    )
    kl_monitor: bool = Field(
        True,
        description="compute mu_pre at the K steps to log the KL even where nothing else "
        "needs it (DDPO; CTRL at beta 0 with value_xhat policy)",
    )
    old_log_probs: str = Field(
        "sampler",
        description="PPO's pi_old: sampler (recorded while sampling) | trainer "
        "(recomputed by the update's forward: K forwards more, ratios exactly 1 at the start)",
    )
    stat_buffer: int = Field(
        16,
        description="DDPO: whiten by each condition's last N rewards across iterations "
        "(ddpo-pytorch's 16); 0: within the batch",
    )
    stat_min_count: int = Field(
        16, description="DDPO with stat_buffer > 0: batch statistics until a condition has this many rewards"
    )
    group_size: int = Field(
        8,
        description="GRPO: G rollouts per condition (batch_size / G conditions per iteration), advantage "
        "(r - group mean) / (group std + 1e-4)",
    )
    grpo_kl: float = Field(
        0.04,
        description="GRPO: weight of the KL-to-reference loss, per step ||mean_theta - mean_ref||^2 / "
        "(2 std^2) averaged over dimensions (Flow-GRPO's beta; not optimize.beta)",
    )
    seed: int = Field(0, description="seed of the trainer's generator (rollouts, grids, minibatches)")

    def resolved(self) -> "OptimizeConfig":
        """The settings the trainer runs: every -1 / auto replaced by the algorithm's value. CTRL's are the values
        these keys had before they could be -1 (so a CTRL run is unchanged); DDPO's and GRPO's are ddpo-pytorch's
        and Flow-GRPO's: every stochastic step trained, log-probs averaged over dimensions with their clip range,
        and several optimiser steps per iteration."""
        ctrl = self.algorithm == "ctrl"
        reduce = self.log_prob_reduce if self.log_prob_reduce != "auto" else ("sum" if ctrl else "mean")
        per_iteration = {"ddpo": 4, "grpo": 2}.get(self.algorithm)
        minibatch = 32 if per_iteration is None else max(1, -(-self.batch_size // per_iteration))
        return self.model_copy(
            update={
                "log_prob_reduce": reduce,
                "clip_range": self.clip_range if self.clip_range > 0 else (0.2 if reduce == "sum" else 1e-4),
                "train_timesteps": self.train_timesteps if self.train_timesteps >= 0 else (8 if ctrl else 0),
                "minibatch_size": self.minibatch_size if self.minibatch_size > 0 else minibatch,
            }
        )

    def _checks(self) -> list[tuple[str, bool, str]]:
        solvers = sorted(SOLVERS + tuple(SOLVER_ALIASES))
        return [
            ("algorithm", self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}"),
            ("advantage", self.advantage in ADVANTAGES, f"one of {ADVANTAGES}"),
            ("kl_form", self.kl_form in KL_FORMS, f"one of {KL_FORMS}"),
            ("advantage_norm", self.advantage_norm in NORMALISATIONS, f"one of {NORMALISATIONS}"),
            ("time_sampling", self.time_sampling in TIME_SAMPLING, f"one of {TIME_SAMPLING}"),
            ("solver", self.solver in solvers, f"one of {solvers}"),
            ("value_xhat", self.value_xhat in ("policy", "pretrained"), "policy or pretrained"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("on_nonfinite", self.on_nonfinite in ("error", "skip"), "error or skip"),
            ("max_skipped", self.max_skipped >= 0, ">= 0"),
            ("lr_decay", self.lr_decay in ("cosine", "none"), "cosine or none"),
            ("iterations", self.iterations >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 2, ">= 2"),
            ("train_steps", self.train_steps >= 2, ">= 2"),
            ("train_timesteps", self.train_timesteps >= -1, ">= 0, or -1 (the algorithm's)"),
            ("beta", self.beta >= 0, ">= 0"),
            ("eta", self.eta == -1.0 or 0.0 <= self.eta <= 1.0, "in [0, 1] or -1"),
            # Theorem 3.1's KL rate g^2/2 ||dmu||^2 holds for the SDE (eta = 1); a DDIM-eta<1 rollout follows
            # another SDE whose path KL is not that integral, so CTRL refuses it
            (
                "eta",
                self.algorithm != "ctrl" or self.eta in (-1.0, 1.0),
                "-1 or 1 for CTRL (SDE exploration)",
            ),
            ("fd_scale", self.fd_scale > 0, "> 0"),
            ("clip_range", self.clip_range > 0 or self.clip_range == -1.0, "> 0, or -1 (the algorithm's)"),
            ("log_prob_reduce", self.log_prob_reduce in LOG_PROB_REDUCTIONS, f"one of {LOG_PROB_REDUCTIONS}"),
            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"),
            (
                "minibatch_size",
                self.minibatch_size >= 1 or self.minibatch_size == -1,
                ">= 1, or -1 (the algorithm's)",
            ),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),  # a negative norm flips the gradient's sign
            ("advantage_clip", self.advantage_clip >= 0, ">= 0 (0: no clipping)"),
            ("value_lr", self.value_lr > 0, "> 0"),
            ("value_batch_size", self.value_batch_size >= 1, ">= 1"),
            (
                "reward_chunks",
                1 <= self.reward_chunks <= self.batch_size,
                "between 1 and optimize.batch_size",
            ),
            ("old_log_probs", self.old_log_probs in ("sampler", "trainer"), "sampler or trainer"),
            ("stat_buffer", self.stat_buffer >= 0, ">= 0"),
            ("stat_min_count", self.stat_min_count >= 2, ">= 2"),
            (
                "stat_min_count",
                self.stat_buffer == 0 or self.stat_min_count <= self.stat_buffer,
                "<= optimize.stat_buffer (otherwise the per-prompt statistics are never used)",
            ),
            ("group_size", self.group_size >= 2, ">= 2 (a group's std needs two rewards)"),
            (
                "group_size",
                self.algorithm != "grpo" or self.batch_size % self.group_size == 0,
                f"a divisor of optimize.batch_size ({self.batch_size}) for GRPO: each iteration samples "
                "batch_size / group_size conditions, group_size rollouts each",
            ),
            ("grpo_kl", self.grpo_kl >= 0, ">= 0"),
        ]


class QLearningConfig(Block):
    """The q-learning trainer's settings (arXiv 2409.04832; ``qlearning.QLearningTrainer``)."""

    BLOCK: ClassVar[str] = "qlearning"

    iterations: int = Field(40, description="q-learning iterations (one batch of rollouts each)")
    batch_size: int = Field(32, description="paths per iteration")
    train_steps: int = Field(20, description="rollout steps K on [s_min, s_start]")
    train_timesteps: int = Field(
        0, description="steps per path in the actor update, a random subset (0: all K)"
    )
    time_sampling: str = Field(
        "random", description="random: stratified random grid each iteration | grid: fixed uniform grid"
    )
    rollout_solver: str = Field(
        "ddpm", description="ddpm | euler_maruyama (SDE dynamics) | ddim (probability-flow ODE dynamics)"
    )
    s_min: float = Field(
        1e-3, description="forward time where rollouts stop and h is evaluated (the score blows up at s = 0)"
    )
    reward_weight: float = Field(
        2.0,
        description="the paper's β: the weight of the reward, p* ∝ p_data exp(β h); 0 "
        "reproduces the data (not optimize.beta, CTRL's KL weight)",
    )
    theta: float = Field(0.1, description="entropy temperature θ; policy covariance θ / g^2(T - t)")
    ratio_samples: int = Field(
        0, description="m data samples per score ratio estimate (0: the whole data set)"
    )
    critic_target: str = Field(
        "monte_carlo",
        description="td: orthogonality with xi = dJ/dTheta (TD(0)) | monte_carlo: martingale loss",
    )
    critic: str = Field(
        "linked",
        description="linked: CTRL's value net, β h(x_hat) + F, as the critic "
        "(LinkedCritic) | free: a residual net alone",
    )
    value_terms: str = Field(
        "reward", description="reward: J carries β h only | full: J also carries r_hat - q (the paper)"
    )
    critic_warmup: int = Field(
        0, description="iterations before the actor uses the critic (the critic trains from the start)"
    )
    baseline: str = Field(
        "counterfactual", description="counterfactual (same Brownian increment, mean action) | none"
    )
    test_weight: str = Field(
        "eps", description="eps: w = sigma^2 / (θ g^2 Delta) | uniform: the paper's w = 1"
    )
    delta_clip: float = Field(
        5.0, description="clip the actor's delta at +-this many of its per-step std (0: no clipping)"
    )
    lr: float = Field(1e-3, description="actor (mu_psi) learning rate, Adam")
    critic_lr: float = Field(1e-3, description="critic (J_Theta) learning rate, Adam")
    actor_epochs: int = Field(2, description="actor passes over each batch's (step, path) pairs")
    critic_epochs: int = Field(2, description="critic passes over each batch's (step, path) pairs")
    minibatch_size: int = Field(1024, description="(step, path) pairs per gradient step (0: all of them)")
    lr_decay: str = Field("cosine", description="cosine (to 10% at the last iteration) | none")
    max_grad_norm: float = Field(1.0, description="gradient-norm clip of the critic and actor updates")
    seed: int = Field(0, description="seed of the trainer's generator (rollouts, grids, minibatches)")

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("iterations", self.iterations >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 2, ">= 2"),
            ("train_steps", self.train_steps >= 2, ">= 2"),
            ("train_timesteps", self.train_timesteps >= 0, ">= 0"),
            ("time_sampling", self.time_sampling in TIME_SAMPLING, f"one of {TIME_SAMPLING}"),
            ("rollout_solver", self.rollout_solver in ROLLOUT_SOLVERS, f"one of {ROLLOUT_SOLVERS}"),
            ("s_min", 0.0 < self.s_min < 0.5, "in (0, 0.5)"),
            ("reward_weight", self.reward_weight >= 0, ">= 0 (the reward weight; 0 reproduces the data)"),
            ("theta", self.theta > 0, "> 0"),
            ("ratio_samples", self.ratio_samples >= 0, ">= 0"),
            ("critic_target", self.critic_target in CRITIC_TARGETS, f"one of {CRITIC_TARGETS}"),
            ("critic", self.critic in CRITICS, f"one of {CRITICS}"),
            ("value_terms", self.value_terms in VALUE_TERMS, f"one of {VALUE_TERMS}"),
            ("critic_warmup", self.critic_warmup >= 0, ">= 0"),
            ("baseline", self.baseline in BASELINES, f"one of {BASELINES}"),
            ("test_weight", self.test_weight in TEST_WEIGHTS, f"one of {TEST_WEIGHTS}"),
            ("delta_clip", self.delta_clip >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("critic_lr", self.critic_lr > 0, "> 0"),
            ("actor_epochs", self.actor_epochs >= 1, ">= 1"),
            ("critic_epochs", self.critic_epochs >= 1, ">= 1"),
            ("minibatch_size", self.minibatch_size >= 0, ">= 0"),
            ("lr_decay", self.lr_decay in ("cosine", "none"), "cosine or none"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
        ]


class QLearningParams(QLearningConfig):
    """The ``qlearning`` block (used when optimize.algorithm is qlearning): the trainer's settings plus where
    the actor and the data come from (``steps.qlearning_setup``)."""

    start: Literal["scratch", "pretrained"] = Field(
        "scratch",
        description="scratch: a new network trained from the "
        "data alone | pretrained: LoRA on the fetched checkpoint's model",
    )
    data: str = Field(
        "",
        description="data set: a .safetensors file with 'data' (N, ...) and optional 'labels' "
        "(N,); empty: data.safetensors in the fetched checkpoint folder, or the built-in digits data "
        "for builtin:digits",
    )
    width: int = Field(64, ge=4, description="width of the from-scratch network")

    def trainer_config(self) -> QLearningConfig:
        """The trainer's settings alone."""
        return QLearningConfig.model_validate(self.model_dump(include=set(QLearningConfig.model_fields)))


class EvaluateConfig(Block):
    BLOCK: ClassVar[str] = "evaluate"

    steps: list[int] = Field([10, 20, 50], description="sampling step counts to evaluate")
    samplers: list[Literal["sde", "ode", "euler_maruyama", "heun"]] = Field(
        ["sde", "ode"],
        min_length=1,
        description="solvers to sample with, each at its default eta: sde (DDPM) | ode "
        "(DDIM) | euler_maruyama (SDE) | heun (probability-flow ODE, second order: two model evaluations per step, "
        "so a heun cell costs about twice an ode cell of the same step count). kl_exact is reported for the "
        "stochastic ones (sde, euler_maruyama)",
    )
    num_samples: int = Field(200, ge=2, description="samples per (sampler, steps) cell")
    seed: int = Field(1234, description="evaluation seed (same noise and conditions for base and tuned)")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("the step list must not be empty")
        if any(n < 1 for n in v):
            raise ValueError("every step count must be >= 1")
        return v

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError(f"a sampler is named twice: {v}")
        return v


class RegisterConfig(Block):
    BLOCK: ClassVar[str] = "register"

    model_name: str = Field("ctrl-digits", description="MLflow registered model name")
    min_gain: float = Field(0.0, description="gate: gain over base required at every evaluated cell")
    require_no_worse_than_champion: bool = Field(True, description="gate: compare with the current champion")
    tolerance: float = Field(0.0, ge=0, description="gate: allowed shortfall vs the champion per cell")


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)  # ABCMeta.register


class Params(BaseModel):
    """params.yaml: one block per pipeline step."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run: RunConfig = Field(default_factory=RunConfig, description="the run: name, seed, resume")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="the base model to fetch"
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="the adapter and the UNet's execution"
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="the reward (a registry name)")
    value: ValueConfig = Field(default_factory=ValueConfig, description="value-function pretraining")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig, description="policy optimisation")
    qlearning: QLearningParams = Field(default_factory=QLearningParams, description="q-learning from data")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="evaluation of base vs tuned"
    )
    register: RegisterConfig = Field(default_factory=RegisterConfig, description="registration and its gate")

    def optim_config(self) -> OptimizeConfig:
        """The CTRL/DDPO trainer's configuration (the optimize block itself)."""
        return self.optimize

    def qlearning_config(self) -> QLearningConfig:
        """The q-learning trainer's configuration (the qlearning block less where the actor and data come from)."""
        return self.qlearning.trainer_config()

    def digest(self) -> str:
        """A stable hash of the parameters (lineage, idempotent registration)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


BLOCKS = tuple(Params.model_fields)


# --- the documented table (``ctrl params``, docs/params.md) -------------------------------------------------
class Row(typing.NamedTuple):
    key: str  # block.key
    type: str
    default: Any
    description: str


def type_name(annotation: Any) -> str:
    """int, float, bool, str, list[int], 'a' | 'b' (a Literal), dict."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict or annotation is dict:
        return "dict"
    return annotation.__name__


def rows(params: Params | None = None) -> list[Row]:
    """Every parameter: key, type, default (``params``' value when given) and description."""
    params = params or Params()
    return [
        Row(
            f"{block}.{key}",
            type_name(f.annotation),
            getattr(getattr(params, block), key),
            f.description or "",
        )
        for block, bf in Params.model_fields.items()
        for key, f in bf.annotation.model_fields.items()
    ]


def _shown(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def markdown_table(params: Params | None = None) -> str:
    """docs/params.md's table (a test keeps the committed file equal to this)."""

    def cell(text: str, code: bool = False) -> str:  # a table cell: | escaped; < as an entity outside code
        text = text.replace("|", "\\|")
        return f"`{text}`" if code else text.replace("<", "&lt;")

    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [
        f"| {cell(r.key, True)} | {cell(r.type)} | {cell(_shown(r.default), True)} | {cell(r.description)} |"
        for r in rows(params)
    ]
    return "\n".join(lines) + "\n"


def text_table(params: Params | None = None, width: int = 110) -> str:
    """``ctrl params``: one line per key (key, type, default), its description wrapped below."""
    import textwrap

    table = rows(params)
    kw = max(len(r.key) for r in table)
    tw = min(max(len(r.type) for r in table), 20)  # a long Literal overflows its column
    out = [f"{'key':<{kw}}  {'type':<{tw}}  default", ""]
    for r in table:
        out.append(f"{r.key:<{kw}}  {r.type:<{tw}}  {_shown(r.default)}")
        out += textwrap.wrap(r.description, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(out) + "\n"
