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
import math
import time
from pathlib import Path

import torch

from ctrl_core import progress
from ctrl_core.algorithms import OptimConfig
from ctrl_core.policy import sample, step_coefficients
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.schedule import LinearVPSchedule
from ctrl_core.value import ValueFunction


def _vector(text: str, dim: int, name: str) -> torch.Tensor:
    vals = [float(v) for v in str(text).split(",")]
    if len(vals) == 1:
        vals = vals * dim
    if len(vals) != dim:
        raise SystemExit(f"--{name}: expected 1 or {dim} values, got {len(vals)}")
    return torch.tensor(vals)


def closed_form(m0, s0, m, k, beta):
    """Per dimension: the optimum's mean and std (k may differ per dimension)."""
    prec = 1 / s0**2 + 2 * k / beta
    return (m0 / s0**2 + 2 * k * m / beta) / prec, prec.rsqrt()


def discrete_optimum(m0, s0, m, k, beta, solver: str, train_steps: int, eval_steps: int) -> dict:
    """The best the training grid allows, computed exactly (no training): per dimension, the affine control
    u_j = a_j + b_j x that maximises E[RM(X_0)] - beta * sum_j g^2(s_j)/2 u_j^2 Delta_j (Theorem 3.1's KL, the
    trainer's running reward) for the ``solver`` chain on the uniform ``train_steps`` grid, by the backward
    Riccati recursion of this linear-quadratic problem. Returns that chain's terminal mean and std, and those of
    the same control (interpolated in s) sampled on the ``eval_steps`` grid, the way the bench evaluates. The
    gap to ``closed_form`` is a bias of training on a coarse grid: a mean-only control of a discrete chain
    cannot narrow each step's kernel, as the continuous optimum's tilt does, so the discrete optimum is wider."""
    sch = LinearVPSchedule()

    def coefficients(grid, m0_i, s0_i):
        rows = []
        for j in range(grid.numel() - 1):
            s, s_next = float(grid[j]), float(grid[j + 1])
            var = float(sch.alpha(s)) ** 2 * s0_i**2 + float(sch.sigma(s)) ** 2
            c = step_coefficients(sch, solver, s, s_next)
            weight = 0.5 * beta * float(sch.g2(s)) * (s - s_next)
            rows.append(
                (s, float(c.A), float(c.B), float(c.std), float(sch.alpha(s)) * m0_i / var, -1 / var, weight)
            )
        return rows

    def terminal(rows, control):
        mean, var = 0.0, 1.0
        for j, (s, A, B, std, p, q, _) in enumerate(rows):
            a, b = control(j, s)
            gain = A + B * (q + b)
            mean, var = gain * mean + B * (p + a), gain * gain * var + std * std
        return mean, math.sqrt(var)

    out = {"train_mean": [], "train_std": [], "eval_mean": [], "eval_std": []}
    for m0_i, s0_i, m_i, k_i in zip(m0.tolist(), s0.tolist(), m.tolist(), k.tolist(), strict=True):
        rows = coefficients(sch.time_grid(train_steps), m0_i, s0_i)
        P, Q = k_i, 2 * k_i * m_i  # the value at the end: -P x^2 + Q x
        law = [None] * len(rows)
        for j in reversed(range(len(rows))):
            s, A, B, std, p, q, w = rows[j]
            G, H = A + B * q, B * p  # the step's mean without control: G x + H
            den = 2 * P * B * B + 2 * w
            b, a = -2 * P * B * G / den, (Q * B - 2 * P * B * H) / den
            law[j] = (s, a, b)
            yg, yh = G + B * b, H + B * a
            P, Q = P * yg * yg + w * b * b, -2 * P * yg * yh + Q * yg - 2 * w * a * b
        ss = torch.tensor([row[0] for row in law[::-1]], dtype=torch.float64)
        a_s = torch.tensor([row[1] for row in law[::-1]], dtype=torch.float64)
        b_s = torch.tensor([row[2] for row in law[::-1]], dtype=torch.float64)

        def interpolated(j, s, ss=ss, a_s=a_s, b_s=b_s):
            i = int(torch.searchsorted(ss, torch.tensor(s, dtype=torch.float64)).clamp(1, ss.numel() - 1))
            t = (s - float(ss[i - 1])) / float(ss[i] - ss[i - 1])
            t = min(max(t, 0.0), 1.0)
            return (
                float(a_s[i - 1] + t * (a_s[i] - a_s[i - 1])),
                float(b_s[i - 1] + t * (b_s[i] - b_s[i - 1])),
            )

        for key, (mean, std) in (
            ("train", terminal(rows, lambda j, s, law=law: law[j][1:])),
            ("eval", terminal(coefficients(sch.time_grid(eval_steps), m0_i, s0_i), interpolated)),
        ):
            out[f"{key}_mean"].append(mean)
            out[f"{key}_std"].append(std)
    return out


def _quadratic(target: torch.Tensor, k: torch.Tensor):
    """RM(x) = -sum_i k_i (x_i - m_i)^2: make_reward's quadratic where every k_i is the same."""
    if bool(torch.all(k == k[0])):
        return make_reward("quadratic", target=target.tolist(), k=float(k[0]))

    def fn(x: torch.Tensor, conditions=None) -> torch.Tensor:
        return -(k * (x.float() - target).pow(2)).sum(1)

    return fn


