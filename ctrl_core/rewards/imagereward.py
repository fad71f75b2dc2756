"""ImageReward v1.0 (Xu et al. 2023) on torch + transformers 5, loading the original ``ImageReward.pt``.

The original (PyPI ``image-reward==1.5``) is BLIP: a ViT-L/16 image tower (1024 wide, 24 blocks, 16 heads,
LayerNorm eps 1e-6, fused qkv, a final norm), BLIP's "med" BERT-base text tower whose every layer
cross-attends to the image tokens, and an MLP head on the text [CLS] state:

    image_embeds = ViT(pixels)                                   # (B, 1 + 196, 1024)
    h            = BERT(prompt ids, mask; cross-attn to image_embeds).last_hidden_state[:, 0]   # (B, 768)
    score        = (MLP(h) - mean) / std,   mean = 0.16717362830052426, std = 1.0333394966054072

with MLP = Linear(768,1024)-Dropout-Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-Linear(16,1)
(no activations: the original comments its ReLUs out), prompts tokenised by bert-base-uncased plus BLIP's
[DEC] (bos) and [ENC] tokens (vocabulary 30524), padded to 35 tokens, images resized (bicubic) so the short
side is 224, centre-cropped to 224 and normalised with CLIP's mean and std (Pillow's resize, reproduced in
imageprep.py).

Here the towers are transformers' ``BlipVisionModel`` and ``BlipTextModel`` (BLIP's med BERT with
cross-attention), which compute the same operations; ``original_key_map`` names where every tensor of the
original checkpoint goes. ``tools/imagereward_equivalence/`` checks scores against the original code run in its
own environment (bench/results/imagereward_equivalence.json; tests/fixtures/imagereward_tiny for the tests).

Nothing is fetched from the Hugging Face hub: the checkpoint, ``med_config.json`` and a bert-base-uncased
tokenizer folder (its ``vocab.txt``) are local files. Registered as the ``imagereward`` reward.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..imageprep import CLIP_MEAN, CLIP_STD, ClipPreprocess, clip_pixel_values
from . import RewardFn

# the original's normalisation of the MLP output (ImageReward.py: self.mean, self.std)
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35  # tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
MLP_WIDTHS = (1024, 128, 64, 16, 1)

# Keys of ImageReward.pt that the score never reads: BLIP_Pretrain's contrastive projections and the med BERT's
# position_ids buffer (an arange; transformers rebuilds it). Everything else must map, one to one.
UNUSED_ORIGINAL_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)

_VISION_BLOCK = {  # BLIP VisionTransformer Block -> transformers BlipEncoderLayer
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",  # fused (3 * width, width) in both, rows ordered q, k, v
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TEXT_LAYER = [  # med BertLayer and transformers BlipTextLayer share these names
    f"{block}.{part}"
    for block in ("attention", "crossattention")
    for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
] + ["intermediate.dense", "output.dense", "output.LayerNorm"]
_MLP_LINEARS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers (1, 3, 5 are Dropout)


def original_key_map(vision_depth: int, text_layers: int) -> dict[str, str]:
    """Every parameter of the original ``ImageReward.state_dict()`` -> its key in ``ImageRewardModel``."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    key_map = {
        f"{v}cls_token": "vision.embeddings.class_embedding",  # (1, 1, width) in both
        f"{v}pos_embed": "vision.embeddings.position_embedding",  # (1, 1 + patches, width) in both
    }
    for s in ("weight", "bias"):
        key_map[f"{v}patch_embed.proj.{s}"] = f"vision.embeddings.patch_embedding.{s}"
        key_map[f"{v}norm.{s}"] = f"vision.post_layernorm.{s}"
        for i in range(vision_depth):
            for orig_name, our_name in _VISION_BLOCK.items():
                key_map[f"{v}blocks.{i}.{orig_name}.{s}"] = f"vision.encoder.layers.{i}.{our_name}.{s}"
        key_map[f"{t}embeddings.LayerNorm.{s}"] = f"text.embeddings.LayerNorm.{s}"
        for i in range(text_layers):
            for name in _TEXT_LAYER:
                key_map[f"{t}encoder.layer.{i}.{name}.{s}"] = f"text.encoder.layer.{i}.{name}.{s}"
        for i in _MLP_LINEARS:
            key_map[f"mlp.layers.{i}.{s}"] = f"mlp.{i}.{s}"
    for name in ("word_embeddings", "position_embeddings"):
        key_map[f"{t}embeddings.{name}.weight"] = f"text.embeddings.{name}.weight"
    return key_map


