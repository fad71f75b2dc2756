"""Value-network designs at scale (issue 7 item 3): what each costs per CTRL iteration and how well it fits.

Part 1, cost (exact, any machine): FLOPs of every network call in one CTRL and one DDPO iteration, counted by
torch.utils.flop_counter on the *meta* device (shapes only: no weights, no compute, seconds on a laptop) at
Stable Diffusion 1.5 shapes (UNet at 64^2 latents with CFG, VAE decoder to 512^2, TAESD's decoder) with an
ImageReward-shaped reward (BLIP ViT-L/16 at 224^2 + BERT-base with cross-attention + MLP head). The designs:

  paper          F_phi = a copy of the reward model (70% frozen) on decode(x_t); RM(x_hat) through the VAE
                 (value.residual=reward_copy, value.xhat_decoder=vae: the authors' SD1.5 value net)
  paper_tiny     the same with both decodes through TAESD
  conv           F_phi = a small CNN on the latents (x_t, x_hat), no decode; RM(x_hat) through the VAE
                 (value.residual=conv, the default)
  conv_tiny      conv, RM(x_hat) through TAESD (value.xhat_decoder=tiny)
  latent_only    conv with the f_only link: V = F_phi on latents before T, no decode and no reward model at all
                 (value.candidates=[f_only]); V(T, x) = RM(x) still holds exactly

each with three variants: fd, the finite-difference advantage of the paper (an extra CFG UNet call per training
step for x_hat at the perturbed state) with beta > 0; td, the temporal difference on the policy's own x_hat
(the authors' code; optimize.advantage=temporal_difference, value_xhat=policy: no extra UNet call) with beta > 0
(mu_pre at the K steps for the KL); td_beta0, the same at beta = 0 with optimize.kl_monitor=false (the authors'
ImageReward run: no mu_pre call at all). The DDPO baseline is ddpo-pytorch's: no mu_pre calls.
FLOPs are not seconds: the VAE decoder runs at a lower MFU than the UNet (the H100 numbers of
docs/method.md#reference-throughputs: UNet ~270 TFLOP/s, VAE decode ~175 TFLOP/s), so ``projected_h100_ratio``
also weights each call class by those throughputs. That is a projection from quoted timings, not a
measurement: bench.gpu measures.

Part 2, accuracy (``--mse``, CPU minutes): held-out value MSE of the same designs on the tiny SD-shaped model
with the tiny ImageReward fixture (random weights; a TAESD-style decoder distilled from the tiny VAE here).
It shows every design learns and what the tiny decoder costs in accuracy on *this* model; it is not SD1.5's.

    python -m bench.value_cost --json bench/results/value_cost.json
    python -m bench.value_cost --mse --json bench/results/value_cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu import SD15_UNET, SD15_VAE
from ctrl_core import progress
from ctrl_core.algorithms import OptimConfig

# ImageReward v1.0: BLIP ViT-L/16 at 224 (med_config's BERT-base text tower with cross-attention, 35 tokens)
IR_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    attention_dropout=0.0,
)
IR_TEXT = dict(
    vocab_size=30524,
    hidden_size=768,
    encoder_hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    is_decoder=True,
    use_cache=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
IR_TOKENS = 35
# TFLOP/s by call class, measured on an H100 in bf16, eager (issue 7; docs/method.md#reference-throughputs),
# for the projection only
H100_EAGER_TFLOPS = {"unet": 51.4 / 0.189, "decode": 2.51 * 32 / 0.456, "other": 51.4 / 0.189}


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def component_flops(frozen_fraction: float = 0.7, lora_rank: int = 4) -> tuple[dict[str, float], float]:
    """FLOPs per image of each call (exact counts of the matmuls and convolutions), and the share of the
    ImageReward copy's weights left trainable."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from transformers import BlipTextConfig, BlipVisionConfig

    from ctrl_core.rewards.imagereward import ImageRewardModel
    from ctrl_core.value import ConvResidual, freeze_leading

    n = 2  # images per counted call (per-image numbers divide by it)
    out: dict[str, float] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
        net = get_peft_model(
            unet,
            LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            ),
        )
        x, t, e = torch.randn(n, 4, 64, 64), torch.full((n,), 500.0), torch.randn(n, 77, 768)
        out["unet_forward"] = _count(lambda: net(x, t, encoder_hidden_states=e)) / n
        out["unet_lora_forward_backward"] = (
            _count(lambda: net(x, t, encoder_hidden_states=e).sample.sum().backward()) / n
        )
        vae = AutoencoderKL(**SD15_VAE)
        out["vae_decode_512"] = _count(lambda: vae.decode(torch.randn(n, 4, 64, 64))) / n
        tiny = AutoencoderTiny()
        out["taesd_decode_512"] = _count(lambda: tiny.decode(torch.randn(n, 4, 64, 64))) / n
        conv = ConvResidual(channels=4, width=32, num_classes=8)
        s, c = torch.rand(n), torch.zeros(n, dtype=torch.long)
        out["conv_residual_forward"] = _count(lambda: conv(s, x, c, x_hat=x)) / n
        out["conv_residual_forward_backward"] = _count(lambda: conv(s, x, c, x_hat=x).sum().backward()) / n
    # BLIP's text tower reads a tensor's value (.item()), which the meta device cannot: one real image on the CPU
    # (random weights; ~2 GB, seconds)
    ir = ImageRewardModel(BlipVisionConfig(**IR_VISION), BlipTextConfig(**IR_TEXT)).eval()
    ir.requires_grad_(False)
    pix, ids, mask = (
        torch.randn(1, 3, 224, 224),
        torch.zeros(1, IR_TOKENS, dtype=torch.long),
        torch.ones(1, IR_TOKENS, dtype=torch.long),
    )
    with torch.no_grad():
        out["imagereward_forward"] = _count(lambda: ir(pix, ids, mask))
    trainable = freeze_leading(ir, frozen_fraction)
    out["imagereward_copy_forward_backward"] = _count(lambda: ir(pix, ids, mask).sum().backward())
    keep = set(trainable)
    share = sum(p.numel() for name, p in ir.named_parameters() if name in keep) / sum(
        p.numel() for p in ir.parameters()
    )
    return out, share


