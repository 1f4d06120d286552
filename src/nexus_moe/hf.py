"""Hugging Face ``transformers`` interop: import and export checkpoints (SPEC §1-§4, §12).

A Hugging Face folder is ``config.json`` + safetensors weights (one file, or shards listed in
``model.safetensors.index.json``) + optionally ``tokenizer.json``. Each supported ``model_type``
has an adapter that translates between its ``config.json`` and our :class:`ModelConfig`, and
between its tensor names and ours. Dense Llama-family names already match ours, so the dense
adapters rename nothing. The MoE adapters (``qwen2_moe``, ``mixtral``) write the per-expert tensor
names the Hub checkpoints use (``experts.{j}.gate_proj.weight``), which is also what
``save_pretrained`` of transformers 5 writes; on import the fused 3-D layout of transformers 5
(``experts.gate_up_proj``) is read too.

Both MoE formats score experts with a linear gate and take a float32 softmax over all routed
experts before top-k, which is our MoE layer's math (SPEC §3): a linear router is exported as the
gate, a Nexus router as its expert-embedding matrix ``E`` (``logits = x @ E^T`` in both). Imports
therefore always have a linear router. The adaptive-clustering router cannot be expressed.

Memory: ``import_hf`` of a dense folder into a directory and ``export_hf`` of a checkpoint
directory stream: the tensor table is checked from the safetensors headers, then each output
tensor is produced from its inputs alone (read through a fresh ``safe_open`` handle) and written
by :func:`nexus_moe.upcycle.write_safetensors`, so peak memory is about one tensor, not the model.
MoE imports and in-memory models go through a :class:`Transformer`.

GGUF files are read through transformers (which dequantises them) and then converted like a folder.
Nothing is unpickled: a folder holding only ``pytorch_model.bin`` is refused. Outputs are written
to a temporary directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open

from nexus_moe import __version__
from nexus_moe.checkpoint import CONFIG_FILE as CKPT_CONFIG_FILE
from nexus_moe.checkpoint import (
    FORMAT,
    TOKENIZER_FILE,
    check_tensor_table,
    find_tokenizer,
    load_config,
    model_state_dict,
    save_checkpoint,
)
from nexus_moe.checkpoint import WEIGHTS_FILE as CKPT_WEIGHTS_FILE
from nexus_moe.config import ModelConfig, MoEConfig, RouterType, from_dict, to_dict
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir, read_json, write_json
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.routers import build_router
from nexus_moe.upcycle import TensorSpec, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
MODEL_CARD_FILE = "README.md"
# Key of an exported config.json that records our own config, so that an import can restore what
# the HF format does not carry (domain names, an unused FFN width, moe_every); transformers keeps
# unknown keys and ignores them.
SIDECAR_KEY = "nexus_moe"

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
    default_sliding_window: int | None = 4096  # "mistral" style: window when the key is absent
    default_rope_theta: float = 10000.0  # transformers' default when config.json names none

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
            rope_theta=_rope_theta(doc, where, self.default_rope_theta),
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
            return doc.get("sliding_window", self.default_sliding_window)
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
                f"format '{self.model_type}' holds dense models only; this checkpoint is a MoE: "
                "export it with fmt='qwen2_moe' or 'mixtral' (or fmt='auto')"
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

    def zero_biases(self, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The biases this format requires but ``cfg`` lacks, as zero tensors."""
        return {n: torch.zeros(size, dtype=dtype) for n, size in self._extra_zero_biases(cfg)}

    def state_to_hf(self, model: Transformer) -> dict[str, torch.Tensor]:
        """Our (untied) weights -> HF tensors; biases HF requires but we lack are zeros."""
        hf_state = {k: v.cpu() for k, v in model_state_dict(model).items()}  # same names
        hf_state.update(self.zero_biases(model.cfg, hf_state["model.embed_tokens.weight"].dtype))
        return hf_state

    def load_into(
        self, model: Transformer, reader: _TensorReader, skip: tuple[str, ...] = ()
    ) -> None:
        """Fill ``model`` from the HF tensors in ``reader`` (names and shapes checked).

        Our tensors whose names start with one of ``skip`` are left to the caller (MoE blocks).
        """
        expected = model_state_dict(model)
        params = model.state_dict()
        for name, target in expected.items():
            if name.startswith(skip):
                continue
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


