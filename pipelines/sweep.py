"""Sweeps as one pipeline: fetch and pretrain once, optimise and evaluate every child, one front, one registration.

    ctrl sweep --set optimize.beta=[0.003,0.01,0.03] --set run.seed=[0,1,2] --local

The DAG: resolve_params -> fetch_checkpoint -> pretrain_value -> ParallelFor(children, parallelism) {
child_params -> ctrl_optimize -> evaluate } -> collect_front -> register.

* **What sweeps.** ``--set block.key=[a,b,c]`` sweeps a scalar key over its values; a list-typed key
  (``value.candidates``) sweeps only with a list of lists (``[[cos_sin],[linear]]``), a plain list sets it. Every
  other ``--set`` applies to all children. The children are the cartesian product of the swept keys, in the order
  given (the last key varies fastest).
* **What is shared, so refused.** The checkpoint is fetched and the value net pretrained once, with the base
  parameters (the params file and the plain ``--set``s): a sweep may not vary what those steps read (the
  ``checkpoint``, ``model``, ``reward`` and ``value`` blocks, ``optimize.solver``), nor what is one per sweep
  (``register``, the ``run`` keys but ``run.seed``: one experiment, one resume policy). ``evaluate`` is refused
  too: the front compares the children's evaluations, which must be alike, and children differing only in
  ``evaluate.*`` would train one adapter twice (into one resumable checkpoint folder). ``optimize.algorithm``
  may sweep: the value net is then pretrained when any child is CTRL. The shared steps see the base's
  ``run.seed``; a swept ``run.seed`` seeds each child's adapter and evaluation (``optimize.seed`` its rollouts).
* **Checked before anything runs.** Every child's parameters are validated (an error names the child and the
  key), as is its evaluation: it must include the training sampler at the training step count, the cell the
  front compares. The ``child_params`` task applies the same function (components/child_params/overrides.py)
  to the pipeline's parameters, so a child trains with what was checked.
* **Parallelism.** ``dsl.ParallelFor(children, parallelism=N)``: N from ``--parallelism``, else the chart
  values' ``sweep.parallelism``; one (sequential) for ``--local`` and ``--no-placement``.
* **The front and the registration.** ``collect_front`` receives every child's evaluation (``dsl.Collected``),
  writes front.json and front.png as ``bench.frontier`` does (``ctrl_core.front``), and hands the best child
  (components/collect_front/front_points.py: best mean gain among the settings within ``--max-kl``, that
  setting's best seed) to the existing register step: the gate is the pipeline's.

The two new light tasks take existing placements: ``child_params`` resolve_params' (a small CPU pod) and
``collect_front`` register's (CPU, the MLflow Secret, never cached: it finishes live MLflow runs).
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl

from components import (
    BASE_IMAGE,
    ctrl_optimize,
    evaluate,
    fetch_checkpoint,
    pretrain_value,
    register,
)
from components.child_params import component as child_params_component
from components.child_params.overrides import apply

# by module: ``components.collect_front`` is also the package, once a module of it is imported
from components.collect_front.component import collect_front
from components.collect_front.front_points import missing_train_cell
from ctrl_core.params import (
    SEP,
    Params,
    ParamsError,
    flatten,
    kfp_parameter_types,
    load,
    parse_override,
)

from . import placement as placement_mod
from .pipeline import as_pipeline, resolve_params
from .placement import Placement

SWEEP_NAME = "ctrl-sweep"
SWEEP_DESCRIPTION = (
    "A sweep of the CTRL pipeline: fetch and pretrain once, optimise and evaluate every child in parallel, "
    "collect one reward-KL front and register the best child; parameters are the base's params.yaml keys."
)

#: blocks and keys a sweep may not vary, and why
REFUSED = {
    "checkpoint": "the checkpoint is fetched once for every child",
    "model": "the value net is pretrained once, on this model",
    "reward": "the value net is pretrained once, on this reward",
    "value": "the value net is pretrained once",
    "optimize.solver": "the value net's data are sampled once, with this solver",
    "register": "one child is registered, with the base's register settings",
    "evaluate": "every child is evaluated alike (the front compares their evaluations; children that differ "
    "only in evaluate.* would train one adapter twice): set it for all children",
    "run.name": "a sweep is one MLflow experiment",
    "run.resume": "the resume policy is the sweep's",
    "run.checkpoint_root": "the resumable checkpoints' folder is the sweep's",
}


child_params = child_params_component.component(BASE_IMAGE)


class SweepError(ValueError):
    """An invalid sweep; the message names the key (and the child)."""


@dataclass(frozen=True)
class Sweep:
    """A planned sweep: ``base`` (the shared steps' parameters), the swept ``keys`` (block.key, in --set order),
    every child's swept values (``children``) and validated parameters (``params``)."""

    base: Params
    keys: list[str]
    children: list[dict[str, Any]]
    params: list[Params]

    def label(self, i: int) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.children[i].items())


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def split_sets(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, list]]:
    """(the plain ``--set``s, ``{block.key: values}`` of the swept ones). A scalar key sweeps with a list, a
    list-typed key with a list of lists; refused keys (``REFUSED``) raise SweepError naming the key."""
    types = kfp_parameter_types()
    fixed, swept = [], {}
    for item in overrides:
        path, value = parse_override(item)
        key = ".".join(path)
        kind = types.get(SEP.join(path)) if len(path) == 2 else None
        if kind is None or not isinstance(value, list):
            fixed.append(item)
            continue
        if kind is list:
            if not any(isinstance(v, list) for v in value):
                fixed.append(item)  # a list value for a list-typed key: set, not swept
                continue
            if not all(isinstance(v, list) for v in value):
                raise SweepError(f"--set {key}: a list-typed key sweeps with a list of lists, got {value!r}")
        if kind is dict:
            raise SweepError(f"--set {key}: a mapping-typed key cannot be swept")
        why = REFUSED.get(key) or REFUSED.get(path[0])
        if why:
            raise SweepError(f"--set {key}: cannot sweep {key}: {why}")
        if key in swept:
            raise SweepError(f"--set {key}: swept twice")
        if not value:
            raise SweepError(f"--set {key}: an empty sweep")
        seen = [json.dumps(v, sort_keys=True) for v in value]
        if len(set(seen)) < len(seen):
            raise SweepError(f"--set {key}: a value is listed twice in {value!r} (two children would be one)")
        swept[key] = value
    return fixed, swept


