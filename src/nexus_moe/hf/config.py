"""``config.json`` <-> :class:`ModelConfig` for each Hugging Face format (docs/design.md §15).

Imports read what the format says and refuse what our model cannot compute exactly (RoPE
scaling, MLP biases, MoE layers that are not every k-th block, ...). Exports write a complete
``config.json`` readable by transformers 4.45+ and 5.x, plus, for a MoE, our own config under
:data:`SIDECAR_KEY` so that an import restores what the format does not carry. A MoE routing on
context is written as ``nexus_context_<format>`` with an ``auto_map`` to the modeling module
(transformers 5) and its ``router_context``, which an import reads back.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from nexus_moe import __version__
from nexus_moe.config import ModelConfig, MoEConfig, RouterType, from_dict, to_dict
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import (
    CONTEXT_MODULE,
    CONTEXT_PREFIX,
    FORMATS,
    DenseFormat,
    Format,
    MoEFormat,
    context_class_names,
)
from nexus_moe.io_utils import CONFIG_FILE, read_json
from nexus_moe.routers.peer_router import export_refusal

# Key of an exported config.json that records our own config, so that an import can restore what
# the HF format does not carry (domain names, an unused FFN width, moe_every); transformers keeps
# unknown keys and ignores them.
SIDECAR_KEY = "nexus_moe"


def config_from_hf(fmt: Format, doc: dict[str, Any], source: Path) -> tuple[ModelConfig, list[str]]:
    """Our config for HF ``config.json`` ``doc`` (a MoE gets a linear router), plus notes on
    anything approximated."""
    if isinstance(fmt, MoEFormat):
        return _moe_from_hf(fmt, doc, source)
    return _dense_from_hf(fmt, doc, source)


def check_exportable(fmt: Format, cfg: ModelConfig) -> None:
    """Raise NexusError when ``cfg`` cannot be written exactly in format ``fmt``."""
    if isinstance(fmt, MoEFormat):
        _check_moe(fmt, cfg)
    else:
        _check_dense(fmt, cfg)


def config_to_hf(
    fmt: Format,
    cfg: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> dict[str, Any]:
    """A complete HF ``config.json`` for ``cfg`` in format ``fmt``."""
    if isinstance(fmt, MoEFormat):
        return _moe_to_hf(fmt, cfg, dtype, bos_token_id, eos_token_id)
    return _dense_to_hf(fmt, cfg, dtype, bos_token_id, eos_token_id)


def read_hf_config(hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A Hugging Face folder's config.json path and contents (a JSON object)."""
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise NexusError(f"{config_path}: not found; is {hf_dir} a Hugging Face model folder?")
    doc = read_json(config_path)
    if not isinstance(doc, dict):
        raise NexusError(f"{config_path}: expected a JSON object")
    return config_path, doc


# --------------------------------------------------------------------------------------------
# dense


