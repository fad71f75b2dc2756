"""Which files of a checkpoint source are fetched: a diffusers pipeline's files that a step loads (one weight
variant per component), and the weight formats refused by name (``io.UNSAFE_WEIGHT_SUFFIXES``).

The same selection applies to every source (a local folder, an S3 prefix, the Hugging Face cache), so that one
pipeline fetched from any of them gives the same files and the same checkpoint hash.
"""

from __future__ import annotations

import fnmatch
import re

from .io import is_unsafe_weight_name


class CheckpointError(ValueError):
    """A checkpoint could not be fetched or failed verification (the message names the source)."""


#: Files of a Hugging Face repo that are fetched at all (weights in safetensors, configs, tokenizer files).
HF_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model"]
#: Folders of a diffusers pipeline that no step loads (Stable Diffusion's NSFW checker and its image processor).
PIPELINE_UNUSED_FOLDERS = ("safety_checker", "feature_extractor")
#: Top-level weight files of this project that a pipeline folder may carry (q-learning's data set).
PROJECT_TOP_FILES = ("data.safetensors",)
# name[-shard][.variant][-shard].safetensors: diffusers/transformers' current ("name.fp16-00001-of-00002") and
# legacy ("name-00001-of-00002.fp16") variant shard names
_WEIGHT_NAME_RE = re.compile(
    r"^(?P<base>[^.]+?)(?P<legacy_shard>-\d+-of-\d+)?(?:\.(?P<variant>[A-Za-z0-9_]+))?"
    r"(?P<shard>-\d+-of-\d+)?\.safetensors$",
    re.IGNORECASE,
)


def is_pipeline_layout(rels: list[str]) -> bool:
    """A diffusers pipeline folder: ``model_index.json`` at the top, or unet/, vae/ and text_encoder/ folders."""
    tops = {r.split("/", 1)[0] for r in rels if "/" in r}
    return "model_index.json" in rels or {"unet", "vae", "text_encoder"} <= tops


def weight_variant(names: list[str], base: str) -> str | None:
    """The variant of ``base``'s weights among a folder's file ``names`` that a loader should ask for: None when
    full-precision weights (plain or sharded) are there, else the one variant present (fp16 first)."""
    found = [m for m in map(_WEIGHT_NAME_RE.match, names) if m and m["base"] == base]
    if not found or any(not m["variant"] for m in found):
        return None
    variants = sorted({m["variant"] for m in found})
    return next((v for v in variants if v.lower() == "fp16"), variants[0])


def select_pipeline_files(rels: list[str]) -> tuple[list[str], list[str]]:
    """(files to fetch, files skipped) of a source. A diffusers pipeline folder as published on the hub carries
    much that no step loads: single-file checkpoints at the top (``v1-5-pruned.safetensors``, 4-8 GB each), the
    safety checker, pickled and Flax/TF twins of the safetensors weights, extra precisions (``.fp16``,
    ``.non_ema``) beside the full-precision weights, ONNX/OpenVINO exports, READMEs. Only safetensors weights
    (one precision per component: full, else fp16) and json/txt/model files are fetched, the same from a local
    folder, S3 or the HF cache; pickles in a folder without safetensors are kept, to be refused by name. Any
    other source is fetched whole (pickles in it are refused too)."""
    if not is_pipeline_layout(rels):
        return list(rels), []
    keep, skip = [], []
    by_folder: dict[str, list[str]] = {}
    for r in rels:
        folder, _, name = r.rpartition("/")
        weight = name.lower().endswith(".safetensors") or is_unsafe_weight_name(name)
        if (not folder and weight and name not in PROJECT_TOP_FILES) or folder.split("/", 1)[
            0
        ] in PIPELINE_UNUSED_FOLDERS:
            skip.append(
                r
            )  # a single-file checkpoint (the component folders hold the same weights), or unused
        else:
            by_folder.setdefault(folder, []).append(name)
    for folder, names in by_folder.items():
        has_safetensors = any(n.lower().endswith(".safetensors") for n in names)
        chosen = {
            b: weight_variant(names, b) for b in {m["base"] for m in map(_WEIGHT_NAME_RE.match, names) if m}
        }
        for n in names:
            m = _WEIGHT_NAME_RE.match(n)
            if m:
                ok = (m["variant"] or None) == chosen[m["base"]]
            elif is_unsafe_weight_name(n):
                ok = not has_safetensors  # a twin of safetensors weights, or to be refused
            else:
                ok = n.lower().endswith(".safetensors") or any(
                    fnmatch.fnmatch(n, pat) for pat in HF_ALLOW_PATTERNS
                )
            (keep if ok else skip).append(f"{folder}/{n}" if folder else n)
    return sorted(keep), sorted(skip)


def refuse_unsafe(source: str, names: list[str]) -> None:
    """Raise :class:`CheckpointError` naming the files of ``names`` in a refused weight format, if any."""
    bad = sorted(n for n in names if is_unsafe_weight_name(n))
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{source}: refusing non-safetensors weights: {shown}; pickle-based formats can execute code "
            "when loaded, convert to .safetensors"
        )
