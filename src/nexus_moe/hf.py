"""Hugging Face ``transformers`` interop: import and export dense checkpoints (SPEC §1, §2, §12).

A Hugging Face folder is ``config.json`` + safetensors weights (one file, or shards listed in
``model.safetensors.index.json``) + optionally ``tokenizer.json``. Each supported ``model_type``
has an adapter that translates between its ``config.json`` and our :class:`ModelConfig`, and
between its tensor names and ours. Dense Llama-family names already match ours, so the dense
adapters rename nothing; MoE formats (stacked experts, routers) plug in as further adapters.

Nothing is unpickled: a folder holding only ``pytorch_model.bin`` is refused. Exports are written
to a temporary directory and renamed into place.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nexus_moe.checkpoint import (
    TOKENIZER_FILE,
    find_tokenizer,
    load_checkpoint,
    model_state_dict,
    save_checkpoint,
)
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir, read_json, write_json
from nexus_moe.model import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# Tensors some checkpoints carry that hold nothing our model needs (recomputed on the fly).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Special tokens tried, in order, for the beginning-of-text token of an exported tokenizer.
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


# --------------------------------------------------------------------------------------------
# per-architecture adapters


@dataclass(frozen=True)
class DenseAdapter:
    """How one Hugging Face dense ``model_type`` maps onto :class:`ModelConfig` and our names.

    Every dense format here is a Llama variant; they differ only in which biases and norms the
    attention has, their ``config.json`` defaults, and how they describe sliding-window attention.
    """

    model_type: str
    architecture: str  # the ``architectures`` entry transformers instantiates
    qkv_bias: Literal["config", "always", "never"]  # where q/k/v biases come from
    o_proj_bias_follows_qkv: bool  # Llama/Qwen3: ``attention_bias`` also biases o_proj
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3), always present when True
    sliding: Literal["none", "mistral", "qwen"]  # how config.json turns sliding windows on
    default_head_dim: int | None  # config.json without head_dim: None means hidden / heads
    default_max_positions: int  # transformers' default max_position_embeddings
    extra_config: dict[str, Any] = field(default_factory=dict)  # static fields on export

    # ---- config.json <-> ModelConfig

    def config_from_hf(self, doc: dict[str, Any], source: Path) -> tuple[ModelConfig, list[str]]:
        """Our config for HF ``config.json`` ``doc``, plus notes on anything approximated."""
        where = f"{source}"
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(doc.get(key), int):
                raise NexusError(f"{where}: '{key}' is missing or not an integer")
        act = doc.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NexusError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
        if doc.get("mlp_bias"):
            raise NexusError(f"{where}: mlp_bias=true is not supported (our FFN has no biases)")
        heads = doc["num_attention_heads"]
        head_dim = doc.get("head_dim") or self.default_head_dim
        if head_dim is None:
            head_dim = doc["hidden_size"] // heads
        max_positions = doc.get("max_position_embeddings") or self.default_max_positions
        notes: list[str] = []
        window = self._sliding_window(doc)
        if window is not None and window < max_positions:
            # Attention within the window equals full causal attention, so capping the context at
            # the window is exact; beyond it the two would differ.
            notes.append(
                f"{where}: sliding_window={window} < max_position_embeddings={max_positions}; "
                f"our model attends to the full context, so max_seq_len is capped at {window} "
                "(exact up to that length)"
            )
            max_positions = window
        if self.qkv_bias == "config":
            bias = bool(doc.get("attention_bias", False))
        else:
            bias = self.qkv_bias == "always"
        cfg = ModelConfig(
            vocab_size=doc["vocab_size"],
            hidden_size=doc["hidden_size"],
            intermediate_size=doc["intermediate_size"],
            num_layers=doc["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=doc.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_seq_len=max_positions,
            rope_theta=_rope_theta(doc, where),
            rms_norm_eps=float(doc.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(doc.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=self.qk_norm,
            init_std=float(doc.get("initializer_range", 0.02)),
        )
        return cfg, notes

    def _sliding_window(self, doc: dict[str, Any]) -> int | None:
        """The attention window some layer actually uses, or None for full attention."""
        if self.sliding == "mistral":
            return doc.get("sliding_window", 4096)  # transformers' MistralConfig default
        if self.sliding == "qwen" and doc.get("use_sliding_window", False):
            window = doc.get("sliding_window", 4096)
            layer_types = doc.get("layer_types")
            if layer_types is not None:
                return window if "sliding_attention" in layer_types else None
            # Without layer_types, layers from max_window_layers on slide (transformers' rule).
            first_sliding = doc.get("max_window_layers", 28)
            return window if first_sliding < doc["num_hidden_layers"] else None
        return None

    def check_exportable(self, cfg: ModelConfig) -> None:
        """Raise NexusError when ``cfg`` cannot be written exactly in this format."""
        if cfg.is_moe:
            raise NexusError(
                f"format '{self.model_type}' holds dense models only; this checkpoint is a MoE"
            )
        if cfg.qk_norm and not self.qk_norm:
            raise NexusError(
                f"the model normalises q and k per head (qk_norm, Qwen3-style), which "
                f"'{self.model_type}' cannot express; export with fmt='qwen3'"
            )
        if self.qk_norm and not cfg.qk_norm:
            raise NexusError(
                f"'{self.model_type}' always normalises q and k per head but this model does not "
                "(qk_norm=false); export with fmt='llama' or 'qwen2'"
            )
        if cfg.attention_bias and self.qkv_bias == "never":
            raise NexusError(
                f"the model has q/k/v biases, which '{self.model_type}' cannot express; "
                "export with fmt='qwen2' or 'llama'"
            )

    def config_to_hf(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        bos_token_id: int | None,
        eos_token_id: int | None,
    ) -> dict[str, Any]:
        """A complete HF ``config.json`` for ``cfg`` (readable by transformers 4.45+ and 5.x)."""
        dtype_name = str(dtype).removeprefix("torch.")
        doc: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.rms_norm_eps,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta; both are written.
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": None,
            "torch_dtype": dtype_name,  # transformers 4.x
            "dtype": dtype_name,  # transformers 5.x
        }
        if self.qkv_bias == "config":
            doc["attention_bias"] = cfg.attention_bias
        if self.sliding == "mistral":
            doc["sliding_window"] = None
        elif self.sliding == "qwen":
            doc["use_sliding_window"] = False
            doc["sliding_window"] = None
            doc["max_window_layers"] = cfg.num_layers
            doc["layer_types"] = ["full_attention"] * cfg.num_layers
        doc.update(self.extra_config)
        return doc

    # ---- tensors

    def _extra_zero_biases(self, cfg: ModelConfig) -> Iterator[tuple[str, int]]:
        """HF tensors this format has that our model lacks, as (name, length); all zero."""
        assert cfg.head_dim is not None
        for layer in range(cfg.num_layers):
            prefix = f"model.layers.{layer}.self_attn"
            if self.qkv_bias == "always" and not cfg.attention_bias:
                yield f"{prefix}.q_proj.bias", cfg.num_heads * cfg.head_dim
                yield f"{prefix}.k_proj.bias", cfg.num_kv_heads * cfg.head_dim
                yield f"{prefix}.v_proj.bias", cfg.num_kv_heads * cfg.head_dim
            if self.o_proj_bias_follows_qkv and cfg.attention_bias:
                yield f"{prefix}.o_proj.bias", cfg.hidden_size

    def state_to_hf(
        self, cfg: ModelConfig, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Our (untied) state dict -> HF tensors; biases HF requires but we lack are zeros."""
        hf_state = dict(state)  # dense names already are the HF Llama names
        like = state["model.embed_tokens.weight"]
        for name, size in self._extra_zero_biases(cfg):
            hf_state[name] = torch.zeros(size, dtype=like.dtype)
        return hf_state

    def load_into(self, model: Transformer, reader: _TensorReader) -> None:
        """Fill ``model`` from the HF tensors in ``reader`` (names and shapes checked)."""
        expected = model_state_dict(model)
        params = model.state_dict()
        for name, target in expected.items():
            tensor = reader.get(name, tuple(target.shape))
            with torch.no_grad():
                params[name].copy_(tensor)
        for name, size in self._extra_zero_biases(model.cfg):
            if name not in reader:
                continue  # Qwen2 stores them; a hand-made Llama folder may omit them
            if reader.get(name, (size,)).any():
                raise NexusError(
                    f"{reader.file_of(name)}: tensor '{name}' is non-zero, but our model has no "
                    f"such bias ({self.model_type} with attention_bias=true biases o_proj)"
                )
        if model.cfg.tie_embeddings:
            reader.mark_used("lm_head.weight")  # transformers ties it to the embedding anyway


