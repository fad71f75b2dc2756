"""The LAION aesthetic reward (ctrl_core/rewards/aesthetic.py) against DDPO's computation, on tiny random CLIPs.

The reference below is written as kvablack/ddpo-pytorch does it (``rewards.aesthetic_score`` +
``aesthetic_scorer.AestheticScorer``): images -> uint8 -> transformers' PIL CLIP image processor ->
``CLIPModel.get_image_features`` -> ``embed / ||embed||`` -> its own ``MLP`` (an ``nn.Sequential`` named
``layers``) loaded from the pickled ``.pth`` state dict. Nothing is downloaded.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctrl_core.imageprep import _pillow_major, clip_pixel_values, pil_bicubic_resize, pillow_height_first
from ctrl_core.io import UnsafeWeightsError, atomic_save_weights, load_weights
from ctrl_core.rewards import make_reward
from ctrl_core.rewards.aesthetic import AestheticMLP, load_aesthetic, read_preprocess, write_tiny_aesthetic

LEVEL = 1 / 255 / min((0.26862954, 0.26130258, 0.27577711))  # one uint8 level in CLIP pixel units


class DDPOMLP(nn.Module):
    """ddpo_pytorch/aesthetic_scorer.py's MLP, with the input width a parameter (768 for ViT-L/14)."""

    def __init__(self, input_dim: int):
        super().__init__()
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

    def forward(self, embed):
        return self.layers(embed)


def pil_image_processor(clip_dir):
    try:  # transformers >= 5: the PIL backend (the default CLIPImageProcessor needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4, as DDPO used: the slow CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(clip_dir, local_files_only=True)


