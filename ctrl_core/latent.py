"""Latent text-to-image backend: Stable-Diffusion-shaped UNet2DConditionModel + AutoencoderKL + CLIP text encoder.

The engine (policy.py, algorithms.py, value.py) works unchanged: it only sees a ``ScoreModel`` over latents
x in R^{4 x h x w} and conditions c. Here

- ``c`` is a (B,) tensor of prompt *indices* into a fixed prompt list; the CLIP text embeddings of the list
  (and of the empty prompt, for classifier-free guidance) are computed once with the frozen text encoder;
- the score is classifier-free guided: eps = eps_uncond + w (eps_cond - eps_uncond), both halves in one batched
  UNet call. eq. 31 maps eps to the score affinely with coefficients that do not depend on the prompt, so the
  guided score is score_uncond + w (score_cond - score_uncond) as well;
- mu_pre is the same UNet with its LoRA adapter (attention to_q/to_k/to_v/to_out.0) disabled;
- rewards stay image rewards ``reward_fn(images, c) -> (B,)``: ``latent_reward`` decodes latents with the VAE
  first (images in [-1, 1]), so the value net (eq. 19) and the terminal reward see images.

Weights load from a local diffusers folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), safetensors
only; S3 prefixes and Hugging Face ids arrive as such folders through the fetch step (checkpoints.py).
``testing.tiny_sd_components`` builds an SD1.5-shaped model from config dicts for tests (nothing is downloaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import DiffusersScoreModel
from .problem import Problem
from .schedule import DiscreteVPSchedule, VPSchedule

LATENT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
AUTOCAST_DTYPES = {
    "": None,
    "float32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PROMPTS_FILE = "prompts.txt"


# --- prompts -> frozen CLIP embeddings --------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str]) -> Tensor:
    """(P,) prompts -> (P, L, D) last hidden states of the frozen CLIP text encoder (SD's conditioning)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float().cpu()


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one prompt per line)")
    return prompts


