"""The router interface (docs/design.md §4).

A router only scores experts: it returns float32 logits of shape (tokens, routed experts). Softmax,
top-k, gating and the auxiliary losses live in the MoE layer (``nexus_moe.moe``), so every router
is interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Base class: subclasses implement :meth:`expert_embeddings` and may override :meth:`forward`."""

    num_experts: int

    def expert_embeddings(self) -> torch.Tensor:
        """The (num_experts, hidden) matrix whose rows score tokens: logits = x @ E^T."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, prev_assignment: torch.Tensor | None = None) -> torch.Tensor:
        """Score tokens ``x`` (N, hidden) against every routed expert -> (N, num_experts) fp32.

        ``prev_assignment`` (N,) is the top-1 expert of each token at the previous MoE layer;
        only the adaptive-clustering router uses it.
        """
        embeddings = self.expert_embeddings()  # (E, hidden)
        return x.float() @ embeddings.float().t()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise the learned parameters, drawing from ``generator`` when given."""
        raise NotImplementedError

    def set_rows(self, rows: torch.Tensor) -> None:
        """Make ``rows`` (num_experts, hidden) the expert embeddings, e.g. rows calibrated from
        each domain's hidden states (``nexus_moe.calibrate``)."""
        raise NotImplementedError

    def set_row(self, index: int, row: torch.Tensor) -> None:
        """Make ``row`` (hidden,) the embedding of expert ``index`` (the others are unchanged)."""
        raise NotImplementedError

    def shift_rows(self, shift: torch.Tensor) -> None:
        """Add ``shift`` (k, hidden) to the embeddings of the first k experts (the rows of the
        earlier experts refit when one is added, ``nexus_moe.calibrate.refit_earlier_rows``)."""
        raise NotImplementedError

    # Growing and shrinking (docs/design.md §7). Subclasses implement these for their own parameters.
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        """Append an expert by the router's own rule (random row, or the Nexus projection of its
        domain); :meth:`set_row` then places a calibrated one."""
        raise NotImplementedError

    def remove_expert(self, index: int) -> None:
        raise NotImplementedError


@torch.no_grad()
def normal_init_(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> None:
    """``tensor ~ N(0, std)`` in place; a no-op on the meta device (shapes only), where
    ``normal_`` would run through a Python reference that imports ``torch._dynamo`` (~2 s of
    every command that only checks a checkpoint's tensor table)."""
    if not tensor.is_meta:
        tensor.normal_(0.0, std, generator=generator)
