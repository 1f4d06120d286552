"""The Hugging Face formats nexus-moe reads and writes, one description each (docs/design.md §15).

A format is plain data: which ``config.json`` keys and defaults it uses, which biases and norms
its attention has, and for a MoE how its blocks are named. :mod:`nexus_moe.hf.config` translates
``config.json`` with these descriptions and :mod:`nexus_moe.hf.mapping` maps the tensors, so adding
a format is adding an entry to :data:`FORMATS` (and, if its tensors are laid out differently, a
case in the mapping).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError


@dataclass(frozen=True)
class DenseFormat:
    """A Hugging Face dense ``model_type`` (every one here is a Llama variant).

    They differ only in which biases and norms the attention has, their ``config.json`` defaults,
    and how they describe sliding-window attention.
    """

    model_type: str
    architecture: str  # the ``architectures`` entry transformers instantiates
    qkv_bias: Literal["config", "always", "never"]  # where q/k/v biases come from
    o_proj_bias_follows_qkv: bool  # Llama/Qwen3: ``attention_bias`` also biases o_proj
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3), always present when True
    # How config.json turns sliding windows on, as transformers reads it: "mistral": a window
    # on every layer when sliding_window is set; "qwen" (Qwen2/Qwen3): with use_sliding_window,
    # the layers layer_types names, else those from max_window_layers on; "qwen2_moe": the
    # layers layer_types names, else the even layers below max_window_layers; "qwen3_moe":
    # every layer (layer_types and max_window_layers are not read).
    sliding: Literal["none", "mistral", "qwen", "qwen2_moe", "qwen3_moe"]
    default_head_dim: int | None  # config.json without head_dim: None means hidden / heads
    default_max_positions: int  # transformers' default max_position_embeddings
    extra_config: dict[str, Any] = field(default_factory=dict)  # static fields on export
    default_sliding_window: int | None = 4096  # "mistral" style: window when the key is absent
    default_rope_theta: float = 10000.0  # transformers' default when config.json names none
    # transformers 5 loads its own tokenizer class for this model_type whatever
    # tokenizer_config.json declares (Qwen2Tokenizer, which splits text its own way)
    tokenizer_class_overridden: bool = False

    @property
    def dense(self) -> DenseFormat:
        """The format of the non-MoE part: itself."""
        return self


@dataclass(frozen=True)
class MoEFormat:
    """A Hugging Face MoE ``model_type``: the dense sibling ``dense`` plus the MoE blocks.

    Every format here computes ``softmax(x @ gate^T)`` in float32 over all routed experts, take
    the top-k and (optionally) renormalise, exactly as our MoE layer (docs/design.md §3).
    """

    model_type: str
    architecture: str
    dense: DenseFormat  # attention, norms, RoPE, sliding windows
    moe_module: str  # HF name of a MoE block's module: "mlp" or "block_sparse_moe"
    expert_names: tuple[str, str, str]  # HF names of each expert's gate, up and down projections
    has_shared_expert: bool  # Qwen2-MoE: every MoE block has a sigmoid-gated shared expert
    num_experts_key: str  # config.json key of the number of routed experts
    default_num_experts: int  # transformers' defaults for config.json keys that are absent
    default_top_k: int
    sparse_layers: Literal["all", "mlp_only_layers"]  # which blocks config.json can make MoE
    # config.json key of the experts' FFN width; None: they have intermediate_size
    expert_width_key: str | None = None
    default_expert_width: int = 0
    # config.json key saying whether gates are renormalised; None: always (g_i = p_i / sum_topk p)
    renormalize_key: str | None = None
    # config.json key of the q/k/v biases when the format has its own (Qwen2-MoE: qkv_bias)
    qkv_bias_key: str | None = None
    # runtimes derive head_dim from hidden_size / num_heads (transformers 4.x Qwen2-MoE)
    head_dim_from_hidden: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)  # static MoE fields on export
    # another config.json key some transformers versions write for the number of experts
    num_experts_alias: str | None = None

    @property
    def always_renormalize(self) -> bool:
        return self.renormalize_key is None


Format = DenseFormat | MoEFormat


def _dense(model_type: str, architecture: str, **kwargs: Any) -> DenseFormat:
    return DenseFormat(model_type=model_type, architecture=architecture, **kwargs)


DENSE_FORMATS: dict[str, DenseFormat] = {
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
        tokenizer_class_overridden=True,
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

MOE_FORMATS: dict[str, MoEFormat] = {
    "qwen2_moe": MoEFormat(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        dense=_dense(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            qkv_bias="always",  # on import, config.json's qkv_bias decides (default true)
            o_proj_bias_follows_qkv=False,
            qk_norm=False,
            sliding="qwen2_moe",
            default_head_dim=None,
            default_max_positions=32768,
        ),
        moe_module="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        has_shared_expert=True,
        num_experts_key="num_experts",
        default_num_experts=60,
        default_top_k=4,
        sparse_layers="mlp_only_layers",
        expert_width_key="moe_intermediate_size",
        default_expert_width=1408,
        renormalize_key="norm_topk_prob",
        qkv_bias_key="qkv_bias",
        head_dim_from_hidden=True,
    ),
    "qwen3_moe": MoEFormat(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        dense=_dense(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            qkv_bias="config",
            o_proj_bias_follows_qkv=True,
            qk_norm=True,
            sliding="qwen3_moe",
            default_head_dim=None,
            default_max_positions=32768,
        ),
        moe_module="mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        has_shared_expert=False,
        num_experts_key="num_experts",
        default_num_experts=128,
        default_top_k=8,
        sparse_layers="mlp_only_layers",
        expert_width_key="moe_intermediate_size",
        default_expert_width=768,
        renormalize_key="norm_topk_prob",
        num_experts_alias="num_local_experts",  # transformers 5's save_pretrained
    ),
    "mixtral": MoEFormat(
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
        num_experts_key="num_local_experts",
        default_num_experts=8,
        default_top_k=2,
        sparse_layers="all",
        extra_config={"router_jitter_noise": 0.0},
    ),
}

FORMATS: dict[str, Format] = {**DENSE_FORMATS, **MOE_FORMATS}
AUTO = "auto"  # pick the plainest format that expresses the model (see auto_format)
NATIVE = "native"  # upcycle: our own checkpoint instead of a Hugging Face folder

# The choices of `export --format` and `upcycle --format`, built from FORMATS so that a new
# format is offered everywhere at once.
ExportFormat = enum.StrEnum("ExportFormat", {name: name for name in (AUTO, *FORMATS)})
UpcycleFormat = enum.StrEnum("UpcycleFormat", {name: name for name in (NATIVE, AUTO, *FORMATS)})


# `--dtype` of exported weights (default: the model's own dtype).
ExportDtype = enum.StrEnum("ExportDtype", {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*((?:[KMGT]I?)?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """Bytes of a size such as ``2GB``, ``500MB``, ``1GiB`` or ``1000000`` (for ``option``)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise NexusError(
                f"{option} {text!r}: expected a size such as 2GB, 500MB, 1GiB or a number of bytes"
            )
        number, unit = match.groups()
        unit = unit.upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGT".index(unit[0]) if unit and unit[0] != "B" else 0
        size = int(float(number) * base**power)
    if size <= 0:
        raise NexusError(f"{option} {text!r}: must be positive")
    return size


