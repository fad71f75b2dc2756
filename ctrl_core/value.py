"""The value network of eq. 19 and its pretraining on Monte-Carlo returns.

    V(t, x, c) = c_skip(t) * RM(x_hat_theta(t, x, c), c) + c_out(t) * F_phi(t, x, c)        (eq. 19)

x_hat_theta is Tweedie's denoised prediction; the link functions (c_skip, c_out) satisfy c_skip(T) = 1 and
c_out(T) = 0, so V(T, x) = RM(x) exactly (eq. 18). Link functions here take the forward time s = (T - t)/T in
[0, 1] (s = 0 is the data end), so the boundary condition reads c_skip(0) = 1, c_out(0) = 0.

The paper picks cos/sin by validation MSE (Fig. 2b); ``pretrain_value`` does that selection for any set of
candidates from ``LINKS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import sinusoidal_time_features

LinkFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def link_cos_sin(s: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's choice: c_skip = cos(pi s / 2), c_out = sin(pi s / 2)."""
    return torch.cos(0.5 * math.pi * s), torch.sin(0.5 * math.pi * s)


def link_linear(s: Tensor) -> tuple[Tensor, Tensor]:
    return 1.0 - s, s


def link_rm_only(s: Tensor) -> tuple[Tensor, Tensor]:
    """'RM(x_hat) only': the reward mean predictor alone, no learned residual."""
    return torch.ones_like(s), torch.zeros_like(s)


def link_f_only(s: Tensor) -> tuple[Tensor, Tensor]:
    """'F_phi only': a plain learned critic; the boundary V(T, x) = RM(x) is imposed at s = 0 exactly."""
    at_end = (s <= 0).to(s.dtype)
    return at_end, 1.0 - at_end


LINKS: dict[str, LinkFn] = {
    "cos_sin": link_cos_sin,
    "linear": link_linear,
    "rm_only": link_rm_only,
    "f_only": link_f_only,
}


def get_link(name: str) -> LinkFn:
    if name not in LINKS:
        raise ValueError(f"unknown link function {name!r}: choose one of {sorted(LINKS)}")
    return LINKS[name]


