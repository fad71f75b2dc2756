"""q-learning from data (arXiv 2409.04832) on three tasks, with a plot next to the JSON.

    python -m bench.qlearning --task {gmm1d,swissroll,digits} --json OUT [--quick]

beta is the paper's *reward weight*: beta = 0 reproduces the data, beta > 0 targets p* ∝ p_data exp(beta h).
(CTRL's beta is a KL weight: the same target is CTRL with beta_ctrl = 1 / beta.)

- gmm1d (m = 300): 0.6 N(-2, 0.5^2) + 0.4 N(2, 0.5^2), reward h = 1{y > 0}. beta = 0 from scratch, KS two-sample
  test of the samples against the data (``two_sample_pvalue``); then beta in {1, 2, 4}, each fine-tuned from the
  beta = 0 model; ``reward_region_mass`` per beta with the optimum 0.4 e^beta / (0.4 e^beta + 0.6).
- swissroll (m = 120): 2-D Swiss roll, reward h = 1{y_0 > 0.5}, beta = 2. q-learning from scratch on the 120
  samples vs CTRL fine-tuning of a good and of a deliberately poor pretrained score model. No small pretrained
  2-D model exists, so the bench trains them by plain denoising score matching: good = 4000 Adam steps on
  5000 fresh samples, poor = 150 steps on the 120 samples. Metrics: reward-region mass, mean distance to the
  nearest point of the clean roll (on-manifold error), energy distance to the target p* (data resampled with
  weights e^{beta h}).
  ``--seeds N`` repeats everything over N seeds and adds per-method means/sds and per-seed win counts.
- digits: the embedded default (shipped 8x8 class-conditional DDPM with a LoRA adapter), JPEG-compressibility
  reward, ratio estimator with m = 1 sample of the conditioning class per estimate (the paper's CIFAR setting),
  q-learning started from the pretrained model, beta = 10 (``--beta``), the linked critic (``--critic``).
  Reduced setting on 2 CPU cores (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ctrl_core import progress
from ctrl_core.qlearning import (
    EpsMLP,
    QLearningConfig,
    QLearningScoreModel,
    QLearningTrainer,
    make_critic,
    sample_model,
    scratch_model,
)
from ctrl_core.schedule import LinearVPSchedule


def region(threshold: float):
    def h(x, c=None):
        return (x[:, 0] > threshold).float()

    return h


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- gmm1d ----------------------------------------------------------------------------------------------------
def gmm_data(m: int, g: torch.Generator) -> torch.Tensor:
    right = torch.rand(m, generator=g) < 0.4
    return torch.where(right, 2 + 0.5 * torch.randn(m, generator=g), -2 + 0.5 * torch.randn(m, generator=g))[
        :, None
    ]


def run_gmm1d(quick: bool, seed: int, png: Path | None, critic: str = "free") -> dict:
    from scipy.stats import ks_2samp

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data, sch, h = gmm_data(300, g), LinearVPSchedule(), region(0.0)
    it0, it1 = (40, 20) if quick else (150, 60)
    t0 = time.perf_counter()
    base_cfg = dict(batch_size=256, train_steps=40, seed=seed)
    model = scratch_model(sch, data, width=64)
    free_cfg = QLearningConfig(
        iterations=it0, reward_weight=0.0, critic_target="td", critic="free", **base_cfg
    )
    tr = QLearningTrainer(model, data, None, free_cfg)
    progress.train(tr, "bench.qlearning gmm1d: pretrain")
    samples = {0.0: {s: tr.sample(2000, 100, s, seed=seed + 1)[:, 0] for s in ("sde", "ode")}}
    for beta in (1.0, 2.0, 4.0):
        tuned = QLearningScoreModel.from_pretrained(model)
        cfg = QLearningConfig(
            iterations=it1,
            reward_weight=beta,
            critic_target="monte_carlo",
            critic=critic,
            lr=5e-4,
            **base_cfg,
        )
        trb = QLearningTrainer(tuned, data, h, cfg)
        progress.train(trb, f"bench.qlearning gmm1d: beta {beta}")
        samples[beta] = {s: trb.sample(2000, 100, s, seed=seed + 1)[:, 0] for s in ("sde", "ode")}
    x0 = samples[0.0]["sde"][:500]
    out = {
        "task": "gmm1d",
        "m": 300,
        "quick": quick,
        "seed": seed,
        "critic": critic,
        "beta_convention": "paper: beta weights the reward h; beta = 0 reproduces the data; optimum p* ∝ p_data exp(beta h)",
        "data": "0.6 N(-2, 0.5^2) + 0.4 N(2, 0.5^2)",
        "reward": "h(y) = 1{y > 0}",
        "iterations": {"beta0_from_scratch": it0, "beta_gt0_finetune_from_beta0": it1},
        "two_sample_pvalue": float(ks_2samp(x0.numpy(), data[:, 0].numpy()).pvalue),
        "two_sample_test": "Kolmogorov-Smirnov, 500 SDE samples (100 steps) vs the 300 data points",
        "two_sample_pvalue_ode": float(
            ks_2samp(samples[0.0]["ode"][:500].numpy(), data[:, 0].numpy()).pvalue
        ),
        "two_sample_pvalue_wrong_sampler": float(
            ks_2samp(
                (data.mean() + data.std() * torch.randn(500, generator=g)).numpy(), data[:, 0].numpy()
            ).pvalue
        ),  # fmt: skip
        "reward_region_mass": {str(b): float((v["sde"] > 0).float().mean()) for b, v in samples.items()},
        "reward_region_mass_ode": {str(b): float((v["ode"] > 0).float().mean()) for b, v in samples.items()},
        "reward_region_mass_optimum": {
            str(b): 0.4 * math.exp(b) / (0.4 * math.exp(b) + 0.6) for b in samples
        },
        "data_reward_region_mass": float((data > 0).float().mean()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if png is not None:

        def draw(plt):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            bins = torch.linspace(-4, 4, 61).numpy()
            ax.hist(
                data[:, 0].numpy(), bins=bins, density=True, color="grey", alpha=0.4, label="data (m=300)"
            )
            for b, v in samples.items():
                ax.hist(
                    v["sde"].numpy(),
                    bins=bins,
                    density=True,
                    histtype="step",
                    lw=1.5,
                    label=f"q-learning beta={b:g}",
                )
            ax.axvline(0, color="k", ls=":", lw=0.8)
            ax.set(xlabel="y", ylabel="density", title="gmm1d: reward region y > 0")
            ax.legend(fontsize=7)
            return fig

        _plot(png, draw)
    return out


# --- swissroll ------------------------------------------------------------------------------------------------
def swiss_roll(n: int, seed: int, noise: float = 0.3) -> torch.Tensor:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=noise, random_state=seed)
    return torch.tensor(x[:, [0, 2]] / 7.0, dtype=torch.float32)


def train_dsm(
    data: torch.Tensor, steps: int, seed: int, batch: int = 256, lr: float = 2e-3
) -> QLearningScoreModel:
    """Plain denoising score matching (epsilon loss, uniform s in [1e-3, 1]) of an EpsMLP: the pretrained model."""
    torch.manual_seed(seed)
    sch = LinearVPSchedule()
    net = EpsMLP(data.shape[1], hidden=128)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=g)]
        s = 1e-3 + (1 - 1e-3) * torch.rand(batch, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g)
        xs = sch.alpha(s).float()[:, None] * x0 + sch.sigma(s).float()[:, None] * eps
        loss = (net(s, xs) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return QLearningScoreModel(net.eval(), sch)


def run_swissroll(quick: bool, seed: int, png: Path | None, critic: str = "free") -> dict:
    from ctrl_core.algorithms import OptimConfig
    from ctrl_core.policy import GaussianScorePolicy
    from ctrl_core.problem import Problem
    from ctrl_core.recipes import make_trainer, pretrain_value
    from ctrl_core.value import MLPResidual

    torch.manual_seed(seed)
    beta, thr = 2.0, 0.5
    h = region(thr)
    data = swiss_roll(120, seed)
    clean = swiss_roll(20000, seed + 1, noise=0.0)
    big = swiss_roll(20000, seed + 2)
    w = torch.exp(beta * h(big))
    target = big[
        torch.multinomial(w / w.sum(), 2000, replacement=True, generator=torch.Generator().manual_seed(seed))
    ]
    sch = LinearVPSchedule()
    n_eval, eval_steps = 2000, 100

    def metrics(x: torch.Tensor) -> dict:
        return {"reward_region_mass": float(h(x).mean()),
                "nn_distance_to_data": float(torch.cdist(x.double(), clean.double()).min(1).values.mean()),
                "energy_distance_to_target": energy_distance(x, target)}  # fmt: skip

    results: dict[str, dict] = {}
    samples: dict[str, torch.Tensor] = {}
    t_all = time.perf_counter()
    # q-learning from scratch on the m = 120 samples
    t0 = time.perf_counter()
    it_q = 60 if quick else 200
    qcfg = QLearningConfig(iterations=it_q, batch_size=256, train_steps=40, reward_weight=beta, critic_target="monte_carlo",
                           critic=critic, critic_warmup=it_q // 2, seed=seed)  # fmt: skip
    model = scratch_model(sch, data, width=128)
    QLearningTrainer(model, data, h, qcfg).train()
    samples["qlearning"] = sample_model(model, n_eval, (2,), eval_steps, "sde", seed=seed + 1)
    results["qlearning_from_scratch"] = {
        **metrics(samples["qlearning"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # pretrained models and CTRL fine-tuning
    pre = {
        "good": train_dsm(swiss_roll(5000, seed + 3), 600 if quick else 4000, seed),
        "poor": train_dsm(data, 150, seed),
    }
    it_c = 30 if quick else 120
    for quality, pm in pre.items():
        t0 = time.perf_counter()
        samples[f"pretrained_{quality}"] = sample_model(pm, n_eval, (2,), eval_steps, "sde", seed=seed + 1)
        results[f"pretrained_{quality}"] = metrics(samples[f"pretrained_{quality}"])
        tuned = QLearningScoreModel.from_pretrained(pm)
        problem = Problem(
            GaussianScorePolicy(tuned, "ddpm"),
            (2,),
            lambda n, g: None,
            lambda n: None,
            lambda: MLPResidual(2),
        )
        sel = pretrain_value(
            problem, h, ["cos_sin"], num_paths=1024, steps=40, points_per_path=4, epochs=20, seed=seed
        )
        cfg = OptimConfig(iterations=it_c, batch_size=256, train_steps=40, train_timesteps=10, minibatch_size=256,
                          beta=1.0 / beta, lr=1e-3, advantage="temporal_difference", seed=seed)  # fmt: skip
        trainer = make_trainer(problem, h, cfg, sel.value)
        progress.train(trainer, f"bench.qlearning ctrl_{quality}")
        samples[f"ctrl_{quality}"] = sample_model(tuned, n_eval, (2,), eval_steps, "sde", seed=seed + 1)
        results[f"ctrl_{quality}"] = {
            **metrics(samples[f"ctrl_{quality}"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        # q-learning fine-tuning of the same pretrained model (the paper's "start from a pretrained model")
        t0 = time.perf_counter()
        qft = QLearningScoreModel.from_pretrained(pm)
        QLearningTrainer(qft, data, h, QLearningConfig(**{**qcfg.model_dump(), "iterations": it_q // 2, "critic_warmup": 0,
                                                          "lr": 5e-4})).train()  # fmt: skip
        samples[f"qlearning_from_{quality}"] = sample_model(
            qft, n_eval, (2,), eval_steps, "sde", seed=seed + 1
        )
        results[f"qlearning_from_{quality}"] = {**metrics(samples[f"qlearning_from_{quality}"]),
                                                "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    out = {
        "task": "swissroll",
        "m": 120,
        "quick": quick,
        "seed": seed,
        "critic": critic,
        "beta": beta,
        "ctrl_beta_kl": 1.0 / beta,
        "reward": f"h(y) = 1{{y_0 > {thr}}}",
        "target": "p* ∝ p_data exp(beta h) (Swiss roll resampled)",
        "pretraining": "denoising score matching of an MLP: good = 4000 steps on 5000 fresh samples, poor = 150 steps on the 120",
        "iterations": {"qlearning": it_q, "ctrl": it_c, "qlearning_finetune": it_q // 2},
        "eval": {"samples": n_eval, "sampler": "sde", "steps": eval_steps},
        "target_metrics": metrics(target[:n_eval]),
        "results": results,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    if png is not None:

        def draw(plt):
            keys = [
                "qlearning",
                "pretrained_good",
                "ctrl_good",
                "pretrained_poor",
                "ctrl_poor",
                "qlearning_from_poor",
            ]
            fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2), sharex=True, sharey=True)
            for ax, k in zip(axes, keys, strict=True):
                ax.scatter(clean[:3000, 0], clean[:3000, 1], s=1, c="lightgrey")
                ax.scatter(samples[k][:800, 0], samples[k][:800, 1], s=2)
                ax.axvline(thr, color="k", ls=":", lw=0.8)
                ax.set_title(k, fontsize=8)
            return fig

        _plot(png, draw)
    return out


# --- digits ---------------------------------------------------------------------------------------------------
def run_digits(
    quick: bool, seed: int, png: Path | None, critic: str = "linked", beta: float | None = None
) -> dict:
    from ctrl_core.embedded import NUM_CLASSES, digits_dataset
    from ctrl_core.evaluate import evaluate
    from ctrl_core.recipes import digits_problem
    from ctrl_core.rewards import make_reward

    torch.manual_seed(seed)
    problem = digits_problem(lora_rank=4)
    model = problem.policy.model
    data, labels = digits_dataset("all")
    reward = make_reward("jpeg_compressibility")
    beta = 10.0 if beta is None else beta
    cfg = QLearningConfig(iterations=6 if quick else 40, batch_size=32, train_steps=20, train_timesteps=4, reward_weight=beta,
                          ratio_samples=1, critic_target="monte_carlo", minibatch_size=64, lr=3e-4, critic_lr=1e-3,
                          s_min=2e-3, critic=critic, seed=seed)  # fmt: skip
    crit = make_critic(problem.x_shape, NUM_CLASSES, critic, model, reward, beta)
    trainer = QLearningTrainer(model, data, reward, cfg, problem.x_shape, crit,
                               problem.condition_sampler, labels)  # fmt: skip
    t0 = time.perf_counter()
    progress.train(trainer, "bench.qlearning digits")
    train_s = time.perf_counter() - t0
    n_eval, steps = (32, [20]) if quick else (128, [20, 50])
    results, kept = evaluate(problem.policy, reward, problem.x_shape, steps, ["sde", "ode"], n_eval,
                             problem.eval_conditions, seed=seed + 7, keep_samples=20)  # fmt: skip
    clf_reward = make_reward("classifier")
    fidelity = {}
    for which in ("base", "tuned"):
        x = kept[which][f"sde/{steps[0]}"]
        c = problem.eval_conditions(len(x))
        fidelity[which] = {"classifier_logp": float(clf_reward(x, c).mean()),
                           "nn_distance_to_data": float(torch.cdist(x.flatten(1), data.flatten(1)).min(1).values.mean())}  # fmt: skip
    out = {
        "task": "digits",
        "m": 1,
        "quick": quick,
        "seed": seed,
        "beta": beta,
        "setting": {
            "start": "shipped digits DDPM + LoRA rank 4 (q-learning from the pretrained model)",
            "reward": "jpeg_compressibility (-JPEG bytes / 100)",
            **cfg.model_dump(),
        },
        "evaluation": {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in results.items()},
        "fidelity_first20": fidelity,
        "history_reward": [round(s.reward_mean, 4) for s in trainer.history],
        "train_seconds": round(train_s, 1),
    }
    if png is not None:

        def draw(plt):
            fig, axes = plt.subplots(2, 1, figsize=(8, 2.4))
            for ax, which in zip(axes, ("base", "tuned"), strict=True):
                x = kept[which][f"sde/{steps[0]}"][:20, 0]
                ax.imshow(torch.cat(list(x), dim=1).clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_axis_off()
                ax.set_title(
                    f"{which}: reward {results['sde'][str(steps[0])].__dict__[which]:.3f}", fontsize=8
                )
            return fig

        _plot(png, draw)
    return out


def _over_seeds(first: dict, rest: list[dict]) -> dict:
    """Per-seed results plus, per method and metric, the mean and standard deviation over seeds; and the
    paper's claim checked per seed: q-learning from scratch vs CTRL of the poor and of the good model, by the
    energy distance to the target p* (lower is better)."""
    runs = [first, *rest]
    per_seed = {str(r["seed"]): r["results"] for r in runs}
    summary: dict[str, dict] = {}
    for method in first["results"]:
        summary[method] = {}
        for metric in ("reward_region_mass", "nn_distance_to_data", "energy_distance_to_target"):
            vals = torch.tensor([r["results"][method][metric] for r in runs], dtype=torch.float64)
            summary[method][metric] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std()) if len(vals) > 1 else 0.0,
            }

    def wins(a: str, b: str, metric: str = "energy_distance_to_target") -> int:
        return sum(r["results"][a][metric] < r["results"][b][metric] for r in runs)

    claim = {
        "seeds": len(runs),
        "qlearning_beats_ctrl_poor_energy": wins("qlearning_from_scratch", "ctrl_poor"),
        "qlearning_beats_ctrl_poor_nn": wins("qlearning_from_scratch", "ctrl_poor", "nn_distance_to_data"),
        "qlearning_beats_ctrl_good_energy": wins("qlearning_from_scratch", "ctrl_good"),
        "qlearning_beats_ctrl_good_nn": wins("qlearning_from_scratch", "ctrl_good", "nn_distance_to_data"),
    }
    return {**first, "seed": [r["seed"] for r in runs], "results_per_seed": per_seed, "summary": summary,
            "claim": claim, "seconds": round(sum(r["seconds"] for r in runs), 1)}  # fmt: skip


TASKS = {"gmm1d": run_gmm1d, "swissroll": run_swissroll, "digits": run_digits}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a few iterations (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--critic",
        choices=["linked", "free"],
        default=None,
        help="q-learning critic: CTRL's value net beta h(x_hat) + F (linked) or a free residual net; "
        "default: linked for digits (JPEG size varies smoothly with the image), free for the indicator "
        "rewards of gmm1d and swissroll (h(x_hat) is flat almost everywhere)",
    )
    ap.add_argument("--beta", type=float, default=None, help="digits: the reward weight (default 10)")
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="swissroll: repeat over this many seeds (data, models, "
        "sampling) and summarise each method's metrics as mean and standard deviation",
    )
    args = ap.parse_args(argv)
    png = args.json.with_suffix(".png") if args.json else None
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if args.beta is None else {"beta": args.beta}
    if args.critic is not None:
        extra["critic"] = args.critic
    if args.beta is not None and args.task != "digits":
        ap.error("--beta applies to the digits task (gmm1d sweeps beta; swissroll uses 2)")
    if args.seeds > 1 and args.task != "swissroll":
        ap.error("--seeds applies to the swissroll task")
    out = TASKS[args.task](args.quick, args.seed, png, **extra)
    if args.seeds > 1:
        out = _over_seeds(
            out, [TASKS[args.task](args.quick, args.seed + i, None, **extra) for i in range(1, args.seeds)]
        )
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
