"""The LAION aesthetic predictor as a reward: an MLP head on the L2-normalised CLIP image embedding.

As in christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``) and DDPO
(kvablack/ddpo-pytorch ``ddpo_pytorch/aesthetic_scorer.py``, ``rewards.aesthetic_score``):

    e     = CLIP.get_image_features(CLIPProcessor(uint8 image))      # ViT-L/14: e in R^768
    score = MLP(e / ||e||_2)

    MLP = Linear(768, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1)
          Linear(64, 16) Linear(16, 1)

No activations (the original comments its ReLUs out), so at eval time the head is affine. The published head
``sac+logos+ava1-l14-linearMSE.pth`` is a pickled state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``
(the Dropouts at 1, 3, 5 hold no weights); ``AestheticMLP`` has the same keys, so it loads with
``strict=True``.

Everything is local: ``clip_dir`` is a transformers CLIP folder (``CLIPModel`` or
``CLIPVisionModelWithProjection``: config.json + safetensors, optional preprocessor_config.json), the head a
``.pth`` (read with ``torch.load(weights_only=True)``: tensors only, no code) or ``.safetensors``. CLIP's
preprocessing runs in torch, batched, on the reward's device, following CLIPProcessor step by step (see
``imageprep.clip_pixel_values``). Try it offline with random tiny weights::

    python -c "from ctrl_core.rewards.aesthetic import write_tiny_aesthetic as w; print(w('/tmp/aesthetic_tiny'))"

then ``reward: {name: aesthetic, options: {clip_dir: /tmp/aesthetic_tiny/clip,
head: /tmp/aesthetic_tiny/head.pth}}``.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from ..imageprep import CLIP_MEAN, CLIP_STD, ClipPreprocess, clip_pixel_values
from ..io import UnsafeWeightsError, load_weights, require_safetensors
from . import RewardFn

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, "resample" in preprocessor_config.json
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # hidden widths of the original head; only its input width varies
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head, (B, input_dim) -> (B, 1); state-dict keys as in the .pth."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


class AestheticScorer(nn.Module):
    """CLIP image tower + projection, then the head on the unit embedding: images (B, C, H, W) in [-1, 1] ->
    scores (B,). Frozen, eval mode; run under ``torch.no_grad``."""

    def __init__(
        self, vision_model: nn.Module, visual_projection: nn.Module, head: AestheticMLP, pre: ClipPreprocess
    ):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head
        self.pre = pre

    def embed(self, pixel_values: Tensor) -> Tensor:
        """CLIPModel.get_image_features: the projected pooled (CLS) output, (B, projection_dim)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    def score(self, images: Tensor) -> Tensor:
        """``forward`` with autograd (a trainable copy's weights get gradients)."""
        p = next(self.parameters())
        pixel_values = clip_pixel_values(images.to(p.device), self.pre).to(p.dtype)
        e = self.embed(pixel_values)
        e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)  # score = MLP(e / ||e||_2)
        return self.head(e).squeeze(1).float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.score(images)


class AestheticCopy(nn.Module):
    """A trainable copy of an ``AestheticScorer`` (float32), its leading ``frozen_fraction`` of weights frozen:
    the paper's value residual design with the aesthetic predictor. ``forward(images, conditions)`` has
    gradients to the trainable weights (conditions are ignored, as by the reward)."""

    def __init__(self, scorer: AestheticScorer, frozen_fraction: float = 0.7):
        super().__init__()
        import copy

        from ..value import freeze_leading

        self.scorer = copy.deepcopy(scorer).float().train(False)
        freeze_leading(self.scorer, frozen_fraction)

    def forward(self, images: Tensor, conditions: Tensor | None = None) -> Tensor:
        return self.scorer.score(images)


