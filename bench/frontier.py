"""The reward-KL front of CTRL, DDPO and GRPO on the embedded default (the pipeline's problem and settings).

Each method is trained at several settings of the knob that trades reward for KL (CTRL: beta; DDPO: the
learning rate; GRPO: its KL-loss weight at one learning rate), over several seeds, every run with the same
budget of rollouts (optimize.iterations x optimize.batch_size) on the defaults of params.yaml. A run ("point") is
evaluated at its end with the SDE and the ODE sampler at the training step count (paired base/tuned samples,
``evaluate.evaluate``) and, every ``--snapshot-every`` iterations along training, with the SDE sampler alone: the
snapshots give the trajectories a method needs to reach a gain. Counted per point: trajectories (rollout paths,
CTRL's value-pretraining paths included) and reward calls (every sample the training's reward scored: terminal
rewards, value pretraining's returns and the value net's RM(x_hat); the evaluation's calls are not counted).
CTRL pretrains its value net in every point (the same data for the knob values of one seed; counted each time).

    python -m bench.frontier --json bench/results/frontier.json --plot bench/results/frontier.png --jobs 2

Resumable: each finished point is merged into the JSON at once (atomically), and a re-run skips the points there
with the same (alg, knob, value, seed) and the same setup (``config_hash``: the settings every point shares and
the variant's own); points of another setup are kept under ``superseded_points``, out of the summary. The
summary (``ctrl_core.front.summarise``) and the plot are rewritten after every point.

Variants: ``--algorithms ctrl,ddpo,grpo,ctrl:optimize.kl_form=exact`` (``alg:key=value,...``: params keys set
for that variant). Knobs: ``--knob ctrl=optimize.beta:0.1,0.01`` (per variant label or base algorithm).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

#: knob per base algorithm: (params key, values), spanning each method's front from low to high exact KL
#: (ranges from a seed-0 pilot of DDPO and the exact KL's growth with the update size; the seed-0 pass checks them)
KNOBS: dict[str, tuple[str, list[float]]] = {
    "ctrl": ("optimize.beta", [5.0, 2.0, 0.7, 0.3]),
    # the exact running reward penalises the near-final DDPM step ~100x more than Theorem 3.1's rate: smaller beta
    "ctrl:optimize.kl_form=exact": ("optimize.beta", [0.1, 0.03, 0.01, 0.003]),
    "ddpo": ("optimize.lr", [2e-4, 3e-4, 6e-4, 1.2e-3]),
    "grpo": ("optimize.grpo_kl", [1.0, 0.3, 0.1, 0.05]),
}
#: settings a method runs at besides its knob (GRPO's learning rate: high enough that grpo_kl = 0 passes the
#: largest KL level)
FIXED: dict[str, list[str]] = {"grpo": ["optimize.lr=0.002"]}
#: the tiny setup of the CI smoke (--quick)
QUICK = [
    "optimize.iterations=2",
    "optimize.batch_size=8",
    "optimize.group_size=4",
    "optimize.train_steps=4",
    "optimize.train_timesteps=2",
    "value.num_paths=8",
    "value.steps=4",
    "value.epochs=1",
    "value.candidates=[linear]",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'ctrl:optimize.kl_form=exact,optimize.lr=3e-4' -> ('ctrl', ['optimize.kl_form=exact', 'optimize.lr=3e-4'])."""
    base, _, rest = text.partition(":")
    return base, [item for item in rest.split(",") if item]


def config_hash(setup: dict) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]


