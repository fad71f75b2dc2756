"""The multi-process launcher of a data-parallel step: ``ctrl step NAME`` re-run with one process per GPU.

``ctrl step`` (pipelines/cli.py) and the KFP components of the multi-GPU steps (pretrain_value, ctrl_optimize)
both start their ranks here. The number of processes comes from ``CTRL_NUM_PROCESSES`` (the chart's placement
sets it to the step's GPU count), what starts them from ``CTRL_LAUNCHER``: torchrun or ``accelerate launch
--multi_gpu``. Both set RANK / WORLD_SIZE / MASTER_ADDR, which ``distributed.Dist.from_env`` reads.

Standard library only at module level (no click, kfp or torch): a component imports this in its task, and a
bad setting is a :class:`LaunchError` (a ``ValueError``) that the CLI turns into its usage error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: environment variable telling a step how many processes (one per GPU) to launch
NUM_PROCESSES_ENV = "CTRL_NUM_PROCESSES"
#: environment variable naming what starts those processes, and its choices (``ctrl step --launcher``)
LAUNCHER_ENV = "CTRL_LAUNCHER"
LAUNCHERS = ("torchrun", "accelerate")
#: the module each process runs (``python -m pipelines.cli step ...``, i.e. ``ctrl step``): started as a
#: subprocess, never imported here
STEP_MODULE = "pipelines.cli"


class LaunchError(ValueError):
    """A data-parallel launch refused before any process starts; the message names the setting."""


def num_processes() -> int:
    """Processes a multi-GPU step runs (the placement sets CTRL_NUM_PROCESSES to the step's GPU count)."""
    return max(int(os.environ.get(NUM_PROCESSES_ENV, "1") or 1), 1)


def check_split(params, name: str, n: int) -> None:
    """Every rank computes its equal share of the global batches: refuse sizes that do not split over n."""
    if name == "pretrain_value":
        sizes = {"value.num_paths": params.value.num_paths, "value.batch_size": params.value.batch_size}
    elif params.optimize.algorithm == "qlearning":
        sizes = {"qlearning.batch_size": params.qlearning.batch_size}
    else:
        sizes = {"optimize.batch_size": params.optimize.batch_size}
    bad = [f"{k} = {v}" for k, v in sizes.items() if v % n]
    if bad:
        raise LaunchError(f"{', '.join(bad)}: must be a multiple of the number of processes ({n})")


def run_step_data_parallel(
    name: str, params_json: str, checkpoint: str, out_dir: str, value_dir: str | None = None
) -> dict:
    """For the KFP components: run ``ctrl step NAME`` over ``num_processes()`` processes and return the step's
    result (read back from the outputs rank 0 wrote)."""
    import tempfile

    import yaml

    from .params import from_json

    check_split(from_json(params_json), name, num_processes())
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(yaml.safe_dump(json.loads(params_json)))  # (PyYAML reads JSON's 1e-05 as a string)
    argv = [
        "step",
        name,
        "--params",
        fh.name,
        "--checkpoint",
        checkpoint,
        "--num-processes",
        str(num_processes()),
    ]
    argv += (
        ["--value", value_dir or out_dir]
        if name == "pretrain_value"
        else ["--value", value_dir or "", "--optimize-dir", out_dir]
    )
    if name == "pretrain_value":
        argv[argv.index("--value") + 1] = out_dir
    try:
        code = launch_data_parallel(num_processes(), argv)
    finally:
        os.unlink(fh.name)
    if code != 0:
        raise RuntimeError(f"ctrl step {name} failed on {num_processes()} processes (exit code {code})")
    if name == "pretrain_value":
        return json.loads((Path(out_dir) / "link.json").read_text())
    return json.loads((Path(out_dir) / "metrics.json").read_text())["summary"]


def launcher_name(launcher: str | None = None) -> str:
    """``launcher``, else $CTRL_LAUNCHER, else torchrun; one of ``LAUNCHERS``."""
    name = launcher or os.environ.get(LAUNCHER_ENV, "") or "torchrun"
    if name not in LAUNCHERS:
        raise LaunchError(f"{LAUNCHER_ENV}={name!r}: choose one of {LAUNCHERS}")
    return name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_data_parallel(n: int, step_argv: list[str], launcher: str | None = None) -> int:
    """Re-run this ``ctrl step`` under torchrun or ``accelerate launch --multi_gpu`` with one process per GPU
    (gloo on the CPU, NCCL on GPUs). Both set RANK / WORLD_SIZE / MASTER_ADDR for ``Dist.from_env``; ranks
    synchronise gradients (ctrl_core/distributed.py) and rank 0 writes checkpoints and outputs. accelerate's
    own mixed precision and dynamo are off: model.autocast and model.compile are the run's settings.
    Returns the launcher's exit code."""
    import subprocess

    if launcher_name(launcher) == "accelerate":
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={n}",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={_free_port()}",
            "-m",
            STEP_MODULE,
            *step_argv,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            STEP_MODULE,
            *step_argv,
        ]
    print(f"launching {n} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env={**os.environ, NUM_PROCESSES_ENV: "1"})