DENSE_ADAPTERS: dict[str, DenseAdapter] = {
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


# --------------------------------------------------------------------------------------------
# MoE adapters


@dataclass(frozen=True)
class MoEAdapter:
    """How one Hugging Face MoE ``model_type`` maps onto our MoE model (SPEC §3, §4).

    Attention, norms, RoPE and sliding windows are described as in the dense sibling ``dense``;
    this class adds the MoE blocks. Both formats compute ``softmax(x @ gate^T)`` in float32 over
    all routed experts, take the top-k, and (optionally) renormalise, exactly as our MoE layer.
    """

    model_type: str
    architecture: str
    dense: DenseAdapter  # the non-MoE part of the format
    moe_module: str  # HF name of a MoE block's module: "mlp" or "block_sparse_moe"
    expert_names: tuple[str, str, str]  # HF names of each expert's gate, up and down projections
    has_shared_expert: bool  # Qwen2-MoE: every MoE block has a sigmoid-gated shared expert
    always_renormalize: bool  # Mixtral: gates are always p_i / sum_topk p
    num_experts_key: str  # config.json key of the number of routed experts
    default_num_experts: int  # transformers' defaults for config.json keys that are absent
    default_top_k: int
    sparse_layers: Literal["all", "mlp_only_layers"]  # which blocks config.json can make MoE

    # ---- config.json <-> ModelConfig

    def config_from_hf(self, doc: dict[str, Any], source: Path) -> tuple[ModelConfig, list[str]]:
        """Our config (linear router) for HF ``config.json`` ``doc``, plus notes."""
        where = f"{source}"
        base, notes = self.dense.config_from_hf(doc, source)
        layers = base.num_layers
        num_experts = _int_field(doc, self.num_experts_key, self.default_num_experts, where)
        top_k = _int_field(doc, "num_experts_per_tok", self.default_top_k, where)
        if self.sparse_layers == "all":
            sparse = list(range(layers)) if num_experts > 0 else []
        else:  # transformers' rule, Qwen2MoeDecoderLayer
            step = _int_field(doc, "decoder_sparse_step", 1, where)
            dense_only = doc.get("mlp_only_layers") or []
            if not isinstance(dense_only, list):
                raise NexusError(f"{where}: 'mlp_only_layers' must be a list of layer indices")
            sparse = [
                i
                for i in range(layers)
                if i not in dense_only and num_experts > 0 and step > 0 and (i + 1) % step == 0
            ]
        if not sparse:
            raise NexusError(
                f"{where}: no layer is a MoE layer (num_experts={num_experts}); nothing to import "
                "as a MoE"
            )
        moe_every = _moe_every(sparse, layers, where)
        intermediate = base.intermediate_size
        if self.has_shared_expert:
            expert_size = _int_field(doc, "moe_intermediate_size", 1408, where)
            shared_size = _int_field(doc, "shared_expert_intermediate_size", 5632, where)
            has_dense = len(sparse) < layers
            if shared_size and has_dense and shared_size != base.intermediate_size:
                raise NexusError(
                    f"{where}: shared_expert_intermediate_size={shared_size} differs from "
                    f"intermediate_size={base.intermediate_size} of the dense layers; our shared "
                    "expert has the dense FFN's width"
                )
            intermediate = shared_size or intermediate  # 0: no shared expert
            renormalize = bool(doc.get("norm_topk_prob", False))
            attention_bias = bool(doc.get("qkv_bias", True))
        else:
            expert_size, shared_size = base.intermediate_size, 0
            renormalize = True
            attention_bias = base.attention_bias
        try:
            moe = MoEConfig(
                num_experts=num_experts,
                top_k=top_k,
                shared_expert=shared_size > 0,
                renormalize=renormalize,
                router=RouterType.linear,
                moe_every=moe_every,
                expert_intermediate_size=None if expert_size == intermediate else expert_size,
                load_balance_weight=float(doc.get("router_aux_loss_coef", 0.001)),
            )
        except NexusError as exc:
            raise NexusError(f"{where}: {exc}") from exc
        cfg = dataclasses.replace(
            base, intermediate_size=intermediate, attention_bias=attention_bias, moe=moe
        )
        return _restore_from_sidecar(cfg, doc, where), notes

    def check_exportable(self, cfg: ModelConfig) -> None:
        """Raise NexusError when ``cfg`` cannot be written exactly in this format."""
        name = self.model_type
        if cfg.moe is None:
            raise NexusError(
                f"format '{name}' holds MoE models; this model is dense: export it with "
                "fmt='llama', 'mistral', 'qwen2' or 'qwen3' (or fmt='auto')"
            )
        moe = cfg.moe
        if moe.router == RouterType.ac:
            raise NexusError(
                "the adaptive-clustering (AC) router rescales each token by statistics of the "
                "previous MoE layer's routing; no Hugging Face MoE format (qwen2_moe, mixtral) "
                "can express that, so an AC model cannot be exported"
            )
        if cfg.qk_norm:
            raise NexusError(
                f"the model normalises q and k per head (qk_norm), which '{name}' cannot express"
            )
        if cfg.attention_bias and self.dense.qkv_bias == "never":
            raise NexusError(
                f"the model has q/k/v biases, which '{name}' cannot express; export with "
                "fmt='qwen2_moe'"
            )
        if moe.shared_expert and not self.has_shared_expert:
            raise NexusError(
                f"the model has a shared expert, which '{name}' cannot express; export with "
                "fmt='qwen2_moe'"
            )
        if self.always_renormalize and not moe.renormalize:
            top1 = " (with top_k=1 its gate would be 1 instead of p_i)" if moe.top_k == 1 else ""
            raise NexusError(
                f"'{name}' always renormalises the top-k gates (g_i = p_i / sum_topk p){top1}, "
                "but this model uses g_i = p_i (renormalize=false); export with "
                "fmt='qwen2_moe', which keeps norm_topk_prob=false"
            )
        dense_layers = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
        if dense_layers and self.sparse_layers == "all":
            raise NexusError(
                f"'{name}' makes every block a MoE block, but this model's blocks "
                f"{dense_layers} are dense (moe_every={moe.moe_every}); export with "
                "fmt='qwen2_moe', whose mlp_only_layers lists them"
            )
        if name == "qwen2_moe" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            # transformers 4.x and other Qwen2-MoE runtimes derive head_dim from hidden_size.
            raise NexusError(
                f"head_dim={cfg.head_dim} is not hidden_size / num_heads "
                f"({cfg.hidden_size} / {cfg.num_heads}), which 'qwen2_moe' cannot express "
                "portably; export with fmt='mixtral' if the model has no shared expert"
            )

    def config_to_hf(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        bos_token_id: int | None,
        eos_token_id: int | None,
    ) -> dict[str, Any]:
        """A complete HF ``config.json`` for ``cfg`` (readable by transformers 4.45+ and 5.x)."""
        moe = cfg.moe
        assert moe is not None
        doc = self.dense.config_to_hf(cfg, dtype, bos_token_id, eos_token_id)
        doc.update(architectures=[self.architecture], model_type=self.model_type)
        doc[self.num_experts_key] = moe.num_experts
        doc["num_experts_per_tok"] = moe.top_k
        if self.has_shared_expert:
            doc.update(
                moe_intermediate_size=cfg.expert_intermediate_size,
                shared_expert_intermediate_size=cfg.intermediate_size if moe.shared_expert else 0,
                norm_topk_prob=moe.renormalize,
                # Block i is sparse unless listed here (step 1 makes every other block sparse).
                decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
                qkv_bias=True,  # always biased on 4.x: zeros stand in for absent biases
            )
        else:
            doc["intermediate_size"] = cfg.expert_intermediate_size
            doc["router_jitter_noise"] = 0.0
        doc["router_aux_loss_coef"] = moe.load_balance_weight
        doc["output_router_logits"] = False
        doc[SIDECAR_KEY] = {"version": __version__, "model": to_dict(cfg)}
        return doc

    # ---- tensors

    def _moe_prefixes(self, cfg: ModelConfig) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.mlp." for i in range(cfg.num_layers) if cfg.is_moe_layer(i))

    def state_to_hf(self, model: Transformer) -> dict[str, torch.Tensor]:
        """Our weights -> HF tensors, one tensor per expert projection (the Hub layout)."""
        cfg = model.cfg
        state = {k: v.cpu() for k, v in model_state_dict(model).items()}
        skip = self._moe_prefixes(cfg)
        hf_state = {k: v for k, v in state.items() if not k.startswith(skip)}
        hf_state.update(self.dense.zero_biases(cfg, state["model.embed_tokens.weight"].dtype))
        for i, block in enumerate(model.model.layers):
            layer = block.mlp
            if not isinstance(layer, MoELayer):
                continue
            prefix = f"model.layers.{i}.{self.moe_module}"
            # The gate is what our router multiplies tokens by; Nexus: E = P(d) (SPEC §4).
            gate = layer.router.expert_embeddings().detach().float().cpu()  # (E, H)
            hf_state[f"{prefix}.gate.weight"] = gate.clone()
            stacked = (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj)
            for j in range(layer.num_experts):
                for hf_name, weights in zip(self.expert_names, stacked, strict=True):
                    # Clone: shards must not share storage.
                    hf_state[f"{prefix}.experts.{j}.{hf_name}.weight"] = (
                        weights[j].detach().cpu().clone()
                    )
            if self.has_shared_expert:
                hf_state.update(self._shared_to_hf(layer, prefix, cfg))
        return hf_state

    def _shared_to_hf(
        self, layer: MoELayer, prefix: str, cfg: ModelConfig
    ) -> dict[str, torch.Tensor]:
        """Qwen2-MoE's shared expert, scaled by sigmoid(x . w): with w = 0 the scale is exactly
        1/2, so down_proj is doubled (exact in floating point) and the output is ours."""
        hidden = cfg.hidden_size
        dtype = layer.experts.down_proj.dtype
        shared = layer.shared_expert
        if shared is None:  # an empty (width 0) shared expert adds exactly nothing
            gate_w = torch.zeros(0, hidden, dtype=dtype)
            up_w, down_w = gate_w.clone(), torch.zeros(hidden, 0, dtype=dtype)
        else:
            gate_w = shared.gate_proj.weight.detach().cpu().clone()
            up_w = shared.up_proj.weight.detach().cpu().clone()
            down_w = shared.down_proj.weight.detach().cpu() * 2
        return {
            f"{prefix}.shared_expert.gate_proj.weight": gate_w,
            f"{prefix}.shared_expert.up_proj.weight": up_w,
            f"{prefix}.shared_expert.down_proj.weight": down_w,
            f"{prefix}.shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype),
        }

    def load_into(self, model: Transformer, reader: _TensorReader) -> None:
        """Fill ``model`` (linear routers) from the HF tensors in ``reader``."""
        cfg = model.cfg
        assert cfg.moe is not None
        self.dense.load_into(model, reader, skip=self._moe_prefixes(cfg))
        num_experts, hidden = cfg.moe.num_experts, cfg.hidden_size
        width = cfg.expert_intermediate_size
        for i, block in enumerate(model.model.layers):
            layer = block.mlp
            if not isinstance(layer, MoELayer):
                continue
            prefix = f"model.layers.{i}.{self.moe_module}"
            fused = f"model.layers.{i}.mlp"  # transformers 5's in-memory names
            gate_name = _first_present(reader, f"{prefix}.gate.weight", f"{fused}.gate.weight")
            gate = reader.get(gate_name, (num_experts, hidden))  # first: it names E plainly
            experts = self._read_experts(reader, prefix, fused, num_experts, width, hidden)
            with torch.no_grad():
                layer.router.weight.copy_(gate)
                for target, tensor in zip(
                    (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj),
                    experts,
                    strict=True,
                ):
                    target.copy_(tensor)
            if self.has_shared_expert:
                self._read_shared(layer, reader, prefix, cfg)

    def _read_experts(
        self,
        reader: _TensorReader,
        prefix: str,
        fused: str,
        num_experts: int,
        width: int,
        hidden: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) stacked (E, out, in), from per-expert or fused tensors."""
        shapes = ((width, hidden), (width, hidden), (hidden, width))
        first = f"{prefix}.experts.0.{self.expert_names[0]}.weight"
        if first in reader or f"{fused}.experts.gate_up_proj" not in reader:
            gate, up, down = (
                torch.stack(
                    [
                        reader.get(f"{prefix}.experts.{j}.{name}.weight", shape)
                        for j in range(num_experts)
                    ]
                )
                for name, shape in zip(self.expert_names, shapes, strict=True)
            )
            return gate, up, down
        gate_up = reader.get(f"{fused}.experts.gate_up_proj", (num_experts, 2 * width, hidden))
        down = reader.get(f"{fused}.experts.down_proj", (num_experts, hidden, width))
        return gate_up[:, :width], gate_up[:, width:], down  # gate rows first, then up

    def _read_shared(
        self, layer: MoELayer, reader: _TensorReader, prefix: str, cfg: ModelConfig
    ) -> None:
        """Load Qwen2-MoE's shared expert; only a zero gate (constant 1/2) is expressible."""
        hidden = cfg.hidden_size
        gate_name = f"{prefix}.shared_expert_gate.weight"
        if reader.get(gate_name, (1, hidden)).any():
            raise NexusError(
                f"{reader.file_of(gate_name)}: tensor '{gate_name}' is non-zero: Qwen2-MoE scales "
                "the shared expert by sigmoid(x . w) per token, which our model (an always-on "
                "shared expert) cannot express; only an all-zero gate (a constant 1/2, as "
                "nexus-moe exports write) can be imported"
            )
        width = cfg.intermediate_size if layer.shared_expert is not None else 0
        names = [
            f"{prefix}.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")
        ]
        shapes = ((width, hidden), (width, hidden), (hidden, width))
        gate_w, up_w, down_w = (reader.get(n, s) for n, s in zip(names, shapes, strict=True))
        if layer.shared_expert is None:
            return
        with torch.no_grad():
            layer.shared_expert.gate_proj.weight.copy_(gate_w)
            layer.shared_expert.up_proj.weight.copy_(up_w)
            layer.shared_expert.down_proj.weight.copy_(down_w / 2)  # undo the export's x2, exact


