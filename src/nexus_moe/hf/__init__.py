"""Hugging Face ``transformers`` interop: import and export checkpoints (docs/design.md §15).

One concern per module, imported downwards in this order:

* :mod:`~nexus_moe.hf.formats`: the supported formats (``model_type``), one description each;
* :mod:`~nexus_moe.hf.config`: ``config.json`` <-> :class:`~nexus_moe.config.ModelConfig`;
* :mod:`~nexus_moe.hf.mapping`: tensor names and values, written once per format and used by
  import and export, in memory and streamed;
* :mod:`~nexus_moe.hf.folder` and :mod:`~nexus_moe.hf.gguf`: where the tensors come from (a
  folder of safetensors, a GGUF file read through transformers);
* :mod:`~nexus_moe.hf.writer` and :mod:`~nexus_moe.hf.card`: the sharded weights and the model
  card of an export;
* :mod:`~nexus_moe.hf.importing` and :mod:`~nexus_moe.hf.exporting`: the two directions.

Every MoE format (qwen2_moe, qwen3_moe, mixtral) scores experts with a linear gate and takes a
float32 softmax over all routed experts before top-k, which is our MoE layer's math
(docs/design.md §3): a linear router is exported as the gate, a Nexus router as its
expert-embedding matrix ``E`` (``logits = x @ E^T`` in both). Imports therefore always have a
linear router. A router on context is exported as the same gate with ``model_type``
``nexus_context_<format>`` and :mod:`~nexus_moe.hf.remote`'s modeling module, which transformers
runs with ``trust_remote_code=True``. The adaptive-clustering router cannot be expressed. Nothing
is unpickled; outputs are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module defining it. Loaded on first use, so that importing the light
# `nexus_moe.hf.formats` (the CLI's choices) does not import torch and the writers.
_EXPORTS = {
    "export_hf": "exporting",
    "export_streamed": "exporting",
    "is_hf_folder": "folder",
    "AUTO": "formats",
    "DENSE_FORMATS": "formats",
    "FORMATS": "formats",
    "MOE_FORMATS": "formats",
    "HFModel": "importing",
    "import_gguf": "importing",
    "import_hf": "importing",
    "open_dense_hf": "importing",
    "open_hf": "importing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
