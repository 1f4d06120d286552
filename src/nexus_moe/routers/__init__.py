"""Routers (docs/design.md §4), one per file behind the :class:`Router` interface, chosen by RouterType."""

from __future__ import annotations

import torch

from nexus_moe.config import MoEConfig, RouterType
from nexus_moe.routers.ac import ACRouter, cluster_feature_weights
from nexus_moe.routers.base import Router
from nexus_moe.routers.linear import LinearRouter
from nexus_moe.routers.nexus import NexusRouter
from nexus_moe.routers.peer_router import PEER_SCORES, PeerRouter

__all__ = [
    "ACRouter",
    "LinearRouter",
    "NexusRouter",
    "PeerRouter",
    "Router",
    "build_router",
    "cluster_feature_weights",
]


def _build_base(kind: RouterType, cfg: MoEConfig, hidden_size: int) -> Router:
    if kind == RouterType.linear:
        return LinearRouter(hidden_size, cfg.num_experts, cfg.router_init_std)
    # Domain embeddings are filled in by upcycling; zeros until then keep the module buildable.
    placeholder = torch.zeros(cfg.num_experts, cfg.domain_embedding_dim)
    return NexusRouter(
        hidden_size,
        placeholder,
        projection_size=cfg.nexus_hidden_size,
        init_std=cfg.router_init_std,
        normalize=cfg.normalize_domain_embeddings,
    )


def build_router(cfg: MoEConfig, hidden_size: int) -> Router:
    """The router a MoE layer with config ``cfg`` uses."""
    if cfg.router_init in PEER_SCORES:  # a peer's rows with a bias or a non-linear score
        return PeerRouter.for_method(cfg.router_init, cfg.num_experts, hidden_size)
    if cfg.router == RouterType.ac:
        return ACRouter(
            _build_base(cfg.ac_base, cfg, hidden_size), cfg.ac_eps, cfg.ac_tau, cfg.ac_momentum
        )
    return _build_base(cfg.router, cfg, hidden_size)
