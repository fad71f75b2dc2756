"""Score models behind one interface: mu(s, x, c) and a switch to the frozen pretrained score.

The policy (policy.py) only needs three things from a model:
- ``score(s, x, c)``: the current (adapted) score mu_theta at forward time s (eq. 12's mean),
- ``pretrained()``: a context manager inside which ``score`` returns mu_pre (adapter off, same weights),
- ``trainable_parameters()``: what the optimiser updates (LoRA weights, or a small correction net).

Two implementations:
- ``DiffusersScoreModel``: a diffusers UNet (UNet2DModel with class labels, or UNet2DConditionModel with
  encoder hidden states) wrapped by peft LoRA; the adapter is disabled for mu_pre, so there is one copy of
  the base weights.
- ``GaussianScoreModel``: the exact score of Gaussian data plus a small learned correction, for the closed-
  form tests (Theorem 3.1, tilted Gaussian). The correction is off for mu_pre.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .schedule import VPSchedule, broadcast_to, score_from_model_output


class ScoreModel(nn.Module):
    schedule: VPSchedule

    def score(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pretrained(self) -> contextlib.AbstractContextManager:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_changed(self) -> None:
        """Called by whoever writes the trainable weights (the trainer's optimiser steps, loads and restores):
        a model holding something derived from them (a merged sampling copy) drops it. Nothing here."""


def sinusoidal_time_features(s: Tensor, dim: int = 16) -> Tensor:
    """(B,) times in [0, 1] -> (B, dim) Fourier features, shared by the small MLPs of this package."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(16.0), half, device=s.device, dtype=torch.float32))
    ang = s.float()[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


# --- closed-form Gaussian data -----------------------------------------------------------------------
class AffineCorrection(nn.Module):
    """u(s, x) = a(s) + b(s) * x per dimension, with a, b from an MLP of time. Starts at exactly zero.

    For Gaussian data and a quadratic reward the optimal control's correction to the pretrained score
    (the gradient of log Doob's h-function) is affine in x, so this class can represent the optimum.
    """

    def __init__(self, dim: int, hidden: int = 64, time_features: int = 16):
        super().__init__()
        self.dim, self.time_features = dim, time_features
        self.net = nn.Sequential(
            nn.Linear(time_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        ab = self.net(sinusoidal_time_features(s, self.time_features)).to(x.dtype)
        a, b = ab[:, : self.dim], ab[:, self.dim :]
        return a + b * x


class GaussianScoreModel(ScoreModel):
    """Data ~ N(m0, diag(s0^2)): the marginal at s is N(alpha m0, alpha^2 s0^2 + sigma^2), so the exact score is
    -(x - alpha m0) / (alpha^2 s0^2 + sigma^2). mu_theta = exact score + correction(s, x)."""

    def __init__(self, schedule: VPSchedule, mean: Tensor, std: Tensor, correction: nn.Module | None = None):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("data_mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("data_std", torch.as_tensor(std, dtype=torch.float32).flatten())
        if self.data_mean.shape != self.data_std.shape:
            raise ValueError(
                f"mean and std shapes differ: {tuple(self.data_mean.shape)} vs {tuple(self.data_std.shape)}"
            )
        if torch.any(self.data_std <= 0):
            raise ValueError("data std must be > 0 in every dimension")
        self.correction = correction
        self._use_correction = True

    @property
    def dim(self) -> int:
        return self.data_mean.numel()

    def exact_score(self, s: Tensor, x: Tensor) -> Tensor:
        a = broadcast_to(self.schedule.alpha(s), x)
        sg = broadcast_to(self.schedule.sigma(s), x)
        var = a * a * self.data_std**2 + sg * sg
        return -(x - a * self.data_mean) / var

    def score(self, s: Tensor, x: Tensor, c: Tensor | None = None) -> Tensor:
        mu = self.exact_score(s, x)
        if self.correction is not None and self._use_correction:
            mu = mu + self.correction(s, x)
        return mu

    @contextlib.contextmanager
    def pretrained(self) -> Iterator[None]:
        prev, self._use_correction = self._use_correction, False
        try:
            yield
        finally:
            self._use_correction = prev


# --- diffusers UNets with a LoRA adapter --------------------------------------------------------------
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compute_device() -> torch.device:
    """Where networks run: $CTRL_DEVICE (cpu, cuda, cuda:N) if set, else this process's GPU when CUDA is available
    (after ``distributed.Dist.from_env`` picked LOCAL_RANK's), else the CPU."""
    import os

    name = os.environ.get("CTRL_DEVICE", "")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DiffusersScoreModel(ScoreModel):
    """A diffusers UNet as a score model; LoRA through peft, disabled for mu_pre (one copy of the weights).

    ``c`` is passed as ``class_labels`` to a UNet2DModel and as ``encoder_hidden_states`` to a
    UNet2DConditionModel.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: VPSchedule,
        prediction_type: str = "epsilon",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.conditional_2d = type(unet).__name__ == "UNet2DConditionModel"
        for p in unet.parameters():
            p.requires_grad_(False)
        self.has_adapter = lora_rank > 0
        self._channels_last = False
        self._compile: tuple[str, str, bool | None] | None = None
        self._adapter_off = 0  # depth of pretrained() contexts
        if self.has_adapter:
            from peft import LoraConfig, get_peft_model

            present = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {
                ".".join(n.rsplit(".", 2)[-2:]) for n, _ in unet.named_modules()
            }
            targets = [t for t in lora_targets if t in present]
            if not targets:
                raise ValueError(f"none of the LoRA target modules {lora_targets} exist in the UNet")
            cfg = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                target_modules=targets,
                init_lora_weights=True,
            )
            self.net = get_peft_model(unet, cfg)
        else:
            self.net = unet

    @property
    def base_unet(self) -> nn.Module:
        return self.net.get_base_model() if self.has_adapter else self.net

    def compile_unet(
        self, mode: str = "default", backend: str = "inductor", dynamic: bool | None = None
    ) -> None:
        """``torch.compile`` the UNet's forward in place (``nn.Module.compile``): its parameters, state-dict keys
        and LoRA layers stay the same objects, so the optimiser, adapter I/O and checkpoints do not change. The
        adapter switch of ``pretrained()`` is a module flag that dynamo guards on: mu_pre gets its own graph.
        ``mode`` is torch.compile's: default | reduce-overhead (CUDA graphs) | max-autotune |
        max-autotune-no-cudagraphs. The first calls at each new batch shape / grad mode compile (minutes on
        an SD UNet); later ones run the compiled graph."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}: choose one of {COMPILE_MODES}")
        self._compile = (mode, backend, dynamic)
        for unet in self._unets():
            self._compile_one(unet)

    def _compile_one(self, unet: nn.Module) -> None:
        mode, backend, dynamic = self._compile
        unet.compile(mode=None if backend != "inductor" else mode, backend=backend, dynamic=dynamic)

    def use_channels_last(self) -> None:
        """NHWC memory format for the UNet's weights (inputs follow in ``model_output``)."""
        for unet in self._unets():
            unet.to(memory_format=torch.channels_last)
        self._channels_last = True

    def _unets(self) -> list[nn.Module]:
        sampler = self.__dict__.get("_sampler")
        return [self.base_unet] + ([sampler.unet] if sampler is not None else [])

    # --- merged sampling copy -------------------------------------------------------------------------------
    def enable_merged_sampling(self, dtype: torch.dtype | None = None, fuse_qkv: bool = True) -> None:
        """Run the rollouts' no-grad forwards through a frozen copy of the UNet whose weights hold the LoRA
        update merged in (W + s B A), stored in ``dtype`` (the autocast dtype: no per-call weight casts), with
        the attention's q/k/v projections fused into one matmul (``fuse_qkv``, UNet2DConditionModel). That
        removes the adapter's extra small matmuls from the 50 sampling calls; training forwards (with
        gradients) and mu_pre (``pretrained()``) keep the LoRA model. The copy is refreshed in place (compiled
        graphs stay valid) whenever the adapter's weights changed since its last refresh: ``adapter_changed()``
        (the trainer calls it after every optimiser step, load and restore: a fused AdamW kernel does not bump
        the weights' version counters) or their in-place version counters (any other in-place write). The base
        weights are never written, so they cannot drift. The copy is not a submodule: it is not in state dicts
        or checkpoints."""
        sampler = MergedSampler(self, dtype, fuse_qkv and self.conditional_2d)
        self.__dict__["_sampler"] = sampler
        if self._channels_last:
            sampler.unet.to(memory_format=torch.channels_last)
        if self._compile is not None:
            self._compile_one(sampler.unet)

    def adapter_changed(self) -> None:
        sampler = self.__dict__.get("_sampler")
        if sampler is not None:
            sampler.invalidate()

    def _net_for_call(self) -> nn.Module:
        sampler = self.__dict__.get("_sampler")
        if sampler is None or self._adapter_off or torch.is_grad_enabled():
            return self.net
        return sampler.current()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def model_output(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """The network runs on its own device (a GPU when there is one, see ``compute_device``); its inputs go
        there and its output comes back, so the rest of the engine (schedules, solvers, log-probs, RNG) works on
        host tensors. Autograd follows the transfers."""
        dev = self.device
        t_in = self.schedule.model_time(s).to(device=dev, dtype=torch.float32)
        c_in = c.to(dev) if isinstance(c, Tensor) else c
        x_in = x.to(dev)
        channels_last = self._channels_last
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        net = self._net_for_call()
        if (
            net is not self.net
        ):  # the merged copy holds its weights in the sampling dtype (times stay float32)
            x_in = x_in.to(net.dtype)
            c_in = c_in.to(net.dtype) if isinstance(c_in, Tensor) and c_in.is_floating_point() else c_in
        if self.conditional_2d:
            out = net(x_in, t_in, encoder_hidden_states=c_in, return_dict=False)[0]
        else:
            out = net(x_in, t_in, class_labels=c_in, return_dict=False)[0]
        if channels_last:
            out = out.contiguous()
        return out.to(x.device, x.dtype) if net is not self.net else out.to(x.device)

    def score(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        out = self.model_output(s, x, c)
        return score_from_model_output(
            out, x, self.schedule.alpha(s), self.schedule.sigma(s), self.prediction_type
        )

    @contextlib.contextmanager
    def pretrained(self):
        self._adapter_off += 1
        try:
            with self.net.disable_adapter() if self.has_adapter else contextlib.nullcontext():
                yield
        finally:
            self._adapter_off -= 1

    # adapter I/O: peft's files, and diffusers' own LoRA file for a UNet diffusers loads a LoRA into
    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Write the adapter folder, staged beside ``directory`` and renamed into place whole (a reader sees the
        complete folder or none, as ``io.atomic_folder``; an existing folder is replaced):

        - peft's ``save_pretrained`` files: adapter_config.json + adapter_model.safetensors (``load_adapter``,
          ``PeftModel.from_pretrained``);
        - for a UNet2DConditionModel (Stable Diffusion), ``pytorch_lora_weights.safetensors`` as
          ``StableDiffusionPipeline.save_lora_weights`` writes it (``save_diffusers_lora``), so that
          ``pipe.load_lora_weights(directory)`` reproduces this model's UNet with no further argument.

        diffusers 0.42 has no LoRA loader for UNet2DModel (it lacks ``PeftAdapterMixin``, DDPMPipeline lacks a
        LoRA loader mixin): there the diffusers route is the fused pipeline of ``ctrl_core.export``."""
        if not self.has_adapter:
            raise ValueError("this model has no LoRA adapter to save")
        from .io import atomic_folder

        with atomic_folder(directory) as tmp:
            self.net.save_pretrained(tmp, safe_serialization=True)
            if self.conditional_2d:
                save_diffusers_lora(self.net, tmp)

    def load_adapter(self, directory: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .io import require_safetensors

        path = require_safetensors(f"{directory}/adapter_model.safetensors")
        set_peft_model_state_dict(self.net, load_file(path))
        self.adapter_changed()


DIFFUSERS_LORA_FILE = (
    "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what it loads by default
)


def save_diffusers_lora(peft_unet: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``peft_unet``'s active LoRA (a peft-wrapped UNet2DConditionModel) with
    ``StableDiffusionPipeline.save_lora_weights`` itself (the classmethod of its StableDiffusionLoraLoaderMixin).
    ``directory / DIFFUSERS_LORA_FILE`` holds ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (peft's
    layout, which diffusers' ``load_lora_adapter`` reads natively and its ``save_lora_adapter`` writes) and, as
    the safetensors metadata ``lora_adapter_metadata``, the adapter's LoraConfig under ``unet.`` (r, lora_alpha,
    targets). The loader builds its LoraConfig from that metadata, so the update s·B·A keeps s = lora_alpha / r;
    without it diffusers would assume lora_alpha = r (s = 1)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import get_peft_model_state_dict

    name = peft_unet.active_adapter
    layers = get_peft_model_state_dict(
        peft_unet.get_base_model(), adapter_name=name
    )  # keys without base_model.model.
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        directory,
        unet_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in layers.items()},
        unet_lora_adapter_metadata=peft_unet.peft_config[name].to_dict(),
        weight_name=DIFFUSERS_LORA_FILE,
        safe_serialization=True,
    )


class MergedSampler:
    """A frozen copy of a ``DiffusersScoreModel``'s UNet with the adapter merged into its weights (see
    ``DiffusersScoreModel.enable_merged_sampling``). ``current()`` returns the copy, refreshed first when the
    adapter's parameters changed (their ``_version`` counters) or moved device."""

    def __init__(self, model: DiffusersScoreModel, dtype: torch.dtype | None, fuse_qkv: bool):
        import copy

        self.model, self.dtype = model, dtype
        base = model.net
        if model.has_adapter:
            with torch.no_grad():
                unet = copy.deepcopy(base).merge_and_unload()
        else:
            unet = copy.deepcopy(base)
        unet.requires_grad_(False).eval()
        if (
            dtype is not None
        ):  # every module (nn.Module.to: diffusers' .to warns about fp32-kept modules, none here)
            nn.Module.to(unet, dtype=dtype)
        self.fused = bool(fuse_qkv)
        if self.fused:
            unet.fuse_qkv_projections()
        self.unet = unet
        # (LoRA layer in the model, its Linear in the copy); the copy's fused Attention modules a refresh re-fuses
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        self.fused_attns: dict[str, nn.Module] = {}
        if model.has_adapter:
            from peft.tuners.lora import LoraLayer

            copies = dict(unet.named_modules())
            for name, mod in base.named_modules():
                if isinstance(mod, LoraLayer):
                    path = name.removeprefix("base_model.model.")
                    self.pairs.append((mod, copies[path]))
                    parent, _, leaf = path.rpartition(".")
                    if self.fused and leaf in ("to_q", "to_k", "to_v"):
                        self.fused_attns[parent] = copies[parent]
        self._key: tuple | None = None
        self.refreshes = 0

    def _state_key(self) -> tuple:
        params = self.model.trainable_parameters() if self.model.has_adapter else []
        return (self.model.device, *(p._version for p in params), *(p.data_ptr() for p in params))

    def invalidate(self) -> None:
        """The adapter changed in a way its version counters may miss (a fused optimiser kernel writes the
        weights without bumping them): refresh before the next call."""
        self._key = None

    @torch.no_grad()
    def refresh(self) -> None:
        dev = self.model.device
        if next(self.unet.parameters()).device != dev:
            self.unet.to(dev)
        for lora, target in self.pairs:  # merged in float32, rounded once to the copy's dtype
            merged = lora.base_layer.weight.float() + lora.get_delta_weight(lora.active_adapters[0]).float()
            target.weight.copy_(merged)
        for attn in self.fused_attns.values():  # the fused projections hold concatenated copies
            if attn.is_cross_attention:
                attn.to_kv.weight.copy_(torch.cat([attn.to_k.weight, attn.to_v.weight]))
            else:
                attn.to_qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        self._key = self._state_key()
        self.refreshes += 1

    def current(self) -> nn.Module:
        if self._key != self._state_key():
            self.refresh()
        return self.unet
