"""params.yaml: the one source of run parameters, validated before any heavy work.

One block per pipeline step. Every field is declared once here (the ``optimize`` block is generated from
``algorithms.OptimConfig``); the CLI's ``--set block.key=value``, the KFP pipeline parameters
(``block__key``) and dvc.yaml's ``params:`` are all derived from this schema. Errors name the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .algorithms import OptimConfig


class ParamsError(ValueError):
    """Invalid parameters; the message names every offending key."""


class _Block(BaseModel):
    # allow_inf_nan=False: a NaN/inf parameter (tolerance=.inf waves every model through the gate,
    # max_grad_norm=.nan poisons the weights) is rejected here rather than discovered after hours of training
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunParams(_Block):
    name: str = Field("ctrl-digits", description="experiment name (MLflow experiment, output folder)")
    seed: int = Field(0, description="global seed")
    resume: bool = Field(True, description="resume a step from the latest checkpoint of the same run (same params and inputs)")
    checkpoint_root: str = Field("", description="folder for resumable step checkpoints (a PVC on Kubernetes); empty: CTRL_CHECKPOINT_ROOT or .ctrl-checkpoints")


class CheckpointParams(_Block):
    source: str = Field("builtin:digits", description="builtin:<name> | local path | s3://bucket/key | hf:org/name")
    sha256: str = Field("", description="expected sha256 of the checkpoint (empty: not checked)")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower().removeprefix("sha256:")
        if v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 64 hex digits or empty")
        return v


class ModelParams(_Block):
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank of the adapter on the UNet")
    prompts: str = Field("", description="latent text-to-image checkpoints: prompt file, one prompt per line (empty: prompts.txt in the checkpoint folder)")
    guidance_scale: float = Field(7.0, ge=0, le=100, description="latent text-to-image checkpoints: classifier-free guidance scale w (1: no guidance)")
    autocast: Literal["", "bf16", "fp16"] = Field("", description="latent text-to-image checkpoints: run the UNet under bf16/fp16 autocast (empty: float32)")
    gradient_checkpointing: bool = Field(False, description="latent text-to-image checkpoints: recompute UNet activations in the backward pass (memory for time)")
    compile: Literal["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field("", description="torch.compile the UNet with this mode (reduce-overhead: CUDA graphs); empty: eager. Compiling takes minutes per batch shape")
    channels_last: bool = Field(False, description="NHWC memory format for the UNet (measure first: slower for SD1.5 in eager mode on an H100)")
    merged_sampling: bool = Field(False, description="sample rollouts through a copy of the UNet with the LoRA merged into its weights and q/k/v fused (SD UNets); training forwards and mu_pre keep the LoRA model. float32 only: with model.autocast the sampler's log-probs miss the trainer's (bench.merged_sampling)")

    @field_validator("prompts")
    @classmethod
    def _prompt_file(cls, v: str) -> str:
        v = v.strip()
        if v and not v.endswith(".txt"):
            raise ValueError("must be a .txt file (one prompt per line) or empty")
        return v


class RewardParams(_Block):
    name: str = Field("jpeg_compressibility", description="reward registry name (ctrl_core.rewards)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the reward factory")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .rewards import REWARDS

        if v not in REWARDS:
            raise ValueError(f"unknown reward {v!r}; choose one of {sorted(REWARDS)}")
        return v


class ValueParams(_Block):
    candidates: list[str] = Field(["cos_sin", "linear", "rm_only", "f_only"], description="link functions to compare")
    num_paths: int = Field(256, ge=8, description="Monte-Carlo paths of the base model for value pretraining")
    steps: int = Field(20, ge=2, description="rollout step count for value data")
    points_per_path: int = Field(4, ge=1, description="random times per path in the value data")
    batch_size: int = Field(128, ge=1, description="paths sampled per batch (the data are checkpointed per batch)")
    epochs: int = Field(10, ge=1, description="value pretraining epochs per candidate")
    lr: float = Field(1e-3, gt=0, description="value pretraining learning rate")
    residual: Literal["conv", "reward_copy"] = Field("conv", description="F_phi: conv (a small CNN on the state and x_hat; latents for SD, no decode) | reward_copy (the paper's SD design: a copy of the reward model, partly frozen, on the decoded state)")
    frozen_fraction: float = Field(0.7, ge=0, lt=1, description="reward_copy: leading share of the copy's weights kept frozen (the authors: 70%)")
    xhat_decoder: Literal["vae", "tiny"] = Field("vae", description="latent checkpoints: decode x_hat for the value's RM(x_hat) with the full VAE or a tiny one (TAESD in the checkpoint's vae_tiny/); the terminal reward keeps the VAE")

    @field_validator("candidates")
    @classmethod
    def _links(cls, v: list[str]) -> list[str]:
        from .value import LINKS

        if not v:
            raise ValueError("name at least one link function")
        bad = [c for c in v if c not in LINKS]
        if bad:
            raise ValueError(f"unknown link function(s) {bad}; choose from {sorted(LINKS)}")
        return v


class EvaluateParams(_Block):
    steps: list[int] = Field([25, 50, 100], description="sampling step counts to evaluate")
    samplers: list[Literal["sde", "ode"]] = Field(["sde", "ode"], min_length=1, description="sde (DDPM) and/or ode (DDIM)")
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


class RegisterParams(_Block):
    model_name: str = Field("ctrl-digits", description="MLflow registered model name")
    min_gain: float = Field(0.0, description="gate: gain over base required at every evaluated cell")
    require_no_worse_than_champion: bool = Field(True, description="gate: compare with the current champion")
    tolerance: float = Field(0.0, ge=0, description="gate: allowed shortfall vs the champion per cell")


def _optimize_block() -> type[_Block]:
    fields = {}
    for f in dataclasses.fields(OptimConfig):
        fields[f.name] = (f.type if not isinstance(f.type, str) else eval(f.type), f.default)  # noqa: S307
    return create_model("OptimizeParams", __base__=_Block, **fields)


OptimizeParams = _optimize_block()


def _qlearning_block() -> type[_Block]:
    """The q-learning settings (used when optimize.algorithm is qlearning), generated from QLearningConfig plus
    where the actor and the data come from."""
    from .qlearning import QLearningConfig

    fields: dict[str, Any] = {
        "start": (Literal["scratch", "pretrained"], Field("scratch", description="scratch: a new network trained "
                  "from the data alone | pretrained: LoRA on the fetched checkpoint's model")),
        "data": (str, Field("", description="data set: a .safetensors file with 'data' (N, ...) and optional "
                 "'labels' (N,); empty: data.safetensors in the fetched checkpoint folder, or the built-in "
                 "digits data for builtin:digits")),
        "width": (int, Field(64, ge=4, description="width of the from-scratch network")),
    }
    for f in dataclasses.fields(QLearningConfig):
        fields[f.name] = (f.type if not isinstance(f.type, str) else eval(f.type), f.default)  # noqa: S307
    return create_model("QLearningParams", __base__=_Block, **fields)


QLearningParams = _qlearning_block()


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Block):
    run: RunParams = Field(default_factory=RunParams)
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    model: ModelParams = Field(default_factory=ModelParams)
    reward: RewardParams = Field(default_factory=RewardParams)
    value: ValueParams = Field(default_factory=ValueParams)
    optimize: OptimizeParams = Field(default_factory=OptimizeParams)  # type: ignore[valid-type]
    qlearning: QLearningParams = Field(default_factory=QLearningParams)  # type: ignore[valid-type]
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    register: RegisterParams = Field(default_factory=RegisterParams)

    def optim_config(self) -> OptimConfig:
        return OptimConfig(**self.optimize.model_dump())

    def qlearning_config(self):
        from .qlearning import QLearningConfig

        extra = ("start", "data", "width")
        return QLearningConfig(**{k: v for k, v in self.qlearning.model_dump().items() if k not in extra})

    def digest(self) -> str:
        """A stable hash of the parameters (lineage, idempotent registration)."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


