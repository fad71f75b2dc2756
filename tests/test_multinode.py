"""A step on several nodes (issue 18 items 2 and 3): two torchrun agents on loopback stand in for two nodes.

Each "node" is what a TrainJob's pod runs: ``ctrl step optimize ... --nnodes 2`` with two processes, its torchrun
agent meeting the other node's in the c10d rendezvous; gloo on the CPU stands in for NCCL, one shared folder for
the cache's ReadWriteMany volume. The four processes must compute what one process computes with the same global
batch (up to float summation order), and only global rank 0 may write the outputs and checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

PARAMS = {  # test_distributed.py's sizes (the global batch of 8 splits over 4 processes); DDPO: no value net to fit
    "optimize": {
        "algorithm": "ddpo",
        "iterations": 3,
        "batch_size": 8,
        "train_steps": 8,
        "train_timesteps": 3,
        "minibatch_size": 4,
        "checkpoint_every": 1,
        "lr": 3e-4,
    },
}
RANK_LINE = re.compile(
    r"ctrl: process (\d) of 4: local rank (\d) of 2 on node (\d), gloo, restart (\d), pid (\d+)"
)
ADAPTER = "adapter/adapter_model.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(work: Path, checkpoints: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CTRL_CHECKPOINT_ROOT": str(work / checkpoints)}


class Node:
    """One node's pod: ``ctrl step optimize`` with two processes on two nodes, its output in files."""

    def __init__(
        self, work: Path, rank: int, port: int, out: str, checkpoints: str, *extra: str, tag: str = ""
    ):
        self.log = work / f"{out}-node{rank}{tag}"
        cmd = [sys.executable, "-m", "pipelines.cli", "step", "optimize", "--params", str(work / "params.yaml"),
               "--checkpoint", str(work / "checkpoint"),
               "--optimize-dir", str(work / out), "--num-processes", "2", "--nnodes", "2",
               "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", out, *extra]  # fmt: skip
        with open(f"{self.log}.out", "w") as out_fh, open(f"{self.log}.err", "w") as err_fh:
            self.proc = subprocess.Popen(cmd, env=_env(work, checkpoints), stdout=out_fh, stderr=err_fh)

    def wait(self) -> int:
        return self.proc.wait(timeout=300)

    @property
    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()

    def ranks(self) -> list[tuple[int, ...]]:
        """(global rank, local rank, node, restart, pid) of each process this node started (distributed.py logs)."""
        return [tuple(map(int, m)) for m in RANK_LINE.findall(self.stderr)]

    def lose(self) -> None:
        """The node is lost: every process of the pod dies at once (SIGKILL), the agent's workers too (they run in
        sessions of their own, so a process-group kill would leave them running)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(stat.parent.name))
        tree, todo = [], [self.proc.pid]
        while todo:
            tree.append(todo.pop())
            todo += children.get(tree[-1], [])
        for pid in tree:  # the pod's command and the agent first: nothing is left to restart the workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def _summaries(*nodes: Node) -> list[dict]:
    """What the processes printed: the step's summary (global rank 0) or {"rank", "iterations"} (the others)."""
    text = "".join(n.stdout for n in nodes)
    dec, out, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        obj, end = dec.raw_decode(text, i)
        out.append(obj)
        i = text.find("{", end)
    return out


