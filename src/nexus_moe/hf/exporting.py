"""Our model or checkpoint -> a Hugging Face folder that ``AutoModelForCausalLM`` loads
(docs/design.md §15).

Every export goes one way: the format is chosen and checked (:mod:`nexus_moe.hf.config`), the
format's mapping turns a :class:`TensorSource` in our names into a plan of Hugging Face tensors
(:func:`nexus_moe.hf.mapping.export_plan`), and the folder is written from that plan
(:mod:`nexus_moe.hf.writer`), each tensor produced when it is written. A model in memory, a
checkpoint directory (read one tensor at a time) and an upcycling that is never written in our
format (:func:`export_streamed`) are only different sources.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from nexus_moe.checkpoint import (
    TOKENIZER_FILE,
    find_tokenizer,
    load_config,
    model_shapes,
    model_state_dict,
    open_weights,
)
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf.card import MODEL_CARD_FILE, model_card
from nexus_moe.hf.config import CONFIG_FILE, check_exportable, config_to_hf
from nexus_moe.hf.formats import AUTO, Format, export_format
from nexus_moe.hf.mapping import Plan, export_plan, tensor_map
from nexus_moe.hf.writer import DEFAULT_MAX_SHARD_SIZE, write_shards
from nexus_moe.io_utils import atomic_dir, write_json
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.routers import Router
from nexus_moe.safetensors_io import CastTensors, MemoryTensors, TensorSource

# Special tokens tried, in order, for the beginning-of-text token of an exported tokenizer.
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


def export_hf(
    ckpt_or_model: Transformer | str | Path,
    out_dir: str | Path,
    fmt: str = AUTO,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a model as a Hugging Face checkpoint that ``AutoModelForCausalLM`` loads.

    ``ckpt_or_model`` is a :class:`Transformer` or a native checkpoint directory (whose
    ``tokenizer.json`` is used unless ``tokenizer_path`` is given; it is streamed, one tensor in
    memory at a time, never the whole model). ``fmt`` is a key of
    :data:`~nexus_moe.hf.formats.FORMATS`: dense ``llama``, ``mistral``, ``qwen2``, ``qwen3``;
    MoE ``qwen2_moe`` (shared expert, any top-k gating, MoE every k-th block) and ``mixtral`` (no
    shared expert, renormalised gates, every block MoE); ``auto`` picks llama/qwen3 for a dense
    model and mixtral, else qwen2_moe, for a MoE. Linear and Nexus routers are exported as the
    gate matrix they score tokens with; a model a format cannot express exactly (an AC router,
    ...) is refused. Biases a format requires but the model lacks are written as zeros.

    Weights are saved in ``dtype`` (default: the model's) as ``model.safetensors``, or as shards
    plus ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes. Also writes
    ``config.json``, ``generation_config.json``, with a tokenizer ``tokenizer.json`` +
    ``tokenizer_config.json``, and for a MoE or a checkpoint directory a model card
    ``README.md``. The folder appears atomically.
    """
    if not isinstance(ckpt_or_model, Transformer):
        ckpt_dir = Path(ckpt_or_model)
        cfg, metadata = load_config(ckpt_dir)
        if tokenizer_path is None and (ckpt_dir / TOKENIZER_FILE).is_file():
            tokenizer_path = ckpt_dir / TOKENIZER_FILE
        return export_streamed(
            checkpoint_tensors(ckpt_dir, cfg),
            cfg,
            out_dir,
            fmt=fmt,
            metadata=metadata,
            tokenizer_path=tokenizer_path,
            max_shard_size=max_shard_size,
            dtype=dtype,
        )
    model = ckpt_or_model
    routers: dict[str, Router] = {
        f"model.layers.{i}.mlp": block.mlp.router
        for i, block in enumerate(model.model.layers)
        if isinstance(block.mlp, MoELayer)
    }
    source = MemoryTensors(model_state_dict(model), Path("<model>"))
    fmt_ = export_format(fmt, model.cfg)
    check_exportable(fmt_, model.cfg)
    dtype = dtype or model.model.embed_tokens.weight.dtype
    plan = export_plan(tensor_map(fmt_, model.cfg), model.cfg, source, dtype, routers)
    return _write_folder(
        Path(out_dir), fmt_, model.cfg, plan, dtype, None, tokenizer_path, max_shard_size
    )


def checkpoint_tensors(ckpt_dir: Path, cfg: ModelConfig) -> TensorSource:
    """A checkpoint's tensors, read one at a time, in the dtype our model's parameter has (what
    loading the model gives)."""
    dtypes = {name: dtype for name, (_, dtype) in model_shapes(cfg).items()}
    return CastTensors(open_weights(ckpt_dir, cfg), dtypes)


def export_streamed(
    source: TensorSource,
    cfg: ModelConfig,
    out_dir: str | Path,
    fmt: str = AUTO,
    metadata: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`export_hf` of a model given as a :class:`TensorSource` (our tensor names), e.g. a
    checkpoint directory or the output of an upcycling that is never written in our format.

    Each Hugging Face tensor is produced from the source tensors it needs when it is written,
    so peak memory is about one tensor. ``metadata`` (a checkpoint's) goes into the model card.
    """
    fmt_ = export_format(fmt, cfg)
    check_exportable(fmt_, cfg)
    dtype = dtype or source.dtypes["model.embed_tokens.weight"]
    plan = export_plan(tensor_map(fmt_, cfg), cfg, source, dtype)
    return _write_folder(
        Path(out_dir), fmt_, cfg, plan, dtype, metadata, tokenizer_path, max_shard_size
    )


def _write_folder(
    out_dir: Path,
    fmt: Format,
    cfg: ModelConfig,
    plan: Plan,
    dtype: torch.dtype,
    metadata: dict[str, Any] | None,
    tokenizer_path: str | Path | None,
    max_shard_size: int,
) -> Path:
    """Write the Hugging Face folder of :func:`export_hf` from ``plan``, atomically."""
    tokenizer_file = find_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    bos_token, eos_token = _special_tokens(tokenizer_file) if tokenizer_file else (None, None)
    hf_config = config_to_hf(
        fmt, cfg, dtype, bos_token[1] if bos_token else None, eos_token[1] if eos_token else None
    )
    with atomic_dir(out_dir) as tmp, torch.no_grad():
        write_json(tmp / CONFIG_FILE, hf_config)
        generation = {"_from_model_config": True}
        generation.update(
            {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
        )
        write_json(tmp / "generation_config.json", generation)
        write_shards(tmp, plan, dtype, max_shard_size)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            write_json(
                tmp / "tokenizer_config.json",
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": bos_token[0] if bos_token else None,
                    "eos_token": eos_token[0] if eos_token else None,
                    "pad_token": None,
                    "unk_token": None,
                    "model_max_length": cfg.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                },
            )
        if cfg.is_moe or metadata is not None:
            card = model_card(cfg, fmt, metadata or {}, out_dir.name, tokenizer_file)
            (tmp / MODEL_CARD_FILE).write_text(card)
    return out_dir


def _special_tokens(
    tokenizer_file: Path,
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """(token, id) of the tokenizer's beginning- and end-of-text tokens, None where absent."""
    from nexus_moe.tokenizer import eos_id, load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    try:
        eos_index = eos_id(tok)
        eos = (tok.id_to_token(eos_index), eos_index)
    except NexusError:
        warnings.warn(
            f"{tokenizer_file}: no end-of-text token found; exporting without eos_token",
            stacklevel=3,
        )
        eos = None
    bos = None
    for token in _BOS_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            bos = (token, token_id)
            break
    return bos, eos
