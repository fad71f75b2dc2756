"""The multi-process launcher of a data-parallel step: ``ctrl step NAME`` re-run with one process per GPU.

``ctrl step`` (pipelines/cli.py) and the KFP components of the multi-GPU steps (pretrain_value, ctrl_optimize)
both start their ranks here. The number of processes comes from ``CTRL_NUM_PROCESSES`` (the chart's placement
sets it to the step's GPU count), what starts them from ``CTRL_LAUNCHER``: torchrun or ``accelerate launch
--multi_gpu``. Both set RANK / WORLD_SIZE / MASTER_ADDR, which ``distributed.Dist.from_env`` reads.

Several nodes (a Kubeflow TrainJob whose command is ``ctrl step NAME`` on every node): each node runs one torchrun
agent with ``N`` processes, and the agents meet in torchrun's c10d rendezvous at ``HOST:PORT`` (:class:`Rendezvous`,
from ``ctrl step --nnodes/--rdzv-endpoint/...``, else ``CTRL_NNODES``/``CTRL_RDZV_ENDPOINT``/..., else the
``PET_*`` variables Kubeflow Trainer's torch runtime sets for torchrun). With ``max_restarts`` the agents restart
the whole group when a process or a node fails, and the step resumes from its newest checkpoint (resume.py): the
checkpoint folder must be shared by the nodes (the cache's ReadWriteMany volume). A step started by an outer
torchrun (RANK / WORLD_SIZE already set) runs as that rank and launches nothing.

Standard library only at module level (no click, kfp or torch): a component imports this in its task, and a
bad setting is a :class:`LaunchError` (a ``ValueError``) that the CLI turns into its usage error.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: environment variable telling a step how many processes (one per GPU) to launch
NUM_PROCESSES_ENV = "CTRL_NUM_PROCESSES"
#: environment variable naming what starts those processes, and its choices (``ctrl step --launcher``)
LAUNCHER_ENV = "CTRL_LAUNCHER"
LAUNCHERS = ("torchrun", "accelerate")
#: multi-node settings (``ctrl step --nnodes/--node-rank/--rdzv-endpoint/--rdzv-id/--max-restarts``)
NNODES_ENV = "CTRL_NNODES"
NODE_RANK_ENV = "CTRL_NODE_RANK"
RDZV_ENDPOINT_ENV = "CTRL_RDZV_ENDPOINT"
RDZV_ID_ENV = "CTRL_RDZV_ID"
MAX_RESTARTS_ENV = "CTRL_MAX_RESTARTS"
#: what Kubeflow Trainer's torch runtime sets on every node for torchrun (the fallbacks of the settings above;
#: torchrun reads PET_<OPTION> as its own --option): nodes, processes per node, this node's index, node 0's
#: address and port
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK = "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK"
PET_MASTER_ADDR, PET_MASTER_PORT = "PET_MASTER_ADDR", "PET_MASTER_PORT"
#: the module each process runs (``python -m pipelines.cli step ...``, i.e. ``ctrl step``): started as a
#: subprocess, never imported here
STEP_MODULE = "pipelines.cli"


class LaunchError(ValueError):
    """A data-parallel launch refused before any process starts; the message names the setting."""


def num_processes() -> int:
    """Processes a multi-GPU step runs on this node (the placement sets CTRL_NUM_PROCESSES to the step's GPU count;
    under Kubeflow Trainer, PET_NPROC_PER_NODE: a number, or auto/gpu for the GPUs this node sees)."""
    if os.environ.get(NUM_PROCESSES_ENV):
        return max(int(os.environ[NUM_PROCESSES_ENV]), 1)
    pet = os.environ.get(PET_NPROC_PER_NODE, "")
    if pet in ("auto", "gpu"):
        import torch

        return max(torch.cuda.device_count(), 1)
    if pet and not pet.isdigit():
        raise LaunchError(f"{PET_NPROC_PER_NODE}={pet!r}: expected a number of processes, auto or gpu")
    return max(int(pet or 1), 1)


@dataclass(frozen=True)
class Rendezvous:
    """How the torchrun agents of a step meet: ``nnodes`` nodes (one agent each) at the c10d store ``endpoint``
    (HOST:PORT, node 0 hosts it), named ``rdzv_id``; ``max_restarts``: how often the agents restart the whole group
    after a failed process or a lost node (each restart resumes from the newest checkpoint). The default is one
    node without restarts: torchrun --standalone."""

    nnodes: int = 1
    endpoint: str = ""
    rdzv_id: str = ""
    node_rank: int | None = None  # this node's index (0 hosts the store), when known
    max_restarts: int = 0

    def torchrun_args(self) -> list[str]:
        """torchrun's options for these settings, in place of --standalone on several nodes."""
        restarts = [f"--max-restarts={self.max_restarts}"] if self.max_restarts else []
        if self.nnodes == 1:
            return ["--standalone", *restarts]
        args = [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.rdzv_id}",
            *restarts,
        ]
        if self.node_rank is not None:
            # node 0 hosts the store, said outright: torch otherwise guesses from host names, and where every node
            # matches the endpoint's host (one machine, loopback) the first agent to start would host it
            args.append(f"--rdzv-conf=is_host={int(self.node_rank == 0)}")
        return args


