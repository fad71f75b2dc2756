"""Data parallelism for the trainer: one process per GPU, gradients of the LoRA adapter and of the value net
all-reduced before every optimiser step.

Every rank draws the random numbers of the *global* batch from the same seeded generator (initial noise,
conditions, per-step noise, minibatch permutations) and computes only its own rows. The W-process run is
therefore the one-process run with the same global batch, split: it differs only by floating-point summation
order, and every rank holds bitwise the same weights after each step (the all-reduced gradients are the same
bits everywhere). Batch statistics (advantage normalisation, DDPO's per-prompt whitening, logged rewards)
are computed on rows gathered from all ranks, and so are the value net's training data.

Launch with ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``, or on several
nodes with one torchrun agent per node (launch.py): they set RANK / WORLD_SIZE (global: the rank picks the rows,
rank 0 writes checkpoints and outputs to the shared folder), LOCAL_RANK / LOCAL_WORLD_SIZE (this node's: the local
rank picks the GPU) and MASTER_ADDR, which ``Dist.from_env`` reads (NCCL on GPUs, gloo on the CPU). Nothing but
the GPU choice depends on the node: the W processes of N nodes compute what W processes of one node would.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group: ``rank`` of ``world`` over all nodes, and ``local_rank`` of
    ``local_world`` on its own node (the GPU it uses)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if not tdist.is_initialized():
            # gloo for CPU tensors (counters, flags, fingerprints) and NCCL for CUDA tensors: a bare "nccl" group
            # has no backend for the CPU tensors the trainer also reduces
            backend = "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(_node_gpu(local_rank))
                backend = "cpu:gloo,cuda:nccl"
            tdist.init_process_group(backend=backend)
            # GROUP_RANK: the index the rendezvous gave this node (not necessarily its --node-rank)
            env = os.environ
            sys.stderr.write(  # one write, line and newline: the node's processes share its stderr
                f"ctrl: process {tdist.get_rank()} of {tdist.get_world_size()}: local rank {local_rank} of "
                f"{local_world} on node {env.get('GROUP_RANK', '?')}, {backend}, "
                f"restart {env.get('TORCHELASTIC_RESTART_COUNT', '0')}, pid {os.getpid()}\n"
            )
            sys.stderr.flush()
        return cls(tdist.get_rank(), tdist.get_world_size(), local_rank, local_world)

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process of all nodes that writes checkpoints and outputs."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n (n must be a multiple of the world size)."""
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split over {self.world} processes")
        b = n // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate every rank's (b, ...) tensor along dim 0, in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_blocks(self, t: Tensor, blocks: int) -> Tensor:
        """``t`` is ``blocks`` consecutive row blocks of b rows (one per training step); returns the blocks of the
        global batch in the one-process order (block-major, then ranks)."""
        if self.world == 1:
            return t
        per = t.reshape(blocks, -1, *t.shape[1:])
        full = self.gather_rows(per.transpose(0, 1).contiguous())  # (W * b, blocks, ...)
        b = per.shape[1]
        return (
            full.reshape(self.world, b, blocks, *t.shape[1:])
            .permute(2, 0, 1, *range(3, t.dim() + 2))
            .reshape(-1, *t.shape[1:])
        )

    def sum(self, value: float | Tensor) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def sync_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks (each rank's loss is already divided by the global count)."""
        if self.world == 1:
            return
        params = list(params)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
        tdist.all_reduce(
            present
        )  # a parameter no rank has a gradient for keeps grad None (no optimiser step)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        tdist.all_reduce(flat)
        i = 0
        for p, seen in zip(params, present.tolist(), strict=True):
            n = p.numel()
            p.grad = flat[i : i + n].view_as(p).clone() if seen > 0 else None
            i += n

    def identical(self, tensors: Iterable[Tensor]) -> bool:
        """Do all ranks hold bitwise the same tensors? (a cheap guard against unsynchronised gradients)"""
        if self.world == 1:
            return True
        import hashlib

        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        mine = torch.tensor(list(h.digest()[:16]), dtype=torch.int64)
        return bool((self.gather_rows(mine[None]) == mine).all())

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()


def _node_gpu(local_rank: int) -> int:
    """The GPU of the process with this node-local rank: a node runs one process per GPU it sees."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank}, but this node sees {count} GPU(s): run at most one process per GPU "
            "(--num-processes / CTRL_NUM_PROCESSES, per node)"
        )
    return local_rank