def plan(params_path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> Sweep:
    """The sweep of a params file and ``--set``s, every child validated; SweepError names the key and child."""
    fixed, swept = split_sets(overrides)
    if not swept:
        raise SweepError(
            "nothing to sweep: give at least one --set block.key=[a,b,...] (e.g. optimize.beta=[0.003,0.01])"
        )
    try:
        base = load(params_path, fixed)
    except ParamsError as err:
        raise SweepError(str(err)) from None
    keys = list(swept)
    children = [dict(zip(keys, values, strict=True)) for values in itertools.product(*swept.values())]
    if any(c.get("optimize.algorithm") == "ctrl" for c in children) and base.optimize.algorithm != "ctrl":
        # the shared step pretrains the value net only for CTRL; the base's own algorithm trains no child
        base = apply(base, {"optimize.algorithm": "ctrl"})
    params = []
    for i, child in enumerate(children):
        name = " ".join(f"{k}={_text(v)}" for k, v in child.items())
        try:
            p = apply(base, child)
        except ParamsError as err:
            raise SweepError(f"sweep child {i} ({name}): {err}") from None
        why = missing_train_cell(p)
        if why:
            raise SweepError(f"sweep child {i} ({name}): {why}")
        params.append(p)
    return Sweep(base, keys, children, params)


class SweepOutputs(NamedTuple):
    fetch: str
    value: str
    front: str
    registered: str


def build_sweep_pipeline(
    sweep: Sweep,
    git_sha: str = "",
    placement: Placement | None = None,
    image: str | None = None,
    parallelism: int = 1,
    max_kl: float | None = None,
):
    """The sweep as one KFP pipeline whose parameters are ``flatten(sweep.base)`` (the children's swept values
    are compiled in); ``parallelism`` children run at once; ``max_kl`` bounds the registered child's exact KL
    (None: no bound). ``placement`` and ``image`` as in ``pipelines.pipeline.build_pipeline``."""
    if parallelism < 1:
        raise SweepError(f"parallelism: must be >= 1, got {parallelism}")
    if max_kl is not None and not max_kl >= 0:
        raise SweepError(f"max_kl: must be >= 0, got {max_kl}")
    flat = flatten(sweep.base)
    names = list(flat)
    items = [json.dumps(child) for child in sweep.children]

    def ctrl_sweep(*args) -> SweepOutputs:
        flat_args = dict(zip(names, args, strict=True))
        resolved = resolve_params(**flat_args).set_display_name("resolve_params")
        p = resolved.output
        fetch = fetch_checkpoint(params=p).set_display_name("fetch_checkpoint")
        checkpoint = fetch.outputs["checkpoint"]
        value = pretrain_value(params=p, checkpoint=checkpoint).set_display_name("pretrain_value")
        tasks = [("resolve_params", resolved), ("fetch_checkpoint", fetch), ("pretrain_value", value)]
        with dsl.ParallelFor(items, parallelism=parallelism) as overrides:
            # the base from the pipeline's parameters, not from resolve_params (components/child_params)
            child = child_params(overrides=overrides, **flat_args).set_display_name("child_params")
            optim = ctrl_optimize(params=child.output, checkpoint=checkpoint, value=value.outputs["value"])
            optim.set_display_name("ctrl_optimize")
            ev = evaluate(params=child.output, checkpoint=checkpoint, adapter=optim.outputs["adapter"])
            ev.set_display_name("evaluate")
        collect = collect_front(
            params=p,
            keys=sweep.keys,
            children=dsl.Collected(child.output),
            evaluations=dsl.Collected(ev.outputs["Output"]),
            optimizations=dsl.Collected(optim.outputs["Output"]),
            adapters=dsl.Collected(optim.outputs["adapter"]),
            reports=dsl.Collected(ev.outputs["report"]),
            max_kl=-1.0 if max_kl is None else float(max_kl),
        ).set_display_name("collect_front")
        reg = register(
            params=collect.outputs["params"],
            checkpoint=checkpoint,
            adapter=collect.outputs["adapter"],
            report=collect.outputs["report"],
            evaluation_json=collect.outputs["evaluation_json"],
            link_json=value.outputs["Output"],
            git_sha=git_sha,
        ).set_display_name("register")
        # the light new tasks take existing placements: child_params resolve_params', collect_front register's
        tasks += [("resolve_params", child), ("ctrl_optimize", optim), ("evaluate", ev)]
        tasks += [("register", collect), ("register", reg)]
        for step, task in tasks:
            placement_mod.apply(task, step, placement, image=image)
        return SweepOutputs(
            fetch.outputs["Output"],
            value.outputs["Output"],
            collect.outputs["summary"],
            reg.outputs["Output"],
        )

    return as_pipeline(ctrl_sweep, flat, SweepOutputs, SWEEP_NAME, SWEEP_DESCRIPTION)


def compile_sweep(out_file: str, sweep: Sweep, git_sha: str = "", **kwargs) -> str:
    """Compile ``build_sweep_pipeline(sweep, git_sha, **kwargs)`` to KFP IR YAML at ``out_file``."""
    compiler.Compiler().compile(build_sweep_pipeline(sweep, git_sha, **kwargs), package_path=str(out_file))
    return str(out_file)


def parallelism_from_values(values: dict) -> int:
    """The chart values' ``sweep.parallelism`` (children run at once on the cluster)."""
    return int((values.get("sweep") or {}).get("parallelism", 1))
