"""Evaluation across step counts and samplers: base vs fine-tuned on the same noise and conditions.

Base and tuned samples share the start noise, the conditions and (for the SDE) the noise of every step, so
the gain is a paired difference and its confidence interval is tight. Two KL columns, both averaged over the
tuned model's own paths:

- ``kl_exact``: the exact KL between the tuned and the base *discrete* chains, the sum of per-step Gaussian
  KLs (``policy.exact_path_kl``). It bounds the KL of the terminal distributions (data-processing inequality).
  Only a stochastic sampler (sde/ddpm, euler_maruyama) has one; a deterministic sampler (ode/ddim, heun) has no
  path density, and its ``kl_exact`` is None.
- ``kl_thm31``: Theorem 3.1's running-reward sum, sum_k g^2/2 ||mu_theta - mu_pre||^2 Delta_k
  (``policy.running_kl``): the continuous-time SDE's path KL, which the discrete chain's KL approaches only as
  the grid refines (docs/method.md, "KL"). Along an ODE sampler's paths it is the same integral evaluated on
  deterministic paths: a measure of how far the tuned score moved, not a path KL.

``kl`` is ``kl_thm31`` under its old name (the registry's gate, the model card and MLflow read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .policy import GaussianScorePolicy, canonical_solver, exact_path_kl, running_kl, sample


@dataclass
class Cell:
    base: float
    base_ci: float
    tuned: float
    tuned_ci: float
    gain: float
    gain_ci: float
    kl_thm31: float
    kl_exact: float | None  # None: a deterministic sampler has no path KL (None, not NaN: JSON/KFP safe)

    @property
    def kl(self) -> float:
        """Theorem 3.1's sum, under the name older readers use."""
        return self.kl_thm31

    def as_dict(self) -> dict:
        out = {k: None if v is None else round(v, 6) for k, v in self.__dict__.items()}
        return {**out, "kl": out["kl_thm31"]}


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
    on_cell: Callable[[str, str, Cell], None] | None = None,
) -> tuple[dict[str, dict[str, Cell]], dict[str, dict[str, Tensor]]]:
    """Returns ({sampler: {steps: Cell}}, {"base"/"tuned": {f"{sampler}/{steps}": first keep_samples images}}).

    ``samplers``: solver names of ``policy.sample`` (sde = ddpm, ode = ddim, euler_maruyama, heun), each at its
    default eta; two names for one solver are refused (the same cells twice). ``on_cell(sampler, steps, cell)``
    is called as each cell is finished (progress)."""
    canonical = [canonical_solver(smp) for smp in samplers]
    if len(set(canonical)) < len(canonical):
        raise ValueError(f"evaluate.samplers names a solver twice (sde = ddpm, ode = ddim): {samplers}")
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
            base_r, tuned_r, kls, exact_kls = [], [], [], []
            for j, g, x0 in seeded_batches(num_samples, batch_size, x_shape, seed):
                c = None if conditions is None else conditions[j : j + len(x0)]
                state = g.get_state()
                base = sample(pol, x0, c, grid, g, use_pretrained=True)
                g.set_state(state)  # same step noise for the tuned model: paired comparison
                tuned = sample(pol, x0, c, grid, g, reference_steps=list(range(int(n))))
                base_r.append(reward_fn(base.sample, c).float())
                tuned_r.append(reward_fn(tuned.sample, c).float())
                kls.append(running_kl(pol.schedule, tuned).float())
                # a chain with no random step (ode, heun, one DDPM step) has no path KL
                if tuned.stochastic.any():
                    exact_kls.append(exact_path_kl(pol, tuned).float())
                if j == 0 and keep_samples:
                    kept["base"][f"{sampler}/{n}"] = base.sample[:keep_samples].clone()
                    kept["tuned"][f"{sampler}/{n}"] = tuned.sample[:keep_samples].clone()
            b, t, kl = torch.cat(base_r), torch.cat(tuned_r), torch.cat(kls)
            (bm, bci), (tm, tci), (gm, gci) = mean_ci(b), mean_ci(t), mean_ci(t - b)
            kl_exact = float(torch.cat(exact_kls).mean()) if exact_kls else None
            results[sampler][str(n)] = Cell(bm, bci, tm, tci, gm, gci, float(kl.mean()), kl_exact)
            if on_cell is not None:
                on_cell(sampler, str(n), results[sampler][str(n)])
    return results, kept


def seeded_batches(n: int, batch_size: int, x_shape: tuple[int, ...], seed: int):
    """Yield (first row j, generator, x0) for rows [j, j + len(x0)) of n samples: each batch's start noise and
    step noise come from its own generator seeded with seed + j, so a sample depends on (seed, its row, the batch
    size) only. The evaluation and the served model (serving.generate) draw through this one function, which is
    why a served image equals the evaluation's for the same seed."""
    for j in range(0, n, batch_size):
        g = torch.Generator().manual_seed(seed + j)
        yield j, g, torch.randn((min(batch_size, n - j), *x_shape), generator=g)


def training_sampler(solver: str, eta: float | None = None) -> str | None:
    """The canonical name of the evaluation sampler that runs the training chain (``optimize.solver`` at
    ``optimize.eta``; None or -1: the solver's default eta), or None when no evaluation sampler does (a DDIM-family
    step at 0 < eta < 1: the evaluation runs each solver at its default eta)."""
    solver = canonical_solver(solver)
    if solver not in ("ddpm", "ddim") or eta is None or eta == -1.0:
        return solver
    return {1.0: "ddpm", 0.0: "ddim"}.get(float(eta))


def robustness_ratio(
    results: dict[str, dict[str, Cell]], train_steps: int, train_sampler: str | None = "ddpm"
) -> dict:
    """min over step counts of gain / gain at the training step count, per sampler and overall.

    The reference gain is the training sampler's at the training step count (when evaluated), else the
    largest gain seen. Sampler names are compared canonically (sde = ddpm, ode = ddim), so the training solver's
    own name finds its row. A ratio near 1 means the gain does not depend on the discretisation.
    """
    by_solver = {canonical_solver(smp): cells for smp, cells in results.items()}
    ref_cells = by_solver.get(canonical_solver(train_sampler), {}) if train_sampler is not None else {}
    ref = ref_cells.get(str(train_steps))
    ref_gain = (
        ref.gain if ref is not None else max(c.gain for cells in results.values() for c in cells.values())
    )
    out: dict[str, float | None] = {}
    if ref_gain <= 0:  # no gain to be robust about: the ratio is undefined (None, not NaN: JSON/KFP safe)
        return {"reference_gain": ref_gain, "overall": None}
    for sampler, cells in results.items():
        out[sampler] = min(c.gain for c in cells.values()) / ref_gain
    out["overall"] = min(out.values())
    out["reference_gain"] = ref_gain
    return out