def _dense(model_type: str, architecture: str, **kwargs: Any) -> DenseAdapter:
    return DenseAdapter(model_type=model_type, architecture=architecture, **kwargs)


ADAPTERS: dict[str, DenseAdapter] = {
    "llama": _dense(
        "llama",
        "LlamaForCausalLM",
        qkv_bias="config",
        o_proj_bias_follows_qkv=True,
        qk_norm=False,
        sliding="none",
        default_head_dim=None,
        default_max_positions=2048,
        extra_config={"mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": _dense(
        "mistral",
        "MistralForCausalLM",
        qkv_bias="never",
        o_proj_bias_follows_qkv=False,
        qk_norm=False,
        sliding="mistral",
        default_head_dim=None,
        default_max_positions=131072,
    ),
    "qwen2": _dense(
        "qwen2",
        "Qwen2ForCausalLM",
        qkv_bias="always",
        o_proj_bias_follows_qkv=False,
        qk_norm=False,
        sliding="qwen",
        default_head_dim=None,
        default_max_positions=32768,
    ),
    "qwen3": _dense(
        "qwen3",
        "Qwen3ForCausalLM",
        qkv_bias="config",
        o_proj_bias_follows_qkv=True,
        qk_norm=True,
        sliding="qwen",
        default_head_dim=128,
        default_max_positions=32768,
    ),
}


def _adapter(model_type: Any, where: str) -> DenseAdapter:
    if model_type not in ADAPTERS:
        raise NexusError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def _rope_theta(doc: dict[str, Any], where: str) -> float:
    """The RoPE base of ``doc``; any scaling (llama3, yarn, linear, ...) is refused."""
    params = doc.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        # transformers 5 nests parameters per layer type; we need them all to be the same.
        distinct = {tuple(sorted(v.items())) for v in params.values()}
        if len(distinct) > 1:
            raise NexusError(f"{where}: rope_parameters differ between layer types: {params}")
        params = next(iter(params.values()))
    scaling = doc.get("rope_scaling") or {}
    for source, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type not in (None, "default"):
            raise NexusError(
                f"{where}: {source} uses rope_type={rope_type!r}; only plain RoPE ('default') "
                "is supported"
            )
        partial = spec.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise NexusError(f"{where}: partial_rotary_factor={partial} is not supported")
    theta = params.get("rope_theta") or doc.get("rope_theta") or 10000.0
    return float(theta)


# --------------------------------------------------------------------------------------------
# reading safetensors lazily


class _TensorReader:
    """Lazy access to the tensors of a HF folder's safetensors file(s), by name.

    Remembers which tensors were read so that leftovers (weights config.json does not explain)
    can be reported.
    """

    def __init__(self, hf_dir: Path, stack: ExitStack) -> None:
        self.hf_dir = hf_dir
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._used: set[str] = set()
        for file_name in self._weight_files():
            path = hf_dir / file_name
            if not path.is_file():
                raise NexusError(f"{path}: weights file not found (listed in {INDEX_FILE})")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as exc:
                raise NexusError(
                    f"{path}: cannot read weights ({exc}); the file is corrupt or truncated — "
                    "download it again"
                ) from exc
            self._files[file_name] = handle
            for name in handle.keys():
                self._where[name] = file_name

    def _weight_files(self) -> list[str]:
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            doc = read_json(index)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise NexusError(f"{index}: no 'weight_map'; the index file is corrupt")
            return sorted(set(weight_map.values()))
        if (self.hf_dir / WEIGHTS_FILE).is_file():
            return [WEIGHTS_FILE]
        files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
        if files:
            return files
        pickled = [n for n in PICKLED_WEIGHTS if (self.hf_dir / n).is_file()]
        if pickled or any(self.hf_dir.glob("*.bin")):
            raise NexusError(
                f"{self.hf_dir}: weights are only in pickled PyTorch format "
                f"({', '.join(pickled) or '*.bin'}), which nexus-moe never loads (unpickling can "
                "run arbitrary code); convert them to safetensors first, in an environment you "
                "trust, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(dir, safe_serialization=True)`"
            )
        raise NexusError(f"{self.hf_dir}: no *.safetensors weights found")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.hf_dir / self._where.get(name, CONFIG_FILE)

    def mark_used(self, name: str) -> None:
        self._used.add(name)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name``, which config.json says has ``shape``."""
        if name not in self._where:
            raise NexusError(
                f"{self.hf_dir}: tensor '{name}' is missing from the weights, but config.json "
                f"implies it (shape {shape}); config.json does not match the weights"
            )
        handle = self._files[self._where[name]]
        try:
            actual = tuple(handle.get_slice(name).get_shape())
            if actual != shape:
                raise NexusError(
                    f"{self.file_of(name)}: tensor '{name}' has shape {actual}, but config.json "
                    f"implies {shape}; config.json does not match the weights"
                )
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise NexusError(
                f"{self.file_of(name)}: cannot read tensor '{name}' ({exc}); the file is "
                "corrupt or truncated — download it again"
            ) from exc
        self._used.add(name)
        return tensor

    def unused(self) -> list[str]:
        return sorted(
            n for n in self._where if n not in self._used and not n.endswith(_IGNORED_SUFFIXES)
        )


# --------------------------------------------------------------------------------------------
# import


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Transformer | Path:
    """Convert a local Hugging Face checkpoint folder into our model.

    ``hf_dir`` holds ``config.json`` (``model_type`` one of :data:`ADAPTERS`), safetensors weights
    (``model.safetensors`` or shards with ``model.safetensors.index.json``) and optionally
    ``tokenizer.json``. Weights are read lazily and converted to float32. Without ``out_dir`` the
    model is returned; with it, a native checkpoint (tokenizer included) is written there
    atomically and ``out_dir`` is returned.

    Raises NexusError for an unsupported architecture, RoPE scaling, a config.json that
    disagrees with the tensors (naming the first such tensor), pickled-only weights, and missing
    or corrupt files. A sliding window shorter than the context is accepted with a warning:
    ``max_seq_len`` is capped at the window, within which full attention is exact.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise NexusError(f"{hf_dir}: Hugging Face model folder not found")
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise NexusError(f"{config_path}: not found; is {hf_dir} a Hugging Face model folder?")
    doc = read_json(config_path)
    if not isinstance(doc, dict):
        raise NexusError(f"{config_path}: expected a JSON object")
    if doc.get("format") == "nexus-moe":
        raise NexusError(f"{hf_dir}: already a nexus-moe checkpoint; nothing to import")
    adapter = _adapter(doc.get("model_type"), str(config_path))
    cfg, notes = adapter.config_from_hf(doc, config_path)
    for note in notes:
        warnings.warn(note, stacklevel=2)

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")  # no random init: every weight is loaded below
    model.init_buffers()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with ExitStack() as stack:
        reader = _TensorReader(hf_dir, stack)
        adapter.load_into(model, reader)
        leftover = reader.unused()
    if leftover:
        raise NexusError(
            f"{reader.file_of(leftover[0])}: unexpected tensor '{leftover[0]}' "
            f"({len(leftover)} in all) that config.json does not account for; config.json "
            "does not match the weights"
        )
    model.eval()
    if out_dir is None:
        return model
    tokenizer = hf_dir / TOKENIZER_FILE
    metadata = {
        "source": "huggingface",
        "hf_dir": str(hf_dir.resolve()),
        "hf_model_type": adapter.model_type,
        "bos_token_id": doc.get("bos_token_id"),
        "eos_token_id": doc.get("eos_token_id"),
        "notes": notes,
    }
    if not tokenizer.is_file():
        warnings.warn(
            f"{hf_dir}: no tokenizer.json; the checkpoint is written without a tokenizer",
            stacklevel=2,
        )
    return save_checkpoint(
        out_dir, model, tokenizer if tokenizer.is_file() else None, metadata=metadata
    )


# --------------------------------------------------------------------------------------------
# export


def export_hf(
    ckpt_or_model: Transformer | str | Path,
    out_dir: str | Path,
    fmt: str = "llama",
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a dense model as a Hugging Face checkpoint that ``AutoModelForCausalLM`` loads.

    ``ckpt_or_model`` is a :class:`Transformer` or a native checkpoint directory (whose
    ``tokenizer.json`` is used unless ``tokenizer_path`` is given). ``fmt`` is a key of
    :data:`ADAPTERS` (``llama``, ``mistral``, ``qwen2``, ``qwen3``); biases a format requires but
    the model lacks are written as zeros, and a model the format cannot express exactly is
    refused. Weights are saved in ``dtype`` (default: the model's) as ``model.safetensors``, or
    as shards plus ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes.
    Also writes ``config.json``, ``generation_config.json`` and, with a tokenizer,
    ``tokenizer.json`` + ``tokenizer_config.json``. The folder appears atomically.
    """
    out_dir = Path(out_dir)
    if isinstance(ckpt_or_model, Transformer):
        model = ckpt_or_model
    else:
        ckpt_dir = Path(ckpt_or_model)
        model, _ = load_checkpoint(ckpt_dir)
        if tokenizer_path is None and (ckpt_dir / TOKENIZER_FILE).is_file():
            tokenizer_path = ckpt_dir / TOKENIZER_FILE
    cfg = model.cfg
    adapter = _adapter(fmt, "export_hf(fmt=...)")
    adapter.check_exportable(cfg)
    tokenizer_file = find_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    bos_token, eos_token = _special_tokens(tokenizer_file) if tokenizer_file else (None, None)

    state = {k: v.detach().cpu() for k, v in model_state_dict(model).items()}
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    hf_state = {k: v.to(dtype).contiguous() for k, v in adapter.state_to_hf(cfg, state).items()}
    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    hf_config = adapter.config_to_hf(
        cfg, dtype, bos_token[1] if bos_token else None, eos_token[1] if eos_token else None
    )

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / CONFIG_FILE, hf_config)
        generation = {"_from_model_config": True}
        generation.update(
            {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
        )
        write_json(tmp / "generation_config.json", generation)
        for file_name, names in split.filename_to_tensors.items():
            shard = {name: hf_state[name] for name in names}
            save_file(shard, str(tmp / file_name), metadata={"format": "pt"})
        if split.is_sharded:
            write_json(
                tmp / INDEX_FILE,
                {
                    "metadata": {"total_size": sum(t.nbytes for t in hf_state.values())},
                    "weight_map": dict(sorted(split.tensor_to_filename.items())),
                },
            )
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