BLOCKS = tuple(Params.model_fields)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "invalid parameters:\n  " + "\n  ".join(lines)


def validate(raw: dict) -> Params:
    """Validate a nested dict; raises ParamsError naming every bad key (also OptimConfig's own checks)."""
    if not isinstance(raw, dict):
        raise ParamsError("params must be a mapping of blocks (run, checkpoint, model, ...)")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err)) from None
    try:
        params.optim_config()
    except ValueError as err:
        raise ParamsError(f"invalid parameters:\n  {err}".replace(" must be", ": must be", 1)) from None
    try:
        params.qlearning_config()
    except ValueError as err:
        msg = str(err).replace("optimize.", "qlearning.", 1).replace(" must be", ": must be", 1)
        raise ParamsError(f"invalid parameters:\n  {msg}") from None
    _check_optimize_extras(params.optimize)
    _check_reward_options(params.reward)
    _check_model(params.model)
    return params


def _check_model(m) -> None:
    if m.merged_sampling and m.autocast:
        raise ParamsError(
            "invalid parameters:\n  model.merged_sampling: must be false with model.autocast="
            f"{m.autocast}: a merged copy rounds W + BA once in {m.autocast} where the trainer's forward rounds W and "
            "adds BA, and the sampler's log-probs then miss the trainer's (tiny SD model: PPO clips 46% of the first "
            "pass's ratios instead of 0; python -m bench.merged_sampling). Use it in float32, or measure your model "
            "with python -m bench.gpu --merged-sampling (its sampling_mismatch) first"
        )


