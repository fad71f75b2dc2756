"""SIGKILL campaign: kill the value-pretraining and CTRL steps at random points, resume, compare bitwise.

For each series: run the step once uninterrupted (the reference), then run it again with its own checkpoint
folder, SIGKILL the process at random times (during start-up, training, or a checkpoint write — wherever the
clock lands), start it again each time, and let it finish after the last kill. The resumed run must end with
the full iteration count and weights bitwise equal to the reference (same seed, CPU, one thread), and no kill
may ever leave a partial step output behind. Then two live attempts of one CTRL run (``run_overlap``): the
newer one must take the checkpoint folder over and finish bitwise, the older one stop without deleting anything.

    python -m bench.kill_campaign [--quick] [--launcher fork|cli] --json OUT

``fork`` starts each attempt as a forked child of an interpreter that has already imported torch/diffusers (fast;
the child is a real process that receives a real SIGKILL); ``cli`` runs ``ctrl step ...`` as a fresh process, as
dvc and a Kubernetes pod do (about 10 s of imports per attempt on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SMALL_PARAMS = {
    "value": {
        "candidates": ["rm_only", "linear", "f_only", "cos_sin"],
        "num_paths": 64,
        "steps": 8,
        "points_per_path": 2,
        "epochs": 2,
        "batch_size": 8,
    },
    "optimize": {
        "iterations": 12,
        "batch_size": 8,
        "train_steps": 8,
        "train_timesteps": 3,
        "minibatch_size": 8,
        "checkpoint_every": 1,
        "value_batch_size": 64,
        "value_epochs": 1,
        "lr": 3e-4,
    },
}
TIMING_KEYS = {"sample_s", "value_s", "policy_s"}


def _child(step: str, params_file: str, ckpt_dir: str, out_dir: str, value_dir: str, ckpt_root: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["CTRL_CHECKPOINT_ROOT"] = ckpt_root
    from ctrl_core import params as P
    from ctrl_core import steps

    p = P.load(params_file)
    if step == "pretrain_value":
        steps.pretrain_value(p, ckpt_dir, out_dir)
    else:
        steps.optimize(p, ckpt_dir, value_dir, out_dir)


class Attempt:
    """One start of a step: a forked child or a ``ctrl step`` subprocess."""

    def __init__(
        self,
        launcher: str,
        step: str,
        params_file: Path,
        ckpt_dir: Path,
        out_dir: Path,
        value_dir: Path,
        ckpt_root: Path,
    ):
        args = (step, str(params_file), str(ckpt_dir), str(out_dir), str(value_dir), str(ckpt_root))
        if launcher == "fork":
            self.proc = mp.get_context("fork").Process(target=_child, args=args, daemon=True)
            self.proc.start()
            self.pid = self.proc.pid
        else:
            env = {
                **os.environ,
                "CTRL_CHECKPOINT_ROOT": str(ckpt_root),
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            value_arg = out_dir if step == "pretrain_value" else value_dir  # pretrain_value writes to --value
            cmd = [
                sys.executable,
                "-m",
                "pipelines.cli",
                "step",
                step,
                "--params",
                str(params_file),
                "--checkpoint",
                str(ckpt_dir),
                "--value",
                str(value_arg),
                "--optimize-dir",
                str(out_dir),
            ]
            self.popen = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.pid = self.popen.pid

    def poll(self) -> int | None:
        if hasattr(self, "proc"):
            return None if self.proc.is_alive() else self.proc.exitcode
        return self.popen.poll()

    def wait(self) -> int:
        if hasattr(self, "proc"):
            self.proc.join()
            return self.proc.exitcode
        _, err = self.popen.communicate()
        if self.popen.returncode:
            sys.stderr.write(err.decode()[-3000:])
        return self.popen.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.wait()


def _output_complete(step: str, out: Path) -> bool:
    files = (
        ["value.safetensors", "link.json"]
        if step == "pretrain_value"
        else ["adapter/adapter_model.safetensors", "metrics.json"]
    )
    return all((out / f).is_file() for f in files)


def _compare(step: str, ref: Path, got: Path, iterations: int) -> dict:
    from safetensors.torch import load_file

    def same(a: Path, b: Path) -> bool:
        ta, tb = load_file(str(a)), load_file(str(b))
        return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)

    if step == "pretrain_value":
        la, lb = json.loads((ref / "link.json").read_text()), json.loads((got / "link.json").read_text())
        ok = (
            same(ref / "value.safetensors", got / "value.safetensors")
            and la["chosen"] == lb["chosen"]
            and la["mse"] == lb["mse"]
        )
        return {"bitwise_equal": ok, "lost_iterations": 0}
    ha = json.loads((ref / "metrics.json").read_text())["history"]
    hb = json.loads((got / "metrics.json").read_text())["history"]
    strip = lambda h: [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in h]  # noqa: E731
    ok = same(ref / "adapter" / "adapter_model.safetensors", got / "adapter" / "adapter_model.safetensors")
    if (ref / "value.safetensors").is_file():
        ok = ok and same(ref / "value.safetensors", got / "value.safetensors")
    contiguous = [row["iteration"] for row in hb] == list(range(len(hb)))
    return {
        "bitwise_equal": ok,
        "history_equal": strip(ha) == strip(hb),
        "iterations_completed": len(hb),
        "contiguous": contiguous,
        "lost_iterations": max(iterations - len(hb), 0) + (0 if contiguous else 1),
    }


def _leftovers(out: Path) -> list[str]:
    """Temporary siblings of a step's output folder that an attempt left behind."""
    return [q.name for q in out.parent.glob(f".{out.name}.*")]


