"""Ready-made pieces for the embedded default (and the analytic problem): policy, value net, data for value
pretraining. The pipeline steps and the benchmarks build on these, so every entry point trains the same way."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .algorithms import OptimConfig, Trainer
from .distributed import Dist
from .models import AffineCorrection, DiffusersScoreModel, GaussianScoreModel, compute_device
from .policy import GaussianScorePolicy, sample, x_hat
from .problem import Problem
from .schedule import DiscreteVPSchedule, LinearVPSchedule
from .value import ConvResidual, LinkSelection, MLPResidual, ValueDataset, ValueFunction, select_link


def digits_problem(lora_rank: int = 8, solver: str = "ddpm", weights_dir=None) -> Problem:
    """The embedded default: the shipped class-conditional digits DDPM with a fresh LoRA adapter."""
    from .embedded import IMAGE_SIZE, NUM_CLASSES, WEIGHTS_DIR, load_builtin_unet

    unet, scheduler = load_builtin_unet(WEIGHTS_DIR if weights_dir is None else weights_dir)
    schedule = DiscreteVPSchedule.from_scheduler(scheduler)
    model = DiffusersScoreModel(unet, schedule, scheduler.config.prediction_type, lora_rank=lora_rank)
    model.to(compute_device())
    return Problem(
        policy=GaussianScorePolicy(model, solver),
        x_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        condition_sampler=lambda n, g: torch.randint(0, NUM_CLASSES, (n,), generator=g),
        eval_conditions=lambda n: torch.arange(n) % NUM_CLASSES,  # balanced, fixed
        make_residual=lambda: ConvResidual(channels=1, width=32, num_classes=NUM_CLASSES),
    )


def checkpoint_problem(
    checkpoint_dir,
    lora_rank: int = 8,
    solver: str = "ddpm",
    prompts: str = "",
    guidance_scale: float = 7.0,
    autocast: str = "",
    gradient_checkpointing: bool = False,
    compile: str = "",
    channels_last: bool = False,
    merged_sampling: bool = False,
) -> Problem:
    """See ``_load_checkpoint_problem``; ``compile`` (a torch.compile mode, "" for eager), ``channels_last`` and
    ``merged_sampling`` (rollouts through a LoRA-merged copy of the UNet in the autocast dtype:
    ``DiffusersScoreModel.enable_merged_sampling``) apply to the UNet of any of these checkpoints."""
    problem = _load_checkpoint_problem(
        checkpoint_dir, lora_rank, solver, prompts, guidance_scale, autocast, gradient_checkpointing
    )
    model = problem.policy.model
    if channels_last:
        model.use_channels_last()
    if compile:
        model.compile_unet(compile)
        if hasattr(problem, "compile_decoders"):
            problem.compile_decoders(compile)
    if merged_sampling:
        model.enable_merged_sampling(getattr(model, "autocast_dtype", None))
    return problem


def _load_checkpoint_problem(
    checkpoint_dir,
    lora_rank: int,
    solver: str,
    prompts: str,
    guidance_scale: float,
    autocast: str,
    gradient_checkpointing: bool,
) -> Problem:
    """A fetched checkpoint folder: the built-in digits format (digits_config.json), a latent text-to-image
    Stable Diffusion folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; prompts from ``prompts`` or the
    folder's prompts.txt, classifier-free guidance ``guidance_scale``; see latent.py) or a diffusers pipeline
    folder with ``unet/`` and ``scheduler/`` (a class-conditional or unconditional pixel UNet2DModel)."""
    from pathlib import Path

    d = Path(checkpoint_dir)
    latent = (d / "vae").is_dir() and (d / "text_encoder").is_dir()
    if (autocast or gradient_checkpointing) and not latent:
        raise ValueError("model.autocast and model.gradient_checkpointing apply to latent text-to-image (Stable "
                         f"Diffusion) checkpoints; {d} is not one: leave them at their defaults")  # fmt: skip
    if (d / "digits_config.json").is_file():
        return digits_problem(lora_rank, solver, weights_dir=d)
    if latent:
        from .latent import sd_folder_problem

        return sd_folder_problem(
            d,
            lora_rank,
            solver,
            prompts_file=prompts,
            guidance_scale=guidance_scale,
            autocast=autocast,
            gradient_checkpointing=gradient_checkpointing,
        )
    if (d / "unet" / "config.json").is_file():
        from diffusers import DDPMScheduler, UNet2DModel

        from .io import UNSAFE_WEIGHT_SUFFIXES, require_safetensors

        for f in (d / "unet").glob("*"):
            if f.suffix.lower() in UNSAFE_WEIGHT_SUFFIXES:
                raise ValueError(f"{f}: refusing non-safetensors weights")
        require_safetensors(d / "unet" / "diffusion_pytorch_model.safetensors")
        unet = UNet2DModel.from_pretrained(d / "unet", use_safetensors=True).eval()
        scheduler = DDPMScheduler.from_pretrained(d / "scheduler")
        schedule = DiscreteVPSchedule.from_scheduler(scheduler)
        model = DiffusersScoreModel(unet, schedule, scheduler.config.prediction_type, lora_rank=lora_rank)
        model.to(compute_device())
        n_cls = unet.config.num_class_embeds or 0
        size, ch = unet.config.sample_size, unet.config.in_channels
        return Problem(
            policy=GaussianScorePolicy(model, solver),
            x_shape=(ch, size, size),
            condition_sampler=(lambda n, g: torch.randint(0, n_cls, (n,), generator=g))
            if n_cls
            else (lambda n, g: None),
            eval_conditions=(lambda n: torch.arange(n) % n_cls) if n_cls else (lambda n: None),
            make_residual=lambda: ConvResidual(channels=ch, width=32, num_classes=n_cls),
        )
    raise ValueError(
        f"{d}: not a checkpoint this pipeline can load (expected digits_config.json or unet/config.json)"
    )


def gaussian_problem(
    data_mean: Tensor, data_std: Tensor, solver: str = "euler_maruyama", hidden: int = 64
) -> Problem:
    """Gaussian data with its exact score plus a learned affine correction (the tilted-Gaussian problem)."""
    schedule = LinearVPSchedule()
    dim = int(torch.as_tensor(data_mean).numel())
    model = GaussianScoreModel(schedule, data_mean, data_std, AffineCorrection(dim, hidden))
    return Problem(
        policy=GaussianScorePolicy(model, solver),
        x_shape=(dim,),
        condition_sampler=lambda n, g: None,
        eval_conditions=lambda n: None,
        make_residual=lambda: MLPResidual(dim),
    )


@torch.no_grad()
def collect_value_data(
    problem: Problem,
    reward_fn: Callable,
    num_paths: int,
    steps: int,
    points_per_path: int,
    seed: int = 0,
    batch_size: int = 128,
    resume: dict | None = None,
    on_batch: Callable[[dict], None] | None = None,
    dist: Dist | None = None,
    value_reward_fn: Callable | None = None,
) -> ValueDataset:
    """Monte-Carlo returns of the current policy at random times: (s, x_s, c, x_hat, RM(x_hat), RM(X_T)).

    ``value_reward_fn`` computes RM(x_hat), the value's skip term (default ``reward_fn``; a latent model may
    decode x_hat with a cheaper decoder there, see value.xhat_decoder); the returns always use ``reward_fn``.

    The returns carry no KL term: the data come from the policy that the value net will first serve, whose
    KL to itself is zero (CTRL's own iterations then add the KL running reward).

    Resumable: after each batch ``on_batch`` receives a state (the batches so far, the generator, the next path
    index); passing that state back as ``resume`` continues with bitwise the same data as an unbroken run.

    With ``dist`` each rank samples its rows of every batch (the random numbers are those of the whole batch)
    and every rank ends with the whole data set, in the one-process order."""
    dist = dist or Dist()
    if num_paths % dist.world or batch_size % dist.world:
        raise ValueError(
            f"value.num_paths ({num_paths}) and value.batch_size ({batch_size}) must be multiples of "
            f"the number of processes ({dist.world})"
        )
    pol, g = problem.policy, torch.Generator().manual_seed(seed)
    parts, start = [], 0
    if resume is not None:
        g.set_state(resume["generator"])
        parts, start = [ValueDataset(**d) for d in resume["parts"]], int(resume["next"])
    for j in range(start, num_paths, batch_size):
        n = min(batch_size, num_paths - j)
        rows = dist.shard(n)
        grid = pol.schedule.random_time_grid(steps, g)
        c = problem.condition_sampler(n, g)
        c = None if c is None else c[rows]
        x0 = torch.randn((n, *problem.x_shape), generator=g)[rows]
        traj = sample(pol, x0, c, grid, g, noise_rows=None if dist.world == 1 else (n, rows))
        h = reward_fn(traj.sample, c).float()
        ks = torch.randperm(steps, generator=g)[:points_per_path].tolist()
        for k in ks:
            s_vec = torch.full((len(x0),), float(grid[k]), dtype=torch.float64)
            xh = x_hat(pol.schedule, s_vec, traj.states[k], traj.means[k])
            part = (s_vec, traj.states[k], c, xh, (value_reward_fn or reward_fn)(xh, c).float(), h)
            parts.append(ValueDataset(*(None if t is None else dist.gather_rows(t) for t in part)))
        if on_batch is not None:
            on_batch({"parts": [p.state() for p in parts], "generator": g.get_state(), "next": j + n})
    return ValueDataset.concat(parts)


def pretrain_value(
    problem: Problem,
    reward_fn: Callable,
    candidates: list[str],
    num_paths: int,
    steps: int,
    points_per_path: int,
    epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
) -> LinkSelection:
    """Value pretraining with link-function selection by held-out MSE (paper Fig. 2b)."""
    data = collect_value_data(problem, reward_fn, num_paths, steps, points_per_path, seed)
    return select_link(
        lambda link: ValueFunction(reward_fn, problem.make_residual(), link),
        data,
        candidates,
        epochs,
        lr,
        seed=seed,
    )


def make_trainer(
    problem: Problem,
    reward_fn: Callable,
    cfg: OptimConfig,
    value: ValueFunction | None,
    dist: Dist | None = None,
) -> Trainer:
    policy = problem.policy.with_solver(cfg.solver, None if cfg.eta < 0 else cfg.eta)
    return Trainer(policy, reward_fn, cfg, problem.x_shape, problem.condition_sampler, value, dist=dist)