def _int_field(doc: dict[str, Any], key: str, default: int, where: str) -> int:
    value = doc.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise NexusError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def _moe_every(sparse: list[int], num_layers: int, where: str) -> int:
    """Our ``moe_every`` k for the MoE blocks ``sparse``; they must be exactly 0, k, 2k, ..."""
    step = sparse[1] if len(sparse) > 1 else num_layers
    if sparse != list(range(0, num_layers, step)):
        raise NexusError(
            f"{where}: MoE layers {sparse} cannot be expressed: our MoE blocks are every k-th "
            "block starting at block 0 (moe_every)"
        )
    return step


def _first_present(reader: _TensorReader, *names: str) -> str:
    """The first of ``names`` that ``reader`` holds, else the first (so errors name it)."""
    return next((n for n in names if n in reader), names[0])


def _restore_from_sidecar(cfg: ModelConfig, doc: dict[str, Any], where: str) -> ModelConfig:
    """Put back what the HF format does not carry, from the config our export recorded.

    Used only when the recorded model has the MoE structure config.json describes (else
    config.json was edited and wins). Restored are fields that change nothing the weights compute:
    domain names, router and loss settings of a linear router, moe_every, an FFN width no block
    uses, and absent q/k/v biases (the zeros the export wrote are then checked and dropped).
    """
    recorded = doc.get(SIDECAR_KEY)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("model"), dict):
        return cfg
    try:
        ours = from_dict(ModelConfig, recorded["model"], f"{SIDECAR_KEY}.model")
    except NexusError as exc:
        warnings.warn(f"{where}: ignoring '{SIDECAR_KEY}' ({exc})", stacklevel=4)
        return cfg
    moe, old = cfg.moe, ours.moe
    if moe is None or old is None:
        return cfg
    layers = range(cfg.num_layers)
    intermediate_used = moe.shared_expert or any(not cfg.is_moe_layer(i) for i in layers)
    same_structure = (
        ours.num_layers == cfg.num_layers
        and (old.num_experts, old.top_k, old.shared_expert, old.renormalize)
        == (moe.num_experts, moe.top_k, moe.shared_expert, moe.renormalize)
        and [ours.is_moe_layer(i) for i in layers] == [cfg.is_moe_layer(i) for i in layers]
        and ours.expert_intermediate_size == cfg.expert_intermediate_size
        and (ours.intermediate_size == cfg.intermediate_size or not intermediate_used)
    )
    if not same_structure:
        return cfg
    if old.router == RouterType.linear:
        restored = dataclasses.replace(old, load_balance_weight=moe.load_balance_weight)
    else:  # the router became linear: keep only what still applies to it
        restored = dataclasses.replace(
            moe,
            moe_every=old.moe_every,
            domains=list(old.domains),
            z_loss_weight=old.z_loss_weight,
            router_init_std=old.router_init_std,
        )
    return dataclasses.replace(
        cfg,
        intermediate_size=ours.intermediate_size,
        # False: the adapter then checks that the stored q/k/v biases are zero.
        attention_bias=cfg.attention_bias and ours.attention_bias,
        moe=dataclasses.replace(
            restored, expert_intermediate_size=ours.moe.expert_intermediate_size
        ),
    )


