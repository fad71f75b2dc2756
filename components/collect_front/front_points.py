"""A sweep's front: one point per child, the front's summary, and the child the sweep registers (torch-free).

A child's point is what ``bench.frontier`` writes for one training run (``ctrl_core/front.py`` describes the
fields), read from the child's evaluation: ``gain_sde`` / ``gain_ci`` / ``kl_exact`` / ``kl_thm31`` are the cell
of the sampler that runs the training chain at the training step count (the cell ``steps.evaluate`` takes as the
robustness reference; the sde sampler for the default ddpm training), ``gain_ode`` the ode cell at that step
count. The labels come from the swept keys:

* ``seed``: the swept seed key's value (``run.seed``, ``optimize.seed`` or ``qlearning.seed``); with several
  swept seed keys, the index of the child's seed combination; with none, the child's ``run.seed``;
* ``knob`` / ``value``: the first swept key that is not a seed and has numbers for values (``optimize.beta``),
  else ``none`` / 0;
* ``alg``: ``optimize.algorithm``, with every other swept key appended as a variant
  (``ctrl:optimize.kl_form=exact``, as bench.frontier names variants).

So a setting of the front (alg, knob, value) is one combination of the swept keys, averaged over the seeds.
``trajectories`` counts the paths a child's training consumed, the shared value pretraining's included (as
bench.frontier counts them). ``reward_calls`` is None: the pipeline's steps do not count reward calls.

The best child: among the settings whose mean exact KL is at most ``max_kl`` (None: no limit), the one with the
highest mean gain -- chosen on the mean over seeds, so one lucky seed does not pick a setting -- and of its seeds
the child with the highest gain whose own exact KL is within the limit: the adapter the sweep registers.
"""

from __future__ import annotations

from typing import Any

from ctrl_core import front
from ctrl_core.config import SOLVER_ALIASES
from ctrl_core.params import Params

#: swept keys that are seeds: the front averages over them
SEED_KEYS = ("run.seed", "optimize.seed", "qlearning.seed")
#: the knob of a sweep that sweeps no number besides seeds
NO_KNOB = "none"


def _canonical(sampler: str) -> str:
    return SOLVER_ALIASES.get(sampler, sampler)


def train_cell(params: Params) -> tuple[str | None, str]:
    """(the ``evaluate.samplers`` name that runs the training chain, or None; the training step count as the
    evaluation's key): optimize.solver at optimize.eta and optimize.train_steps, as ``steps.evaluate`` reads them
    (``evaluate.training_sampler``: a DDIM-family solver at 0 < eta < 1 has no evaluation sampler)."""
    solver, eta = _canonical(params.optimize.solver), params.optimize.eta
    if solver in ("ddpm", "ddim") and eta != -1.0:
        solver = {1.0: "ddpm", 0.0: "ddim"}.get(float(eta))
    name = next((s for s in params.evaluate.samplers if _canonical(s) == solver), None)
    return name, str(params.optimize.train_steps)


def missing_train_cell(params: Params) -> str | None:
    """Why the evaluation of ``params`` would have no point for the front (None: it has one)."""
    sampler, steps = train_cell(params)
    o = params.optimize
    if sampler is None:
        return (
            f"evaluate.samplers {params.evaluate.samplers} has no sampler for the training chain "
            f"(optimize.solver={o.solver}, optimize.eta={o.eta}); the front compares that sampler's gain"
        )
    if int(steps) not in params.evaluate.steps:
        return (
            f"evaluate.steps {params.evaluate.steps} lacks optimize.train_steps={steps}; the front compares the "
            "gain at the training step count"
        )
    return None


def swept_values(params: Params, keys: list[str]) -> dict[str, Any]:
    """``{block.key: value}`` of the swept ``keys`` in a child's parameters."""
    return {k: getattr(getattr(params, k.split(".")[0]), k.split(".", 1)[1]) for k in keys}


def trajectories(params: Params) -> int:
    """The paths a child's training consumed: its rollouts, plus CTRL's value-pretraining paths."""
    if params.optimize.algorithm == "qlearning":
        return params.qlearning.iterations * params.qlearning.batch_size
    value = params.value.num_paths if params.optimize.algorithm == "ctrl" else 0
    return value + params.optimize.iterations * params.optimize.batch_size