def point_specs(args) -> list[dict]:
    """Every point to run, in order: the main methods (variants without ``:``) before the variants, and within
    each group seed by seed (a seed's front over every method completes before the next seed starts)."""
    variants = []
    for label in args.algorithms:
        base, extra = parse_variant(label)
        knob, values = args.knobs.get(label) or args.knobs[base]
        overrides = [*args.set, f"optimize.algorithm={base}", *FIXED.get(base, []), *extra]
        setup = {
            "overrides": overrides,
            "eval_samples": args.eval_samples,
            "snapshot_every": args.snapshot_every,
        }
        variants.append((label, knob, values, overrides, config_hash(setup)))
    specs = []
    for group in ([v for v in variants if ":" not in v[0]], [v for v in variants if ":" in v[0]]):
        for seed in args.seeds:
            for label, knob, values, overrides, digest in group:
                for value in values:
                    specs.append(
                        {
                            "alg": label,
                            "knob": knob,
                            "value": float(value),
                            "seed": seed,
                            "config_hash": digest,
                            "overrides": [
                                *overrides,
                                f"{knob}={value}",
                                f"run.seed={seed}",
                                f"optimize.seed={seed}",
                            ],
                            "eval_samples": args.eval_samples,
                            "snapshot_every": args.snapshot_every,
                            "progress": args.jobs == 1,
                        }
                    )
    return specs


def point_key(p: dict) -> tuple:
    return (p["alg"], p["knob"], float(p["value"]), int(p["seed"]), p["config_hash"])


