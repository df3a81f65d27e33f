"""Multi-process training (accelerate / torchrun: DDP, FSDP, DeepSpeed ZeRO-3): who am I, and the few
collectives the stages need outside the trainers.

Ranks come from the environment the launchers set (RANK, WORLD_SIZE, LOCAL_RANK), so these work
before and after torch.distributed is initialised, and in a plain one-process run (rank 0 of 1).
Rule of the stages: every rank trains (and checkpoints, through its Trainer); only rank 0 writes
reports, published models, MLflow runs and registry entries; a barrier separates what rank 0 writes
from what the others then read.
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _initialised() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in one process or before the process group exists)."""
    if _initialised():
        import torch.distributed as dist

        dist.barrier()


def all_reduce(tensor, op: str = "sum"):
    """The tensor reduced over ranks (sum or max) on every rank; the tensor itself in one process.
    Works for CPU (gloo) and CUDA (nccl) tensors."""
    if not _initialised():
        return tensor
    import torch.distributed as dist

    out = tensor.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if not _initialised():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cpu_checkpoint_loading():
    """Context for Trainer.train(resume_from_checkpoint=...) under several CPU processes.

    On multi-CPU (gloo) runs transformers gives each rank the device `cpu:<rank>` and resumes its
    optimizer with `torch.load(..., map_location=args.device)`, which torch cannot map ("don't know how
    to restore data location ... cpu:1"). Inside this context a CPU map_location with an index is read
    as plain "cpu"; everything else is untouched. A no-op in one process."""
    import contextlib

    import torch

    if world_size() == 1:
        return contextlib.nullcontext()
    original = torch.load

    def load(*args, **kwargs):
        loc = kwargs.get("map_location")
        if isinstance(loc, torch.device) and loc.type == "cpu":
            kwargs["map_location"] = "cpu"
        elif isinstance(loc, str) and loc.startswith("cpu:"):
            kwargs["map_location"] = "cpu"
        return original(*args, **kwargs)

    @contextlib.contextmanager
    def patched():
        torch.load = load
        try:
            yield
        finally:
            torch.load = original

    return patched()
