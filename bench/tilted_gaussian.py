"""CTRL on the tilted-Gaussian problem, against its closed-form optimum.

Data N(m0, s0^2) per dimension, the exact pretrained score, reward RM(x) = -k ||x - m||^2 and KL weight beta.
The KL-regularised optimum is p*(x) ∝ p_pre(x) exp(RM(x) / beta): per dimension a Gaussian with
precision 1/s0^2 + 2k/beta and mean (m0/s0^2 + 2k m/beta) / precision (docs/method.md#what-the-tests-prove).

    python -m bench.tilted_gaussian --dim 2 --data-mean 0 --data-std 1 --target 2 --k 1 --beta 1 --json OUT

Scalars broadcast to every dimension; comma-separated lists give per-dimension values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrl_core import progress
from ctrl_core.algorithms import OptimConfig
from ctrl_core.policy import sample
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.value import ValueFunction


def _vector(text: str, dim: int, name: str) -> torch.Tensor:
    vals = [float(v) for v in str(text).split(",")]
    if len(vals) == 1:
        vals = vals * dim
    if len(vals) != dim:
        raise SystemExit(f"--{name}: expected 1 or {dim} values, got {len(vals)}")
    return torch.tensor(vals)


def closed_form(m0, s0, m, k, beta):
    prec = 1 / s0**2 + 2 * k / beta
    return (m0 / s0**2 + 2 * k * m / beta) / prec, prec.rsqrt()


def run(
    dim: int,
    data_mean,
    data_std,
    target,
    k: float,
    beta: float,
    iterations: int,
    seed: int,
    eval_steps: int,
    eval_samples: int,
    **overrides,
) -> dict:
    torch.manual_seed(seed)
    m0, s0, m = (
        _vector(data_mean, dim, "data-mean"),
        _vector(data_std, dim, "data-std"),
        _vector(target, dim, "target"),
    )
    if torch.any(s0 <= 0):
        raise SystemExit("--data-std must be > 0")
    if beta <= 0:
        raise SystemExit("--beta must be > 0 (the optimum p* ∝ p_pre exp(RM/beta) needs it)")
    if k < 0:
        raise SystemExit("--k must be >= 0")
    cfg = OptimConfig(
        **{**TILTED_DEFAULTS, "iterations": iterations, "beta": beta, "seed": seed, **overrides}
    )
    problem = gaussian_problem(m0, s0, cfg.solver)
    reward = make_reward("quadratic", target=m.tolist(), k=k)
    trainer = make_trainer(problem, reward, cfg, ValueFunction(reward, problem.make_residual(), "cos_sin"))
    t0 = time.perf_counter()
    progress.train(trainer, f"bench.tilted_gaussian seed {seed}")
    train_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        x = sample(
            trainer.policy,
            torch.randn(eval_samples, dim, generator=g),
            None,
            trainer.policy.schedule.time_grid(eval_steps),
            g,
        ).sample
    fit_mean, fit_std = x.mean(0), x.std(0)
    opt_mean, opt_std = closed_form(m0, s0, m, k, beta)
    # relative error of the mean is taken against the optimum's scale (std), so a zero mean is well-defined
    rel_mean = ((fit_mean - opt_mean).abs() / torch.maximum(opt_mean.abs(), opt_std)).tolist()
    rel_std = ((fit_std - opt_std).abs() / opt_std).tolist()
    return {
        "dim": dim,
        "k": k,
        "beta": beta,
        "iterations": iterations,
        "solver": cfg.solver,
        "eval_steps": eval_steps,
        "data_mean": m0.tolist(),
        "data_std": s0.tolist(),
        "target": m.tolist(),
        "fitted_mean": fit_mean.tolist(),
        "fitted_std": fit_std.tolist(),
        "optimum_mean": opt_mean.tolist(),
        "optimum_std": opt_std.tolist(),
        "rel_error_mean": rel_mean,
        "rel_error_std": rel_std,
        "max_rel_error": max(rel_mean + rel_std),
        "final_kl": trainer.history[-1].kl,
        "train_seconds": round(train_s, 1),
    }


TILTED_DEFAULTS = dict(
    batch_size=512,
    train_steps=50,
    train_timesteps=20,
    minibatch_size=512,
    ppo_epochs=2,
    lr=1e-3,
    value_epochs=5,
    value_lr=3e-3,
    solver="euler_maruyama",
    advantage="temporal_difference",
    value_xhat="pretrained",
)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1)
    ap.add_argument("--data-mean", default="0")
    ap.add_argument("--data-std", default="1")
    ap.add_argument("--target", default="2")
    ap.add_argument("--k", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--eval-steps", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dim < 1:
        raise SystemExit("--dim must be >= 1")
    out = run(
        args.dim,
        args.data_mean,
        args.data_std,
        args.target,
        args.k,
        args.beta,
        args.iterations,
        args.seed,
        args.eval_steps,
        args.eval_samples,
    )
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
