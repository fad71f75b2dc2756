"""KFP v2 lightweight components: one per pipeline step, each a thin shell over a ``ctrl_core.steps`` function.

Only the standard library (and kfp) is imported at module level; the heavy imports happen inside the
component functions, which run in the project image (``base_image``) on a cluster or in-process locally.

The components are built on first access (PEP 562): inside a running task, where only the executor's part of
``kfp.dsl`` is loaded, a task body can import ``components.tracking`` without building every component.
"""

from importlib import import_module

_COMPONENTS = {
    "fetch_checkpoint": ".fetch_checkpoint.component",
    "pretrain_value": ".pretrain_value.component",
    "ctrl_optimize": ".ctrl_optimize.component",
    "evaluate": ".evaluate.component",
    "register": ".register.component",
    "collect_front": ".collect_front.component",
    "BASE_IMAGE": ".image",
}

__all__ = list(_COMPONENTS)


def __getattr__(name: str):
    if name not in _COMPONENTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_COMPONENTS[name], __name__), name)
    globals()[name] = value
    return value