# model_type of an MoE export that routes on context: this prefix + the format it extends, run by
# the modeling module written beside the weights (trust_remote_code; docs/design.md §15.1).
CONTEXT_PREFIX = "nexus_context_"
CONTEXT_MODULE = "modeling_nexus_context"  # hf/remote/<this>.py, copied into the folder


def context_class_names(fmt: MoEFormat) -> tuple[str, str]:
    """The (config, model) class names of :data:`CONTEXT_MODULE` for format ``fmt``."""
    model = f"NexusContext{fmt.architecture}"
    return model.removesuffix("ForCausalLM") + "Config", model


def format_for(model_type: Any, where: str) -> Format:
    """The format named ``model_type`` (from a config.json at ``where``, or an option); a
    context-routing export's ``nexus_context_<format>`` names the MoE format it extends."""
    if isinstance(model_type, str) and model_type.startswith(CONTEXT_PREFIX):
        base = model_type.removeprefix(CONTEXT_PREFIX)
        if base in MOE_FORMATS:
            return MOE_FORMATS[base]
    if model_type not in FORMATS:
        raise NexusError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(DENSE_FORMATS))} (dense), "
            f"{', '.join(sorted(MOE_FORMATS))} (MoE)"
        )
    return FORMATS[model_type]


def auto_format(cfg: ModelConfig) -> str:
    """The format ``--format auto`` picks: the plainest one that expresses ``cfg`` exactly."""
    if cfg.moe is None:
        if cfg.qk_norm:
            return "qwen3"
        if cfg.sliding_window is not None:  # llama has no window
            return "qwen2" if cfg.attention_bias else "mistral"
        return "llama"
    moe = cfg.moe
    if cfg.qk_norm:
        return "qwen3_moe"  # the only MoE format with q/k norms (refuses a shared expert)
    mixtral_fits = (
        not moe.shared_expert
        and moe.renormalize
        and not cfg.attention_bias
        and all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    )
    return "mixtral" if mixtral_fits else "qwen2_moe"


def export_format(fmt: str, cfg: ModelConfig) -> Format:
    """The format to export ``cfg`` in for option ``fmt`` (a format name or ``auto``)."""
    return format_for(auto_format(cfg) if fmt == AUTO else fmt, "--format")