MOE_ADAPTERS: dict[str, MoEAdapter] = {
    "qwen2_moe": MoEAdapter(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        dense=_dense(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            qkv_bias="always",  # on import, config.json's qkv_bias decides (default true)
            o_proj_bias_follows_qkv=False,
            qk_norm=False,
            sliding="qwen",
            default_head_dim=None,
            default_max_positions=32768,
        ),
        moe_module="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        has_shared_expert=True,
        always_renormalize=False,
        num_experts_key="num_experts",
        default_num_experts=60,
        default_top_k=4,
        sparse_layers="mlp_only_layers",
    ),
    "mixtral": MoEAdapter(
        "mixtral",
        "MixtralForCausalLM",
        dense=_dense(
            "mixtral",
            "MixtralForCausalLM",
            qkv_bias="never",
            o_proj_bias_follows_qkv=False,
            qk_norm=False,
            sliding="mistral",
            default_head_dim=None,
            default_max_positions=131072,
            default_sliding_window=None,
            default_rope_theta=1e6,
        ),
        moe_module="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),  # gate, up, down
        has_shared_expert=False,
        always_renormalize=True,
        num_experts_key="num_local_experts",
        default_num_experts=8,
        default_top_k=2,
        sparse_layers="all",
    ),
}

Adapter = DenseAdapter | MoEAdapter
ADAPTERS: dict[str, Adapter] = {**DENSE_ADAPTERS, **MOE_ADAPTERS}


def _adapter(model_type: Any, where: str) -> Adapter:
    if model_type not in ADAPTERS:
        raise NexusError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(DENSE_ADAPTERS))} (dense), "
            f"{', '.join(sorted(MOE_ADAPTERS))} (MoE)"
        )
    return ADAPTERS[model_type]


def _auto_format(cfg: ModelConfig) -> str:
    """The format ``fmt='auto'`` picks: the plainest one that expresses ``cfg`` exactly."""
    if cfg.moe is None:
        return "qwen3" if cfg.qk_norm else "llama"
    moe = cfg.moe
    mixtral_fits = (
        not moe.shared_expert
        and moe.renormalize
        and not cfg.attention_bias
        and all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    )
    return "mixtral" if mixtral_fits else "qwen2_moe"


def _rope_theta(doc: dict[str, Any], where: str, default: float = 10000.0) -> float:
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
    theta = params.get("rope_theta") or doc.get("rope_theta") or default
    return float(theta)


# --------------------------------------------------------------------------------------------
# reading safetensors lazily


