"""The dense inputs of upcycling (docs/design.md §5): a native checkpoint or a dense Hugging Face
folder each, opened with their weights unread, and checked to agree before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexus_moe.checkpoint import TOKENIZER_FILE, check_branched_from, load_config, open_weights
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import file_sha256
from nexus_moe.safetensors_io import DTYPE_NAMES, TensorSource

# ModelConfig fields that must agree between all inputs. max_seq_len and init_std do not change
# the weights' meaning, so the seed's values are kept.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_embeddings",
    "attention_bias",
    "qk_norm",
    "sliding_window",
)


@dataclass
class DenseInput:
    """One dense input: a native checkpoint or a Hugging Face folder, checked, weights unread.

    ``tensors``: every tensor of the model in our names, read on demand (stored dtypes).
    """

    path: Path
    cfg: ModelConfig
    metadata: dict[str, Any]
    tokenizer: Path | None
    tensors: TensorSource

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return self.tensors.dtypes


def open_input(path: Path) -> DenseInput:
    """Read and check one input's config and weight headers (both kinds of folder)."""
    from nexus_moe.hf import is_hf_folder, open_dense_hf

    if is_hf_folder(path):
        folder = open_dense_hf(path)
        return DenseInput(path, folder.cfg, {}, folder.tokenizer, folder.tensors)
    cfg, metadata = load_config(path)
    _require_dense(path, cfg)
    tokenizer = path / TOKENIZER_FILE
    tensors = open_weights(path, cfg)  # reads the header only
    return DenseInput(path, cfg, metadata, tokenizer if tokenizer.is_file() else None, tensors)


def check_inputs(seed_dir: Path, expert_dirs: list[Path]) -> tuple[DenseInput, list[DenseInput]]:
    """The seed and the experts, after checking that all agree (architecture, tensor dtypes,
    tokenizer)."""
    seed = open_input(seed_dir)
    experts = [open_input(path) for path in expert_dirs]
    for expert in experts:
        check_branched_from(seed.path, expert.path, expert.metadata)
    for expert in experts:
        for name in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(expert.cfg, name), getattr(seed.cfg, name)
            if mine != theirs:
                raise NexusError(
                    f"{expert.path}: {name}={mine} but seed has {theirs}; all inputs must share "
                    "one architecture"
                )

    seed_hash = file_sha256(seed.tokenizer) if seed.tokenizer is not None else None
    for expert in experts:
        digest = file_sha256(expert.tokenizer) if expert.tokenizer is not None else None
        if digest != seed_hash:
            if digest is None or seed_hash is None:
                has = "has no" if digest is None else "has a"
                seed_has = "one" if seed_hash is not None else "none"
                raise NexusError(f"{expert.path}: {has} {TOKENIZER_FILE} but seed has {seed_has}")
            raise NexusError(
                f"{expert.path}: {TOKENIZER_FILE} differs from the seed's (sha256 {digest[:12]} "
                f"vs {seed_hash[:12]}); all inputs must share one tokenizer"
            )

    seed_dtypes = seed.dtypes
    for expert in experts:
        for name, dtype in expert.dtypes.items():
            if dtype != seed_dtypes[name]:
                raise NexusError(
                    f"{expert.tensors.file_of(name)}: tensor '{name}' is {DTYPE_NAMES[dtype]} "
                    f"but seed has {DTYPE_NAMES[seed_dtypes[name]]}; save all inputs in one dtype"
                )
    return seed, experts


def _require_dense(path: Path, cfg: ModelConfig) -> None:
    if cfg.moe is not None:
        raise NexusError(
            f"{path}: is an MoE checkpoint (moe.num_experts={cfg.moe.num_experts}); upcycling "
            "takes dense checkpoints (use `extend` to add an expert to an MoE)"
        )


def resolve_domains(experts: list[DenseInput], domains: list[str] | None) -> list[str]:
    """Each expert's domain: ``domains`` if given, else its checkpoint metadata."""
    where = [str(e.path) for e in experts]
    if domains is not None:
        if len(domains) != len(experts):
            raise NexusError(
                f"got {len(domains)} domain names for {len(experts)} expert checkpoints"
            )
        return check_domains(where, list(domains))
    found = []
    for expert in experts:
        domain = expert.metadata.get("domain")
        if not isinstance(domain, str) or not domain:
            raise NexusError(
                f"{expert.path}: its metadata names no 'domain' (a Hugging Face folder has "
                "none); pass the domains explicitly (one per expert checkpoint, e.g. "
                "`--domains code,legal`)"
            )
        found.append(domain)
    return check_domains(where, found)


def check_domains(where: list[str], names: list[str]) -> list[str]:
    """``names`` (one per routed expert, from ``where``; may be empty): non-empty and distinct."""
    if not names:
        return []
    if len(names) != len(where):
        raise NexusError(f"got {len(names)} domain names for {len(where)} routed experts")
    seen: dict[str, str] = {}
    for name, origin in zip(names, where, strict=True):
        if not isinstance(name, str) or not name.strip():
            raise NexusError(f"{origin}: empty domain name")
        if name in seen:
            raise NexusError(
                f"{origin}: domain '{name}' is already used by {seen[name]}; each routed expert "
                "needs its own domain"
            )
        seen[name] = origin
    return list(names)
