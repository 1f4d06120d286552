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
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nexus_moe.checkpoint import (
    TOKENIZER_FILE,
    find_tokenizer,
    finite_or_error,
    load_config,
    model_shapes,
    model_state_dict,
    open_weights,
)
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf.card import MODEL_CARD_FILE, model_card
from nexus_moe.hf.config import CONFIG_FILE, check_exportable, config_to_hf
from nexus_moe.hf.formats import AUTO, CONTEXT_MODULE, Format, export_format, parse_size
from nexus_moe.hf.gguf import GENERATION_CONFIG_FILE
from nexus_moe.hf.mapping import Plan, export_plan, tensor_map
from nexus_moe.hf.writer import DEFAULT_MAX_SHARD_SIZE, write_shards
from nexus_moe.io_utils import atomic_dir, read_json, write_json
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.routers import Router
from nexus_moe.safetensors_io import CastTensors, MemoryTensors, TensorSource

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_MODULE_FILE = "tokenization_nexus.py"
_TOKENIZER_MODULE = '''"""This model's tokenizer: transformers' fast tokenizer over tokenizer.json, unchanged."""

from transformers import PreTrainedTokenizerFast as NexusTokenizerFast

__all__ = ["NexusTokenizerFast"]
'''
# Special tokens tried, in order, for the beginning-of-text token of an exported tokenizer.
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


