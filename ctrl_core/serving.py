"""The tuned model as a function from conditions to images, for serving (the MLflow pyfunc of
``pipelines.mlflow_model``), through the engine's own loading and sampler:

1. Load (``load_tuned``) as the evaluate step does: ``steps.load_problem`` on the base checkpoint folder, then
   the LoRA adapter (``load_adapter``); a from-scratch q-learning model through ``steps.qlearning_setup``.
2. Generate (``generate``) as ``evaluate.evaluate`` draws its tuned samples: rows in batches of ``batch_size``;
   batch j (its first row's index) starts a generator at ``seed + j``, draws x0 ~ N(0, I) of the batch, then
   ``policy.sample`` on ``schedule.time_grid(steps)`` with the solver ``sampler`` draws the step noise from
   the same generator. So class labels ``arange(n) % 10`` with ``evaluate.seed`` give bitwise the evaluate
   step's tuned samples at that (sampler, steps) cell.
3. Latent (Stable Diffusion) models are conditioned on prompts: a prompt of the training list keeps its
   embedding, any other is encoded by the checkpoint's own CLIP text encoder; the latents are decoded by the
   checkpoint's VAE (the decode the evaluate step shows its grids with). ``guidance`` is the classifier-free
   guidance w for this call.

Images are (N, C, H, W) float32 in [-1, 1] on the CPU; ``png_base64`` encodes them as PNGs (uint8, as
``rewards.to_uint8``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: The input a model takes, by kind: a class label per image, a prompt per image, or a row per image (unconditional).
INPUT_COLUMNS = {"label": "label", "prompt": "prompt", "unconditional": "index"}
EVAL_BATCH_SIZE = 256  # evaluate.evaluate's default batch: the seed of batch j is seed + j


@dataclass
class TunedModel:
    """A loaded base checkpoint with its adapter. ``kind``: label | prompt | unconditional."""

    problem: Any
    kind: str
    num_classes: int = 0
    checkpoint_dir: Path | None = None
    _text: tuple | None = None  # (text encoder, tokenizer), loaded on the first unknown prompt
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def input_column(self) -> str:
        return INPUT_COLUMNS[self.kind]


def load_tuned(params, checkpoint_dir: str | Path, adapter_dir: str | Path) -> TunedModel:
    """The problem of ``params`` on ``checkpoint_dir`` with the adapter of ``adapter_dir``, as steps.evaluate
    loads it (``params``: the run's ``ctrl_core.params.Params``)."""
    from .steps import load_problem, qlearning_setup

    if (Path(adapter_dir) / "qlearning_config.json").is_file():  # a from-scratch q-learning model
        _, problem, _, _, num_classes = qlearning_setup(params, checkpoint_dir, model_dir=adapter_dir)
    else:
        problem = load_problem(params, checkpoint_dir)
        problem.policy.model.load_adapter(str(adapter_dir))
        num_classes = _num_classes(problem)
    if hasattr(problem, "prompts"):
        kind = "prompt"
    else:
        kind = "label" if num_classes else "unconditional"
    return TunedModel(problem, kind, num_classes, Path(checkpoint_dir))


def input_kind(checkpoint_dir: str | Path, adapter_dir: str | Path) -> tuple[str, int]:
    """(kind, number of classes) of a checkpoint + adapter, from their files alone (no model loaded): what the
    MLflow signature declares before anything is loaded; ``load_tuned`` finds the same."""
    import json

    d, a = Path(checkpoint_dir), Path(adapter_dir)
    if (a / "qlearning_config.json").is_file():  # a from-scratch q-learning network, conditioned as its data
        n = int(json.loads((a / "qlearning_config.json").read_text()).get("net", {}).get("num_classes") or 0)
        return ("label", n) if n else ("unconditional", 0)
    if (d / "vae").is_dir() and (d / "text_encoder").is_dir():
        return "prompt", 0
    if (d / "digits_config.json").is_file():
        from .embedded import NUM_CLASSES

        return "label", NUM_CLASSES
    unet = d / "unet" / "config.json"
    n = int(json.loads(unet.read_text()).get("num_class_embeds") or 0) if unet.is_file() else 0
    return ("label", n) if n else ("unconditional", 0)


def _num_classes(problem) -> int:
    """Classes of a class-conditional pixel model (0: unconditional), read from its eval conditions."""
    c = problem.eval_conditions(1024)
    return 0 if c is None else int(c.max()) + 1


def _prompt_conditions(tm: TunedModel, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(prompt embeddings of this call (P, L, D), conditions arange(P)): training prompts keep their rows."""
    from .latent import encode_prompts

    model = tm.problem.policy.model
    known = {p: i for i, p in enumerate(tm.problem.prompts)}
    unknown = sorted({p for p in prompts if p not in known})
    encoded = {}
    if unknown:
        if tm._text is None:
            from transformers import CLIPTextModel, CLIPTokenizer

            d = tm.checkpoint_dir
            encoder = CLIPTextModel.from_pretrained(
                d / "text_encoder", use_safetensors=True, local_files_only=True
            )
            tm._text = (
                encoder.eval().to(model.prompt_embeds.device),
                CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True),
            )
        rows = encode_prompts(*tm._text, unknown).to(model.prompt_embeds)
        encoded = dict(zip(unknown, rows, strict=True))
    embeds = torch.stack([model.prompt_embeds[known[p]] if p in known else encoded[p] for p in prompts])
    return embeds, torch.arange(len(prompts))


@contextlib.contextmanager
def _latent_call(model, embeds: Tensor, guidance: float | None):
    """Swap in this call's prompt embeddings and guidance scale; restore them after."""
    saved = (model.prompt_embeds, model.guidance_scale)
    model.prompt_embeds = embeds
    if guidance is not None:
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        model.guidance_scale = float(guidance)
    try:
        yield
    finally:
        model.prompt_embeds, model.guidance_scale = saved


@torch.no_grad()
def generate(
    tm: TunedModel,
    conditions: list,
    steps: int,
    sampler: str = "sde",
    seed: int = 0,
    guidance: float | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Tensor:
    """Images (N, C, H, W) float32 in [-1, 1] for N ``conditions`` (class labels, prompts, or anything, one per
    image, for an unconditional model). ``guidance``: classifier-free guidance of a text-to-image model (None:
    the trained ``model.guidance_scale``)."""
    from .evaluate import seeded_batches
    from .policy import canonical_solver, sample

    steps, seed, batch_size = int(steps), int(seed), int(batch_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not conditions:
        raise ValueError("no conditions: one row per image")
    policy = tm.problem.policy.with_solver(canonical_solver(sampler))
    model = policy.model
    latent_call = contextlib.nullcontext()
    if tm.kind == "prompt":
        embeds, c_all = _prompt_conditions(tm, [str(p) for p in conditions])
        latent_call = _latent_call(model, embeds, guidance)
    elif guidance is not None:
        raise ValueError("guidance applies to text-to-image (Stable Diffusion) models; leave it out here")
    elif tm.kind == "label":
        c_all = torch.as_tensor([int(v) for v in conditions], dtype=torch.long)
        if int(c_all.min()) < 0 or int(c_all.max()) >= tm.num_classes:
            raise ValueError(
                f"class labels must lie in 0..{tm.num_classes - 1}, got {sorted(set(c_all.tolist()))}"
            )
    else:
        c_all = None
    grid = policy.schedule.time_grid(steps)
    decode = getattr(tm.problem.wrap_reward(lambda x, c: x), "decode", None) if tm.kind == "prompt" else None
    out = []
    n = len(conditions)
    with tm._lock, latent_call:
        for j, g, x0 in seeded_batches(n, batch_size, tm.problem.x_shape, seed):
            c = None if c_all is None else c_all[j : j + len(x0)]
            x = sample(policy, x0, c, grid, g).sample
            out.append((decode(x) if decode is not None else x).float().cpu())
    return torch.cat(out)


def png_base64(images: Tensor) -> list[str]:
    """(N, C, H, W) in [-1, 1] -> N base64 PNGs (grey for one channel, RGB for three), uint8 as rewards.to_uint8."""
    from PIL import Image

    from .imageprep import to_uint8

    pngs = []
    for a in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return pngs
