"""Fused export: the fetched base checkpoint with a trained LoRA merged into its UNet, as a complete diffusers
pipeline folder that loads in one line, with no peft and none of this package:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(out_dir)

1. Load the base pipeline's parts from the checkpoint folder (``base_pipeline``): the built-in digits format
   (``digits_config.json``) or a pixel ``unet/ + scheduler/`` folder become a ``DDPMPipeline``; a Stable Diffusion
   folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) a ``StableDiffusionPipeline`` (no safety checker:
   the fetch step does not keep one). The scheduler keeps the class its folder names.
2. Merge the adapter (``merged_unet``): peft reads adapter_config.json (rank r, lora_alpha, targets) and
   adapter_model.safetensors and folds each update into its base weight, W <- W + (lora_alpha / r)·B·A.
3. Write the pipeline with ``save_pretrained`` (safetensors only) into a staged folder renamed into place whole,
   with ``export.json`` (which checkpoint and adapter it was made from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .io import atomic_write_json, require_safetensors, sha256_file

EXPORT_INFO = "export.json"


def _scheduler(folder: Path):
    """The scheduler of ``folder`` as the class its config names (a diffusers scheduler), else a DDPMScheduler."""
    import diffusers
    from diffusers import DDPMScheduler, SchedulerMixin

    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDPMScheduler
    return cls.from_pretrained(folder, local_files_only=True)


def base_pipeline(checkpoint_dir: str | os.PathLike) -> tuple[type, dict]:
    """(pipeline class, its components) of a fetched checkpoint folder, safetensors only, offline."""
    from diffusers import DDPMPipeline, StableDiffusionPipeline, UNet2DModel

    from .latent import is_sd_folder, load_sd_folder

    d = Path(checkpoint_dir)
    if (d / "digits_config.json").is_file():
        from .embedded import load_builtin_unet

        unet, scheduler = load_builtin_unet(d)
        return DDPMPipeline, {"unet": unet, "scheduler": scheduler}
    if is_sd_folder(d):
        parts = load_sd_folder(d)  # refuses pickles, checks the tokenizer
        parts["scheduler"] = _scheduler(d / "scheduler")
        return StableDiffusionPipeline, {**parts, "safety_checker": None, "feature_extractor": None,
                                         "requires_safety_checker": False}  # fmt: skip
    if (d / "unet" / "config.json").is_file() and (d / "scheduler").is_dir():
        require_safetensors(d / "unet" / "diffusion_pytorch_model.safetensors")
        unet = UNet2DModel.from_pretrained(d / "unet", use_safetensors=True, local_files_only=True).eval()
        return DDPMPipeline, {"unet": unet, "scheduler": _scheduler(d / "scheduler")}
    raise ValueError(
        f"{d}: not a checkpoint folder this pipeline can export (expected digits_config.json, or "
        "unet/ and scheduler/)"
    )


def merged_unet(unet: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """``unet`` with the peft LoRA of ``adapter_dir`` merged into its weights (the same module, no adapter left)."""
    from peft import PeftModel

    a = Path(adapter_dir)
    if not (a / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{a}: no adapter_config.json (a LoRA adapter folder written by save_adapter)"
        )
    require_safetensors(
        a / "adapter_model.safetensors"
    )  # peft would fall back to a pickled adapter_model.bin
    return PeftModel.from_pretrained(unet, a).merge_and_unload().eval()


def export_fused(
    checkpoint_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> dict:
    """Write the base pipeline of ``checkpoint_dir`` with the LoRA of ``adapter_dir`` merged into its UNet to
    ``out_dir`` (replaced whole, atomically). Returns what ``export.json`` records."""
    from .io import atomic_folder

    pipeline_class, parts = base_pipeline(checkpoint_dir)
    parts["unet"] = merged_unet(parts["unet"], adapter_dir)
    pipe = pipeline_class(**parts)
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    manifest = Path(checkpoint_dir) / "manifest.json"  # written by the fetch step
    info = {
        "pipeline": pipeline_class.__name__,
        "checkpoint": {k: v for k, v in json.loads(manifest.read_text()).items() if k in ("source", "sha256")}
        if manifest.is_file() else {"path": str(Path(checkpoint_dir).resolve())},
        "adapter": {"sha256": sha256_file(Path(adapter_dir) / "adapter_model.safetensors"),
                    "r": adapter_cfg.get("r"), "lora_alpha": adapter_cfg.get("lora_alpha"),
                    "target_modules": sorted(adapter_cfg.get("target_modules") or [])},
    }  # fmt: skip
    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(info, tmp / EXPORT_INFO)
    return info


def run_inputs(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint folder, adapter folder) of a ``ctrl run`` output folder (``outputs/<run id>``): the fetch
    step's ``checkpoint`` and the optimisation step's ``adapter/adapter`` under kfp.local's ``kfp/<pipeline>/``."""
    root = Path(run_dir)
    found = {
        "checkpoint": sorted(p.parent for p in root.glob("kfp/*/fetch-checkpoint/checkpoint/manifest.json")),
        "adapter": sorted(
            p.parent for p in root.glob("kfp/*/ctrl-optimize/adapter/adapter/adapter_config.json")
        ),
    }
    for what, paths in found.items():
        if len(paths) != 1:
            raise FileNotFoundError(
                f"{root}: expected one {what} folder of a `ctrl run`, found "
                f"{[str(p) for p in paths] or 'none'}; pass --checkpoint and --adapter"
            )
    return found["checkpoint"][0], found["adapter"][0]
