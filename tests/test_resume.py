"""Checkpoint/resume and non-finite guards (issue 6): atomic checkpoints, bitwise resume, SIGKILL campaign."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.kill_campaign import run_kill_campaign
from ctrl_core.algorithms import OptimConfig, Trainer
from ctrl_core.recipes import gaussian_problem
from ctrl_core.resume import (
    CheckpointStore,
    IncompatibleCheckpointError,
    SupersededError,
    flatten_state,
    unflatten_state,
)
from ctrl_core.rewards import make_reward
from ctrl_core.value import MLPResidual, ValueFunction


def test_state_round_trip_keeps_types_keys_and_bits():
    g = torch.Generator().manual_seed(3)
    state = {
        "opt": {
            "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3, dtype=torch.float64)}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0]}],
        },
        "gen": g.get_state(),
        "n": 7,
        "none": None,
        "nan": float("nan"),
        "names": ["a", "b"],
    }
    tensors, structure = flatten_state(state)
    back = unflatten_state(tensors, json.loads(json.dumps(structure)))
    assert list(back["opt"]["state"]) == [0]  # int keys stay ints (optimizer state is keyed by index)
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["opt"]["state"][0]["m"].equal(state["opt"]["state"][0]["m"])
    assert (
        back["gen"].equal(state["gen"])
        and back["n"] == 7
        and back["none"] is None
        and math.isnan(back["nan"])
    )
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten_state({"x": object()})


def test_store_is_atomic_verified_and_keyed(tmp_path):
    store = CheckpointStore(tmp_path, "optimize", "run-a", keep=2)
    for it in (1, 2, 3):
        store.save(it, {"w": torch.full((3,), float(it))})
    names = sorted(p.name for p in store.dir.iterdir())
    assert names == ["ckpt-00000002", "ckpt-00000003"]  # only the newest two are kept
    # a damaged newest checkpoint (e.g. disk corruption) falls back to the previous one
    (store.dir / "ckpt-00000003" / "state.safetensors").write_bytes(b"garbage")
    it, state, _ = store.latest()
    assert it == 2 and state["w"].equal(torch.full((3,), 2.0))
    # another run's checkpoints are never resumed, even from the same folder
    other = CheckpointStore(tmp_path, "optimize", "run-b")
    other.dir.parent.mkdir(parents=True, exist_ok=True)
    assert other.latest() is None
    # a temporary folder left by a killed writer is not a checkpoint and is removed by the next save
    (store.dir / ".tmp-dead").mkdir()
    assert store.latest()[0] == 2
    store.save(4, {"w": torch.zeros(3)})
    assert not (store.dir / ".tmp-dead").exists()
    # NaN never reaches disk
    with pytest.raises(FloatingPointError, match="w holds non-finite"):
        store.save(5, {"w": torch.tensor([1.0, float("nan")])})
    assert store.latest()[0] == 4


def test_newest_attempt_owns_the_checkpoint_folder(tmp_path):
    """Two live attempts of one run (a KFP retry beside a pod that still terminates): the one started last writes;
    the older one stops at its next write and deletes nothing of the newer one's."""
    old = CheckpointStore(tmp_path, "optimize", "run-a")
    old.acquire()
    old.save(1, {"w": torch.ones(2)})
    new = CheckpointStore(tmp_path, "optimize", "run-a")
    new.acquire()
    assert new.latest()[0] == 1  # the newer attempt resumes from the older one's checkpoint
    (new.dir / ".tmp-newer-writing").mkdir()  # as if the newer attempt were mid-save
    with pytest.raises(SupersededError, match=r"newer attempt .* on .* \(pid \d+\)"):
        old.save(2, {"w": torch.full((2,), 2.0)})
    with pytest.raises(SupersededError):
        old.clear()
    assert (new.dir / ".tmp-newer-writing").is_dir() and not (new.dir / "ckpt-00000002").exists()
    assert new.latest()[0] == 1
    new.save(2, {"w": torch.full((2,), 2.0)})
    new.clear()  # committed: the folder goes, lease included
    assert not new.dir.exists()
    with pytest.raises(SupersededError, match="lease is gone"):
        old.save(3, {"w": torch.ones(2)})
    assert not new.dir.exists()  # the superseded attempt recreated nothing


def test_clear_gives_the_folder_back_to_an_attempt_that_took_it_over_meanwhile(tmp_path):
    """The old attempt's clear() passed its lease check, then the newer attempt acquired before the removal: the
    folder is renamed aside, the lease re-read there, and the folder put back with the newer attempt's lease."""
    old, new = (CheckpointStore(tmp_path, "optimize", "run-a") for _ in range(2))
    old.acquire()
    old.save(1, {"w": torch.ones(2)})
    new.acquire()
    old.check = lambda: None  # the check ran just before new.acquire()
    old.clear()
    assert new.latest()[0] == 1 and new.holder()["owner"] == new.owner
    new.save(2, {"w": torch.ones(2)})  # the newer attempt goes on
    new.clear()
    assert not new.dir.exists() and not list(tmp_path.glob("optimize/.*clearing*"))