class _TensorReader:
    """Lazy access to the tensors of a HF folder's safetensors file(s), by name.

    Remembers which tensors were read so that leftovers (weights config.json does not explain)
    can be reported.

    With a ``stack`` the files stay open (in it) for all reads. Without one only the headers are
    read up front (names, shapes, dtypes) and every :meth:`get` opens its file afresh: a handle
    kept open keeps every page touched so far resident, which adds up to the whole input.
    """

    def __init__(self, hf_dir: Path, stack: ExitStack | None = None) -> None:
        self.hf_dir = hf_dir
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._used: set[str] = set()
        for file_name in self._weight_files():
            path = hf_dir / file_name
            if not path.is_file():
                raise NexusError(f"{path}: weights file not found (listed in {INDEX_FILE})")
            try:
                if stack is not None:
                    handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                    self._files[file_name] = handle
                    self._where.update(dict.fromkeys(handle.keys(), file_name))
                    continue
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        self._where[name] = file_name
                        self._shapes[name] = tuple(piece.get_shape())
                        self._dtypes[name] = piece.get_dtype()
            except (SafetensorError, OSError, ValueError) as exc:
                raise NexusError(
                    f"{path}: cannot read weights ({exc}); the file is corrupt or truncated — "
                    "download it again"
                ) from exc

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
        try:
            if name in self._shapes:  # header read up front: check, then open just for this
                self.check(name, shape)
                with safe_open(str(self.file_of(name)), framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(name)
            else:
                handle = self._files[self._where[name]]
                actual = tuple(handle.get_slice(name).get_shape())
                if actual != shape:
                    raise NexusError(
                        f"{self.file_of(name)}: tensor '{name}' has shape {actual}, but "
                        f"config.json implies {shape}; config.json does not match the weights"
                    )
                tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise NexusError(
                f"{self.file_of(name)}: cannot read tensor '{name}' ({exc}); the file is "
                "corrupt or truncated — download it again"
            ) from exc
        self._used.add(name)
        return tensor

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Check from the header that tensor ``name`` exists with ``shape``; mark it used.
        Only for a reader opened without a stack."""
        if name not in self._where:
            raise NexusError(
                f"{self.hf_dir}: tensor '{name}' is missing from the weights, but config.json "
                f"implies it (shape {shape}); config.json does not match the weights"
            )
        actual = self._shapes[name]
        if actual != shape:
            raise NexusError(
                f"{self.file_of(name)}: tensor '{name}' has shape {actual}, but config.json "
                f"implies {shape}; config.json does not match the weights"
            )
        self._used.add(name)

    def unused(self) -> list[str]:
        return sorted(
            n for n in self._where if n not in self._used and not n.endswith(_IGNORED_SUFFIXES)
        )

    def check_all_used(self) -> None:
        """Raise NexusError naming the first tensor that nothing read or checked."""
        leftover = self.unused()
        if leftover:
            raise NexusError(
                f"{self.file_of(leftover[0])}: unexpected tensor '{leftover[0]}' "
                f"({len(leftover)} in all) that config.json does not account for; config.json "
                "does not match the weights"
            )


class _StateDictReader(_TensorReader):
    """The same access to tensors already in memory (a model transformers loaded from GGUF)."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        self.hf_dir = source
        self._tensors = tensors
        self._where = {name: source.name for name in tensors}
        self._used = set()

    def file_of(self, name: str) -> Path:
        return self.hf_dir

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._tensors:
            raise NexusError(
                f"{self.hf_dir}: tensor '{name}' is missing (shape {shape}); the model's config "
                "does not match its weights"
            )
        tensor = self._tensors[name]
        if tuple(tensor.shape) != shape:
            raise NexusError(
                f"{self.hf_dir}: tensor '{name}' has shape {tuple(tensor.shape)}, but the "
                f"model's config implies {shape}"
            )
        self._used.add(name)
        return tensor.detach()


# --------------------------------------------------------------------------------------------
# import


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Transformer | Path:
    """Convert a local Hugging Face checkpoint folder (or a ``.gguf`` file) into our model.

    ``hf_dir`` holds ``config.json`` (``model_type`` one of :data:`ADAPTERS`), safetensors weights
    (``model.safetensors`` or shards with ``model.safetensors.index.json``) and optionally
    ``tokenizer.json``. Weights are read lazily and converted to float32. Without ``out_dir`` the
    model is returned; with it, a native checkpoint (tokenizer included) is written there
    atomically and ``out_dir`` is returned (a dense model is streamed tensor by tensor, without
    building it; the file holds the same tensors). A path to a ``.gguf`` file goes to
    :func:`import_gguf`.

    MoE folders (``qwen2_moe``, ``mixtral``) import with a linear router whose weight is the HF
    gate, so a Nexus model exported and imported again routes identically through a linear router.
    A Qwen2-MoE shared expert is accepted only with an all-zero ``shared_expert_gate`` (what
    :func:`export_hf` writes); its ``down_proj`` is then halved back.

    Raises NexusError for an unsupported architecture, RoPE scaling, a config.json that
    disagrees with the tensors (naming the first such tensor), pickled-only weights, and missing
    or corrupt files. A sliding window shorter than the context is accepted with a warning:
    ``max_seq_len`` is capped at the window, within which full attention is exact.
    """
    hf_dir = Path(hf_dir)
    if hf_dir.suffix == ".gguf" and not hf_dir.is_dir():
        return import_gguf(hf_dir, out_dir)
    if not hf_dir.is_dir():
        raise NexusError(f"{hf_dir}: Hugging Face model folder not found")
    config_path, doc = _read_hf_config(hf_dir)
    if doc.get("format") == "nexus-moe":
        raise NexusError(f"{hf_dir}: already a nexus-moe checkpoint; nothing to import")
    if out_dir is not None and isinstance(
        _adapter(doc.get("model_type"), str(config_path)), DenseAdapter
    ):
        return _import_streamed(hf_dir, Path(out_dir))
    with ExitStack() as stack:
        model, adapter, notes = _convert(doc, config_path, lambda: _TensorReader(hf_dir, stack))
    if out_dir is None:
        return model
    metadata, tokenizer = _import_metadata(doc, hf_dir, adapter.model_type, notes)
    return save_checkpoint(out_dir, model, tokenizer, metadata=metadata)


def _import_metadata(
    doc: dict[str, Any], hf_dir: Path, model_type: str, notes: list[str]
) -> tuple[dict[str, Any], Path | None]:
    """Checkpoint metadata of an import, and the folder's tokenizer.json (None, with a warning,
    when it has none)."""
    metadata = {
        "source": "huggingface",
        "hf_dir": str(hf_dir.resolve()),
        "hf_model_type": model_type,
        "bos_token_id": doc.get("bos_token_id"),
        "eos_token_id": doc.get("eos_token_id"),
        "notes": notes,
    }
    tokenizer = hf_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        warnings.warn(
            f"{hf_dir}: no tokenizer.json; the checkpoint is written without a tokenizer",
            stacklevel=3,
        )
        return metadata, None
    return metadata, tokenizer


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a ``config.json`` that is not ours)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    doc = read_json(config_path)
    return isinstance(doc, dict) and doc.get("format") != FORMAT


@dataclass
class DenseHFFolder:
    """A dense Hugging Face folder whose tensor table has been checked against its config.json.

    ``tensors`` maps each tensor our model has to (shape, safetensors dtype name, file holding
    it); the weights themselves are not read (see :meth:`read`).
    """

    path: Path
    cfg: ModelConfig
    notes: list[str]
    metadata: dict[str, Any]
    tokenizer: Path | None
    tensors: dict[str, tuple[tuple[int, ...], str, Path]]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, through a fresh handle (memory-mapped)."""
        file = self.tensors[name][2]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise NexusError(
                f"{file}: cannot read tensor '{name}' ({exc}); the file is corrupt or truncated "
                "— download it again"
            ) from exc


def open_dense_hf(hf_dir: str | Path) -> DenseHFFolder:
    """Check a dense Hugging Face folder from its config.json and safetensors headers alone.

    Every tensor the config implies must be present with its shape, nothing unexplained may be
    left over, and biases the format has but our model lacks must be zero, exactly as the
    in-memory import checks it. Conversion notes are issued as warnings.
    """
    hf_dir = Path(hf_dir)
    config_path, doc = _read_hf_config(hf_dir)
    adapter = _adapter(doc.get("model_type"), str(config_path))
    if not isinstance(adapter, DenseAdapter):
        raise NexusError(
            f"{config_path}: model_type '{adapter.model_type}' is an MoE; a dense model is "
            f"needed here (one of: {', '.join(sorted(DENSE_ADAPTERS))})"
        )
    cfg, notes = adapter.config_from_hf(doc, config_path)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model).items()}
    del model
    reader = _TensorReader(hf_dir)  # headers only
    for name, shape in expected.items():
        reader.check(name, shape)
    for name, size in adapter._extra_zero_biases(cfg):
        if name in reader and reader.get(name, (size,)).any():
            raise NexusError(
                f"{reader.file_of(name)}: tensor '{name}' is non-zero, but our model has no "
                f"such bias ({adapter.model_type} with attention_bias=true biases o_proj)"
            )
    if cfg.tie_embeddings:
        reader.mark_used("lm_head.weight")  # transformers ties it to the embedding anyway
    reader.check_all_used()
    metadata, tokenizer = _import_metadata(doc, hf_dir, adapter.model_type, notes)
    tensors = {
        name: (shape, reader._dtypes[name], reader.file_of(name))
        for name, shape in expected.items()
    }
    return DenseHFFolder(hf_dir, cfg, notes, metadata, tokenizer, tensors)


def _read_hf_config(hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A Hugging Face folder's config.json path and contents (a JSON object)."""
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise NexusError(f"{config_path}: not found; is {hf_dir} a Hugging Face model folder?")
    doc = read_json(config_path)
    if not isinstance(doc, dict):
        raise NexusError(f"{config_path}: expected a JSON object")
    return config_path, doc


