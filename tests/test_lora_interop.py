"""Our LoRA as diffusers loads it, never through our own loader: the adapter folder through a stock
``StableDiffusionPipeline.load_lora_weights(folder)``, and the fused export (``ctrl export --fused``) through
``DiffusionPipeline.from_pretrained(out)``. Each compares the UNet diffusers built with our adapted UNet on the
same inputs (relative error <= 1e-5), on the embedded digits model and a tiny SD1.5-shaped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ctrl_core.embedded import WEIGHTS_DIR, load_builtin_unet
from ctrl_core.export import EXPORT_INFO, export_fused
from ctrl_core.latent import LATENT_LORA_TARGETS, load_sd_folder, sd_folder_problem
from ctrl_core.models import DEFAULT_LORA_TARGETS, DIFFUSERS_LORA_FILE, DiffusersScoreModel
from ctrl_core.recipes import digits_problem
from ctrl_core.schedule import DiscreteVPSchedule
from ctrl_core.testing import save_tiny_sd, tiny_sd_components
from pipelines.cli import main

torch.set_num_threads(1)
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """The tiny SD folder our pipeline fetches, plus the model_index.json a stock diffusers pipeline needs."""
    from diffusers import StableDiffusionPipeline

    folder = save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")
    StableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_config(folder)  # fmt: skip
    return folder


def _randomise_lora(model: DiffusersScoreModel, seed: int = 0) -> None:
    """B starts at zero (the adapter is the identity): random B makes the update B·A non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _sd_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([20.0, 700.0]),
        torch.randn(2, 7, 32, generator=g),
    )


def _digits_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5.0, 300.0, 900.0]), torch.tensor([0, 4, 9])


def _sd_model(sd_folder: Path, lora_alpha: float | None, targets: tuple[str, ...]) -> DiffusersScoreModel:
    if lora_alpha is None and targets == LATENT_LORA_TARGETS:  # what the pipeline builds for an SD checkpoint
        model = sd_folder_problem(sd_folder, lora_rank=4).policy.model
    else:
        parts = load_sd_folder(sd_folder)
        model = DiffusersScoreModel(parts["unet"], DiscreteVPSchedule.from_scheduler(parts["scheduler"]),
                                    lora_rank=4, lora_alpha=lora_alpha, lora_targets=targets)  # fmt: skip
    _randomise_lora(model)
    return model


