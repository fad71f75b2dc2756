"""The reward-KL front: gain against exact KL per method, from evaluated training runs ("points").

A point is a plain dict, one training run evaluated at its end (``bench.frontier`` writes them; a sweep of
pipeline runs can build them from each run's evaluation):

    {alg, knob, value, seed, gain_sde, gain_ode, gain_ci, kl_exact, kl_thm31, trajectories, reward_calls,
     seconds, [curve]}

``alg`` names the method (or a variant of it, ``ctrl:optimize.kl_form=exact``); ``knob``/``value`` the setting
that trades reward for KL; ``gain_sde`` the paired gain over the base model with the training sampler at the
training step count, ``kl_exact`` the exact KL of that discrete chain to the base chain (both from
``evaluate.evaluate``); ``trajectories`` the sampled paths the run consumed (value pretraining included).
``curve`` (optional) lists the same measurements at snapshots along training, each
``{iteration, trajectories, reward_calls, gain_sde, gain_ci, kl_exact}``; the last is the point itself.

A *setting* is (alg, knob, value) with its seeds: its gain and exact KL are the means over seeds, the gain's
95% confidence interval Student's t over the seeds (a between-seed interval: training and evaluation noise).

Pure Python: no torch; matplotlib only inside :func:`plot`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

#: the exact-KL budgets at which methods are compared
KL_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0)

# two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond the table)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T975.update({15: 2.131, 20: 2.086, 30: 2.042})


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (the nearest smaller tabulated one)."""
    if df < 1:
        return math.nan
    return _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96


def mean_ci(values: Iterable[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% t interval); the interval is None for a single value."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci of no values")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def settings(points: list[dict]) -> list[dict]:
    """One row per (alg, knob, value): means over its seeds, sorted by alg then mean exact KL."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        if p.get("kl_exact") is None or p.get("gain_sde") is None:
            continue
        groups.setdefault((p["alg"], p["knob"], float(p["value"])), []).append(p)
    rows = []
    for (alg, knob, value), ps in groups.items():
        gain, gain_ci = mean_ci(p["gain_sde"] for p in ps)
        kl, kl_ci = mean_ci(p["kl_exact"] for p in ps)
        rows.append(
            {
                "alg": alg,
                "knob": knob,
                "value": value,
                "seeds": sorted(p["seed"] for p in ps),
                "gain": gain,
                "gain_ci": gain_ci,
                "gain_ode": mean_ci(p["gain_ode"] for p in ps)[0]
                if all(p.get("gain_ode") is not None for p in ps)
                else None,
                "kl_exact": kl,
                "kl_ci": kl_ci,
                "kl_thm31": mean_ci(p["kl_thm31"] for p in ps)[0]
                if all(p.get("kl_thm31") is not None for p in ps)
                else None,
                "trajectories": statistics.fmean(p["trajectories"] for p in ps),
                "reward_calls": statistics.fmean(p["reward_calls"] for p in ps),
            }
        )
    return sorted(rows, key=lambda r: (r["alg"], r["kl_exact"]))


def gain_at_kl(rows: list[dict], levels: Iterable[float] = KL_LEVELS) -> dict[str, dict[str, dict | None]]:
    """Per alg and KL level: the setting with the best mean gain among those whose mean exact KL is <= the
    level, as {gain, gain_ci, kl_exact, knob, value, seeds}; None where no setting is within the level."""
    out: dict[str, dict[str, dict | None]] = {}
    for alg in sorted({r["alg"] for r in rows}):
        out[alg] = {}
        for level in levels:
            within = [r for r in rows if r["alg"] == alg and r["kl_exact"] <= level]
            best = max(within, key=lambda r: r["gain"], default=None)
            out[alg][_level_key(level)] = (
                None
                if best is None
                else {k: best[k] for k in ("gain", "gain_ci", "kl_exact", "knob", "value", "seeds")}
            )
    return out


def _level_key(level: float) -> str:
    return f"{level:g}"


def _snapshots(point: dict) -> list[dict]:
    return point.get("curve") or [
        {k: point[k] for k in ("trajectories", "reward_calls", "gain_sde", "kl_exact")} | {"iteration": None}
    ]


def trajectories_to_reach(
    points: list[dict], target: float | None, kl_level: float
) -> dict[str, float | None]:
    """Per alg: the fewest trajectories (mean over seeds) after which some setting's mean gain over its seeds
    reaches ``target`` with a mean exact KL <= ``kl_level``, read off the points' snapshots (``curve``; a point
    without one is a single snapshot at its end). Snapshot j of a setting averages snapshot j of its seeds (the
    seeds share the schedule). None where no snapshot of any setting gets there (or ``target`` is None)."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["alg"], p["knob"], float(p["value"])), []).append(p)
    out: dict[str, float | None] = {alg: None for alg, _, _ in groups}
    if target is None:
        return out
    for (alg, _, _), ps in groups.items():
        curves = [_snapshots(p) for p in ps]
        for j in range(min(len(c) for c in curves)):
            snaps = [c[j] for c in curves]
            if any(s.get("kl_exact") is None or s.get("gain_sde") is None for s in snaps):
                continue
            gain = statistics.fmean(s["gain_sde"] for s in snaps)
            kl = statistics.fmean(s["kl_exact"] for s in snaps)
            if gain >= target and kl <= kl_level:
                used = statistics.fmean(s["trajectories"] for s in snaps)
                out[alg] = used if out[alg] is None else min(out[alg], used)
                break  # later snapshots of this setting used more trajectories
    return out


