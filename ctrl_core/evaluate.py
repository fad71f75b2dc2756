"""Evaluation across step counts and samplers: base vs fine-tuned on the same noise and conditions.

Base and tuned samples share the start noise, the conditions and (for the SDE) the noise of every step, so
the gain is a paired difference and its confidence interval is tight. The KL column is Theorem 3.1's running
reward integral along the tuned model's own paths: the KL between the tuned and base SDE path measures,
which bounds the KL of the terminal distributions (Thm 3.1 with the data-processing inequality).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .policy import GaussianScorePolicy, running_kl, sample


@dataclass
class Cell:
    base: float
    base_ci: float
    tuned: float
    tuned_ci: float
    gain: float
    gain_ci: float
    kl: float

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


def mean_ci(x: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval."""
    x = x.double()
    return float(x.mean()), float(1.96 * x.std() / math.sqrt(max(len(x), 1)))


@torch.no_grad()
def evaluate(
    policy: GaussianScorePolicy,
    reward_fn: Callable,
    x_shape: tuple[int, ...],
    steps_list: list[int],
    samplers: list[str],
    num_samples: int,
    condition_fn: Callable[[int], Tensor | None] = lambda n: None,
    seed: int = 1234,
    batch_size: int = 256,
    keep_samples: int = 0,
) -> tuple[dict[str, dict[str, Cell]], dict[str, dict[str, Tensor]]]:
    """Returns ({sampler: {steps: Cell}}, {"base"/"tuned": {f"{sampler}/{steps}": first keep_samples images}})."""
    if not steps_list or any(int(n) < 1 for n in steps_list):
        raise ValueError(f"evaluate.steps must be a non-empty list of step counts >= 1, got {steps_list}")
    if num_samples < 2:
        raise ValueError("evaluate.num_samples must be >= 2")
    conditions = condition_fn(num_samples)
    results: dict[str, dict[str, Cell]] = {}
    kept: dict[str, dict[str, Tensor]] = {"base": {}, "tuned": {}}
    for sampler in samplers:
        pol = policy.with_solver(sampler)
        results[sampler] = {}
        for n in steps_list:
            grid = pol.schedule.time_grid(int(n))
            base_r, tuned_r, kls = [], [], []
            for j in range(0, num_samples, batch_size):
                g = torch.Generator().manual_seed(seed + j)
                x0 = torch.randn((min(batch_size, num_samples - j), *x_shape), generator=g)
                c = None if conditions is None else conditions[j : j + len(x0)]
                state = g.get_state()
                base = sample(pol, x0, c, grid, g, use_pretrained=True)
                g.set_state(state)  # same step noise for the tuned model: paired comparison
                tuned = sample(pol, x0, c, grid, g, reference_steps=list(range(int(n))))
                base_r.append(reward_fn(base.sample, c).float())
                tuned_r.append(reward_fn(tuned.sample, c).float())
                kls.append(running_kl(pol.schedule, tuned).float())
                if j == 0 and keep_samples:
                    kept["base"][f"{sampler}/{n}"] = base.sample[:keep_samples].clone()
                    kept["tuned"][f"{sampler}/{n}"] = tuned.sample[:keep_samples].clone()
            b, t, kl = torch.cat(base_r), torch.cat(tuned_r), torch.cat(kls)
            (bm, bci), (tm, tci), (gm, gci) = mean_ci(b), mean_ci(t), mean_ci(t - b)
            results[sampler][str(n)] = Cell(bm, bci, tm, tci, gm, gci, float(kl.mean()))
    return results, kept


def robustness_ratio(results: dict[str, dict[str, Cell]], train_steps: int, train_sampler: str = "sde") -> dict:
    """min over step counts of gain / gain at the training step count, per sampler and overall.

    The reference gain is the training sampler's at the training step count (when evaluated), else the
    largest gain seen. A ratio near 1 means the gain does not depend on the discretisation.
    """
    ref_cells = results.get(train_sampler, {})
    ref = ref_cells.get(str(train_steps))
    ref_gain = ref.gain if ref is not None else max(c.gain for cells in results.values() for c in cells.values())
    out: dict[str, float | None] = {}
    if ref_gain <= 0:  # no gain to be robust about: the ratio is undefined (None, not NaN: JSON/KFP safe)
        return {"reference_gain": ref_gain, "overall": None}
    for sampler, cells in results.items():
        out[sampler] = min(c.gain for c in cells.values()) / ref_gain
    out["overall"] = min(out.values())
    out["reference_gain"] = ref_gain
    return out
