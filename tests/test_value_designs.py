"""Value-network designs at scale (issue 7 item 3): the paper's F_phi (a partly frozen copy of the reward model
on the decoded state), a tiny decoder for the value's RM(x_hat), and the trainer keeping the terminal reward on
the full VAE. Tiny SD-shaped model and the tiny ImageReward fixture (written by the original code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctrl_core import params as params_mod
from ctrl_core.algorithms import OptimConfig
from ctrl_core.latent import TINY_DECODER_SUBFOLDER, latent_reward
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.testing import save_tiny_sd, tiny_decoder_for
from ctrl_core.value import MLPResidual, RewardCopyResidual, ValueFunction, freeze_leading

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent / "fixtures" / "imagereward_tiny"
PROMPTS = [
    p for p in json.loads((FIXTURE / "reference.json").read_text())["prompts"] if p
]  # prompts.txt skips blanks
IR_OPTIONS = {
    "checkpoint": str(FIXTURE / "ImageReward.safetensors"),
    "med_config": str(FIXTURE / "med_config.json"),
    "tokenizer_dir": str(FIXTURE / "tokenizer"),
    "device": "cpu",
}


def test_freeze_leading_freezes_the_first_share_of_weights_in_order():
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 1))
    assert freeze_leading(net, 0.0) == [n for n, _ in net.named_parameters()]
    trainable = freeze_leading(net, 0.5)  # 110 + 110 + 11 weights: the first layer (110 <= 115.5) is frozen
    assert trainable == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert not net[0].weight.requires_grad and net[1].weight.requires_grad
    with pytest.raises(ValueError, match="frozen fraction"):
        freeze_leading(net, 1.0)


def test_imagereward_copy_starts_as_the_reward_and_trains_only_its_tail():
    raw = make_reward("imagereward", **IR_OPTIONS)
    reward = raw.bind_prompts(PROMPTS)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = torch.tensor([0, 1, 2, 0]) % len(PROMPTS)
    res = RewardCopyResidual(raw.trainable_copy(PROMPTS, 0.7))
    s = torch.full((4,), 0.5)
    torch.testing.assert_close(res(s, images, c), reward(images, c), rtol=1e-5, atol=1e-5)  # a copy of RM
    with pytest.raises(ValueError, match=rf"value copy: prompt index out of range \[0, {len(PROMPTS)}\)"):
        res(s, images, torch.tensor([0, 1, 2, len(PROMPTS)]))  # checked as the reward checks them
    res(s, images, c).sum().backward()
    named = dict(res.named_parameters())
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert frozen and all(named[n].grad is None for n in frozen)
    assert all(n.startswith("copy.model.vision") for n in frozen[:3])  # the ViT goes first
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values() if p.requires_grad)
    assert not any(p.requires_grad for p in raw.scorer.model.parameters())  # the reward model stays frozen
    # the state dict holds the trainable weights only, and round-trips into a fresh copy
    state = res.state_dict()
    assert set(state) == {n for n, p in named.items() if p.requires_grad}
    # nested in a module with other weights, only its own frozen keys are dropped
    parent = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "residual": res, "z": torch.nn.Linear(2, 2)})
    assert set(parent.state_dict()) == {"a.weight", "a.bias", "z.weight", "z.bias"} | {
        f"residual.{k}" for k in state
    }
    with torch.no_grad():
        for p in res.parameters():
            if p.requires_grad:
                p.add_(0.01)
    moved = res(s, images, c).detach()
    fresh = RewardCopyResidual(raw.trainable_copy(PROMPTS, 0.7))
    fresh.load_state_dict(res.state_dict())
    torch.testing.assert_close(fresh(s, images, c), moved)
    with pytest.raises(ValueError, match="do not match"):
        RewardCopyResidual(raw.trainable_copy(PROMPTS, 0.1)).load_state_dict(res.state_dict())


def _counting_trainer(cfg: OptimConfig):
    """A trainer on a 2-d Gaussian whose terminal reward and value reward (the same quadratic) log the batch
    of every call: (trainer, terminal calls, value-reward calls)."""
    problem = gaussian_problem(torch.zeros(2), torch.ones(2))
    quad = make_reward("quadratic", target=[1.0, 0.0])
    terminal, skip = [], []

    def counted(log):
        return lambda x, c=None: (log.append(len(x)), quad(x, c))[1]

    value = ValueFunction(counted(skip), MLPResidual(2), "cos_sin")
    return make_trainer(problem, counted(terminal), cfg, value), terminal, skip


def test_trainer_scores_x_hat_with_the_values_reward_and_x_T_with_its_own():
    """RM(x_hat) (2 K batches per iteration) goes through the value's reward, the terminal reward (1 batch)
    through the trainer's: a cheaper decoder can serve the value without touching RM(X_T)."""
    cfg = OptimConfig(
        iterations=1, batch_size=8, train_steps=6, train_timesteps=3, minibatch_size=8, seed=1, lr=3e-4
    )
    trainer, terminal, skip = _counting_trainer(cfg)
    trainer.step()
    assert len(terminal) == 1 and len(skip) == 2 * 3


