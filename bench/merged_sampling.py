"""What model.merged_sampling changes (issue 7 item 5, "make it fast"): numbers, PPO ratios and CPU time.

With merged sampling the rollouts' no-grad UNet calls run a copy of the UNet whose weights hold the LoRA update
(W + s B A), stored in the autocast dtype and with q/k/v fused, instead of the LoRA model under autocast. The
trainer's forwards keep the LoRA model, so the log-probabilities recorded while sampling and those of the first
PPO pass differ by rounding alone. This measures, on the tiny SD-shaped model (random weights, a random
non-zero adapter as after some training):

- ``output_rel_error``: mean |difference| / mean |reference| of the guided UNet output, for the merged copy
  against the LoRA model in float32 and in bf16, and of bf16 autocast against float32 (the rounding the
  project already accepts with model.autocast=bf16);
- ``first_minibatch``: ``Trainer.sampling_mismatch`` of one rollout (all steps, all paths): the approx KL,
  clip fraction (clip 0.2) and largest |log-ratio| of PPO's ratios before any update, which should be 1, for
  float32 / bf16 autocast, each without and with the copy: what the mismatch does to PPO;
- ``cpu_sampling``: seconds for one rollout without and with the copy (float32, CPU, measured in one run) and
  their ratio, and the seconds of one refresh. CPU timings of a small model say little about an H100's:
  ``python -m bench.gpu --merged-sampling`` measures that.

    python -m bench.merged_sampling --json bench/results/merged_sampling.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrl_core.algorithms import OptimConfig
from ctrl_core.latent import latent_problem
from ctrl_core.policy import sample
from ctrl_core.recipes import make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.testing import tiny_sd_components

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
# (name, autocast dtype, merged copy): float32 and bf16 autocast, each without and with the copy
CONFIGS = (
    ("fp32", None, False),
    ("fp32_merged", None, True),
    ("bf16", torch.bfloat16, False),
    ("bf16_merged", torch.bfloat16, True),
)


def tuned_problem(seed: int, lora_rank: int, autocast: torch.dtype | None, merged: bool, adapter_std: float):
    problem = latent_problem(**tiny_sd_components(seed), prompts=PROMPTS, lora_rank=lora_rank, guidance_scale=5.0,
                             autocast_dtype=autocast)  # fmt: skip
    model = problem.policy.model
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * adapter_std)
    if merged:
        model.enable_merged_sampling(autocast)
    return problem, model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    outputs = {}
    for name, amp, merged in CONFIGS:
        problem, model = tuned_problem(args.seed, args.lora_rank, amp, merged, args.adapter_std)
        g.manual_seed(args.seed)
        n = 4 * len(PROMPTS)
        x = torch.randn((n, *problem.x_shape), generator=g)
        s = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
        c = torch.arange(n) % len(PROMPTS)
        with torch.no_grad():
            outputs[name] = model.model_output(s, x, c)
    output_rel_error = {
        "merged_fp32_vs_lora_fp32": rel(outputs["fp32_merged"], outputs["fp32"]),
        "autocast_bf16_vs_fp32": rel(outputs["bf16"], outputs["fp32"]),
        "merged_bf16_vs_fp32": rel(outputs["bf16_merged"], outputs["fp32"]),
        "merged_bf16_vs_autocast_bf16": rel(outputs["bf16_merged"], outputs["bf16"]),
    }

    first = {}
    for name, amp, merged in CONFIGS:
        problem, model = tuned_problem(args.seed, args.lora_rank, amp, merged, args.adapter_std)
        reward = problem.wrap_reward(make_reward("jpeg_compressibility"))
        cfg = OptimConfig(algorithm="ddpo", iterations=1, batch_size=args.batch, train_steps=args.steps,
                          train_timesteps=args.steps, minibatch_size=args.batch, kl_monitor=False,
                          seed=args.seed, lr=3e-4, log_prob_reduce="sum", clip_range=0.2)  # fmt: skip
        trainer = make_trainer(problem, reward, cfg, None)
        first[name] = trainer.sampling_mismatch(trainer.rollout())

    timing = {}
    for merged in (False, True):
        problem, model = tuned_problem(args.seed, args.lora_rank, None, merged, args.adapter_std)
        grid = problem.policy.schedule.time_grid(args.steps)
        x0 = torch.randn((args.batch, *problem.x_shape), generator=g)
        c = torch.arange(args.batch) % len(PROMPTS)
        with torch.no_grad():
            sample(
                problem.policy, x0, c, grid, torch.Generator().manual_seed(0)
            )  # warm-up (and first refresh)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                sample(problem.policy, x0, c, grid, torch.Generator().manual_seed(0))
            timing["merged_s" if merged else "lora_s"] = (time.perf_counter() - t0) / args.reps
        if merged:
            t0 = time.perf_counter()
            model._sampler.refresh()
            timing["refresh_s"] = time.perf_counter() - t0
    timing["merged_over_lora"] = timing["merged_s"] / timing["lora_s"]
    return {
        "device": "cpu",
        "model": "tiny SD-shaped UNet (tiny_sd_components), random weights, random adapter",
        "output_rel_error": output_rel_error,
        "first_minibatch": first,
        "cpu_sampling": timing,
        "setting": {
            "batch": args.batch,
            "steps": args.steps,
            "lora_rank": args.lora_rank,
            "adapter_std": args.adapter_std,
            "reps": args.reps,
            "clip_range": 0.2,
            "guidance_scale": 5.0,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument(
        "--adapter-std", type=float, default=0.05, help="std of the random lora_B (0 = untrained adapter)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    out = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    e, f, t = out["output_rel_error"], out["first_minibatch"], out["cpu_sampling"]
    print("output rel. error: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))
    print(
        "first pass (approx KL / clipfrac / max |log ratio|): "
        + ", ".join(
            f"{k} {v['approx_kl']:.2e}/{v['clipfrac']:.3f}/{v['max_abs_log_ratio']:.2g}" for k, v in f.items()
        )
    )
    print(
        f"CPU sampling: LoRA {t['lora_s']:.3f} s, merged {t['merged_s']:.3f} s ({t['merged_over_lora']:.2f}x), "
        f"refresh {t['refresh_s'] * 1e3:.1f} ms -> {args.json}"
    )
    return out


if __name__ == "__main__":
    main()