class DDPOReference:
    """DDPO's aesthetic reward, step by step, for images in [-1, 1] (DDPO's are in [0, 1])."""

    def __init__(self, clip_dir, head_pth, model_cls=None):
        from transformers import CLIPModel

        self.processor = pil_image_processor(clip_dir)
        self.clip = (model_cls or CLIPModel).from_pretrained(clip_dir, local_files_only=True).eval()
        self.mlp = DDPOMLP(self.clip.config.projection_dim)
        self.mlp.load_state_dict(torch.load(head_pth, map_location="cpu", weights_only=True))
        self.mlp.eval()

    @torch.no_grad()
    def pixel_values(self, images):
        uint8 = ((images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)  # DDPO: (x * 255).round()
        return self.processor(images=uint8, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def __call__(self, images):
        pixel_values = self.pixel_values(images)
        if hasattr(self.clip, "get_image_features"):
            embed = self.clip.get_image_features(pixel_values=pixel_values)
            # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
            embed = embed if isinstance(embed, torch.Tensor) else embed.pooler_output
        else:  # CLIPVisionModelWithProjection
            embed = self.clip(pixel_values=pixel_values).image_embeds
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return self.mlp(embed).squeeze(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_aesthetic(tmp_path_factory.mktemp("aesthetic"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny):
    return load_aesthetic(tiny["clip_dir"], tiny["head_pth"], "cpu")


@pytest.fixture(scope="module")
def reference(tiny):
    return DDPOReference(tiny["clip_dir"], tiny["head_pth"])


def images(shape, smooth=False, seed=0):
    """Random images in [-1, 1]: pixel noise, or smooth ones (bilinear upsampling of a 4x4 grid)."""
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.rand(shape, generator=g) * 2 - 1
    coarse = torch.rand(*shape[:2], 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=True)


def test_matches_ddpo_at_the_clip_size(tiny, reference):
    """At CLIP's own size the resize is the identity on both sides: the same pixels, the same scores."""
    reward = make_reward(
        "aesthetic", clip_dir=str(tiny["clip_dir"]), head=str(tiny["head_pth"]), device="cpu"
    )
    x = torch.cat([images((4, 3, 32, 32)), images((4, 3, 32, 32), smooth=True)])
    ours, ref = reward(x, None), reference(x)
    assert ours.shape == (8,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)
    # the comparison discriminates: scores spread across images far beyond the tolerance
    assert ref.std() > 0.05, ref


@pytest.mark.parametrize(
    "shape, smooth",
    [((3, 3, 64, 64), True), ((3, 3, 64, 64), False), ((3, 3, 24, 24), False), ((3, 3, 40, 56), True),
     ((3, 3, 40, 56), False), ((3, 1, 8, 8), False), ((2, 3, 96, 72), False), ((2, 3, 37, 29), False)],
)  # fmt: skip
def test_resized_images_match_ddpo_exactly(scorer, reference, shape, smooth):
    """Other sizes: our torch resize reproduces Pillow's uint8 bicubic bit for bit (downscale, upscale,
    non-square, grayscale), so pixels and scores agree as at the CLIP size."""
    x = images(shape, smooth)
    ours, ref = clip_pixel_values(x, scorer.pre), reference.pixel_values(x)
    assert ours.shape == ref.shape == (shape[0], 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(scorer(x), reference(x), rtol=1e-4, atol=0)


def test_tall_images_follow_the_installed_pillow(scorer, reference):
    """Pillow 13 filters height first when shrinking some tall images (Pillow#9549); the resize follows the
    installed Pillow, so pixels match exactly here too. The classic width-first order (Pillow < 13) rounds the
    uint8 intermediate differently: at most 2 levels on this smooth image."""
    x = images((3, 3, 100, 40), smooth=True)
    ours, ref = clip_pixel_values(x, scorer.pre), reference.pixel_values(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    levels = torch.round((x + 1) * 127.5)
    classic = pil_bicubic_resize(levels, (80, 32), pillow_major=12)
    diff = (classic - pil_bicubic_resize(levels, (80, 32))).abs()
    assert pillow_height_first((100, 40), (80, 32)) == (_pillow_major() >= 13)
    assert diff.max() <= 2 and (_pillow_major() < 13 or diff.max() > 0)


def test_pil_resize_weights_and_upscale():
    """pil_bicubic_resize on its own against PIL.Image.resize, both directions, odd sizes, RGB and L."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for (h, w), (new_h, new_w) in [
        ((13, 50), (7, 27)),
        ((5, 9), (17, 31)),
        ((64, 48), (64, 20)),
        ((9, 9), (30, 9)),
        ((300, 40), (224, 8)),  # Pillow 13: height first (76 > 2 * 32)
        ((300, 40), (250, 8)),  # width first (50 <= 2 * 32)
        ((16, 16), (8, 20)),  # height first: the width grows
        ((40, 16), (20, 8)),
    ]:
        for channels in (1, 3):
            arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
            pil = Image.fromarray(arr[..., 0] if channels == 1 else arr).resize((new_w, new_h), Image.BICUBIC)
            want = torch.from_numpy(np.array(pil, dtype=np.float32).reshape(new_h, new_w, channels))
            got = pil_bicubic_resize(torch.from_numpy(arr).float().permute(2, 0, 1)[None], (new_h, new_w))
            assert torch.equal(got[0].permute(1, 2, 0), want), ((h, w), (new_h, new_w), channels)


def test_head_pth_and_safetensors_score_identically(tiny):
    x = images((5, 3, 48, 40), smooth=True)
    from_pth = load_aesthetic(tiny["clip_dir"], tiny["head_pth"], "cpu")(x)
    from_safetensors = load_aesthetic(tiny["clip_dir"], tiny["head_safetensors"], "cpu")(x)
    assert torch.equal(from_pth, from_safetensors)
    keys = set(load_weights(tiny["head_safetensors"]))
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_vision_with_projection_layout(tmp_path):
    """A CLIPVisionModelWithProjection folder (image tower only) scores like its DDPO-style reference."""
    from transformers import CLIPVisionModelWithProjection

    paths = write_tiny_aesthetic(tmp_path, seed=1, layout="vision")
    ref = DDPOReference(paths["clip_dir"], paths["head_pth"], CLIPVisionModelWithProjection)
    x = images((4, 3, 32, 32), smooth=True, seed=3)
    ours = load_aesthetic(paths["clip_dir"], paths["head_safetensors"], "cpu")(x)
    torch.testing.assert_close(ours, ref(x), rtol=1e-4, atol=0)


def test_grayscale_batching_and_conditions(tiny, scorer):
    reward = make_reward(
        "aesthetic",
        clip_dir=str(tiny["clip_dir"]),
        head=str(tiny["head_safetensors"]),
        batch_size=2,
        device="cpu",
    )
    gray = images((5, 1, 8, 8), smooth=True)
    scores = reward(gray, torch.arange(5))  # conditions are ignored
    assert torch.equal(scores, reward(gray.expand(-1, 3, -1, -1), None))
    torch.testing.assert_close(scores, scorer(gray), rtol=1e-5, atol=1e-6)  # batches of 2 vs one of 5
    assert torch.isfinite(scores).all() and scores.std() > 0


def test_weighted_sum_with_jpeg(tiny):
    opts = {"clip_dir": str(tiny["clip_dir"]), "head": str(tiny["head_pth"]), "device": "cpu"}
    total = make_reward(
        "weighted_sum", terms={"aesthetic": {"weight": 0.5, **opts}, "jpeg_compressibility": {"weight": 1.0}}
    )
    x = images((4, 3, 32, 32), smooth=True)
    expected = 0.5 * make_reward("aesthetic", **opts)(x, None) + make_reward("jpeg_compressibility")(x, None)
    torch.testing.assert_close(total(x, None), expected)


# --- errors -------------------------------------------------------------------------------------------------
def test_pickled_clip_folder_refused(tiny, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny["clip_dir"] / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(UnsafeWeightsError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        load_aesthetic(tmp_path, tiny["head_pth"], "cpu")


def test_clip_folder_without_projection_refused(tmp_path, tiny):
    """A bare CLIPVisionModel would otherwise load with a random visual_projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=1, num_attention_heads=4, projection_dim=16)  # fmt: skip
    CLIPVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="visual_projection"):
        load_aesthetic(tmp_path, tiny["head_pth"], "cpu")


def test_head_width_must_match_clip(tiny, tmp_path):
    atomic_save_weights(AestheticMLP(8).state_dict(), tmp_path / "head8.safetensors")
    with pytest.raises(ValueError, match="8-dim embeddings but the CLIP model projects to 16"):
        load_aesthetic(tiny["clip_dir"], tmp_path / "head8.safetensors", "cpu")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_head_with_missing_or_extra_keys_refused(tiny, tmp_path, suffix):
    state = load_weights(tiny["head_safetensors"])
    del state["layers.6.bias"]
    state["model.layers.0.weight"] = state["layers.0.weight"].clone()  # a Lightning-style prefix
    path = tmp_path / f"head{suffix}"
    torch.save(state, path) if suffix == ".pth" else atomic_save_weights(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys \['layers\.6\.bias'\], unexpected keys \['model\.layers"
    ):
        load_aesthetic(tiny["clip_dir"], path, "cpu")


class _TouchOnLoad:
    marker: pathlib.Path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_head_pickle_with_code_refused_not_run(tiny, tmp_path):
    evil = _TouchOnLoad()
    evil.marker = tmp_path / "ran"
    torch.save({"layers.0.weight": evil}, tmp_path / "head.pth")
    with pytest.raises(UnsafeWeightsError, match="weights_only"):
        load_aesthetic(tiny["clip_dir"], tmp_path / "head.pth", "cpu")
    assert not evil.marker.exists()


def test_options_are_checked(tiny):
    with pytest.raises(ValueError, match="clip_dir"):
        make_reward("aesthetic", head=str(tiny["head_pth"]))
    with pytest.raises(ValueError, match="batch_size"):
        make_reward("aesthetic", clip_dir=str(tiny["clip_dir"]), head=str(tiny["head_pth"]), batch_size=0)


def test_preprocessor_config_forms(tmp_path):
    assert (tmp_path / "preprocessor_config.json").exists() is False
    pre = read_preprocess(tmp_path, 224)  # no file: CLIP defaults at the model's size
    assert (pre.shortest_edge, pre.crop_height, pre.crop_width) == (224, 224, 224)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, '
        '"image_mean": [0.5, 0.5, 0.5]}'
    )
    pre = read_preprocess(tmp_path, 224)
    assert (pre.shortest_edge, pre.crop_height, pre.mean) == (256, 224, (0.5, 0.5, 0.5))
    (tmp_path / "preprocessor_config.json").write_text('{"resample": 2, "do_center_crop": false}')
    with pytest.raises(ValueError, match="do_center_crop=False.*resample=2"):
        read_preprocess(tmp_path, 224)
