"""The DAG: resolve_params -> fetch_checkpoint -> pretrain_value -> ctrl_optimize -> evaluate -> register.

The pipeline function's parameters are the config's fields (``block__key``, ctrl_core/config.py) with the
schema's defaults, or a params file's values, and the fields' descriptions, so the KFP UI shows every run
parameter with its default and help and nothing is declared twice. The first task, ``resolve_params``
(components/resolve_params), validates them before any heavy work and hands the steps one JSON document.

Cluster placement (image, node pools, GPUs, /dev/shm, cache PVC, Secrets) is compile-time configuration
from the Helm chart's values, applied per step by ``pipelines.placement.apply``; without it (``ctrl run``,
kfp.local) the pipeline carries no Kubernetes settings. A data-parallel step placed on several nodes is
the launcher of a Kubeflow Trainer TrainJob instead (components/trainjob_launcher: same name, inputs and outputs).
"""

import inspect
from typing import NamedTuple

from kfp import compiler, dsl

from components import BASE_IMAGE, ctrl_optimize, evaluate, fetch_checkpoint, pretrain_value, register
from components.resolve_params import component as resolve_params_component
from components.trainjob_launcher import component as trainjob_launcher
from ctrl_core.params import Params, flatten, kfp_parameter_types, parameter_descriptions

from . import placement as placement_mod
from .placement import Placement

PIPELINE_NAME = "ctrl-pipeline"
PIPELINE_DESCRIPTION = (
    "Fine-tune a diffusion model with continuous-time RL (CTRL); parameters are params.yaml's "
    "keys (block__key)."
)


class Outputs(NamedTuple):
    fetch: str
    value: str
    optimize: str
    evaluation: str
    registered: str


resolve_params = resolve_params_component.component(BASE_IMAGE)


def _docstring(
    names: list[str], descriptions: dict[str, str], description: str = PIPELINE_DESCRIPTION
) -> str:
    """Google-style docstring: KFP reads its Args section into the parameters' descriptions."""
    args = "\n".join(f"    {n}: {descriptions[n]}" for n in names)
    return f"{description}\n\nArgs:\n{args}\n"


def as_pipeline(fn, flat: dict, outputs: type, name: str, description: str):
    """``fn(*args)`` as a KFP pipeline whose parameters are ``flat``'s keys (the config's ``block__key`` fields)
    with ``flat``'s values as defaults, their KFP types and their descriptions, returning ``outputs``."""
    types = kfp_parameter_types()
    names = list(flat)
    params_sig = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flat[n], annotation=types[n])
        for n in names
    ]
    fn.__signature__ = inspect.Signature(params_sig, return_annotation=outputs)
    fn.__annotations__ = {**{n: types[n] for n in names}, "return": outputs}
    fn.__doc__ = _docstring(names, parameter_descriptions(), description)
    return dsl.pipeline(name=name, description=description)(fn)


def build_pipeline(
    defaults: Params | None = None,
    git_sha: str = "",
    placement: Placement | None = None,
    image: str | None = None,
):
    """A KFP pipeline whose parameters are ``flatten(defaults)``; ``placement`` (compile-time cluster
    settings from the chart's values) puts each step on its node pool, or nothing when None; ``image``
    replaces every step's image (default: the placement's, else ``components.BASE_IMAGE``)."""
    defaults = defaults or Params()
    flat = flatten(defaults)

    def on_nodes(step: str, component):
        """The step's component, or its TrainJob launcher when the placement puts it on several nodes."""
        if placement is not None and placement.steps[step].nodes > 1:
            return getattr(trainjob_launcher, step)  # named as the step's own component
        return component

    names = list(flat)

    def ctrl_pipeline(*args) -> Outputs:
        resolved = resolve_params(**dict(zip(names, args, strict=True))).set_display_name("resolve_params")
        p = resolved.output
        fetch = fetch_checkpoint(params=p).set_display_name("fetch_checkpoint")
        value = on_nodes("pretrain_value", pretrain_value)(
            params=p, checkpoint=fetch.outputs["checkpoint"]
        ).set_display_name("pretrain_value")
        optim = on_nodes("ctrl_optimize", ctrl_optimize)(
            params=p, checkpoint=fetch.outputs["checkpoint"], value=value.outputs["value"]
        )
        optim.set_display_name("ctrl_optimize")
        ev = evaluate(params=p, checkpoint=fetch.outputs["checkpoint"], adapter=optim.outputs["adapter"])
        ev.set_display_name("evaluate")
        reg = register(
            params=p,
            checkpoint=fetch.outputs["checkpoint"],
            adapter=optim.outputs["adapter"],
            report=ev.outputs["report"],
            evaluation_json=ev.outputs["Output"],
            link_json=value.outputs["Output"],
            git_sha=git_sha,
        )
        reg.set_display_name("register")
        # caching (off for register: it reads the registry's champion) and, on a cluster, the placement
        for step, task in (
            ("resolve_params", resolved),
            ("fetch_checkpoint", fetch),
            ("pretrain_value", value),
            ("ctrl_optimize", optim),
            ("evaluate", ev),
            ("register", reg),
        ):
            placement_mod.apply(task, step, placement, image=image)
        return Outputs(
            fetch.outputs["Output"],
            value.outputs["Output"],
            optim.outputs["Output"],
            ev.outputs["Output"],
            reg.outputs["Output"],
        )

    return as_pipeline(ctrl_pipeline, flat, Outputs, PIPELINE_NAME, PIPELINE_DESCRIPTION)


def compile_pipeline(
    out_file: str,
    defaults: Params | None = None,
    git_sha: str = "",
    placement: Placement | None = None,
    image: str | None = None,
) -> str:
    compiler.Compiler().compile(
        build_pipeline(defaults, git_sha, placement, image), package_path=str(out_file)
    )
    return str(out_file)