def map_original_state_dict(
    state: dict[str, Tensor], vision_depth: int, text_layers: int
) -> dict[str, Tensor]:
    """Rename an original ImageReward state dict to ``ImageRewardModel`` keys; a missing or unexpected key is
    an error naming it (the original loads with ``strict=False``, which would hide a broken file)."""
    key_map = original_key_map(vision_depth, text_layers)
    missing = sorted(k for k in key_map if k not in state)
    unexpected = sorted(k for k in state if k not in key_map and k not in UNUSED_ORIGINAL_KEYS)
    if missing or unexpected:
        raise ValueError(
            "not an ImageReward v1.0 state dict of this shape: "
            + (f"missing keys {_listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {_listing(unexpected)}" if unexpected else "")
        )
    return {ours: state[orig] for orig, ours in key_map.items()}


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


# --- configs --------------------------------------------------------------------------------------------------
def _depth(state: dict[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))]
    return max(found) + 1 if found else 0


def build_configs(state: dict[str, Tensor], med_config: dict, vision_num_heads: int | None = None):
    """(BlipVisionConfig, BlipTextConfig) for an original state dict: the text tower from ``med_config.json``
    (as the original builds it; ``encoder_width`` is the image width, as BLIP_Pretrain sets it), the image tower
    from the tensor shapes (the original hard-codes ViT-L; small test models differ). The head count is not in
    the shapes: BLIP's ViTs use 64-wide heads (base 768/12, large 1024/16), the default here."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v = "blip.visual_encoder."
    needed = [
        f"{v}cls_token",
        f"{v}pos_embed",
        f"{v}patch_embed.proj.weight",
        f"{v}blocks.0.mlp.fc1.weight",
        "blip.text_encoder.embeddings.word_embeddings.weight",
    ]
    if missing := [k for k in needed if k not in state]:
        raise ValueError(f"not an ImageReward v1.0 state dict: missing keys {_listing(missing)}")
    width = state[f"{v}cls_token"].shape[-1]
    patch = state[f"{v}patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[f"{v}pos_embed"].shape[1] - 1)
    if grid * grid != state[f"{v}pos_embed"].shape[1] - 1:
        raise ValueError(
            f"{v}pos_embed {tuple(state[f'{v}pos_embed'].shape)} is not 1 + a square grid of patches"
        )
    heads = vision_num_heads or max(1, width // 64)
    if width % heads:
        raise ValueError(f"image tower width {width} is not divisible by vision_num_heads={heads}")
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[f"{v}blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_depth(state, r"blip\.visual_encoder\.blocks\.(\d+)\..*"),
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # nn.GELU (erf) in timm's Mlp
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )

    if not med_config.get("add_cross_attention", False):
        raise ValueError("med_config.json: ImageReward's text tower needs add_cross_attention: true")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("med_config.json: only absolute position embeddings are supported")
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med_config.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med_config.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=med_config["vocab_size"] - 2,  # [DEC], after bert's vocabulary (the score never uses it)
        is_decoder=True,  # makes BlipTextLayer build its cross-attention; forward still runs bidirectionally
        use_cache=False,
    )
    rows, cols = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape
    if (rows, cols) != (text.vocab_size, text.hidden_size):
        raise ValueError(
            f"med_config.json (vocab_size {text.vocab_size}, hidden_size {text.hidden_size}) does not match the "
            f"checkpoint's text embeddings {rows} x {cols}"
        )
    return vision, text


# --- model ----------------------------------------------------------------------------------------------------
class ImageRewardModel(nn.Module):
    """BLIP image tower + cross-attending text tower + MLP head; ``forward`` is the original ``score_gard``."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        w = (text_config.hidden_size, *MLP_WIDTHS)
        self.mlp = nn.Sequential(  # indices match the original's mlp.layers (dropout is inactive in eval)
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.2),
            nn.Linear(w[2], w[3]),
            nn.Dropout(0.1),
            nn.Linear(w[3], w[4]),
            nn.Linear(w[4], w[5]),
        )

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 3, S, S) CLIP-normalised pixels, (B, L) prompt ids and mask -> (B,) scores, float32."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, Dv), final norm
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = text.last_hidden_state[:, 0].float()  # the [CLS] state, (B, Dt)
        raw = self.mlp(features.to(self.mlp[0].weight.dtype)).float().squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD  # score = (MLP(h) - mean) / std


