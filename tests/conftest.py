"""Shared fixtures: tiny configs that exercise the real code paths on CPU in seconds."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