def _cleared(root: Path) -> bool:
    """No checkpoint is left under the checkpoint root (the committed step removed its folder)."""
    return not root.exists() or not any(root.rglob("ckpt-*"))


def run_series(
    step: str,
    kills: int,
    work: Path,
    launcher: str,
    rng: random.Random,
    ckpt_dir: Path,
    value_dir: Path,
    params_file: Path,
    iterations: int,
) -> dict:
    """Reference run, then a run killed ``kills`` times; returns what happened and whether it survived."""
    name = f"{step}-{rng.randrange(1 << 30):x}"
    ref_out, out = work / f"{name}-ref", work / f"{name}-killed"
    t0 = time.perf_counter()
    ref_root = work / f"{name}-ckptref"
    ref = Attempt(launcher, step, params_file, ckpt_dir, ref_out, value_dir, ref_root)
    first_ckpt_s = None
    while ref.poll() is None:  # when does the first checkpoint appear? (start-up + data/first iteration)
        if first_ckpt_s is None and any(ref_root.rglob("ckpt-*")):
            first_ckpt_s = time.perf_counter() - t0
        time.sleep(0.05)
    if ref.wait() != 0:
        raise RuntimeError(f"the uninterrupted {step} run failed")
    ref_s = time.perf_counter() - t0
    first_ckpt_s = first_ckpt_s or ref_s / 2
    v = SMALL_PARAMS["value"]  # checkpoints per run: one per iteration | per data batch, data set, candidate
    units = (
        iterations if step == "optimize" else -(-v["num_paths"] // v["batch_size"]) + 1 + len(v["candidates"])
    )
    unit_s = max(ref_s - first_ckpt_s, 0.1) / units
    root = work / f"{name}-ckpt"
    kill_times, partial_outputs, attempts, resumes = [], 0, 0, 0
    while True:
        attempts += 1
        resumes += any(root.rglob("ckpt-*"))  # this start finds a checkpoint to resume from
        att = Attempt(launcher, step, params_file, ckpt_dir, out, value_dir, root)
        if len(kill_times) < kills:
            # one kill in five during start-up (before any checkpoint), the rest anywhere within ~2 checkpoint
            # intervals of the first one: sampling, updates, value fits, checkpoint writes, resumed start-ups
            if rng.random() < 0.2:
                delay = rng.uniform(0.05, 1.0) * first_ckpt_s
            else:
                delay = first_ckpt_s + rng.uniform(-1.0, 2.0) * unit_s
            deadline = time.perf_counter() + delay
            while time.perf_counter() < deadline and att.poll() is None:
                time.sleep(0.01)
            if att.poll() is None:
                att.kill()
                kill_times.append(round(delay, 3))
                if out.exists() and not _output_complete(step, out):
                    partial_outputs += 1
                continue
        code = att.wait()
        if code != 0:
            return {"step": step, "kills": len(kill_times), "survived": False, "error": f"exit code {code}"}
        break
    leftovers = _leftovers(out)
    cmp = _compare(step, ref_out, out, iterations)
    survived = (
        cmp["bitwise_equal"]
        and partial_outputs == 0
        and not leftovers
        and cmp.get("history_equal", True)
        and cmp["lost_iterations"] == 0
    )
    return {
        "step": step,
        "kills": len(kill_times),
        "kill_times_s": kill_times,
        "attempts": attempts,
        "resumes": resumes,
        "reference_s": round(ref_s, 2),
        "first_checkpoint_s": round(first_ckpt_s, 2),
        "partial_outputs": partial_outputs,
        "leftover_temp_dirs": leftovers,
        "checkpoints_cleared": _cleared(root),
        **cmp,
        "survived": survived,
    }


def run_overlap(
    work: Path,
    launcher: str,
    ckpt_dir: Path,
    value_dir: Path,
    params_file: Path,
    iterations: int,
    ref_out: Path,
) -> dict:
    """Two live attempts of one run, as when a KFP retry starts beside a pod that still terminates: attempt A
    trains; once its first checkpoint exists, attempt B starts on the same checkpoint root and output folder. B
    takes the folder over (its lease) and resumes; A must stop at its next write without deleting anything; B
    must end with the reference's weights bitwise."""
    root, out = work / "overlap-ckpt", work / "overlap-out"
    older = Attempt(launcher, "optimize", params_file, ckpt_dir, out, value_dir, root)
    while older.poll() is None and not any(root.rglob("ckpt-*")):
        time.sleep(0.01)
    overlapped = older.poll() is None
    newer = Attempt(launcher, "optimize", params_file, ckpt_dir, out, value_dir, root)
    newer_exit, older_exit = newer.wait(), older.wait()
    cmp = (
        _compare("optimize", ref_out, out, iterations)
        if _output_complete("optimize", out)
        else {"bitwise_equal": False}
    )
    summary = (
        json.loads((out / "metrics.json").read_text())["summary"] if (out / "metrics.json").is_file() else {}
    )
    leftovers = _leftovers(out)
    survived = (
        overlapped
        and older_exit != 0
        and newer_exit == 0
        and cmp["bitwise_equal"]
        and not leftovers
        and cmp.get("lost_iterations", 1) == 0
        and _cleared(root)
    )
    return {
        "overlapped": overlapped,
        "older_exit": older_exit,
        "newer_exit": newer_exit,
        "newer_resumed_from": summary.get("resumed_from_iteration"),
        "leftover_temp_dirs": leftovers,
        **cmp,
        "survived": survived,
    }


def run_kill_campaign(
    quick: bool = False,
    seed: int = 0,
    launcher: str = "fork",
    workdir: str | None = None,
    optimize_kills: list[int] | None = None,
    value_kills: list[int] | None = None,
) -> dict:
    """The campaign. Returns ``kills_tried``, ``kills_survived``, ``lost_iterations`` and per-series details."""
    from ctrl_core import params as P
    from ctrl_core import steps

    if launcher == "fork":  # children inherit the imports: an attempt then starts in about a second
        from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401

        import ctrl_core.embedded  # noqa: F401
        import ctrl_core.recipes  # noqa: F401
    optimize_kills = optimize_kills or ([5] if quick else [5, 5, 5])
    value_kills = value_kills or ([2] if quick else [3, 3])
    rng = random.Random(seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump({**SMALL_PARAMS, "run": {"seed": seed}}))
        p = P.load(params_file)
        ckpt_dir, value_dir = work / "checkpoint", work / "value"
        steps.fetch(p, ckpt_dir)
        series = []
        for k in value_kills:
            series.append(
                run_series("pretrain_value", k, work, launcher, rng, ckpt_dir, value_dir, params_file, 0)
            )
        if not value_dir.is_dir():  # the optimize series need a value net: the campaign's own first reference
            ref = sorted(work.glob("pretrain_value-*-ref"))
            value_dir = ref[0] if ref else value_dir
            if not value_dir.is_dir():
                Attempt(
                    launcher, "pretrain_value", params_file, ckpt_dir, value_dir, value_dir, work / "vckpt"
                ).wait()
        iterations = p.optimize.iterations
        for k in optimize_kills:
            series.append(
                run_series("optimize", k, work, launcher, rng, ckpt_dir, value_dir, params_file, iterations)
            )
        overlap = run_overlap(
            work,
            launcher,
            ckpt_dir,
            value_dir,
            params_file,
            iterations,
            sorted(work.glob("optimize-*-ref"))[0],
        )
    tried = sum(s["kills"] for s in series)
    return {
        "kills_tried": tried,
        "kills_survived": sum(s["kills"] for s in series if s["survived"]),
        "lost_iterations": sum(s.get("lost_iterations", 0) for s in series),
        "launcher": launcher,
        "seconds": round(time.perf_counter() - t0, 1),
        "series": series,
        "overlap": overlap,
        "setting": SMALL_PARAMS,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--launcher", choices=["fork", "cli"], default="fork")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = run_kill_campaign(args.quick, args.seed, args.launcher)
    text = json.dumps(out, indent=2)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    print(
        json.dumps(
            {k: out[k] for k in ("kills_tried", "kills_survived", "lost_iterations", "seconds")}
            | {"overlap_survived": out["overlap"]["survived"]}
        )
    )


if __name__ == "__main__":
    main()