def test_restore_names_versions_and_lets_other_failures_through(tmp_path):
    from ctrl_core.resume import restore

    store = CheckpointStore(tmp_path, "optimize", "run-a")
    store.save(1, {"w": torch.ones(2)})
    found = store.latest()

    def bad_layout(state):
        raise RuntimeError("Error(s) in loading state_dict for Linear: size mismatch for weight")

    with pytest.raises(IncompatibleCheckpointError, match="same code .* damaged or this is a bug"):
        restore(store, found, bad_layout)  # same version: not "run the version that wrote it"

    def out_of_memory(state):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # a retry may resume: never reported as incompatible
        restore(store, found, out_of_memory)
    assert store.latest()[0] == 1


def _embedded_optimize(tmp_path, monkeypatch, *overrides: str):
    """The embedded default's checkpoint and value net, and optimize-step arguments (3 tiny iterations)."""
    from ctrl_core import params as params_mod
    from ctrl_core import steps

    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    torch.set_num_threads(1)
    p = params_mod.load(None, ["value.num_paths=8", "value.steps=4", "value.epochs=1", "value.candidates=[cos_sin]",
                               "optimize.iterations=3", "optimize.batch_size=4", "optimize.train_steps=4",
                               "optimize.train_timesteps=2", "optimize.minibatch_size=4", "optimize.checkpoint_every=1",
                               "optimize.lr=0.0003",
                               *overrides])  # fmt: skip
    steps.fetch(p, tmp_path / "checkpoint")
    steps.pretrain_value(p, tmp_path / "checkpoint", tmp_path / "value")
    return p, tmp_path / "checkpoint", tmp_path / "value", tmp_path / "optimize"


def test_superseded_step_commits_nothing_and_the_newer_attempt_finishes(tmp_path, monkeypatch):
    """The optimize step of the embedded default: a second attempt of the same run starts after iteration 1; the
    first stops at its next iteration with a clear error and no output, the second resumes and commits."""
    from ctrl_core import steps

    args = _embedded_optimize(tmp_path, monkeypatch)

    def newer_attempt_starts(row: dict) -> None:
        if row["iteration"] == 0:  # after checkpoint 1: the retry takes the folder (what its start does)
            (folder,) = (tmp_path / "ckpt" / "optimize").iterdir()
            CheckpointStore(tmp_path / "ckpt", "optimize", folder.name).acquire()

    with pytest.raises(SupersededError, match="stops without writing"):
        steps.optimize(*args, progress=newer_attempt_starts)
    assert not (tmp_path / "optimize").exists()  # nothing committed
    (folder,) = (tmp_path / "ckpt" / "optimize").iterdir()
    assert sorted(f.name for f in folder.glob("ckpt-*")) == ["ckpt-00000001"]  # the old attempt wrote no more
    summary = steps.optimize(*args)
    assert summary["resumed_from_iteration"] == 1 and summary["iterations"] == 3
    assert (tmp_path / "optimize" / "adapter").is_dir() and not folder.exists()


def test_a_checkpoint_from_other_code_is_a_clear_error(tmp_path, monkeypatch):
    """The run key covers parameters and inputs, not code: a new image meeting a checkpoint whose state layout it
    does not know says so (both versions, and run.resume: false), and run.resume: false starts over."""
    from ctrl_core import steps

    monkeypatch.setenv("CTRL_GIT_SHA", "0123456789abcdef")
    p, *dirs = _embedded_optimize(tmp_path, monkeypatch)

    def preempted(row: dict) -> None:
        if row["iteration"] == 0:
            raise KeyboardInterrupt  # the pod goes after checkpoint 1

    with pytest.raises(KeyboardInterrupt):
        steps.optimize(p, *dirs, progress=preempted)
    (ckpt,) = (tmp_path / "ckpt" / "optimize").glob("*/ckpt-00000001")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["written_by"] == "ctrl-pipeline 0.1.0 at 0123456789ab"
    for item in meta["structure"]["__dict__"]:  # the top-level keys: call "opt" what another version might
        item[0] = "optimiser" if item[0] == "opt" else item[0]
    meta["written_by"] = "ctrl-pipeline 0.0.9 at fedcba987654"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"(?s)KeyError: 'opt'.*written by ctrl-pipeline 0\.0\.9 at "
        r"fedcba987654, this is ctrl-pipeline 0\.1\.0 at 0123456789ab.*run\.resume: false",
    ):
        steps.optimize(p, *dirs)
    assert ckpt.is_dir() and not (tmp_path / "optimize").exists()  # nothing lost, nothing half-written
    summary = steps.optimize(p.model_copy(update={"run": p.run.model_copy(update={"resume": False})}), *dirs)
    assert summary["resumed_from_iteration"] is None and summary["iterations"] == 3


