"""The model card (``README.md``) of a Hugging Face export (docs/design.md §15)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nexus_moe.config import ModelConfig, RouterType
from nexus_moe.hf.formats import (
    CONTEXT_MODULE,
    CONTEXT_PREFIX,
    Format,
    MoEFormat,
    context_class_names,
)

MODEL_CARD_FILE = "README.md"


def model_card(
    cfg: ModelConfig,
    fmt: Format,
    metadata: dict[str, Any],
    name: str,
    tokenizer_file: Path | None,
) -> str:
    """A Hugging Face model card (README.md): what the export is and how it was built."""
    rows = _summary_rows(cfg, fmt, tokenizer_file) + _moe_rows(cfg)
    lines = ["---", "library_name: transformers", "tags:", "- nexus-moe"]
    if cfg.moe is not None:
        lines.append("- mixture-of-experts")
    lines += ["---", "", f"# {name}", ""]
    kind = "Mixture-of-Experts" if cfg.moe is not None else "dense"
    moe = cfg.moe
    context = moe is not None and moe.router_context > 0
    if context:
        lines += [
            f"A {kind} language model built with nexus-moe: the Hugging Face `{fmt.model_type}` "
            f"model whose router scores the context mix of each MoE block's input, "
            f"`(1 - c) x_t + c mean(x_1..x_t)` with c = {moe.router_context:g}, computed by "
            f"`{CONTEXT_MODULE}.py` in this folder. `AutoModelForCausalLM.from_pretrained` "
            "loads it with `trust_remote_code=True` (needed: without it transformers refuses "
            "the folder) and reproduces the nexus-moe model's logits and its generation with "
            "the KV cache (float32). It needs transformers 5 (written against 5.24).",
            "",
        ]
    else:
        lines += [
            f"A {kind} language model built with nexus-moe and exported to the Hugging Face "
            f"`{fmt.model_type}` format: `AutoModelForCausalLM.from_pretrained` loads it with "
            "no custom code and reproduces the nexus-moe model's logits (float32).",
            "",
        ]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    domains = (moe.domains if moe is not None else []) or metadata.get("domains") or []
    if moe is not None and domains:
        lines += ["## Experts", "", "| expert | domain |", "|---|---|"]
        lines += [f"| {i} | {domain} |" for i, domain in enumerate(domains)]
        lines.append("")
    lines += _provenance_lines(metadata) + _format_notes(cfg, fmt)
    trust = ", trust_remote_code=True" if context else ""
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{trust})',
    ]
    if tokenizer_file is not None:
        # AutoTokenizer reads config.json too (and asks before running its code)
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{name}"{trust})')
    lines += ["```", ""]
    return "\n".join(lines)


def _summary_rows(
    cfg: ModelConfig, fmt: Format, tokenizer_file: Path | None
) -> list[tuple[str, str]]:
    """The card's table rows that every model has."""
    # Count parameters as exported: whatever the router, the HF gate is one (E, hidden) matrix.
    exported = dataclasses.replace(cfg, moe=None)
    if cfg.moe is not None:
        exported.moe = dataclasses.replace(cfg.moe, router=RouterType.linear)
    total, active = exported.num_params(), exported.num_params(active=True)
    architecture = f"`{fmt.architecture}` (model_type `{fmt.model_type}`)"
    if cfg.moe is not None and cfg.moe.router_context > 0 and isinstance(fmt, MoEFormat):
        model_class = context_class_names(fmt)[1]
        architecture = (
            f"`{model_class}` (model_type `{CONTEXT_PREFIX}{fmt.model_type}`), "
            f"`{fmt.architecture}` with a router on context"
        )
    return [
        ("architecture", architecture),
        ("parameters", f"{total / 1e6:.2f} M total, {active / 1e6:.2f} M active per token"),
        (
            "layers / hidden / heads",
            f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads} "
            f"(kv heads {cfg.num_kv_heads}, head dim {cfg.head_dim})",
        ),
        ("context", f"{cfg.max_seq_len} tokens, RoPE base {cfg.rope_theta:g}"),
        ("tokenizer", "included (`tokenizer.json`)" if tokenizer_file else "not included"),
    ]


def _moe_rows(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The card's table rows of an MoE (none for a dense model)."""
    moe = cfg.moe
    if moe is None:
        return []
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
    if moe.router_context > 0:
        router += (
            f"; scores (1 - c) x_t + c mean(x_1..x_t), c = {moe.router_context:g} "
            f"(`{CONTEXT_MODULE}.py`, trust_remote_code)"
        )
    return [
        ("routed experts", f"{moe.num_experts}, top-{moe.top_k} per token, gate = {gates}"),
        ("shared expert", _shared(moe)),
        ("router", router),
        ("MoE blocks", ", ".join(map(str, moe_blocks))),
    ]


def _provenance_lines(metadata: dict[str, Any]) -> list[str]:
    """The "How it was built" section: the export's metadata, without absolute paths."""
    provenance = {
        k: _portable(v) for k, v in metadata.items() if k != "domains" and v not in (None, [], {})
    }
    if not provenance:
        return []
    lines = ["## How it was built", ""]
    for key, value in provenance.items():
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            shown = ", ".join(map(str, value))
        else:
            shown = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"- **{key}**: {shown}")
    lines.append("")
    return lines


def _format_notes(cfg: ModelConfig, fmt: Format) -> list[str]:
    """What a Qwen2-MoE export does differently to compute the same (nothing for the others)."""
    moe = cfg.moe
    if fmt.model_type != "qwen2_moe" or moe is None or moe.shared_expert_gate:
        return []
    return [
        "## Format notes",
        "",
        "Qwen2-MoE scales the shared expert by `sigmoid(x . w)`; here `w = 0` "
        "(`shared_expert_gate`), a constant 1/2, and the shared expert's `down_proj` is "
        "doubled, so each MoE block computes exactly what the nexus-moe layer does"
        + ("." if moe.shared_expert else " (the shared expert is empty: width 0).")
        + ("" if cfg.attention_bias else " The q/k/v biases are zeros (the model has none)."),
        "",
    ]


def _shared(moe: Any) -> str:
    if not moe.shared_expert:
        return "no"
    return "yes, gated per token by sigmoid(x . w)" if moe.shared_expert_gate else "yes (always on)"


def _portable(value: Any) -> Any:
    """``value`` with every absolute path replaced by its file name: a published card shows no
    folder of the machine that made the model."""
    if isinstance(value, str):
        return Path(value).name if Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value