# --- preprocessing ------------------------------------------------------------------------------------------
def read_preprocess(clip_dir: str | Path, image_size: int) -> ClipPreprocess:
    """Preprocessing from ``preprocessor_config.json`` (old ``size: 224`` or ``{"shortest_edge": 224}``
    forms), else CLIP's defaults at the model's ``image_size``. Settings this module does not implement
    (no resize, no crop, another filter) are refused rather than silently scored differently."""
    f = Path(clip_dir) / "preprocessor_config.json"
    cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
    unsupported = [f"{k}={cfg[k]!r}" for k in steps if cfg.get(k, True) is not True]
    if cfg.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
        unsupported.append(f"resample={cfg['resample']!r} (only bicubic, 3)")
    if not math.isclose(float(cfg.get("rescale_factor", 1 / 255)), 1 / 255):
        unsupported.append(f"rescale_factor={cfg['rescale_factor']!r}")
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            unsupported.append(f"size={size!r} (only a shortest edge)")
        size = size.get("shortest_edge", image_size)
    crop = cfg.get("crop_size", image_size)
    crop_h, crop_w = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    if unsupported:
        raise ValueError(f"{f}: unsupported preprocessing {', '.join(unsupported)}")
    if (crop_h, crop_w) != (image_size, image_size):
        raise ValueError(
            f"{f}: crop {crop_h}x{crop_w} but the CLIP vision model takes {image_size}x{image_size}"
        )
    if int(size) < max(crop_h, crop_w):
        raise ValueError(f"{f}: shortest edge {size} is smaller than the crop {crop_h}x{crop_w}")
    mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    return ClipPreprocess(
        int(size), int(crop_h), int(crop_w), tuple(map(float, mean)), tuple(map(float, std))
    )