def _trainer(seed: int = 0, reward=None, **kw) -> Trainer:
    torch.manual_seed(seed)
    problem = gaussian_problem(torch.zeros(2), torch.ones(2), hidden=16)
    reward = reward or make_reward("quadratic", target=[1.0, 0.5])
    value = ValueFunction(reward, MLPResidual(2, hidden=16), "cos_sin")
    cfg = OptimConfig(
        iterations=6,
        batch_size=16,
        train_steps=6,
        train_timesteps=3,
        minibatch_size=16,
        lr=1e-2,
        seed=seed,
        **kw,
    )
    return Trainer(problem.policy, reward, cfg, problem.x_shape, problem.condition_sampler, value)


def _flat(tr: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in [*tr.params, *tr.value.residual.parameters()]])


def test_trainer_resumes_bitwise(tmp_path):
    whole = _trainer()
    whole.train()
    first = _trainer()
    for _ in range(3):
        first.step()
    store = CheckpointStore(tmp_path, "optimize", "k")
    store.save(first.iteration, first.state_dict())
    del first
    resumed = _trainer()
    it, state, _ = store.latest()
    resumed.load_state_dict(state)
    assert resumed.iteration == it == 3
    resumed.train()
    assert resumed.iteration == 6 and len(resumed.history) == 6
    assert torch.equal(_flat(resumed), _flat(whole))
    assert [h.reward_mean for h in resumed.history] == [h.reward_mean for h in whole.history]


class _Flaky:
    """A reward model that returns NaN on chosen calls (a numerically broken reward server, say)."""

    def __init__(self, bad_calls: set[int]):
        self.inner, self.calls, self.bad = make_reward("quadratic", target=[1.0, 0.5]), 0, bad_calls

    def __call__(self, x, c=None):
        r = self.inner(x, c)
        self.calls += 1
        return torch.full_like(r, float("nan")) if self.calls in self.bad else r


def test_non_finite_reward_stops_with_a_clear_error_and_no_checkpoint(tmp_path):
    tr = _trainer(reward=_Flaky(set(range(1, 10_000))))
    store = CheckpointStore(tmp_path, "optimize", "k")
    with pytest.raises(FloatingPointError, match="non-finite reward at iteration 0"):
        tr.train(lambda st: store.save(st.iteration + 1, tr.state_dict()))
    assert store.latest() is None


def test_skip_mode_drops_the_iteration_and_keeps_weights(tmp_path):
    flaky = _Flaky(set())
    tr = _trainer(reward=flaky, on_nonfinite="skip", max_skipped=1)
    tr.step()
    before = _flat(tr).clone()
    flaky.bad = {flaky.calls + 1}  # the next rollout's terminal reward is NaN
    st = tr.step()
    assert st.skipped and tr.skipped == 1 and tr.iteration == 2
    assert torch.equal(_flat(tr), before)  # weights and value net unchanged by the dropped iteration
    tr.step()  # training goes on
    assert not torch.equal(_flat(tr), before)
    flaky.bad = {flaky.calls + 1}
    with pytest.raises(FloatingPointError, match="max_skipped=1"):
        tr.step()
    with pytest.raises(ValueError, match="optimize.on_nonfinite"):
        OptimConfig(on_nonfinite="ignore")


@pytest.mark.slow
def test_sigkill_campaign_resumes_to_the_same_weights(tmp_path):
    """Five SIGKILLs at random points of the CTRL step (and two of value pretraining) on the embedded default:
    every resumed run ends with the full iteration count and bitwise the weights of an uninterrupted run."""
    torch.set_num_threads(1)
    out = run_kill_campaign(quick=True, seed=1, workdir=str(tmp_path), optimize_kills=[5], value_kills=[2])
    series = {s["step"]: s for s in out["series"]}
    assert series["optimize"]["kills"] == 5, out
    assert series["optimize"]["resumes"] >= 1, out  # at least one start resumed from a checkpoint
    assert out["kills_survived"] == out["kills_tried"] >= 5, out
    assert out["lost_iterations"] == 0
    assert series["optimize"]["iterations_completed"] == 12 and series["optimize"]["bitwise_equal"]
    assert all(
        s["partial_outputs"] == 0 and not s["leftover_temp_dirs"] and s["checkpoints_cleared"]
        for s in out["series"]
    )
    # a second live attempt of the same run (a KFP retry beside a still-running pod) takes over and finishes
    assert out["overlap"]["overlapped"] and out["overlap"]["survived"], out["overlap"]
    assert out["overlap"]["older_exit"] != 0 and out["overlap"]["newer_resumed_from"] >= 1


def test_run_key_inputs_hash_file_contents(tmp_path):
    from ctrl_core.resume import dir_digest

    f = tmp_path / "data.safetensors"
    f.write_bytes(b"one")
    first = dir_digest(f)
    f.write_bytes(b"two")  # edited in place: a checkpoint of the old data must not be resumed
    assert dir_digest(f) != first and dir_digest(f).startswith("file:")
    with pytest.raises(FileNotFoundError, match="step input not found"):
        dir_digest(tmp_path / "missing")
