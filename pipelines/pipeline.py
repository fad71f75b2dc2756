"""The DAG: resolve_params -> fetch_checkpoint -> pretrain_value -> ctrl_optimize -> evaluate -> register.

The pipeline function's parameters are generated from the params.yaml schema (``block__key`` with the
schema's defaults, or a params file's values), so the KFP UI shows every run parameter with its default and
nothing is declared twice. The first task, ``resolve_params``, validates them (before any heavy work) and
hands the steps one JSON document; its function is generated from the same schema.

Cluster placement (image, node pools, GPUs, /dev/shm, cache PVC, Secrets) is compile-time configuration
from the Helm chart's values, applied per step by ``pipelines.placement.apply``; without it (``ctrl run``,
kfp.local) the pipeline carries no Kubernetes settings.
"""

import inspect
import linecache
from typing import NamedTuple

from kfp import compiler, dsl

from components import BASE_IMAGE, ctrl_optimize, evaluate, fetch_checkpoint, pretrain_value, register
from ctrl_core.params import Params, flatten, kfp_parameter_types

from . import placement as placement_mod
from .placement import Placement

PIPELINE_NAME = "ctrl-pipeline"
PIPELINE_DESCRIPTION = ("Fine-tune a diffusion model with continuous-time RL (CTRL); parameters are params.yaml's "
                        "keys (block__key).")


class Outputs(NamedTuple):
    fetch: str
    value: str
    optimize: str
    evaluation: str
    registered: str


def make_resolve_params(names: list[str], types: dict[str, type]):
    """A lightweight component taking every flat parameter and returning the validated params as JSON.

    KFP needs the function's source, so it is generated from the schema and registered with ``linecache``
    (where ``inspect.getsource`` looks). Passing one JSON string avoids KFP's unescaped substitution of
    parameters inside dict literals.
    """
    args = ", ".join(f"{n}: {types[n].__name__}" for n in names)
    source = (
        f"def resolve_params({args}) -> str:\n"
        "    flat = dict(locals())  # first statement: only the parameters are local yet\n"
        "    import json\n"
        "    from ctrl_core.params import unflatten\n"
        "    return json.dumps(unflatten(flat).model_dump())\n"
    )
    filename = "<ctrl-pipeline generated resolve_params>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
    return dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(namespace["resolve_params"])


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # help`` -> {name: help}: the help of dataclass fields (OptimConfig)."""
    import io
    import tokenize

    out: dict[str, str] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    except (OSError, TypeError, tokenize.TokenError):
        return out
    line_start: dict[int, str] = {}
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_start:
            line_start[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_start:
            out.setdefault(line_start[tok.start[0]], tok.string.lstrip("# ").strip())
    return out


def parameter_descriptions(defaults: Params) -> dict[str, str]:
    """``block__key`` -> the schema's help text (shown next to each parameter in the KFP UI)."""
    from ctrl_core.algorithms import OptimConfig

    comments = _field_comments(OptimConfig)
    out = {}
    for block in Params.model_fields:
        for key, f in type(getattr(defaults, block)).model_fields.items():
            text = f.description or (comments.get(key) if block == "optimize" else None) or f"{block}.{key}"
            out[f"{block}__{key}"] = " ".join(text.split())
    return out


def _docstring(names: list[str], descriptions: dict[str, str]) -> str:
    """Google-style docstring: KFP reads its Args section into the parameters' descriptions."""
    args = "\n".join(f"    {n}: {descriptions.get(n, n.replace('__', '.'))}" for n in names)
    return f"{PIPELINE_DESCRIPTION}\n\nArgs:\n{args}\n"


def build_pipeline(defaults: Params | None = None, git_sha: str = "", placement: Placement | None = None,
                   image: str | None = None):
    """A KFP pipeline whose parameters are ``flatten(defaults)``; ``placement`` (compile-time cluster
    settings from the chart's values) puts each step on its node pool, or nothing when None; ``image``
    replaces every step's image (default: the placement's, else ``components.BASE_IMAGE``)."""
    defaults = defaults or Params()
    flat, types = flatten(defaults), kfp_parameter_types(defaults)
    names = list(flat)
    resolve_params = make_resolve_params(names, types)

    def ctrl_pipeline(*args) -> Outputs:
        resolved = resolve_params(**dict(zip(names, args, strict=True))).set_display_name("resolve_params")
        p = resolved.output
        fetch = fetch_checkpoint(params=p).set_display_name("fetch_checkpoint")
        value = pretrain_value(params=p, checkpoint=fetch.outputs["checkpoint"]).set_display_name("pretrain_value")
        optim = ctrl_optimize(params=p, checkpoint=fetch.outputs["checkpoint"], value=value.outputs["value"])
        optim.set_display_name("ctrl_optimize")
        ev = evaluate(params=p, checkpoint=fetch.outputs["checkpoint"], adapter=optim.outputs["adapter"])
        ev.set_display_name("evaluate")
        reg = register(params=p, checkpoint=fetch.outputs["checkpoint"], adapter=optim.outputs["adapter"],
                       report=ev.outputs["report"],
                       evaluation_json=ev.outputs["Output"], link_json=value.outputs["Output"], git_sha=git_sha)
        reg.set_display_name("register")
        # caching (off for register: it reads the registry's champion) and, on a cluster, the placement
        for step, task in (("resolve_params", resolved), ("fetch_checkpoint", fetch), ("pretrain_value", value),
                           ("ctrl_optimize", optim), ("evaluate", ev), ("register", reg)):
            placement_mod.apply(task, step, placement, image=image)
        return Outputs(fetch.outputs["Output"], value.outputs["Output"], optim.outputs["Output"], ev.outputs["Output"],
                       reg.outputs["Output"])

    params_sig = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flat[n], annotation=types[n]) for n in names
    ]
    ctrl_pipeline.__signature__ = inspect.Signature(params_sig, return_annotation=Outputs)
    ctrl_pipeline.__annotations__ = {**{n: types[n] for n in names}, "return": Outputs}
    ctrl_pipeline.__doc__ = _docstring(names, parameter_descriptions(defaults))
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(ctrl_pipeline)


def compile_pipeline(out_file: str, defaults: Params | None = None, git_sha: str = "",
                     placement: Placement | None = None, image: str | None = None) -> str:
    compiler.Compiler().compile(build_pipeline(defaults, git_sha, placement, image), package_path=str(out_file))
    return str(out_file)
