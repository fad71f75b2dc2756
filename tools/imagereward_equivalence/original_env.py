"""Import the ORIGINAL ImageReward 1.5 code (PyPI ``image-reward==1.5``) in the side environment, offline.

Runs only in the side environment of requirements.txt (transformers 4.55.4, timm 0.6.13, ...), never in the
project's. Three shims, each the least that lets the unmodified package code run here; none touches a line of
the scoring path (ImageReward.py, models/BLIP/*):

1. torchvision: PyPI's torchvision 0.28.0 (the build paired with torch 2.13.0) is a CUDA build. Its compiled
   ops (``torchvision/_C.so``) cannot load beside the CPU torch, and ``import torchvision`` then fails in
   ``torchvision/_meta_registrations.py`` (``RuntimeError: operator torchvision::nms does not exist``), which
   registers fake kernels for the detection ops (nms, roi_align, ...). ImageReward uses only
   ``torchvision.transforms`` (pure Python; on PIL images it calls PIL's own resize/crop), so that one module is
   replaced by an empty one before torchvision is imported. Everything else is the real torchvision code.
2. The package's ``__init__.py`` imports ``ReFL.py``, the fine-tuning script (accelerate, datasets, diffusers):
   the package is registered without running its ``__init__``, so ``ImageReward.ImageReward``,
   ``ImageReward.models.BLIP.*`` (and, through ``ImageReward.models``, the CLIP/BLIP/Aesthetic score modules)
   import from the installed files as they are.
3. ``BertTokenizer.from_pretrained('bert-base-uncased')`` (called by BLIP's ``init_tokenizer``) would go to the
   Hugging Face hub: it is redirected to a local tokenizer folder (the rest of ``init_tokenizer`` - adding
   ``[DEC]`` as bos and ``[ENC]`` as an additional special token - runs unchanged).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _shim_torchvision() -> None:
    name = "torchvision._meta_registrations"
    if "torchvision" in sys.modules and name not in sys.modules:
        raise RuntimeError("import original_env before torchvision")
    sys.modules.setdefault(name, types.ModuleType(name))


def _register_package_without_init() -> None:
    if "ImageReward" in sys.modules:
        return
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("image-reward is not installed (pip install --no-deps image-reward==1.5)")
    pkg = types.ModuleType("ImageReward")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["ImageReward"] = pkg


def redirect_bert_tokenizer(folder: str) -> None:
    """Make ``BertTokenizer.from_pretrained('bert-base-uncased')`` load ``folder`` (a vocab.txt folder)."""
    from transformers import BertTokenizer

    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name == "bert-base-uncased":
            name = folder
        return original(cls, name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)


_shim_torchvision()
_register_package_without_init()