def run(
    dim: int,
    data_mean,
    data_std,
    target,
    k,
    beta: float,
    iterations: int,
    seed: int,
    eval_steps: int,
    eval_samples: int,
    link: str = "cos_sin",
    **overrides,
) -> dict:
    """One CTRL run; ``k`` a number or per-dimension values ("1,4"); ``overrides`` replace TILTED_DEFAULTS."""
    torch.manual_seed(seed)
    m0, s0, m, kv = (
        _vector(data_mean, dim, "data-mean"),
        _vector(data_std, dim, "data-std"),
        _vector(target, dim, "target"),
        _vector(k, dim, "k"),
    )
    if torch.any(s0 <= 0):
        raise SystemExit("--data-std must be > 0")
    if beta <= 0:
        raise SystemExit("--beta must be > 0 (the optimum p* ∝ p_pre exp(RM/beta) needs it)")
    if torch.any(kv < 0):
        raise SystemExit("--k must be >= 0")
    cfg = OptimConfig(
        **{**TILTED_DEFAULTS, "iterations": iterations, "beta": beta, "seed": seed, **overrides}
    )
    problem = gaussian_problem(m0, s0, cfg.solver)
    reward = _quadratic(m, kv)
    trainer = make_trainer(problem, reward, cfg, ValueFunction(reward, problem.make_residual(), link))
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
    opt_mean, opt_std = closed_form(m0, s0, m, kv, beta)
    # relative error of the mean is taken against the optimum's scale (std), so a zero mean is well-defined
    rel_mean = ((fit_mean - opt_mean).abs() / torch.maximum(opt_mean.abs(), opt_std)).tolist()
    rel_std = ((fit_std - opt_std).abs() / opt_std).tolist()
    floor = discrete_optimum(m0, s0, m, kv, beta, cfg.solver, cfg.train_steps, eval_steps)
    floor_mean, floor_std = torch.tensor(floor["eval_mean"]), torch.tensor(floor["eval_std"])
    return {
        "dim": dim,
        "k": float(kv[0]) if bool(torch.all(kv == kv[0])) else kv.tolist(),
        "beta": beta,
        "tilt": (2 * kv / beta).tolist(),  # 2k/beta per dimension: the tilt's precision over the data's 1
        "iterations": iterations,
        "solver": cfg.solver,
        "eval_steps": eval_steps,
        "settings": {key: getattr(cfg, key) for key in sorted({**TILTED_DEFAULTS, **overrides})}
        | {"link": link},
        "data_mean": m0.tolist(),
        "data_std": s0.tolist(),
        "target": m.tolist(),
        "fitted_mean": fit_mean.tolist(),
        "fitted_std": fit_std.tolist(),
        "optimum_mean": opt_mean.tolist(),
        "optimum_std": opt_std.tolist(),
        "rel_error_mean": rel_mean,
        "rel_error_std": rel_std,
        "max_rel_error_mean": max(rel_mean),
        "max_rel_error_std": max(rel_std),
        "max_rel_error": max(rel_mean + rel_std),
        # the exact optimum of the training grid's discrete problem, sampled on the eval grid: the error floor
        "grid_optimum_mean": floor["eval_mean"],
        "grid_optimum_std": floor["eval_std"],
        "grid_rel_error_mean": (
            (floor_mean - opt_mean.double()) / torch.maximum(opt_mean.abs(), opt_std)
        ).tolist(),
        "grid_rel_error_std": ((floor_std - opt_std.double()) / opt_std).tolist(),
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


#: the sweep's cases: 2k/beta in {1, 2, 4, 8}, 1-D, and 2-D anisotropic in the data and the tilt (2k/beta = g, g/2)
SWEEP_TILTS = (1.0, 2.0, 4.0, 8.0)


def sweep_cases(tilts=SWEEP_TILTS, beta: float = 1.0) -> list[dict]:
    cases = []
    for g in tilts:
        cases.append(dict(dim=1, data_mean="0", data_std="1", target="2", k=f"{g * beta / 2}", beta=beta))
    for g in tilts:
        k = f"{g * beta / 2},{g * beta / 4}"
        cases.append(dict(dim=2, data_mean="0,0.5", data_std="1,0.8", target="2,-1", k=k, beta=beta))
    return cases


def _setting(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1)
    ap.add_argument("--data-mean", default="0")
    ap.add_argument("--data-std", default="1")
    ap.add_argument("--target", default="2")
    ap.add_argument("--k", default="1", help="reward curvature, one value or one per dimension")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--eval-steps", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--link", default="cos_sin", help="the value net's link function (ctrl_core.value.LINKS)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an optimize setting over TILTED_DEFAULTS (repeatable), e.g. --set advantage=finite_difference",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="run 2k/beta in {1, 2, 4, 8}, 1-D and anisotropic 2-D (the problem flags are then ignored)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dim < 1:
        raise SystemExit("--dim must be >= 1")
    overrides = dict(_setting(s) for s in args.set)
    common = dict(
        iterations=args.iterations,
        seed=args.seed,
        eval_steps=args.eval_steps,
        eval_samples=args.eval_samples,
        link=args.link,
        **overrides,
    )
    if args.sweep:
        cases = [run(**case, **common) for case in sweep_cases(beta=args.beta)]
        out = {
            "cases": cases,
            "max_rel_error_mean": max(c["max_rel_error_mean"] for c in cases),
            "max_rel_error_std": max(c["max_rel_error_std"] for c in cases),
        }
    else:
        out = run(args.dim, args.data_mean, args.data_std, args.target, args.k, args.beta, **common)
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