VARIANTS = {  # (advantage, x_hat from, mu_pre at the K steps)
    "fd": ("finite_difference", "pretrained", True),  # the paper: V(x + lam B a) - V(x), beta > 0
    "td": ("temporal_difference", "policy", True),  # the authors' code, beta > 0
    "td_beta0": (
        "temporal_difference",
        "policy",
        False,
    ),  # the authors' ImageReward run: beta = 0, kl_monitor off
}


def iteration_flops(
    f: dict[str, float],
    design: str,
    variant: str,
    B: int,
    K: int,
    E: int,
    cfg_factor: int = 2,
    S: int | None = None,
) -> dict[str, float]:
    """FLOPs of one iteration but the sampling loop, by call class ("unet", "decode", "other"), for DDPO
    (design "ddpo") or CTRL (design x variant). B images, K training steps, E value epochs over the K B value
    samples, CFG doubling every UNet call."""
    u = cfg_factor * f["unet_forward"]
    cost = {"unet": 0.0, "decode": 0.0, "other": 0.0}
    cost["decode"] += B * f["vae_decode_512"]  # the terminal reward RM(X_T) on the full VAE
    cost["other"] += B * f["imagereward_forward"]
    cost["unet"] += K * B * cfg_factor * f["unet_lora_forward_backward"]  # the PPO update (one epoch)
    if design == "ddpo":
        return cost
    advantage, _, mu_pre = VARIANTS[variant]
    if mu_pre:
        cost["unet"] += (
            K * B * u
        )  # mu_pre at the K steps (the KL running reward, x_hat from the pretrained score)
    evals = 2 * K * B  # V at x and at the perturbed state (FD), or at x_k and x_{k+1} (TD)
    if advantage == "temporal_difference" and S:  # TD shares V(t', x') with step k + 1 when both are drawn:
        evals -= K * (K - 1) / S * B  # K of S random steps hold K (K - 1) / S adjacent pairs on average
    if advantage == "finite_difference":
        cost["unet"] += K * B * u  # x_hat at the perturbed state needs mu_pre there
    if design == "latent_only":  # link f_only: V = F_phi(t, x, x_hat) before T, no decode and no reward model
        cost["other"] += evals * f["conv_residual_forward"] + E * K * B * f["conv_residual_forward_backward"]
        return cost
    tiny = design.endswith("_tiny")
    dec = f["taesd_decode_512" if tiny else "vae_decode_512"]
    copy = design.startswith("paper")
    cost["decode"] += evals * dec  # RM(x_hat): decode ...
    cost["other"] += evals * f["imagereward_forward"]  # ... and score
    if copy:  # F_phi = RM_copy(decode(x_t)) at every evaluation, and per epoch in the value fit
        cost["decode"] += evals * dec + E * K * B * dec
        cost["other"] += evals * f["imagereward_forward"] + E * K * B * f["imagereward_copy_forward_backward"]
    else:
        cost["other"] += evals * f["conv_residual_forward"] + E * K * B * f["conv_residual_forward_backward"]
    return cost


