"""Training-free peer routers (nexus_moe.routers.peers) on a tiny MoE with three synthetic domains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from nexus_moe.config import MoEConfig, RouterType
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.routers import peers

DOMAINS = ["a", "b", "c"]


def _windows(domain: int, rows: int = 12, length: int = 32) -> torch.Tensor:
    """Windows of tokens drawn from domain ``domain``'s own third of the vocabulary."""
    g = torch.Generator().manual_seed(domain)
    lo = 1 + 40 * domain
    return torch.randint(lo, lo + 40, (rows, length), generator=g)


def _models(num_experts: int = 3, context: float = 0.0):
    torch.manual_seed(0)
    seed = Transformer(tiny_config())
    moe_cfg = MoEConfig(num_experts=num_experts, top_k=2, shared_expert=False, renormalize=True,
                        router=RouterType.linear, router_context=context,
                        domains=DOMAINS[:num_experts])  # fmt: skip
    moe = Transformer(tiny_config(moe_cfg))
    # the shared weights are the seed's; each expert is the seed's FFN plus a rank-1 change
    state = {k: v for k, v in seed.state_dict().items() if ".mlp." not in k}
    moe.load_state_dict(state, strict=False)
    directions = []
    with torch.no_grad():
        for i, block in enumerate(moe.model.layers):
            ffn = seed.model.layers[i].mlp
            e = block.mlp.experts
            for j in range(num_experts):
                v = F.normalize(torch.randn(32), dim=0)
                u = torch.randn(64)
                e.gate_proj[j].copy_(ffn.gate_proj.weight + torch.outer(u, v))
                e.up_proj[j].copy_(ffn.up_proj.weight + 0.5 * torch.outer(u, v))
                e.down_proj[j].copy_(ffn.down_proj.weight)
                if i == 0:
                    directions.append(v)
    return seed, moe, directions


def _own_share(model: Transformer, windows: list[torch.Tensor]) -> float:
    """Share of each domain's tokens whose top-1 expert is its own, first MoE layer."""
    hits, total = 0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            top1 = model(w).routing[0].top1
            hits += int((top1 == i).sum())
            total += top1.numel()
    return hits / total


def test_dume_solve_is_the_ridge_regression_with_unit_columns():
    x = torch.randn(200, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (200,))
    xa = torch.cat([x, torch.ones(200, 1, dtype=x.dtype)], 1)
    y = F.one_hot(labels, 3).double()
    a, b = xa.t() @ xa, xa.t() @ y
    rows, bias = peers.dume_solve(a, b, bias=True, lam=0.5)
    w = torch.linalg.solve(a + 0.5 * torch.eye(6, dtype=a.dtype), b)
    norm = w[:-1].norm(dim=0)
    torch.testing.assert_close(rows.double(), (w[:-1] / norm).t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.double(), w[-1] / norm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))
    rows0, none = peers.dume_solve(a[:5, :5], b[:5], bias=False)
    assert none is None and rows0.shape == (3, 5)


@pytest.mark.parametrize("method", ["dume", "dume-bias", "mean", "mergekit-hidden-avg"])
def test_data_peers_route_each_domain_to_its_expert(method):
    seed, moe, _ = _models()
    windows = [_windows(i) for i in range(3)]
    before = _own_share(moe, windows)
    peers.place_peer_rows(moe, method, windows, seed)
    after = _own_share(moe, windows)
    assert after > 0.6 and after > before + 0.25, (before, after)


def test_arrow_rows_are_the_experts_weight_change_directions():
    seed, moe, directions = _models()
    peers.place_peer_rows(moe, "arrow", seed=seed)
    rows = moe.moe_layers()[0].router.rows
    cos = (rows @ torch.stack(directions).t()).abs()
    torch.testing.assert_close(cos.diagonal(), torch.ones(3), atol=1e-4, rtol=0)
    x = torch.randn(7, 32)
    torch.testing.assert_close(moe.moe_layers()[0].router(x), (x @ rows.t()).abs())


def test_dume_adding_an_expert_resolves_every_row_and_removing_it_restores_them():
    seed, moe, _ = _models()
    _, expert, _ = _models()  # a model whose expert 0 FFN becomes the fourth expert
    dense = Transformer(tiny_config())
    with torch.no_grad():
        for i, block in enumerate(dense.model.layers):
            e = expert.model.layers[i].mlp.experts
            block.mlp.gate_proj.weight.copy_(e.gate_proj[1])
            block.mlp.up_proj.weight.copy_(e.up_proj[1])
            block.mlp.down_proj.weight.copy_(e.down_proj[1])
    windows = [_windows(i) for i in range(3)]
    state = peers.place_peer_rows(moe, "dume", windows, seed)
    rows_before = moe.moe_layers()[0].router.expert_embeddings().clone()
    new = torch.randint(100, 128, (12, 32), generator=torch.Generator().manual_seed(9))
    peers.add_peer_expert(moe, state, dense, "d", new)
    assert moe.cfg.moe.num_experts == 4 and moe.cfg.moe.domains[-1] == "d"
    grown = moe.moe_layers()[0].router.expert_embeddings()
    assert grown.shape[0] == 4
    assert not torch.allclose(grown[:3], rows_before, atol=1e-4)  # every row re-solved
    peers.remove_peer_expert(moe, state, 3)
    # the same sum of the remaining domains' statistics: the same rows, bit for bit
    assert torch.equal(moe.moe_layers()[0].router.expert_embeddings(), rows_before)


def test_mean_peer_adds_a_row_without_moving_the_others():
    seed, moe, _ = _models()
    windows = [_windows(i) for i in range(3)]
    state = peers.place_peer_rows(moe, "mean", windows, seed)
    before = moe.moe_layers()[0].router.expert_embeddings().clone()
    dense = Transformer(tiny_config())
    peers.add_peer_expert(moe, state, dense, "d", _windows(2))
    after = moe.moe_layers()[0].router.expert_embeddings()
    torch.testing.assert_close(after[:3], before)
    assert after[3].norm() > 0.5


def test_phatgoose_gates_move_and_route():
    seed, moe, _ = _models()
    windows = [_windows(i) for i in range(3)]
    state = peers.place_peer_rows(moe, "phatgoose", windows, seed, phatgoose_steps=5)
    assert all(g[0].norm() > 0 for g in state.vectors)  # trained away from their zero start
    assert moe.moe_layers()[0].router.score == "standardised"
    assert all(not p.grad_fn and p.requires_grad for p in moe.parameters())  # unfrozen again


def test_unknown_method_and_missing_data_are_named():
    seed, moe, _ = _models()
    with pytest.raises(NexusError, match="unknown peer router 'nope'"):
        peers.place_peer_rows(moe, "nope")
    with pytest.raises(NexusError, match="needs calibration windows"):
        peers.place_peer_rows(moe, "dume")
    with pytest.raises(NexusError, match="needs the seed model"):
        peers.place_peer_rows(moe, "arrow")
