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

Both MoE formats score experts with a linear gate and take a float32 softmax over all routed
experts before top-k, which is our MoE layer's math (docs/design.md §3): a linear router is
exported as the gate, a Nexus router as its expert-embedding matrix ``E`` (``logits = x @ E^T``
in both). Imports therefore always have a linear router. The adaptive-clustering router cannot
be expressed. Nothing is unpickled; outputs are written to a temporary directory and renamed
into place.
"""

from nexus_moe.hf.exporting import export_hf, export_streamed
from nexus_moe.hf.folder import is_hf_folder
from nexus_moe.hf.formats import AUTO, DENSE_FORMATS, FORMATS, MOE_FORMATS
from nexus_moe.hf.importing import HFModel, import_gguf, import_hf, open_dense_hf, open_hf
from nexus_moe.safetensors_io import TensorSource

__all__ = [
    "AUTO",
    "DENSE_FORMATS",
    "FORMATS",
    "HFModel",
    "MOE_FORMATS",
    "TensorSource",
    "export_hf",
    "export_streamed",
    "import_gguf",
    "import_hf",
    "is_hf_folder",
    "open_dense_hf",
    "open_hf",
]
