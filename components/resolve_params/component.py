"""resolve_params: the pipeline's first task. It takes every run parameter (``block__key``) and returns the
validated parameters as one JSON document, which every step reads (``ctrl_core.params.from_json``).

The function is written once, ``resolve_params(**flat)``; its parameters are the config's fields, given to it
as ``__signature__`` (names, KFP types, defaults). KFP reads a component's interface with ``inspect.signature``
and its executor reads the arguments with ``inspect.getfullargspec``, and both honour ``__signature__``. The
component runs KFP's own executor on this file (no source is copied into the pipeline), so it must stay in a
folder of its own: the executor puts the file's folder first on ``sys.path``.

Imports: the standard library, ctrl_core.params (pydantic, no torch) and, for the component object, kfp.
"""

import inspect
import json

from ctrl_core.params import Params, flatten, kfp_parameter_types, parameter_descriptions


def resolve_params(**flat) -> str:
    """Validate the pipeline's parameters; the nested parameters as JSON (one string: KFP would substitute
    parameters into a dict literal unescaped)."""
    from ctrl_core.params import unflatten

    return json.dumps(unflatten(flat).model_dump())


def _signature() -> inspect.Signature:
    defaults = flatten(Params())
    return inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=kind)
            for name, kind in kfp_parameter_types().items()
        ],
        return_annotation=str,
    )


resolve_params.__signature__ = _signature()


def executor_command(module: str) -> list[str]:
    """KFP's executor on ``module``'s own file (found through the installed package, wherever it lives in the
    image); kfp.local's SubprocessRunner accepts it (it names kfp.dsl.executor_main and does not start with it)
    and replaces python3 with its own interpreter."""
    return [
        "sh",
        "-c",
        "python3 -m kfp.dsl.executor_main --component_module_path "
        f'"$(python3 -c "import {module} as m; print(m.__file__)")" "$@"',
        "sh",
    ]


COMMAND = executor_command("components.resolve_params.component")


def schema_component(func, command: list[str], image: str, descriptions: dict[str, str]):
    """The KFP component of ``func`` (whose ``__signature__`` is built from the config): its interface from that
    signature, each input described by ``descriptions``, run by ``command`` (KFP's executor on its file) in
    ``image``. What resolve_params and the sweep's child_params share."""
    from kfp import dsl
    from kfp.dsl import component_factory, structures
    from kfp.dsl.python_component import PythonComponent

    spec = component_factory.extract_component_interface(func)
    for name, description in descriptions.items():
        spec.inputs[name].description = description
    spec.implementation = structures.Implementation(
        container=structures.ContainerSpecImplementation(
            image=image,
            command=command,
            args=[
                "--executor_input",
                dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
                "--function_to_execute",
                func.__name__,
            ],
        )
    )
    return PythonComponent(component_spec=spec, python_func=func)


def component(image: str):
    """The KFP component: the interface from ``resolve_params``' signature, each input described by its
    config field, run by KFP's executor on this file in ``image``."""
    return schema_component(resolve_params, COMMAND, image, parameter_descriptions())
