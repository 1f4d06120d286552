"""Per-domain evaluation (docs/design.md §9): loss, perplexity and bits-per-byte on held-out documents.

Besides scoring a model as it is, :func:`evaluate_domains` can score it under a routing override
(``routing="oracle"``: every token of domain d forced to d's expert; ``"random"``: each token to
``top_k`` experts drawn uniformly at random, seeded) and on corrupted input (a share of the input
tokens replaced by uniformly random token ids, seeded; the targets stay the clean text).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nexus_moe.config import EvalConfig
from nexus_moe.data import TokenShards, iter_eval_batches
from nexus_moe.errors import NexusError
from nexus_moe.losses import language_model_loss
from nexus_moe.model import Transformer
from nexus_moe.moe import RoutingInfo

ROUTING_MODES = ("model", "oracle", "random")


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


def _domain_generator(seed: int, domain: str, salt: str) -> torch.Generator:
    """A CPU generator for one domain: the same draws whatever other domains are scored."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{salt}:{domain}".encode()))


def corrupt_tokens(
    inputs: torch.Tensor, share: float, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A copy of ``inputs`` with each token replaced, with probability ``share``, by a uniformly
    random token id in ``[0, vocab_size)``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"corruption share must be in [0, 1] (got {share})")
    hit = torch.rand(inputs.shape, generator=generator) < share
    noise = torch.randint(0, vocab_size, inputs.shape, generator=generator)
    return torch.where(hit, noise, inputs.cpu()).to(inputs.device)


def domain_expert(model: Transformer, domain: str) -> int | None:
    """Index of ``domain``'s routed expert in ``model`` (None: dense, or no expert for it)."""
    moe = model.cfg.moe
    if moe is None or domain not in moe.domains:
        return None
    return moe.domains.index(domain)


@contextmanager
def routing_override(
    model: Transformer,
    mode: str,
    expert: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Within the block, every MoE layer routes as ``mode`` says instead of by its router.

    * ``"oracle"``: every token to routed expert ``expert`` (gate 1; the shared expert, if any,
      still runs);
    * ``"random"``: every token to ``top_k`` distinct experts drawn uniformly (from
      ``generator``), with equal router probabilities;
    * ``"model"``: no override.

    Done with forward hooks that replace the router's logits (0 for the chosen experts, -inf for
    the others), so the layer's softmax, top-k, gating and dispatch run unchanged.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode must be one of {', '.join(ROUTING_MODES)} (got {mode!r})")
    if mode == "model":
        yield
        return
    if mode == "oracle" and expert is None:
        raise ValueError("oracle routing needs the expert index")
    generator = generator or torch.Generator().manual_seed(0)
    handles = []
    for layer in model.moe_layers():

        def hook(module, args, logits, top_k: int = layer.top_k) -> torch.Tensor:
            n, e = logits.shape
            if mode == "oracle":
                keep = torch.zeros(n, e, dtype=torch.bool)
                keep[:, expert] = True
            else:
                picks = torch.rand(n, e, generator=generator).argsort(dim=-1)[:, :top_k]
                keep = torch.zeros(n, e, dtype=torch.bool).scatter_(1, picks, True)
            out = torch.zeros_like(logits)
            return out.masked_fill_(~keep.to(logits.device), float("-inf"))

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate_domains(
    model: Transformer,
    shards: TokenShards,
    domains: list[str],
    cfg: EvalConfig | None = None,
    split: str = "validation",
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    *,
    routing: str = "model",
    corrupt: float = 0.0,
    seed: int = 0,
    on_routing: Callable[[int, list[RoutingInfo]], None] | None = None,
) -> dict[str, DomainScore]:
    """Score ``model`` on each domain's validation tokens; adds a "mean" entry over domains.

    Bits-per-byte uses the split's bytes-per-token ratio, which is exact when the whole split is
    scored and an estimate when ``max_tokens`` truncates it.

    ``routing`` and ``corrupt`` score the model under a routing override or on corrupted input
    (see the module docstring); both draw from generators seeded by ``seed`` and the domain name,
    so two models scored with the same seed see the same corrupted tokens. Under ``"oracle"`` a
    domain without its own expert is left out. ``on_routing(domain_index, routing)`` is called
    with each batch's routing information (e.g. to count top-1 assignments in the same pass).
    """
    cfg = cfg or EvalConfig()
    check_seq_len(model, cfg)
    was_training = model.training
    model.eval()
    scores: dict[str, DomainScore] = {}
    device = torch.device(device)
    for index, domain in enumerate(domains):
        expert = domain_expert(model, domain) if routing == "oracle" else None
        if routing == "oracle" and expert is None:
            continue
        route_gen = _domain_generator(seed, domain, "routing")
        noise_gen = _domain_generator(seed, domain, "corrupt")
        tokens = shards.tokens(domain, split)
        total_nats, count = 0.0, 0
        with routing_override(model, routing, expert, route_gen):
            for inputs, targets in iter_eval_batches(
                tokens, cfg.seq_len, cfg.batch_size, cfg.max_tokens
            ):
                if corrupt > 0:
                    inputs = corrupt_tokens(inputs, corrupt, model.cfg.vocab_size, noise_gen)
                inputs, targets = inputs.to(device), targets.to(device)
                with torch.autocast(
                    device.type,
                    dtype=autocast_dtype or torch.bfloat16,
                    enabled=autocast_dtype is not None,
                ):
                    out = model(inputs)
                if on_routing is not None and out.routing:
                    on_routing(index, out.routing)
                total_nats += language_model_loss(out.logits, targets, reduction="sum").item()
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
