"""Loss functions, pure and standalone (docs/design.md §3, §8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``n * sum_i f_i * P_i`` (docs/design.md §3).

    ``probs`` (N, n) router probabilities (float32); ``top1`` (N,) each token's top-1 expert.
    ``f_i`` is the fraction of tokens whose top-1 is i (no gradient), ``P_i`` the mean probability.
    Equals 1 for perfectly balanced routing.
    """
    num_experts = probs.shape[-1]
    fraction = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / max(top1.numel(), 1)
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)``: keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def language_model_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy in float32; ``logits`` (B, T, V), ``targets`` (B, T)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )
