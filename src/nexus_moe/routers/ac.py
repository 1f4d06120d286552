"""Adaptive-clustering router (docs/design.md §4).

Rescales each token per expert cluster so that features in which a cluster is tight (small mean
absolute deviation) weigh more. With c(t) the top-1 expert of token t at the previous MoE layer:

    mu_k  = mean of x_t over c(t)=k;    s_kq = mean |x_tq - mu_kq|
    w_kq  = 1 / (s_kq + eps), clipped at tau * mean(w);   w_kq <- w_kq / mean_k(w_kq)
    logits_tk = (w_{c(t)} * x_t) . e_k / ||e_k||

The weights carry no gradient; experts with no tokens get weight 1; the experts themselves see the
unscaled x. The first MoE layer has no previous assignment and uses the base router. Batch
statistics are used in training; a running (EMA) estimate is used in evaluation, so inference does
not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nexus_moe.routers.base import Router


@torch.no_grad()
def cluster_feature_weights(
    x: torch.Tensor,
    assignment: torch.Tensor,
    num_experts: int,
    eps: float = 1e-4,
    tau: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster MAD feature weights (num_experts, hidden) and a mask of non-empty clusters."""
    x = x.detach().float()  # (N, H)
    counts = torch.bincount(assignment, minlength=num_experts).float()  # (E,)
    present = counts > 0
    denom = counts.clamp_min(1.0)[:, None]
    sums = torch.zeros(num_experts, x.shape[1], device=x.device).index_add_(0, assignment, x)
    mu = sums / denom  # (E, H)
    mad = torch.zeros_like(mu).index_add_(0, assignment, (x - mu[assignment]).abs()) / denom
    w = 1.0 / (mad + eps)
    # Clip outliers (a near-constant feature would otherwise dominate), per cluster.
    w = torch.minimum(w, tau * w.mean(dim=1, keepdim=True))
    w = torch.where(present[:, None], w, torch.ones_like(w))  # empty clusters: weight 1
    w = w / w.mean(dim=0, keepdim=True)  # each feature averages 1 across experts
    return w, present


class ACRouter(Router):
    """Adaptive clustering on top of a base router that provides the expert embeddings e_k."""

    def __init__(
        self, base: Router, eps: float = 1e-4, tau: float = 10.0, momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.base = base
        self.num_experts = base.num_experts
        self.eps, self.tau, self.momentum = eps, tau, momentum
        hidden = base.expert_embeddings().shape[1]
        self.register_buffer("running_weights", torch.ones(self.num_experts, hidden))

    def expert_embeddings(self) -> torch.Tensor:
        return self.base.expert_embeddings()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.base.reset_parameters(generator)

    def forward(self, x: torch.Tensor, prev_assignment: torch.Tensor | None = None) -> torch.Tensor:
        if prev_assignment is None:  # first MoE layer: no clusters yet
            return self.base(x)
        if self.training:
            weights, present = cluster_feature_weights(
                x, prev_assignment, self.num_experts, self.eps, self.tau
            )
            with torch.no_grad():  # EMA only over clusters seen in this batch
                ema = self.momentum * self.running_weights + (1 - self.momentum) * weights
                self.running_weights.copy_(torch.where(present[:, None], ema, self.running_weights))
        else:
            weights = self.running_weights
        scaled = x.float() * weights[prev_assignment]  # (N, H); weights carry no gradient
        experts = F.normalize(self.expert_embeddings().float(), dim=-1)  # e_k / ||e_k||
        return scaled @ experts.t()

    def set_rows(self, rows: torch.Tensor) -> None:
        self.base.set_rows(rows)  # AC scores with e_k / ||e_k||: only the directions count

    def set_row(self, index: int, row: torch.Tensor) -> None:
        self.base.set_row(index, row)

    def shift_rows(self, shift: torch.Tensor) -> None:
        self.base.shift_rows(shift)

    @torch.no_grad()
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        self.base.add_expert(domain_embedding, reset=reset)
        self.num_experts += 1
        ones = torch.ones_like(self.running_weights[:1])
        self.running_weights = torch.cat([self.running_weights, ones])

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        self.base.remove_expert(index)
        keep = [i for i in range(self.num_experts) if i != index]
        self.running_weights = self.running_weights[keep].clone()
        self.num_experts -= 1