def cost_table(f: dict[str, float], B: int, N: int, K: int, E: int) -> dict:
    sampling = N * B * 2 * f["unet_forward"]
    total = lambda c: sum(c.values())  # noqa: E731
    seconds = lambda c: sum(v / (H100_EAGER_TFLOPS[k] * 1e12) for k, v in c.items())  # noqa: E731
    ddpo = iteration_flops(f, "ddpo", "", B, K, E)
    ddpo["unet"] += sampling
    rows = {}
    for design in ("paper", "paper_tiny", "conv", "conv_tiny", "latent_only"):
        for variant in VARIANTS:
            c = iteration_flops(f, design, variant, B, K, E, S=N - 1)  # DDPM: the last step is deterministic
            c["unet"] += sampling
            rows[f"{design}/{variant}"] = {
                "tflop": total(c) / 1e12,
                "tflop_by_class": {k: v / 1e12 for k, v in c.items()},
                "ctrl_over_ddpo_flops": total(c) / total(ddpo),
                "projected_h100_ratio": seconds(c) / seconds(ddpo),
            }
    return {
        "ddpo_tflop": total(ddpo) / 1e12,
        "ddpo_tflop_by_class": {k: v / 1e12 for k, v in ddpo.items()},
        "designs": rows,
    }


# --- part 2: value MSE on the tiny model ---------------------------------------------------------------------
def _spread(mses: list[float], var: float) -> dict:
    """Mean held-out MSE and R2 over fit seeds, the R2's sample standard deviation and every seed's R2."""
    r2 = [1 - m / var for m in mses]
    std = statistics.stdev(r2) if len(r2) > 1 else float("nan")
    return {"val_mse": statistics.fmean(mses), "r2": statistics.fmean(r2), "r2_std": std, "r2_by_seed": r2}