def _check_reward_options(r) -> None:
    """reward.options must be keyword arguments of the reward factory (else it fails after value pretraining)."""
    import inspect

    from .rewards import REWARDS

    try:
        inspect.signature(REWARDS[r.name]).bind_partial(**r.options)
    except TypeError as err:
        raise ParamsError(f"invalid parameters:\n  reward.options: {err} (reward {r.name!r})") from None


def _check_optimize_extras(o) -> None:
    """Checks OptimConfig does not make itself, which would otherwise fail (or silently misbehave) mid-run."""
    from .policy import SOLVER_ALIASES, SOLVERS

    solvers = sorted(SOLVERS + tuple(SOLVER_ALIASES))
    checks = [
        ("solver", o.solver in solvers, f"one of {solvers}"),
        ("max_grad_norm", o.max_grad_norm > 0, "> 0"),  # a negative norm flips the gradient's sign
        ("weight_decay", o.weight_decay >= 0, ">= 0"),
        ("advantage_clip", o.advantage_clip >= 0, ">= 0 (0: no clipping)"),
    ]
    bad = [f"optimize.{name}: must be {want}, got {getattr(o, name)!r}" for name, ok, want in checks if not ok]
    if bad:
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(bad))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optimize.beta=0.1' -> (['optimize', 'beta'], 0.1); values are YAML (lists, numbers, booleans)."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected block.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ParamsError(f"--set {item!r}: the key must be block.key (e.g. optimize.beta)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {key}: cannot parse value {text!r}: {err}") from None
    return path, value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml (or the defaults when path is None), apply ``--set`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{p}: not valid YAML: {err}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {'.'.join(keys)}: {k} is not a block")
        node[keys[-1]] = value
    return validate(raw)


# --- flat form: KFP pipeline parameters ---------------------------------------------------------------
SEP = "__"


def flatten(params: Params) -> dict[str, Any]:
    """{'optimize__beta': 0.01, ...}: identifiers usable as KFP pipeline parameter names."""
    return {f"{block}{SEP}{key}": value for block, fields in params.model_dump().items() for key, value in fields.items()}


def unflatten(flat: dict[str, Any]) -> Params:
    """Inverse of ``flatten``, tolerant of KFP's string-typed values inside dict inputs."""
    raw: dict[str, dict] = {}
    for name, value in flat.items():
        if SEP not in name:
            raise ParamsError(f"{name}: not a block{SEP}key parameter")
        block, key = name.split(SEP, 1)
        raw.setdefault(block, {})[key] = _decode(value)
    return validate(raw)


def from_json(text: str) -> Params:
    """The nested JSON document the pipeline's resolve_params task hands to every step."""
    return validate(json.loads(text))


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{" or text in ("true", "false", "null", "None"):
            try:
                return json.loads(text) if text != "None" else None
            except json.JSONDecodeError:
                return value
    return value


def kfp_parameter_types(params: Params) -> dict[str, type]:
    """Python types of the flat parameters, as KFP pipeline parameter annotations."""
    out = {}
    for name, value in flatten(params).items():
        out[name] = bool if isinstance(value, bool) else int if isinstance(value, int) else float if isinstance(value, float) \
            else list if isinstance(value, list) else dict if isinstance(value, dict) else str
    return out
