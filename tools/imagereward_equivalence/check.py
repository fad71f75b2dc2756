"""Score make_reference.py's files through ctrl_core.rewards.imagereward and compare with the original's scores.

Run in the project's venv (transformers 5):

    .venv/bin/python tools/imagereward_equivalence/check.py --ref /tmp/ir-full \
        --json bench/results/imagereward_equivalence.json
    .venv/bin/python tools/imagereward_equivalence/check.py --ref tests/fixtures/imagereward_tiny \
        --vision-num-heads 2 --write-safetensors

Paths compared (relative error |ours - original| / |original|, elementwise over images x prompts):
  tensor path: the original's preprocessed pixels (pixels.pt; for 224x224 images without it, the exact formula
               the reference checked) -> ImageRewardModel  vs  the original ``score_gard``
  PIL path:    the PNG as an image in [-1, 1] -> the ``imagereward`` reward (our torch preprocessing, prompts
               bound as indices)  vs  the original ``score(prompt, PIL image)``; reported separately for
               224x224 images (the original skips its resize) and for resized ones (our resize reproduces
               Pillow's bicubic; where the reference has pixels.pt, the pixels themselves are compared too)
  noise floor: the original against itself, score (one image) vs score_gard (a batch of prompts) on the same
               pixels: float rounding that depends on batch shapes, the scale below which differences mean
               nothing
  safetensors: the checkpoint converted by ``convert_to_safetensors`` gives the same scores as the .pt
Exits 1 when a relative error is above --tol, a pixel differs, the token ids differ or safetensors disagrees.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ctrl_core.rewards.imagereward import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    convert_to_safetensors,
    load_imagereward,
    preprocess_images,
)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((ours.double() - ref.double()).abs() / ref.double().abs()).max()) if ref.numel() else 0.0


def abs_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max()) if ref.numel() else 0.0


def read_uint8(path: Path) -> torch.Tensor:
    """PNG -> (3, H, W) uint8, as the original's _convert_image_to_rgb + ToTensor read it."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def formula_pixels(u8: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (u8.float() / 255 - mean) / std