@pytest.mark.parametrize(
    "lora_alpha, targets",
    [(None, LATENT_LORA_TARGETS), (8.0, LATENT_LORA_TARGETS), (2.0, DEFAULT_LORA_TARGETS)],
    ids=["pipeline-alpha=rank", "alpha=2rank", "alpha=rank/2-with-convs"],
)
def test_a_stock_sd_pipeline_loads_the_adapter_folder_with_no_arguments(
    sd_folder, tmp_path, lora_alpha, targets
):
    from diffusers import StableDiffusionPipeline

    model = _sd_model(sd_folder, lora_alpha, targets)
    model.save_adapter(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == PEFT_FILES | {DIFFUSERS_LORA_FILE}

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    x, t, text = _sd_inputs()
    with torch.no_grad():
        base = pipe.unet(x, t, text).sample
        pipe.load_lora_weights(tmp_path / "adapter")
        got = pipe.unet(x, t, text).sample
        want = model.net(x, t, encoder_hidden_states=text).sample
    assert _relative_error(base, want) > 1e-2, (
        "the LoRA must change the output for the check to mean anything"
    )
    assert _relative_error(got, want) <= 1e-5
    (config,) = pipe.unet.peft_config.values()  # the scale lora_alpha / r came through the file's metadata
    assert (config.r, config.lora_alpha) == (4, lora_alpha or 4)


def test_the_lora_scale_of_diffusers_scales_our_update(sd_folder, tmp_path):
    """diffusers' LoRA scale s (``cross_attention_kwargs={"scale": s}`` per call, ``set_adapters`` weights per
    adapter) multiplies our update: W + s·(alpha/r)·B·A, i.e. our model with s·B."""
    from diffusers import StableDiffusionPipeline

    model = _sd_model(sd_folder, 8.0, LATENT_LORA_TARGETS)
    model.save_adapter(tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.load_lora_weights(tmp_path / "adapter", adapter_name="ctrl")
    scale = 0.3
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    x, t, text = _sd_inputs()
    with torch.no_grad():
        want = model.net(x, t, encoder_hidden_states=text).sample
        per_call = pipe.unet(x, t, text, cross_attention_kwargs={"scale": scale}).sample
        pipe.set_adapters(["ctrl"], adapter_weights=[scale])
        per_adapter = pipe.unet(x, t, text).sample
    assert _relative_error(per_call, want) <= 1e-5
    assert _relative_error(per_adapter, want) <= 1e-5


def test_diffusers_has_no_lora_loader_for_the_digits_unet(tmp_path):
    """UNet2DModel is ``ModelMixin, ConfigMixin`` without ``PeftAdapterMixin`` (no load_lora_adapter /
    add_adapter), and DDPMPipeline has no LoRA loader mixin: the digits adapter folder holds peft's files only,
    and diffusers gets the tuned digits model as the fused pipeline (tests below). If diffusers adds a loader,
    this fails: then write the diffusers file for UNet2DModel too."""
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers.loaders import PeftAdapterMixin
    from diffusers.loaders.lora_base import LoraBaseMixin

    assert not issubclass(UNet2DModel, PeftAdapterMixin) and not hasattr(UNet2DModel, "load_lora_adapter")
    assert not issubclass(DDPMPipeline, LoraBaseMixin) and not hasattr(DDPMPipeline, "load_lora_weights")
    model = digits_problem(lora_rank=4).policy.model
    model.save_adapter(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == PEFT_FILES


def test_the_adapter_folder_is_replaced_whole_or_not_at_all(sd_folder, tmp_path, monkeypatch):
    """save_adapter stages the folder beside its destination: a write that fails midway (here: the diffusers
    file) leaves the previous adapter folder as it was, and no staging folder behind."""
    import ctrl_core.models as models

    model = _sd_model(sd_folder, None, LATENT_LORA_TARGETS)
    model.save_adapter(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models, "save_diffusers_lora", broken)
    _randomise_lora(model, seed=5)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def _assert_safetensors_only(folder: Path) -> None:
    weights = [
        p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors")
    ]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


@pytest.mark.parametrize("lora_alpha", [None, 2.0], ids=["alpha=rank", "alpha=rank/2"])
def test_the_fused_digits_export_loads_with_diffusion_pipeline(tmp_path, lora_alpha):
    from diffusers import DDPMPipeline, DiffusionPipeline

    unet, scheduler = load_builtin_unet(WEIGHTS_DIR)
    model = DiffusersScoreModel(
        unet, DiscreteVPSchedule.from_scheduler(scheduler), lora_rank=4, lora_alpha=lora_alpha
    )
    _randomise_lora(model)
    model.save_adapter(tmp_path / "adapter")
    info = export_fused(WEIGHTS_DIR, tmp_path / "adapter", tmp_path / "fused")

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert isinstance(pipe, DDPMPipeline) and info["pipeline"] == "DDPMPipeline"
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(scheduler.config)
    x, t, labels = _digits_inputs()
    with torch.no_grad():
        got = pipe.unet(x, t, class_labels=labels).sample
        want = model.net(x, t, class_labels=labels).sample
        with model.pretrained():
            base = model.net(x, t, class_labels=labels).sample
    assert _relative_error(base, want) > 1e-2
    assert _relative_error(got, want) <= 1e-5
    _assert_safetensors_only(tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / EXPORT_INFO).read_text())["adapter"]["lora_alpha"] == (
        lora_alpha or 4
    )


def test_the_fused_sd_export_loads_with_diffusion_pipeline_and_generates(sd_folder, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    model = _sd_model(sd_folder, None, LATENT_LORA_TARGETS)
    model.save_adapter(tmp_path / "adapter")
    export_fused(sd_folder, tmp_path / "adapter", tmp_path / "fused")

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert isinstance(pipe, StableDiffusionPipeline) and not getattr(pipe.unet, "peft_config", None)  # merged
    x, t, text = _sd_inputs()
    with torch.no_grad():
        got = pipe.unet(x, t, text).sample
        want = model.net(x, t, encoder_hidden_states=text).sample
    assert _relative_error(got, want) <= 1e-5
    _assert_safetensors_only(tmp_path / "fused")
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (1, 16, 16, 3)


def test_ctrl_export_from_folders_and_from_a_run_folder(tmp_path):
    from diffusers import DiffusionPipeline

    model = digits_problem(lora_rank=4).policy.model
    _randomise_lora(model)
    adapter = tmp_path / "adapter"
    model.save_adapter(adapter)
    x, t, labels = _digits_inputs()
    with torch.no_grad():
        want = model.net(x, t, class_labels=labels).sample

    runner = CliRunner()
    result = runner.invoke(main, ["export", "--checkpoint", str(WEIGHTS_DIR), "--adapter", str(adapter),
                                  "--fused", str(tmp_path / "fused")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pipeline"] == "DDPMPipeline"
    with torch.no_grad():
        got = DiffusionPipeline.from_pretrained(tmp_path / "fused").unet(x, t, class_labels=labels).sample
    assert _relative_error(got, want) <= 1e-5

    # a `ctrl run` output folder, as kfp.local lays it out: kfp/<pipeline run>/<task>/<output artifact>
    tasks = (
        tmp_path / "outputs" / "20260101-000000-abcdef" / "kfp" / "ctrl-pipeline-2026-01-01-00-00-00-000000"
    )
    checkpoint = tasks / "fetch-checkpoint" / "checkpoint"
    shutil.copytree(WEIGHTS_DIR, checkpoint)
    (checkpoint / "manifest.json").write_text(json.dumps({"source": "builtin:digits", "sha256": "ab" * 32}))
    shutil.copytree(adapter, tasks / "ctrl-optimize" / "adapter" / "adapter")
    shutil.copytree(adapter, tasks / "ctrl-optimize" / "adapter" / "checkpoints" / "iter-00001")  # a snapshot
    run_dir = tasks.parents[1]
    result = runner.invoke(main, ["export", "--run", str(run_dir), "--fused", str(tmp_path / "fused2")])
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "fused2" / EXPORT_INFO).read_text())["checkpoint"]["source"]
        == "builtin:digits"
    )
    with torch.no_grad():
        got = DiffusionPipeline.from_pretrained(tmp_path / "fused2").unet(x, t, class_labels=labels).sample
    assert _relative_error(got, want) <= 1e-5

    # refusals: --run with explicit folders; a folder that holds no LoRA adapter (leaves the old export as it was)
    result = runner.invoke(main, ["export", "--run", str(run_dir), "--adapter", str(adapter), "--fused", "x"])
    assert result.exit_code == 2 and "--run" in result.output
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "fused").rglob("*"))
    result = runner.invoke(main, ["export", "--checkpoint", str(WEIGHTS_DIR), "--adapter", str(WEIGHTS_DIR),
                                  "--fused", str(tmp_path / "fused")])  # fmt: skip
    assert result.exit_code == 1 and "adapter_config.json" in result.output
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "fused").rglob("*")) == before