def _import_streamed(hf_dir: Path, out_dir: Path) -> Path:
    """:func:`import_hf` of a dense folder into ``out_dir`` without building the model.

    Everything is checked from the safetensors headers first (:func:`open_dense_hf`); then
    ``model.safetensors`` is written tensor by tensor, each read through a fresh ``safe_open``
    handle and converted to our parameter dtype, so peak memory is about one tensor.
    """
    folder = open_dense_hf(hf_dir)
    cfg = folder.cfg
    with torch.device("meta"):
        model = Transformer(cfg)
    dtypes = {k: v.dtype for k, v in model_state_dict(model).items()}
    del model

    def pieces(name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        yield folder.read(name).to(dtype)

    specs = [
        TensorSpec(name, dtypes[name], shape, functools.partial(pieces, name, dtypes[name]))
        for name, (shape, _, _) in folder.tensors.items()
    ]
    with atomic_dir(out_dir) as tmp:  # the layout of checkpoint.save_checkpoint
        write_json(
            tmp / CKPT_CONFIG_FILE,
            {
                "format": FORMAT,
                "version": __version__,
                "model": to_dict(cfg),
                "metadata": folder.metadata,
            },
        )
        # Like safetensors' own writer: larger dtypes first, then by name.
        specs.sort(key=lambda spec: (-spec.dtype.itemsize, spec.name))
        write_safetensors(tmp / CKPT_WEIGHTS_FILE, specs, metadata={"format": "pt"})
        if folder.tokenizer is not None:
            shutil.copyfile(folder.tokenizer, tmp / TOKENIZER_FILE)
    return out_dir


def import_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Transformer | Path:
    """Convert a ``.gguf`` file (llama.cpp) into our model, through ``transformers``.

    transformers reads and dequantises the file (``AutoModelForCausalLM.from_pretrained(dir,
    gguf_file=...)``, float32 weights; needs the ``gguf`` and ``accelerate`` packages), then its
    weights are converted like a Hugging Face folder (see :func:`import_hf`). Any architecture
    transformers reads from GGUF and :data:`ADAPTERS` supports works; in practice the dense
    Llama family (Llama, SmolLM, Mistral, Qwen2, ...). With ``out_dir`` the tokenizer stored in
    the file is written as ``tokenizer.json`` beside the weights; returns like :func:`import_hf`.

    Quantised weights are dequantised, not re-quantised: the result reproduces transformers'
    float32 logits for the file, not llama.cpp's quantised arithmetic.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise NexusError(f"{path}: GGUF file not found")
    transformers = _gguf_support(path)
    try:  # config from the GGUF header; quantised tensors dequantised to float32
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise NexusError(f"{path}: transformers cannot load this GGUF file ({exc})") from exc
    doc = hf_model.config.to_dict()
    state = hf_model.state_dict()
    model, adapter, notes = _convert(doc, path, functools.partial(_StateDictReader, state, path))
    del hf_model, state  # the dequantised copy; our model holds its own
    if out_dir is None:
        return model
    metadata = {
        "source": "gguf",
        "gguf_file": str(path.resolve()),
        "hf_model_type": adapter.model_type,
        "bos_token_id": doc.get("bos_token_id"),
        "eos_token_id": doc.get("eos_token_id"),
        "notes": notes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = _gguf_tokenizer(transformers, path, Path(tmp))
        return save_checkpoint(out_dir, model, tokenizer_file, metadata=metadata)


def _gguf_support(path: Path) -> Any:
    """The transformers module, after checking that it can read GGUF files here."""
    missing = [
        package
        for package in ("transformers", "gguf", "accelerate")
        if importlib.util.find_spec(package) is None
    ]
    if missing:
        raise NexusError(
            f"{path}: reading GGUF files needs the Python package(s) {', '.join(missing)} "
            f"(transformers dequantises the file); install them: pip install {' '.join(missing)}"
        )
    import transformers

    return transformers


def _gguf_tokenizer(transformers: Any, path: Path, tmp: Path) -> Path | None:
    """The GGUF file's tokenizer, written as ``tmp/tokenizer.json`` (None, with a warning, if
    transformers cannot turn it into a fast tokenizer)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        warnings.warn(f"{path}: tokenizer not imported ({exc})", stacklevel=3)
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        warnings.warn(f"{path}: tokenizer has no tokenizer.json form; not imported", stacklevel=3)
        return None
    target = tmp / TOKENIZER_FILE
    backend.save(str(target))
    return target


def _convert(
    doc: dict[str, Any], where: Path, open_reader: Callable[[], _TensorReader]
) -> tuple[Transformer, Adapter, list[str]]:
    """Our model for HF config ``doc`` and the tensors of ``open_reader()``; every tensor is
    checked against the config, and leftovers are an error."""
    adapter = _adapter(doc.get("model_type"), str(where))
    cfg, notes = adapter.config_from_hf(doc, where)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")  # no random init: every weight is loaded below
    model.init_buffers()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    reader = open_reader()
    adapter.load_into(model, reader)
    reader.check_all_used()
    return model.eval(), adapter, notes


# --------------------------------------------------------------------------------------------
# export


