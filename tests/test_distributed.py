"""Several processes inside one step (issue 4 item 3): torchrun + gloo on the CPU stands in for one process per GPU.

The two-process run must equal the one-process run with the same global batch (up to float summation order),
and every rank must hold bitwise the same weights (the step itself refuses to finish otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctrl_core.algorithms import OptimConfig, Trainer
from ctrl_core.distributed import Dist
from ctrl_core.recipes import gaussian_problem
from ctrl_core.rewards import make_reward

PARAMS = {
    "value": {
        "candidates": ["linear"],
        "num_paths": 32,
        "steps": 8,
        "points_per_path": 2,
        "epochs": 2,
        "batch_size": 16,
    },
    "optimize": {
        "iterations": 3,
        "batch_size": 8,
        "train_steps": 8,
        "train_timesteps": 3,
        "minibatch_size": 4,
        "checkpoint_every": 1,
        "value_batch_size": 16,
        "lr": 3e-4,
    },
}


def _ctrl_step(work: Path, *args: str, processes: int = 1, launcher: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CTRL_CHECKPOINT_ROOT": str(work / f"ckpt-{processes}{launcher}"),
        "CTRL_LAUNCHER": launcher,
    }
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "step",
        *args,
        "--params",
        str(work / "params.yaml"),
        "--checkpoint",
        str(work / "checkpoint"),
        "--num-processes",
        str(processes),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors. Not elementwise: Adam divides each gradient element by its own running
    RMS, so an element whose gradient is ~0 turns float-summation noise into a full-size (lr) step; elementwise
    differences of a few lr are expected, the whole update agrees to ~1e-4 (measured)."""
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (num / sum(float(a[k].double().pow(2).sum()) for k in a)) ** 0.5


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _ctrl_step(tmp_path, "fetch")
    # value pretraining: data sampled in shards and gathered, value-net gradients all-reduced
    _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "v1"))
    res = _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "v2"), processes=2)
    assert "launching 2 processes" in res.stderr
    v1, v2 = (
        load_file(str(tmp_path / "v1" / "value.safetensors")),
        load_file(str(tmp_path / "v2" / "value.safetensors")),
    )
    assert _rel_diff(v1, v2) < 1e-3
    m1 = json.loads((tmp_path / "v1" / "link.json").read_text())["mse"]["linear"]
    m2 = json.loads((tmp_path / "v2" / "link.json").read_text())["mse"]["linear"]
    assert m2 == pytest.approx(m1, rel=1e-4)
    # CTRL: LoRA gradients all-reduced; both start from the same value net
    _ctrl_step(tmp_path, "optimize", "--value", str(tmp_path / "v1"), "--optimize-dir", str(tmp_path / "o1"))
    _ctrl_step(
        tmp_path,
        "optimize",
        "--value",
        str(tmp_path / "v1"),
        "--optimize-dir",
        str(tmp_path / "o2"),
        processes=2,
    )
    s2 = json.loads((tmp_path / "o2" / "metrics.json").read_text())["summary"]
    assert s2["processes"] == 2 and s2["ranks_identical"] is True
    a1 = load_file(str(tmp_path / "o1" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "o2" / "adapter" / "adapter_model.safetensors"))
    # lora_B starts at zero, so these tensors are the update itself (lora_A is mostly its random init)
    b1, b2 = ({k: t for k, t in a.items() if "lora_B" in k} for a in (a1, a2))
    assert sum(float(t.abs().sum()) for t in b1.values()) > 0  # the adapter did move
    assert _rel_diff(b1, b2) < 1e-3, "two ranks must reproduce the one-process update"
    h1 = json.loads((tmp_path / "o1" / "metrics.json").read_text())["history"]
    h2 = json.loads((tmp_path / "o2" / "metrics.json").read_text())["history"]
    assert [r["reward_mean"] for r in h2] == pytest.approx([r["reward_mean"] for r in h1], rel=1e-4)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_data_parallel_step_as_torchrun(tmp_path):
    """``accelerate launch --multi_gpu`` (CTRL_LAUNCHER=accelerate) starts the same ranks as torchrun: the
    two-process value pretraining gives bitwise the same value net either way."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _ctrl_step(tmp_path, "fetch")
    res = _ctrl_step(
        tmp_path, "pretrain_value", "--value", str(tmp_path / "acc"), processes=2, launcher="accelerate"
    )
    assert "accelerate.commands.launch" in res.stderr and "launching 2 processes" in res.stderr
    _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "tr"), processes=2, launcher="torchrun")
    a, t = (load_file(str(tmp_path / d / "value.safetensors")) for d in ("acc", "tr"))
    assert a.keys() == t.keys() and all(torch.equal(a[k], t[k]) for k in a)
    one = load_file(
        str(
            _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "one"))
            and tmp_path / "one" / "value.safetensors"
        )
    )
    assert _rel_diff(one, a) < 1e-3 and any(not torch.equal(one[k], a[k]) for k in a)  # really 2 processes


def test_global_batch_must_split_over_the_processes():
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), hidden=8)
    cfg = OptimConfig(algorithm="ddpo", batch_size=10, minibatch_size=5, train_steps=25, lr=3e-4)
    with pytest.raises(
        ValueError, match=r"optimize.batch_size \(10\) must be a multiple of the number of processes \(3\)"
    ):
        Trainer(problem.policy, make_reward("quadratic"), cfg, problem.x_shape, dist=Dist(rank=0, world=3))
    assert Dist(rank=1, world=4).shard(8) == slice(2, 4)


@pytest.mark.slow
def test_qlearning_two_processes_equal_one_process(tmp_path):
    """q-learning data-parallel, as CTRL: ranks draw the global batch's random numbers (class conditions, ratio
    estimator samples, noise, permutations), compute their own paths and sum critic and actor gradients. With a
    class-conditional data set, subsampled ratio estimates and the actor's delta clip (a global statistic)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (120,), generator=g)
    data = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])[labels] + 0.3 * torch.randn((120, 2), generator=g)
    (tmp_path / "dataset").mkdir()
    save_file({"data": data, "labels": labels}, str(tmp_path / "dataset" / "data.safetensors"))
    raw = {"checkpoint": {"source": str(tmp_path / "dataset")},
           "reward": {"name": "quadratic", "options": {"target": [1.5, 0.0]}},
           "optimize": {"algorithm": "qlearning", "checkpoint_every": 2},
           "qlearning": {"iterations": 3, "batch_size": 16, "train_steps": 6, "train_timesteps": 4,
                         "reward_weight": 1.0, "critic_target": "td", "critic": "free", "width": 16, "ratio_samples": 24, "delta_clip": 2.0, "minibatch_size": 20}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    _ctrl_step(tmp_path, "fetch")
    _ctrl_step(tmp_path, "optimize", "--value", "", "--optimize-dir", str(tmp_path / "q1"))
    res = _ctrl_step(tmp_path, "optimize", "--value", "", "--optimize-dir", str(tmp_path / "q2"), processes=2)
    assert "launching 2 processes" in res.stderr
    s2 = json.loads((tmp_path / "q2" / "metrics.json").read_text())["summary"]
    assert s2["processes"] == 2 and s2["ranks_identical"] is True
    for name in ("adapter/model.safetensors", "critic.safetensors"):
        one, two = (load_file(str(tmp_path / d / name)) for d in ("q1", "q2"))
        assert _rel_diff(one, two) < 1e-3, name
        assert any(not torch.equal(one[k], two[k]) for k in one), (
            f"{name}: bitwise equal, so not 2 real processes"
        )
    h1, h2 = (json.loads((tmp_path / d / "metrics.json").read_text())["history"] for d in ("q1", "q2"))
    for key in ("reward_mean", "objective", "td_error", "score_error"):
        assert [r[key] for r in h2] == pytest.approx([r[key] for r in h1], rel=1e-4), key
    # a run stopped after checkpoint 1 (here: one process) resumes on two: rank 0 picks the checkpoint and every
    # rank loads that one
    from ctrl_core import params as params_mod
    from ctrl_core import steps

    os.environ["CTRL_CHECKPOINT_ROOT"] = str(tmp_path / "ckpt-resume")
    try:

        def preempted(row: dict) -> None:
            if row["iteration"] == 1:
                raise KeyboardInterrupt  # after checkpoint 2

        with pytest.raises(KeyboardInterrupt):
            steps.optimize(
                params_mod.load(tmp_path / "params.yaml"),
                tmp_path / "checkpoint",
                None,
                tmp_path / "q3",
                progress=preempted,
            )
    finally:
        del os.environ["CTRL_CHECKPOINT_ROOT"]
    (tmp_path / "ckpt-2").rename(tmp_path / "ckpt-2-done")
    (tmp_path / "ckpt-resume").rename(tmp_path / "ckpt-2")  # where the 2-process run looks
    _ctrl_step(tmp_path, "optimize", "--value", "", "--optimize-dir", str(tmp_path / "q3"), processes=2)
    s3 = json.loads((tmp_path / "q3" / "metrics.json").read_text())["summary"]
    assert s3["resumed_from_iteration"] == 2 and s3["processes"] == 2 and s3["ranks_identical"] is True
    for name in ("adapter/model.safetensors", "critic.safetensors"):
        one, three = (load_file(str(tmp_path / d / name)) for d in ("q1", "q3"))
        assert _rel_diff(one, three) < 1e-3, name
    # sizes that do not split are refused before any process starts
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "step", "optimize", "--params", str(tmp_path / "params.yaml"),
                          "--checkpoint", str(tmp_path / "checkpoint"), "--num-processes", "3"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        bad.returncode == 2
        and "qlearning.batch_size = 16: must be a multiple of the number of processes (3)" in bad.stderr
    )
    assert "launching" not in bad.stderr