@pytest.mark.parametrize("solver", ["ddpm", "euler_maruyama"])
def test_td_advantage_evaluates_each_value_once(solver):
    """The TD advantage V(t', x') - V(t, x): when step k + 1 is also a training step its V(t, x) is step k's
    V(t', x'), and V(0, x) is the rollout's terminal reward (a solver whose last step is random), so with every
    step chosen the value's reward runs once per step (DDPM: and once at the deterministic last step's start)
    and the terminal reward once; the advantages equal the ones evaluated afresh."""
    cfg = OptimConfig(
        iterations=1,
        batch_size=8,
        train_steps=5,
        train_timesteps=5,
        minibatch_size=8,
        seed=1,
        advantage="temporal_difference",
        value_xhat="policy",
        solver=solver,
        lr=3e-4,
    )
    trainer, terminal, skip = _counting_trainer(cfg)
    ro = trainer.rollout()
    assert ro.steps == ([0, 1, 2, 3] if solver == "ddpm" else [0, 1, 2, 3, 4]) and len(terminal) == 1
    adv = trainer.advantages(ro)
    assert len(skip) == 5 and len(terminal) == 1  # afresh: 2 K (8 or 10) and 0 or 1 more terminal rewards
    grid, traj = ro.traj.grid, ro.traj
    for k in ro.steps:  # afresh: V at both ends of each step
        s, s_next = float(grid[k]), float(grid[k + 1])
        v_next = trainer._value_at(
            s_next, traj.states[k + 1], traj.means[k + 1] if k + 1 < 5 else None, traj.conditions
        )
        assert (s_next <= 0) == (k == 4)
        v_here = trainer._value_at(s, traj.states[k], traj.means[k], traj.conditions)
        torch.testing.assert_close(adv[k], v_next - v_here - cfg.beta * ro.kl_terms[k], rtol=0, atol=0)
    assert list(adv) == ro.steps


