"""Writing a Hugging Face model's weights as (sharded) safetensors (docs/design.md §15).

Shards are planned from the shapes alone (``huggingface_hub``'s splitter over meta tensors, in
the mapping's order), then each file is written tensor by tensor from the plan's producers, so
peak memory is about one tensor however large the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from nexus_moe.hf.folder import INDEX_FILE
from nexus_moe.hf.mapping import Plan
from nexus_moe.io_utils import write_json
from nexus_moe.safetensors_io import TensorSpec, storage_order, write_safetensors

DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes per safetensors file


def write_shards(folder: Path, plan: Plan, dtype: torch.dtype, max_shard_size: int) -> None:
    """Write every tensor of ``plan`` in ``dtype`` into ``folder`` as ``model.safetensors``, or
    as shards plus ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes.
    Tensors are dropped from ``plan`` once written (releasing any held in memory)."""
    split = split_torch_state_dict_into_shards(
        {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, _) in plan.items()},
        max_shard_size=max_shard_size,
    )
    total_size = 0
    for file_name, names in split.filename_to_tensors.items():
        specs = [TensorSpec(name, dtype, plan[name][0], plan[name][1]) for name in names]
        specs = storage_order(specs)
        write_safetensors(folder / file_name, specs, metadata={"format": "pt"})
        total_size += sum(spec.nbytes for spec in specs)
        for name in names:
            plan.pop(name)
    if split.is_sharded:
        write_json(
            folder / INDEX_FILE,
            {
                "metadata": {"total_size": total_size},
                "weight_map": dict(sorted(split.tensor_to_filename.items())),
            },
        )
