"""KFP v2 lightweight components: one per pipeline step, each a thin shell over a ``ctrl_core.steps`` function.

Only the standard library (and kfp) is imported at module level; the heavy imports happen inside the
component functions, which run in the project image (``base_image``) on a cluster or in-process locally.
"""

from .ctrl_optimize.component import ctrl_optimize
from .evaluate.component import evaluate
from .fetch_checkpoint.component import fetch_checkpoint
from .image import BASE_IMAGE
from .pretrain_value.component import pretrain_value
from .register.component import register

__all__ = ["fetch_checkpoint", "pretrain_value", "ctrl_optimize", "evaluate", "register", "BASE_IMAGE"]