def preprocess_images(images: Tensor, image_size: int = 224) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, S, S): what the original's transform does to the same image as an
    8-bit PIL image (how ImageReward is used: ``score(prompt, PIL image)``): ``imageprep.clip_pixel_values``
    with its settings, Resize(S, bicubic) (short side to S), CenterCrop(S) with torchvision's rounded offsets,
    ToTensor and Normalize(CLIP mean, std). The pixels equal the original's bit for bit
    (tools/imagereward_equivalence checks it)."""
    pre = ClipPreprocess(image_size, image_size, image_size, CLIP_MEAN, CLIP_STD, round_crop_offset=True)
    return clip_pixel_values(images, pre)


# --- loading --------------------------------------------------------------------------------------------------
def load_original_state_dict(checkpoint: str | os.PathLike) -> dict[str, Tensor]:
    """The original ``ImageReward.pt`` (a pickled state dict, read with ``weights_only=True``: no code runs) or
    a ``.safetensors`` file holding the same keys (``convert_to_safetensors``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"ImageReward checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:  # a pickled module or code, not plain tensors
        raise ValueError(f"{path}: not a plain state dict (refused with weights_only=True): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


def convert_to_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """ImageReward.pt -> safetensors, same keys and values (loadable without unpickling)."""
    from ..io import atomic_save_weights

    state = load_original_state_dict(checkpoint)
    atomic_save_weights(
        state, out, metadata={"format": "pt", "model": "ImageReward v1.0", "keys": "original"}
    )
    return Path(out)


def load_blip_tokenizer(tokenizer_dir: str | os.PathLike):
    """bert-base-uncased from a local folder (its vocab.txt), plus BLIP's tokens as ``init_tokenizer`` adds
    them: ``[DEC]`` as bos, ``[ENC]`` as an additional special token (ids 30522 and 30523 at full size)."""
    from transformers import BertTokenizer

    path = Path(tokenizer_dir)
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(
            f"ImageReward tokenizer: {path} has no vocab.txt; give a local bert-base-uncased tokenizer folder "
            "(nothing is fetched from the Hugging Face hub)"
        )
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """A loaded ImageReward: ``score(images, prompts)`` is the original ``score(prompt, image)`` for each pair,
    batched; ``score_pixels`` takes already-preprocessed pixels (the original ``score_gard``)."""

    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"ImageReward batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """-> (input_ids, attention_mask), each (P, 35), on the CPU."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def score_tokens(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, S, S) and tokens (B, L) -> (B,) scores on the CPU, in batches."""
        dtype = next(self.model.parameters()).dtype
        out = []
        for i in range(0, pixel_values.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            out.append(
                self.model(
                    pixel_values[sl].to(self.device, dtype),
                    input_ids[sl].to(self.device),
                    attention_mask[sl].to(self.device),
                ).cpu()
            )
        return torch.cat(out) if out else torch.zeros(0)

    def score_pixels(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        ids, mask = self.tokenize(prompts)
        return self.score_tokens(pixel_values, ids, mask)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] and one prompt per image -> (B,) scores on the CPU."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"ImageReward: {images.shape[0]} images but {len(prompts)} prompts")
        ids, mask = self.tokenize(prompts)
        return self._score_images(images, ids, mask)

    def _score_images(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            pixels = preprocess_images(images[sl].to(self.device), self.model.image_size)
            out.append(self.score_tokens(pixels, ids[sl], mask[sl]))
        return torch.cat(out) if out else torch.zeros(0)

    def reward_for_prompts(self, prompts: Sequence[str]) -> RewardFn:
        """The reward with a prompt list bound: ``fn(images, conditions)`` with conditions the prompt indices
        (B,) -> (B,) scores, on the images' device. Prompts are tokenised once, here."""
        prompts = list(prompts)
        ids, mask = self.tokenize(prompts)

        def fn(images: Tensor, conditions: Tensor | None = None) -> Tensor:
            idx = prompt_rows(conditions, images.shape[0], len(prompts), "the imagereward reward")
            return self._score_images(images, ids[idx], mask[idx]).to(images.device)

        fn.prompts = prompts  # type: ignore[attr-defined]
        return fn


def prompt_rows(conditions: Tensor | None, num_images: int, num_prompts: int, who: str) -> Tensor:
    """The prompt index of each image, checked: one per image, each in [0, num_prompts) -> (B,) long, CPU."""
    if conditions is None:
        raise ValueError(f"{who} needs conditions: the prompt index of each image")
    idx = torch.as_tensor(conditions).long().reshape(-1).cpu()
    if idx.numel() != num_images:
        raise ValueError(f"{who}: {num_images} images but {idx.numel()} prompt indices")
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_prompts):
        raise ValueError(f"{who}: prompt index out of range [0, {num_prompts}): {idx.tolist()}")
    return idx


class ImageRewardCopy(nn.Module):
    """A trainable copy of a loaded ImageReward (float32): the paper's value residual F_phi for SD1.5. The
    leading ``frozen_fraction`` of its weights (the ViT, then the first text layers) stay frozen, the rest
    trains. ``forward(images, conditions)`` scores images in [-1, 1] against the prompts ``conditions`` index,
    with gradients to the trainable weights."""

    def __init__(self, scorer: ImageRewardScorer, prompts: Sequence[str], frozen_fraction: float = 0.7):
        super().__init__()
        import copy

        from ..value import freeze_leading

        self.model = copy.deepcopy(scorer.model).float().train(False)
        freeze_leading(self.model, frozen_fraction)
        ids, mask = scorer.tokenize(list(prompts))
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, images: Tensor, conditions: Tensor | None) -> Tensor:
        dev = self.input_ids.device
        idx = prompt_rows(conditions, images.shape[0], len(self.input_ids), "the ImageReward value copy").to(
            dev
        )
        pixels = preprocess_images(images.to(dev), self.model.image_size)
        return self.model(pixels, self.input_ids[idx], self.attention_mask[idx])


def load_imagereward(
    checkpoint: str | os.PathLike,
    med_config: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    batch_size: int = 16,
    vision_num_heads: int | None = None,
) -> ImageRewardScorer:
    """Load the original ImageReward files into ``ImageRewardModel`` (eval mode, frozen) with its tokenizer.

    checkpoint: ``ImageReward.pt`` or a ``.safetensors`` made by ``convert_to_safetensors``; med_config: the
    ``med_config.json`` shipped beside it; tokenizer_dir: a local bert-base-uncased folder (vocab.txt); device:
    default ``compute_device()``; dtype: float32 (as the original), float16 or bfloat16."""
    from ..models import compute_device

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"ImageReward dtype must be float32, float16 or bfloat16, got {dtype!r}")
    med_path = Path(med_config)
    if not med_path.is_file():
        raise FileNotFoundError(f"ImageReward med_config.json not found: {med_path}")
    state = load_original_state_dict(checkpoint)
    vision_config, text_config = build_configs(state, json.loads(med_path.read_text()), vision_num_heads)
    mapped = map_original_state_dict(state, vision_config.num_hidden_layers, text_config.num_hidden_layers)
    del state
    model = ImageRewardModel(vision_config, text_config)
    expected = model.state_dict()
    if wrong := [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if v.shape != expected[k].shape
    ]:
        raise ValueError(f"{checkpoint}: tensor shapes do not fit med_config.json: {_listing(wrong)}")
    model.load_state_dict(mapped, strict=True)
    del mapped, expected
    tokenizer = load_blip_tokenizer(tokenizer_dir)
    if len(tokenizer) != text_config.vocab_size:
        raise ValueError(
            f"ImageReward tokenizer from {tokenizer_dir} has {len(tokenizer)} tokens (with [DEC], [ENC]) but the "
            f"checkpoint's text embeddings have {text_config.vocab_size} rows: use bert-base-uncased's vocab.txt "
            f"({text_config.vocab_size - 2} lines)"
        )
    device = compute_device() if device is None else torch.device(device)
    model.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    return ImageRewardScorer(model, tokenizer, device, batch_size)


def imagereward(
    checkpoint: str,
    med_config: str,
    tokenizer_dir: str,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "float32",
    vision_num_heads: int | None = None,
) -> RewardFn:
    """ImageReward v1.0 score of each image against its prompt. Reads prompt text, so it works only with a
    prompt list bound (``rewards.bind_prompts``, done by the latent text-to-image backend); loads at once, so a
    bad path fails before any training."""
    scorer = load_imagereward(
        checkpoint,
        med_config,
        tokenizer_dir,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        vision_num_heads=vision_num_heads,
    )

    def unbound(images: Tensor, conditions: Tensor | None = None) -> Tensor:
        raise ValueError(
            "the imagereward reward scores an image against its prompt text: use it with a text-to-image model "
            "(a prompt list), which binds the prompts (rewards.bind_prompts)"
        )

    unbound.bind_prompts = scorer.reward_for_prompts  # type: ignore[attr-defined]
    unbound.trainable_copy = lambda prompts, frozen_fraction: ImageRewardCopy(
        scorer, prompts, frozen_fraction
    )  # type: ignore[attr-defined]
    unbound.scorer = scorer  # type: ignore[attr-defined]
    return unbound
