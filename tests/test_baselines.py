"""The baselines as their authors run them (issue 15 item 1), in CTRL's trainer.

DDPO is kvablack/ddpo-pytorch's recipe and GRPO Flow-GRPO's (yifan123/flow_grpo) on a DDPM-type solver. The
references below are written as those repositories compute: Flow-GRPO's ``PerPromptStatTracker.update`` (type
grpo), its KL loss ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dims) / (2 * std_dev_t ** 2)`` and
ddpo-pytorch's ``ddim_step_with_logprob`` log-prob (``mean`` over all but the batch dimension)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctrl_core.algorithms import OptimConfig, Trainer, group_relative_advantages
from ctrl_core.params import ParamsError, validate
from ctrl_core.policy import gaussian_log_prob
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward


def flow_grpo_advantages(prompts, rewards):
    """flow_grpo/stat_tracking.py, PerPromptStatTracker(global_std=False).update(prompts, rewards, 'grpo')."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        stats = rewards[prompts == prompt]
        advantages[prompts == prompt] = (stats - np.mean(stats)) / (np.std(stats) + 1e-4)
    return advantages


def _trainer(algorithm: str, seed: int = 0, classes: int = 3, **kw) -> Trainer:
    """A 2-D Gaussian model with an affine correction (zero at the start, as LoRA) and a quadratic reward;
    ``classes`` labels that the model ignores and the baselines group by."""
    torch.manual_seed(seed)
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), solver="ddpm", hidden=16)
    problem = dataclasses.replace(
        problem, condition_sampler=lambda n, g: torch.randint(0, classes, (n,), generator=g)
    )
    cfg = OptimConfig(**{"iterations": 3, "batch_size": 12, "train_steps": 6, "lr": 1e-2, **kw},
                      algorithm=algorithm, seed=seed)  # fmt: skip
    return make_trainer(problem, make_reward("quadratic", target=[1.0, 0.5]), cfg, None)


