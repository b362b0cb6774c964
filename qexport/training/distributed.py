"""torch.distributed for the training loop: process-group setup from torchrun's environment, and the few
collectives a method needs (gradient and buffer averaging, rank-0 broadcast, gathering per-rank objects).

Every helper is a no-op in a single process, so a method calls them unconditionally.

    torchrun --nproc-per-node 2 --no-python qexport calibrate MODEL --method adasg -o OUT

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
reads them and joins the group (gloo on CPUs, NCCL on GPUs, one GPU per local rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as tdist

from qexport.errors import QexportError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 writes files and shows progress).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: this process's torch device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives must run (several processes in an initialised group)."""
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` items (the first ``n % world`` ranks take one more).

        Args:
            n: total items (a batch, a sample set).

        Returns:
            (start, stop).
        """
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


SINGLE = DistInfo()


def init_from_env(device: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (nothing to do without it).

    Args:
        device: the resolved device of the run (``cpu`` or ``cuda``); with CUDA each process takes
            ``cuda:LOCAL_RANK`` and the NCCL backend, otherwise gloo.

    Returns:
        This process's DistInfo (rank 0 of 1 outside torchrun).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise QexportError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                               "as many processes per node as GPUs, or use --device cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local, device=device)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (after a last barrier so that rank 0 finishes writing first)."""
    if info.active:
        tdist.barrier()
        tdist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.active:
        tdist.barrier()


def average_(info: DistInfo, tensors: Iterable[torch.Tensor | None]) -> None:
    """Average tensors across ranks in place (one flat all-reduce; floating tensors only, None skipped).

    This is what DistributedDataParallel does to gradients after ``backward()``; methods that take gradients with
    ``torch.autograd.grad`` (AdaSG's two players) call it on those gradients before their optimizer steps.

    Args:
        info: the job.
        tensors: gradients or buffers.
    """
    if not info.active:
        return
    ts = [t for t in tensors if t is not None and t.is_floating_point()]
    if not ts:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in ts])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= info.world_size
    i = 0
    with torch.no_grad():
        for t in ts:
            n = t.numel()
            t.copy_(flat[i : i + n].view_as(t).to(t.dtype))
            i += n


def average_buffers_(info: DistInfo, modules: Iterable[torch.nn.Module]) -> None:
    """Average the floating buffers (BatchNorm running statistics) of ``modules`` across ranks."""
    average_(info, [b for m in modules for b in m.buffers()])


def broadcast_modules_(info: DistInfo, modules: Iterable[torch.nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``modules``."""
    if not info.active:
        return
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                tdist.broadcast(t.data, src=src)


def broadcast_object(info: DistInfo, obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled; e.g. a checkpoint read on rank 0)."""
    if not info.active:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(info: DistInfo, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (a single process gets ``[obj]``)."""
    if not info.active:
        return [obj]
    out: list = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def max_(info: DistInfo, values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over ranks (how ranks agree on 'stop now' and on elapsed time)."""
    if not info.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def wrap_ddp(info: DistInfo, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when several processes train it (methods that call ``backward()``).

    Args:
        info: the job.
        module: the trained module (already on ``info.device``).

    Returns:
        The DDP wrapper, or ``module`` itself in a single process.
    """
    if not info.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(info.device).index] if info.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def mean_values(info: DistInfo, values: list[float]) -> list[float]:
    """Mean of ``values`` over ranks, element-wise, in float64 (a single process gets them back unchanged)."""
    if not info.active or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return (t / info.world_size).tolist()