def export_hf(
    ckpt_or_model: Transformer | str | Path,
    out_dir: str | Path,
    fmt: str = AUTO,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write a model as a Hugging Face checkpoint that ``AutoModelForCausalLM`` loads.

    ``ckpt_or_model`` is a :class:`Transformer` or a native checkpoint directory (whose
    ``tokenizer.json`` is used unless ``tokenizer_path`` is given; it is streamed, one tensor in
    memory at a time, never the whole model). ``fmt`` is a key of
    :data:`~nexus_moe.hf.formats.FORMATS`: dense ``llama``, ``mistral``, ``qwen2``, ``qwen3``;
    MoE ``qwen2_moe`` (shared expert, any top-k gating, MoE every k-th block) and ``mixtral`` (no
    shared expert, renormalised gates, every block MoE); ``auto`` picks llama/qwen3 for a dense
    model and mixtral, else qwen2_moe, for a MoE. Linear and Nexus routers are exported as the
    gate matrix they score tokens with; a MoE that routes on context (``router_context`` > 0)
    gets ``model_type`` ``nexus_context_<format>`` and the modeling module that routes on the
    context mix (loaded with ``trust_remote_code=True``). A model a format cannot express
    exactly (an AC router, ...) is refused. Biases a format requires but the model lacks are
    written as zeros.

    Weights are saved in ``dtype`` (a torch dtype or ``bf16``/``fp16``/``fp32``; default: the
    model's) as ``model.safetensors``, or as shards plus ``model.safetensors.index.json`` when
    larger than ``max_shard_size`` (bytes, or a size such as ``"500MB"``). Also writes
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
    dtype = _dtype(dtype) or model.model.embed_tokens.weight.dtype
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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """:func:`export_hf` of a model given as a :class:`TensorSource` (our tensor names), e.g. a
    checkpoint directory or the output of an upcycling that is never written in our format.

    Each Hugging Face tensor is produced from the source tensors it needs when it is written,
    so peak memory is about one tensor. ``metadata`` (a checkpoint's) goes into the model card.
    """
    fmt_ = export_format(fmt, cfg)
    check_exportable(fmt_, cfg)
    dtype = _dtype(dtype) or source.dtypes["model.embed_tokens.weight"]
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
    max_shard_size: int | str,
) -> Path:
    """Write the Hugging Face folder of :func:`export_hf` from ``plan``, atomically."""
    max_shard_size = parse_size(max_shard_size)
    tokenizer_file = find_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    special = _special_tokens(tokenizer_file) if tokenizer_file else {}
    ids = {name: token_id for name, (_, token_id) in special.items()}
    hf_config = config_to_hf(fmt, cfg, dtype, ids.get("bos"), ids.get("eos"))
    hf_config["pad_token_id"] = ids.get("pad")
    # A weight beyond the range of a 16-bit --dtype becomes infinite: refused, named, not written.
    cause = f"in {dtype}; export in a wider --dtype" if dtype.itemsize < 4 else None
    with atomic_dir(out_dir) as tmp, torch.no_grad(), finite_or_error(out_dir, cause):
        write_json(tmp / CONFIG_FILE, hf_config)
        write_json(tmp / GENERATION_CONFIG_FILE, _generation_config(tokenizer_file, ids))
        write_shards(tmp, plan, dtype, max_shard_size)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            doc = _tokenizer_config(tokenizer_file, special, fmt, cfg)
            write_json(tmp / TOKENIZER_CONFIG_FILE, doc)
            if "auto_map" in doc:
                (tmp / TOKENIZER_MODULE_FILE).write_text(_TOKENIZER_MODULE)
        if cfg.moe is not None and cfg.moe.router_context > 0:
            # The router on context, for trust_remote_code (docs/design.md §15.1).
            module = f"{CONTEXT_MODULE}.py"
            source = resources.files("nexus_moe.hf.remote").joinpath(module)
            (tmp / module).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
        if cfg.is_moe or metadata is not None:
            card = model_card(cfg, fmt, metadata or {}, out_dir.name, tokenizer_file)
            (tmp / MODEL_CARD_FILE).write_text(card)
    return out_dir


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (``--dtype`` names: bf16, fp16, fp32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise NexusError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[str(dtype)]


def _companion(tokenizer_file: Path, name: str) -> dict[str, Any]:
    """The JSON object ``name`` beside ``tokenizer_file`` ({} when absent or not an object)."""
    path = tokenizer_file.parent / name
    doc = read_json(path) if path.is_file() else {}
    return doc if isinstance(doc, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tokenizer_config(
    tokenizer_file: Path, special: dict[str, tuple[str, int]], fmt: Format, cfg: ModelConfig
) -> dict[str, Any]:
    """``tokenizer_config.json`` of an export: the source's chat template and special tokens,
    loaded by every transformers version as a plain fast tokenizer over ``tokenizer.json``.

    ``tokenizer_class`` is ``PreTrainedTokenizerFast`` whatever the source said: a model-specific
    class (Qwen2Tokenizer, ...) rebuilds the pre-tokenizer its own way and would split text
    differently from the tokenizer the model was trained with.
    """
    source = _companion(tokenizer_file, TOKENIZER_CONFIG_FILE)
    doc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if fmt.dense.tokenizer_class_overridden:
        # transformers 5 replaces the declared class of this model_type by its own unless the
        # tokenizer is declared through auto_map; without trust_remote_code that loads the
        # declared class, with it the module written beside, which is that same class.
        module = TOKENIZER_MODULE_FILE.removesuffix(".py")
        doc["auto_map"] = {"AutoTokenizer": [None, f"{module}.NexusTokenizerFast"]}
    for name in ("bos", "eos", "pad", "unk"):
        doc[f"{name}_token"] = special[name][0] if name in special else None
    doc["model_max_length"] = cfg.max_seq_len
    doc["clean_up_tokenization_spaces"] = False
    template = source.get("chat_template")
    jinja = tokenizer_file.parent / CHAT_TEMPLATE_FILE
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if template is not None:
        doc["chat_template"] = template
    return doc


def _generation_config(tokenizer_file: Path | None, ids: dict[str, int]) -> dict[str, Any]:
    """``generation_config.json``: the source's (carried beside its tokenizer), with the
    tokenizer's bos/eos/pad ids wherever it names none."""
    doc: dict[str, Any] = {"_from_model_config": True}
    if tokenizer_file is not None:
        doc = _companion(tokenizer_file, GENERATION_CONFIG_FILE) or doc
        doc.pop("transformers_version", None)
    for name in ("bos", "eos", "pad"):
        if doc.get(f"{name}_token_id") is None and name in ids:
            doc[f"{name}_token_id"] = ids[name]
    return doc


def _special_tokens(tokenizer_file: Path) -> dict[str, tuple[str, int]]:
    """(token, id) of the tokenizer's bos, eos, pad and unk tokens, by name, where it has them.

    They come from the ``tokenizer_config.json`` beside the tokenizer (an imported model's,
    e.g. eos ``<|im_end|>`` of an instruct model) and are otherwise guessed: eos the end-of-text
    token, bos a usual beginning-of-text token. Without a pad token the eos token pads, so that
    batched padding works.
    """
    from nexus_moe.tokenizer import eos_id, load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    source = _companion(tokenizer_file, TOKENIZER_CONFIG_FILE)
    special: dict[str, tuple[str, int]] = {}
    for name in ("bos", "eos", "pad", "unk"):
        token = _token_text(source.get(f"{name}_token"))
        token_id = tok.token_to_id(token) if token is not None else None
        if token_id is not None:
            special[name] = (token, token_id)
        elif token is not None:
            warnings.warn(
                f"{tokenizer_file.parent / TOKENIZER_CONFIG_FILE}: {name}_token {token!r} is "
                f"not in {tokenizer_file.name}; exporting without it",
                stacklevel=4,
            )
    if "eos" not in special:
        try:
            eos_index = eos_id(tok)
            special["eos"] = (tok.id_to_token(eos_index), eos_index)
        except NexusError:
            warnings.warn(
                f"{tokenizer_file}: no end-of-text token found; exporting without eos_token",
                stacklevel=4,
            )
    if "bos" not in special and "bos_token" not in source:
        for token in _BOS_TOKENS:
            token_id = tok.token_to_id(token)
            if token_id is not None:
                special["bos"] = (token, token_id)
                break
    if "pad" not in special and "eos" in special:
        special["pad"] = special["eos"]
    return special
