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


# Four small domains of templated text (tests/test_plugin.py, tests/test_peers_cli.py): three
# the MoE is built from and a new one ("music") that is plugged in.
PLUGIN_TEXTS = {
    "recipes": "Whisk {i} eggs with sugar, fold in flour and bake for {i} minutes at 180 degrees.",
    "sports": "The striker scored {i} goals as the home team won the league match {i} to nil.",
    "finance": "Shares rose {i} percent after the bank reported quarterly earnings of {i} million.",
    "music": "The orchestra tuned to A and played the symphony in {i} movements with a {i} bar coda.",
}
PLUGIN_DOMAINS = ["recipes", "sports", "finance"]
PLUGIN_NEW = "music"


def plugin_world(
    root: Path, docs: int, seed_steps: int, expert_steps: int, eval_tokens: int
) -> dict:
    """A corpus of PLUGIN_TEXTS (``docs`` documents per domain), a seed trained ``seed_steps``
    on PLUGIN_DOMAINS and one FFN-only expert per domain (new one included) branched from it
    ``expert_steps``: root, corpus, seed, experts, shards."""
    from dataclasses import replace

    from nexus_moe.corpus import build_corpus
    from nexus_moe.pipeline import branch_expert, pretrain_seed, tokens_for
    from nexus_moe.train import FFN_PARAMETERS, TrainConfig

    data = root / "data"
    for domain, template in PLUGIN_TEXTS.items():
        (data / domain).mkdir(parents=True)
        for i in range(docs):
            text = " ".join(template.format(i=(i * 7 + j) % 97) for j in range(12))
            (data / domain / f"doc{i}.txt").write_text(text)
    corpus = root / "corpus"
    build_corpus(corpus, domains=list(PLUGIN_TEXTS), source_dir=data, val_fraction=0.1, seed=0)
    texts = [t.format(i=i) for t in PLUGIN_TEXTS.values() for i in range(50)]
    tok = tiny_bpe_file(root / "tok.json", texts, 300)
    train = TrainConfig(
        steps=seed_steps, batch_size=4, seq_len=32, lr=3e-3, eval_tokens=eval_tokens,
        checkpoint_every=0,
    )  # fmt: skip
    seed = pretrain_seed(
        tiny_config(vocab_size=300), corpus, tok, PLUGIN_DOMAINS, train, root / "seed"
    )
    branch = replace(train, steps=expert_steps, train_only=list(FFN_PARAMETERS))
    experts = {
        d: branch_expert(seed, corpus, d, branch, root / "experts" / d)
        for d in [*PLUGIN_DOMAINS, PLUGIN_NEW]
    }
    shards = tokens_for(corpus, seed / "tokenizer.json")
    return dict(root=root, corpus=corpus, seed=seed, experts=experts, shards=shards)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
