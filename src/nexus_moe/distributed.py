"""torch.distributed glue, applied from outside the model (the model knows nothing of ranks).

Everything here is a no-op in a single process, so the trainer runs unchanged with or without
``torchrun``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device.

    NCCL on GPUs, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def wrap_model(model: nn.Module) -> nn.Module:
    """DDP-wrap ``model`` when running distributed; the model itself otherwise."""
    if not is_distributed():
        return model
    device_ids = [model.lm_head.weight.device.index] if torch.cuda.is_available() else None
    # Every expert runs (possibly on zero tokens) in every forward, so all parameters get a
    # gradient and find_unused_parameters can stay off.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def no_sync_unless(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-batches that are not the last."""
    if sync or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        yield
    else:
        with wrapped.no_sync():
            yield


def mean_across_ranks(value: float) -> float:
    """Average a Python float over ranks (for logging)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
