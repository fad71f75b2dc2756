"""The pipeline's steps as plain functions over folders: fetch -> pretrain_value -> optimize -> evaluate.

KFP components (components/), dvc.yaml stages and the ``ctrl`` CLI all call these, so the three ways of
running the pipeline execute the same code. Every step writes its outputs into a temporary folder and renames
it into place at the end: a failed or killed step leaves no half-written artifact behind.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .io import atomic_folder, atomic_save_weights, atomic_write_json, load_weights
from .params import Params
from .progress import emit as emit_progress


def _seed(params: Params) -> None:
    torch.manual_seed(params.run.seed)


def checkpoint_store(
    params: Params,
    step: str,
    blocks: tuple[str, ...],
    input_dirs: list[str | Path | None],
    extra: dict | None = None,
):
    """The resumable-checkpoint store of this step of this run: keyed by the step's parameter blocks (run's
    seed, not its resume settings) and the digests of its input folders. With ``run.resume: false`` any earlier
    checkpoints of the same run are discarded. The main process takes the folder's writer lease: an older attempt
    of the same run still alive stops at its next write (resume.SupersededError)."""
    from .resume import CheckpointStore, default_root, dir_digest, run_key

    dump = params.model_dump()
    config = {b: dump[b] for b in blocks} | {"seed": params.run.seed} | (extra or {})
    key = run_key(step, config, [dir_digest(d) for d in input_dirs if d is not None])
    store = CheckpointStore(default_root(params.run.checkpoint_root), step, key)
    if _dist().is_main:
        if not params.run.resume:
            store.clear()
        store.acquire()
    return store


def resume_point(params: Params, store, dist) -> tuple[int, Any, dict] | None:
    """The checkpoint every rank resumes from: rank 0 (which holds the folder's lease) picks the newest that
    verifies and tells the others which, so that no rank can pick another (an older attempt's last write, or
    one pruned in between)."""
    from .resume import CorruptCheckpointError

    found = store.latest() if params.run.resume and dist.is_main else None
    if dist.world == 1:
        return found
    chosen = int(dist.sum(float(found[0]) if found else 0.0))  # 0: none (checkpoints start at iteration 1)
    if dist.is_main or chosen == 0:
        return found
    try:
        return store.load(chosen)
    except CorruptCheckpointError as err:
        raise RuntimeError(
            f"rank {dist.rank}: cannot read the checkpoint rank 0 resumes from ({err})"
        ) from None


def _synchronised(trainer) -> list:
    """The weights data parallelism keeps equal on every rank: the policy/actor, and the value net or critic."""
    value = getattr(getattr(trainer, "value", None), "residual", None)
    nets = [m for m in (value, getattr(trainer, "critic", None)) if m is not None]
    return [*trainer.params, *(q.detach() for m in nets for q in m.parameters())]


def _dist():
    """The data-parallel group this process belongs to (one process unless launched by torchrun/accelerate)."""
    from .distributed import Dist

    return Dist.from_env()


def load_problem(params: Params, checkpoint_dir: str | Path):
    from .recipes import checkpoint_problem

    m = params.model
    return checkpoint_problem(checkpoint_dir, lora_rank=m.lora_rank, solver=params.optimize.solver, prompts=m.prompts,
                              guidance_scale=m.guidance_scale, autocast=m.autocast,
                              gradient_checkpointing=m.gradient_checkpointing, compile=m.compile,
                              channels_last=m.channels_last, merged_sampling=m.merged_sampling)  # fmt: skip


def make_reward_fn(params: Params, problem=None):
    """The reward of params.reward; for a latent problem (Stable-Diffusion-class), composed with the VAE decode."""
    from .rewards import make_reward

    reward = make_reward(params.reward.name, **params.reward.options)
    if not hasattr(problem, "wrap_reward"):
        return reward
    wrapped = problem.wrap_reward(reward)
    wrapped.raw = reward  # the image reward itself (value_parts builds the value's variants from it)
    return wrapped


def value_parts(params: Params, problem, reward) -> tuple[Callable, Callable]:
    """(the value's reward for its skip term RM(x_hat), a factory of its residual F_phi) from params.value:
    ``xhat_decoder`` picks the decoder of x_hat on latent checkpoints, ``residual`` the design of F_phi (a small
    CNN on the state, or the paper's partly frozen copy of the reward model on the decoded state)."""
    from .value import RewardCopyResidual

    vp = params.value
    raw = getattr(reward, "raw", reward)
    latent = hasattr(problem, "wrap_value_reward")
    if vp.xhat_decoder != "vae" and not latent:
        raise ValueError(f"value.xhat_decoder={vp.xhat_decoder} applies to latent text-to-image checkpoints; this "
                         "checkpoint has no VAE: use vae")  # fmt: skip
    value_reward = (
        problem.wrap_value_reward(raw, vp.xhat_decoder) if latent and vp.xhat_decoder != "vae" else reward
    )
    if vp.residual == "conv":
        return value_reward, problem.make_residual
    copy_of = getattr(raw, "trainable_copy", None)
    if copy_of is None:
        raise ValueError(f"value.residual=reward_copy copies the reward model's network; the {params.reward.name!r} "
                         "reward has none (imagereward, aesthetic and a weighted_sum with one of them do): use value.residual=conv")  # fmt: skip
    prompts, decode = getattr(problem, "prompts", None), getattr(value_reward, "decode", None)
    return value_reward, lambda: RewardCopyResidual(copy_of(prompts, vp.frozen_fraction), decode)


# --- 1. fetch ---------------------------------------------------------------------------------------------
def fetch(params: Params, out_dir: str | Path) -> dict:
    from .checkpoints import fetch_checkpoint

    manifest = fetch_checkpoint(params.checkpoint.source, out_dir, params.checkpoint.sha256 or None)
    return manifest.to_dict()


# --- 2. value pretraining -----------------------------------------------------------------------------------
def pretrain_value(params: Params, checkpoint_dir: str | Path, out_dir: str | Path) -> dict:
    """Collect Monte-Carlo value data from the base model, fit one value net per link, keep the best.
    Resumable: the data set and every fitted candidate are checkpointed as they are produced."""
    from .recipes import collect_value_data
    from .value import ValueDataset, ValueFunction, select_link

    if params.optimize.algorithm != "ctrl":  # only CTRL has a value net (q-learning trains its own critic)
        result = {"chosen": "none", "mse": {}, "seconds": 0.0,
                  "skipped": f"optimize.algorithm is {params.optimize.algorithm}"}  # fmt: skip
        if _dist().is_main:
            with atomic_folder(out_dir) as tmp:
                atomic_write_json(result, tmp / "link.json")
        return result
    _seed(params)
    t0 = time.perf_counter()
    dist = _dist()  # first: it picks this rank's GPU before any model is built
    store = checkpoint_store(
        params,
        "pretrain_value",
        ("checkpoint", "model", "reward", "value"),
        [checkpoint_dir, params.model.prompts or None],
        extra={"solver": params.optimize.solver},
    )
    found = resume_point(params, store, dist)
    problem = load_problem(params, checkpoint_dir)
    reward = make_reward_fn(params, problem)
    value_reward, make_residual = value_parts(params, problem, reward)

    def fits(st: dict) -> dict:  # the layout this code writes; fitted candidates' weights fit its residual
        if set(st) != {"collecting", "data", "fitted"}:
            raise KeyError(f"state keys {sorted(st)}")
        if st["collecting"] is not None and not {"generator", "parts", "next"} <= set(st["collecting"]):
            raise KeyError(f"collecting state keys {sorted(st['collecting'])}")
        if st["data"] is not None:
            ValueDataset(**st["data"])
        if st["fitted"]:
            fresh = make_residual().state_dict()
            for name, f in st["fitted"].items():
                if set(f["weights"]) != set(fresh) or any(
                    f["weights"][k].shape != fresh[k].shape for k in fresh
                ):
                    raise ValueError(f"the fitted {name!r} value net's weights do not fit this residual")
        return st

    from .resume import restore

    state = restore(store, found, fits) if found else {"collecting": None, "data": None, "fitted": {}}
    vp, seed = params.value, params.run.seed
    saves = [found[0] if found else 0]

    def save(new_state: dict) -> None:
        saves[0] += 1
        if dist.is_main:  # every rank holds the same state; one writes it
            store.save(saves[0], new_state)

    def on_batch(c: dict) -> None:
        save({"collecting": c, "data": None, "fitted": {}})
        if dist.is_main:
            emit_progress("pretrain_value", "value paths", c["next"], vp.num_paths)

    if state["data"] is None:
        data = collect_value_data(
            problem,
            reward,
            vp.num_paths,
            vp.steps,
            vp.points_per_path,
            seed,
            vp.batch_size,
            resume=state["collecting"],
            on_batch=on_batch,
            dist=dist,
            value_reward_fn=value_reward,
        )
        state = {"collecting": None, "data": data.state(), "fitted": {}}
        save(state)
    data = ValueDataset(**state["data"])

    def on_fitted(name: str, value, mse: float) -> None:
        # host copies: a candidate's tensors would otherwise keep its (GPU) weights alive after select_link drops it
        weights = {k: t.detach().to("cpu", copy=True) for k, t in value.residual.state_dict().items()}
        state["fitted"][name] = {"weights": weights, "mse": mse}
        save(state)
        if dist.is_main:
            emit_progress("pretrain_value", "fit links", len(state["fitted"]), len(vp.candidates),
                          {f"mse/{name}": mse}, show=[f"mse/{name}"])  # fmt: skip

    done = {name: (f["weights"], f["mse"]) for name, f in state["fitted"].items()}
    sel = select_link(
        lambda link: ValueFunction(value_reward, make_residual(), link),
        data,
        vp.candidates,
        vp.epochs,
        vp.lr,
        seed=seed,
        done=done,
        on_fitted=on_fitted,
        dist=dist,
    )
    result = {
        "chosen": sel.chosen,
        "mse": sel.val_mse,
        "seconds": round(time.perf_counter() - t0, 2),
        "resumed_candidates": sorted(done),
        "processes": dist.world,
    }
    if not dist.identical(sel.value.residual.state_dict().values()):
        raise RuntimeError(
            "value pretraining: the processes ended with different value nets (gradients not synchronised)"
        )
    if not dist.is_main:
        return result
    with atomic_folder(out_dir) as tmp:
        atomic_save_weights(sel.value.residual.state_dict(), tmp / "value.safetensors")
        atomic_write_json({k: result[k] for k in ("chosen", "mse", "seconds")}, tmp / "link.json")
        store.check()  # a superseded attempt commits nothing: the newer one writes this output
    store.clear()  # the output is committed: the checkpoints have done their job
    return result


def load_value(params: Params, problem, reward, value_dir: str | Path):
    from .value import ValueFunction

    link = json.loads((Path(value_dir) / "link.json").read_text())["chosen"]
    value_reward, make_residual = value_parts(params, problem, reward)
    value = ValueFunction(value_reward, make_residual(), link)
    value.residual.load_state_dict(load_weights(Path(value_dir) / "value.safetensors"))
    return value


# --- 3. policy optimisation -----------------------------------------------------------------------------------
def optimize(
    params: Params,
    checkpoint_dir: str | Path,
    value_dir: str | Path | None,
    out_dir: str | Path,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Policy optimisation (CTRL, DDPO or q-learning), resumable, data-parallel for CTRL/DDPO. Outputs: the
    model under adapter/ (a LoRA adapter, or a from-scratch q-learning network), per-iteration metrics,
    periodic snapshots under checkpoints/, and the value net / critic."""
    from .recipes import make_trainer

    _seed(params)
    cfg = params.optim_config()
    dist = _dist()
    inputs: list = [checkpoint_dir, params.model.prompts or None]
    key_extra: dict = {}
    if cfg.algorithm == "qlearning":
        from .qlearning import QLearningScoreModel, QLearningTrainer, make_critic

        qcfg = params.qlearning_config()
        model, problem, data, labels, num_classes = qlearning_setup(params, checkpoint_dir)
        reward = make_reward_fn(params, problem)
        trainer = QLearningTrainer(
            model,
            data,
            reward,
            qcfg,
            x_shape=problem.x_shape,
            critic=make_critic(problem.x_shape, num_classes, qcfg.critic, model, reward, qcfg.reward_weight),
            condition_sampler=problem.condition_sampler,
            data_labels=labels,
            dist=dist,
        )
        iterations, blocks, timing = qcfg.iterations, ("qlearning",), ("sample", "critic", "actor")
        save_model = model.save if isinstance(model, QLearningScoreModel) else model.save_adapter

        def extra_outputs(tmp: Path) -> None:
            atomic_save_weights(trainer.critic.state_dict(), tmp / "critic.safetensors")

        if params.qlearning.data:
            inputs.append(params.qlearning.data)
    else:
        problem = load_problem(params, checkpoint_dir)
        reward = make_reward_fn(params, problem)
        value = load_value(params, problem, reward, value_dir) if cfg.algorithm == "ctrl" else None
        trainer = make_trainer(problem, reward, cfg, value, dist)
        iterations, blocks, timing = cfg.iterations, (), ("sample", "value", "policy")
        save_model = trainer.policy.model.save_adapter
        if cfg.algorithm == "ctrl":  # the value net's weights and link (not link.json's timing)
            inputs.append(Path(value_dir) / "value.safetensors")
            key_extra["link"] = value.link_name
            key_extra["value_design"] = {
                k: getattr(params.value, k) for k in ("residual", "frozen_fraction", "xhat_decoder")
            }

        def extra_outputs(tmp: Path) -> None:
            if value is not None:
                atomic_save_weights(value.residual.state_dict(), tmp / "value.safetensors")
                atomic_write_json({"chosen": value.link_name}, tmp / "link.json")

    store = checkpoint_store(
        params, "optimize", ("checkpoint", "model", "reward", "optimize", *blocks), inputs, key_extra
    )
    found = resume_point(params, store, dist)
    resumed_from = None
    if found is not None:
        from .resume import restore

        restore(store, found, trainer.load_state_dict)
        resumed_from = found[0]

    def row_of(st) -> dict:  # numeric extras (old_log_probs=trainer: the sampler/trainer gap) join the row
        row = {k: v for k, v in st.__dict__.items() if k != "extra"}
        row.update({k: float(v) for k, v in st.extra.items() if isinstance(v, int | float) and k not in row})
        return row

    history: list[dict] = [row_of(st) for st in trainer.history]
    every = params.optimize.checkpoint_every
    snapshots = store.dir / "snapshots"  # model snapshots survive restarts with the checkpoints
    if not dist.is_main:  # the other ranks train in lockstep; rank 0 writes checkpoints and outputs
        trainer.train()
        if not dist.identical(_synchronised(trainer)):
            raise RuntimeError(
                "data-parallel ranks ended with different adapters (gradients not synchronised)"
            )
        return {"rank": dist.rank, "iterations": trainer.iteration}
    with atomic_folder(out_dir) as tmp:
        with open(tmp / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in history)

        def on_iteration(st) -> None:
            store.check()  # superseded: stop now (the newer attempt has already replaced our staging folder)
            row = row_of(st)
            history.append(row)
            with open(tmp / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            n = st.iteration + 1
            if every and (n % every == 0 or n == iterations):
                if n < iterations:
                    save_model(snapshots / f"iter-{n:05d}")
                store.save(
                    n, trainer.state_dict()
                )  # after the snapshot: a checkpoint at n implies snapshot n
            show = ("reward_mean", "kl", "value_loss", "clipfrac", "critic_loss")
            emit_progress("ctrl_optimize", cfg.algorithm, n, iterations, row, show=show)
            if progress is not None:
                progress(row)

        t0 = time.perf_counter()
        trainer.train(on_iteration)
        if not dist.identical(_synchronised(trainer)):
            raise RuntimeError(
                "data-parallel ranks ended with different adapters (gradients not synchronised)"
            )
        if snapshots.is_dir():
            shutil.copytree(snapshots, tmp / "checkpoints")
        save_model(tmp / "adapter")
        extra_outputs(tmp)
        summary = {
            "algorithm": cfg.algorithm,
            "iterations": iterations,
            "final_reward": history[-1]["reward_mean"] if history else None,
            "first_reward": history[0]["reward_mean"] if history else None,
            "final_kl": history[-1].get("kl") if history else None,
            "seconds": round(time.perf_counter() - t0, 2),
            "seconds_per_iteration": {
                k: sum(h[f"{k}_s"] for h in history) / max(len(history), 1) for k in timing
            },
            "resumed_from_iteration": resumed_from,
            "processes": dist.world,
            "ranks_identical": True,  # checked above: every rank holds bitwise this adapter
            "skipped_iterations": getattr(trainer, "skipped", 0),
        }
        for key in ("approx_kl", "clipfrac"):  # PPO diagnostics of CTRL/DDPO rows, averaged over the run
            logged = [h[key] for h in history if h.get(key) is not None]
            if logged:
                summary[key] = sum(logged) / len(logged)
        atomic_write_json({"summary": summary, "history": history}, tmp / "metrics.json")
        store.check()  # a superseded attempt commits nothing: the newer one writes this output
    store.clear()  # the output is committed: the checkpoints have done their job
    return summary


def load_dataset(params: Params, checkpoint_dir: str | Path):
    """The q-learning data set: (data (N, ...), labels (N,) or None), from ``qlearning.data``, else the fetched
    folder's data.safetensors, else the built-in digits data for the built-in digits checkpoint."""
    src, d = params.qlearning.data, Path(checkpoint_dir)
    if src:
        path = Path(src)
    elif (d / "data.safetensors").is_file():
        path = d / "data.safetensors"
    elif (d / "digits_config.json").is_file():
        from .embedded import digits_dataset

        return digits_dataset("all")
    else:
        raise ValueError(
            f"qlearning: no data set. Set qlearning.data to a .safetensors file, or put data.safetensors "
            f"(tensors 'data' and optional 'labels') in the checkpoint source ({d})"
        )
    tensors = load_weights(path)
    if "data" not in tensors:
        raise ValueError(f"{path}: no 'data' tensor (found {sorted(tensors)})")
    labels = tensors.get("labels")
    return tensors["data"].float(), None if labels is None else labels.long()


def qlearning_setup(params: Params, checkpoint_dir: str | Path, model_dir: str | Path | None = None):
    """(actor model, Problem, data, labels, num_classes) for q-learning. ``model_dir``: load a trained
    from-scratch model (evaluation); its reference ("base") is the data's own ratio score."""
    from .qlearning import QLearningScoreModel, RatioScoreModel, qlearning_problem, scratch_model
    from .schedule import LinearVPSchedule

    data, labels = load_dataset(params, checkpoint_dir)
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    x_shape = tuple(data.shape[1:])
    if params.qlearning.start == "pretrained":
        problem = load_problem(params, checkpoint_dir)
        if problem.x_shape != x_shape:
            raise ValueError(f"qlearning: data of shape {x_shape} for a model of shape {problem.x_shape}")
        return problem.policy.model, problem, data, labels, num_classes
    if model_dir is not None:
        model = QLearningScoreModel.load(model_dir)
        model.reference = RatioScoreModel(model.schedule, data, labels)
    else:
        model = scratch_model(
            LinearVPSchedule(), data, labels, width=params.qlearning.width, num_classes=num_classes
        )
    return (
        model,
        qlearning_problem(model, x_shape, params.optimize.solver, num_classes),
        data,
        labels,
        num_classes,
    )


# --- 4. evaluation -----------------------------------------------------------------------------------------
def evaluate(
    params: Params, checkpoint_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path
) -> dict:
    from .evaluate import evaluate as run_eval
    from .evaluate import robustness_ratio, training_sampler
    from .report import write_reports

    _seed(params)
    if (Path(adapter_dir) / "qlearning_config.json").is_file():  # a from-scratch q-learning model
        problem = qlearning_setup(params, checkpoint_dir, model_dir=adapter_dir)[1]
    else:
        problem = load_problem(params, checkpoint_dir)
        problem.policy.model.load_adapter(adapter_dir)
    reward = make_reward_fn(params, problem)
    ep = params.evaluate
    t0 = time.perf_counter()
    cells_done, cells = [0], len(ep.samplers) * len(ep.steps)

    def on_cell(sampler: str, steps: str, cell) -> None:
        cells_done[0] += 1
        emit_progress("evaluate", "cells", cells_done[0], cells,
                      {f"gain/{sampler}/{steps}": cell.gain}, show=[f"gain/{sampler}/{steps}"])  # fmt: skip

    results, kept = run_eval(
        problem.policy,
        reward,
        problem.x_shape,
        ep.steps,
        ep.samplers,
        ep.num_samples,
        problem.eval_conditions,
        seed=ep.seed,
        keep_samples=20,
        on_cell=on_cell,
    )
    evaluation = {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in results.items()}
    train_sampler = training_sampler(params.optimize.solver, params.optimize.eta)
    robustness = robustness_ratio(results, params.optimize.train_steps, train_sampler)
    out = {
        "evaluation": evaluation,
        "robustness": robustness,
        "robustness_ratio": robustness["overall"],
        "train_steps": params.optimize.train_steps,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_folder(out_dir) as tmp:
        atomic_write_json(out, tmp / "evaluation.json")
        write_reports(tmp, out, kept, decode=getattr(reward, "decode", None))  # latents are shown decoded
    return out
