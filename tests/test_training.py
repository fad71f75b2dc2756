"""CTRL really trains: the tilted-Gaussian closed form, and reward gains on the embedded default."""

from __future__ import annotations

import pytest
import torch

from bench import tilted_gaussian
from ctrl_core.algorithms import OptimConfig
from ctrl_core.evaluate import evaluate
from ctrl_core.recipes import digits_problem, make_trainer, pretrain_value
from ctrl_core.rewards import make_reward


@pytest.mark.slow
def test_ctrl_reaches_the_tilted_gaussian_optimum():
    """Data N(0, 1), exact score, RM = -0.5 (x - 2)^2, beta = 2: p* = N(2/3, 2/3). Within 5% in mean and std
    (the mean's error relative to the optimum's scale, max(|mean|, std))."""
    out = tilted_gaussian.run(
        dim=1,
        data_mean="0",
        data_std="1",
        target="2",
        k=0.5,
        beta=2.0,
        iterations=TILTED_ITERS,
        seed=0,
        eval_steps=200,
        eval_samples=8192,
    )
    assert out["rel_error_mean"][0] < 0.05, out
    assert out["rel_error_std"][0] < 0.05, out
    assert out["max_rel_error"] < 0.05


TILTED_ITERS = 80


@pytest.mark.slow
def test_ctrl_raises_reward_on_the_embedded_default_at_several_step_counts():
    torch.manual_seed(0)
    problem = digits_problem(lora_rank=4)
    reward = make_reward("jpeg_compressibility")
    sel = pretrain_value(
        problem, reward, ["linear", "rm_only"], num_paths=64, steps=10, points_per_path=4, epochs=5
    )
    assert set(sel.val_mse) == {"linear", "rm_only"} and sel.chosen in sel.val_mse
    cfg = OptimConfig(
        iterations=DIGITS_ITERS,
        batch_size=32,
        train_steps=20,
        train_timesteps=8,
        minibatch_size=32,
        lr=1e-3,
        beta=0.01,
    )
    trainer = make_trainer(problem, reward, cfg, sel.value)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([h.reward_mean, h.kl])).all() for h in history)
    results, _ = evaluate(
        trainer.policy, reward, problem.x_shape, [10, 20, 40], ["sde"], 100, problem.eval_conditions
    )
    for steps, cell in results["sde"].items():
        # a real improvement at the training count (20) and at two others: the gain's 95% CI excludes zero
        # and the gain is at least 0.02 (2 bytes of JPEG per 8x8 image, against a base-model spread of ~60)
        assert cell.gain > max(cell.gain_ci, 0.02), (steps, cell)
        assert cell.kl < 5.0, (steps, cell)  # bounded: the KL penalty holds the model near the base


DIGITS_ITERS = 25


def test_chunked_rollout_scores_in_a_worker_thread_and_changes_no_path():
    """optimize.reward_chunks: blocks of rows are sampled one after another while a worker thread scores the
    previous block; the paths, rewards and the generator's next draws equal one full-batch rollout."""
    import threading

    from ctrl_core.algorithms import sample_and_score

    problem = digits_problem(lora_rank=2)
    scorer_threads: list[str] = []
    jpeg = make_reward("jpeg_compressibility")

    def reward(x, c):
        scorer_threads.append(threading.current_thread().name)
        return jpeg(x, c)

    grid = problem.policy.schedule.time_grid(6)
    out = {}
    for chunks in (1, 3):
        g = torch.Generator().manual_seed(5)
        x0, c = torch.randn((7, *problem.x_shape), generator=g), problem.condition_sampler(7, g)
        traj, r = sample_and_score(problem.policy, reward, x0, c, grid, g, [1, 4], (7, slice(0, 7)), chunks)
        out[chunks] = (traj, r, torch.rand(3, generator=g))
    (t1, r1, next1), (t3, r3, next3) = out[1], out[3]
    torch.testing.assert_close(t3.states, t1.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t3.log_probs, t1.log_probs, atol=1e-3, rtol=1e-4)
    assert set(t3.ref_means) == {1, 4} and t3.ref_means[4].shape == t1.ref_means[4].shape
    torch.testing.assert_close(r3, r1)
    assert torch.equal(next3, next1)  # the generator ends where the full-batch rollout leaves it
    assert scorer_threads[0] == threading.current_thread().name  # chunks = 1: scored in place
    assert len(scorer_threads) == 4 and all(n.startswith("reward") for n in scorer_threads[1:])
    with pytest.raises(ValueError, match="optimize.reward_chunks"):
        OptimConfig(batch_size=4, reward_chunks=5)


def test_value_data_reuses_the_advantages_reward_calls():
    """CTRL evaluates RM(x_hat) at each training step's state for the advantage and again for the value data
    set; the second is shared: per iteration 1 terminal + 2 K reward batches (finite difference), not 1 + 3 K,
    and the data set is the one computed from scratch."""
    from ctrl_core.recipes import gaussian_problem
    from ctrl_core.value import MLPResidual

    problem = gaussian_problem(torch.zeros(2), torch.ones(2))
    calls = []
    quad = make_reward("quadratic", target=[1.0, 0.0])

    def reward(x, c=None):
        calls.append(len(x))
        return quad(x, c)

    from ctrl_core.value import ValueFunction

    value = ValueFunction(reward, MLPResidual(2), "cos_sin")
    cfg = OptimConfig(
        iterations=1, batch_size=16, train_steps=10, train_timesteps=4, minibatch_size=16, seed=3, lr=3e-4
    )
    trainer = make_trainer(problem, reward, cfg, value)
    ro = trainer.rollout()
    calls.clear()
    trainer.advantages(ro)
    assert len(calls) == 2 * 4 and set(ro.rm_xhat) == set(ro.steps)
    shared = trainer.value_dataset(ro)
    assert len(calls) == 2 * 4  # no reward call for the value data set
    ro.rm_xhat.clear()
    fresh = trainer.value_dataset(ro)
    assert len(calls) == 3 * 4
    for name in ("s", "x", "x_hat", "rm_x_hat", "returns"):
        torch.testing.assert_close(getattr(shared, name), getattr(fresh, name))
