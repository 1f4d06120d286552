"""Nexus router (docs/design.md §4): expert embeddings projected from fixed domain embeddings.

Each MoE layer owns a small SwiGLU hypernetwork P. For routed expert i with domain embedding d_i:

    u = W1 d_i (m -> 2h');  a, b = split(u);  e_i = W2 (silu(a) * b) (h' -> hidden)
    logits_i(x) = x . e_i

Only W1 and W2 are learned; d_i is a buffer. A new expert needs only its d_i: its embedding comes
out of the trained projection, so it is routed to without any new router parameter.

Each expert also has a fixed *anchor* a_i (a buffer, zero in the paper's configuration), and
``e_i = a_i + P(d_i)``. Calibrated upcycling (``nexus_moe.calibrate``) sets the anchors to rows
that separate the domains' hidden states and starts P at zero, so the router routes by domain
before any training and the projection learns what the domain embeddings add on top; a new
expert gets its anchor from its domain's hidden states and its P(d_new) from the trained
projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nexus_moe.routers.base import Router, normal_init_

# E[silu(a)^2] for a ~ N(0, 1) (numerically, 1e7 samples); b ~ N(0, 1) contributes E[b^2] = 1.
_SILU_SQUARE_MEAN = 0.3556


class NexusRouter(Router):
    """Router whose expert embeddings are ``P(d_i)``; E is computed once per forward."""

    def __init__(
        self,
        hidden_size: int,
        domain_embeddings: torch.Tensor,
        projection_size: int = 256,
        init_std: float = 0.02,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        num_experts, embed_dim = domain_embeddings.shape
        self.num_experts = num_experts
        self.normalize = normalize
        self.init_std = init_std
        self.w1 = nn.Linear(embed_dim, 2 * projection_size, bias=False)  # m -> 2h'
        self.w2 = nn.Linear(projection_size, hidden_size, bias=False)  # h' -> hidden
        self.register_buffer("domain_embeddings", domain_embeddings.detach().float().clone())
        self.register_buffer("expert_anchors", torch.zeros(num_experts, hidden_size))
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start each expert embedding at the scale of a linear router row (std ``init_std``).

        Initialising both W1 and W2 at a small std (0.02) makes e_i = W2(silu(W1 d)...) the
        product of two small factors: expert embeddings start near 0 (norm ~1e-3), routing is
        uniform and the router's gradient vanishes with them. Instead W1 ~ N(0, 1), since d is a
        unit vector (so each u component is ~N(0, 1)), and W2 is scaled so that e_i has
        per-component std ``init_std``: Var(e) = h' * E[silu(a)^2] * std_w2^2.
        """
        normal_init_(self.w1.weight, 1.0, generator)
        std_w2 = self.init_std / math.sqrt(self.w2.weight.shape[1] * _SILU_SQUARE_MEAN)
        normal_init_(self.w2.weight, std_w2, generator)
        self._cache = None

    def project(self, domain_embeddings: torch.Tensor) -> torch.Tensor:
        """P(d): (n, m) -> (n, hidden) expert embeddings."""
        d = domain_embeddings.float()
        if self.normalize:
            d = F.normalize(d, dim=-1)
        a, b = self.w1(d.to(self.w1.weight.dtype)).chunk(2, dim=-1)  # (n, h') each
        return self.w2(F.silu(a) * b)  # (n, hidden)

    def _embeddings(self) -> torch.Tensor:
        projected = self.project(self.domain_embeddings)
        return self.expert_anchors.to(projected.dtype) + projected  # (E, hidden)

    def expert_embeddings(self) -> torch.Tensor:
        # Inference: E depends only on parameters, so reuse it until any of them changes.
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self._embeddings()
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.shape)
            for t in (self.w1.weight, self.w2.weight, self.domain_embeddings, self.expert_anchors)
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._embeddings())
        return self._cache[1]

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor) -> None:
        """Anchors := ``rows`` and P := 0 (W2 zeroed), so E = rows until training moves P.

        W1 keeps its random init: with W2 = 0 the projection's output is zero but W2's gradient
        is not (it is silu(a) * b), as with the zero-initialised half of a LoRA adapter.
        """
        if rows.shape != self.expert_anchors.shape:
            raise ValueError(
                f"rows of shape {tuple(rows.shape)}, router has {tuple(self.expert_anchors.shape)}"
            )
        self.expert_anchors.copy_(rows.float())
        self.w2.weight.zero_()
        self._cache = None

    @torch.no_grad()
    def set_row(self, index: int, row: torch.Tensor) -> None:
        """Anchor of expert ``index`` := ``row``; its embedding is ``row + P(d_index)``."""
        self.expert_anchors[index].copy_(row.float())
        self._cache = None

    @torch.no_grad()
    def shift_rows(self, shift: torch.Tensor) -> None:
        """Anchors of the first k experts += ``shift`` (k, hidden): their embeddings move by it."""
        self.expert_anchors[: shift.shape[0]] += shift.to(self.expert_anchors)
        self._cache = None

    @torch.no_grad()
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        """Append the new domain's embedding (no new parameters; ``reset`` does not apply) with
        a zero anchor, so E = P(d) (the paper's rule) until :meth:`set_row` places one."""
        if domain_embedding is None:
            raise ValueError("the Nexus router needs the new domain's embedding")
        d = domain_embedding.detach().float().reshape(1, -1).to(self.domain_embeddings.device)
        if d.shape[1] != self.domain_embeddings.shape[1]:
            raise ValueError(
                f"domain embedding has dimension {d.shape[1]}, router expects "
                f"{self.domain_embeddings.shape[1]}"
            )
        anchor = torch.zeros_like(self.expert_anchors[:1])
        self.domain_embeddings = torch.cat([self.domain_embeddings, d])
        self.expert_anchors = torch.cat([self.expert_anchors, anchor])
        self.num_experts += 1
        self._cache = None

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        keep = [i for i in range(self.num_experts) if i != index]
        self.domain_embeddings = self.domain_embeddings[keep].clone()
        self.expert_anchors = self.expert_anchors[keep].clone()
        self.num_experts -= 1
        self._cache = None