def _rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors (see test_distributed.py: Adam makes elementwise checks meaningless)."""
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (num / sum(float(a[k].double().pow(2).sum()) for k in a)) ** 0.5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The fetched checkpoint and the one-process run to compare with (run here, in this process)."""
    from ctrl_core import params, steps

    work = tmp_path_factory.mktemp("multinode")
    (work / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    run = params.load(work / "params.yaml")
    steps.fetch(run, work / "checkpoint")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CHECKPOINT_ROOT", str(work / "ckpt-1"))
        steps.optimize(run, work / "checkpoint", None, work / "one")
    return work


@pytest.fixture(scope="module")
def two_nodes(work) -> tuple[Node, Node]:
    """The uninterrupted run: two nodes of two processes."""
    port = _free_port()
    nodes = Node(work, 0, port, "two-nodes", "ckpt-4"), Node(work, 1, port, "two-nodes", "ckpt-4")
    for node in nodes:
        assert node.wait() == 0, node.stderr[-3000:]
    return nodes


@pytest.mark.slow
def test_two_nodes_of_two_processes_equal_one_process(work, two_nodes):
    # each node started its two processes: local ranks 0 and 1 there, global ranks 0..3 over both
    ranks = [node.ranks() for node in two_nodes]
    assert all(sorted(r[1] for r in node) == [0, 1] for node in ranks), ranks
    assert sorted(r[0] for node in ranks for r in node) == [0, 1, 2, 3], ranks
    assert [{r[2] for r in node} for node in ranks] in ([{0}, {1}], [{1}, {0}]), (
        ranks
    )  # one node id per agent
    # only global rank 0 wrote the outputs (and the checkpoints: the same `dist.is_main`); the others trained along
    printed = _summaries(*two_nodes)
    assert sorted(p["rank"] for p in printed if "rank" in p) == [1, 2, 3], printed
    (summary,) = [p for p in printed if "final_reward" in p]
    main = next(node for node, rs in zip(two_nodes, ranks, strict=True) if any(r[0] == 0 for r in rs))
    assert '"final_reward"' in main.stdout
    assert summary == json.loads((work / "two-nodes" / "metrics.json").read_text())["summary"]
    assert (
        summary["processes"] == 4 and summary["ranks_identical"] and summary["resumed_from_iteration"] is None
    )
    assert not list((work / "ckpt-4").rglob("ckpt-*")), "the committed step clears its checkpoints"
    # the four processes reproduce the one-process update, to float summation order
    one, four = (load_file(str(work / d / ADAPTER)) for d in ("one", "two-nodes"))
    b1, b4 = ({k: t for k, t in a.items() if "lora_B" in k} for a in (one, four))  # lora_B: the update itself
    assert sum(float(t.abs().sum()) for t in b1.values()) > 0
    assert _rel_diff(b1, b4) < 1e-3 and any(not torch.equal(b1[k], b4[k]) for k in b1)  # really 4 processes
    h1, h4 = (json.loads((work / d / "metrics.json").read_text())["history"] for d in ("one", "two-nodes"))
    assert [r["reward_mean"] for r in h4] == pytest.approx([r["reward_mean"] for r in h1], rel=1e-4)


@pytest.mark.slow
def test_a_lost_node_restarts_the_group_which_resumes_to_the_uninterrupted_adapter(work, two_nodes):
    """Elastic restart, as Kubernetes runs it: a TrainJob's node is a pod (``ctrl step`` with --max-restarts, its
    torchrun agent and workers). The node is lost after the first checkpoint: all its processes die at once. The
    Job controller replaces the pod with one running the same command (a TrainJob/JobSet node Job with a
    backoffLimit); meanwhile the surviving node's processes fail on the broken collective, its agent restarts
    them (one of its --max-restarts) and waits in the c10d rendezvous until the replacement joins. The new
    group resumes from the newest checkpoint in the shared folder and must end with bitwise the uninterrupted
    run's adapter."""
    port, ckpt = _free_port(), work / "ckpt-elastic"
    node0 = Node(work, 0, port, "elastic", "ckpt-elastic", "--max-restarts", "1")
    node1 = Node(work, 1, port, "elastic", "ckpt-elastic", "--max-restarts", "1")
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("optimize/*/ckpt-00000001")):
        assert node0.proc.poll() is None and node1.proc.poll() is None, (
            node0.stderr[-2000:] + node1.stderr[-2000:]
        )
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    node1.lose()
    (lease,) = [json.loads(p.read_text()) for p in ckpt.glob("optimize/*/.lease.json")]
    replacement = Node(work, 1, port, "elastic", "ckpt-elastic", "--max-restarts", "1", tag="-replaced")
    assert node0.wait() == 0, node0.stderr[-3000:]
    assert replacement.wait() == 0, replacement.stderr[-3000:]
    # the lease (the checkpoints' one writer) was global rank 0's of the first attempt
    first = [r for r in node0.ranks() + node1.ranks() if r[3] == 0 and r[0] == 0]
    assert [r[4] for r in first] == [lease["pid"]], (first, lease)
    # the surviving node restarted its processes once; with the replacement they form the group again
    assert sorted(r[3] for r in node0.ranks()) == [0, 0, 1, 1], node0.stderr[-3000:]
    second = [r for r in node0.ranks() if r[3] == 1] + replacement.ranks()
    assert sorted(r[0] for r in second) == [0, 1, 2, 3], second
    printed = _summaries(node0, replacement)
    (summary,) = [p for p in printed if "final_reward" in p]
    assert summary["resumed_from_iteration"] in (1, 2) and summary["processes"] == 4, summary
    assert not list(ckpt.rglob("ckpt-*")), "the committed step clears its checkpoints"
    # resumed: bitwise the uninterrupted two-node run (same four ranks, same summation order)
    done, elastic = (load_file(str(work / d / ADAPTER)) for d in ("two-nodes", "elastic"))
    assert done.keys() == elastic.keys() and all(torch.equal(done[k], elastic[k]) for k in done)
    h4, he = (
        json.loads((work / d / "metrics.json").read_text())["history"] for d in ("two-nodes", "elastic")
    )
    assert [r["reward_mean"] for r in he] == [r["reward_mean"] for r in h4]


