"""Router contract (docs/design.md §3, §4): every router behind the same MoE layer."""

import pytest
import torch

from nexus_moe import moe
from nexus_moe.config import MoEConfig
from nexus_moe.moe import MoELayer
from nexus_moe.routers import ACRouter, LinearRouter, NexusRouter, cluster_feature_weights

H, FFN = 16, 32
ROUTERS = [
    dict(router="linear"),
    dict(router="nexus"),
    dict(router="ac", ac_base="linear"),
    dict(router="ac", ac_base="nexus"),
]


def make_layer(num_experts=4, top_k=2, domain_dim=8, **kw):
    cfg = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        domain_embedding_dim=domain_dim,
        nexus_hidden_size=8,
        **kw,
    )
    layer = MoELayer(cfg, H, FFN, FFN)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
        for m in layer.modules():
            if isinstance(m, NexusRouter):
                m.domain_embeddings.copy_(torch.randn(num_experts, domain_dim))
    return layer


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda k: "-".join(k.values()))
def test_probabilities_indices_and_gradients(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 10, H)
    prev = torch.randint(0, 4, (20,))
    y, info = layer(x, prev)
    assert y.shape == x.shape
    probs = torch.softmax(info.router_logits, -1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(20))
    assert info.router_logits.dtype == torch.float32
    assert info.top1.min() >= 0 and info.top1.max() < 4
    (y.square().mean() + info.load_balance_loss).backward()
    router_params = list(layer.router.named_parameters())
    assert router_params
    for name, p in router_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kw["router"] == "nexus" or kw.get("ac_base") == "nexus":
        names = {n for n, _ in router_params}
        assert any("w1" in n for n in names) and any("w2" in n for n in names)


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda k: "-".join(k.values()))
def test_eval_forward_leaves_counters_and_stats_unchanged(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 10, H)
    prev = torch.randint(0, 4, (20,))
    layer.train()
    layer(x, prev)
    counts = layer.tokens_per_expert.clone()
    assert counts.sum() == 20 * 2  # top-2 assignments
    buffers = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 7, H), torch.randint(0, 4, (21,)))
    assert torch.equal(layer.tokens_per_expert, counts)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, buffers[k]), k


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda k: "-".join(k.values()))
def test_identical_experts_equal_dense_ffn(kw):
    """Renormalised top-k over identical experts is exactly the dense FFN."""
    layer = make_layer(renormalize=True, shared_expert=False, **kw)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[0:1].expand_as(p))
    x = torch.randn(3, 5, H)
    y, _ = layer(x, torch.randint(0, 4, (15,)))
    w = layer.experts
    dense = (
        torch.nn.functional.silu(x @ w.gate_proj[0].t()) * (x @ w.up_proj[0].t())
    ) @ w.down_proj[0].t()
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def naive_moe(layer, x, prev=None):
    """Reference: loop over tokens and their top-k experts."""
    logits = layer.router(x, prev).float()
    probs = torch.softmax(logits, -1)
    top_p, top_i = probs.topk(layer.top_k, -1)
    if layer.cfg.renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    w = layer.experts
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(layer.top_k):
            e = top_i[t, j]
            h = torch.nn.functional.silu(w.gate_proj[e] @ x[t]) * (w.up_proj[e] @ x[t])
            acc = acc + top_p[t, j] * (w.down_proj[e] @ h)
        if layer.shared_expert is not None:
            acc = acc + layer.shared_expert(x[t])
        rows.append(acc)
    return torch.stack(rows)