def _text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def points(
    children: list[Params], swept: list[dict[str, Any]], evaluations: list[dict], optimizations: list[dict]
) -> list[dict]:
    """One front point per child (in child order); ``swept[i]`` is child i's ``{block.key: value}``,
    ``evaluations[i]`` / ``optimizations[i]`` its evaluate / ctrl_optimize task outputs."""
    keys = list(swept[0]) if swept else []
    seeds = [k for k in keys if k in SEED_KEYS]
    knob = next((k for k in keys if k not in SEED_KEYS and all(_is_number(s[k]) for s in swept)), None)
    variants = [k for k in keys if k not in SEED_KEYS and k != knob]
    combos = sorted({tuple(s[k] for k in seeds) for s in swept})
    out = []
    for i, (p, s, ev, opt) in enumerate(zip(children, swept, evaluations, optimizations, strict=True)):
        sampler, steps = train_cell(p)
        cells = ev["evaluation"]
        cell = (cells.get(sampler) or {}).get(steps) if sampler else None
        ode = next((c[steps] for name, c in cells.items() if _canonical(name) == "ddim" and steps in c), None)
        if len(seeds) == 1:
            seed = int(s[seeds[0]])
        else:
            seed = combos.index(tuple(s[k] for k in seeds)) if seeds else p.run.seed
        alg = p.optimize.algorithm
        if variants:
            alg += ":" + ",".join(f"{k}={_text(s[k])}" for k in variants)
        out.append(
            {
                "child": i,
                "swept": dict(s),
                "alg": alg,
                "knob": knob or NO_KNOB,
                "value": float(s[knob]) if knob else 0.0,
                "seed": seed,
                "sampler": sampler,
                "steps": int(steps),
                "gain_sde": None if cell is None else cell["gain"],
                "gain_ode": None if ode is None else ode["gain"],
                "gain_ci": None if cell is None else cell["gain_ci"],
                "kl_exact": None if cell is None else cell.get("kl_exact"),
                "kl_thm31": None if cell is None else cell.get("kl_thm31", cell.get("kl")),
                "trajectories": trajectories(p),
                "reward_calls": None,
                "seconds": round(float(opt.get("wall_s", 0.0)) + float(ev.get("wall_s", 0.0)), 2),
            }
        )
    return out


def summarise(points_: list[dict], max_kl: float | None = None) -> dict:
    """``front.summarise`` of the points, plus the KL budget ``max_kl`` among its levels. front.settings averages
    ``reward_calls``, which the pipeline does not count: they are summarised as 0 and reported as None."""
    levels = sorted({*front.KL_LEVELS, *([max_kl] if max_kl is not None else [])})
    counted = [{**p, "reward_calls": p["reward_calls"] or 0} for p in points_]
    summary = front.summarise(counted, levels)
    for row in summary["settings"]:
        row["reward_calls"] = None
    return summary


def best_child(points_: list[dict], summary: dict, max_kl: float | None = None) -> int:
    """The child to register (see the module docstring); ValueError when no setting is within ``max_kl``."""
    within = lambda kl: kl is not None and (max_kl is None or kl <= max_kl)  # noqa: E731
    rows = [r for r in summary["settings"] if within(r["kl_exact"])]
    if not rows:
        have = ", ".join(
            f"{r['alg']} {r['knob']}={r['value']:g}: {r['kl_exact']:.4g}" for r in summary["settings"]
        )
        raise ValueError(
            f"no setting of the sweep has a mean exact KL within --max-kl {max_kl} ({have or 'no point has an exact KL'})"
        )
    best = max(rows, key=lambda r: r["gain"])
    mine = [
        p
        for p in points_
        if (p["alg"], p["knob"], p["value"]) == (best["alg"], best["knob"], best["value"])
        and within(p["kl_exact"])
        and p["gain_sde"] is not None
    ]
    return max(mine, key=lambda p: p["gain_sde"])["child"]


def document(
    points_: list[dict], summary: dict, best: int | None, keys: list[str], max_kl: float | None
) -> dict:
    """front.json: bench.frontier's document (points, settings, gain_at_kl, reach_target, trajectories_to_reach,
    setup) with the sweep's own part (keys, max_kl, the best child)."""
    return {
        "setup": {
            "gain": "the training sampler at the training step count (evaluate's cell)",
            "kl": "exact KL of that chain at the training step count (evaluate.kl_exact)",
        },
        "points": points_,
        "settings": summary["settings"],
        "gain_at_kl": summary["gain_at_kl"],
        "reach_target": summary["reach_target"],
        "trajectories_to_reach": summary["trajectories_to_reach"],
        "sweep": {
            "keys": keys,
            "max_kl": max_kl,
            "best": best,
            "best_swept": None if best is None else points_[best]["swept"],
        },
    }