def value_mse(
    num_paths: int,
    steps: int,
    points: int,
    epochs: int,
    decoders: list[tuple[int, int]],
    seed: int,
    fit_seeds: int = 5,
) -> dict:
    from ctrl_core.latent import distill_tiny_decoder, latent_problem, latent_reward
    from ctrl_core.recipes import collect_value_data
    from ctrl_core.rewards import make_reward
    from ctrl_core.testing import tiny_decoder_for, tiny_sd_components
    from ctrl_core.value import RewardCopyResidual, ValueDataset, ValueFunction, select_link

    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "imagereward_tiny"
    prompts = [p for p in json.loads((fixture / "reference.json").read_text())["prompts"] if p]
    raw = make_reward(
        "imagereward",
        checkpoint=str(fixture / "ImageReward.safetensors"),
        med_config=str(fixture / "med_config.json"),
        tokenizer_dir=str(fixture / "tokenizer"),
        device="cpu",
    )
    parts = tiny_sd_components(seed)
    vae = parts["vae"]
    problem = latent_problem(**parts, prompts=prompts, lora_rank=2, guidance_scale=3.0)
    reward = problem.wrap_reward(raw)
    t0 = time.perf_counter()
    data = collect_value_data(problem, reward, num_paths, steps, points, seed=seed, batch_size=64)
    collect_s = time.perf_counter() - t0
    var = float(data.returns.var())
    results, distilled, agreement = {}, {}, {}

    def fit(name, vr, d, make) -> None:
        # One fit is not a measurement: the held-out split and the init move R2 by about 0.1 on this data, and
        # the tiny-decoder fits move that much even with rounding-level changes (1 vs 2 threads). Every design
        # is fitted once per seed, on the same splits (seed k's split is the same for all designs: paired).
        links = ["cos_sin", "rm_only", "f_only"] if name == "conv" else ["cos_sin", "rm_only"]
        per: dict[str, list[float]] = {link: [] for link in links}
        t0 = time.perf_counter()
        with progress.Bar("bench.value_cost", f"fit {name}", fit_seeds) as bar:
            for k in range(fit_seeds):
                sel = select_link(
                    lambda link: ValueFunction(vr, make(), link), d, links, epochs, lr=1e-3, seed=seed + k
                )
                for link in links:
                    per[link].append(sel.val_mse[link])
                bar.update(k + 1, val_mse_cos_sin=sel.val_mse["cos_sin"])
        fit_s = (time.perf_counter() - t0) / fit_seeds
        results[name] = {
            **_spread(per["cos_sin"], var),
            "val_mse_rm_only": sum(per["rm_only"]) / fit_seeds,
            "r2_rm_only": _spread(per["rm_only"], var)["r2"],
            "fit_s": fit_s,
        }
        if "f_only" in per:  # the latent-only design: the same CNN, no reward term before T
            results["latent_only"] = _spread(per["f_only"], var)

    fit("conv", reward, data, problem.make_residual)
    fit("paper", reward, data, lambda: RewardCopyResidual(raw.trainable_copy(prompts, 0.7), reward.decode))
    # TAESD-style decoders distilled from this VAE on the value data's x_hat and states, of rising fidelity: how
    # the skip term's decoder error turns into value error
    for width, n_steps in decoders:
        tiny = tiny_decoder_for(seed=seed, width=width)
        stats = distill_tiny_decoder(
            vae,
            tiny,
            torch.cat([data.x_hat, data.x]),
            steps=n_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        stats["r2"] = 1 - stats["mse_after"] / stats["target_var"]
        tag = f"w{width}_s{n_steps}"
        distilled[tag] = stats
        tiny_reward = latent_reward(raw, tiny, prompts=prompts)
        with torch.no_grad():
            rm_tiny = torch.cat(
                [tiny_reward(xh, c) for xh, c in zip(data.x_hat.split(64), data.c.split(64), strict=True)]
            )
        data_tiny = ValueDataset(data.s, data.x, data.c, data.x_hat, rm_tiny.float(), data.returns)
        fit(f"conv_tiny[{tag}]", tiny_reward, data_tiny, problem.make_residual)
        agreement[tag] = advantage_agreement(problem, reward, tiny_reward, seed)
        if (width, n_steps) == decoders[-1]:
            fit(
                f"paper_tiny[{tag}]",
                tiny_reward,
                data_tiny,
                lambda tr=tiny_reward: RewardCopyResidual(raw.trainable_copy(prompts, 0.7), tr.decode),
            )
    return {
        "returns_var": var,
        "samples": len(data),
        "collect_s": collect_s,
        "tiny_decoder_distillation": distilled,
        "advantage_agreement": agreement,
        "designs": results,
        "setting": {
            "num_paths": num_paths,
            "steps": steps,
            "points_per_path": points,
            "epochs": epochs,
            "decoders": [list(d) for d in decoders],
            "seed": seed,
            "val_fraction": 0.2,
            "fit_seeds": fit_seeds,
            "torch_threads": torch.get_num_threads(),
            "model": "tiny SD-shaped (random weights) + tiny ImageReward fixture",
        },
    }


def advantage_agreement(
    problem, reward, tiny_reward, seed: int, batch: int = 64, steps: int = 10, K: int = 4
) -> dict:
    """What the policy gradient sees: the finite-difference advantages' skip term RM(x_hat(x + lam B a)) -
    RM(x_hat(x)) on the same rollout, through the full VAE and through the tiny decoder (link rm_only, so F_phi
    plays no part). A decoder error that is the same at both ends of the difference cancels; the value MSE
    above cannot show that."""
    from ctrl_core.recipes import make_trainer
    from ctrl_core.value import ValueFunction

    cfg = OptimConfig(
        algorithm="ctrl",
        iterations=1,
        batch_size=batch,
        train_steps=steps,
        train_timesteps=K,
        minibatch_size=batch,
        seed=seed,
        advantage_norm="none",
        lr=3e-4,
    )
    full = make_trainer(problem, reward, cfg, ValueFunction(reward, problem.make_residual(), "rm_only"))
    tiny = make_trainer(problem, reward, cfg, ValueFunction(tiny_reward, problem.make_residual(), "rm_only"))
    ro = full.rollout()
    a_full = torch.cat(list(full.advantages(ro).values()))
    ro.rm_xhat.clear()
    a_tiny = torch.cat(list(tiny.advantages(ro).values()))
    corr = float(torch.corrcoef(torch.stack([a_full, a_tiny]))[0, 1])
    sign = float((torch.sign(a_full) == torch.sign(a_tiny)).float().mean())
    return {"pearson": corr, "sign_agreement": sign, "n": a_full.numel()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per iteration (B)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (N)")
    p.add_argument("--train-timesteps", type=int, default=8, help="training steps per path (K)")
    p.add_argument("--value-epochs", type=int, default=2, help="value-net epochs per iteration (E)")
    p.add_argument("--frozen-fraction", type=float, default=0.7)
    p.add_argument("--mse", action="store_true", help="also fit the designs on the tiny model (part 2)")
    p.add_argument("--mse-paths", type=int, default=256)
    p.add_argument("--mse-epochs", type=int, default=20)
    p.add_argument(
        "--decoders",
        default="8:300,16:1500,32:6000",
        help="tiny decoders to distil for --mse, width:steps, comma-separated (rising fidelity)",
    )
    p.add_argument(
        "--fit-seeds",
        type=int,
        default=5,
        help="--mse: fit every design this many times (seeds seed..seed+n-1, paired splits); mean and spread",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.fit_seeds < 1:
        p.error("--fit-seeds must be at least 1")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    f, trainable_share = component_flops(args.frozen_fraction)
    out = {
        "what": "FLOPs per iteration of CTRL value designs vs DDPO at SD1.5 shapes (meta-device counts)",
        "component_tflop_per_image": {k: v / 1e12 for k, v in f.items()},
        "setting": {
            "batch": args.batch,
            "steps": args.steps,
            "train_timesteps": args.train_timesteps,
            "value_epochs": args.value_epochs,
            "cfg": True,
            "frozen_fraction": args.frozen_fraction,
            "imagereward_copy_trainable_share": trainable_share,
            "ddpo": "ddpo-pytorch's cost: sampling, terminal reward, PPO update; no mu_pre calls",
        },
        "h100_eager_tflops_assumed": H100_EAGER_TFLOPS,
        **cost_table(f, args.batch, args.steps, args.train_timesteps, args.value_epochs),
        "count_s": time.perf_counter() - t0,
    }
    if args.mse:
        decoders = [tuple(int(v) for v in d.split(":")) for d in args.decoders.split(",")]
        out["value_mse_tiny"] = value_mse(
            args.mse_paths, 10, 4, args.mse_epochs, decoders, args.seed, args.fit_seeds
        )
    bad = [k for k, r in out["designs"].items() if not math.isfinite(r["ctrl_over_ddpo_flops"])]
    if bad:
        raise FloatingPointError(f"non-finite cost for {bad}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(
        f"DDPO {out['ddpo_tflop']:.0f} TFLOP/iteration (B={args.batch}, N={args.steps}, K={args.train_timesteps})"
    )
    for name, r in out["designs"].items():
        print(
            f"{name:36s} {r['tflop']:8.0f} TFLOP  CTRL/DDPO {r['ctrl_over_ddpo_flops']:.2f} (FLOPs), "
            f"{r['projected_h100_ratio']:.2f} (projected H100 time)"
        )
    if args.mse:
        m = out["value_mse_tiny"]
        print(
            f"tiny model: returns var {m['returns_var']:.4g}; tiny decoders (image R2): "
            + ", ".join(f"{k} {v['r2']:.3f}" for k, v in m["tiny_decoder_distillation"].items())
        )
        for tag, a in m["advantage_agreement"].items():
            print(
                f"  advantages through tiny decoder {tag} vs the VAE: Pearson {a['pearson']:.3f}, "
                f"same sign {a['sign_agreement']:.2f} (n = {a['n']})"
            )
        for name, r in m["designs"].items():
            extra = f" (rm_only R2 {r['r2_rm_only']:.3f}), fit {r['fit_s']:.0f} s" if "fit_s" in r else ""
            print(f"  {name:24s} val MSE {r['val_mse']:.4g}, R2 {r['r2']:.3f} ± {r['r2_std']:.3f}{extra}")
    return out


if __name__ == "__main__":
    main()