BACKENDS = [
    "loop",
    pytest.param(
        "grouped_mm",
        marks=pytest.mark.skipif(moe._GROUPED_MM is None, reason="torch has no grouped_mm"),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,renorm", [(1, False), (2, False), (2, True), (3, True)])
def test_grouped_dispatch_equals_naive_reference(top_k, renorm, backend):
    """Forward and every gradient of the one-node grouped experts (both backends; grouped_mm
    is the CUDA fast path, checked here on the CPU kernel) equal plain per-token autograd."""
    layer = make_layer(num_experts=4, top_k=top_k, renormalize=renorm, router="linear")
    layer.experts.backend = backend
    x = torch.randn(24, H, requires_grad=True)
    y, _ = layer(x)
    ref = naive_moe(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, *layer.parameters()])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_without_tokens_still_gets_zero_gradient(backend):
    layer = make_layer(num_experts=4, top_k=1, router="linear")
    layer.experts.backend = backend
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # everything goes to expert 0
    x = torch.ones(6, H)
    y, info = layer(x)
    assert (info.top1 == 0).all()
    y.sum().backward()
    for weight in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj):
        assert weight.grad is not None
        assert weight.grad[1:].abs().sum() == 0  # buffers are not left uninitialised
        assert weight.grad[0].abs().sum() > 0


def test_frozen_experts_get_no_gradient_and_input_gradient_is_unchanged():
    layer = make_layer(num_experts=4, top_k=2, router="linear")
    x = torch.randn(24, H, requires_grad=True)
    g = torch.randn(24, H)
    (want,) = torch.autograd.grad((layer(x)[0] * g).sum(), [x])
    layer.experts.requires_grad_(False)
    y, _ = layer(x)
    (y * g).sum().backward()
    assert all(p.grad is None for p in layer.experts.parameters())
    assert layer.router.weight.grad is not None
    torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=1e-6)


