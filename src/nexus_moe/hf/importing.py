"""Hugging Face folder or GGUF file -> our model or checkpoint (docs/design.md §15).

Every import goes one way: the config is translated (:mod:`nexus_moe.hf.config`), the tensor
table is checked against the format's mapping from the headers alone
(:func:`nexus_moe.hf.mapping.import_tensors`), and the result is an :class:`HFModel` whose tensors
are read in our names on demand. From there a model is built in memory, or a checkpoint is
written tensor by tensor (peak memory about one tensor), or :mod:`nexus_moe.upcycle` reads it in
place.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexus_moe.checkpoint import (
    TOKENIZER_FILE,
    NonFiniteModel,
    model_shapes,
    model_state_dict,
    write_checkpoint,
)
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf.config import config_from_hf, read_hf_config
from nexus_moe.hf.folder import folder_tensors
from nexus_moe.hf.formats import DENSE_FORMATS, DenseFormat, format_for
from nexus_moe.hf.gguf import gguf_tokenizer, read_gguf
from nexus_moe.hf.mapping import CheckedReader, import_tensors, tensor_map, unfused
from nexus_moe.model import Transformer
from nexus_moe.safetensors_io import TensorSource, TensorSpec


@dataclass
class HFModel:
    """A Hugging Face model whose tensor table has been checked against its config.

    ``tensors`` are our model's tensors (our names, stored dtypes), read on demand.
    """

    path: Path
    model_type: str
    cfg: ModelConfig
    notes: list[str]
    metadata: dict[str, Any]
    tokenizer: Path | None
    tensors: TensorSource


def open_hf(hf_dir: str | Path) -> HFModel:
    """Check a Hugging Face folder from its config.json and safetensors headers alone.

    Every tensor the config implies must be present with its shape, nothing unexplained may be
    left over, and tensors the format has but our model lacks (biases, Qwen2-MoE's shared-expert
    gate) must be zero. Conversion notes are issued as warnings.
    """
    hf_dir = Path(hf_dir)
    config_path, doc = read_hf_config(hf_dir)
    if doc.get("format") == "nexus-moe":
        raise NexusError(f"{hf_dir}: already a nexus-moe checkpoint; nothing to import")
    model = _checked(doc, config_path, folder_tensors(hf_dir), "config.json")
    model.path = hf_dir
    model.metadata = {
        "source": "huggingface",
        "hf_dir": str(hf_dir.resolve()),
        **model.metadata,
    }
    tokenizer = hf_dir / TOKENIZER_FILE
    model.tokenizer = tokenizer if tokenizer.is_file() else None
    return model


def _warn_without_tokenizer(model: HFModel) -> None:
    if model.tokenizer is None:
        warnings.warn(
            f"{model.path}: no tokenizer.json; the checkpoint is written without a tokenizer",
            stacklevel=3,
        )


def open_dense_hf(hf_dir: str | Path) -> HFModel:
    """:func:`open_hf` of a folder that must hold a dense model (an upcycling input)."""
    config_path, doc = read_hf_config(Path(hf_dir))
    fmt = format_for(doc.get("model_type"), str(config_path))
    if not isinstance(fmt, DenseFormat):
        raise NexusError(
            f"{config_path}: model_type '{fmt.model_type}' is an MoE; a dense model is "
            f"needed here (one of: {', '.join(sorted(DENSE_FORMATS))})"
        )
    model = open_hf(hf_dir)
    _warn_without_tokenizer(model)
    return model


def _checked(doc: dict[str, Any], where: Path, source: TensorSource, config_name: str) -> HFModel:
    """The :class:`HFModel` of config ``doc`` and tensors ``source`` (checked)."""
    fmt = format_for(doc.get("model_type"), str(where))
    cfg, notes = config_from_hf(fmt, doc, where)
    for note in notes:
        warnings.warn(note, stacklevel=4)
    reader = CheckedReader(unfused(source, fmt, cfg), config_name)
    tensors = import_tensors(tensor_map(fmt, cfg), reader, cfg)
    metadata = {
        "hf_model_type": fmt.model_type,
        "bos_token_id": doc.get("bos_token_id"),
        "eos_token_id": doc.get("eos_token_id"),
        "notes": notes,
    }
    return HFModel(where, fmt.model_type, cfg, notes, metadata, None, tensors)


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Transformer | Path:
    """Convert a local Hugging Face checkpoint folder (or a ``.gguf`` file) into our model.

    ``hf_dir`` holds ``config.json`` (``model_type`` one of :data:`FORMATS`), safetensors weights
    (``model.safetensors`` or shards with ``model.safetensors.index.json``) and optionally
    ``tokenizer.json``. Weights are read lazily and converted to float32. Without ``out_dir`` the
    model is returned; with it, a native checkpoint (tokenizer included) is written there
    atomically, tensor by tensor without building the model, and ``out_dir`` is returned. A path
    to a ``.gguf`` file goes to :func:`import_gguf`.

    MoE folders (``qwen2_moe``, ``qwen3_moe``, ``mixtral``) import with a linear router whose
    weight is the HF gate, so a Nexus model exported and imported again routes identically
    through a linear router. A Qwen2-MoE shared expert keeps its learned sigmoid gate
    (``shared_expert_gate``), except in our own exports of an always-on shared expert (recorded
    in config.json), whose all-zero gate is checked and whose ``down_proj`` is halved back.

    Raises NexusError for an unsupported architecture, RoPE scaling, a config.json that
    disagrees with the tensors (naming the first such tensor), pickled-only weights, and missing
    or corrupt files, and sliding-window attention on some layers only (a window on every layer
    becomes ``sliding_window``).
    """
    hf_dir = Path(hf_dir)
    if hf_dir.suffix == ".gguf" and not hf_dir.is_dir():
        return import_gguf(hf_dir, out_dir)
    if not hf_dir.is_dir():
        raise NexusError(f"{hf_dir}: Hugging Face model folder not found")
    model = open_hf(hf_dir)
    if out_dir is None:
        return build_model(model.cfg, model.tensors)
    _warn_without_tokenizer(model)
    return save_imported(model, Path(out_dir))


def import_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Transformer | Path:
    """Convert a ``.gguf`` file (llama.cpp) into our model, through ``transformers``.

    See :mod:`nexus_moe.hf.gguf`: transformers dequantises the file to float32 and its weights are
    converted like a Hugging Face folder (see :func:`import_hf`). Any architecture transformers
    reads from GGUF and :data:`FORMATS` supports works; in practice the dense Llama family
    (Llama, SmolLM, Mistral, Qwen2, ...). With ``out_dir`` the tokenizer stored in the file is
    written as ``tokenizer.json`` beside the weights; returns like :func:`import_hf`.
    """
    path = Path(gguf_path)
    doc, state = read_gguf(path)
    model = _checked(doc, path, state, "the GGUF file's config")
    # the file's name only: a path on the machine that imported it means nothing elsewhere
    model.metadata = {"source": "gguf", "gguf_file": path.name, **model.metadata}
    if out_dir is None:
        return build_model(model.cfg, model.tensors)
    with tempfile.TemporaryDirectory() as tmp:
        model.tokenizer = gguf_tokenizer(path, Path(tmp), doc)
        return save_imported(model, Path(out_dir))


def build_model(cfg: ModelConfig, tensors: TensorSource) -> Transformer:
    """The model ``cfg`` describes with every weight read from ``tensors`` (our names), in eval
    mode. No random initialisation: the model is built on the meta device first."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = model.state_dict()
    with torch.no_grad():
        for name in model_state_dict(model):
            params[name].copy_(tensors.get(name))
    return model.eval()


def save_imported(model: HFModel, out_dir: Path) -> Path:
    """Write ``model`` as a native checkpoint, one tensor at a time, each converted to the dtype
    our parameter has (what loading the model gives)."""
    specs = [
        TensorSpec(name, dtype, shape, lambda name=name, dtype=dtype: [_read(model, name, dtype)])
        for name, (shape, dtype) in model_shapes(model.cfg).items()
    ]
    try:
        return write_checkpoint(out_dir, model.cfg, specs, model.metadata, model.tokenizer)
    except NonFiniteModel as exc:  # it came from the source: name the file that holds it
        raise NexusError(
            f"{model.tensors.file_of(exc.tensor)}: holds NaN or infinite values (tensor "
            f"'{exc.tensor}' of the imported model); nothing was written — the source is "
            "damaged: restore or download it again"
        ) from None


def _read(model: HFModel, name: str, dtype: torch.dtype) -> torch.Tensor:
    return model.tensors.get(name).to(dtype)