def rendezvous(
    nnodes: int | None = None,
    endpoint: str | None = None,
    rdzv_id: str | None = None,
    node_rank: int | None = None,
    max_restarts: int | None = None,
    default_id: str = "ctrl-step",
) -> Rendezvous:
    """The settings given, else CTRL_NNODES / CTRL_RDZV_ENDPOINT / CTRL_RDZV_ID / CTRL_NODE_RANK /
    CTRL_MAX_RESTARTS, else Kubeflow Trainer's PET_NNODES / PET_MASTER_ADDR:PET_MASTER_PORT / PET_NODE_RANK.
    ``default_id`` names the rendezvous when nothing does (the store at the endpoint belongs to one job)."""
    env = os.environ

    def number(value, *names: str) -> int | None:
        if value is not None:
            return int(value)
        for name in names:
            if env.get(name, "").strip():
                try:
                    return int(env[name])
                except ValueError:
                    raise LaunchError(f"{name}={env[name]!r}: expected a whole number") from None
        return None

    nodes = number(nnodes, NNODES_ENV, PET_NNODES) or 1
    restarts = number(max_restarts, MAX_RESTARTS_ENV) or 0
    if nodes < 1 or restarts < 0:
        raise LaunchError(f"{nodes} nodes, {restarts} restarts: expected at least 1 node and 0 restarts")
    if nodes == 1:
        return Rendezvous(max_restarts=restarts)
    if not endpoint:
        endpoint = env.get(RDZV_ENDPOINT_ENV, "")
    if not endpoint and env.get(PET_MASTER_ADDR):
        endpoint = f"{env[PET_MASTER_ADDR]}:{env.get(PET_MASTER_PORT) or 29400}"
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(
            f"{nodes} nodes need the rendezvous endpoint HOST:PORT of node 0 (--rdzv-endpoint, "
            f"{RDZV_ENDPOINT_ENV}, or {PET_MASTER_ADDR} and {PET_MASTER_PORT}); got {endpoint!r}"
        )
    rank = number(node_rank, NODE_RANK_ENV, PET_NODE_RANK)
    if rank is not None and not 0 <= rank < nodes:
        raise LaunchError(f"node rank {rank} of {nodes} nodes: expected 0 to {nodes - 1}")
    return Rendezvous(nodes, endpoint, rdzv_id or env.get(RDZV_ID_ENV) or default_id, rank, restarts)


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


def launcher_name(launcher: str | None = None, rdzv: Rendezvous | None = None) -> str:
    """``launcher``, else $CTRL_LAUNCHER, else torchrun; one of ``LAUNCHERS``, and torchrun for several nodes or
    restarts (``rdzv``)."""
    name = launcher or os.environ.get(LAUNCHER_ENV, "") or "torchrun"
    if name not in LAUNCHERS:
        raise LaunchError(f"{LAUNCHER_ENV}={name!r}: choose one of {LAUNCHERS}")
    if name == "accelerate" and rdzv not in (None, Rendezvous()):
        raise LaunchError("several nodes and --max-restarts are torchrun's: use the torchrun launcher")
    return name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    n: int, step_argv: list[str], launcher: str | None = None, rdzv: Rendezvous | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start this node's ``n`` processes of ``ctrl step`` (see
    :func:`launch_data_parallel`)."""
    rdzv = rdzv or Rendezvous()
    if launcher_name(launcher, rdzv) == "accelerate":
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
            *rdzv.torchrun_args(),
            f"--nproc_per_node={n}",
            "-m",
            STEP_MODULE,
            *step_argv,
        ]
    # our options are the whole launch: torchrun would read a PET_<OPTION> left in the environment as its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")} | {NUM_PROCESSES_ENV: "1"}
    if rdzv != Rendezvous():
        # a fresh bootstrap store every rendezvous round: with the agent's store shared across rounds (torch's
        # default) a group re-formed after a failure deadlocks when a replaced node joins it (the surviving rank-0
        # agent never republishes MASTER_ADDR for the new round; pytorch/pytorch#135712 for its other failures)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return cmd, env


def launch_data_parallel(
    n: int, step_argv: list[str], launcher: str | None = None, rdzv: Rendezvous | None = None
) -> int:
    """Re-run this ``ctrl step`` under torchrun or ``accelerate launch --multi_gpu`` with one process per GPU
    (gloo on the CPU, NCCL on GPUs). Both set RANK / WORLD_SIZE / MASTER_ADDR for ``Dist.from_env``; ranks
    synchronise gradients (ctrl_core/distributed.py) and rank 0 writes checkpoints and outputs. accelerate's
    own mixed precision and dynamo are off: model.autocast and model.compile are the run's settings.
    ``rdzv``: this node's agent joins the other nodes' (torchrun only). Returns the launcher's exit code."""
    import subprocess

    cmd, env = launch_command(n, step_argv, launcher, rdzv)
    nodes = f" on this node, one of {rdzv.nnodes}" if rdzv and rdzv.nnodes > 1 else ""
    print(f"launching {n} processes{nodes}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