def test_bf16_autocast_casts_once_and_keeps_fp32_gradients():
    """Under CPU bf16 autocast the experts compute in bf16 (like autocast per matmul) and the
    float32 parameters receive float32 gradients close to the float32 ones."""
    layer = make_layer(num_experts=4, top_k=2, router="linear")
    x = torch.randn(32, H, requires_grad=True)
    g = torch.randn(32, H)
    y32, _ = layer(x)
    want = torch.autograd.grad((y32 * g).sum(), [x, *layer.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = layer(x)
    assert y16.dtype == torch.bfloat16
    got = torch.autograd.grad((y16.float() * g).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_ac_weights_average_one_and_empty_clusters_get_one():
    x = torch.randn(50, H, requires_grad=True)
    assign = torch.randint(0, 3, (50,))  # expert 3 gets no tokens
    w, present = cluster_feature_weights(x, assign, 4)
    assert w.shape == (4, H) and not w.requires_grad
    torch.testing.assert_close(w.mean(0), torch.ones(H))
    assert present.tolist() == [True, True, True, False]
    # Before the cross-expert normalisation the empty cluster's weights are exactly 1, so after
    # it the empty row equals 1 / mean over experts of the raw weights; check the ratio holds.
    tight = torch.randn(50, H) * 0.01
    w2, _ = cluster_feature_weights(tight, torch.zeros(50, dtype=torch.long), 2)
    assert (w2[0] > w2[1]).all()  # the tight cluster weighs every feature more


def test_ac_weights_clipped_at_tau_times_mean():
    x = torch.randn(40, H)
    x[:, 0] = 0.5  # zero deviation: raw weight 1/eps would dominate without clipping
    w_raw, _ = cluster_feature_weights(x, torch.zeros(40, dtype=torch.long), 1, tau=10.0)
    torch.testing.assert_close(w_raw, torch.ones(1, H))  # one cluster: normalised to 1
    x2 = torch.cat([x, torch.randn(40, H)])
    assign = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    w, _ = cluster_feature_weights(x2, assign, 2, eps=1e-4, tau=10.0)
    assert torch.isfinite(w).all() and w.max() < 2.0  # bounded: both clusters average to 1


def test_ac_statistics_have_no_gradient_and_first_layer_uses_base():
    base = LinearRouter(H, 3)
    ac = ACRouter(base)
    x = torch.randn(10, H)
    torch.testing.assert_close(ac(x, None), base(x))
    x.requires_grad_(True)
    ac.train()
    logits = ac(x, torch.randint(0, 3, (10,)))
    logits.sum().backward()
    # Gradient w.r.t. x flows only through the scaled input (weights are constants).
    assert x.grad is not None


def test_nexus_new_expert_needs_no_new_parameters():
    router = NexusRouter(H, torch.randn(3, 8), projection_size=8)
    before = sum(p.numel() for p in router.parameters())
    d_new = torch.randn(8)
    router.add_expert(d_new)
    assert sum(p.numel() for p in router.parameters()) == before
    assert router.num_experts == 4
    expected = router.project(d_new[None])[0]
    torch.testing.assert_close(router.expert_embeddings()[3], expected)


@pytest.mark.parametrize("kind", ["linear", "nexus", "ac"])
def test_shift_rows_moves_the_first_experts_embeddings_only(kind):
    """What `extend --refit-rows` adds to the earlier experts' rows lands in their embeddings,
    whatever the router (Nexus: its anchors, under an unchanged projection), and the scores
    follow, also from an inference cache filled before the shift."""
    torch.manual_seed(0)
    if kind == "linear":
        router = LinearRouter(H, 4)
    else:
        router = NexusRouter(H, torch.randn(4, 8), projection_size=8)
        if kind == "ac":
            router = ACRouter(router)
    router.eval()
    x = torch.randn(5, H)
    with torch.no_grad():
        before, scores = router.expert_embeddings().clone(), router(x)
        shift = torch.randn(3, H)
        router.shift_rows(shift)
        after, shifted = router.expert_embeddings(), router(x)
    torch.testing.assert_close(after[:3], before[:3] + shift)
    torch.testing.assert_close(after[3], before[3])
    moved = torch.cat([x @ shift.t(), torch.zeros(5, 1)], 1)
    torch.testing.assert_close(shifted, scores + moved, atol=1e-5, rtol=1e-5)


def test_nexus_inference_cache_tracks_parameter_updates():
    router = NexusRouter(H, torch.randn(3, 8), projection_size=8).eval()
    x = torch.randn(5, H)
    with torch.no_grad():
        first = router(x)
        assert router._cache is not None
        router.w2.weight.mul_(2.0)
        second = router(x)
    torch.testing.assert_close(second, 2 * first)


def test_load_balancing_loss_is_one_when_balanced():
    from nexus_moe.losses import load_balancing_loss

    probs = torch.full((8, 4), 0.25)
    top1 = torch.arange(8) % 4
    torch.testing.assert_close(load_balancing_loss(probs, top1), torch.tensor(1.0))
    skewed = torch.zeros(8, 4)
    skewed[:, 0] = 1.0
    assert load_balancing_loss(skewed, torch.zeros(8, dtype=torch.long)) == 4.0


def test_nexus_expert_embeddings_start_at_linear_router_scale():
    """Both projection factors small would give e_i ~ 0 and a vanishing router gradient."""
    torch.manual_seed(0)
    domains = torch.nn.functional.normalize(torch.randn(64, 384), dim=-1)
    router = NexusRouter(256, domains, projection_size=128, init_std=0.02)
    std = router.expert_embeddings().std().item()
    assert 0.015 < std < 0.025, std
    linear = LinearRouter(256, 64, init_std=0.02)
    assert abs(linear.expert_embeddings().std().item() - std) < 0.005


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("kw", ROUTERS, ids=lambda k: "-".join(k.values()))
def test_inference_path_equals_training_path(kw, top_k):
    """Without autograd the layer runs expert by expert (no N*k-row buffers); its output is the
    autograd path's, bit for bit up to the order of the k-slot float32 sum."""
    layer = make_layer(num_experts=4, top_k=top_k, **kw).eval()
    layer.expert_mask = torch.tensor([True, False, True, True])  # one expert gets no token
    x = torch.randn(2, 50, H)
    prev = torch.randint(0, 4, (100,))
    x_grad = x.clone().requires_grad_()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, info_want = layer(x_grad, prev)
            assert not layer.experts.runs_inference_path(x_grad)
            with torch.no_grad():
                assert layer.experts.runs_inference_path(x)
                got, info_got = layer(x, prev)
        assert got.dtype == want.dtype
        assert torch.equal(info_got.top1, info_want.top1)
        if top_k < 3:
            assert torch.equal(got, want.detach())
        else:
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