# --- the launch itself (no process started) -------------------------------------------------------------------
def test_one_node_keeps_its_command_and_several_nodes_meet_at_node_0(monkeypatch):
    from ctrl_core import launch

    for name in [k for k in os.environ if k.startswith(("PET_", "CTRL_"))]:
        monkeypatch.delenv(name)
    argv = ["step", "optimize"]
    cmd, env = launch.launch_command(4, argv)
    # one node: the command of before, bitwise
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
                   "pipelines.cli", *argv]  # fmt: skip
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env and env["CTRL_NUM_PROCESSES"] == "1"
    assert launch.rendezvous() == launch.Rendezvous()
    # Kubeflow Trainer's torch runtime: PET_* on every pod; our own settings win, options over variables
    monkeypatch.setenv("PET_NNODES", "3")
    monkeypatch.setenv("PET_NODE_RANK", "2")
    monkeypatch.setenv("PET_MASTER_ADDR", "job-node-0-0.job")
    monkeypatch.setenv("PET_MASTER_PORT", "29400")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    rdzv = launch.rendezvous(default_id="ctrl-optimize")
    assert rdzv == launch.Rendezvous(3, "job-node-0-0.job:29400", "ctrl-optimize", 2, 0)
    assert launch.num_processes() == 2
    cmd, env = launch.launch_command(launch.num_processes(), argv, rdzv=rdzv)
    assert cmd[3:10] == ["--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=job-node-0-0.job:29400",
                         "--rdzv-id=ctrl-optimize", "--rdzv-conf=is_host=0", "--nproc_per_node=2", "-m"]  # fmt: skip
    assert not any(k.startswith("PET_") for k in env) and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    monkeypatch.setenv("CTRL_NNODES", "2")
    monkeypatch.setenv("CTRL_MAX_RESTARTS", "3")
    monkeypatch.setenv("CTRL_NUM_PROCESSES", "1")
    rdzv = launch.rendezvous(node_rank=0, rdzv_id="run-7")
    assert (
        rdzv == launch.Rendezvous(2, "job-node-0-0.job:29400", "run-7", 0, 3) and launch.num_processes() == 1
    )
    assert "--max-restarts=3" in rdzv.torchrun_args() and "--rdzv-conf=is_host=1" in rdzv.torchrun_args()
    # one node with restarts: still --standalone
    assert launch.rendezvous(nnodes=1).torchrun_args() == ["--standalone", "--max-restarts=3"]
    with pytest.raises(launch.LaunchError, match="torchrun's"):
        launch.launch_command(2, argv, "accelerate", rdzv)
    for name in ("PET_MASTER_ADDR", "PET_MASTER_PORT"):
        monkeypatch.delenv(name)
    with pytest.raises(launch.LaunchError, match="2 nodes need the rendezvous endpoint HOST:PORT"):
        launch.rendezvous()
    with pytest.raises(launch.LaunchError, match="node rank 2 of 2 nodes"):
        launch.rendezvous(endpoint="h:1", node_rank=2)
    monkeypatch.setenv("PET_NPROC_PER_NODE", "cpu")
    monkeypatch.delenv("CTRL_NUM_PROCESSES")
    with pytest.raises(launch.LaunchError, match="PET_NPROC_PER_NODE='cpu'"):
        launch.num_processes()


def test_ctrl_step_refuses_a_bad_multi_node_launch_before_starting_anything(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    def step(*args: str, **env: str):
        return CliRunner().invoke(
            main, ["step", "optimize", "--set", "optimize.batch_size=8", *args], env=env
        )

    res = step("--nnodes", "2")
    assert res.exit_code == 2 and "need the rendezvous endpoint" in res.output
    res = step("--nnodes", "3", "--rdzv-endpoint", "127.0.0.1:1")
    assert (
        res.exit_code == 2
        and "optimize.batch_size = 8: must be a multiple of the number of processes (3)" in (res.output)
    )
    res = step("--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1", "--launcher", "accelerate")
    assert res.exit_code == 2 and "torchrun's" in res.output
    assert "launching" not in res.output


def test_a_rank_of_an_outer_torchrun_runs_the_step_itself(work):
    """Kubeflow Trainer may start ``ctrl step`` under its own torchrun: RANK / WORLD_SIZE are set, so the step runs
    as that rank and launches nothing, whatever PET_* says (here the one rank of a world of one)."""
    from click.testing import CliRunner

    from pipelines.cli import main

    env = {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "PET_NNODES": "2",
        "CTRL_CHECKPOINT_ROOT": str(work / "ckpt-outer"),
    }
    args = ["step", "optimize", "--params", str(work / "params.yaml"), "--set", "optimize.iterations=1",
            "--checkpoint", str(work / "checkpoint"), "--optimize-dir", str(work / "outer"), "--num-processes", "2"]  # fmt: skip
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 0, res.output
    assert "launching" not in res.output and json.loads(res.stdout)["processes"] == 1  # (events: stderr)
