"""Tiny real models for tests and benchmarks: built from config dicts with random weights, nothing downloaded.

``tiny_sd_components`` is Stable-Diffusion-1.5-shaped (UNet2DConditionModel, AutoencoderKL, CLIP text encoder and
tokenizer, DDPMScheduler) with a few small blocks each, ``save_tiny_sd`` writes it as a diffusers folder, and
``tiny_decoder_for`` is a matching AutoencoderTiny. They exercise the real diffusers/transformers code paths
(latent.py) in seconds on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .latent import PROMPTS_FILE

TINY_PROMPTS = ("a red circle", "a blue square", "a green tree")


def tiny_decoder_for(latent_channels: int = 4, seed: int = 0, width: int = 8) -> nn.Module:
    """A tiny AutoencoderTiny with one upsampling stage (image = 2 x latent size, as ``tiny_sd_components``'s
    VAE), random weights: for tests of the decoder plumbing, not a distilled decoder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return (
        AutoencoderTiny(
            encoder_block_out_channels=(width, width),
            decoder_block_out_channels=(width, width),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=latent_channels,
        )
        .eval()
        .requires_grad_(False)
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_clip_tokenizer_files(folder: str | Path, max_length: int = 77) -> Path:
    """A tiny CLIP BPE vocabulary (bytes, bytes + '</w>', a few merges) as vocab.json + merges.txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    merges = [("r", "e"), ("e", "d</w>"), ("a", "r"), ("t", "r"), ("e", "e</w>")]
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [a + "</w>" for a in alphabet]
    vocab_list += ["".join(m) for m in merges if "".join(m) not in vocab_list]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length}), encoding="utf-8"
    )
    return folder


def tiny_sd_components(seed: int = 0, latent_size: int = 8) -> dict:
    """SD1.5-shaped but tiny: UNet2DConditionModel (cross-attention on CLIP states), AutoencoderKL with 4 latent
    channels (image = 2 x latent size), CLIPTextModel + CLIPTokenizer from a local tiny vocabulary, and a
    DDPMScheduler with SD's scaled_linear betas. Built from config dicts; nothing is downloaded."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(
            write_tiny_clip_tokenizer_files(tmp, max_length=77), local_files_only=True
        )
    vocab_size = len(tokenizer)
    if vocab_size < 512:  # 2 x 256 byte tokens + specials: a smaller one means the files were not read
        raise RuntimeError(f"tiny CLIP tokenizer loaded with {vocab_size} tokens")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=2 * latent_size,
        scaling_factor=0.18215,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_sd(folder: str | Path, seed: int = 0, prompts: Sequence[str] = TINY_PROMPTS) -> Path:
    """Write ``tiny_sd_components`` as a diffusers SD folder (safetensors) with a prompts.txt."""
    folder = Path(folder)
    parts = tiny_sd_components(seed)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    (folder / PROMPTS_FILE).write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return folder