def test_group_relative_advantages_are_flow_grpos_with_groups_in_any_order():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(24) // 6
    groups = groups[torch.randperm(24, generator=g)]  # interleaved, as the rows of a shuffled batch
    rewards = torch.randn(24, generator=g, dtype=torch.float64) * 3 + groups.double()
    got = group_relative_advantages(rewards, groups)
    want = flow_grpo_advantages(groups.numpy(), rewards.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    for j in range(4):  # centred per group, not per batch
        assert abs(float(got[groups == j].mean())) < 1e-12
    # a group whose rewards are all equal has advantage 0 (the 1e-4 keeps it finite)
    flat = group_relative_advantages(torch.tensor([2.0, 2.0, 1.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert flat[:2].tolist() == [0.0, 0.0] and flat[2] < 0 < flat[3]


def test_grpo_rollout_samples_group_size_paths_per_condition_and_uses_their_advantages():
    tr = _trainer("grpo", group_size=4, classes=100)
    ro = tr.rollout()
    c = ro.traj.conditions
    assert torch.equal(c, c[::4].repeat_interleave(4))  # batch_size / G conditions, G rows each
    assert len(c[::4].unique()) > 1
    adv = tr.advantages(ro)
    want = flow_grpo_advantages(np.arange(12) // 4, ro.reward.double().numpy())  # grouped by position
    for k in ro.steps:
        np.testing.assert_allclose(adv[k].numpy(), want, rtol=1e-5, atol=1e-6)


def test_grpo_kl_loss_is_the_closed_form_gaussian_kl_per_dimension_and_zero_at_initialisation():
    tr = _trainer("grpo", group_size=4)
    ro = tr.rollout()
    k = ro.steps[2]
    idx = torch.arange(12)
    s = torch.full((12,), float(ro.traj.grid[k]), dtype=torch.float64)
    x = ro.traj.states[k]
    mu = tr.policy.mean(s, x, None)
    # zero-initialised correction: the policy is the reference, and the KL loss is exactly 0
    assert torch.equal(mu, ro.traj.ref_means[k])
    assert torch.equal(
        tr.kl_to_reference(ro.traj, k, mu, ro.traj.ref_means[k]), torch.zeros(12, dtype=torch.float64)
    )
    # moved away from the reference: Flow-GRPO's formula on the transition means, and the KL of the two Gaussian
    # kernels N(m, std^2 I) per dimension
    mu_ref = mu + 0.3 * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    coef = tr.policy.coefficients(float(ro.traj.grid[k]), float(ro.traj.grid[k + 1]))
    m, m_ref = tr.policy.transition_mean(coef, x, mu), tr.policy.transition_mean(coef, x, mu_ref)
    flow_grpo = ((m.double() - m_ref.double()) ** 2).mean(dim=1) / (2 * coef.std**2)
    std = coef.std.expand(m.shape)
    closed_form = torch.distributions.kl_divergence(
        torch.distributions.Normal(m.double(), std), torch.distributions.Normal(m_ref.double(), std)
    ).mean(dim=1)
    got = tr.kl_to_reference(ro.traj, k, mu, mu_ref)
    torch.testing.assert_close(got, flow_grpo, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, closed_form, rtol=1e-5, atol=0)
    # in the loss with weight grpo_kl: the loss moves by grpo_kl * mean over paths * 1/K
    adv = {j: torch.zeros(12) for j in ro.steps}
    loss_ref, _, _ = tr.surrogate_loss(ro, adv, k, idx)
    ro.traj.ref_means[k] = mu_ref
    loss_moved, _, _ = tr.surrogate_loss(ro, adv, k, idx)
    want = tr.cfg.grpo_kl * float(got.detach().mean()) / len(ro.steps)
    assert float(loss_moved - loss_ref) == pytest.approx(want, rel=1e-5)


def test_mean_log_prob_is_ddpo_pytorchs_and_divides_the_log_ratio_by_the_dimension():
    g = torch.Generator().manual_seed(0)
    x_next, mean = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    std = torch.tensor(0.7, dtype=torch.float64)
    # ddpo_pytorch/diffusers_patch/ddim_with_logprob.py
    ddpo = (
        -((x_next.detach() - mean) ** 2) / (2 * (std.float() ** 2))
        - torch.log(std.float())
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std) / 48, ddpo, rtol=1e-5, atol=1e-6)

    summed, averaged = _trainer("ddpo", log_prob_reduce="sum"), _trainer("ddpo", log_prob_reduce="mean")
    assert summed.log_prob_dims is None and averaged.log_prob_dims == 2
    new, old = torch.tensor([-3.0, -1.0]), torch.tensor([-3.5, -0.2])
    assert torch.equal(summed.log_ratio(new, old), new - old)
    assert torch.equal(averaged.log_ratio(new, old), (new - old) / 2)
    # in the surrogate: away from pi_old, the averaged ratio is the summed one to the power 1/d
    ro = averaged.rollout()
    with torch.no_grad():
        for p in averaged.params:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    averaged.policy.model.adapter_changed()
    adv, idx, k = {j: torch.ones(12) for j in ro.steps}, torch.arange(12), ro.steps[1]
    _, logp, ratio_mean = averaged.surrogate_loss(ro, adv, k, idx)
    averaged.log_prob_dims = None
    _, _, ratio_sum = averaged.surrogate_loss(ro, adv, k, idx)
    assert not torch.allclose(ratio_sum, torch.ones(12), atol=1e-3)
    torch.testing.assert_close(ratio_mean, ratio_sum.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio_mean.log(), (logp - ro.traj.log_probs[k]) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"optimize": {"algorithm": "grpo", "batch_size": 12, "group_size": 8}},
            "optimize.group_size: must be a divisor of optimize.batch_size (12) for GRPO",
        ),
        ({"optimize": {"algorithm": "grpo", "group_size": 1}}, "optimize.group_size: must be >= 2"),
        (
            {"optimize": {"algorithm": "reinforce"}},
            "optimize.algorithm: must be one of ('ctrl', 'ddpo', 'grpo'",
        ),
        ({"optimize": {"grpo_kl": -0.1}}, "optimize.grpo_kl: must be >= 0"),
        ({"optimize": {"log_prob_reduce": "max"}}, "optimize.log_prob_reduce: must be one of"),
        ({"optimize": {"clip_range": 0}}, "optimize.clip_range: must be > 0, or -1"),
        ({"optimize": {"train_timesteps": -2}}, "optimize.train_timesteps: must be >= 0, or -1"),
    ],
)
def test_config_errors_name_their_key(raw, message):
    with pytest.raises(ParamsError) as err:
        validate(raw)
    assert message in str(err.value)


def test_ctrl_resolves_to_the_old_defaults_and_the_baselines_to_their_authors():
    ctrl = OptimConfig().resolved()
    assert (ctrl.train_timesteps, ctrl.clip_range, ctrl.log_prob_reduce, ctrl.minibatch_size) == (
        8,
        0.2,
        "sum",
        32,
    )
    ddpo = OptimConfig(algorithm="ddpo").resolved()
    assert (ddpo.train_timesteps, ddpo.clip_range, ddpo.log_prob_reduce, ddpo.minibatch_size) == (
        0,
        1e-4,
        "mean",
        8,
    )
    assert (ddpo.stat_buffer, ddpo.stat_min_count, ddpo.advantage_clip) == (16, 16, 5.0)
    grpo = OptimConfig(algorithm="grpo").resolved()
    assert (grpo.train_timesteps, grpo.clip_range, grpo.log_prob_reduce, grpo.minibatch_size) == (
        0,
        1e-4,
        "mean",
        16,
    )
    # a key the user set is kept; the clip range follows the reduction
    own = OptimConfig(algorithm="ddpo", train_timesteps=3, log_prob_reduce="sum", minibatch_size=5).resolved()
    assert (own.train_timesteps, own.clip_range, own.log_prob_reduce, own.minibatch_size) == (
        3,
        0.2,
        "sum",
        5,
    )
    assert OptimConfig(algorithm="ddpo", clip_range=0.01).resolved().clip_range == 0.01


def test_faithful_ddpo_trains_every_stochastic_step_in_several_minibatches():
    tr = _trainer("ddpo", iterations=1)
    ro = tr.rollout()
    stochastic = [k for k in range(6) if bool(ro.traj.stochastic[k])]
    assert ro.steps == stochastic and len(stochastic) == 5  # all but the deterministic last step into s = 0
    ctrl_like = _trainer("ddpo", iterations=1, train_timesteps=2)
    assert len(ctrl_like.rollout().steps) == 2
    # advantages clipped at +-5 as ddpo-pytorch does (a reward outlier whitened beyond it)
    adv, scale = tr.normalise({0: torch.tensor([9.0, -7.0, 1.0])})
    assert adv[0].tolist() == [5.0, -5.0, 1.0] and scale == 1.0
    # ddpo-pytorch's several optimiser steps per iteration: batch 12 in minibatches of 3 is 4 AdamW steps
    tr = _trainer("ddpo", iterations=1)
    tr.step()
    assert all(int(s["step"]) == 4 for s in tr.opt.state.values())
    grpo = _trainer("grpo", iterations=1, group_size=4)
    grpo.step()
    assert all(int(s["step"]) == 2 for s in grpo.opt.state.values())


def test_grpo_trains_the_reward_up():
    tr = _trainer(
        "grpo", iterations=12, group_size=4, batch_size=32, lr=3e-2, clip_range=0.2, log_prob_reduce="sum"
    )
    first = tr.rollout().reward.mean()
    hist = tr.train()
    assert all(h.kl is not None for h in hist)  # mu_ref computed for the KL loss, so the KL is logged too
    assert float(np.mean([h.reward_mean for h in hist[-3:]])) > float(first) + 0.1


def test_grpo_optimize_step_resumes_bitwise(tmp_path, monkeypatch):
    """The optimize step of the embedded digits model with algorithm grpo (no value net): a run preempted after
    its first checkpoint and resumed ends with bitwise the adapter of an unbroken run."""
    from ctrl_core import params as params_mod
    from ctrl_core import steps

    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    torch.set_num_threads(1)
    p = params_mod.load(None, ["optimize.algorithm=grpo", "optimize.iterations=3", "optimize.batch_size=4",
                               "optimize.group_size=2", "optimize.train_steps=3", "optimize.checkpoint_every=1",
                               "optimize.lr=0.003"])  # fmt: skip
    steps.fetch(p, tmp_path / "checkpoint")
    whole = steps.optimize(p, tmp_path / "checkpoint", None, tmp_path / "whole")
    assert whole["algorithm"] == "grpo" and whole["resumed_from_iteration"] is None

    def preempted(row: dict) -> None:
        if row["iteration"] == 0:
            raise KeyboardInterrupt  # the pod goes after checkpoint 1

    with pytest.raises(KeyboardInterrupt):
        steps.optimize(p, tmp_path / "checkpoint", None, tmp_path / "resumed", progress=preempted)
    resumed = steps.optimize(p, tmp_path / "checkpoint", None, tmp_path / "resumed")
    assert resumed["resumed_from_iteration"] == 1
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(float(t.abs().max()) > 0 for n, t in a.items() if "lora_B" in n)  # it trained
    assert resumed["final_reward"] == whole["final_reward"]
