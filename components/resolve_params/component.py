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

#: KFP's executor on this very file (found through the installed package, wherever it lives in the image);
#: kfp.local's SubprocessRunner accepts it (it names kfp.dsl.executor_main and does not start with it) and
#: replaces python3 with its own interpreter
COMMAND = [
    "sh",
    "-c",
    "python3 -m kfp.dsl.executor_main --component_module_path "
    '"$(python3 -c "import components.resolve_params.component as m; print(m.__file__)")" "$@"',
    "sh",
]


def component(image: str):
    """The KFP component: the interface from ``resolve_params``' signature, each input described by its
    config field, run by KFP's executor on this file in ``image``."""
    from kfp import dsl
    from kfp.dsl import component_factory, structures
    from kfp.dsl.python_component import PythonComponent

    spec = component_factory.extract_component_interface(resolve_params)
    for name, description in parameter_descriptions().items():
        spec.inputs[name].description = description
    spec.implementation = structures.Implementation(
        container=structures.ContainerSpecImplementation(
            image=image,
            command=COMMAND,
            args=[
                "--executor_input",
                dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
                "--function_to_execute",
                resolve_params.__name__,
            ],
        )
    )
    return PythonComponent(component_spec=spec, python_func=resolve_params)