# --- residual networks F_phi(t, x, c) -------------------------------------------------------------------
class MLPResidual(nn.Module):
    """F_phi for vector data: an MLP of (time features, x)."""

    def __init__(self, dim: int, hidden: int = 128, time_features: int = 16):
        super().__init__()
        self.time_features = time_features
        self.net = nn.Sequential(
            nn.Linear(dim + time_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = torch.cat([x.flatten(1).float(), sinusoidal_time_features(s, self.time_features)], dim=1)
        return self.net(h).squeeze(1)


class ConvResidual(nn.Module):
    """F_phi for images: a small CNN over (x, x_hat) with time and class embeddings."""

    def __init__(self, channels: int = 1, width: int = 32, num_classes: int = 0, time_features: int = 16):
        super().__init__()
        self.time_features = time_features
        self.conv = nn.Sequential(
            nn.Conv2d(2 * channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.cls = nn.Embedding(num_classes, 2 * width) if num_classes else None
        self.head = nn.Sequential(nn.Linear(2 * width + time_features, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, s: Tensor, x: Tensor, c: Tensor | None = None, x_hat: Tensor | None = None) -> Tensor:
        h = self.conv(torch.cat([x, x if x_hat is None else x_hat], dim=1).float())
        if self.cls is not None and c is not None:
            h = h + self.cls(c)
        return self.head(torch.cat([h, sinusoidal_time_features(s, self.time_features)], dim=1)).squeeze(1)


def freeze_leading(module: nn.Module, fraction: float) -> list[str]:
    """Freeze the leading ``fraction`` of ``module``'s weights (by element count, in registration order: the
    embeddings and first blocks of a transformer) and leave the rest trainable; returns the trainable names.
    The authors froze the first 70% of the BLIP copy's layers in their SD1.5 value net."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"frozen fraction must be in [0, 1), got {fraction}")
    named = list(module.named_parameters())
    total = sum(p.numel() for _, p in named)
    seen, trainable = 0, []
    for name, p in named:
        seen += p.numel()
        frozen = seen <= fraction * total
        p.requires_grad_(not frozen)
        if not frozen:
            trainable.append(name)
    return trainable


class RewardCopyResidual(nn.Module):
    """F_phi as the paper builds it at scale: a *copy* of the reward model, its leading ``frozen_fraction`` of
    weights frozen and the rest trained, scoring the decoded state decode(x_t) (the authors' SD1.5 value net:
    cos * ImageReward(decode(x_hat)) + sin * ImageReward_copy(decode(x_t)), 70% of the copy frozen).

    ``copy(images, conditions) -> (B,)`` must be differentiable in its trainable weights (the reward models of
    this package build one with ``reward_fn.trainable_copy(prompts, frozen_fraction)``); ``decode`` maps states
    to images without gradients (a latent model's VAE; None for pixel-space models). The state dict holds only
    the trainable weights: the frozen ones are the reward model's own and are not saved again."""

    def __init__(self, copy: nn.Module, decode: Callable | None = None):
        super().__init__()
        self.copy = copy
        self.decode = decode
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        if not self._trainable:
            raise ValueError("the reward copy has no trainable weights (frozen fraction too high?)")

    def forward(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            images = x if self.decode is None else self.decode(x)
        return self.copy(images, c).float().to(x.device)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        # (inside a parent's state_dict, ``full`` is the parent's dict: only this module's own keys are filtered)
        for k in [k for k in full if k.startswith(prefix) and k[len(prefix) :] not in self._trainable]:
            del full[k]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keys = set(state_dict)
        if strict and keys != self._trainable:
            missing, unexpected = sorted(self._trainable - keys), sorted(keys - self._trainable)
            raise ValueError(
                f"reward-copy value weights do not match: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} (another reward model or frozen fraction?)"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)


class ValueFunction(nn.Module):
    """eq. 19 with a named link function. ``reward_fn(x, c) -> (B,)`` need not be differentiable."""

    def __init__(self, reward_fn: Callable, residual: nn.Module, link: str = "cos_sin"):
        super().__init__()
        self.reward_fn = reward_fn
        self.residual = residual
        self.link_name = link
        self.link = get_link(link)

    def forward(
        self, s: Tensor, x: Tensor, c: Tensor | None, x_hat: Tensor, rm_x_hat: Tensor | None = None
    ) -> Tensor:
        """V at forward times s (B,), states x, conditions c and Tweedie predictions x_hat.

        ``rm_x_hat`` lets a caller pass RM(x_hat) it already computed (the reward model is frozen).
        """
        c_skip, c_out = self.link(s.to(torch.float32))
        out = torch.zeros(x.shape[0], dtype=torch.float32)
        if self.uses_reward(s):
            rm = rm_x_hat if rm_x_hat is not None else self.reward_fn(x_hat, c).float()
            out = out + c_skip * rm
        if torch.any(c_out != 0):
            f = self._residual(s, x, c, x_hat)
            out = out + c_out * f
        return out

    def uses_reward(self, s: Tensor) -> bool:
        """Whether V at times s reads RM(x_hat) (c_skip != 0 somewhere; the f_only link never does)."""
        return bool(torch.any(self.link(s.to(torch.float32))[0] != 0))

    def _residual(self, s, x, c, x_hat):
        """F_phi where its weights are (a GPU for a latent model's CNN); the engine's tensors stay on the host."""
        p = next(self.residual.parameters(), None)
        dev = x.device if p is None or isinstance(self.residual, RewardCopyResidual) else p.device
        if dev != x.device:
            s, c, x_hat = s.to(dev), None if c is None else c.to(dev), x_hat.to(dev)
        if isinstance(self.residual, ConvResidual):
            out = self.residual(s, x.to(dev), c, x_hat=x_hat)
        else:
            out = self.residual(s, x.to(dev), c)
        return out.to(x.device)


# --- Monte-Carlo value pretraining ------------------------------------------------------------------------
@dataclass
class ValueDataset:
    """(s, x, c, x_hat, RM(x_hat), G) tuples from sampled trajectories; G is the return-to-go."""

    s: Tensor
    x: Tensor
    c: Tensor | None
    x_hat: Tensor
    rm_x_hat: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return self.s.numel()

    def split(self, val_fraction: float, generator: torch.Generator) -> tuple[ValueDataset, ValueDataset]:
        perm = torch.randperm(len(self), generator=generator)
        n_val = max(1, int(len(self) * val_fraction))
        return self.subset(perm[n_val:]), self.subset(perm[:n_val])

    def subset(self, idx: Tensor) -> ValueDataset:
        return ValueDataset(
            self.s[idx],
            self.x[idx],
            None if self.c is None else self.c[idx],
            self.x_hat[idx],
            self.rm_x_hat[idx],
            self.returns[idx],
        )

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def concat(parts: list[ValueDataset]) -> ValueDataset:
        cs = [p.c for p in parts]
        return ValueDataset(
            torch.cat([p.s for p in parts]),
            torch.cat([p.x for p in parts]),
            None if any(c is None for c in cs) else torch.cat(cs),
            torch.cat([p.x_hat for p in parts]),
            torch.cat([p.rm_x_hat for p in parts]),
            torch.cat([p.returns for p in parts]),
        )


def value_loss(value: ValueFunction, data: ValueDataset) -> Tensor:
    pred = value(data.s, data.x, data.c, data.x_hat, rm_x_hat=data.rm_x_hat)
    return (pred - data.returns.float()).pow(2).mean()


def fit_value(
    value: ValueFunction,
    train: ValueDataset,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    dist=None,
) -> float:
    """Minimise the MSE to Monte-Carlo returns; returns the last epoch's mean training loss.

    With ``dist`` (a ``distributed.Dist`` over W processes that all hold the same ``train``), each rank takes
    its contiguous share of every minibatch and the gradients are summed over ranks: the same steps as one
    process on the whole minibatch."""
    params = [p for p in value.residual.parameters() if p.requires_grad]
    if not params or torch.all(value.link(train.s.float())[1] == 0):
        return float(value_loss(value, train).detach())  # nothing to fit (e.g. 'rm_only')
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=generator)
        total, n = 0.0, 0
        for j in range(0, len(train), batch_size):
            idx = perm[j : j + batch_size]
            mine = idx.tensor_split(world)[rank]
            opt.zero_grad(set_to_none=True)
            if len(mine):
                b = train.subset(mine)
                pred = value(b.s, b.x, b.c, b.x_hat, rm_x_hat=b.rm_x_hat)
                loss = (pred - b.returns.float()).pow(2).sum() / len(idx)
                loss.backward()
                part = float(loss.detach())
            else:
                part = 0.0
            if dist is not None:
                dist.sync_grads(params)
                part = dist.sum(part)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total += part * len(idx)
            n += len(idx)
        last = total / max(n, 1)
    return last


@dataclass
class LinkSelection:
    chosen: str
    val_mse: dict[str, float]
    value: ValueFunction  # the fitted value net of the chosen link (the others are not kept)


def select_link(
    make_value: Callable[[str], ValueFunction],
    data: ValueDataset,
    candidates: list[str],
    epochs: int,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    done: dict[str, tuple[dict, float]] | None = None,
    on_fitted: Callable[[str, ValueFunction, float], None] | None = None,
    dist=None,
) -> LinkSelection:
    """Train one value net per candidate link on the same split; choose the lowest held-out MSE (Fig. 2b).

    ``done`` maps candidates fitted by an earlier (interrupted) run to (residual state, held-out MSE); they are
    restored, not refitted. Every candidate is seeded on its own, so the result does not depend on which ones
    were restored. ``on_fitted`` is called after each fresh fit (the pipeline checkpoints there). Only the best
    value net so far is kept while the next one fits: with ``value.residual=reward_copy`` each candidate holds a
    copy of the reward model, two at a time instead of one per candidate."""
    for name in candidates:
        get_link(name)
    if not candidates:
        raise ValueError("value.candidates must name at least one link function")
    gen = torch.Generator().manual_seed(seed)
    train, val = data.split(val_fraction, gen)
    mses: dict[str, float] = {}
    best: tuple[str, ValueFunction] | None = None
    done = done or {}
    for name in candidates:
        torch.manual_seed(seed)
        v = make_value(name)
        if name in done:
            v.residual.load_state_dict(done[name][0])
            mses[name] = float(done[name][1])
        else:
            fit_value(v, train, epochs, lr=lr, generator=torch.Generator().manual_seed(seed), dist=dist)
            with torch.no_grad():
                mses[name] = float(value_loss(v, val))
            if not math.isfinite(mses[name]):
                raise FloatingPointError(f"value pretraining: non-finite held-out loss for the {name!r} link")
            if on_fitted is not None:
                on_fitted(name, v, mses[name])
        if best is None or mses[name] < mses[best[0]]:  # ties keep the earlier candidate, as min() does
            best = (name, v)
        del v
    return LinkSelection(best[0], mses, best[1])
