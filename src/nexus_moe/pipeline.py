"""The pipeline's stages (docs/design.md §1): corpus tokens, seed pretraining, branching experts.

Each stage is a function that reads directories and writes one directory, plus a ``stage.json``
fingerprint of the config and inputs that made it. ``nexus-moe run`` skips a stage whose output
exists with the same fingerprint, so an interrupted study resumes where it stopped. The recipe
that chains them, and every check on it, is :mod:`nexus_moe.recipe`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nexus_moe import distributed as dist_utils
from nexus_moe.checkpoint import (
    CONFIG_FILE,
    checkpoint_tokenizer,
    load_checkpoint,
    weights_hash,
)
from nexus_moe.config import Device, ModelConfig, check_device_name, to_dict
from nexus_moe.corpus import MANIFEST_FILE
from nexus_moe.data import META_FILE, TokenShards, tokenize_corpus
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import STAGE_FILE, file_sha256, read_json, write_json
from nexus_moe.model import Transformer
from nexus_moe.train import TrainConfig, Trainer


def resolve_device(name: str | Device) -> torch.device:
    """The torch device for ``name`` (``auto``: CUDA when available, else the CPU; ``cuda:N``)."""
    name = str(name)
    check_device_name(name)
    if name == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NexusError(f"device '{name}' requested but CUDA is not available; use 'cpu'")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# stage bookkeeping


def fingerprint(*parts: Any) -> str:
    """Stable hash of configs and input fingerprints."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_done(out_dir: Path, key: str) -> bool:
    """True when ``out_dir`` was completed by a stage with the same fingerprint."""
    marker = out_dir / STAGE_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == key
    except json.JSONDecodeError:
        return False


def mark_done(out_dir: Path, key: str, **info: Any) -> None:
    write_json(out_dir / STAGE_FILE, {"fingerprint": key, **info})


def stage_key(out_dir: Path) -> str:
    """The fingerprint of a finished stage (inputs of later stages include it)."""
    return read_json(out_dir / STAGE_FILE)["fingerprint"]


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint dir itself, or a training run dir holding ``model/``."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    raise NexusError(
        f"{path}: no model checkpoint here (expected {CONFIG_FILE} or model/{CONFIG_FILE})"
    )


# ---------------------------------------------------------------------------------------------
# stages


def tokens_for(
    corpus_dir: Path, tokenizer_path: Path, cache_root: Path | None = None
) -> TokenShards:
    """Token shards of ``corpus_dir`` under ``tokenizer_path``, built once and cached."""
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise NexusError(
            f"{tokenizer_path}: tokenizer not found; a checkpoint needs the tokenizer.json it "
            "was trained with (copy it into the checkpoint folder)"
        )
    out = (cache_root or corpus_dir) / (
        f"tokens-{file_sha256(tokenizer_path)[:12]}-{corpus_fingerprint(corpus_dir)[:12]}"
    )
    if not (out / META_FILE).is_file():
        # Under torchrun, rank 0 tokenizes while the other ranks wait, then all read the cache.
        dist_utils.init_from_env()
        if dist_utils.rank() == 0:
            tokenize_corpus(corpus_dir, tokenizer_path, out)
        dist_utils.barrier()
    return TokenShards(out)


def corpus_fingerprint(corpus_dir: Path, mtimes: bool = True) -> str:
    """Hash of the corpus manifest and of every domain file present (name, size and mtime).

    Keys the token cache, so that a domain folder restored, added or edited after the cache was
    built gives a new cache instead of a stale one. Without ``mtimes`` (deciding whether a
    training run may be resumed) a copy of the same corpus elsewhere has the same fingerprint.
    """
    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / MANIFEST_FILE
    files = []
    if corpus_dir.is_dir():
        for domain in sorted(corpus_dir.iterdir()):
            if domain.is_dir() and not domain.name.startswith((".", "tokens-")):
                for f in sorted(domain.glob("*.jsonl")):
                    st = f.stat()
                    entry = [f"{domain.name}/{f.name}", st.st_size]
                    files.append(entry + [st.st_mtime_ns] if mtimes else entry)
    return fingerprint(file_sha256(manifest)[:16] if manifest.is_file() else "nomanifest", files)


