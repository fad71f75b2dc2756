"""GPU cost benchmark (issue 7 item 5): SD1.5-shaped latent backend with random weights (weights do not change cost).

One run measures: a bf16 matmul peak (8192^3; --tiny: float32 512^3), the UNet's FLOPs per classifier-free-guided
forward (torch.utils.flop_counter) and its MFU against that peak, images/s for sampling at --steps steps with CFG
(VAE decode timed separately), seconds per CTRL and per DDPO iteration (ctrl_core Trainer, same batch, steps,
train_timesteps and minibatch; per-phase times from IterationStats), peak memory, and how far the log-probs
recorded while sampling are from the trainer's forward (``Trainer.sampling_mismatch``: bf16 kernels picked by
batch shape, or a --merged-sampling copy, make PPO's first-pass ratios differ from 1).

    python -m bench.gpu --batch 32 --steps 50 --json bench/results/gpu.json      # on an H100/H200
    python -m bench.gpu --batch 32 --steps 50 --compile max-autotune-no-cudagraphs --json bench/results/gpu_compiled.json
    python -m bench.gpu --tiny --batch 2 --steps 4 --json /tmp/gpu_tiny.json     # CPU smoke test of the harness

A GPU session has 30 device-minutes and 10 minutes per command: docs/gpu_bench.md plans the calls (--budget-s,
--forward-only; the JSON is rewritten after every phase, so a call cut at its limit keeps what it measured).

The reward is "ImageReward-shaped": a CLIP ViT-L/14 image tower at 224^2 + an MLP head on VAE-decoded images
(it ignores the prompt: ImageReward's text cross-attention is not modelled, a slight cost under-estimate).
--tiny numbers are not performance results: writing them to bench/results/gpu.json is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ctrl_core import progress
from ctrl_core.algorithms import OptimConfig
from ctrl_core.latent import latent_problem
from ctrl_core.models import compute_device
from ctrl_core.policy import sample
from ctrl_core.recipes import make_trainer
from ctrl_core.testing import tiny_sd_components, write_tiny_clip_tokenizer_files
from ctrl_core.value import ValueFunction

DEFAULT_JSON = Path("bench/results/gpu.json")
PROMPTS = (
    "a photo of a cat",
    "a red sports car",
    "a mountain lake at dawn",
    "a bowl of fruit",
    "an astronaut riding a horse",
    "a watercolor of a city",
    "a dog on a beach",
    "a medieval castle",
)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
VIT_L14_224 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
VIT_TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def sd15_components(seed: int, device: torch.device) -> dict:
    """SD1.5-shaped UNet / VAE / CLIP-L text encoder from config dicts (random weights, built on ``device``)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # byte-level BPE (no CLIP vocabulary offline; cost is the same)
        tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer_files(tmp), local_files_only=True)
    torch.manual_seed(seed)
    with torch.device(device):
        text = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_L_TEXT,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        ).eval()
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": sched}


