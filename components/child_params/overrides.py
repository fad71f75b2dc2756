"""A sweep child's parameters: the resolved base parameters with the child's swept values set (torch-free).

One function, :func:`apply`, used twice: by ``ctrl sweep`` (pipelines/sweep.py) to validate every child before
anything runs, and by the ``child_params`` task inside the sweep's ParallelFor, so the parameters a child trains
with are the ones that were checked.
"""

from __future__ import annotations

import json
from typing import Any

from ctrl_core.params import Params, ParamsError, validate


def apply(base: Params | str, overrides: dict[str, Any]) -> Params:
    """``base`` (a Params or its JSON) with ``{"block.key": value}`` set; raises ParamsError naming the key."""
    raw = json.loads(base) if isinstance(base, str) else base.model_dump()
    for key, value in overrides.items():
        block, sep, name = key.partition(".")
        if not sep or not isinstance(raw.get(block), dict):
            raise ParamsError(f"{key}: not a block.key parameter")
        raw[block][name] = value
    return validate(raw)
