"""Per-domain evaluation (docs/design.md §9): loss, perplexity and bits-per-byte on held-out documents."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nexus_moe.config import EvalConfig
from nexus_moe.data import TokenShards, iter_eval_batches
from nexus_moe.errors import NexusError
from nexus_moe.losses import language_model_loss
from nexus_moe.model import Transformer


@dataclass
class DomainScore:
    """Scores of one domain's validation split."""

    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_byte: float  # total nats / (ln 2 * UTF-8 bytes covered): comparable across tokenizers
    tokens: int


def check_seq_len(model: Transformer, cfg: EvalConfig) -> None:
    """NexusError when windows would be longer than the model's positions allow."""
    if cfg.seq_len > model.cfg.max_seq_len:
        raise NexusError(
            f"--seq-len / evaluate.seq_len={cfg.seq_len} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}; lower it"
        )


@torch.no_grad()
def evaluate_domains(
    model: Transformer,
    shards: TokenShards,
    domains: list[str],
    cfg: EvalConfig | None = None,
    split: str = "validation",
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, DomainScore]:
    """Score ``model`` on each domain's validation tokens; adds a "mean" entry over domains.

    Bits-per-byte uses the split's bytes-per-token ratio, which is exact when the whole split is
    scored and an estimate when ``max_tokens`` truncates it.
    """
    cfg = cfg or EvalConfig()
    check_seq_len(model, cfg)
    was_training = model.training
    model.eval()
    scores: dict[str, DomainScore] = {}
    device = torch.device(device)
    for domain in domains:
        tokens = shards.tokens(domain, split)
        total_nats, count = 0.0, 0
        for inputs, targets in iter_eval_batches(
            tokens, cfg.seq_len, cfg.batch_size, cfg.max_tokens
        ):
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.bfloat16,
                enabled=autocast_dtype is not None,
            ):
                logits = model(inputs).logits
            total_nats += language_model_loss(logits, targets, reduction="sum").item()
            count += targets.numel()
        if count == 0:
            raise NexusError(
                f"{shards.data_dir}: domain {domain!r} has no {split} tokens to score; rebuild "
                "the corpus with more text or a larger val_fraction, or leave the domain out"
            )
        loss = total_nats / count
        bytes_per_token = shards.num_bytes(domain, split) / max(shards.num_tokens(domain, split), 1)
        bpb = total_nats / (math.log(2) * bytes_per_token * max(count, 1))
        scores[domain] = DomainScore(loss, math.exp(loss), bpb, count)
    if scores:
        n = len(scores)
        mean_loss = sum(s.loss for s in scores.values()) / n
        scores["mean"] = DomainScore(
            mean_loss,
            sum(s.perplexity for s in scores.values()) / n,
            sum(s.bits_per_byte for s in scores.values()) / n,
            sum(s.tokens for s in scores.values()),
        )
    model.train(was_training)
    return scores


def scores_to_dict(scores: dict[str, DomainScore]) -> dict[str, dict[str, float]]:
    """JSON-able form of :func:`evaluate_domains`' result."""
    return {k: dict(vars(v)) for k, v in scores.items()}