class CountedReward:
    """The reward with a count of the samples it scored (``calls``); attributes pass through to the reward."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, c=None):
        self.calls += len(x)
        return self.fn(x, c)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def run_point(spec: dict) -> dict:
    """Train one setting at one seed and evaluate it (in a worker process with ``--jobs`` > 1)."""
    import torch

    from ctrl_core import progress
    from ctrl_core.evaluate import evaluate
    from ctrl_core.params import load
    from ctrl_core.recipes import collect_value_data, digits_problem, make_trainer
    from ctrl_core.rewards import make_reward
    from ctrl_core.value import ValueFunction, select_link

    t0 = time.perf_counter()
    params = load(None, spec["overrides"])
    cfg, vp, seed = params.optim_config(), params.value, params.run.seed
    torch.manual_seed(seed)  # the pipeline's steps seed the same way (steps._seed): the fresh LoRA adapter
    problem = digits_problem(lora_rank=params.model.lora_rank)
    raw = make_reward(params.reward.name, **params.reward.options)
    reward = CountedReward(raw)
    value, link, value_paths = None, None, 0
    if cfg.algorithm == "ctrl":  # as steps.pretrain_value: Monte-Carlo data of the base model, a link per fit
        data = collect_value_data(
            problem, reward, vp.num_paths, vp.steps, vp.points_per_path, seed, vp.batch_size
        )
        sel = select_link(
            lambda name: ValueFunction(reward, problem.make_residual(), name),
            data,
            vp.candidates,
            vp.epochs,
            vp.lr,
            seed=seed,
        )
        value, link, value_paths = sel.value, sel.chosen, vp.num_paths
    t_value = time.perf_counter()
    trainer = make_trainer(problem, reward, cfg, value)
    n_steps = cfg.train_steps

    def measure(samplers: list[str]) -> dict:
        cells, _ = evaluate(
            trainer.policy,
            raw,
            problem.x_shape,
            [n_steps],
            samplers,
            spec["eval_samples"],
            problem.eval_conditions,
            seed=params.evaluate.seed,
        )
        return {smp: cells[smp][str(n_steps)] for smp in samplers}

    curve, eval_s = [], [0.0]

    def snapshot(samplers: list[str]) -> dict:
        t = time.perf_counter()
        cells = measure(samplers)
        eval_s[0] += time.perf_counter() - t
        sde = cells["sde"]
        curve.append(
            {
                "iteration": trainer.iteration,
                "trajectories": value_paths + trainer.iteration * cfg.batch_size,
                "reward_calls": reward.calls,
                "gain_sde": sde.gain,
                "gain_ci": sde.gain_ci,
                "kl_exact": sde.kl_exact,
                "kl_thm31": sde.kl_thm31,
            }
        )
        return cells

    def on_iteration(stats) -> None:
        every = spec["snapshot_every"]
        if every > 0 and trainer.iteration % every == 0 and trainer.iteration < cfg.iterations:
            snapshot(["sde"])

    label = f"frontier {spec['alg']} {spec['knob']}={spec['value']:g} seed {seed}"
    if spec["progress"]:
        with progress.Bar(label, "iterations", cfg.iterations, show=("reward_mean", "kl")) as bar:

            def callback(stats) -> None:
                bar.update(stats.iteration + 1, **vars(stats))
                on_iteration(stats)

            history = trainer.train(callback)
    else:
        history = trainer.train(on_iteration)
    t_train = time.perf_counter() - t_value - eval_s[0]
    final = snapshot(["sde", "ode"])
    sde, ode = final["sde"], final["ode"]
    return {
        "alg": spec["alg"],
        "knob": spec["knob"],
        "value": spec["value"],
        "seed": seed,
        "config_hash": spec["config_hash"],
        "gain_sde": sde.gain,
        "gain_ode": ode.gain,
        "gain_ci": sde.gain_ci,
        "gain_ode_ci": ode.gain_ci,
        "kl_exact": sde.kl_exact,
        "kl_thm31": sde.kl_thm31,
        "kl_thm31_ode": ode.kl_thm31,
        "trajectories": value_paths + cfg.iterations * cfg.batch_size,
        "value_trajectories": value_paths,
        "reward_calls": reward.calls,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_detail": {
            "value_pretrain": round(t_value - t0, 1),
            "train": round(t_train, 1),
            "eval": round(eval_s[0], 1),
        },
        "train_kl_last": history[-1].kl if history else None,
        "train_reward_last": history[-1].reward_mean if history else None,
        "link": link,
        "curve": curve,
        "torch_threads": torch.get_num_threads(),
    }


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def write(path: Path | None, plot_path: Path | None, doc: dict, current: list[dict]) -> dict:
    from ctrl_core import front
    from ctrl_core.io import atomic_write_json

    summary = front.summarise(current)
    doc = {**doc, "points": current, **{k: summary[k] for k in ("gain_at_kl", "trajectories_to_reach")}}
    doc["reach_target"], doc["settings"] = summary["reach_target"], summary["settings"]
    if path is not None:
        atomic_write_json(doc, path)
    if plot_path is not None and summary["settings"]:
        front.plot(current, summary, plot_path)
    return doc


def parse_knob(text: str) -> tuple[str, tuple[str, list[float]]]:
    """'ctrl=optimize.beta:0.1,0.01' -> ('ctrl', ('optimize.beta', [0.1, 0.01]))."""
    label, _, rest = text.partition("=")
    key, _, values = rest.partition(":")
    if not (label and key and values):
        raise argparse.ArgumentTypeError(f"--knob {text!r}: expected alg=block.key:v1,v2,...")
    return label, (key, [float(v) for v in values.split(",")])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    ap.add_argument("--algorithms", type=lambda t: _split_variants(t), default=["ctrl", "ddpo", "grpo", "ctrl:optimize.kl_form=exact"],
                    help="variants: alg or alg:key=value,... (e.g. ctrl:optimize.kl_form=exact)")  # fmt: skip
    ap.add_argument("--knob", action="append", type=parse_knob, default=[],
                    help="alg=block.key:v1,v2,... (per variant label or base algorithm)")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], help="block.key=value for every point")
    ap.add_argument("--eval-samples", type=int, default=128, help="paired samples per evaluation")
    ap.add_argument(
        "--snapshot-every", type=int, default=10, help="SDE evaluation every N iterations (0: none)"
    )
    ap.add_argument("--jobs", type=int, default=1, help="points run side by side (processes, 1 thread each)")
    ap.add_argument("--quick", action="store_true", help="the CI smoke's tiny setup (see QUICK)")
    args = ap.parse_args(argv)
    args.knobs = {**KNOBS, **dict(args.knob)}
    if args.quick:
        args.set = [*QUICK, *args.set]
    specs = point_specs(args)
    doc: dict = {}
    if args.json is not None and args.json.is_file():
        doc = json.loads(args.json.read_text())
    hashes = {s["config_hash"] for s in specs}
    old = doc.get("points", []) + doc.get("superseded_points", []) + doc.get("off_grid_points", [])
    # a point of a variant this call runs is set aside under another setup (superseded) or at a knob value this
    # call does not run (off grid: back in the summary when a later call's grid has it); other variants' stay
    stale = lambda p: p.get("alg") in args.algorithms and p.get("config_hash") not in hashes  # noqa: E731
    grid = {point_key(s)[:3] for s in specs}
    off = lambda p: p.get("alg") in args.algorithms and point_key(p)[:3] not in grid  # noqa: E731
    current = [p for p in old if not stale(p) and not off(p)]
    doc["superseded_points"] = [p for p in old if stale(p)]
    doc["off_grid_points"] = [p for p in old if off(p) and not stale(p)]
    done = {point_key(p) for p in current}
    todo = [s for s in specs if point_key(s) not in done]
    doc.update(
        {
            "setup": {
                "set": args.set,
                "fixed": FIXED,
                "knobs": args.knobs,
                "eval_samples": args.eval_samples,
                "snapshot_every": args.snapshot_every,
                "gain": "sde sampler at the training step count",
                "kl": "exact KL of the sde chain at the training step count (evaluate.kl_exact)",
            },  # fmt: skip
            "ran": 0,
            "skipped": len(specs) - len(todo),
        }
    )
    print(f"bench.frontier: {len(specs)} points, {len(todo)} to run, {len(specs) - len(todo)} done",
          file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    from ctrl_core import progress

    doc["failed"] = []

    def failed(spec: dict, err: BaseException, done_count: int, bar) -> None:
        # a diverged run (a non-finite loss: optimize.on_nonfinite=error) is recorded, not retried in this call
        doc["failed"].append(
            {k: spec[k] for k in ("alg", "knob", "value", "seed", "config_hash")} | {"error": repr(err)}
        )
        write(args.json, args.plot, doc, current)
        bar.update(done_count)
        print(f"FAILED {spec['alg']} {spec['knob']}={spec['value']:g} seed {spec['seed']}: {err!r}",
              file=sys.stderr, flush=True)  # fmt: skip

    def finished(point: dict, done_count: int, bar) -> None:
        current.append(point)
        doc["ran"] += 1
        write(args.json, args.plot, doc, current)
        bar.update(done_count, gain=point["gain_sde"], kl_exact=point["kl_exact"])
        print(f"done {point['alg']} {point['knob']}={point['value']:g} seed {point['seed']}: gain_sde "
              f"{point['gain_sde']:.4f} kl_exact {point['kl_exact']:.3f} in {point['seconds']:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip

    with progress.Bar("bench.frontier", "points", len(todo), show=("gain", "kl_exact")) as bar:
        if args.jobs <= 1:
            for i, spec in enumerate(todo):
                try:
                    point = run_point(spec)
                except (FloatingPointError, RuntimeError) as err:
                    failed(spec, err, i + 1, bar)
                    continue
                finished(point, i + 1, bar)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(1,)
            ) as pool:
                futures = {pool.submit(run_point, s): s for s in todo}
                for i, fut in enumerate(as_completed(futures)):
                    try:
                        point = fut.result()
                    except (FloatingPointError, RuntimeError) as err:
                        failed(futures[fut], err, i + 1, bar)
                        continue
                    finished(point, i + 1, bar)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out = write(args.json, args.plot, doc, current)
    print(json.dumps({"gain_at_kl": out["gain_at_kl"], "trajectories_to_reach": out["trajectories_to_reach"]},
                     indent=1))  # fmt: skip
    return out


def _split_variants(text: str) -> list[str]:
    """'ctrl,ddpo,ctrl:optimize.kl_form=exact,optimize.lr=3e-4' -> variants: a comma starts a new variant unless
    the next item is a key=value of the current one."""
    out: list[str] = []
    for item in text.split(","):
        if "=" in item and ":" not in item.split("=", 1)[0] and out and ":" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
