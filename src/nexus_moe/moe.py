"""The MoE feed-forward layer (SPEC §3).

    y(x) = [shared(x)] + sum over i in topk(p(x)) of g_i(x) * FFN_i(x)

The router (``nexus_moe.routers``) only scores experts. This module does the float32 softmax,
top-k, gating, the auxiliary losses, the usage counters and the grouped dispatch: tokens are sorted
by expert and each expert runs one matmul over its contiguous slice (no per-token loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nexus_moe.config import MoEConfig
from nexus_moe.losses import load_balancing_loss, router_z_loss
from nexus_moe.routers import Router, build_router


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x)). Names follow Hugging Face Llama."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU FFNs stored as stacked weights (E, out, in)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run expert e on rows ``x_sorted[offset_e : offset_e + counts[e]]``.

        Experts with no tokens still run on an empty slice, so every expert parameter is part of
        the graph and receives a (zero) gradient: data-parallel reduction needs no special case.
        """
        # unbind() gives per-expert views whose backward is one stack() per weight; indexing
        # weight[e] instead costs, per expert, a zero-filled gradient of the whole (E, out, in)
        # tensor, all summed afterwards (E^2 work: ~15% of the layer's time at 16 experts on CPU).
        chunks = torch.split(x_sorted, counts)  # chunk e: (n_e, H)
        weights = (self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0))
        outputs = []
        for chunk, gate, up, down in zip(chunks, *weights, strict=True):
            hidden = F.silu(chunk @ gate.t()) * (chunk @ up.t())
            outputs.append(hidden @ down.t())  # (n_e, H)
        return torch.cat(outputs)


@dataclass
class RoutingInfo:
    """What one MoE layer reports besides its output."""

    router_logits: torch.Tensor  # (N, E) float32
    top1: torch.Tensor  # (N,) top-1 routed expert per token
    load_balance_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar


class MoELayer(nn.Module):
    """Routed experts (+ optional always-on shared expert) behind a pluggable router."""

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        intermediate_size: int,
        expert_intermediate_size: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router: Router = build_router(cfg, hidden_size)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, expert_intermediate_size)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size) if cfg.shared_expert else None
        # Tokens routed to each expert (top-k assignments), accumulated in training only.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        # Optional (E,) bool: False experts get no tokens (logit -inf), e.g. to check that adding
        # an expert leaves the routing of the others unchanged.
        self.expert_mask: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, prev_assignment: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingInfo]:
        """``x`` (B, T, H) -> (y (B, T, H), routing info). ``prev_assignment``: see ACRouter."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])  # (N, H)
        num_tokens = x_flat.shape[0]
        logits = self.router(x_flat, prev_assignment).float()  # (N, E)
        if self.expert_mask is not None:
            logits = logits.masked_fill(~self.expert_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # float32, SPEC §3
        top_probs, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = top_probs / top_probs.sum(-1, keepdim=True) if self.cfg.renormalize else top_probs

        # Group the N*k (token, expert) pairs by expert.
        flat_expert = top_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # pair positions sorted by expert
        counts_t = torch.bincount(flat_expert, minlength=self.num_experts)
        counts = counts_t.tolist()
        # index_select rather than x[idx]: its backward is a scatter-add, not an accumulating
        # index_put (slower on CPU).
        x_sorted = x_flat.index_select(0, order // self.top_k)
        expert_out = self.experts(x_sorted, counts)  # (N*k, H), sorted
        # Undo the sort: row j of `unsorted` belongs to pair j = token * k + slot.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        unsorted = expert_out.index_select(0, inverse).view(num_tokens, self.top_k, -1)
        # Gate-weighted sum over the k slots, (N, k, H) * (N, k, 1) -> (N, H), accumulated in
        # float32 (as a matmul would) and rounded once. An einsum here becomes a batched matmul
        # of N tiny (1, k) @ (k, H) products, which is slower on CPU.
        slot_weights = gates.to(unsorted.dtype).unsqueeze(-1)  # (N, k, 1), bf16 under autocast
        y = (unsorted.float() * slot_weights).sum(dim=1).to(unsorted.dtype)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x_flat)

        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts_t.to(self.tokens_per_expert.dtype)
        top1 = top_idx[:, 0]
        info = RoutingInfo(
            router_logits=logits,
            top1=top1,
            load_balance_loss=load_balancing_loss(probs, top1),
            z_loss=router_z_loss(logits) if self.cfg.z_loss_weight > 0 else logits.new_zeros(()),
        )
        return y.view(shape), info
