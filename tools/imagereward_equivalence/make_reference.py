"""Reference scores from the ORIGINAL ImageReward 1.5 code, with seeded random weights (run in the side env).

    /tmp/ir-env/bin/python tools/imagereward_equivalence/make_reference.py --size full --out /tmp/ir-full
    /tmp/ir-env/bin/python tools/imagereward_equivalence/make_reference.py --size tiny \
        --out tests/fixtures/imagereward_tiny

Writes to OUT:
  ImageReward.pt      the original model's state dict, exactly as the original ``ImageReward.pt`` (torch.save of
                      ``ImageReward.state_dict()``), every parameter re-drawn from a seeded generator
  med_config.json     the BERT config the original reads (BLIP's med_config; tiny: a small one)
  tokenizer/vocab.txt a bert-base-uncased-shaped vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
                      [MASK]=103; 30522 entries at full size), since the real one can't be fetched here
  images/*.png        uint8 RGB test images (224x224 ones, and other sizes that the original resizes)
  pixels.pt           (full only) the original preprocess output for each image, (N, 3, 224, 224) float32
  reference.json      prompts, the original tokenizer's ids, and the original scores:
                      scores_pil[i][j]    = ImageReward.score(prompts[j], PIL image i)       (the user API)
                      scores_tensor[i][j] = ImageReward.score_gard(ids_j, mask_j, pixels[i]) (the model alone)

The model is loaded back through the original ``ImageReward.utils.load(path, med_config=...)`` before scoring,
so the reference is what the original package computes from that file. ``--size tiny`` builds the same
classes with small widths: the original VisionTransformer (224 px, 16 px patches, width 16, 2 blocks, 2 heads)
in place of ViT-L (``create_vit`` is patched, as ``vit='large'`` is hard-coded), a 2-layer med BERT of width
16, and the original MLP class on that width (``MLP(768)`` is hard-coded).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import platform
import string
import sys
import time
from pathlib import Path

import numpy as np
import original_env  # its shims, before anything imports torchvision or ImageReward
import torch
from PIL import Image

SEED = 20240601
PROMPTS = [
    "a photo of a cat sitting on a red sofa",
    "A beautiful LANDSCAPE painting, with mountains & a lake at sunset!",
    "portrait of an old man, highly detailed, 4k, trending on artstation",
    "café crème brûlée on a wooden table",
    # longer than 35 tokens: exercises truncation
    "an astronaut riding a horse on the moon, digital art, sharp focus, octane render, intricate, elegant, "
    "volumetric lighting, cinematic, masterpiece, by greg rutkowski and alphonse mucha",
    "",
]
# words of the synthetic vocabulary (the prompts' words, minus a few that must split into ## pieces)
WORDS = """a an the of on in at with and by to is photo cat dog sitting red blue green sofa beautiful landscape
painting mountains mountain lake sunset portrait old man woman highly detailed trending art astronaut riding
horse moon digital sharp focus render elegant lighting cinematic masterpiece wooden table cream high detail
light sharp focus city street night day sky tree forest river house car girl boy face eyes hair dress flower
flowers garden sea beach snow rain sun star stars space robot dragon castle king queen knight cute small big
large tiny style oil watercolor sketch anime realistic photograph camera lens studio black white gold silver
dark bright warm cold soft hard glass stone metal wood fire water ice cloud clouds""".split()
SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly", "##tion", "##est", "##ness", "##al", "##ic", "##ful"]

FULL_MED_CONFIG = {  # BLIP's configs/med_config.json, which THUDM/ImageReward ships as med_config.json
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
TINY = {
    "vision_width": 16,
    "vision_depth": 2,
    "vision_heads": 2,
    "text_width": 16,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate": 32,
    "max_positions": 40,
}


_BLOCKED = (
    "fuck",
    "shit",
    "cunt",
    "cum",
    "dick",
    "cock",
    "piss",
    "tit",
    "fag",
    "ass",
    "nig",
    "sex",
    "porn",
    "rape",
    "slut",
    "whore",
    "damn",
    "hell",
    "crap",
    "bitch",
    "kill",
    "nazi",
    "homo",
    "anal",
    "semen",
    "tard",
)


def make_vocab(size: int | None) -> list[str]:
    """bert-base-uncased's layout: [PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK] at 0-103 (then, at full
    size, [unused99-993] to 998 as there), single characters, ## characters, words, ## suffixes; at full size
    pseudo-syllable words and ## pieces fill up to ``size``. No duplicates (a duplicate line would make the
    tokenizer's length disagree with the embedding rows)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if size is not None:
        vocab += [f"[unused{i}]" for i in range(99, 994)]
    chars = string.punctuation + string.digits + string.ascii_lowercase
    vocab += list(chars) + ["##" + c for c in string.digits + string.ascii_lowercase]
    seen = set(vocab)
    for w in WORDS + SUFFIXES:
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    if size is None:
        return vocab
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "br",
        "ch",
        "cl",
        "dr",
        "fl",
        "gr",
        "pl",
        "pr",
        "sh",
        "st",
        "str",
        "th",
        "tr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo"]
    codas = ["", "n", "r", "s", "l", "m", "nd", "ng", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    n = len(syllables)
    one = (p for s in syllables for p in (s, "##" + s))  # one syllable, as a word and as a ## piece
    two = (syllables[i] + syllables[(i + j + 1) % n] for j in range(n) for i in range(n))
    for piece in itertools.chain(one, two):
        if len(vocab) == size:
            return vocab
        if piece not in seen and not any(b in piece for b in _BLOCKED):
            vocab.append(piece)
            seen.add(piece)
    raise AssertionError(f"could not fill a vocabulary of {size}")


def make_images(size: str, out: Path) -> list[dict]:
    """Seeded smooth colour fields (low-res noise upsampled), some with pixel noise on top."""
    rng = np.random.RandomState(SEED)
    if size == "full":
        specs = [
            (224, 224, 20),
            (224, 224, 0),
            (224, 224, 40),
            (256, 256, 20),
            (320, 240, 20),
            (240, 360, 0),
            (512, 384, 30),
            (96, 128, 10),
        ]
    else:  # smooth fields keep the committed PNGs small
        specs = [(224, 224, 0), (224, 224, 0), (224, 224, 3), (96, 72, 0)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (w, h, noise) in enumerate(specs):
        low = Image.fromarray(rng.randint(0, 256, size=(5, 5, 3), dtype=np.uint8))
        arr = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.float64)
        if noise:
            arr = arr + rng.normal(0.0, noise, size=arr.shape)
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        name = f"images/img{k}_{w}x{h}.png"
        Image.fromarray(arr, "RGB").save(out / name, optimize=True)
        entries.append({"file": name, "width": w, "height": h})
    return entries


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int, qk_gain: float = 3.0) -> None:
    """Every parameter re-drawn from one seeded generator, none at a trivial value: Linear/Conv weights
    N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm gains N(1, 0.1^2), embeddings / cls token / position
    embeddings N(0, 0.5^2). Query and key weights are then scaled by ``qk_gain`` (attention logits x gain^2),
    so attention is peaked rather than a near-uniform average: scores then depend on the prompt and the image,
    and a wrong query/key/head mapping changes them by a lot, not by a rounding error."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.1, generator=g)
        elif p.dim() == 1:
            p.normal_(1.0, 0.1, generator=g)
        elif name.endswith(("cls_token", "pos_embed")) or ".embeddings." in name:
            p.normal_(0.0, 0.5, generator=g)
        else:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        if name.endswith("attn.qkv.weight"):  # ViT: fused rows q, k, v
            p[: 2 * (p.shape[0] // 3)] *= qk_gain
        elif name.endswith(("self.query.weight", "self.key.weight")):  # BERT self- and cross-attention
            p *= qk_gain


def patch_tiny_architecture(text_width: int) -> dict:
    """Make the original ImageReward class build tiny towers (its constructor hard-codes ViT-L and MLP(768))."""
    import ImageReward.ImageReward as ir_module
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        ve = VisionTransformer(
            img_size=image_size,
            patch_size=16,
            embed_dim=TINY["vision_width"],
            depth=TINY["vision_depth"],
            num_heads=TINY["vision_heads"],
        )
        return ve, TINY["vision_width"]

    original_mlp = ir_module.MLP
    blip_pretrain.create_vit = create_vit
    ir_module.MLP = lambda input_size: original_mlp(text_width)
    return {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": TINY["vision_width"],
        "depth": TINY["vision_depth"],
        "num_heads": TINY["vision_heads"],
    }


def versions() -> dict:
    names = [
        "torch",
        "transformers",
        "timm",
        "fairscale",
        "torchvision",
        "clip-anytorch",
        "huggingface-hub",
        "image-reward",
        "pillow",
        "numpy",
        "tokenizers",
    ]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["full", "tiny"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    torch.manual_seed(args.seed)  # the original constructors draw their own init before reinit_
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    vocab = make_vocab(30522 if args.size == "full" else None)
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    original_env.redirect_bert_tokenizer(str(out / "tokenizer"))

    if args.size == "full":
        med_config = dict(FULL_MED_CONFIG)
        vision = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    else:
        med_config = dict(
            FULL_MED_CONFIG,
            hidden_size=TINY["text_width"],
            num_hidden_layers=TINY["text_layers"],
            num_attention_heads=TINY["text_heads"],
            intermediate_size=TINY["text_intermediate"],
            max_position_embeddings=TINY["max_positions"],
            vocab_size=len(vocab) + 2,
            encoder_width=TINY["vision_width"],
        )
        vision = patch_tiny_architecture(TINY["text_width"])
    med_path = out / "med_config.json"
    med_path.write_text(json.dumps(med_config, indent=2) + "\n")

    from ImageReward.ImageReward import ImageReward
    from ImageReward.utils import load

    model = ImageReward(device="cpu", med_config=str(med_path))
    reinit_(model, args.seed)
    state = model.state_dict()
    torch.save(state, out / "ImageReward.pt")
    del model
    print(f"built and saved the original model in {time.time() - t0:.0f}s", flush=True)

    model = load(str(out / "ImageReward.pt"), device="cpu", med_config=str(med_path))  # the original loader
    reloaded = model.state_dict()
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state)
    del state, reloaded
    tok = model.blip.tokenizer
    assert len(tok) == med_config["vocab_size"], (len(tok), med_config["vocab_size"])
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")

    images = make_images(args.size, out)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    scores_pil, scores_tensor, pixels = [], [], []
    with torch.no_grad():
        for entry in images:
            pil = Image.open(out / entry["file"])
            x = model.preprocess(pil)  # the original Resize(224, bicubic) + CenterCrop + ToTensor + Normalize
            pixels.append(x)
            if (entry["width"], entry["height"]) == (224, 224):
                # the resize is skipped at 224: the tensor is ToTensor + Normalize, i.e. this formula, bit for bit
                u8 = torch.from_numpy(np.asarray(pil.convert("RGB"))).permute(2, 0, 1)
                entry["preprocess_equals_formula"] = bool(torch.equal(x, (u8.float() / 255 - mean) / std))
            scores_pil.append([model.score(p, pil) for p in PROMPTS])
            batch = x.unsqueeze(0).expand(len(PROMPTS), -1, -1, -1)
            scores_tensor.append(
                model.score_gard(text.input_ids, text.attention_mask, batch).squeeze(1).tolist()
            )
            print(f"{entry['file']}: {scores_pil[-1]}", flush=True)
    if args.size == "full":
        torch.save(torch.stack(pixels), out / "pixels.pt")

    reference = {
        "what": "ImageReward 1.5 (original code) scores with seeded random weights; see make_reference.py",
        "size": args.size,
        "seed": args.seed,
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "vision": vision,
        "med_config": med_config,
        "vocab_size": len(vocab),
        "tokenizer_len": len(tok),
        "prompts": PROMPTS,
        "input_ids": text.input_ids.tolist(),
        "attention_mask": text.attention_mask.tolist(),
        "images": images,
        "pixels_formula": "224x224 images: (uint8 / 255 - CLIP mean) / CLIP std, float32 (see preprocess_equals_formula)",
        "scores_pil": scores_pil,
        "scores_tensor": scores_tensor,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