def export_hf(
    ckpt_or_model: Transformer | str | Path,
    out_dir: str | Path,
    fmt: str = "auto",
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a model as a Hugging Face checkpoint that ``AutoModelForCausalLM`` loads.

    ``ckpt_or_model`` is a :class:`Transformer` or a native checkpoint directory (whose
    ``tokenizer.json`` is used unless ``tokenizer_path`` is given; it is streamed, one tensor in
    memory at a time, never the whole model). ``fmt`` is a key of
    :data:`ADAPTERS`: dense ``llama``, ``mistral``, ``qwen2``, ``qwen3``; MoE ``qwen2_moe``
    (shared expert, any top-k gating, MoE every k-th block) and ``mixtral`` (no shared expert,
    renormalised gates, every block MoE); ``auto`` picks llama/qwen3 for a dense model and
    mixtral, else qwen2_moe, for a MoE. Linear and Nexus routers are exported as the gate matrix
    they score tokens with; a model a format cannot express exactly (an AC router, ...) is
    refused. Biases a format requires but the model lacks are written as zeros.

    Weights are saved in ``dtype`` (default: the model's) as ``model.safetensors``, or as shards
    plus ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes. Also writes
    ``config.json``, ``generation_config.json``, with a tokenizer ``tokenizer.json`` +
    ``tokenizer_config.json``, and for a MoE or a checkpoint directory a model card
    ``README.md``. The folder appears atomically.
    """
    out_dir = Path(out_dir)
    if not isinstance(ckpt_or_model, Transformer):
        # A checkpoint directory is streamed: nothing but one tensor at a time is in memory.
        ckpt_dir = Path(ckpt_or_model)
        cfg, metadata = load_config(ckpt_dir)
        if tokenizer_path is None and (ckpt_dir / TOKENIZER_FILE).is_file():
            tokenizer_path = ckpt_dir / TOKENIZER_FILE
        return export_streamed(
            _NativeTensors(ckpt_dir, cfg),
            cfg,
            out_dir,
            fmt=fmt,
            metadata=metadata,
            tokenizer_path=tokenizer_path,
            max_shard_size=max_shard_size,
            dtype=dtype,
        )
    model = ckpt_or_model
    cfg = model.cfg
    fmt = _auto_format(cfg) if fmt == "auto" else fmt
    adapter = _adapter(fmt, "export_hf(fmt=...)")
    adapter.check_exportable(cfg)
    dtype = dtype or model.model.embed_tokens.weight.dtype
    with torch.no_grad():
        hf_state = {k: v.to(dtype).contiguous() for k, v in adapter.state_to_hf(model).items()}
    plan = {
        name: (tuple(t.shape), functools.partial(lambda t: [t], t)) for name, t in hf_state.items()
    }
    del hf_state  # the plan holds the tensors
    return _write_hf(out_dir, adapter, cfg, plan, dtype, None, tokenizer_path, max_shard_size)


def export_streamed(
    source: TensorSource,
    cfg: ModelConfig,
    out_dir: str | Path,
    fmt: str = "auto",
    metadata: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> Path:
    """:func:`export_hf` of a model given as a :class:`TensorSource` (our tensor names), e.g. a
    checkpoint directory or the output of an upcycling that is never written in our format.

    Each Hugging Face tensor is produced from the source tensors it needs when it is written,
    so peak memory is about one tensor. ``metadata`` (a checkpoint's) goes into the model card.
    """
    fmt = _auto_format(cfg) if fmt == "auto" else fmt
    adapter = _adapter(fmt, "export_hf(fmt=...)")
    adapter.check_exportable(cfg)
    dtype = dtype or source.dtypes["model.embed_tokens.weight"]
    plan = _hf_plan(adapter, cfg, source, dtype)
    return _write_hf(
        Path(out_dir), adapter, cfg, plan, dtype, metadata, tokenizer_path, max_shard_size
    )


def _write_hf(
    out_dir: Path,
    adapter: Adapter,
    cfg: ModelConfig,
    plan: _Plan,
    dtype: torch.dtype,
    metadata: dict[str, Any] | None,
    tokenizer_path: str | Path | None,
    max_shard_size: int,
) -> Path:
    """Write the Hugging Face folder of :func:`export_hf` from ``plan`` (name -> (shape,
    producer)), atomically."""
    tokenizer_file = find_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    bos_token, eos_token = _special_tokens(tokenizer_file) if tokenizer_file else (None, None)
    # Shard from the shapes alone (meta tensors), in the order state_to_hf lists the tensors.
    split = split_torch_state_dict_into_shards(
        {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, _) in plan.items()},
        max_shard_size=max_shard_size,
    )
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
        total_size = 0
        for file_name, names in split.filename_to_tensors.items():
            specs = [TensorSpec(name, dtype, plan[name][0], plan[name][1]) for name in names]
            # The order of safetensors' own writer: larger dtypes first, then by name.
            specs.sort(key=lambda spec: (-spec.dtype.itemsize, spec.name))
            write_safetensors(tmp / file_name, specs, metadata={"format": "pt"})
            total_size += sum(spec.nbytes for spec in specs)
            for name in names:
                plan.pop(name)  # release in-memory tensors once written
        if split.is_sharded:
            write_json(
                tmp / INDEX_FILE,
                {
                    "metadata": {"total_size": total_size},
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
        if cfg.is_moe or metadata is not None:
            card = _model_card(cfg, adapter, metadata or {}, out_dir.name, tokenizer_file)
            (tmp / MODEL_CARD_FILE).write_text(card)
    return out_dir


class TensorSource(Protocol):
    """Our model's tensors by name, produced on demand (see :func:`export_streamed`).

    ``shapes``/``dtypes``: every tensor of the model's state dict, in state-dict order;
    ``get(name, index)``: the tensor (only its ``index``-th slice along dim 0 if given).
    """

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def get(self, name: str, index: int | None = None) -> torch.Tensor: ...


class _NativeTensors:
    """The tensors of a native checkpoint's ``model.safetensors``, read one at a time.

    The header is checked against the config up front (as :func:`load_checkpoint` does); each
    read opens the file afresh, so no page of the file stays resident after its tensor is gone.
    Tensors come back in the dtype our model's parameter has (what loading the model gives).
    """

    def __init__(self, ckpt_dir: Path, cfg: ModelConfig) -> None:
        self.path = ckpt_dir / CKPT_WEIGHTS_FILE
        if not self.path.is_file():
            raise NexusError(f"{self.path}: weights file not found")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise NexusError(
                f"{self.path}: cannot read weights ({exc}); the file is corrupt or truncated — "
                "restore it from a copy or re-run the stage that wrote it"
            ) from exc
        with torch.device("meta"):
            model = Transformer(cfg)
        state = model_state_dict(model)
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}
        self.dtypes = {name: t.dtype for name, t in state.items()}
        check_tensor_table(self.shapes, found, self.path)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (only its ``index``-th slice along dim 0 if given)."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                tensor = f.get_tensor(name) if index is None else f.get_slice(name)[index]
        except (SafetensorError, OSError, ValueError) as exc:
            raise NexusError(
                f"{self.path}: cannot read tensor '{name}' ({exc}); the file is corrupt or "
                "truncated — restore it from a copy or re-run the stage that wrote it"
            ) from exc
        return tensor.to(self.dtypes[name])


_Plan = dict[str, tuple[tuple[int, ...], Callable[[], Iterable[torch.Tensor]]]]


def _hf_plan(adapter: Adapter, cfg: ModelConfig, native: TensorSource, dtype: torch.dtype) -> _Plan:
    """Every HF tensor of ``adapter.state_to_hf`` (same names, order and values, in ``dtype``)
    as (shape, producer), each producer reading only what that tensor needs from ``native``."""

    def copied(name: str, index: int | None = None, scale: int = 1) -> Callable[[], list]:
        def pieces() -> list[torch.Tensor]:
            tensor = native.get(name, index)
            return [(tensor * scale if scale != 1 else tensor).to(dtype)]

        return pieces

    def zeros(shape: tuple[int, ...]) -> Callable[[], list]:
        return lambda: [torch.zeros(shape, dtype=dtype)]

    dense = adapter.dense if isinstance(adapter, MoEAdapter) else adapter
    skip = adapter._moe_prefixes(cfg) if isinstance(adapter, MoEAdapter) else ()
    plan: _Plan = {}
    for name, shape in native.shapes.items():
        if not name.startswith(skip):
            plan[name] = (shape, copied(name))
    for name, size in dense._extra_zero_biases(cfg):
        plan[name] = ((size,), zeros((size,)))
    if not isinstance(adapter, MoEAdapter):
        return plan
    moe = cfg.moe
    assert moe is not None
    hidden = cfg.hidden_size
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        ours = f"model.layers.{i}.mlp"
        prefix = f"model.layers.{i}.{adapter.moe_module}"
        plan[f"{prefix}.gate.weight"] = ((moe.num_experts, hidden), _gate(native, cfg, ours, dtype))
        stacked = [f"{ours}.experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        for j in range(moe.num_experts):
            for hf_name, name in zip(adapter.expert_names, stacked, strict=True):
                shape = native.shapes[name][1:]
                plan[f"{prefix}.experts.{j}.{hf_name}.weight"] = (shape, copied(name, j))
        if not adapter.has_shared_expert:
            continue
        shared = f"{prefix}.shared_expert"
        names = [f"{ours}.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        if moe.shared_expert:
            plan[f"{shared}.gate_proj.weight"] = (native.shapes[names[0]], copied(names[0]))
            plan[f"{shared}.up_proj.weight"] = (native.shapes[names[1]], copied(names[1]))
            # sigmoid(0) = 1/2 scales the shared expert: doubled down_proj (see _shared_to_hf).
            plan[f"{shared}.down_proj.weight"] = (
                native.shapes[names[2]],
                copied(names[2], scale=2),
            )
        else:  # an empty (width 0) shared expert adds exactly nothing
            plan[f"{shared}.gate_proj.weight"] = ((0, hidden), zeros((0, hidden)))
            plan[f"{shared}.up_proj.weight"] = ((0, hidden), zeros((0, hidden)))
            plan[f"{shared}.down_proj.weight"] = ((hidden, 0), zeros((hidden, 0)))
        plan[f"{prefix}.shared_expert_gate.weight"] = ((1, hidden), zeros((1, hidden)))
    return plan


def _gate(
    native: TensorSource, cfg: ModelConfig, prefix: str, dtype: torch.dtype
) -> Callable[[], list[torch.Tensor]]:
    """The HF gate of MoE block ``prefix``: the router's expert-embedding matrix E (for a Nexus
    router P(d), computed from that layer's small router tensors alone)."""

    def pieces() -> list[torch.Tensor]:
        assert cfg.moe is not None
        with torch.device("meta"):
            router = build_router(cfg.moe, cfg.hidden_size)
        router = router.to_empty(device="cpu")
        names = [f"{prefix}.router.{name}" for name in router.state_dict()]
        router.load_state_dict(
            {name.removeprefix(f"{prefix}.router."): native.get(name) for name in names}
        )
        with torch.no_grad():
            return [router.eval().expert_embeddings().detach().float().to(dtype)]

    return pieces


def _model_card(
    cfg: ModelConfig,
    adapter: Adapter,
    metadata: dict[str, Any],
    name: str,
    tokenizer_file: Path | None,
) -> str:
    """A Hugging Face model card (README.md): what the export is and how it was built."""
    # Count parameters as exported: whatever the router, the HF gate is one (E, hidden) matrix.
    exported = dataclasses.replace(cfg, moe=None)
    if cfg.moe is not None:
        exported.moe = dataclasses.replace(cfg.moe, router=RouterType.linear)
    total, active = exported.num_params(), exported.num_params(active=True)
    rows = [
        ("architecture", f"`{adapter.architecture}` (model_type `{adapter.model_type}`)"),
        ("parameters", f"{total / 1e6:.2f} M total, {active / 1e6:.2f} M active per token"),
        (
            "layers / hidden / heads",
            f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads} "
            f"(kv heads {cfg.num_kv_heads}, head dim {cfg.head_dim})",
        ),
        ("context", f"{cfg.max_seq_len} tokens, RoPE base {cfg.rope_theta:g}"),
        ("tokenizer", "included (`tokenizer.json`)" if tokenizer_file else "not included"),
    ]
    lines = ["---", "library_name: transformers", "tags:", "- nexus-moe"]
    if cfg.moe is not None:
        lines.append("- mixture-of-experts")
    lines += ["---", "", f"# {name}", ""]
    kind = "Mixture-of-Experts" if cfg.moe is not None else "dense"
    lines += [
        f"A {kind} language model built with nexus-moe and exported to the Hugging Face "
        f"`{adapter.model_type}` format: `AutoModelForCausalLM.from_pretrained` loads it with "
        "no custom code and reproduces the nexus-moe model's logits (float32).",
        "",
    ]
    moe = cfg.moe
    if moe is not None:
        moe_blocks = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
        gates = "p_i / sum of the top-k p (renormalised)" if moe.renormalize else "p_i"
        router = {
            RouterType.linear: "linear (a learned gate matrix)",
            RouterType.nexus: (
                "Nexus: expert embeddings projected from fixed domain embeddings "
                f"({moe.embedder or 'sentence embedder'}); exported as the projected "
                "expert-embedding matrix, a linear gate with identical logits"
            ),
        }.get(moe.router, moe.router.value)
        rows += [
            ("routed experts", f"{moe.num_experts}, top-{moe.top_k} per token, gate = {gates}"),
            ("shared expert", "yes (always on)" if moe.shared_expert else "no"),
            ("router", router),
            ("MoE blocks", ", ".join(map(str, moe_blocks))),
        ]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    domains = (moe.domains if moe is not None else []) or metadata.get("domains") or []
    if moe is not None and domains:
        lines += ["## Experts", "", "| expert | domain |", "|---|---|"]
        lines += [f"| {i} | {domain} |" for i, domain in enumerate(domains)]
        lines.append("")
    provenance = {k: v for k, v in metadata.items() if k != "domains" and v not in (None, [], {})}
    if provenance:
        lines += ["## How it was built", ""]
        for key, value in provenance.items():
            if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
                shown = ", ".join(map(str, value))
            else:
                shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"- **{key}**: {shown}")
        lines.append("")
    if adapter.model_type == "qwen2_moe" and moe is not None:
        lines += [
            "## Format notes",
            "",
            "Qwen2-MoE scales the shared expert by `sigmoid(x . w)`; here `w = 0` "
            "(`shared_expert_gate`), a constant 1/2, and the shared expert's `down_proj` is "
            "doubled, so each MoE block computes exactly what the nexus-moe layer does"
            + ("." if moe.shared_expert else " (the shared expert is empty: width 0).")
            + ("" if cfg.attention_bias else " The q/k/v biases are zeros (the model has none)."),
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
    ]
    if tokenizer_file is not None:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{name}")')
    lines += ["```", ""]
    return "\n".join(lines)


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