def versions() -> dict:
    out = {"python": platform.python_version()}
    for n in ("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy"):
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="a make_reference.py output folder")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--vision-num-heads", type=int, default=None, help="default: width // 64, as BLIP's ViTs")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed")
    ap.add_argument(
        "--write-safetensors",
        action="store_true",
        help="keep the converted checkpoint as REF/ImageReward.safetensors (else a temp file)",
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ref_dir = Path(args.ref)
    ref = json.loads((ref_dir / "reference.json").read_text())
    prompts, n_p = ref["prompts"], len(ref["prompts"])
    t0 = time.time()
    scorer = load_imagereward(
        ref_dir / "ImageReward.pt",
        ref_dir / "med_config.json",
        ref_dir / "tokenizer",
        device="cpu",
        vision_num_heads=args.vision_num_heads,
    )
    load_s = time.time() - t0

    ids, mask = scorer.tokenize(prompts)
    tokens_equal = ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]

    orig_pixels = (
        torch.load(ref_dir / "pixels.pt", weights_only=True) if (ref_dir / "pixels.pt").exists() else None
    )
    reward = scorer.reward_for_prompts(prompts)
    conditions = torch.arange(n_p)
    tensor_ours, tensor_ref, pil_ours, pil_ref, rs_ours, rs_ref = [], [], [], [], [], []
    pixel_diff_224, pixel_diff_resized = 0.0, 0.0
    t1 = time.time()
    for i, entry in enumerate(ref["images"]):
        u8 = read_uint8(ref_dir / entry["file"])
        square = (entry["width"], entry["height"]) == (224, 224)
        ours_pixels = preprocess_images(u8.float().unsqueeze(0) / 127.5 - 1, scorer.model.image_size)[0]
        if orig_pixels is not None:
            x = orig_pixels[i]
            # in uint8 levels: the normalised difference times std * 255
            levels = float(((ours_pixels - x).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255).max())
            if square:
                pixel_diff_224 = max(pixel_diff_224, levels)
            else:
                pixel_diff_resized = max(pixel_diff_resized, levels)
        elif square and entry.get("preprocess_equals_formula"):
            x = formula_pixels(u8)
        else:
            x = None
        if x is not None:
            tensor_ours.append(scorer.score_pixels(x.unsqueeze(0).expand(n_p, -1, -1, -1), prompts))
            tensor_ref.append(torch.tensor(ref["scores_tensor"][i]))
        images = (u8.float() / 127.5 - 1).unsqueeze(0).expand(n_p, -1, -1, -1)  # the same image, each prompt
        scores = reward(images, conditions)
        (pil_ours if square else rs_ours).append(scores)
        (pil_ref if square else rs_ref).append(torch.tensor(ref["scores_pil"][i]))
    score_s = time.time() - t1
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
    # score() and score_gard() of the reference saw the same pixels (model.preprocess of the same image)
    self_single = cat([torch.tensor(row) for row in ref["scores_pil"]])
    self_batch = cat([torch.tensor(row) for row in ref["scores_tensor"]])
    tensor_ours, tensor_ref, pil_ours, pil_ref, rs_ours, rs_ref = map(
        cat, (tensor_ours, tensor_ref, pil_ours, pil_ref, rs_ours, rs_ref)
    )

    # the safetensors container: same keys and values, so the same scores
    with tempfile.TemporaryDirectory(dir=ref_dir if args.write_safetensors else None) as tmp:
        st_path = (
            ref_dir / "ImageReward.safetensors" if args.write_safetensors else Path(tmp) / "ir.safetensors"
        )
        convert_to_safetensors(ref_dir / "ImageReward.pt", st_path)
        del scorer
        st_scorer = load_imagereward(
            st_path,
            ref_dir / "med_config.json",
            ref_dir / "tokenizer",
            device="cpu",
            vision_num_heads=args.vision_num_heads,
        )
        st_scores = cat(
            [
                st_scorer.reward_for_prompts(prompts)(
                    (read_uint8(ref_dir / e["file"]).float() / 127.5 - 1)
                    .unsqueeze(0)
                    .expand(n_p, -1, -1, -1),
                    conditions,
                )
                for e in ref["images"]
                if (e["width"], e["height"]) == (224, 224)
            ]
        )
        safetensors_equal = bool(torch.equal(st_scores, pil_ours))
        del st_scorer

    n_square = sum((e["width"], e["height"]) == (224, 224) for e in ref["images"])
    vcfg, mcfg = ref["vision"], ref["med_config"]
    summary = {
        "what": "ctrl_core.rewards.imagereward (transformers 5) vs the original ImageReward 1.5 code, same seeded random "
        "weights; relative error = max |ours - original| / |original| over images x prompts",
        "size": ref["size"],
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": {"reference": ref.get("torch_threads"), "check": torch.get_num_threads()},
        "threads_note": "float reductions split by thread count: with the reference's count the tensor path "
        "is bit-identical (relative error 0 at 2 threads on 2 cores); another count moves the last bits",
        "max_rel_err_tensor_path": rel_err(tensor_ours, tensor_ref),
        "max_abs_err_tensor_path": abs_err(tensor_ours, tensor_ref),
        "max_rel_err_pil_path": rel_err(pil_ours, pil_ref),
        "max_abs_err_pil_path": abs_err(pil_ours, pil_ref),
        "pil_path_images": "224x224 (the original skips its resize)",
        "max_rel_err_pil_path_resized": rel_err(rs_ours, rs_ref),
        "max_abs_err_pil_path_resized": abs_err(rs_ours, rs_ref),
        "pil_path_resized_note": "images of other sizes: the original resizes them with Pillow's bicubic, which "
        "ctrl_core.imageprep.pil_bicubic_resize reproduces in torch",
        "max_rel_err_original_self": rel_err(self_single, self_batch),
        "original_self_note": "the original against itself on identical pixels: score() (batch 1) vs "
        "score_gard() (batch of all prompts); batch-shape-dependent float rounding",
        "max_pixel_diff_uint8_levels_224": pixel_diff_224 if orig_pixels is not None else None,
        "max_pixel_diff_uint8_levels_resized": pixel_diff_resized if orig_pixels is not None else None,
        "tokens_equal": tokens_equal,
        "safetensors_scores_equal_pt": safetensors_equal,
        "score_range_original": [
            float(torch.cat([tensor_ref, pil_ref, rs_ref]).min()),
            float(torch.cat([tensor_ref, pil_ref, rs_ref]).max()),
        ],
        "n_images": len(ref["images"]),
        "n_images_224": n_square,
        "n_images_resized": len(ref["images"]) - n_square,
        "image_sizes": [[e["width"], e["height"]] for e in ref["images"]],
        "n_prompts": n_p,
        "n_scores_tensor_path": tensor_ref.numel(),
        "n_scores_pil_path": pil_ref.numel(),
        "n_scores_pil_path_resized": rs_ref.numel(),
        "tolerance": args.tol,
        "config": {
            "vision": f"ViT {vcfg['img_size']}px/{vcfg['patch_size']}, width {vcfg['embed_dim']}, "
            f"{vcfg['depth']} blocks, {vcfg['num_heads']} heads",
            "text": f"med BERT width {mcfg['hidden_size']}, {mcfg['num_hidden_layers']} layers, "
            f"{mcfg['num_attention_heads']} heads, ffn {mcfg['intermediate_size']}, vocab "
            f"{mcfg['vocab_size']}, cross-attention to the image tokens",
            "checkpoint_bytes": (ref_dir / "ImageReward.pt").stat().st_size,
            "seed": ref["seed"],
        },
        "versions_original_env": ref["versions"],
        "versions_project_env": versions(),
        "commands": {
            "side_env": "bash tools/imagereward_equivalence/setup_env.sh /tmp/ir-env",
            "reference": ref["command"],
            "check": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        },
        "seconds": {
            "reference_total": ref.get("seconds"),
            "our_load": round(load_s, 1),
            "our_scoring": round(score_s, 1),
        },
    }
    summary["pass"] = bool(
        summary["max_rel_err_tensor_path"] <= args.tol
        and summary["max_rel_err_pil_path"] <= args.tol
        and summary["max_rel_err_pil_path_resized"] <= args.tol
        and not summary["max_pixel_diff_uint8_levels_224"]
        and not summary["max_pixel_diff_uint8_levels_resized"]
        and tokens_equal
        and safetensors_equal
        and tensor_ref.numel() > 0
        and pil_ref.numel() > 0
    )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
