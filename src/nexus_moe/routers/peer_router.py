"""The fixed router of the training-free peers a linear router cannot hold (docs/design.md §5.8).

DUME with its bias, Arrow (``|x . v|``) and PHATGOOSE (a standardised dot product) score tokens
in ways no linear row expresses; an MoE upcycled with one of them (``upcycle --router-init``)
gets this router, built from the config like any other (``moe.router_init``), with its rows,
bias and temperature as buffers of the checkpoint. Nothing in it is learned: the peers place
their rows without training, and grow and shrink them by their own rule
(:mod:`nexus_moe.routers.peers`). The bias-free linear peers (DUME without bias, mean rows,
mergekit's gates) need none of this: their rows sit in a :class:`LinearRouter`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nexus_moe.errors import NexusError
from nexus_moe.routers.base import Router

# The peers whose scores need this router, and how each scores a token against its rows.
PEER_SCORES = {"dume-bias": "dot", "arrow": "abs", "phatgoose": "standardised"}
# Why no Hugging Face MoE gate (a bias-free linear x . W) holds each of them.
_CANNOT_EXPORT = {
    "dume-bias": "DUME's rows with a bias per expert, which no Hugging Face MoE gate has",
    "arrow": "Arrow's |x . v|, an absolute value no linear Hugging Face MoE gate computes",
    "phatgoose": "PHATGOOSE's standardised dot product (token and gate layer-normalised), "
    "which no linear Hugging Face MoE gate computes",
}


def export_refusal(method: str) -> str | None:
    """The one line refusing a Hugging Face export of an MoE routed by ``method`` (None: it
    exports as any linear router: the bias-free linear peers and nexus)."""
    if method not in _CANNOT_EXPORT:
        return None
    return (
        f"the router scores {_CANNOT_EXPORT[method]} (--router-init {method}), so this model "
        "cannot be exported; upcycle with nexus or a bias-free linear peer (dume, mean, "
        "mergekit-hidden, mergekit-hidden-avg) to export one"
    )


class PeerRouter(Router):
    """``logits = tau * score(x, rows) + bias`` with score ``dot`` (``x . r``), ``abs``
    (``|x . r|``, Arrow) or ``standardised`` (``LN(x) . LN(r) / sqrt(H)``, PHATGOOSE; LN
    without affine weights). ``temperature`` is a 0-d buffer, saved with the rows."""

    def __init__(
        self,
        rows: torch.Tensor,
        score: str = "dot",
        temperature: float = 1.0,
        bias: torch.Tensor | None = None,
        method: str = "",
    ) -> None:
        super().__init__()
        if score not in ("dot", "abs", "standardised"):
            raise ValueError(f"unknown peer score '{score}'")
        self.score, self.method = score, method
        self.num_experts = rows.shape[0]
        self.register_buffer("rows", rows.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @classmethod
    def for_method(cls, method: str, num_experts: int, hidden_size: int) -> PeerRouter:
        """Zero rows (and bias) of peer ``method``'s shape, for a checkpoint to fill."""
        bias = torch.zeros(num_experts) if method == "dume-bias" else None
        return cls(torch.zeros(num_experts, hidden_size), PEER_SCORES[method], 1.0, bias, method)

    def expert_embeddings(self) -> torch.Tensor:
        """Refused: these scores are no ``x @ E^T`` (what a Hugging Face export asks for)."""
        method = self.method or {"abs": "arrow", "standardised": "phatgoose"}.get(
            self.score, "dume-bias"
        )
        raise NexusError(export_refusal(method) or f"the {method} router has no linear rows")

    def forward(self, x: torch.Tensor, prev_assignment: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        if self.score == "standardised":
            h = x.shape[-1]
            s = F.layer_norm(x, (h,)) @ F.layer_norm(self.rows, (h,)).t() / math.sqrt(h)
        else:
            s = x @ self.rows.t()
            if self.score == "abs":
                s = s.abs()
        s = self.temperature * s
        return s if self.bias is None else s + self.bias

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        pass  # nothing learned

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.rows = rows.detach().float().to(self.rows.device).clone()
        self.num_experts = rows.shape[0]
        if bias is not None:
            self.bias = bias.detach().float().to(self.rows.device).clone()

    @torch.no_grad()
    def set_row(self, index: int, row: torch.Tensor) -> None:
        self.rows[index].copy_(row.float())

    @torch.no_grad()
    def shift_rows(self, shift: torch.Tensor) -> None:
        self.rows[: shift.shape[0]] += shift.to(self.rows)

    @torch.no_grad()
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        """Append a zero row (and bias 0); the peer's rule then places it."""
        self.rows = torch.cat([self.rows, torch.zeros_like(self.rows[:1])])
        if self.bias is not None:
            self.bias = torch.cat([self.bias, torch.zeros_like(self.bias[:1])])
        self.num_experts += 1

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        keep = [i for i in range(self.num_experts) if i != index]
        self.rows = self.rows[keep].clone()
        if self.bias is not None:
            self.bias = self.bias[keep].clone()
        self.num_experts -= 1
