"""ImageReward on transformers 5 against the ORIGINAL code's scores (tiny seeded model, committed fixture).

tests/fixtures/imagereward_tiny was written by the original image-reward 1.5 code in its own environment
(tools/imagereward_equivalence/make_reference.py --size tiny): the original's ImageReward.pt (plus the same
tensors as safetensors), med_config.json, a bert-base-uncased-shaped vocab.txt, PNG images, prompts, the
original tokenizer's ids and the original's scores. The full-size (ViT-L + BERT-base) comparison is in
bench/results/imagereward_equivalence.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctrl_core.imageprep import pil_bicubic_resize
from ctrl_core.rewards import bind_prompts, make_reward
from ctrl_core.rewards.imagereward import (
    CLIP_MEAN,
    CLIP_STD,
    ImageRewardModel,
    build_configs,
    convert_to_safetensors,
    load_imagereward,
    load_original_state_dict,
    original_key_map,
    preprocess_images,
)

FIXTURE = Path(__file__).parent / "fixtures" / "imagereward_tiny"
REF = json.loads((FIXTURE / "reference.json").read_text())
PROMPTS = REF["prompts"]
TOL = 1e-4  # max relative error against the original
# the tiny ViT has 2 heads of width 8 (the default, width // 64, is BLIP's ViT-B/L rule)
OPTIONS = dict(
    checkpoint=str(FIXTURE / "ImageReward.pt"),
    med_config=str(FIXTURE / "med_config.json"),
    tokenizer_dir=str(FIXTURE / "tokenizer"),
    device="cpu",
    vision_num_heads=2,
)
SQUARE = [i for i, e in enumerate(REF["images"]) if (e["width"], e["height"]) == (224, 224)]
RESIZED = [i for i in range(len(REF["images"])) if i not in SQUARE]


def rel_err(ours: torch.Tensor, ref) -> float:
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float(((ours.double() - ref).abs() / ref.abs()).max())


def uint8_image(i: int) -> torch.Tensor:
    """Fixture image i as (3, H, W) uint8, as the original reads it (PIL, RGB)."""
    arr = np.array(Image.open(FIXTURE / REF["images"][i]["file"]).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def signed_image(i: int) -> torch.Tensor:
    """Fixture image i in [-1, 1], (1, 3, H, W): what a diffusion model hands the reward."""
    return uint8_image(i).float().unsqueeze(0) / 127.5 - 1


@pytest.fixture(scope="module")
def scorer():
    opts = {k: v for k, v in OPTIONS.items() if k != "checkpoint"}
    return load_imagereward(OPTIONS["checkpoint"], **opts)


def test_fixture_is_small_and_loads_without_unpickling_code():
    assert sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file()) < 2_000_000
    state = torch.load(FIXTURE / "ImageReward.pt", weights_only=True, map_location="cpu")
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in state and "mlp.layers.7.weight" in state
    assert REF["versions"]["image-reward"] == "1.5" and REF["versions"]["transformers"] == "4.55.4"


def test_configs_follow_the_original(scorer):
    vision, text = scorer.model.vision.config, scorer.model.text.config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
        224,
        16,
        16,
        2,
    )
    assert (
        vision.layer_norm_eps == 1e-6 and vision.hidden_act == "gelu"
    )  # BLIP ViT: LayerNorm(eps=1e-6), GELU
    assert text.encoder_hidden_size == vision.hidden_size  # BLIP_Pretrain: encoder_width = vision_width
    assert text.layer_norm_eps == REF["med_config"]["layer_norm_eps"]
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())


def test_tokens_match_the_original_tokenizer(scorer):
    ids, mask = scorer.tokenize(PROMPTS)
    assert ids.tolist() == REF["input_ids"] and mask.tolist() == REF["attention_mask"]
    assert len(scorer.tokenizer) == REF["med_config"]["vocab_size"]  # vocab.txt + [DEC] + [ENC]


def test_tensor_path_matches_original_score_gard(scorer):
    """Same preprocessed pixels -> same scores (the original's score_gard on a batch of all prompts)."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for i in SQUARE:
        assert REF["images"][i]["preprocess_equals_formula"]  # the original's pixels are exactly this
        pixels = ((uint8_image(i).float() / 255 - mean) / std).expand(len(PROMPTS), -1, -1, -1)
        assert rel_err(scorer.score_pixels(pixels, PROMPTS), REF["scores_tensor"][i]) <= TOL


@pytest.mark.parametrize("batch_size", [1, 4])
def test_reward_path_matches_original_score(batch_size):
    """The registered reward on [-1, 1] images with prompt indices -> the original score(prompt, PIL image),
    resized images included (the resize reproduces Pillow's)."""
    fn = bind_prompts(make_reward("imagereward", **OPTIONS, batch_size=batch_size), PROMPTS)
    n = len(PROMPTS)
    for i in SQUARE + RESIZED:
        scores = fn(signed_image(i).expand(n, -1, -1, -1), torch.arange(n))
        assert scores.shape == (n,) and scores.dtype == torch.float32
        assert rel_err(scores, REF["scores_pil"][i]) <= TOL, REF["images"][i]


def test_bound_prompts_follow_the_indices(scorer):
    """A mixed batch scores each image against the prompt its index names: equal to one-at-a-time scores."""
    fn = scorer.reward_for_prompts(PROMPTS)
    picks = [(0, 4), (1, 0), (2, 2), (1, 5), (0, 1), (2, 3)]  # (image, prompt index), 224x224 images
    images = torch.cat([signed_image(i) for i, _ in picks])
    batch = fn(images, torch.tensor([p for _, p in picks]))
    single = torch.cat([scorer.score(signed_image(i), [PROMPTS[p]]) for i, p in picks])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    assert rel_err(batch, [REF["scores_pil"][i][p] for i, p in picks]) <= TOL
    assert len(set(batch.tolist())) == len(picks)  # the prompts matter: no two pairs score alike
    with pytest.raises(ValueError, match="out of range"):
        fn(images[:1], torch.tensor([len(PROMPTS)]))
    with pytest.raises(ValueError, match="prompt indices"):
        fn(images[:2], torch.tensor([0]))


def test_unbound_text_reward_raises():
    fn = make_reward("imagereward", **OPTIONS)
    with pytest.raises(ValueError, match="text-to-image model"):
        fn(signed_image(0), torch.tensor([0]))
    with pytest.raises(ValueError, match="prompt list"):
        bind_prompts(fn, [])


def test_safetensors_gives_the_same_scores(scorer, tmp_path):
    committed = load_original_state_dict(FIXTURE / "ImageReward.safetensors")
    original = load_original_state_dict(FIXTURE / "ImageReward.pt")
    converted = load_original_state_dict(
        convert_to_safetensors(FIXTURE / "ImageReward.pt", tmp_path / "ir.safetensors")
    )
    for state in (committed, converted):
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    st = load_imagereward(
        FIXTURE / "ImageReward.safetensors",
        OPTIONS["med_config"],
        OPTIONS["tokenizer_dir"],
        device="cpu",
        vision_num_heads=2,
    )
    images = signed_image(SQUARE[0]).expand(len(PROMPTS), -1, -1, -1)
    assert torch.equal(st.score(images, PROMPTS), scorer.score(images, PROMPTS))


def test_key_map_names_every_tensor_once():
    state = load_original_state_dict(FIXTURE / "ImageReward.pt")
    vision, text = build_configs(state, REF["med_config"], vision_num_heads=2)
    key_map = original_key_map(vision.num_hidden_layers, text.num_hidden_layers)
    model_keys = set(ImageRewardModel(vision, text).state_dict())
    assert len(set(key_map.values())) == len(key_map) and set(key_map.values()) == model_keys
    unused = set(state) - set(key_map)
    assert unused == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    assert (
        key_map["blip.visual_encoder.blocks.1.attn.proj.weight"]
        == "vision.encoder.layers.1.self_attn.projection.weight"
    )
    assert key_map["mlp.layers.7.bias"] == "mlp.7.bias"


def test_corrupted_state_dict_is_rejected_by_name(tmp_path):
    state = load_original_state_dict(FIXTURE / "ImageReward.pt")
    opts = {k: v for k, v in OPTIONS.items() if k != "checkpoint"}

    missing = dict(state)
    del missing["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(
        ValueError, match=r"missing keys \[blip\.text_encoder\.encoder\.layer\.1\.crossattention"
    ):
        load_imagereward(tmp_path / "missing.pt", **opts)

    extra = dict(state, **{"blip.visual_encoder.head.weight": torch.zeros(2, 16)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \[blip\.visual_encoder\.head\.weight\]"):
        load_imagereward(tmp_path / "extra.pt", **opts)

    reshaped = dict(state, **{"mlp.layers.0.weight": torch.zeros(1024, 8)})
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"mlp\.0\.weight"):
        load_imagereward(tmp_path / "reshaped.pt", **opts)

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: never unpickled
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_imagereward(tmp_path / "module.pt", **opts)

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):  # the factory fails at once
        make_reward("imagereward", **dict(OPTIONS, checkpoint=str(tmp_path / "nope.pt")))


def test_vocabulary_size_is_checked(tmp_path):
    short = tmp_path / "tokenizer"
    short.mkdir()
    lines = (FIXTURE / "tokenizer" / "vocab.txt").read_text().splitlines()
    (short / "vocab.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer .* has \d+ tokens .* embeddings have \d+ rows"):
        make_reward("imagereward", **dict(OPTIONS, tokenizer_dir=str(short)))
    shutil.rmtree(short)
    short.mkdir()
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        make_reward("imagereward", **dict(OPTIONS, tokenizer_dir=str(short)))


def test_pillow_resize_is_bit_exact():
    """The resize the original gets from torchvision on a PIL image is Pillow's bicubic: reproduced exactly,
    upscaling and downscaling (antialiased), on noise (the hardest case for rounding)."""
    rng = np.random.RandomState(0)
    for (w, h), (new_w, new_h) in [((40, 30), (77, 58)), ((97, 64), (31, 20)), ((23, 50), (23, 90))]:
        arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
        pil = np.asarray(Image.fromarray(arr).resize((new_w, new_h), Image.BICUBIC))
        ours = pil_bicubic_resize(torch.from_numpy(arr).permute(2, 0, 1).float()[None], (new_h, new_w))
        assert np.array_equal(ours[0].permute(1, 2, 0).numpy(), pil.astype(np.float32))


def test_preprocess_resizes_short_side_and_centre_crops():
    x = torch.rand(2, 3, 100, 50) * 2 - 1  # portrait: short side (width) -> 224, height int(224 * 2) = 448
    out = preprocess_images(x, 224)
    assert out.shape == (2, 3, 224, 224)
    gray = preprocess_images(x[:, :1], 224)  # one channel -> RGB, as the original's convert("RGB")
    unnormalised = [gray[:, c] * CLIP_STD[c] + CLIP_MEAN[c] for c in range(3)]
    torch.testing.assert_close(unnormalised[0], unnormalised[2])
    torch.testing.assert_close(unnormalised[1], unnormalised[2])
    with pytest.raises(ValueError, match="expected images"):
        preprocess_images(torch.zeros(1, 4, 8, 8))
