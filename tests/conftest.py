"""Shared fixtures: tiny configs that exercise the real code paths on CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nexus_moe.config import ModelConfig, MoEConfig


def tiny_config(moe: MoEConfig | None = None, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        moe=moe,
    )
    base.update(overrides)
    return ModelConfig(**base)


# Tiny test models gain nothing from intra-op threads, and 2 OpenMP threads per process slow
# down badly whenever another process shares the cores.
torch.set_num_threads(1)


def tiny_bpe_file(path: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE (as nexus-moe trains them) fitted on ``texts``, saved at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