class ImageScorer(nn.Module):
    """ImageReward-shaped scorer: CLIP vision tower + ImageReward's MLP head (hidden -> 1024-128-64-16-1)."""

    def __init__(self, vision: dict, autocast_dtype: torch.dtype | None, chunk: int = 64):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.vision = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
        h = vision["hidden_size"]
        self.head = nn.Sequential(
            nn.Linear(h, 1024), nn.Linear(1024, 128), nn.Linear(128, 64), nn.Linear(64, 16), nn.Linear(16, 1)
        )
        self.size, self.amp, self.chunk = vision["image_size"], autocast_dtype, chunk
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (B,) scores on the scorer's device, in one batch, with autograd."""
        dev = self.mean.device
        x = F.interpolate(
            images.to(dev, torch.float32), size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        x = ((x + 1) / 2 - self.mean) / self.std
        with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
            return self.head(self.vision(pixel_values=x).pooler_output).float().squeeze(1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, conditions=None) -> torch.Tensor:
        return torch.cat([self.score(im) for im in images.split(self.chunk)]).to(images.device)


class ImageScorerCopy(nn.Module):
    """The paper's F_phi on this scorer: a copy with its leading ``frozen_fraction`` of weights frozen, with
    gradients (``value.RewardCopyResidual`` calls it on decoded states)."""

    def __init__(self, scorer: ImageScorer, frozen_fraction: float):
        super().__init__()
        import copy

        from ctrl_core.value import freeze_leading

        self.scorer = copy.deepcopy(scorer)
        freeze_leading(self.scorer, frozen_fraction)

    def forward(self, images: torch.Tensor, conditions=None) -> torch.Tensor:
        return self.scorer.score(images)


# value designs: (value.residual, value.xhat_decoder) x (advantage, value_xhat, beta, kl_monitor)
DESIGNS = {
    "paper": ("reward_copy", "vae", ""),
    "paper_tiny": ("reward_copy", "tiny", ""),
    "conv": ("conv", "vae", ""),
    "conv_tiny": ("conv", "tiny", ""),
    "latent_only": ("conv", "vae", "f_only"),
}  # "": --link
VARIANTS = {
    "fd": ("finite_difference", "pretrained", 0.01, True),
    "td": ("temporal_difference", "policy", 0.01, True),
    "td_beta0": ("temporal_difference", "policy", 0.0, False),
}


def parse_design(spec: str) -> tuple[str, str]:
    design, _, variant = spec.partition("/")
    if design not in DESIGNS or variant not in VARIANTS:
        raise SystemExit(
            f"--designs: {spec!r} is not DESIGN/VARIANT with DESIGN in {sorted(DESIGNS)} and VARIANT in "
            f"{sorted(VARIANTS)}"
        )
    return design, variant


def meta_unet_flops(model, batch: int) -> float:
    """FLOPs of one forward of ``model``'s UNet (config only, LoRA ignored: < 0.1%) at ``batch`` on the meta
    device, with CLIP-length prompt states."""
    from diffusers import UNet2DConditionModel

    cfg = model.base_unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        x = torch.randn(batch, cfg.in_channels, size, size)
        e = torch.randn(batch, model.prompt_embeds.shape[1], cfg.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.full((batch,), 500.0), encoder_hidden_states=e)
    return float(counter.get_total_flops())


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux (process RSS)


def matmul_peak_tflops(device: torch.device, tiny: bool, clock: Clock) -> dict:
    n, dtype, reps = (512, torch.float32, 5) if tiny or device.type != "cuda" else (8192, torch.bfloat16, 50)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = clock.now()
    for _ in range(reps):
        a @ b
    dt = clock.now() - t0
    return {
        "tflops": 2 * n**3 * reps / dt / 1e12,
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "reps": reps,
    }


def inductor_tuning() -> dict:
    """The inductor settings of diffusers' "accelerate inference" guide for SD-class UNets (1x1 convolutions as
    matmuls, coordinate-descent autotuning of the generated kernels, no epilogue fusion). Returns them."""
    import torch._inductor.config as cfg

    flags = {
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "coordinate_descent_check_all_directions": True,
        "epilogue_fusion": False,
    }
    applied = {k: v for k, v in flags.items() if hasattr(cfg, k)}  # a torch without one of them: the others
    for k, v in applied.items():
        setattr(cfg, k, v)
    return applied


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny SD-shaped model on any device (harness smoke test)"
    )
    p.add_argument("--batch", type=int, default=32, help="images per batch (the UNet batch is 2x with CFG)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (and the trainers' train_steps)")
    p.add_argument("--train-timesteps", type=int, default=8, help="K: training steps per trajectory (both)")
    p.add_argument("--minibatch", type=int, default=16, help="paths per PPO optimiser step (both)")
    p.add_argument(
        "--iterations", type=int, default=2, help="timed iterations per algorithm (after 1 warm-up)"
    )
    p.add_argument("--link", default="cos_sin", help="CTRL value link (cos_sin | rm_only | ...)")
    p.add_argument(
        "--designs",
        default="conv/fd",
        help="CTRL value designs to time, DESIGN/VARIANT comma-separated (the first is the headline "
        "ctrl_over_ddpo): DESIGN paper|paper_tiny|conv|conv_tiny|latent_only, VARIANT fd|td|td_beta0 "
        "(as bench.value_cost); e.g. conv/fd,conv_tiny/td,conv_tiny/td_beta0,paper/td",
    )
    p.add_argument(
        "--frozen-fraction", type=float, default=0.7, help="paper designs: frozen share of the copy"
    )
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument(
        "--forward-reps", type=int, default=0, help="timed UNet forwards (0: 10 on CUDA, 2 otherwise)"
    )
    p.add_argument(
        "--compile",
        default="",
        help="torch.compile mode for the UNet (default | reduce-overhead | "
        "max-autotune ...; empty: eager). FLOPs are counted on the eager model first",
    )
    p.add_argument("--channels-last", action="store_true", help="NHWC UNet")
    p.add_argument(
        "--merged-sampling",
        action="store_true",
        help="no-grad UNet calls (the MFU forward, sampling) through a LoRA-merged bf16 copy with fused q/k/v "
        "projections (model.merged_sampling); training forwards keep the LoRA model",
    )
    p.add_argument(
        "--old-log-probs",
        default="sampler",
        choices=("sampler", "trainer"),
        help="optimize.old_log_probs of both trainers: trainer recomputes PPO's pi_old with the update's "
        "forward (K more forwards per path)",
    )
    p.add_argument(
        "--inductor-tuning",
        action="store_true",
        help="with --compile: inductor flags diffusers recommends for UNets (conv_1x1_as_mm, coordinate "
        "descent tuning, no epilogue fusion)",
    )
    p.add_argument(
        "--forward-only",
        action="store_true",
        help="stop after the UNet MFU and sampling phases (no CTRL/DDPO iterations): a quick look at one "
        "speed option, e.g. a compile mode",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="wall seconds for the whole run (0: no limit): a CTRL design whose timing would likely end "
        "past it is skipped and listed in skipped_designs. The JSON is rewritten after every phase "
        "(complete: false until the end), so a run killed at a time limit keeps what it measured",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return p.parse_args(argv)


def write_json(path: Path, out: dict) -> None:
    """``out`` to ``path`` atomically (io.atomic_write_text: a reader never sees half a file), keys in run order."""
    from ctrl_core.io import atomic_write_text

    atomic_write_text(json.dumps(out, indent=2) + "\n", path)


def run(args: argparse.Namespace, emit=None) -> dict:
    """The measurements, as one dict. ``emit(partial)`` (optional) receives the dict so far after every phase."""
    import diffusers
    import transformers

    started = time.perf_counter()
    dev = compute_device()
    cuda = dev.type == "cuda"
    if (args.tiny or not cuda) and args.json.resolve() == DEFAULT_JSON.resolve():
        raise SystemExit(
            f"refusing to write non-GPU / --tiny numbers to {DEFAULT_JSON}: pass --json elsewhere"
        )
    clock, amp = Clock(dev), (torch.bfloat16 if cuda else None)
    phase_peak: dict[str, float] = {}
    B, N = args.batch, args.steps
    unet_batch = 2 * B if args.guidance != 1.0 else B  # CFG: both halves in one UNet call
    if cuda:
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res: dict = {
        "device": device_name,
        "tiny": bool(args.tiny),
        "performance_claim": bool(cuda and not args.tiny),
        "complete": False,
        "phases_done": [],
    }

    def done(phase: str, **measured) -> None:
        res.update(measured)
        res["phases_done"].append(phase)
        res["peak_memory_gb"] = max(phase_peak.values())
        res["peak_memory_gb_by_phase"] = dict(phase_peak)
        res["peak_memory_kind"] = "torch.cuda.max_memory_allocated" if cuda else "process max RSS (ru_maxrss)"
        res["elapsed_s"] = time.perf_counter() - started
        if emit is not None:
            emit(res)

    def finish() -> dict:
        res["complete"] = True
        res["elapsed_s"] = time.perf_counter() - started
        return res

    clock.reset_peak()
    peak = matmul_peak_tflops(dev, args.tiny, clock)
    torch.manual_seed(args.seed)
    parts = tiny_sd_components(args.seed) if args.tiny else sd15_components(args.seed, dev)
    parts["text_encoder"].to(
        dev
    )  # (latent_problem puts the VAE in bf16 with a bf16 UNet, as the pipeline does)
    problem = latent_problem(
        **parts,
        prompts=list(PROMPTS),
        lora_rank=args.lora_rank,
        solver="ddpm",
        guidance_scale=args.guidance,
        autocast_dtype=amp,
    )
    parts["text_encoder"].to("cpu")
    del parts
    scorer = ImageScorer(VIT_TINY if args.tiny else VIT_L14_224, amp).to(dev)
    reward = problem.wrap_reward(scorer)
    model, policy = problem.policy.model, problem.policy
    if cuda:
        torch.cuda.empty_cache()
    phase_peak["build"] = clock.peak_gb()
    res["setting"] = {
        "batch": B,
        "steps": N,
        "train_timesteps": min(args.train_timesteps, N),
        "minibatch": min(args.minibatch, B),
        "timed_iterations": args.iterations,
        "warmup_iterations": 1,
        "link": args.link,
        "guidance_scale": args.guidance,
        "lora_rank": args.lora_rank,
        "designs": args.designs,
        "frozen_fraction": args.frozen_fraction,
        "budget_s": args.budget_s,
        "forward_only": bool(args.forward_only),
        "ddpo": "kl_monitor off (ddpo-pytorch's cost: no mu_pre calls)",
        "solver": "ddpm",
        "autocast": "bfloat16" if amp else "float32",
        "compile": args.compile or "eager",
        "channels_last": bool(args.channels_last),
        "merged_sampling": bool(args.merged_sampling),
        "inductor_tuning": bool(args.inductor_tuning),
        "old_log_probs": args.old_log_probs,
        "vae_dtype": str(next(problem.vae.parameters()).dtype).replace("torch.", ""),
        "x_shape": list(problem.x_shape),
        "reward": "CLIP ViT " + ("tiny" if args.tiny else "L/14 @224") + " + MLP head on VAE decode",
        "weights": "random (config dicts)",
    }
    res["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    done("build", matmul_peak_tflops=peak["tflops"], matmul=peak)

    # -- UNet forward: FLOPs (CFG = one batched call at 2B) and MFU ------------------------------------------
    clock.reset_peak()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn((B, *problem.x_shape), generator=g)
    s = torch.full((B,), 0.5, dtype=torch.float64)
    c = torch.arange(B) % len(PROMPTS)
    with torch.no_grad():
        with FlopCounterMode(
            display=False
        ) as counter:  # on the eager model: the FLOPs are the UNet's either way
            model.model_output(s, x, c)
        device_flops = counter.get_total_flops()
        # the same forward counted on the meta device: complete on any backend (the CPU's fused attention kernel
        # has no FLOP formula, so a CPU count misses attention; tests/test_bench_value_cost.py)
        flops = max(device_flops, meta_unet_flops(model, unet_batch))
        if args.merged_sampling:
            model.enable_merged_sampling(amp)
        if args.channels_last:
            model.use_channels_last()
        if args.inductor_tuning:
            res["setting"]["inductor_flags"] = inductor_tuning()
        if args.compile:
            model.compile_unet(args.compile)
            problem.compile_decoders(args.compile)  # the VAE decoder too (model.compile does the same)
        t0 = clock.now()
        for _ in range(2):  # warm-up (and, compiled, the compilation of this shape)
            model.model_output(s, x, c)
        warmup_s = clock.now() - t0
        reps = args.forward_reps or (10 if cuda else 2)
        t0 = clock.now()
        for _ in range(reps):
            model.model_output(s, x, c)
        fwd_s = (clock.now() - t0) / reps
    phase_peak["unet_forward"] = clock.peak_gb()
    achieved = flops / fwd_s / 1e12
    done(
        "unet_forward",
        unet_mfu=achieved / peak["tflops"],
        unet_tflops_per_forward=flops / 1e12,
        unet_tflops_per_forward_device_count=device_flops / 1e12,
        unet_forward_s=fwd_s,
        unet_achieved_tflops=achieved,
        unet_forward_batch=unet_batch,
        unet_warmup_s=warmup_s,
    )

    # -- sampling N steps with CFG, decode and scoring timed apart --------------------------------------------
    clock.reset_peak()
    grid = policy.schedule.time_grid(N)
    x0 = torch.randn((B, *problem.x_shape), generator=g)
    t0 = clock.now()
    traj = sample(policy, x0, c, grid, g)
    t1 = clock.now()
    images = reward.decode(traj.sample)
    t2 = clock.now()
    scores = scorer(images)
    t3 = clock.now()
    sample_s, decode_s, score_s = t1 - t0, t2 - t1, t3 - t2
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("the scorer returned non-finite rewards")
    phase_peak["sampling"] = clock.peak_gb()
    done(
        "sampling",
        images_per_s=B / sample_s,
        images_per_s_with_decode=B / (sample_s + decode_s),
        decode_s_per_image=decode_s / B,
        score_s_per_image=score_s / B,
    )

    if args.forward_only:
        return finish()

    # -- CTRL vs DDPO iterations ---------------------------------------------------------------------------
    from ctrl_core.latent import latent_reward
    from ctrl_core.testing import tiny_decoder_for
    from ctrl_core.value import RewardCopyResidual

    tiny_reward = None
    if any(DESIGNS[parse_design(d)[0]][1] == "tiny" for d in args.designs.split(",")):
        # TAESD-shaped (diffusers' AutoencoderTiny defaults: SD's 8x upsampling); random weights, as the rest
        from diffusers import AutoencoderTiny

        with torch.device(dev):
            taesd = tiny_decoder_for(width=8) if args.tiny else AutoencoderTiny().eval().requires_grad_(False)
        taesd.to(
            dtype=next(problem.vae.parameters()).dtype
        )  # the VAE's (bf16 with a bf16 UNet), as the engine
        if args.compile:
            taesd.decoder.compile(mode=args.compile)
        tiny_reward = latent_reward(scorer, taesd)

    def timed(alg: str, design: str = "", variant: str = "") -> dict:
        clock.reset_peak()
        wall0 = time.perf_counter()
        value, extra = None, {}
        if alg == "ctrl":
            residual_kind, decoder, link = DESIGNS[design]
            advantage, xhat, beta, monitor = VARIANTS[variant]
            vr = tiny_reward if decoder == "tiny" else reward
            residual = (
                RewardCopyResidual(ImageScorerCopy(scorer, args.frozen_fraction), vr.decode)
                if residual_kind == "reward_copy"
                else problem.make_residual()
            )
            value = ValueFunction(vr, residual, link or args.link)
            extra = dict(advantage=advantage, value_xhat=xhat, beta=beta, kl_monitor=monitor)
        else:
            extra = dict(kl_monitor=False)  # ddpo-pytorch's cost: no mu_pre calls
        cfg = OptimConfig(
            algorithm=alg,
            iterations=1 + args.iterations,
            batch_size=B,
            train_steps=N,
            train_timesteps=min(args.train_timesteps, N),
            minibatch_size=min(args.minibatch, B),
            seed=args.seed,
            old_log_probs=args.old_log_probs,
            lr=3e-4,
            **extra,
        )
        trainer = make_trainer(problem, reward, cfg, value)
        totals, stats = [], []
        with progress.Bar("bench.gpu", f"{alg} {design}".strip(), 1 + args.iterations) as bar:
            for i in range(1 + args.iterations):
                t0 = clock.now()
                st = trainer.step()
                dt = clock.now() - t0
                if i > 0:  # the first iteration is the warm-up
                    totals.append(dt)
                    stats.append(st)
                bar.update(i + 1, seconds=dt)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out = {
            "total": mean(totals),
            "sample": mean([st.sample_s for st in stats]),
            "value": mean([st.value_s for st in stats]),
            "policy": mean([st.policy_s for st in stats]),
            "peak_memory_gb": clock.peak_gb(),
            "approx_kl": mean([st.approx_kl for st in stats]),
            "clipfrac": mean([st.clipfrac for st in stats]),
        }
        if args.old_log_probs == "trainer":  # what the recomputation cost and found
            for key in ("recompute_s", "sampler_approx_kl", "sampler_clipfrac"):
                out[key] = mean([st.extra[key] for st in stats])
        if (
            alg == "ddpo"
        ):  # once: do the sampler's log-probs match the trainer's forward (bf16, batch shapes)?
            out["sampling_mismatch"] = trainer.sampling_mismatch(
                trainer.rollout(), torch.arange(min(args.minibatch, B))
            )
        out["wall_s"] = time.perf_counter() - wall0
        del trainer, value
        if cuda:
            torch.cuda.empty_cache()
        return out

    per_iteration = {"ddpo": timed("ddpo")}
    phase_peak["ddpo"] = per_iteration["ddpo"]["peak_memory_gb"]
    done(
        "ddpo",
        seconds_per_iteration=per_iteration,
        sampling_mismatch=per_iteration["ddpo"]["sampling_mismatch"],
    )
    designs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    specs = args.designs.split(",")
    for spec in specs:
        elapsed = time.perf_counter() - started
        # a design costs about what the last timed one did (DDPO for the first, which is cheaper: the 1.5 covers it)
        last = list(designs.values())[-1]["wall_s"] if designs else 1.5 * per_iteration["ddpo"]["wall_s"]
        if args.budget_s and elapsed + last > args.budget_s:
            skipped[spec] = f"budget: {elapsed:.0f} s elapsed + ~{last:.0f} s > --budget-s {args.budget_s:g}"
            continue
        designs[spec] = timed("ctrl", *parse_design(spec))
        designs[spec]["ctrl_over_ddpo"] = designs[spec]["total"] / per_iteration["ddpo"]["total"]
        phase_peak[f"ctrl {spec}"] = designs[spec]["peak_memory_gb"]
        headline = next(iter(designs))
        per_iteration["ctrl"] = designs[headline]
        done(
            f"ctrl {spec}",
            ctrl_over_ddpo=designs[headline]["ctrl_over_ddpo"],
            ctrl_design=headline,
            ctrl_over_ddpo_by_design={k: v["ctrl_over_ddpo"] for k, v in designs.items()},
            seconds_per_iteration_by_design=designs,
            seconds_per_iteration=per_iteration,
            skipped_designs=skipped,
        )
    if not designs:
        raise SystemExit(f"--budget-s {args.budget_s:g} left no time for any CTRL design: {skipped}")
    res["skipped_designs"] = skipped
    return finish()


def main(argv=None) -> dict:
    args = parse_args(argv)
    for spec in args.designs.split(","):  # before any model is built
        parse_design(spec)
    out = run(args, emit=lambda partial: write_json(args.json, partial))
    keys = ("unet_mfu", "images_per_s", "matmul_peak_tflops", "peak_memory_gb")
    keys += () if args.forward_only else ("ctrl_over_ddpo",)
    bad = [k for k in keys if not (math.isfinite(out[k]) and out[k] > 0)]
    if bad:
        out["complete"] = False
        write_json(args.json, out)
        raise FloatingPointError(f"non-finite or non-positive measurements: {bad}")
    write_json(args.json, out)
    print(f"{out['device']}{' [TINY: harness smoke test, not a performance result]' if out['tiny'] else ''}")
    print(
        f"matmul peak {out['matmul_peak_tflops']:.3g} TFLOP/s | UNet {out['unet_tflops_per_forward']:.3g} TFLOP/fwd "
        f"in {out['unet_forward_s'] * 1e3:.1f} ms = {out['unet_achieved_tflops']:.3g} TFLOP/s, MFU {out['unet_mfu']:.1%}"
    )
    print(f"sampling {out['images_per_s']:.3f} img/s ({out['images_per_s_with_decode']:.3f} with decode)")
    if args.forward_only:
        print(f"peak memory {out['peak_memory_gb']:.2f} GB | {out['elapsed_s']:.0f} s -> {args.json}")
        return out
    it, m = out["seconds_per_iteration"], out["sampling_mismatch"]
    print(
        f"sampler vs trainer log-probs (PPO's first pass): approx KL {m['approx_kl']:.2e}, clipfrac {m['clipfrac']:.3f}, "
        f"max |log ratio| {m['max_abs_log_ratio']:.2g}"
    )
    for alg in ("ctrl", "ddpo"):
        t = it[alg]
        print(
            f"{alg}: {t['total']:.2f} s/it (sample {t['sample']:.2f}, value {t['value']:.2f}, policy {t['policy']:.2f})"
        )
    for spec, r in out["seconds_per_iteration_by_design"].items():
        print(f"  ctrl {spec}: {r['total']:.2f} s/it = {r['ctrl_over_ddpo']:.2f} x DDPO")
    for spec, why in out["skipped_designs"].items():
        print(f"  ctrl {spec}: skipped ({why})")
    print(
        f"CTRL/DDPO = {out['ctrl_over_ddpo']:.2f} ({out['ctrl_design']}) | peak memory {out['peak_memory_gb']:.2f} GB "
        f"| {out['elapsed_s']:.0f} s -> {args.json}"
    )
    return out


if __name__ == "__main__":
    main()