def test_pipeline_value_designs_on_a_latent_checkpoint(tmp_path, monkeypatch):
    """value.residual=reward_copy + value.xhat_decoder=tiny through the pipeline steps: the value net saved is
    the copy's trainable tail, its skip term decodes x_hat with vae_tiny/, the terminal reward with the VAE."""
    from ctrl_core import steps
    from ctrl_core.latent import load_tiny_decoder

    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    sd = save_tiny_sd(tmp_path / "sd", prompts=PROMPTS)
    tiny_decoder_for(seed=3).save_pretrained(sd / TINY_DECODER_SUBFOLDER, safe_serialization=True)
    base = [f"checkpoint.source={sd}", "model.lora_rank=2", "model.guidance_scale=2.0", "reward.name=imagereward",
            f"reward.options={json.dumps(IR_OPTIONS)}", "value.candidates=[cos_sin]", "value.num_paths=8",
            "value.steps=4", "value.points_per_path=1", "value.epochs=1", "value.batch_size=8",
            "optimize.iterations=1", "optimize.batch_size=4", "optimize.train_steps=4", "optimize.train_timesteps=2",
            "optimize.minibatch_size=4", "optimize.value_batch_size=4", "optimize.lr=0.0003"]  # fmt: skip
    p = params_mod.load(None, [*base, "value.residual=reward_copy", "value.xhat_decoder=tiny",
                               "value.frozen_fraction=0.8"])  # fmt: skip
    steps.fetch(p, tmp_path / "checkpoint")
    steps.pretrain_value(p, tmp_path / "checkpoint", tmp_path / "value")
    problem = steps.load_problem(p, tmp_path / "checkpoint")
    reward = steps.make_reward_fn(p, problem)
    value = steps.load_value(p, problem, reward, tmp_path / "value")
    assert isinstance(value.residual, RewardCopyResidual)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "value" / "value.safetensors")
    assert set(saved) == {n for n, q in value.residual.named_parameters() if q.requires_grad}
    untrained = RewardCopyResidual(reward.raw.trainable_copy(PROMPTS, 0.8)).state_dict()
    assert any(not torch.equal(saved[k], untrained[k]) for k in saved)  # value pretraining trained the copy
    # the skip term's reward decodes with the tiny decoder; the terminal reward with the full VAE
    x = torch.randn(3, *problem.x_shape, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0, 1, 2]) % len(PROMPTS)
    tiny = latent_reward(
        reward.raw, load_tiny_decoder(tmp_path / "checkpoint" / TINY_DECODER_SUBFOLDER), prompts=PROMPTS
    )
    torch.testing.assert_close(value.reward_fn(x, c), tiny(x, c))
    assert not torch.allclose(value.reward_fn(x, c), reward(x, c))
    summary = steps.optimize(p, tmp_path / "checkpoint", tmp_path / "value", tmp_path / "optimize")
    assert summary["final_reward"] is not None
    assert set(load_file(tmp_path / "optimize" / "value.safetensors")) == set(saved)
    # clear errors for designs that do not apply
    with pytest.raises(ValueError, match="reward_copy copies the reward model"):
        steps.value_parts(
            params_mod.load(None, ["value.residual=reward_copy"]),
            steps.load_problem(params_mod.load(None, []), tmp_path / "checkpoint"),
            lambda x, c=None: x,
        )
    from ctrl_core.embedded import WEIGHTS_DIR

    digits = params_mod.load(None, ["value.xhat_decoder=tiny"])
    with pytest.raises(ValueError, match="applies to latent text-to-image"):
        steps.value_parts(
            digits, steps.load_problem(digits, WEIGHTS_DIR), make_reward("jpeg_compressibility")
        )
    (tmp_path / "checkpoint" / TINY_DECODER_SUBFOLDER / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tiny decoder"):
        steps.value_parts(p, steps.load_problem(p, tmp_path / "checkpoint"), reward)


@pytest.mark.parametrize("algorithm,beta,xhat,monitor,computed", [
    ("ctrl", 0.0, "policy", False, False),  # the authors' ImageReward setting: nothing needs mu_pre
    ("ctrl", 0.0, "policy", True, True),  # ... unless the KL is to be logged (the default)
    ("ctrl", 0.1, "policy", False, True),  # the KL running reward needs it
    ("ctrl", 0.0, "pretrained", False, True),  # x_hat from the pretrained score needs it
    ("ddpo", 0.0, "pretrained", False, False),
    ("ddpo", 0.0, "pretrained", True, True),
])  # fmt: skip
def test_mu_pre_is_computed_only_where_something_needs_it(algorithm, beta, xhat, monitor, computed):
    """K extra CFG UNet calls per iteration are saved where mu_pre enters nothing; the KL is then not logged
    (None), and the iteration still trains."""
    problem = gaussian_problem(torch.zeros(2), torch.ones(2))
    reward = make_reward("quadratic", target=[1.0, 0.0])
    value = ValueFunction(reward, MLPResidual(2), "cos_sin") if algorithm == "ctrl" else None
    cfg = OptimConfig(
        algorithm=algorithm,
        iterations=1,
        batch_size=8,
        train_steps=6,
        train_timesteps=3,
        minibatch_size=8,
        beta=beta,
        value_xhat=xhat,
        kl_monitor=monitor,
        advantage="temporal_difference",
        seed=2,
        lr=3e-4,
    )
    trainer = make_trainer(problem, reward, cfg, value)
    ro = trainer.rollout()
    assert bool(ro.traj.ref_means) == computed and ro.kl_measured == computed
    before = [p.detach().clone() for p in trainer.params]
    st = trainer.step()
    assert (st.kl is not None) == computed and (st.kl is None or st.kl >= 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_distilling_a_tiny_decoder_fits_the_vae_on_new_latents():
    """distill_tiny_decoder (TAESD's recipe, for a VAE with no published tiny decoder) lowers the decode error on
    latents it did not train on."""
    from ctrl_core.latent import distill_tiny_decoder
    from ctrl_core.testing import tiny_sd_components

    vae = tiny_sd_components(0)["vae"]
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(128, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    tiny = tiny_decoder_for(seed=1, width=16)

    def err() -> float:
        with torch.no_grad():
            want = vae.decode(held / vae.config.scaling_factor).sample.clamp(-1, 1)
            return float((tiny.decode(held).sample - want).pow(2).mean())

    before = err()
    stats = distill_tiny_decoder(vae, tiny, train, steps=150, generator=g)
    assert stats["mse_after"] < stats["mse_before"] / 3
    assert err() < before / 3
    assert not any(p.requires_grad for p in tiny.parameters())


def test_aesthetic_copy_starts_as_the_reward_and_trains_only_its_tail(tmp_path):
    from ctrl_core.rewards.aesthetic import write_tiny_aesthetic

    paths = write_tiny_aesthetic(tmp_path, seed=0)
    raw = make_reward(
        "aesthetic", clip_dir=str(paths["clip_dir"]), head=str(paths["head_safetensors"]), device="cpu"
    )
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    res = RewardCopyResidual(raw.trainable_copy(None, 0.7))
    out = res(torch.full((3,), 0.5), images, None)
    torch.testing.assert_close(out, raw(images), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    named = dict(res.named_parameters())
    assert all(p.grad is None for p in named.values() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values() if p.requires_grad)
    assert "copy.scorer.head.layers.7.weight" in res.state_dict()  # the head trains


def test_weighted_sum_copy_is_the_weighted_sum_of_its_terms_copies(tmp_path):
    """value.residual=reward_copy on a weighted_sum reward: F_phi = sum of w_i * copy_i over the terms with a
    network (here aesthetic and ImageReward; jpeg adds nothing), each with its own frozen share; its trainable
    weights round-trip through the state dict. A sum of networkless terms has no copy."""
    from ctrl_core.rewards.aesthetic import write_tiny_aesthetic

    paths = write_tiny_aesthetic(tmp_path, seed=0)
    aes = {"clip_dir": str(paths["clip_dir"]), "head": str(paths["head_safetensors"]), "device": "cpu"}
    raw = make_reward("weighted_sum", terms={"aesthetic": {"weight": 0.5, **aes}, "imagereward": {"weight": 2.0, **IR_OPTIONS},
                                             "jpeg_compressibility": {"weight": 1.0}})  # fmt: skip
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = torch.tensor([0, 1, 2]) % len(PROMPTS)
    res = RewardCopyResidual(raw.trainable_copy(PROMPTS, 0.7))
    s = torch.full((3,), 0.5)
    expected = 0.5 * make_reward("aesthetic", **aes)(images, c) + 2.0 * make_reward(
        "imagereward", **IR_OPTIONS
    ).bind_prompts(PROMPTS)(images, c)
    torch.testing.assert_close(res(s, images, c), expected, rtol=1e-5, atol=1e-5)
    res(s, images, c).sum().backward()
    for part in res.copy.copies:  # every term's copy trains its tail and keeps its head frozen
        named = dict(part.named_parameters())
        assert any(not p.requires_grad for p in named.values())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values() if p.requires_grad)
    with torch.no_grad():
        for p in res.parameters():
            if p.requires_grad:
                p.add_(0.01)
    fresh = RewardCopyResidual(raw.trainable_copy(PROMPTS, 0.7))
    fresh.load_state_dict(res.state_dict())
    torch.testing.assert_close(fresh(s, images, c), res(s, images, c).detach())
    assert not hasattr(
        make_reward("weighted_sum", terms={"jpeg_compressibility": {}, "quadratic": {}}), "trainable_copy"
    )


def test_link_selection_keeps_two_value_nets_at_most():
    """select_link holds the best value net so far and the one fitting, never one per candidate (each may hold a
    copy of the reward model), and returns the lowest held-out MSE's."""
    import gc
    import weakref

    from ctrl_core.recipes import collect_value_data
    from ctrl_core.value import select_link

    problem = gaussian_problem(torch.zeros(2), torch.ones(2))
    reward = make_reward("quadratic", target=[1.0, 0.0])
    data = collect_value_data(problem, reward, 32, 6, 2, seed=0)
    made, alive_at_make = [], []

    def make(link):
        gc.collect()
        alive_at_make.append(sum(r() is not None for r in made))
        v = ValueFunction(reward, MLPResidual(2), link)
        made.append(weakref.ref(v))
        return v

    links = ["cos_sin", "linear", "rm_only", "f_only"]
    sel = select_link(make, data, links, epochs=2, seed=0)
    assert max(alive_at_make) <= 1 and len(made) == 4
    gc.collect()
    assert [r() is not None for r in made].count(True) == 1 and sel.value is made[links.index(sel.chosen)]()
    assert sel.chosen == min(sel.val_mse, key=sel.val_mse.get)