# --- loading ------------------------------------------------------------------------------------------------
def load_clip_image_tower(clip_dir: str | Path) -> tuple[nn.Module, nn.Module, int, int]:
    """A local CLIP folder -> (vision_model, visual_projection, projection_dim, image_size), offline and from
    safetensors only. ``CLIPModel`` folders (openai/clip-vit-large-patch14) and
    ``CLIPVisionModelWithProjection`` folders both work; the text tower is dropped."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    d = Path(clip_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a transformers CLIP folder (no config.json)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickled = sorted(
            f.name for f in d.iterdir() if f.name in PICKLED_WEIGHTS or f.suffix in (".bin", ".pt")
        )
        found = f" (found pickled {pickled})" if pickled else ""
        raise UnsafeWeightsError(
            f"{d}: no model.safetensors{found}; only safetensors weights are loaded "
            "(pickles can execute code): "
            "convert once where you trust the file, e.g. CLIPModel.from_pretrained(d).save_pretrained(out)"
        )
    for f in weights:
        require_safetensors(f)
    model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
    if model_type not in classes:
        raise ValueError(f"{d}: model_type {model_type!r}, expected one of {sorted(classes)}")
    model, info = classes[model_type].from_pretrained(
        d, local_files_only=True, use_safetensors=True, output_loading_info=True
    )
    # a folder without the projection (a bare CLIPVisionModel) would load with it randomly initialised
    missing = sorted(k for k in info["missing_keys"] if k.startswith(("vision_model.", "visual_projection.")))
    if missing:
        raise ValueError(f"{d}: weights missing for the image tower: {missing[:8]}")
    cfg = model.config
    vision_cfg = cfg.vision_config if model_type == "clip" else cfg
    return model.vision_model, model.visual_projection, int(cfg.projection_dim), int(vision_cfg.image_size)


def load_head_state(path: str | Path) -> dict[str, Tensor]:
    """The head's state dict from ``.safetensors`` or the original ``.pth`` (``torch.load`` with
    ``weights_only=True``: a pickle that is not plain tensors is refused, never executed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"aesthetic head not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return load_weights(p)
    if suffix not in (".pth", ".pt"):
        raise ValueError(f"{p}: aesthetic head must be .safetensors or the original .pth")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object that is not tensors/containers
        raise UnsafeWeightsError(
            f"{p}: refused, its pickle holds more than tensors (torch.load weights_only=True failed); "
            "the original sac+logos+ava1-l14-linearMSE.pth is a plain state dict and loads"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def load_head(path: str | Path, input_dim: int | None = None) -> AestheticMLP:
    """``AestheticMLP`` from a head file; ``input_dim`` (CLIP's projection_dim) is checked against it."""
    state = load_head_state(path)
    expected = set(AestheticMLP(1).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an aesthetic-predictor head: missing keys {missing}, unexpected keys {unexpected} "
            f"(expected {sorted(expected)})"
        )
    head_dim = state["layers.0.weight"].shape[-1]
    if input_dim is not None and head_dim != input_dim:
        raise ValueError(
            f"{path}: the head takes {head_dim}-dim embeddings but the CLIP model projects to {input_dim} "
            "(sac+logos+ava1-l14 is for CLIP ViT-L/14, projection_dim 768)"
        )
    head = AestheticMLP(head_dim)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:  # hidden widths other than 1024-128-64-16-1
        raise ValueError(f"{path}: head shapes differ from the original {HEAD_WIDTHS}: {err}") from None
    return head


def load_aesthetic(
    clip_dir: str | Path, head_path: str | Path, device: str | torch.device | None = None
) -> AestheticScorer:
    """CLIP folder + head file -> a frozen ``AestheticScorer`` on ``device`` (else ``compute_device()``)."""
    from ..models import compute_device

    vision_model, visual_projection, projection_dim, image_size = load_clip_image_tower(clip_dir)
    head = load_head(head_path, projection_dim)
    scorer = AestheticScorer(vision_model, visual_projection, head, read_preprocess(clip_dir, image_size))
    scorer = scorer.to(torch.device(device) if device else compute_device()).eval()
    scorer.requires_grad_(False)
    return scorer


def aesthetic(clip_dir: str = "", head: str = "", batch_size: int = 32, device: str = "") -> RewardFn:
    """LAION aesthetic score (DDPO's 'aesthetic'): ``clip_dir`` a local CLIP ViT-L/14 folder (safetensors),
    ``head`` the predictor's .pth or .safetensors, ``device`` "" for ``compute_device()``. Conditions are
    ignored; scores come back (B,) on the images' device."""
    if not clip_dir or not head:
        raise ValueError(
            "the aesthetic reward needs options clip_dir (a local CLIP folder) and head (.pth/.safetensors)"
        )
    if batch_size < 1:
        raise ValueError(f"aesthetic reward: batch_size must be >= 1, got {batch_size}")
    scorer = load_aesthetic(clip_dir, head, device or None)

    def fn(images: Tensor, conditions: Tensor | None = None) -> Tensor:
        scores = [scorer(part) for part in images.split(batch_size)]
        return torch.cat(scores).to(images.device)

    fn.trainable_copy = lambda prompts, frozen_fraction: AestheticCopy(scorer, frozen_fraction)  # type: ignore[attr-defined]
    return fn


# --- tiny random weights, for tests and for trying the reward offline ---------------------------------------
def write_tiny_aesthetic(folder: str | Path, seed: int = 0, layout: str = "clip") -> dict[str, Path]:
    """Write a tiny random CLIP folder and a matching head; returns {clip_dir, head_safetensors, head_pth}.

    ``layout``: "clip" (a ``CLIPModel`` with a tiny text tower, like openai/clip-vit-large-patch14) or
    "vision" (``CLIPVisionModelWithProjection``). Image size 32, patch 8, width 32, 2 layers, projection_dim
    16; the preprocessor_config.json uses the old integer form of the ViT-L/14 one. The head keeps the
    original hidden widths with input 16; scores sit around 5, like the real predictor's.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..io import atomic_save_weights

    folder = Path(folder)
    clip_dir = folder / "clip"
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4,
        initializer_factor=3.0,  # at the default 1.0 a random tower maps all images to nearly one embedding
    )  # fmt: skip
    torch.manual_seed(seed)
    if layout == "clip":
        text = dict(
            vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )  # fmt: skip
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif layout == "vision":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, projection_dim=16))
    else:
        raise ValueError(f"layout must be 'clip' or 'vision', got {layout!r}")
    model.save_pretrained(clip_dir, safe_serialization=True)
    preprocessor = {
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": PIL_BICUBIC, "size": 32,
    }  # fmt: skip
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    head = AestheticMLP(16)
    with torch.no_grad():  # variance-preserving weights: scores spread by O(1) across images, around 5
        for layer in head.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                nn.init.zeros_(layer.bias)
        head.layers[7].bias.fill_(5.0)
    state = head.state_dict()
    paths = {
        "clip_dir": clip_dir,
        "head_safetensors": folder / "head.safetensors",
        "head_pth": folder / "head.pth",
    }
    atomic_save_weights(state, paths["head_safetensors"])
    torch.save(state, paths["head_pth"])  # the original's format: a pickled state dict
    return paths
