"""The reward-KL front: the summary on hand-made points, the exact-KL running reward, and bench.frontier's smoke
(1 seed x 2 settings at tiny sizes, then a re-run that skips every finished point)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ctrl_core import front
from ctrl_core.algorithms import OptimConfig
from ctrl_core.policy import exact_kl_increment, kl_increment
from ctrl_core.recipes import gaussian_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.value import MLPResidual, ValueFunction


def _point(alg, value, seed, gain, kl, trajectories=100, curve=None, knob="optimize.beta"):
    p = {"alg": alg, "knob": knob, "value": value, "seed": seed, "gain_sde": gain, "gain_ode": gain,
         "gain_ci": 0.01, "kl_exact": kl, "kl_thm31": kl / 2, "trajectories": trajectories,
         "reward_calls": 10 * trajectories, "seconds": 1.0}  # fmt: skip
    if curve is not None:
        p["curve"] = curve
    return p


def test_gain_at_kl_is_the_best_seed_mean_gain_among_settings_within_the_kl_level():
    points = [
        # setting 0.1: mean gain 0.15 at mean KL 0.4; setting 0.01: mean gain 0.3 at mean KL 1.5
        _point("ctrl", 0.1, 0, 0.1, 0.3),
        _point("ctrl", 0.1, 1, 0.2, 0.5),
        _point("ctrl", 0.01, 0, 0.2, 1.0),
        _point("ctrl", 0.01, 1, 0.4, 2.0),
        _point("ddpo", 1e-3, 0, 0.05, 3.0, knob="optimize.lr"),
    ]
    summary = front.summarise(points)
    ctrl = summary["gain_at_kl"]["ctrl"]
    assert ctrl["0.25"] is None
    assert ctrl["0.5"]["value"] == 0.1 and ctrl["0.5"]["gain"] == pytest.approx(0.15)
    assert ctrl["1"]["value"] == 0.1  # 0.01's mean KL 1.5 is above 1 although one seed is at 1.0
    assert ctrl["2"]["value"] == 0.01 and ctrl["2"]["gain"] == pytest.approx(0.3)
    # 95% t interval over two seeds: 12.706 * stdev / sqrt(2)
    assert ctrl["2"]["gain_ci"] == pytest.approx(12.706 * 0.1414214 / 2**0.5, rel=1e-5)
    assert summary["gain_at_kl"]["ddpo"]["2"] is None and summary["gain_at_kl"]["ddpo"]["4"]["seeds"] == [0]
    assert set(summary["gain_at_kl"]["ctrl"]) == {"0.25", "0.5", "1", "2", "4"}


def test_trajectories_to_reach_reads_the_first_snapshot_at_the_reference_gain_and_is_null_when_never_reached():
    def curve(gains, kls):
        return [{"iteration": 10 * (i + 1), "trajectories": 100 * (i + 1), "reward_calls": 0, "gain_sde": g,
                 "gain_ci": 0.0, "kl_exact": k} for i, (g, k) in enumerate(zip(gains, kls, strict=True))]  # fmt: skip

    points = [
        # DDPO's best gain at KL <= 1: 0.2 (its end, 300 trajectories)
        _point("ddpo", 1e-3, 0, 0.2, 0.9, 300, curve([0.05, 0.1, 0.2], [0.3, 0.6, 0.9]), knob="optimize.lr"),
        _point("ddpo", 1e-2, 0, 0.5, 3.0, 300, curve([0.3, 0.4, 0.5], [1.5, 2.0, 3.0]), knob="optimize.lr"),
        # CTRL reaches 0.2 at its second snapshot within KL 1; its first snapshot's 0.25 is at KL 1.2: not counted
        _point("ctrl", 0.01, 0, 0.3, 1.0, 300, curve([0.1, 0.25, 0.3], [0.5, 0.8, 1.0])),
        _point("ctrl", 0.001, 0, 0.6, 4.0, 300, curve([0.25, 0.5, 0.6], [1.2, 2.0, 4.0])),
        # GRPO never gets there within KL 1
        _point(
            "grpo", 0.0, 0, 0.19, 0.5, 300, curve([0.1, 0.15, 0.19], [0.2, 0.4, 0.5]), knob="optimize.grpo_kl"
        ),
    ]
    summary = front.summarise(points)
    assert summary["reach_target"]["gain"] == pytest.approx(0.2)
    assert summary["trajectories_to_reach"] == {"ctrl": 200, "ddpo": 300, "grpo": None}
    assert front.summarise([p for p in points if p["alg"] != "ddpo"])["trajectories_to_reach"] == {
        "ctrl": None,
        "grpo": None,
    }


def test_kl_form_exact_makes_the_running_reward_the_exact_per_step_kl():
    """On a DDPM chain the discrete step's Gaussian KL and Theorem 3.1's rate differ; kl_form picks which one is
    the running reward (and the KL the trainer logs)."""
    torch.manual_seed(0)
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), solver="ddpm")
    torch.nn.init.normal_(problem.policy.model.correction.net[-1].weight, std=0.3)
    reward = make_reward("quadratic", target=[1.0, 0.0])
    terms = {}
    for form in ("continuous", "exact"):
        cfg = OptimConfig(solver="ddpm", iterations=1, batch_size=8, train_steps=6, train_timesteps=3, seed=1,
                          kl_form=form)  # fmt: skip
        trainer = make_trainer(problem, reward, cfg, ValueFunction(reward, MLPResidual(2), "cos_sin"))
        ro = trainer.rollout()
        pol, traj = trainer.policy, ro.traj
        for k in ro.steps:
            s, s_next = float(traj.grid[k]), float(traj.grid[k + 1])
            mu, ref = traj.means[k].double(), traj.ref_means[k].double()
            expected = (
                exact_kl_increment(pol.coefficients(s, s_next), mu, ref)
                if form == "exact"
                else kl_increment(pol.schedule, s, s_next, mu, ref)
            )
            torch.testing.assert_close(ro.kl_terms[k], expected.float())
        assert all(float(ro.kl_terms[k].abs().max()) > 0 for k in ro.steps)
        terms[form] = ro.kl_terms
    assert any(not torch.allclose(terms["exact"][k], terms["continuous"][k]) for k in terms["exact"])
    with pytest.raises(ValueError, match="kl_form"):
        OptimConfig(kl_form="discrete")


def test_the_frontier_smoke_writes_its_points_and_a_rerun_skips_them(tmp_path):
    out, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    argv = ["--quick", "--seeds", "0", "--algorithms", "ctrl,ddpo", "--knob", "ctrl=optimize.beta:0.1,0.01",
            "--knob", "ddpo=optimize.lr:0.001,0.01", "--eval-samples", "8", "--snapshot-every", "1",
            "--json", str(out), "--plot", str(png)]  # fmt: skip
    from bench.frontier import main

    doc = main(argv)
    assert doc["ran"] == 4 and doc["skipped"] == 0 and not doc["failed"]
    on_disk = json.loads(out.read_text())
    assert png.stat().st_size > 0
    types = {"alg": str, "knob": str, "value": float, "seed": int, "gain_sde": float, "gain_ode": float,
             "gain_ci": float, "kl_exact": float, "kl_thm31": float, "trajectories": int, "reward_calls": int,
             "seconds": float}  # fmt: skip
    for p in on_disk["points"]:
        for key, typ in types.items():
            assert isinstance(p[key], typ), (key, p[key])
        assert [c["iteration"] for c in p["curve"]] == [1, 2]
    ctrl = [p for p in on_disk["points"] if p["alg"] == "ctrl"]
    ddpo = [p for p in on_disk["points"] if p["alg"] == "ddpo"]
    # CTRL's 8 value-pretraining paths count, and its value net's RM(x_hat) calls: more reward calls than paths
    assert {p["trajectories"] for p in ctrl} == {8 + 2 * 8} and {p["trajectories"] for p in ddpo} == {2 * 8}
    assert all(p["reward_calls"] > p["trajectories"] for p in ctrl)
    assert {p["reward_calls"] for p in ddpo} == {2 * 8}  # one terminal reward per rollout path
    for alg in ("ctrl", "ddpo"):
        assert set(on_disk["gain_at_kl"][alg]) == {"0.25", "0.5", "1", "2", "4"}
    assert set(on_disk["trajectories_to_reach"]) == {"ctrl", "ddpo"}

    t0 = time.perf_counter()
    again = main(argv)
    assert again["ran"] == 0 and again["skipped"] == 4 and time.perf_counter() - t0 < 10
    assert json.loads(out.read_text())["points"] == on_disk["points"]
    # a grid without beta 0.01 leaves its point out of the summary (kept aside, back when the grid has it again)
    narrower = main([*argv, "--knob", "ctrl=optimize.beta:0.1"])
    assert narrower["ran"] == 0 and [p["value"] for p in narrower["off_grid_points"]] == [0.01]
    assert {r["value"] for r in narrower["settings"] if r["alg"] == "ctrl"} == {0.1}
    assert main(argv)["ran"] == 0 and len(json.loads(out.read_text())["points"]) == 4
    # a changed setup does not mix with the old points: they are set aside and the new ones run
    changed = main([*argv[:-4], "--knob", "ctrl=optimize.beta:0.1", "--algorithms", "ctrl", "--set",
                    "optimize.lr=0.002", "--json", str(out)])  # fmt: skip
    assert changed["ran"] == 1 and len(changed["superseded_points"]) == 2
    assert sorted(p["alg"] for p in changed["points"]) == ["ctrl", "ddpo", "ddpo"]
