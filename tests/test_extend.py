"""Extending and shrinking an MoE (docs/design.md §7) and routing analysis (docs/design.md §9)."""

import pytest
import torch

from conftest import tiny_config
from nexus_moe.analyse import plot_heatmap, routing_report
from nexus_moe.checkpoint import load_checkpoint, save_checkpoint
from nexus_moe.config import MoEConfig
from nexus_moe.errors import NexusError
from nexus_moe.extend import extend, extend_model, remove_expert
from nexus_moe.model import Transformer
from nexus_moe.routers import NexusRouter

ROUTERS = [
    dict(router="linear"),
    dict(router="nexus"),
    dict(router="ac", ac_base="nexus"),
]


def make_moe(**moe_kw):
    moe = MoEConfig(
        num_experts=3,
        top_k=1,
        domains=["a", "b", "c"],
        domain_embedding_dim=8,
        nexus_hidden_size=8,
        embedder="test-embedder",
        **moe_kw,
    )
    model = Transformer(tiny_config(moe=moe))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NexusRouter):
                m.domain_embeddings.copy_(torch.randn(3, 8))
    return model.eval()


def test_extend_keeps_old_outputs_while_new_gate_is_masked():
    for kw in ROUTERS:
        moe = make_moe(**kw)
        ids = torch.randint(0, 128, (2, 12))
        before = moe(ids).logits
        expert = Transformer(tiny_config())
        extend_model(moe, expert, "d", torch.randn(8), merge_lambda=0.0)
        assert moe.cfg.moe.num_experts == 4 and moe.cfg.moe.domains[-1] == "d"
        for layer in moe.moe_layers():
            layer.expert_mask = torch.tensor([True, True, True, False])
        # Equal up to float reduction order (the router matmul has one more column).
        torch.testing.assert_close(moe(ids).logits, before, atol=1e-6, rtol=1e-5)
        for layer in moe.moe_layers():
            layer.expert_mask = None
        routing = moe(ids).routing
        assert all(r.router_logits.shape[-1] == 4 for r in routing)


def test_extend_merges_non_ffn_weights_with_one_over_n_plus_one():
    moe = make_moe(router="linear")
    expert = Transformer(tiny_config())
    old = {k: v.clone() for k, v in moe.state_dict().items()}
    extend_model(moe, expert, "d")
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = 0.75 * old[name] + 0.25 * expert.state_dict()[name]
    torch.testing.assert_close(moe.state_dict()[name], expected)
    shared = "model.layers.0.mlp.shared_expert.up_proj.weight"
    assert torch.equal(moe.state_dict()[shared], old[shared])
    new_ffn = moe.state_dict()["model.layers.1.mlp.experts.gate_proj"][3]
    assert torch.equal(new_ffn, expert.state_dict()["model.layers.1.mlp.gate_proj.weight"])


def test_nexus_router_gives_new_expert_an_embedding_without_new_parameters():
    moe = make_moe(router="nexus")
    count = moe.num_params()
    d_new = torch.randn(8)
    extend_model(moe, Transformer(tiny_config()), "d", d_new)
    assert moe.num_params() == count + 3 * 2 * 32 * 64  # only the new expert's FFN, per layer
    for layer in moe.moe_layers():
        router = layer.router
        torch.testing.assert_close(router.expert_embeddings()[-1], router.project(d_new[None])[0])


def test_linear_router_reset_baseline_reinitialises_all_rows():
    moe = make_moe(router="linear")
    rows = moe.moe_layers()[0].router.weight.detach().clone()
    extend_model(moe, Transformer(tiny_config()), "d", reset_linear_router=True, seed=1)
    new = moe.moe_layers()[0].router.weight
    assert new.shape == (4, 32) and not torch.equal(new[:3], rows)


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda k: "-".join(k.values()))
def test_extend_then_remove_is_bit_exact(tmp_path, kw):
    moe = make_moe(**kw)
    save_checkpoint(tmp_path / "moe", moe)
    save_checkpoint(tmp_path / "new", Transformer(tiny_config()), metadata={"domain": "d"})

    class Emb:  # the part of DomainEmbeddings that extend uses
        embedder = "test-embedder"

        def get(self, names):
            return torch.randn(len(names), 8)

    extend(tmp_path / "moe", tmp_path / "new", tmp_path / "ext", domain_embeddings=Emb())
    extended, meta = load_checkpoint(tmp_path / "ext")
    assert extended.cfg.moe.domains == ["a", "b", "c", "d"]
    remove_expert(tmp_path / "ext", tmp_path / "back", "d")
    back, meta = load_checkpoint(tmp_path / "back")
    assert meta["merge_undone"] is True
    assert back.cfg == moe.cfg
    original = moe.state_dict()
    for name, value in back.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_remove_after_finetuning_keeps_merged_weights(tmp_path):
    moe = make_moe(router="linear")
    save_checkpoint(tmp_path / "moe", moe)
    save_checkpoint(tmp_path / "new", Transformer(tiny_config()), metadata={"domain": "d"})
    extend(tmp_path / "moe", tmp_path / "new", tmp_path / "ext")
    model, meta = load_checkpoint(tmp_path / "ext")
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)  # "finetuning" changed the merged weights
    save_checkpoint(tmp_path / "ft", model, metadata=meta)
    remove_expert(tmp_path / "ft", tmp_path / "out", "b")
    out, meta = load_checkpoint(tmp_path / "out")
    assert meta["merge_undone"] is False and out.cfg.moe.domains == ["a", "c", "d"]


def test_extend_refuses_bad_inputs(tmp_path):
    moe = make_moe(router="nexus")
    save_checkpoint(tmp_path / "moe", moe)
    save_checkpoint(
        tmp_path / "wide", Transformer(tiny_config(hidden_size=64)), metadata={"domain": "d"}
    )
    with pytest.raises(NexusError, match="hidden_size=64 but the MoE"):
        extend(tmp_path / "moe", tmp_path / "wide", tmp_path / "x")
    save_checkpoint(tmp_path / "ok", Transformer(tiny_config()), metadata={"domain": "d"})
    with pytest.raises(NexusError, match="pass --embeddings"):
        extend(tmp_path / "moe", tmp_path / "ok", tmp_path / "x")
    save_checkpoint(tmp_path / "dup", Transformer(tiny_config()), metadata={"domain": "a"})

    class Emb:
        embedder = "test-embedder"

        def get(self, names):
            return torch.randn(len(names), 8)

    with pytest.raises(NexusError, match="already has an expert for domain 'a'"):
        extend(tmp_path / "moe", tmp_path / "dup", tmp_path / "x", domain_embeddings=Emb())
    assert not (tmp_path / "x").exists()


def test_routing_report_rows_sum_to_one_and_accuracy(tmp_path):
    counts = torch.tensor([[[8, 2, 0], [1, 1, 8]], [[6, 4, 0], [0, 0, 10]]])  # (L=2, D=2, E=3)
    report = routing_report(counts, ["a", "b"], ["a", "x", "b"])
    for matrix in [report["mean"], *report["per_layer"]]:
        for row in matrix:
            assert sum(row) == pytest.approx(1.0)
    assert report["accuracy"] == {"a": pytest.approx(0.7), "b": pytest.approx(0.9)}
    assert sum(report["load"].values()) == pytest.approx(1.0)
    png = plot_heatmap(report["mean"], ["a", "b"], ["a", "x", "b"], "t", tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
