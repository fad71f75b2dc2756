"""The embedded default: a class-conditional pixel DDPM on scikit-learn's digits, and a digit classifier.

Everything here runs offline on 2 CPU cores. The data set ships inside scikit-learn (1,797 images of 8x8,
used at their native resolution: on 2 CPU cores a 16x16 UNet costs 3.5x more per step); the class label 0..9 is the condition c. The trained weights ship in
``ctrl_core/weights/`` as safetensors with a JSON config; rebuild them with

    python -m ctrl_core.embedded --steps 3000 --classifier-epochs 30

which is the project's own recipe (epsilon-prediction DDPM, cosine schedule, AdamW, EMA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import atomic_save_weights, atomic_write_json, load_weights

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SIZE = 8
NUM_CLASSES = 10

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    num_class_embeds=NUM_CLASSES,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
)


def digits_dataset(split: str = "all", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Digits as (N, 1, 8, 8) floats in [-1, 1] and (N,) labels. ``split``: all | train | val (90/10)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 10
    idx = perm[:n_val] if split == "val" else perm[n_val:]
    if split not in ("train", "val"):
        raise ValueError(f"split must be all, train or val, got {split!r}")
    return x[idx], y[idx]


def build_unet(config: dict | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET_CONFIG))


def build_scheduler(config: dict | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or SCHEDULER_CONFIG))


class DigitClassifier(nn.Module):
    """A small CNN on 8x8 digits; its log-probability of the conditioning class is a reward."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.SiLU(), nn.Linear(128, NUM_CLASSES),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# --- training recipes ---------------------------------------------------------------------------------
def train_digits_ddpm(
    steps: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, log_every: int = 200
):
    """epsilon-prediction DDPM training; returns the EMA UNet."""
    torch.manual_seed(seed)
    x_all, y_all = digits_dataset("all")
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    sched = build_scheduler()
    ac = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)

    def lr_at(i: int) -> float:
        return (
            lr
            * min(1.0, (i + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(i / steps * 3.14159)).item()))
        )

    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(0, len(y_all), (batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        if torch.rand((), generator=gen) < 0.5:  # small augmentation: random 1-pixel shifts
            x0 = torch.roll(
                x0,
                shifts=(
                    int(torch.randint(-1, 2, (), generator=gen)),
                    int(torch.randint(-1, 2, (), generator=gen)),
                ),
                dims=(2, 3),
            )
        t = torch.randint(0, len(ac), (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].sqrt()[:, None, None, None]
        xt = a * x0 + (1 - a * a).sqrt() * eps
        pred = unet(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"ddpm step {i:5d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return ema.eval()


def train_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 128) -> tuple[DigitClassifier, float]:
    """Train the digit classifier on the train split; returns it and its validation accuracy."""
    torch.manual_seed(seed)
    xtr, ytr = digits_dataset("train", seed)
    xva, yva = digits_dataset("val", seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for j in range(0, len(ytr), batch_size):
            b = perm[j : j + batch_size]
            xb = xtr[b] + 0.1 * torch.randn(xtr[b].shape, generator=gen)  # noise makes it robust to samples
            loss = F.cross_entropy(clf(xb), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(xva).argmax(1) == yva).float().mean().item()
    return clf, acc


# --- shipped weights ----------------------------------------------------------------------------------
def save_builtin(
    unet, clf: DigitClassifier | None, directory: Path = WEIGHTS_DIR, info: dict | None = None
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_weights(unet.state_dict(), directory / "digits_unet.safetensors")
    atomic_write_json(
        {"unet": UNET_CONFIG, "scheduler": SCHEDULER_CONFIG, **(info or {})}, directory / "digits_config.json"
    )
    if clf is not None:
        atomic_save_weights(clf.state_dict(), directory / "digits_classifier.safetensors")


def load_builtin_unet(directory: Path = WEIGHTS_DIR):
    """The shipped digits UNet (frozen, eval mode) and its diffusers scheduler."""
    cfg = json.loads((Path(directory) / "digits_config.json").read_text())
    unet = build_unet({k: tuple(v) if isinstance(v, list) else v for k, v in cfg["unet"].items()})
    unet.load_state_dict(load_weights(Path(directory) / "digits_unet.safetensors"))
    return unet.eval(), build_scheduler(cfg["scheduler"])


def load_builtin_classifier(directory: Path = WEIGHTS_DIR) -> DigitClassifier:
    clf = DigitClassifier()
    clf.load_state_dict(load_weights(Path(directory) / "digits_classifier.safetensors"))
    return clf.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild the embedded default's shipped weights.")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--classifier-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    clf, acc = train_classifier(args.classifier_epochs, args.seed)
    print(f"classifier val accuracy {acc:.3f} ({time.time() - t0:.0f}s)")
    unet = train_digits_ddpm(args.steps, seed=args.seed)
    info = {
        "recipe": {"steps": args.steps, "seed": args.seed, "classifier_epochs": args.classifier_epochs},
        "classifier_val_accuracy": acc,
        "train_seconds": round(time.time() - t0, 1),
    }
    save_builtin(unet, clf, args.out, info)
    print(f"saved to {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
