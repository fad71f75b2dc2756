"""child_params: a sweep child's first task. It takes every run parameter (``block__key``, the sweep's base) and
the child's swept values (``{"block.key": value}`` as JSON), and returns the child's validated parameters as one
JSON document, as ``resolve_params`` does for the base.

It takes the pipeline's parameters rather than resolve_params' output because kfp.local (2.17) hands a
ParallelFor's iteration its loop item in place of every upstream task's output parameter
(``task_spec_utils.create_parameter_loop_iteration_task_spec``); the pipeline's own parameters reach an iteration
intact. Like resolve_params, the function is written once with the config's fields as ``__signature__`` and run
by KFP's own executor on this file, so it stays in a folder of its own (components/resolve_params/component.py).
"""

import inspect
import json

from components.resolve_params.component import _signature as _base_signature
from components.resolve_params.component import executor_command, schema_component
from ctrl_core.params import parameter_descriptions


def child_params(overrides: str, **flat) -> str:
    """The sweep's base parameters (``flat``) with the child's ``overrides`` set, validated (an error names the
    key); the nested parameters as JSON."""
    from components.child_params.overrides import apply
    from ctrl_core.params import unflatten

    return json.dumps(apply(unflatten(flat), json.loads(overrides)).model_dump())


def _signature() -> inspect.Signature:
    base = _base_signature()
    overrides = inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, annotation=str)
    return base.replace(parameters=[overrides, *base.parameters.values()])


child_params.__signature__ = _signature()

#: KFP's executor on this very file (see components/resolve_params/component.py)
COMMAND = executor_command("components.child_params.component")


def component(image: str):
    """The KFP component: the interface from ``child_params``' signature, each base input described by its
    config field, run by KFP's executor on this file in ``image``."""
    descriptions = {
        "overrides": "the child's swept values: {block.key: value} as JSON",
        **parameter_descriptions(),
    }
    return schema_component(child_params, COMMAND, image, descriptions)