# --- the score model ----------------------------------------------------------------------------------------
class LatentScoreModel(DiffusersScoreModel):
    """Classifier-free-guided latent score of a UNet2DConditionModel; c = prompt indices (B,) or None (uncond).

    ``prompt_embeds`` (P, L, D) and ``uncond_embeds`` (1, L, D) are fixed buffers (frozen text encoder).
    ``autocast_dtype`` (torch.bfloat16 / torch.float16 / None) runs the UNet under autocast; the score is
    returned in the latents' dtype.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: VPSchedule,
        prompt_embeds: Tensor,
        uncond_embeds: Tensor,
        guidance_scale: float = 7.0,
        prediction_type: str = "epsilon",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = LATENT_LORA_TARGETS,
        autocast_dtype: torch.dtype | None = None,
    ):
        if type(unet).__name__ != "UNet2DConditionModel":
            raise TypeError(f"the latent backend needs a UNet2DConditionModel, got {type(unet).__name__}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
            )
        if prompt_embeds.ndim != 3 or uncond_embeds.shape != (1, *prompt_embeds.shape[1:]):
            raise ValueError(
                f"prompt embeddings (P, L, D) and uncond (1, L, D) expected, got "
                f"{tuple(prompt_embeds.shape)} and {tuple(uncond_embeds.shape)}"
            )
        super().__init__(unet, schedule, prediction_type, lora_rank, lora_alpha, lora_targets)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float(), persistent=False)
        self.register_buffer("uncond_embeds", uncond_embeds.detach().float(), persistent=False)
        self.guidance_scale = float(guidance_scale)
        self.autocast_dtype = autocast_dtype

    @property
    def num_prompts(self) -> int:
        return self.prompt_embeds.shape[0]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in the backward pass (memory for time; the LoRA gradients are the same)."""
        self.base_unet.enable_gradient_checkpointing()

    def _autocast(self, x: Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)  # where the UNet runs

    def conditional_output(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """Unguided network output: conditioned on prompts c, or on the empty prompt when c is None."""
        B = x.shape[0]
        ehs = (
            self.uncond_embeds.expand(B, -1, -1)
            if c is None
            else self.prompt_embeds[c.long().to(self.prompt_embeds.device)]
        )
        with self._autocast(x):
            out = super().model_output(s, x, ehs)  # embeddings stay on the UNet's device
        return out.to(x.dtype)

    def model_output(self, s: Tensor, x: Tensor, c: Tensor | None) -> Tensor:
        """Classifier-free guidance: out = out_uncond + w (out_cond - out_uncond), one batched UNet call."""
        w = self.guidance_scale
        if c is None or w == 1.0:
            return self.conditional_output(s, x, c)
        B = x.shape[0]
        cond = self.prompt_embeds[c.long().to(self.prompt_embeds.device)]
        ehs = torch.cat([self.uncond_embeds.expand(B, -1, -1), cond])
        s2 = s.reshape(-1).expand(B) if s.numel() == 1 else s
        with self._autocast(x):
            out = DiffusersScoreModel.model_output(self, torch.cat([s2, s2]), torch.cat([x, x]), ehs)
        out_uncond, out_cond = out.to(x.dtype).chunk(2)
        return out_uncond + w * (out_cond - out_uncond)


# --- decode-then-reward -------------------------------------------------------------------------------------
def latent_reward(
    reward_fn: Callable,
    vae: nn.Module,
    scale: float | None = None,
    batch_size: int = 32,
    prompts: Sequence[str] | None = None,
) -> Callable:
    """An image reward as a reward over latents: RM(decode(x / scale) clamped to [-1, 1], c) -> (B,).

    ``scale`` defaults to the VAE's ``scaling_factor`` (0.18215 for SD1.5). The VAE is frozen and run without
    gradients (CTRL only evaluates rewards). A reward that reads prompt text (``rewards.bind_prompts``) gets
    ``prompts`` bound, so the conditions it sees (prompt indices) map to their texts."""
    from .rewards import bind_prompts

    reward_fn = bind_prompts(reward_fn, prompts)
    scale = float(vae.config.scaling_factor if scale is None else scale)
    for p in vae.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def decode(latents: Tensor) -> Tensor:
        p = next(vae.parameters())
        parts = [
            vae.decode((z / scale).to(p.device, p.dtype), return_dict=False)[0]
            for z in latents.split(batch_size)
        ]
        return torch.cat(parts).float().clamp(-1, 1).to(latents.device)

    def fn(latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        return reward_fn(decode(latents), conditions)

    fn.decode = decode  # type: ignore[attr-defined]
    return fn


@dataclass
class LatentProblem(Problem):
    """A ``Problem`` over latents; ``wrap_reward`` turns an image reward into a latent one (VAE decode).

    ``tiny_decoder_dir``: where ``wrap_value_reward(reward, "tiny")`` finds a tiny autoencoder for the value's
    x_hat decodes (the checkpoint folder's ``vae_tiny/``)."""

    prompts: list[str]
    vae: nn.Module
    tiny_decoder_dir: Path | None = None
    compile_mode: str = (
        ""  # model.compile: also applied to the decoders (the VAE decode costs more than a UNet step)
    )

    def wrap_reward(self, reward_fn: Callable) -> Callable:
        """The image reward as a reward over latents, through the VAE (``latent_reward``)."""
        return latent_reward(reward_fn, self.vae, prompts=self.prompts)

    def compile_decoders(self, mode: str) -> None:
        """torch.compile the VAE's decoder in place (and, when loaded, the tiny decoder's)."""
        self.compile_mode = mode
        self.vae.decoder.compile(mode=mode)

    def wrap_value_reward(self, reward_fn: Callable, decoder: str = "vae") -> Callable:
        """The reward the value's skip term c_skip RM(x_hat) uses: through the full VAE ("vae": the same as the
        terminal reward) or through a tiny distilled decoder ("tiny": TAESD, ~18x fewer FLOPs than SD's VAE
        decoder at 512^2). The terminal reward RM(X_T), the returns and V(T, x) = RM(x) keep the full VAE."""
        if decoder == "vae":
            return self.wrap_reward(reward_fn)
        if decoder != "tiny":
            raise ValueError(f"value.xhat_decoder must be vae or tiny, got {decoder!r}")
        if self.tiny_decoder_dir is None:
            raise ValueError(
                "value.xhat_decoder=tiny needs a tiny decoder folder (vae_tiny/ in the checkpoint)"
            )
        from .models import compute_device

        tiny = load_tiny_decoder(self.tiny_decoder_dir).to(
            compute_device(), next(self.vae.parameters()).dtype
        )
        if self.compile_mode:
            tiny.decoder.compile(mode=self.compile_mode)
        return latent_reward(reward_fn, tiny, prompts=self.prompts)


TINY_DECODER_SUBFOLDER = "vae_tiny"


def load_tiny_decoder(folder: str | Path) -> nn.Module:
    """A diffusers ``AutoencoderTiny`` (TAESD) from a local folder, safetensors only, frozen. For SD1.x/2.x
    latents that is madebyollin/taesd (taesdxl for SDXL): put its files in the checkpoint's vae_tiny/. Its
    ``scaling_factor`` (1.0) makes ``latent_reward`` feed it the UNet's latents as they are."""
    from diffusers import AutoencoderTiny

    from .io import UNSAFE_WEIGHT_SUFFIXES, UnsafeWeightsError, require_safetensors

    d = Path(folder)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny decoder at {d}: put an AutoencoderTiny folder there (config.json + "
            "diffusion_pytorch_model.safetensors; madebyollin/taesd for SD1.x/2.x) or use value.xhat_decoder=vae"
        )
    for f in d.iterdir():
        if f.suffix.lower() in UNSAFE_WEIGHT_SUFFIXES:
            raise UnsafeWeightsError(f"{f}: refusing non-safetensors weights for the tiny decoder")
    require_safetensors(d / "diffusion_pytorch_model.safetensors")
    model = AutoencoderTiny.from_pretrained(d, use_safetensors=True, local_files_only=True).eval()
    if type(model).__name__ != "AutoencoderTiny":
        raise TypeError(f"{d}: expected an AutoencoderTiny, got {type(model).__name__}")
    return model.requires_grad_(False)


def distill_tiny_decoder(
    vae: nn.Module,
    tiny: nn.Module,
    latents: Tensor,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> dict:
    """Train ``tiny``'s decoder to reproduce ``vae``'s decode on ``latents`` (UNet-space latents, as the engine
    holds them): TAESD's recipe for a VAE that has no published tiny decoder. Minimises the mean squared
    error between tiny.decode(z / tiny_scale) and vae.decode(z / vae_scale) clamped to [-1, 1]. Returns
    {"mse_before", "mse_after", "target_var"} on the whole set."""
    vae_scale, tiny_scale = float(vae.config.scaling_factor), float(tiny.config.scaling_factor)
    with torch.no_grad():
        p = next(vae.parameters())  # (a bf16 VAE next to a bf16 UNet: decode in its dtype, distil in float32)
        target = torch.cat([vae.decode((z / vae_scale).to(p.device, p.dtype), return_dict=False)[0].float().clamp(-1, 1)
                            for z in latents.split(batch_size)]).to(latents.device)  # fmt: skip

    q = next(tiny.parameters())  # (the tiny decoder trains in its own dtype and device; the loss in float32)

    def tiny_decode(z: Tensor) -> Tensor:
        return (
            tiny.decode((z / tiny_scale).to(q.device, q.dtype), return_dict=False)[0]
            .float()
            .to(latents.device)
        )

    def mse() -> float:
        with torch.no_grad():
            out = torch.cat([tiny_decode(z) for z in latents.split(batch_size)])
        return float((out - target).pow(2).mean())

    before = mse()
    params = list(tiny.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = generator or torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=g)
        loss = (tiny_decode(latents[idx]) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tiny.requires_grad_(False)
    return {"mse_before": before, "mse_after": mse(), "target_var": float(target.var())}


def latent_problem(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    lora_rank: int = 4,
    solver: str = "ddpm",
    guidance_scale: float = 7.0,
    autocast_dtype: torch.dtype | None = None,
) -> LatentProblem:
    """A latent text-to-image task: conditions are indices into ``prompts``, the state is the VAE latent."""
    from .policy import GaussianScorePolicy
    from .value import ConvResidual

    prompts = list(prompts)
    if not prompts:
        raise ValueError("the latent backend needs at least one prompt")
    for m in (unet, vae, text_encoder):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    embeds = encode_prompts(text_encoder, tokenizer, prompts)
    uncond = encode_prompts(text_encoder, tokenizer, [""])
    if embeds.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(
            f"text encoder width {embeds.shape[-1]} != UNet cross_attention_dim {unet.config.cross_attention_dim}"
        )
    schedule = DiscreteVPSchedule.from_scheduler(scheduler)
    from .models import compute_device

    vae.to(compute_device())  # the decode for the reward runs where the UNet does
    if (
        autocast_dtype == torch.bfloat16
    ):  # and in bf16 with a bf16 UNet (the decode costs more than a UNet step);
        nn.Module.to(vae, dtype=torch.bfloat16)  # fp16 keeps float32 (diffusers' force_upcast: SD's VAE
        # overflows in fp16); nn.Module.to: diffusers' .to warns about fp32-kept modules, of which it has none
    model = LatentScoreModel(
        unet,
        schedule,
        embeds,
        uncond,
        guidance_scale,
        scheduler.config.prediction_type,
        lora_rank=lora_rank,
        autocast_dtype=autocast_dtype,
    ).to(compute_device())
    n, ch, size = len(prompts), unet.config.in_channels, unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return LatentProblem(
        policy=GaussianScorePolicy(model, solver),
        x_shape=(ch, *size),
        condition_sampler=lambda b, g: torch.randint(0, n, (b,), generator=g),
        eval_conditions=lambda b: torch.arange(b) % n,  # every prompt in turn, fixed
        make_residual=lambda: ConvResidual(channels=ch, width=32, num_classes=n).to(compute_device()),
        prompts=prompts,
        vae=vae,
    )


# --- loading a diffusers SD folder (safetensors only) -----------------------------------------------------
def is_sd_folder(path: str | Path) -> bool:
    """A latent text-to-image (Stable Diffusion) pipeline folder: ``unet/`` with its config, ``vae/`` and
    ``text_encoder/`` (what ``load_sd_folder`` loads)."""
    d = Path(path)
    return (d / "unet" / "config.json").is_file() and (d / "vae").is_dir() and (d / "text_encoder").is_dir()


def load_sd_folder(path: str | Path) -> dict:
    """Load ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` of a local diffusers SD folder, offline and
    safetensors only. Returns {unet, vae, text_encoder, tokenizer, scheduler}. The scheduler is read as a
    DDPMScheduler (only its noise schedule is used: the engine has its own solvers)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .io import UNSAFE_WEIGHT_SUFFIXES, UnsafeWeightsError, require_safetensors
    from .layout import weight_variant

    d = Path(path)
    missing = [s for s in SD_SUBFOLDERS if not (d / s).is_dir()]
    if missing:
        raise ValueError(f"{d}: not a diffusers SD folder (missing {missing})")
    unsafe = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.suffix.lower() in UNSAFE_WEIGHT_SUFFIXES)
    if unsafe:
        raise UnsafeWeightsError(f"{d}: refusing non-safetensors weights {unsafe} (pickles can execute code)")
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        files = sorted((d / sub).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{d / sub}: no {name}.safetensors")
        for f in files:
            require_safetensors(f)
    variant = lambda sub, name: weight_variant([f.name for f in (d / sub).iterdir()], name)  # noqa: E731  (.fp16 only)
    unet = UNet2DConditionModel.from_pretrained(
        d / "unet",
        use_safetensors=True,
        local_files_only=True,
        variant=variant("unet", "diffusion_pytorch_model"),
    ).eval()
    vae = AutoencoderKL.from_pretrained(
        d / "vae",
        use_safetensors=True,
        local_files_only=True,
        variant=variant("vae", "diffusion_pytorch_model"),
    ).eval()
    text_encoder = CLIPTextModel.from_pretrained(
        d / "text_encoder",
        use_safetensors=True,
        local_files_only=True,
        variant=variant("text_encoder", "model"),
    ).eval()
    tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    # offline, a tokenizer with missing files can load as a handful of special tokens: check its size
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"{d / 'tokenizer'}: vocabulary of {len(tokenizer)} tokens, the text encoder expects "
            f"{text_encoder.config.vocab_size} (incomplete tokenizer files?)"
        )
    scheduler = DDPMScheduler.from_pretrained(d / "scheduler", local_files_only=True)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def sd_folder_problem(
    path: str | Path,
    lora_rank: int = 4,
    solver: str = "ddpm",
    prompts_file: str | Path = "",
    guidance_scale: float = 7.0,
    autocast: str = "",
    gradient_checkpointing: bool = False,
) -> LatentProblem:
    """``latent_problem`` for a local SD folder; prompts from ``prompts_file`` or the folder's prompts.txt;
    ``autocast`` one of AUTOCAST_DTYPES' names ("", "bf16", "fp16")."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(
            f"model.autocast: {autocast!r} is not one of {sorted(k for k in AUTOCAST_DTYPES if k)}"
        )
    d = Path(path)
    pf = Path(prompts_file) if str(prompts_file) else d / PROMPTS_FILE
    if not pf.is_file():
        raise FileNotFoundError(
            f"no prompt file {pf}: put prompts.txt in the checkpoint folder or set model.prompts"
        )
    parts = load_sd_folder(d)
    problem = latent_problem(**parts, prompts=read_prompts(pf), lora_rank=lora_rank, solver=solver,
                             guidance_scale=guidance_scale, autocast_dtype=AUTOCAST_DTYPES[autocast])  # fmt: skip
    problem.tiny_decoder_dir = d / TINY_DECODER_SUBFOLDER
    if gradient_checkpointing:
        problem.policy.model.enable_gradient_checkpointing()
    return problem
