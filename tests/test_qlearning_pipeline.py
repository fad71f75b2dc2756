"""`optimize.algorithm: qlearning` in the pipeline: the checkpoint source may be only a data set; value
pretraining is skipped, ctrl_optimize trains from the data, evaluation and registration are unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ctrl_core import params as P
from ctrl_core import steps
from ctrl_core.qlearning import QLearningConfig, QLearningTrainer, make_critic, scratch_model
from ctrl_core.schedule import LinearVPSchedule


def _mixture(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
    return centres[torch.randint(0, 2, (n,), generator=g)] + 0.3 * torch.randn((n, 2), generator=g)


def test_qlearning_trainer_resumes_bitwise():
    data = _mixture(64)
    cfg = QLearningConfig(
        iterations=4,
        batch_size=16,
        train_steps=6,
        reward_weight=1.0,
        minibatch_size=32,
        seed=3,
        critic_target="td",
        critic="free",
    )
    reward = lambda x, c=None: (x[:, 0] > 0).float()  # noqa: E731

    def make():
        torch.manual_seed(0)
        model = scratch_model(LinearVPSchedule(), data, width=16)
        return QLearningTrainer(model, data, reward, cfg, critic=make_critic((2,)))

    whole = make()
    whole.train()
    part = make()
    part.step()
    part.step()
    state = part.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.train()
    flat = lambda t: torch.cat([p.detach().flatten() for p in [*t.params, *t.critic.parameters()]])  # noqa: E731
    assert resumed.iteration == 4 and torch.equal(flat(resumed), flat(whole))


def test_pipeline_trains_from_a_data_set_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    src = tmp_path / "dataset"
    src.mkdir()
    save_file({"data": _mixture(64)}, str(src / "data.safetensors"))
    raw = {
        "checkpoint": {"source": str(src)},
        "reward": {"name": "quadratic", "options": {"target": [1.5, 0.0]}},
        "optimize": {"algorithm": "qlearning", "checkpoint_every": 2, "train_steps": 25},
        # the smallest run that still shows a checkpoint before the last of several iterations
        "qlearning": {
            "iterations": 4,
            "batch_size": 16,
            "train_steps": 5,
            "reward_weight": 1.0,
            "width": 16,
            "critic_target": "monte_carlo",
            "critic": "free",
            "minibatch_size": 128,
        },
        "evaluate": {"steps": [10, 20], "num_samples": 16},
        "register": {"model_name": "qlearning-test"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = P.load(tmp_path / "params.yaml")
    steps.fetch(p, tmp_path / "checkpoint")
    link = steps.pretrain_value(p, tmp_path / "checkpoint", tmp_path / "value")
    assert link["skipped"] and not (tmp_path / "value" / "value.safetensors").exists()
    summary = steps.optimize(p, tmp_path / "checkpoint", None, tmp_path / "optimize")
    assert summary["algorithm"] == "qlearning" and summary["iterations"] == 4
    out = tmp_path / "optimize"
    assert (out / "adapter" / "model.safetensors").is_file() and (out / "critic.safetensors").is_file()
    assert (out / "checkpoints" / "iter-00002" / "model.safetensors").is_file()
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 4
    ev = steps.evaluate(p, tmp_path / "checkpoint", out / "adapter", tmp_path / "evaluate")
    cell = ev["evaluation"]["sde"]["10"]
    assert all(torch.isfinite(torch.tensor([cell["base"], cell["tuned"]])))
    from pipelines.register_step import register_from_outputs

    reg = register_from_outputs(
        p, str(tmp_path / "checkpoint"), str(out), ev, link, evaluation_dir=str(tmp_path / "evaluate")
    )
    assert reg["name"] == "qlearning-test" and reg["version"] == 1 and "challenger" in reg["aliases"]


def test_missing_data_set_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = P.load(None, ["optimize.algorithm=qlearning"])
    with pytest.raises(ValueError, match="no data set"):
        steps.load_dataset(p, tmp_path / "empty")
    with pytest.raises(P.ParamsError, match="qlearning.theta"):
        P.load(None, ["qlearning.theta=0"])
