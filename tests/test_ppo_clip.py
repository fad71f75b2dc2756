"""The PPO clip of eq. 22 acts (issue 15, item 4): the real ``Trainer.surrogate_loss`` away from ratio 1.

With ``ppo_epochs: 1`` and minibatch = batch every update happens at ratio 1, where the clipped surrogate's
gradient is the plain policy gradient whatever the clip does (tests/test_maths.py checks that). Here the ratios
are moved off 1 as a later PPO pass moves them: the adapter's weights are perturbed after sampling and after the
advantages are computed, and each path's contribution is checked on its own against PPO's case analysis.

Mutations run once against these tests (the surrogate line of ``Trainer.surrogate_loss``), and what failed:

- (i) ``torch.minimum`` -> ``torch.maximum``: all four test cases here (the last by its approx KL, 3.8 in iteration 2);
- (ii) the clamp removed (surrogate = ratio * a): all four (approx KL 2.4);
- (iii) the clamp's range doubled (1 -+ 2 eps): all four (approx KL 0.31; the per-path tests through the paths
  with eps < |rho - 1| < 2 eps).

All 17 tests of tests/test_maths.py pass under each of the three (their updates are at ratio 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from ctrl_core.algorithms import OptimConfig, Trainer
from ctrl_core.models import AffineCorrection, GaussianScoreModel
from ctrl_core.policy import GaussianScorePolicy
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.schedule import LinearVPSchedule
from ctrl_core.value import MLPResidual, ValueFunction

EPS = 0.1  # the clip range of these tests


def _off_policy_trainer(batch: int = 64, perturbation: float = 0.04):
    """A CTRL trainer, one rollout with its (normalised) advantages, and then the adapter's weights perturbed:
    pi_theta is no longer pi_theta_old, as on a second PPO pass. beta = 0: the loss is the surrogate alone."""
    torch.manual_seed(0)
    sch = LinearVPSchedule()
    corr = AffineCorrection(2)
    torch.nn.init.normal_(corr.net[-1].weight, std=0.1)
    policy = GaussianScorePolicy(GaussianScoreModel(sch, torch.zeros(2), torch.ones(2), corr), "ddpm")
    reward = make_reward("quadratic", target=1.0, k=1.0)
    value = ValueFunction(reward, MLPResidual(2), "cos_sin")
    cfg = OptimConfig(batch_size=batch, train_steps=10, train_timesteps=2, beta=0.0, clip_range=EPS, lr=3e-4)
    tr = Trainer(policy, reward, cfg, (2,), value=value)
    ro = tr.rollout()
    adv, _ = tr.normalise(tr.advantages(ro))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tr.params:
            p.add_(perturbation * torch.randn(p.shape, generator=g))
    tr.policy.model.adapter_changed()
    return tr, ro, adv


def _per_path(tr: Trainer, ro, adv, k: int, i: int):
    """Path i's loss at step k, its ratio, and its gradients: of the clipped loss, and of the unclipped
    -rho a (same weight)."""
    idx = torch.tensor([i])
    loss, _, ratio = tr.surrogate_loss(ro, adv, k, idx)
    grad = torch.autograd.grad(loss, tr.params, retain_graph=True)
    unclipped = torch.autograd.grad(-(ratio * adv[k][idx]).sum() * ro.kl_scale, tr.params)
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    return float(loss.detach()), float(ratio.detach()), flat(grad), flat(unclipped)


def _expected_loss(r: float, a: float, weight: float) -> float:
    """PPO's clipped objective by cases (not by min): the clipped value where clipping makes it smaller."""
    if a > 0 and r > 1 + EPS:
        return -(1 + EPS) * a * weight
    if a < 0 and r < 1 - EPS:
        return -(1 - EPS) * a * weight
    return -r * a * weight