def train_inputs(
    corpus_dir: Path, tokenizer_path: Path, domains: list[str], init: str
) -> dict[str, Any]:
    """What shapes a training run besides its configs: resumed only when these match."""
    return {
        "init": init,
        "tokenizer": file_sha256(tokenizer_path)[:16],
        "corpus": corpus_fingerprint(corpus_dir, mtimes=False),
        "domains": list(domains),
    }


def check_vocab(model: Transformer, shards: TokenShards, tokenizer_path: Path) -> None:
    """NexusError when the tokenizer has ids the model's embedding cannot look up."""
    if shards.vocab_size > model.cfg.vocab_size:
        raise NexusError(
            f"{tokenizer_path}: the tokenizer has {shards.vocab_size} tokens but the model's "
            f"vocab_size is {model.cfg.vocab_size}; use the tokenizer the model was trained with"
        )


def train_model(
    model: Transformer,
    corpus_dir: Path,
    tokenizer_path: Path,
    domains: list[str],
    cfg: TrainConfig,
    out_dir: Path,
    metadata: dict[str, Any] | None = None,
    eval_domains: list[str] | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    init: str = "scratch",
    restart_stale: bool = False,
) -> Path:
    """Train ``model`` on ``domains`` of the corpus; returns ``out_dir/model``.

    ``init`` identifies the starting weights (the sha256 of the init checkpoint, or "scratch"
    for a seeded random init): with the configs, tokenizer and corpus it decides whether an
    existing checkpoint in ``out_dir`` may be resumed (see :class:`Trainer`).
    """
    shards = tokens_for(corpus_dir, tokenizer_path)
    check_vocab(model, shards, tokenizer_path)
    trainer = Trainer(
        model,
        shards,
        domains,
        cfg,
        out_dir,
        tokenizer_path=tokenizer_path,
        metadata=metadata,
        eval_domains=eval_domains,
        device=device,
        show_progress=show_progress,
        inputs=train_inputs(corpus_dir, tokenizer_path, domains, init),
        restart_stale=restart_stale,
    )
    final = trainer.train()
    assert final is not None
    return final


def pretrain_seed(
    model_cfg: ModelConfig,
    corpus_dir: Path,
    tokenizer_path: Path,
    domains: list[str],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device | str = "cpu",
    restart_stale: bool = False,
) -> Path:
    """Train a dense seed model from scratch on the domain mix."""
    from nexus_moe.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_path).get_vocab_size()
    if model_cfg.vocab_size != vocab:
        model_cfg = ModelConfig(**{**vars(model_cfg), "vocab_size": vocab})
    if model_cfg.is_moe:
        raise NexusError("the seed must be dense: remove model.moe from the recipe")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    return train_model(
        model,
        corpus_dir,
        tokenizer_path,
        domains,
        cfg,
        out_dir,
        metadata={"stage": "seed", "domains": domains},
        device=device,
        restart_stale=restart_stale,
    )


def branch_expert(
    seed_dir: Path,
    corpus_dir: Path,
    domain: str,
    cfg: TrainConfig,
    out_dir: Path,
    eval_domains: list[str] | None = None,
    device: torch.device | str = "cpu",
    restart_stale: bool = False,
) -> Path:
    """Continue training the seed on one domain: a dense domain expert (docs/design.md §1, branch)."""
    seed_dir = resolve_model_dir(seed_dir)
    tokenizer = checkpoint_tokenizer(seed_dir)
    model, _ = load_checkpoint(seed_dir)
    return train_model(
        model,
        corpus_dir,
        tokenizer,
        [domain],
        cfg,
        out_dir,
        metadata={
            "stage": "branch",
            "domain": domain,
            "seed": str(seed_dir),
            "seed_sha256": weights_hash(seed_dir),
        },
        eval_domains=eval_domains or [domain],
        device=device,
        init=weights_hash(seed_dir),
        restart_stale=restart_stale,
    )
