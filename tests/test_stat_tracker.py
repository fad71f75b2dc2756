"""DDPO's per-prompt reward statistics across iterations (issue 7 item 4): ``algorithms.PromptStatTracker``.

The reference is kvablack/ddpo-pytorch's ``PerPromptStatTracker`` (ddpo_pytorch/stat_tracking.py), written here
as it is there (numpy, a deque per prompt, population std + 1e-6) and keyed by prompt index instead of text."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from ctrl_core.algorithms import OptimConfig, PromptStatTracker, Trainer
from ctrl_core.recipes import gaussian_problem
from ctrl_core.resume import CheckpointStore
from ctrl_core.rewards import make_reward


class DDPOPerPromptStatTracker:
    def __init__(self, buffer_size, min_count):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean = np.mean(rewards)
                std = np.std(rewards) + 1e-6
            else:
                mean = np.mean(self.stats[prompt])
                std = np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


@pytest.mark.parametrize("buffer_size,min_count", [(16, 16), (8, 4), (32, 6)])
def test_tracker_matches_ddpo_pytorch(buffer_size, min_count):
    g = torch.Generator().manual_seed(buffer_size)
    ours, ref = PromptStatTracker(buffer_size, min_count), DDPOPerPromptStatTracker(buffer_size, min_count)
    used_buffer = False
    for it in range(12):
        n = int(torch.randint(8, 40, (1,), generator=g))
        prompts = torch.randint(0, 5, (n,), generator=g)
        # per-prompt offsets that drift over iterations: the buffer's statistics differ from the batch's
        rewards = torch.randn(n, generator=g, dtype=torch.float64) + prompts.double() * 0.7 + 0.1 * it
        got = ours.update(rewards, prompts)
        want = ref.update(prompts.numpy(), rewards.numpy())
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        batch = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        used_buffer |= not torch.allclose(got, batch)
        assert all(len(b) <= buffer_size for b in ours.buffers.values())
    assert used_buffer  # the per-prompt branch was exercised, not only the batch fallback


def test_tracker_without_labels_whitens_the_batch():
    r = torch.tensor([1.0, 2.0, 4.0, 7.0])
    t = PromptStatTracker(4, 2)
    want = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    assert torch.allclose(t.update(r, None), want)
    assert torch.allclose(t.update(r, torch.randn(4, 3)), want)  # embeddings, not labels
    assert t.buffers == {}


def _ddpo_trainer(seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), hidden=16)
    reward = make_reward("quadratic", target=[1.0, 0.5])
    cfg = OptimConfig(
        algorithm="ddpo",
        iterations=6,
        batch_size=12,
        train_steps=5,
        train_timesteps=3,
        minibatch_size=12,
        lr=1e-2,
        seed=seed,
        **kw,
    )
    # three "prompts": the Gaussian model ignores them, the tracker keys its statistics by them
    return Trainer(
        problem.policy, reward, cfg, problem.x_shape, lambda n, g: torch.randint(0, 3, (n,), generator=g)
    )


def _flat(tr: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in tr.params])


def test_ddpo_with_the_tracker_resumes_bitwise_and_differs_from_batch_whitening(tmp_path):
    whole = _ddpo_trainer(stat_buffer=8, stat_min_count=4)
    whole.train()
    assert sorted(whole.stat_tracker.buffers) == [0, 1, 2]
    assert all(len(b) == 8 for b in whole.stat_tracker.buffers.values())
    first = _ddpo_trainer(stat_buffer=8, stat_min_count=4)
    for _ in range(3):
        first.step()
    store = CheckpointStore(tmp_path, "optimize", "k")
    store.save(first.iteration, first.state_dict())
    resumed = _ddpo_trainer(stat_buffer=8, stat_min_count=4)
    resumed.load_state_dict(store.latest()[1])
    resumed.train()
    assert torch.equal(_flat(resumed), _flat(whole))
    # the tracker's state matters: resuming without it gives other weights
    forgetful = _ddpo_trainer(stat_buffer=8, stat_min_count=4)
    state = dict(store.latest()[1])
    state.pop("stat_tracker")
    forgetful.load_state_dict(state)
    forgetful.train()
    assert not torch.equal(_flat(forgetful), _flat(whole))
    within_batch = _ddpo_trainer(stat_buffer=0)  # (the default is ddpo-pytorch's 16)
    within_batch.train()
    assert within_batch.stat_tracker is None and not torch.equal(_flat(within_batch), _flat(whole))


def test_tracker_settings_are_validated():
    with pytest.raises(ValueError, match="optimize.stat_min_count: must be <= optimize.stat_buffer"):
        OptimConfig(algorithm="ddpo", stat_buffer=8, stat_min_count=16)
    with pytest.raises(ValueError, match="optimize.stat_buffer: must be >= 0"):
        OptimConfig(stat_buffer=-1)
    assert _ddpo_trainer(stat_buffer=16).stat_tracker is not None
    ctrl = OptimConfig(algorithm="ctrl", stat_buffer=16)  # CTRL's advantage comes from the value net: unused
    assert ctrl.stat_buffer == 16