def test_clipped_surrogate_per_path_values_and_gradients():
    """Every path of two training steps, ratios from weights moved after sampling:
    - a > 0, rho > 1 + eps: the gradient is exactly zero (no push further up);
    - a < 0, rho < 1 - eps: exactly zero (no push further down);
    - a < 0, rho > 1 + eps: min keeps the unclipped, pessimistic -rho a, its gradient is NOT zero;
    - a > 0, rho < 1 - eps, and inside [1 - eps, 1 + eps]: the unclipped gradient.
    And each path's loss is PPO's case-by-case value. Fails under mutations (i), (ii) and (iii) (module
    docstring); (iii) through the paths with 1 + eps < rho < 1 + 2 eps or 1 - 2 eps < rho < 1 - eps."""
    tr, ro, adv = _off_policy_trainer()
    seen = {"zero_up": 0, "zero_down": 0, "pessimistic": 0, "unclipped_low": 0, "inside": 0, "band": 0}
    for k in ro.steps:
        for i in range(len(adv[k])):
            loss, r, grad, unclipped = _per_path(tr, ro, adv, k, i)
            a = float(adv[k][i])
            assert loss == pytest.approx(_expected_loss(r, a, ro.kl_scale), rel=1e-5, abs=1e-7), (k, i, r, a)
            if abs(abs(r - 1) - EPS) < 1e-4 or a == 0:
                continue  # at the clip's edge the two branches tie
            assert float(unclipped.abs().max()) > 0
            if (a > 0 and r > 1 + EPS) or (a < 0 and r < 1 - EPS):
                assert torch.all(grad == 0), (k, i, r, a)
                seen["zero_up" if a > 0 else "zero_down"] += 1
                seen["band"] += EPS < abs(r - 1) < 2 * EPS
            else:
                torch.testing.assert_close(grad, unclipped, rtol=1e-5, atol=1e-9)
                if r > 1 + EPS:  # a < 0
                    seen["pessimistic"] += 1
                elif r < 1 - EPS:  # a > 0
                    seen["unclipped_low"] += 1
                else:
                    seen["inside"] += 1
    assert all(n > 0 for n in seen.values()), seen  # every case, and the doubled-range band, was exercised


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_surrogate_at_placed_ratios(sign):
    """The old log-probs placed so the real ratios are exactly 0.5, 0.85, 0.95, 1, 1.05, 1.15, 1.5 (eps = 0.1):
    the minibatch loss is PPO's value, and the per-path gradient is zero exactly where the clip bounds the gain
    (a > 0 above 1 + eps, a < 0 below 1 - eps), the unclipped one elsewhere (a < 0 above 1 + eps included).
    Fails under mutations (i), (ii) and (iii) (0.85 and 1.15 lie in the doubled range)."""
    tr, ro, adv = _off_policy_trainer(batch=7, perturbation=0.0)
    k = ro.steps[0]
    targets = torch.tensor([0.5, 0.85, 0.95, 1.0, 1.05, 1.15, 1.5])
    idx = torch.arange(7)
    with torch.no_grad():
        logp_now = tr._log_prob(ro.traj, k, idx)[0]
    ro.traj.log_probs[k] = (logp_now.double() - targets.double().log()).to(ro.traj.log_probs[k].dtype)
    adv = {**adv, k: sign * torch.linspace(0.5, 2.0, 7)}
    loss, _, ratio = tr.surrogate_loss(ro, adv, k, idx)
    torch.testing.assert_close(ratio.detach(), targets, rtol=1e-5, atol=0)
    clipped = targets.clamp(1 - EPS, 1 + EPS)
    expected = -torch.minimum(targets * adv[k], clipped * adv[k]).sum() / 7 * ro.kl_scale
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    zero = (targets > 1 + EPS) if sign > 0 else (targets < 1 - EPS)
    for i in range(7):
        _, _, grad, unclipped = _per_path(tr, ro, adv, k, i)
        if zero[i]:
            assert torch.all(grad == 0), (float(targets[i]), sign)
        else:
            assert float(grad.abs().max()) > 0
            torch.testing.assert_close(grad, unclipped, rtol=1e-5, atol=1e-9)


def _gaussian_run(ppo_epochs: int, minibatch_size: int):
    torch.manual_seed(0)
    problem = gaussian_problem(torch.zeros(2), torch.ones(2))
    reward = make_reward("quadratic", target=[2.0, 0.0])
    value = ValueFunction(reward, MLPResidual(2), "cos_sin")
    cfg = OptimConfig(
        iterations=3,
        batch_size=32,
        train_steps=10,
        train_timesteps=4,
        minibatch_size=minibatch_size,
        ppo_epochs=ppo_epochs,
        lr=3e-3,
        seed=0,
    )
    return make_trainer(problem, reward, cfg, value).train()


def test_the_clip_acts_in_later_ppo_passes_and_bounds_the_kl():
    """The tilted Gaussian, 3 iterations of 32 paths. One pass over one minibatch: every ratio is 1 (approx KL 0,
    clipfrac 0), the clip never acts. Four epochs of four minibatches: after the first pass the ratios leave
    [1 - eps, 1 + eps] (clipfrac > 0 in every iteration) while the clip keeps the policy near pi_old (approx KL
    below 0.2; 0.1 at most here). Fails under mutations (i), (ii) and (iii): without the clip's brake the approx
    KL of iteration 2 reaches 3.8, 2.4 and 0.31."""
    for st in _gaussian_run(1, 32):
        assert st.approx_kl < 1e-10 and st.clipfrac == 0.0, st
    history = _gaussian_run(4, 8)
    for st in history:
        assert st.clipfrac > 0, st
        assert math.isfinite(st.approx_kl) and 0 < st.approx_kl < 0.2, st


def test_the_optimize_step_logs_approx_kl_and_clipfrac_per_iteration(tmp_path, monkeypatch):
    """The optimize step of the embedded default with 2 epochs of 2 minibatches: every metrics.jsonl row carries
    the iteration's approx_kl and clipfrac (named as the rows' other keys), and the summary their means over the
    run, which the register step logs to MLflow as train/approx_kl and train/clipfrac."""
    import json

    from ctrl_core import params as params_mod
    from ctrl_core import steps

    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    torch.set_num_threads(1)
    p = params_mod.load(None, ["value.num_paths=8", "value.steps=4", "value.epochs=1", "value.candidates=[cos_sin]",
                               "optimize.iterations=2", "optimize.batch_size=4", "optimize.train_steps=4",
                               "optimize.train_timesteps=2", "optimize.minibatch_size=2", "optimize.ppo_epochs=2",
                               "optimize.checkpoint_every=0"])  # fmt: skip
    steps.fetch(p, tmp_path / "checkpoint")
    steps.pretrain_value(p, tmp_path / "checkpoint", tmp_path / "value")
    summary = steps.optimize(p, tmp_path / "checkpoint", tmp_path / "value", tmp_path / "optimize")
    rows = [json.loads(line) for line in (tmp_path / "optimize" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["approx_kl"] >= 0 and 0 <= r["clipfrac"] <= 1, r
    assert rows[0]["approx_kl"] > 0  # the second minibatch and epoch see updated weights
    assert summary["approx_kl"] == pytest.approx(sum(r["approx_kl"] for r in rows) / 2)
    assert summary["clipfrac"] == pytest.approx(sum(r["clipfrac"] for r in rows) / 2)
    saved = json.loads((tmp_path / "optimize" / "metrics.json").read_text())["summary"]
    assert saved["approx_kl"] == summary["approx_kl"] and saved["clipfrac"] == summary["clipfrac"]