def _dense_from_hf(
    fmt: DenseFormat, doc: dict[str, Any], source: Path
) -> tuple[ModelConfig, list[str]]:
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
    head_dim = doc.get("head_dim") or fmt.default_head_dim
    if head_dim is None:
        head_dim = doc["hidden_size"] // heads
    max_positions = doc.get("max_position_embeddings") or fmt.default_max_positions
    notes: list[str] = []
    window = _sliding_window(fmt, doc, where)
    if window is not None and window >= max_positions:
        window = None  # the window never cuts anything off: full causal attention
    if fmt.qkv_bias == "config":
        bias = bool(doc.get("attention_bias", False))
    else:
        bias = fmt.qkv_bias == "always"
    cfg = ModelConfig(
        vocab_size=doc["vocab_size"],
        hidden_size=doc["hidden_size"],
        intermediate_size=doc["intermediate_size"],
        num_layers=doc["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=doc.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_seq_len=max_positions,
        rope_theta=_rope_theta(doc, where, fmt.default_rope_theta),
        rms_norm_eps=float(doc.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(doc.get("tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm=fmt.qk_norm,
        sliding_window=window,
        init_std=float(doc.get("initializer_range", 0.02)),
    )
    return cfg, notes


QWEN_SLIDING = ("qwen", "qwen2_moe", "qwen3_moe")  # switched on by use_sliding_window


def _sliding_window(fmt: DenseFormat, doc: dict[str, Any], where: str) -> int | None:
    """The attention window every layer uses, or None for full attention; a window on some
    layers only is refused (our blocks all attend alike)."""
    if fmt.sliding == "mistral":
        window = doc.get("sliding_window", fmt.default_sliding_window)
    elif fmt.sliding in QWEN_SLIDING and doc.get("use_sliding_window", False):
        window = doc.get("sliding_window", 4096)
        layers = doc["num_hidden_layers"]
        layer_types = doc.get("layer_types")
        if fmt.sliding == "qwen3_moe":  # transformers: the window on every layer
            sliding = [True] * layers
        elif layer_types is not None:
            sliding = [kind == "sliding_attention" for kind in layer_types]
        elif fmt.sliding == "qwen2_moe":  # transformers: even layers below max_window_layers
            first = _int_field(doc, "max_window_layers", 28, where)
            sliding = [i % 2 == 0 and i < first for i in range(layers)]
        else:  # transformers' rule: layers from max_window_layers on slide
            first = _int_field(doc, "max_window_layers", 28, where)
            sliding = [i >= first for i in range(layers)]
        if not any(sliding):
            return None
        if not all(sliding):
            raise NexusError(
                f"{where}: sliding-window attention on layers "
                f"{[i for i, s in enumerate(sliding) if s]} only (max_window_layers / "
                "layer_types); nexus-moe's blocks attend alike, with the window on every layer "
                "or on none"
            )
    else:
        return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise NexusError(f"{where}: 'sliding_window' must be a positive integer, got {window!r}")
    return window


def _check_dense(fmt: DenseFormat, cfg: ModelConfig) -> None:
    """Raise NexusError when ``cfg`` cannot be written exactly in this format."""
    if cfg.is_moe:
        raise NexusError(
            f"format '{fmt.model_type}' holds dense models only; this checkpoint is a MoE: "
            "export it with --format mixtral, qwen3_moe or qwen2_moe (or --format auto)"
        )
    if cfg.qk_norm and not fmt.qk_norm:
        raise NexusError(
            f"the model normalises q and k per head (qk_norm, Qwen3-style), which "
            f"'{fmt.model_type}' cannot express; export with --format qwen3"
        )
    if fmt.qk_norm and not cfg.qk_norm:
        raise NexusError(
            f"'{fmt.model_type}' always normalises q and k per head but this model does not "
            "(qk_norm=false); export with --format llama or qwen2"
        )
    if cfg.attention_bias and fmt.qkv_bias == "never":
        raise NexusError(
            f"the model has q/k/v biases, which '{fmt.model_type}' cannot express; "
            "export with --format qwen2 or llama"
        )
    _check_window(fmt, cfg)


def _check_window(fmt: DenseFormat, cfg: ModelConfig) -> None:
    if cfg.sliding_window is not None and fmt.sliding == "none":
        raise NexusError(
            f"the model attends within a sliding window of {cfg.sliding_window} positions, "
            f"which '{fmt.model_type}' cannot express; export with --format mistral, qwen2 or "
            "qwen3 (MoE: mixtral, qwen2_moe, qwen3_moe)"
        )


def _dense_to_hf(
    fmt: DenseFormat,
    cfg: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> dict[str, Any]:
    """A complete HF ``config.json`` for ``cfg`` (readable by transformers 4.45+ and 5.x)."""
    dtype_name = str(dtype).removeprefix("torch.")
    doc: dict[str, Any] = {
        "architectures": [fmt.architecture],
        "model_type": fmt.model_type,
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
    if fmt.qkv_bias == "config":
        doc["attention_bias"] = cfg.attention_bias
    window = cfg.sliding_window
    if fmt.sliding == "mistral":
        doc["sliding_window"] = window
    elif fmt.sliding in QWEN_SLIDING:
        doc["use_sliding_window"] = window is not None
        doc["sliding_window"] = window
        # Layers from max_window_layers on slide (transformers 4.x); layer_types (5.x).
        doc["max_window_layers"] = 0 if window is not None else cfg.num_layers
        kind = "sliding_attention" if window is not None else "full_attention"
        doc["layer_types"] = [kind] * cfg.num_layers
    doc.update(fmt.extra_config)
    return doc


# --------------------------------------------------------------------------------------------
# MoE


def _moe_from_hf(
    fmt: MoEFormat, doc: dict[str, Any], source: Path
) -> tuple[ModelConfig, list[str]]:
    """Our config (linear router) for HF ``config.json`` ``doc``, plus notes."""
    where = f"{source}"
    base, notes = _dense_from_hf(fmt.dense, doc, source)
    layers = base.num_layers
    key = fmt.num_experts_key
    if key not in doc and fmt.num_experts_alias in doc:
        key = fmt.num_experts_alias
    num_experts = _int_field(doc, key, fmt.default_num_experts, where)
    top_k = _int_field(doc, "num_experts_per_tok", fmt.default_top_k, where)
    if fmt.sparse_layers == "all":
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
    expert_size = base.intermediate_size
    if fmt.expert_width_key is not None:
        expert_size = _int_field(doc, fmt.expert_width_key, fmt.default_expert_width, where)
    shared_size = 0
    if fmt.has_shared_expert:
        shared_size = _int_field(doc, "shared_expert_intermediate_size", 5632, where)
        has_dense = len(sparse) < layers
        if shared_size and has_dense and shared_size != base.intermediate_size:
            raise NexusError(
                f"{where}: shared_expert_intermediate_size={shared_size} differs from "
                f"intermediate_size={base.intermediate_size} of the dense layers; our shared "
                "expert has the dense FFN's width"
            )
        intermediate = shared_size or intermediate  # 0: no shared expert
    renormalize = True
    if fmt.renormalize_key is not None:
        renormalize = bool(doc.get(fmt.renormalize_key, False))
    attention_bias = base.attention_bias
    if fmt.qkv_bias_key is not None:
        attention_bias = bool(doc.get(fmt.qkv_bias_key, True))
    try:
        moe = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            shared_expert=shared_size > 0,
            # A Qwen2-MoE shared expert is gated by a learned sigmoid; our own exports record
            # (in the sidecar) when theirs is the always-on expert with an all-zero gate.
            shared_expert_gate=shared_size > 0,
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
    cfg = _restore_from_sidecar(cfg, doc, where)
    assert cfg.moe is not None
    # What the router scores is the format's: the context mix only for our context model_type.
    context = _router_context(doc, where)
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router_context=context)), notes


def _router_context(doc: dict[str, Any], where: str) -> float:
    """``router_context`` of a ``nexus_context_<format>`` config (0: the format's own routing)."""
    if not str(doc.get("model_type", "")).startswith(CONTEXT_PREFIX):
        return 0.0
    value = doc.get("router_context")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise NexusError(
            f"{where}: 'router_context' must be a number in (0, 1] for model_type "
            f"'{doc.get('model_type')}' (the weight of the running mean in what the router "
            f"scores), got {value!r}"
        )
    return float(value)


def _check_moe(fmt: MoEFormat, cfg: ModelConfig) -> None:
    """Raise NexusError when ``cfg`` cannot be written exactly in this format."""
    name = fmt.model_type
    if cfg.moe is None:
        raise NexusError(
            f"format '{name}' holds MoE models; this model is dense: export it with "
            "--format llama, mistral, qwen2 or qwen3 (or --format auto)"
        )
    moe = cfg.moe
    if moe.router == RouterType.ac:
        raise NexusError(
            "the adaptive-clustering (AC) router rescales each token by statistics of the "
            "previous MoE layer's routing; no Hugging Face MoE format (qwen2_moe, qwen3_moe, "
            "mixtral) can express that, so an AC model cannot be exported"
        )
    if (refusal := export_refusal(moe.router_init)) is not None:  # a peer's bias or score
        raise NexusError(refusal)
    if cfg.qk_norm and moe.shared_expert:
        raise NexusError(
            "the model normalises q and k per head (qk_norm, a Qwen3 seed) and has a shared "
            "expert; no Hugging Face MoE format holds both (qwen3_moe has no shared expert, "
            "qwen2_moe and mixtral no q/k norms): upcycle with `--set shared_expert=false` and "
            "export with --format qwen3_moe, or keep the nexus-moe checkpoint"
        )
    if cfg.qk_norm and not fmt.dense.qk_norm:
        raise NexusError(
            f"the model normalises q and k per head (qk_norm), which '{name}' cannot express; "
            "export with --format qwen3_moe"
        )
    if fmt.dense.qk_norm and not cfg.qk_norm:
        raise NexusError(
            f"'{name}' always normalises q and k per head but this model does not "
            "(qk_norm=false); export with --format mixtral or qwen2_moe"
        )
    if cfg.attention_bias and fmt.dense.qkv_bias == "never":
        raise NexusError(
            f"the model has q/k/v biases, which '{name}' cannot express; export with "
            "--format qwen2_moe"
        )
    if moe.shared_expert and not fmt.has_shared_expert:
        raise NexusError(
            f"the model has a shared expert, which '{name}' cannot express; export with "
            "--format qwen2_moe"
        )
    if fmt.always_renormalize and not moe.renormalize:
        top1 = " (with top_k=1 its gate would be 1 instead of p_i)" if moe.top_k == 1 else ""
        raise NexusError(
            f"'{name}' always renormalises the top-k gates (g_i = p_i / sum_topk p){top1}, "
            "but this model uses g_i = p_i (renormalize=false); export with "
            "--format qwen2_moe, which keeps norm_topk_prob=false"
        )
    dense_layers = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense_layers and fmt.sparse_layers == "all":
        raise NexusError(
            f"'{name}' makes every block a MoE block, but this model's blocks "
            f"{dense_layers} are dense (moe_every={moe.moe_every}); export with "
            "--format qwen2_moe, whose mlp_only_layers lists them"
        )
    if fmt.head_dim_from_hidden and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        # transformers 4.x and other runtimes of this format derive head_dim from hidden_size.
        raise NexusError(
            f"head_dim={cfg.head_dim} is not hidden_size / num_heads "
            f"({cfg.hidden_size} / {cfg.num_heads}), which '{name}' cannot express "
            "portably; export with --format mixtral if the model has no shared expert"
        )
    if fmt.has_shared_expert and not moe.shared_expert:
        fits = [other for other in ("mixtral",) if _fits(other, cfg)]
        if fits:
            raise NexusError(
                f"the model has no shared expert, which '{name}' would write as zero-width "
                f"tensors; export with --format {fits[0]} (or --format auto)"
            )


def _fits(model_type: str, cfg: ModelConfig) -> bool:
    try:
        check_exportable(FORMATS[model_type], cfg)
    except NexusError:
        return False
    return True


def _moe_to_hf(
    fmt: MoEFormat,
    cfg: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> dict[str, Any]:
    """A complete HF ``config.json`` for ``cfg`` (readable by transformers 4.45+ and 5.x)."""
    moe = cfg.moe
    assert moe is not None
    doc = _dense_to_hf(fmt.dense, cfg, dtype, bos_token_id, eos_token_id)
    doc.update(architectures=[fmt.architecture], model_type=fmt.model_type)
    doc[fmt.num_experts_key] = moe.num_experts
    doc["num_experts_per_tok"] = moe.top_k
    doc[fmt.expert_width_key or "intermediate_size"] = cfg.expert_intermediate_size
    if fmt.has_shared_expert:
        doc["shared_expert_intermediate_size"] = cfg.intermediate_size if moe.shared_expert else 0
    if fmt.renormalize_key is not None:
        doc[fmt.renormalize_key] = moe.renormalize
    if fmt.sparse_layers == "mlp_only_layers":
        # Block i is sparse unless listed here (step 1 makes every other block sparse).
        doc["decoder_sparse_step"] = 1
        doc["mlp_only_layers"] = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if fmt.qkv_bias_key is not None:
        doc[fmt.qkv_bias_key] = True  # always biased on 4.x: zeros stand in for absent biases
    doc.update(fmt.extra_config)
    doc["router_aux_loss_coef"] = moe.load_balance_weight
    doc["output_router_logits"] = False
    if moe.router_context > 0:
        # The format's model with a router on context, from the module written beside it.
        config_class, model_class = context_class_names(fmt)
        doc["architectures"] = [model_class]
        doc["model_type"] = CONTEXT_PREFIX + fmt.model_type
        doc["auto_map"] = {
            "AutoConfig": f"{CONTEXT_MODULE}.{config_class}",
            "AutoModelForCausalLM": f"{CONTEXT_MODULE}.{model_class}",
        }
        doc["router_context"] = moe.router_context
        # The module needs transformers 5, which reads rope_parameters; its generic config (what
        # AutoTokenizer falls back to without trust_remote_code) warns about rope_scaling.
        doc.pop("rope_scaling", None)
    doc[SIDECAR_KEY] = {"version": __version__, "model": to_dict(cfg)}
    return doc


# --------------------------------------------------------------------------------------------
# shared helpers


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
        # (the recorded shared_expert_gate comes with it)
    else:  # the router became linear: keep only what still applies to it
        restored = dataclasses.replace(
            moe,
            moe_every=old.moe_every,
            domains=list(old.domains),
            z_loss_weight=old.z_loss_weight,
            router_init_std=old.router_init_std,
            shared_expert_gate=old.shared_expert_gate,
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
