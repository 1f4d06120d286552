"""Linear router (docs/design.md §4): logits = x W^T with a learned (num_experts, hidden) matrix."""

from __future__ import annotations

import torch
from torch import nn

from nexus_moe.routers.base import Router, normal_init_


class LinearRouter(Router):
    """One learned embedding row per expert (the BTX / sparse-upcycling / moe-linear router)."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        normal_init_(self.weight, self.init_std, generator)

    def expert_embeddings(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor) -> None:
        if rows.shape != self.weight.shape:
            raise ValueError(f"rows of shape {tuple(rows.shape)}, router has {self.weight.shape}")
        self.weight.copy_(rows.to(self.weight.dtype))

    @torch.no_grad()
    def set_row(self, index: int, row: torch.Tensor) -> None:
        self.weight[index].copy_(row.to(self.weight.dtype))

    @torch.no_grad()
    def shift_rows(self, shift: torch.Tensor) -> None:
        self.weight[: shift.shape[0]] += shift.to(self.weight)

    @torch.no_grad()
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        """Append a random row; ``reset`` re-initialises the whole router (the paper's baseline)."""
        row = torch.empty(
            1, self.weight.shape[1], dtype=self.weight.dtype, device=self.weight.device
        )
        nn.init.normal_(row, std=self.init_std)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), row]))
        self.num_experts += 1
        if reset:
            self.reset_parameters()

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        keep = [i for i in range(self.num_experts) if i != index]
        self.weight = nn.Parameter(self.weight.detach()[keep].clone())
        self.num_experts -= 1
