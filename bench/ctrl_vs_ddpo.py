"""CTRL vs DDPO on the embedded default with the same sample budget (the paper's Fig. 1 and Fig. 7a, small).

Both start from the shipped digits DDPM with a fresh LoRA adapter of the same rank, use the same rollout
solver, reward, batch and number of iterations (so the same number of sampled trajectories and steps). DDPO
trains on its fixed grid of ``--train-steps`` steps; CTRL on random grids of the same size. Both are then
evaluated, on the same seeds and conditions, at several step counts with the SDE and the ODE sampler.

    python -m bench.ctrl_vs_ddpo --json bench/results/ctrl_vs_ddpo.json --plot bench/results/ctrl_vs_ddpo.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrl_core import progress
from ctrl_core.algorithms import OptimConfig
from ctrl_core.evaluate import evaluate, robustness_ratio
from ctrl_core.recipes import digits_problem, make_trainer, pretrain_value
from ctrl_core.rewards import make_reward


def run_algorithm(algorithm: str, args) -> dict:
    torch.manual_seed(args.seed)
    problem = digits_problem(lora_rank=args.lora_rank)
    reward = make_reward(args.reward)
    value, link_info = None, {}
    t0 = time.perf_counter()
    if algorithm == "ctrl":
        sel = pretrain_value(
            problem,
            reward,
            args.links.split(","),
            num_paths=args.value_paths,
            steps=args.train_steps,
            points_per_path=4,
            epochs=args.value_epochs,
            seed=args.seed,
        )
        value, link_info = sel.value, {"link": sel.chosen, "value_val_mse": sel.val_mse}
    pre_s = time.perf_counter() - t0
    cfg = OptimConfig(
        algorithm=algorithm,
        iterations=args.iterations,
        batch_size=args.batch_size,
        train_steps=args.train_steps,
        train_timesteps=args.train_timesteps,
        beta=args.beta,
        lr=args.lr,
        minibatch_size=args.minibatch_size,
        ppo_epochs=args.ppo_epochs,
        seed=args.seed,
    )
    trainer = make_trainer(problem, reward, cfg, value)
    history = progress.train(trainer, f"bench.ctrl_vs_ddpo {algorithm}")
    t1 = time.perf_counter()
    results, _ = evaluate(
        trainer.policy,
        reward,
        problem.x_shape,
        args.eval_steps,
        ["sde", "ode"],
        args.eval_samples,
        problem.eval_conditions,
        seed=args.seed + 1000,
    )
    eval_s = time.perf_counter() - t1
    per_it = lambda key: sum(getattr(h, key) for h in history) / max(len(history), 1)  # noqa: E731
    return {
        "reward_per_iteration": [h.reward_mean for h in history],
        "kl_per_iteration": [h.kl for h in history],
        "evaluation": {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in results.items()},
        "gain": {smp: {n: c.gain for n, c in cells.items()} for smp, cells in results.items()},
        "robustness": robustness_ratio(results, args.train_steps, "sde"),
        "seconds": {
            "value_pretrain": round(pre_s, 1),
            "train": round(t1 - t0 - pre_s, 1),
            "eval": round(eval_s, 1),
            "per_iteration": {
                "sample": per_it("sample_s"),
                "value": per_it("value_s"),
                "policy": per_it("policy_s"),
            },
        },
        **link_info,
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for alg, res in out["algorithms"].items():
        ax1.plot(res["reward_per_iteration"], label=alg)
        for smp, style in (("sde", "-o"), ("ode", "--s")):
            steps = sorted(res["gain"][smp], key=int)
            ax2.plot(
                [int(n) for n in steps], [res["gain"][smp][n] for n in steps], style, label=f"{alg} {smp}"
            )
    ax1.set(xlabel="iteration", ylabel="mean reward (training rollouts)", title="reward per iteration")
    ax2.axvline(out["train_steps"], color="grey", lw=0.8, ls=":")
    ax2.set(
        xscale="log",
        xlabel="sampling steps",
        ylabel="gain over base",
        title=f"gain vs steps (trained at {out['train_steps']})",
    )
    ax2.set_xticks(out["eval_steps"])
    ax2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", default="jpeg_compressibility")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--minibatch-size", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-timesteps", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument(
        "--links", default="cos_sin,linear,rm_only,f_only", help="candidates; the lowest held-out MSE is used"
    )
    ap.add_argument("--value-paths", type=int, default=256)
    ap.add_argument("--value-epochs", type=int, default=10)
    ap.add_argument("--eval-steps", type=lambda t: [int(v) for v in t.split(",")], default=[10, 20, 50, 100])
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--algorithms", default="ctrl,ddpo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = {
        "reward": args.reward,
        "train_steps": args.train_steps,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "eval_steps": args.eval_steps,
        "eval_samples": args.eval_samples,
        "beta": args.beta,
        "lr": args.lr,
        "torch_threads": torch.get_num_threads(),
        "algorithms": {},
    }
    for alg in args.algorithms.split(","):
        out["algorithms"][alg] = run_algorithm(alg, args)
    out["gain"] = {alg: res["gain"] for alg, res in out["algorithms"].items()}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(out, args.plot)
    print(json.dumps(out["gain"], indent=2))
    return out


if __name__ == "__main__":
    main()
