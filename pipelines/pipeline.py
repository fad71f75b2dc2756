"""The DAG: resolve_params -> fetch_checkpoint -> pretrain_value -> ctrl_optimize -> evaluate -> register.

The pipeline function's parameters are generated from the params.yaml schema (``block__key`` with the
schema's defaults, or a params file's values), so the KFP UI shows every run parameter with its default and
nothing is declared twice. The first task, ``resolve_params``, validates them (before any heavy work) and
hands the steps one JSON document; its function is generated from the same schema.
"""

import inspect
import linecache
from typing import NamedTuple

from kfp import compiler, dsl

from components import BASE_IMAGE, ctrl_optimize, evaluate, fetch_checkpoint, pretrain_value, register
from ctrl_core.params import Params, flatten, kfp_parameter_types

PIPELINE_NAME = "ctrl-pipeline"


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


def build_pipeline(defaults: Params | None = None, git_sha: str = ""):
    """A KFP pipeline whose parameters are ``flatten(defaults)``."""
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
        reg.set_caching_options(False)  # reads mutable state (the registry's current champion)
        for task in (resolved, fetch, value, optim, ev):
            task.set_caching_options(True)
        return Outputs(fetch.outputs["Output"], value.outputs["Output"], optim.outputs["Output"], ev.outputs["Output"],
                       reg.outputs["Output"])

    params_sig = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flat[n], annotation=types[n]) for n in names
    ]
    ctrl_pipeline.__signature__ = inspect.Signature(params_sig, return_annotation=Outputs)
    ctrl_pipeline.__annotations__ = {**{n: types[n] for n in names}, "return": Outputs}
    ctrl_pipeline.__doc__ = "Fine-tune a diffusion model with continuous-time RL; parameters are params.yaml's keys."
    return dsl.pipeline(name=PIPELINE_NAME, description=ctrl_pipeline.__doc__)(ctrl_pipeline)


def compile_pipeline(out_file: str, defaults: Params | None = None, git_sha: str = "") -> str:
    compiler.Compiler().compile(build_pipeline(defaults, git_sha), package_path=str(out_file))
    return str(out_file)
