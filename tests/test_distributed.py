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
    "value": {"candidates": ["linear"], "num_paths": 32, "steps": 8, "points_per_path": 2, "epochs": 2, "batch_size": 16},
    "optimize": {"iterations": 3, "batch_size": 8, "train_steps": 8, "train_timesteps": 3, "minibatch_size": 4,
                 "checkpoint_every": 1, "value_batch_size": 16},
}


def _ctrl_step(work: Path, *args: str, processes: int = 1, launcher: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTRL_CHECKPOINT_ROOT": str(work / f"ckpt-{processes}{launcher}"),
           "CTRL_LAUNCHER": launcher}
    cmd = [sys.executable, "-m", "pipelines.cli", "step", *args, "--params", str(work / "params.yaml"),
           "--checkpoint", str(work / "checkpoint"), "--num-processes", str(processes)]
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
    v1, v2 = load_file(str(tmp_path / "v1" / "value.safetensors")), load_file(str(tmp_path / "v2" / "value.safetensors"))
    assert _rel_diff(v1, v2) < 1e-3
    m1 = json.loads((tmp_path / "v1" / "link.json").read_text())["mse"]["linear"]
    m2 = json.loads((tmp_path / "v2" / "link.json").read_text())["mse"]["linear"]
    assert m2 == pytest.approx(m1, rel=1e-4)
    # CTRL: LoRA gradients all-reduced; both start from the same value net
    _ctrl_step(tmp_path, "optimize", "--value", str(tmp_path / "v1"), "--optimize-dir", str(tmp_path / "o1"))
    _ctrl_step(tmp_path, "optimize", "--value", str(tmp_path / "v1"), "--optimize-dir", str(tmp_path / "o2"), processes=2)
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
    res = _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "acc"), processes=2, launcher="accelerate")
    assert "accelerate.commands.launch" in res.stderr and "launching 2 processes" in res.stderr
    _ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "tr"), processes=2, launcher="torchrun")
    a, t = (load_file(str(tmp_path / d / "value.safetensors")) for d in ("acc", "tr"))
    assert a.keys() == t.keys() and all(torch.equal(a[k], t[k]) for k in a)
    one = load_file(str(_ctrl_step(tmp_path, "pretrain_value", "--value", str(tmp_path / "one")) and
                        tmp_path / "one" / "value.safetensors"))
    assert _rel_diff(one, a) < 1e-3 and any(not torch.equal(one[k], a[k]) for k in a)  # really 2 processes


def test_global_batch_must_split_over_the_processes():
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), hidden=8)
    cfg = OptimConfig(algorithm="ddpo", batch_size=10, minibatch_size=5)
    with pytest.raises(ValueError, match=r"optimize.batch_size \(10\) must be a multiple of the number of processes \(3\)"):
        Trainer(problem.policy, make_reward("quadratic"), cfg, problem.x_shape, dist=Dist(rank=0, world=3))
    assert Dist(rank=1, world=4).shard(8) == slice(2, 4)
