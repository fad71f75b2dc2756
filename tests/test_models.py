"""Real tiny diffusers/peft models behind the policy interface; weight I/O; bad input."""

from __future__ import annotations

import pytest
import torch

from ctrl_core.algorithms import OptimConfig
from ctrl_core.io import UnsafeWeightsError, atomic_save_weights, load_weights, require_safetensors
from ctrl_core.models import DiffusersScoreModel
from ctrl_core.policy import GaussianScorePolicy, canonical_solver, sample
from ctrl_core.rewards import REWARDS, make_reward, register_reward, reward_factory, reward_names
from ctrl_core.rewards.jpeg import jpeg_bytes
from ctrl_core.schedule import DiscreteVPSchedule
from ctrl_core.value import get_link


def tiny_unet2d(num_class_embeds=10):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )  # fmt: skip


def tiny_unet_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def schedule():
    from diffusers import DDPMScheduler

    return DiscreteVPSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))


def _perturb_lora(model):
    with torch.no_grad():
        for n, p in model.net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_lora_policy_gives_base_and_adapted_scores_from_one_copy(kind, tmp_path):
    if kind == "unet2d":
        unet, x, c = tiny_unet2d(), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    else:
        unet, x, c = tiny_unet_condition(), torch.randn(4, 4, 8, 8), torch.randn(4, 3, 12)
    s = torch.full((4,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        base_out = unet(
            x,
            torch.full((4,), 499.0),
            **({"class_labels": c} if kind == "unet2d" else {"encoder_hidden_states": c}),
        ).sample
    n_base = sum(p.numel() for p in unet.parameters())
    model = DiffusersScoreModel(unet, schedule(), lora_rank=4)
    assert sum(p.numel() for p in model.parameters()) < 1.5 * n_base  # LoRA on top, base weights not copied
    trainable = model.trainable_parameters()
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        mu0 = model.score(s, x, c)
        torch.testing.assert_close(mu0, -base_out / model.schedule.sigma(s)[0].float())  # LoRA B starts at 0
        _perturb_lora(model)
        mu_theta = model.score(s, x, c)
        with model.pretrained():
            mu_pre = model.score(s, x, c)
    assert (mu_theta - mu_pre).abs().max() > 1e-3
    torch.testing.assert_close(mu_pre, mu0)
    # adapter round trip in the peft format
    model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    other = DiffusersScoreModel(
        tiny_unet2d() if kind == "unet2d" else tiny_unet_condition(), schedule(), lora_rank=4
    )
    other.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(other.score(s, x, c), mu_theta)


def test_samplers_run_on_a_lora_unet_at_any_step_count():
    model = DiffusersScoreModel(tiny_unet2d(), schedule(), lora_rank=2)
    c = torch.arange(3)
    for solver in ["sde", "ode", "euler_maruyama", "heun"]:
        pol = GaussianScorePolicy(model, solver)
        for n in (3, 7):
            traj = sample(pol, torch.randn(3, 1, 8, 8), c, pol.schedule.time_grid(n))
            assert traj.states.shape == (n + 1, 3, 1, 8, 8)
            assert torch.all(torch.isfinite(traj.sample))
            assert bool(traj.stochastic.any()) == (solver in ("sde", "euler_maruyama"))


def test_rewards_registry_and_jpeg():
    smooth = torch.zeros(4, 1, 8, 8)
    noisy = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.all(jpeg_bytes(noisy, upscale=4) > jpeg_bytes(smooth, upscale=4))
    comp, incomp = make_reward("jpeg_compressibility"), make_reward("jpeg_incompressibility")
    assert torch.all(comp(smooth, None) > comp(noisy, None))
    torch.testing.assert_close(comp(noisy, None), -incomp(noisy, None))
    w = make_reward(
        "weighted_sum",
        terms={"jpeg_compressibility": {"weight": 2.0}, "quadratic": {"weight": 1.0, "k": 0.0}},
    )
    torch.testing.assert_close(w(noisy, None), 2 * comp(noisy, None))
    assert {"jpeg_compressibility", "jpeg_incompressibility", "classifier", "quadratic"} <= set(REWARDS)


def test_every_registered_reward_resolves_to_its_factory(monkeypatch):
    """The registry names each factory by "module:function": every entry imports and is callable, and a
    reward registered from elsewhere joins the same registry (and cannot take a built-in's name)."""
    import ctrl_core.rewards

    for name in reward_names():
        assert callable(reward_factory(name)) and REWARDS[name] is reward_factory(name), name
    with pytest.raises(ValueError, match="already registered"):
        register_reward("quadratic")(lambda: None)
    monkeypatch.setattr(ctrl_core.rewards, "_FACTORIES", dict(ctrl_core.rewards._FACTORIES))  # undone after

    @register_reward("test_constant")
    def constant(value: float = 1.0):
        return lambda images, conditions=None: torch.full((images.shape[0],), value)

    assert "test_constant" in reward_names() and "test_constant" in REWARDS
    torch.testing.assert_close(
        make_reward("test_constant", value=2.0)(torch.zeros(3, 2), None), torch.full((3,), 2.0)
    )


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: make_reward("imagereward_typo"), "reward"),
        (lambda: get_link("cosine"), "link"),
        (lambda: OptimConfig(beta=-0.1), "optimize.beta"),
        (lambda: OptimConfig(train_steps=0), "optimize.train_steps"),
        (lambda: OptimConfig(algorithm="reinforce"), "optimize.algorithm"),
        (lambda: canonical_solver("dpm++"), "solver"),
        (lambda: schedule().time_grid(0), "num_steps"),
    ],
)
def test_bad_input_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        make()


def test_weights_only_from_safetensors(tmp_path):
    pkl = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, pkl)
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        require_safetensors(pkl)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pkl.read_bytes())  # a pickle renamed: refused by its header
    with pytest.raises(UnsafeWeightsError):
        load_weights(fake)
    good = tmp_path / "w.safetensors"
    atomic_save_weights({"w": torch.arange(3.0)}, good)
    torch.testing.assert_close(load_weights(good)["w"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_shape_mismatch_is_rejected():
    from ctrl_core.models import GaussianScoreModel
    from ctrl_core.schedule import LinearVPSchedule

    with pytest.raises(ValueError, match="shape"):
        GaussianScoreModel(LinearVPSchedule(), torch.zeros(2), torch.ones(3))
