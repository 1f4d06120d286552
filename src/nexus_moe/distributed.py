"""torch.distributed glue, applied from outside the model (the model knows nothing of ranks).

Everything here is a no-op in a single process, so the trainer runs unchanged with or without
``torchrun``. Two ways to spread one training run over ranks:

* ``ddp``: every rank holds the whole model; gradients are averaged by DDP's all-reduce.
* ``fsdp``: FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded across
  ranks, one FSDP unit per transformer block plus the root (embeddings, final norm, lm_head).

Checkpoints are written by rank 0 as full (unsharded) single-file safetensors either way; under
FSDP the full state is gathered first (:func:`full_state`) and scattered back on resume
(:func:`load_full_model_state`, :func:`load_full_optimizer_state`). ``docs/scaling.md`` has the
launch commands, memory estimates and a design for expert parallelism.

The last section runs independent jobs (one dense expert per domain) side by side, one process
per GPU: :func:`assign_to_devices` and :func:`run_per_device`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nexus_moe.errors import NexusError

PARALLELISMS = ("ddp", "fsdp")
T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group (e.g. under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device.

    NCCL for CUDA tensors and gloo for CPU tensors ("cpu:gloo,cuda:nccl" on GPU machines, so the
    small CPU collectives of logging work too); gloo alone on CPU-only machines. Safe to call more
    than once. Each rank uses GPU ``LOCAL_RANK`` of its node.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# wrapping the model


def wrap_model(model: nn.Module, parallelism: str = "ddp") -> nn.Module:
    """Prepare ``model`` for data-parallel training; returns the module to call in training.

    Single process: ``model`` itself. ``ddp``: a DistributedDataParallel wrapper (``model`` stays
    the plain module for saving and evaluation). ``fsdp``: ``model`` itself, sharded in place by
    FSDP2 with one unit per transformer block (``model.model.layers``), then the root. Build the
    optimizer after this call: FSDP replaces the parameters by sharded DTensors.
    """
    if parallelism not in PARALLELISMS:
        raise NexusError(f"train.parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # Every expert runs (possibly on zero tokens) in every forward, so all parameters get a
    # gradient and find_unused_parameters can stay off. Buffers are synced once here but not
    # re-broadcast from rank 0 before every forward: the only ones that change are routing
    # statistics, which each rank keeps for its own tokens (the trainer sums the usage counters
    # across ranks when it logs them). Gradients are views into DDP's all-reduce buckets, which
    # saves one copy of them (4 bytes per parameter).
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, forward_sync_buffers=False, gradient_as_bucket_view=True
    )


# FSDP, DTensor and torch.distributed.checkpoint are imported only where they are used: together
# they add seconds to every start. A model can only be sharded once FSDP has been imported.


def _loaded(module: str, name: str) -> type | None:
    """``module.name`` when ``module`` has been imported already, else None."""
    return getattr(sys.modules[module], name) if module in sys.modules else None


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was sharded by FSDP2 (its parameters are DTensors)."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and isinstance(model, fsdp_module)


@contextlib.contextmanager
def no_sync_unless(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the last."""
    if is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(sync)
        yield
    elif sync or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        yield
    else:
        with wrapped.no_sync():
            yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (a plain scalar tensor); when
    ``max_norm`` > 0 the gradients are then scaled down so that their norm is at most that.

    The same computation as ``torch.nn.utils.clip_grad_norm_``; under FSDP the norm of the
    sharded gradients is reduced across ranks (``full_tensor``) before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(total, dtensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---------------------------------------------------------------------------------------------
# small collectives (no-ops in a single process)


def _collective_device() -> torch.device:
    # gloo serves CPU tensors; with NCCL alone they would have to be moved to the GPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(value: float) -> float:
    """Average a Python float over ranks (for logging)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left as it is)."""
    if not is_distributed():
        return tensor.clone()
    total = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank, so that all ranks take the same branch."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# full (unsharded) state for single-file checkpoints


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Full model state dict and optimizer state ``{parameter name: {"exp_avg": ...}}``.

    Under FSDP this is a collective (call it on every rank): the shards are gathered to CPU and
    only rank 0 gets the tensors, the other ranks get empty dicts. Otherwise the live tensors of
    ``model`` (the unwrapped module) are returned without a copy.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint import state_dict as dcp

        gather = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = dcp.get_model_state_dict(model, options=gather)
        optim_state = dcp.get_optimizer_state_dict(model, optimizer, options=gather)
        return model_state, dict(optim_state.get("state", {}))
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {
        names[id(param)]: {
            key: value if isinstance(value, torch.Tensor) else torch.tensor(value)
            for key, value in state.items()
        }
        for param, state in optimizer.state.items()
    }
    return dict(model.state_dict()), optim


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set a full (unsharded) state dict into ``model``; every rank passes the whole of it and,
    under FSDP, keeps its own shard."""
    if is_sharded(model):
        from torch.distributed.checkpoint import state_dict as dcp

        dcp.set_model_state_dict(model, state, options=dcp.StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Set optimizer state ``{parameter name: {"exp_avg": ...}}`` (as :func:`full_state` returns
    it) into ``optimizer``; under FSDP every rank passes all of it and keeps its own shard."""
    if is_sharded(model):
        from torch.distributed.checkpoint import state_dict as dcp

        names = {id(p): n for n, p in model.named_parameters()}
        groups = [
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[id(p)] for p in group["params"]],
            }
            for group in optimizer.param_groups
        ]
        dcp.set_optimizer_state_dict(
            model,
            optimizer,
            {"state": state, "param_groups": groups},
            options=dcp.StateDictOptions(full_state_dict=True),
        )
        return
    params = dict(model.named_parameters())
    for name, fields in state.items():
        if name not in params:
            raise NexusError(f"optimizer state names unknown parameter '{name}'")
        param = params[name]
        for key, value in fields.items():
            # Scalars ("step") stay on the CPU, as AdamW keeps them when not capturable.
            optimizer.state[param][key] = value.to(param.device) if value.ndim else value.clone()


# ---------------------------------------------------------------------------------------------
# independent jobs, one process per GPU


def assign_to_devices(items: Sequence[T], num_devices: int) -> list[list[T]]:
    """Split ``items`` into at most ``num_devices`` non-empty groups, round-robin in order.

    Item i goes to device ``i % n`` where ``n = min(num_devices, len(items))``, so with as many
    devices as items every device runs one, and with fewer the counts differ by at most one.
    """
    if num_devices < 1:
        raise NexusError(f"the number of devices must be >= 1 (got {num_devices})")
    used = min(num_devices, len(items))
    return [list(items[device::used]) for device in range(used)]


def run_per_device(commands: Sequence[Sequence[str]], log_dir: Path) -> None:
    """Run ``commands[i]`` with ``CUDA_VISIBLE_DEVICES=i``, all at once; wait for all of them.

    Each process sees exactly one GPU (as ``cuda:0``) and writes its output to
    ``log_dir/device<i>.log``. Raises NexusError naming the devices whose process failed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for device, command in enumerate(commands):
        log_path = log_dir / f"device{device}.log"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(device)}
        with open(log_path, "w") as log:  # the child keeps its own handle
            process = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
        running.append((device, process, log_path))
    failed = [
        f"device {device} (exit code {code}; see {log_path})"
        for device, process, log_path in running
        if (code := process.wait()) != 0
    ]
    if failed:
        raise NexusError("parallel run failed on " + ", ".join(failed))