def summarise(
    points: list[dict],
    levels: Iterable[float] = KL_LEVELS,
    reference: str = "ddpo",
    reference_kl: float = 1.0,
) -> dict:
    """{"settings", "gain_at_kl", "reach_target", "trajectories_to_reach"}: the front per method, and the
    trajectories each method needs to reach the best mean gain ``reference`` reaches at exact KL <=
    ``reference_kl`` (at that KL budget too)."""
    rows = settings(points)
    at_kl = gain_at_kl(rows, levels)
    ref = at_kl.get(reference, {}).get(_level_key(reference_kl))
    target = None if ref is None else ref["gain"]
    return {
        "settings": rows,
        "gain_at_kl": at_kl,
        "reach_target": {"reference": reference, "kl_level": reference_kl, "gain": target},
        "trajectories_to_reach": trajectories_to_reach(points, target, reference_kl),
    }


def plot(points: list[dict], summary: dict, path) -> None:
    """The front: mean gain (training sampler) against mean exact KL per setting, one curve per method in order
    of KL, seeds as error bars (95% t intervals) and as faint dots; the KL levels as dotted lines."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, alg in enumerate(sorted({r["alg"] for r in rows})):
        color = f"C{i}"
        mine = [r for r in rows if r["alg"] == alg]
        ax.errorbar(
            [r["kl_exact"] for r in mine],
            [r["gain"] for r in mine],
            xerr=[r["kl_ci"] or 0.0 for r in mine],
            yerr=[r["gain_ci"] or 0.0 for r in mine],
            fmt="-o",
            color=color,
            capsize=3,
            label=f"{alg} ({mine[0]['knob'].split('.')[-1]})",
        )
        for r in mine:
            ax.annotate(f"{r['value']:g}", (r["kl_exact"], r["gain"]), fontsize=7, color=color,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        seeds = [p for p in points if p["alg"] == alg and p.get("kl_exact") is not None]
        ax.scatter(
            [p["kl_exact"] for p in seeds], [p["gain_sde"] for p in seeds], s=8, color=color, alpha=0.3
        )
    for level in KL_LEVELS:
        ax.axvline(level, color="grey", lw=0.6, ls=":")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set(xlabel="exact KL to the base chain (sde, training steps)", ylabel="reward gain over base (sde)",
           title="reward-KL front (mean over seeds, 95% t intervals)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
