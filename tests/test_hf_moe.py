"""Hugging Face interop for MoE models (qwen2_moe, qwen3_moe, mixtral): native -> HF -> native round trips,
logits and greedy-generation parity with ``transformers`` through the production converter, and
what cannot be expressed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_bpe_file, tiny_config
from nexus_moe.checkpoint import load_checkpoint, model_state_dict, save_checkpoint
from nexus_moe.config import MoEConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf import export_hf, import_hf
from nexus_moe.model import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 300
TEXT = [
    "The mixture of experts routes every token to the experts whose domain it belongs to.",
    "A dense model is upcycled into a sparse one: its feed-forward layers become experts.",
    "Shared experts see every token, routed experts only the tokens the router sends them.",
    "Legal text, source code and recipes make three very different domains of data.",
]


def _tokenizer_file(path: Path) -> Path:
    """A tiny byte-level BPE trained on :data:`TEXT`, with an end-of-text token."""
    return tiny_bpe_file(path, TEXT * 10, VOCAB)


def _moe_model(
    router: str = "linear",
    shared_expert: bool = True,
    top_k: int = 2,
    moe_every: int = 1,
    renormalize: bool = False,
    num_layers: int = 2,
    **overrides,
) -> Transformer:
    """A tiny MoE with every weight (norms, routers, Nexus domain embeddings) randomised."""
    moe = MoEConfig(
        num_experts=4,
        top_k=top_k,
        router=router,
        shared_expert=shared_expert,
        renormalize=renormalize,
        moe_every=moe_every,
        domain_embedding_dim=16,
        nexus_hidden_size=8,
        domains=["law", "code", "recipes", "news"],
    )
    model = Transformer(
        tiny_config(moe=moe, vocab_size=VOCAB, num_layers=num_layers, max_seq_len=128, **overrides)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(base + 0.2 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("domain_embeddings"):
                buffer.copy_(torch.randn_like(buffer))
    return model.eval()


def _load_hf(hf_dir: Path, attn: str = "sdpa"):
    """transformers' model for ``hf_dir``; fails on any missing or unexpected tensor."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{hf_dir}: {problems}"
    return model.eval()


def _max_diff(ours: Transformer, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids).logits - hf_model(ids).logits).abs().max().item()


def _ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _assert_same_weights(expected: Transformer, actual: Transformer) -> None:
    a, b = model_state_dict(expected), model_state_dict(actual)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


# --------------------------------------------------------------------------------------------
# round trips: native -> HF -> native is bit-exact, and transformers computes the same logits


@pytest.mark.parametrize(
    ("fmt", "settings"),
    [
        ("qwen2_moe", dict(top_k=1)),
        ("qwen2_moe", dict(top_k=2, renormalize=True)),
        ("qwen2_moe", dict(top_k=2, moe_every=2, num_layers=3)),
        ("qwen2_moe", dict(top_k=1, moe_every=2, num_layers=4, attention_bias=True)),
        ("qwen2_moe", dict(top_k=2, tie_embeddings=True)),
        ("qwen2_moe", dict(shared_expert=False, top_k=2)),  # an empty shared expert
        ("mixtral", dict(shared_expert=False, top_k=1, renormalize=True)),
        ("mixtral", dict(shared_expert=False, top_k=2, renormalize=True)),
        ("mixtral", dict(shared_expert=False, top_k=2, renormalize=True, head_dim=16)),
        ("qwen3_moe", dict(shared_expert=False, top_k=2, qk_norm=True)),
        (
            "qwen3_moe",
            dict(shared_expert=False, renormalize=True, qk_norm=True, moe_every=2, num_layers=3),
        ),
        (
            "qwen3_moe",
            dict(shared_expert=False, top_k=1, qk_norm=True, attention_bias=True, head_dim=16),
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the empty shared expert
def test_round_trip_is_bit_exact(tmp_path, fmt, settings):
    ours = _moe_model(**settings)
    hf_dir = export_hf(ours, tmp_path / "hf", fmt=fmt)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == fmt

    back = import_hf(hf_dir)
    assert back.cfg == ours.cfg
    _assert_same_weights(ours, back)

    ids = _ids()
    diff = _max_diff(ours, _load_hf(hf_dir), ids)
    assert diff <= TOL, f"{fmt} {settings}: max |diff| {diff:.2e}"


def test_moe_every_is_written_as_mlp_only_layers(tmp_path):
    ours = _moe_model(moe_every=2, num_layers=5)
    doc = json.loads(
        (export_hf(ours, tmp_path / "hf", fmt="qwen2_moe") / "config.json").read_text()
    )
    assert doc["decoder_sparse_step"] == 1 and doc["mlp_only_layers"] == [1, 3]
    hf = _load_hf(tmp_path / "hf")
    sparse = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in hf.model.layers]
    assert sparse == [True, False, True, False, True]


def test_nexus_router_exports_its_expert_embeddings(tmp_path):
    """A Nexus router is exported as E = P(d); importing gives a linear router, same logits."""
    ours = _moe_model(router="nexus", top_k=1)
    hf_dir = export_hf(ours, tmp_path / "hf", fmt="qwen2_moe")
    weights = load_file(hf_dir / "model.safetensors")
    with torch.no_grad():
        expected = ours.model.layers[1].mlp.router.expert_embeddings().float()
    assert torch.equal(weights["model.layers.1.mlp.gate.weight"], expected)

    back = import_hf(hf_dir)
    assert back.cfg.moe.router == "linear"
    assert back.cfg.moe.domains == ["law", "code", "recipes", "news"]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, back(ids).logits)


def test_shared_expert_gate_is_zero_and_down_proj_doubled(tmp_path):
    ours = _moe_model(top_k=1)
    weights = load_file(export_hf(ours, tmp_path / "hf", fmt="qwen2_moe") / "model.safetensors")
    assert not weights["model.layers.0.mlp.shared_expert_gate.weight"].any()
    shared = ours.model.layers[0].mlp.shared_expert
    assert torch.equal(
        weights["model.layers.0.mlp.shared_expert.down_proj.weight"],
        shared.down_proj.weight.detach() * 2,
    )
    # The Hub layout: one tensor per expert projection.
    assert weights["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (64, 32)
    assert not any("gate_up_proj" in name for name in weights)


# --------------------------------------------------------------------------------------------
# parity on real text: logits and greedy generation


@pytest.mark.parametrize(
    ("fmt", "settings"),
    [
        ("qwen2_moe", dict(router="linear", top_k=2)),
        ("qwen2_moe", dict(router="nexus", top_k=1)),
        ("mixtral", dict(router="linear", shared_expert=False, top_k=2, renormalize=True)),
        ("mixtral", dict(router="nexus", shared_expert=False, top_k=1, renormalize=True)),
        ("qwen3_moe", dict(router="nexus", shared_expert=False, renormalize=True, qk_norm=True)),
    ],
)
def test_transformers_parity_on_text(tmp_path, fmt, settings):
    ours = _moe_model(**settings)
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    hf_dir = export_hf(ours, tmp_path / "hf", fmt=fmt, tokenizer_path=tokenizer)

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from tokenizers import Tokenizer

    our_tok = Tokenizer.from_file(str(tokenizer))
    prompt = "The router sends legal text and source code to different experts."
    ids = torch.tensor([our_tok.encode(prompt).ids])
    assert hf_tok(prompt).input_ids == ids[0].tolist()

    for attn in ("eager", "sdpa"):
        hf = _load_hf(hf_dir, attn)
        diff = _max_diff(ours, hf, ids)
        assert diff <= TOL, f"{fmt} {settings} {attn}: max |diff| {diff:.2e}"

    hf.generation_config.eos_token_id = None  # ours generates without stopping, too
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), theirs)


# --------------------------------------------------------------------------------------------
# importing transformers-made checkpoints


def _hf_moe(model_type: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        num_experts_per_tok=2,
    )
    if model_type == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common,
            num_experts=4,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            **overrides,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif model_type == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, num_experts=4, moe_intermediate_size=48, head_dim=16, **overrides
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.MixtralConfig(**common, num_local_experts=4, **overrides)
        model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_import_transformers_qwen2_moe_with_its_learned_shared_expert_gate(tmp_path):
    """A transformers-made Qwen2-MoE (random, non-zero shared_expert_gate) imports with a learned
    sigmoid gate on the shared expert: same logits, and it exports back unchanged."""
    hf = _hf_moe("qwen2_moe", norm_topk_prob=True, mlp_only_layers=[1])
    assert hf.model.layers[0].mlp.shared_expert_gate.weight.abs().min() > 0
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    moe = ours.cfg.moe
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.shared_expert) == (4, 2, True, True)
    assert moe.shared_expert_gate
    assert ours.cfg.expert_intermediate_size == 48 and ours.cfg.attention_bias
    assert [ours.cfg.is_moe_layer(i) for i in range(2)] == [True, False]
    ids = _ids()
    assert _max_diff(ours, hf, ids) <= TOL
    with torch.no_grad():  # the gate matters: without it the logits differ
        gate = ours.model.layers[0].mlp.shared_expert_gate
        ours.model.layers[0].mlp.shared_expert_gate = None
        assert _max_diff(ours, hf, ids) > 100 * TOL
        ours.model.layers[0].mlp.shared_expert_gate = gate

    back_dir = export_hf(ours, tmp_path / "back", fmt="qwen2_moe")
    exported = load_file(back_dir / "model.safetensors")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    for name in ("shared_expert_gate.weight", "shared_expert.down_proj.weight"):
        name = f"model.layers.0.mlp.{name}"
        assert torch.equal(exported[name], original[name]), name
    assert _max_diff(ours, _load_hf(back_dir), ids) <= TOL
    _assert_same_weights(ours, import_hf(back_dir))


def test_always_on_shared_expert_exports_with_a_zero_gate_and_refuses_an_edited_one(tmp_path):
    ours = _moe_model(top_k=1)
    hf_dir = export_hf(ours, tmp_path / "hf", fmt="qwen2_moe")
    assert not import_hf(hf_dir).cfg.moe.shared_expert_gate
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.0.mlp.shared_expert_gate.weight"] += 0.1
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NexusError, match=r"shared_expert_gate\.weight' is non-zero.*'nexus_moe'"):
        import_hf(hf_dir)


def test_import_transformers_mixtral(tmp_path):
    hf = _hf_moe("mixtral", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.tie_embeddings and ours.cfg.moe.renormalize and ours.cfg.moe.top_k == 2
    assert _max_diff(ours, hf, _ids()) <= TOL


@pytest.mark.parametrize("renormalize", [False, True])
def test_import_transformers_qwen3_moe(tmp_path, renormalize):
    hf = _hf_moe("qwen3_moe", norm_topk_prob=renormalize, mlp_only_layers=[1])
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    moe = ours.cfg.moe
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.shared_expert) == (
        4,
        2,
        renormalize,
        False,
    )
    assert ours.cfg.qk_norm and ours.cfg.head_dim == 16 and ours.cfg.expert_intermediate_size == 48
    assert [ours.cfg.is_moe_layer(i) for i in range(2)] == [True, False]
    assert _max_diff(ours, hf, _ids()) <= TOL


def test_fused_expert_layout_imports(tmp_path):
    """transformers 5 holds experts fused (E, 2I, H); such a file imports to the same model."""
    ours = _moe_model(shared_expert=False, renormalize=True)
    hf_dir = export_hf(ours, tmp_path / "hf", fmt="mixtral")
    weights = load_file(hf_dir / "model.safetensors")
    for layer in range(2):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        gate, up, down = (
            torch.stack([weights.pop(f"{old}.experts.{j}.{n}.weight") for j in range(4)])
            for n in ("w1", "w3", "w2")
        )
        weights[f"{new}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        weights[f"{new}.experts.down_proj"] = down
        weights[f"{new}.gate.weight"] = weights.pop(f"{old}.gate.weight")
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _assert_same_weights(ours, import_hf(hf_dir))
    assert _max_diff(ours, _load_hf(hf_dir), _ids()) <= TOL


# --------------------------------------------------------------------------------------------
# what a format cannot express is refused; nothing is written


def test_ac_router_is_refused(tmp_path):
    ours = _moe_model(router="ac")
    for fmt in ("qwen2_moe", "mixtral", "auto"):
        with pytest.raises(NexusError, match="adaptive-clustering.*cannot be exported"):
            export_hf(ours, tmp_path / fmt, fmt=fmt)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_refuses_unnormalised_gates(tmp_path, top_k):
    ours = _moe_model(shared_expert=False, top_k=top_k, renormalize=False)
    with pytest.raises(NexusError, match="renormalize=false.*--format qwen2_moe"):
        export_hf(ours, tmp_path / "hf", fmt="mixtral")
    assert not any(tmp_path.iterdir())
    export_hf(ours, tmp_path / "auto")  # auto picks qwen2_moe, which keeps g_i = p_i
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["model_type"] == "qwen2_moe"


def test_mixtral_refuses_shared_expert_bias_and_dense_blocks(tmp_path):
    with pytest.raises(NexusError, match="shared expert"):
        export_hf(_moe_model(renormalize=True), tmp_path / "a", fmt="mixtral")
    with pytest.raises(NexusError, match="q/k/v biases"):
        export_hf(
            _moe_model(shared_expert=False, renormalize=True, attention_bias=True),
            tmp_path / "b",
            fmt="mixtral",
        )
    with pytest.raises(NexusError, match=r"blocks \[1\] are dense"):
        export_hf(
            _moe_model(shared_expert=False, renormalize=True, moe_every=2),
            tmp_path / "c",
            fmt="mixtral",
        )
    with pytest.raises(NexusError, match="qwen2_moe"):
        export_hf(_moe_model(), tmp_path / "d", fmt="llama")
    assert not any(tmp_path.iterdir())


def test_auto_format(tmp_path):
    export_hf(_moe_model(shared_expert=False, renormalize=True), tmp_path / "a")
    export_hf(_moe_model(), tmp_path / "b")
    export_hf(_moe_model(shared_expert=False, qk_norm=True), tmp_path / "c")
    kinds = [json.loads((tmp_path / n / "config.json").read_text())["model_type"] for n in "abc"]
    assert kinds == ["mixtral", "qwen2_moe", "qwen3_moe"]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["norm_topk_prob"] is False


def test_qwen3_seed_with_a_shared_expert_is_refused_naming_the_alternatives(tmp_path):
    ours = _moe_model(qk_norm=True, renormalize=True)
    for fmt in ("qwen3_moe", "qwen2_moe", "mixtral", "auto"):
        with pytest.raises(
            NexusError,
            match=r"no Hugging Face MoE format holds both.*"
            r"--set shared_expert=false.*--format qwen3_moe",
        ):
            export_hf(ours, tmp_path / fmt, fmt=fmt)
    with pytest.raises(NexusError, match="qk_norm=false.*--format mixtral or qwen2_moe"):
        export_hf(_moe_model(shared_expert=False), tmp_path / "x", fmt="qwen3_moe")
    assert not any(tmp_path.iterdir())


def test_qwen2_moe_without_a_shared_expert_is_refused_when_mixtral_fits(tmp_path):
    ours = _moe_model(shared_expert=False, renormalize=True)
    with pytest.raises(NexusError, match="no shared expert.*zero-width.*--format mixtral"):
        export_hf(ours, tmp_path / "hf", fmt="qwen2_moe")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# bad input on import


@pytest.fixture
def qwen_moe_dir(tmp_path) -> Path:
    return export_hf(_moe_model(), tmp_path / "hf", fmt="qwen2_moe")


def _edit_config(hf_dir: Path, **changes) -> None:
    doc = json.loads((hf_dir / "config.json").read_text())
    doc.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(doc))


def test_config_disagreeing_with_tensors(qwen_moe_dir):
    _edit_config(qwen_moe_dir, num_experts=8)
    with pytest.raises(
        NexusError, match=r"'model\.layers\.0\.mlp\.gate\.weight' has shape \(4, 32\)"
    ):
        import_hf(qwen_moe_dir)
    _edit_config(qwen_moe_dir, num_experts=4, moe_intermediate_size=48)
    with pytest.raises(NexusError, match=r"experts\.0\.gate_proj\.weight' has shape \(64, 32\)"):
        import_hf(qwen_moe_dir)
    _edit_config(qwen_moe_dir, moe_intermediate_size=64, shared_expert_intermediate_size=0)
    with pytest.raises(NexusError, match=r"shared_expert\.gate_proj\.weight' has shape"):
        import_hf(qwen_moe_dir)
    _edit_config(qwen_moe_dir, shared_expert_intermediate_size=64, mlp_only_layers=[0])
    with pytest.raises(NexusError, match=r"MoE layers \[1\] cannot be expressed"):
        import_hf(qwen_moe_dir)
    _edit_config(qwen_moe_dir, mlp_only_layers=[1])
    with pytest.raises(NexusError, match=r"'model\.layers\.1\.mlp\.gate_proj\.weight' is missing"):
        import_hf(qwen_moe_dir)


def test_missing_and_unexpected_expert_tensors(qwen_moe_dir):
    weights = load_file(qwen_moe_dir / "model.safetensors")
    extra = weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(weights, qwen_moe_dir / "model.safetensors")
    with pytest.raises(NexusError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        import_hf(qwen_moe_dir)
    weights["model.layers.1.mlp.experts.3.up_proj.weight"] = extra
    weights["model.layers.1.mlp.experts.4.up_proj.weight"] = extra.clone()
    save_file(weights, qwen_moe_dir / "model.safetensors")
    with pytest.raises(NexusError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.4"):
        import_hf(qwen_moe_dir)


def test_nonzero_padding_bias_is_refused(qwen_moe_dir):
    """The export wrote zero q/k/v biases for a model without any; non-zero ones cannot be
    dropped."""
    weights = load_file(qwen_moe_dir / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.bias"][0] = 0.5
    save_file(weights, qwen_moe_dir / "model.safetensors")
    with pytest.raises(
        NexusError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias' is non-zero"
    ):
        import_hf(qwen_moe_dir)


# --------------------------------------------------------------------------------------------
# the export folder: model card, tokenizer, shards


def test_export_from_checkpoint_writes_model_card(tmp_path):
    ours = _moe_model(router="nexus", top_k=1)
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    metadata = {"stage": "upcycle", "method": "nexus", "inputs": ["seed", "law", "code"]}
    ckpt = save_checkpoint(tmp_path / "ckpt", ours, tokenizer_path=tokenizer, metadata=metadata)
    hf_dir = export_hf(ckpt, tmp_path / "hf", fmt="qwen2_moe", max_shard_size=40_000)
    names = sorted(p.name for p in hf_dir.iterdir())
    assert {"README.md", "config.json", "generation_config.json", "tokenizer.json"} <= set(names)
    assert "model.safetensors.index.json" in names and not (hf_dir / "model.safetensors").exists()
    card = (hf_dir / "README.md").read_text()
    for expected in ("Qwen2MoeForCausalLM", "top-1", "Nexus", "| 1 | code |", "**method**: nexus"):
        assert expected in card, expected
    assert _max_diff(ours, _load_hf(hf_dir), _ids()) <= TOL
    model, _ = load_checkpoint(ckpt)
    back = import_hf(hf_dir, tmp_path / "back")
    back_model, back_meta = load_checkpoint(back)
    assert back_meta["hf_model_type"] == "qwen2_moe"
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back_model(ids).logits)


# --------------------------------------------------------------------------------------------
# upcycling straight from Hugging Face folders to a Hugging Face MoE


def _dense_hf_inputs(tmp_path: Path, names: list[str]) -> list[Path]:
    """Random dense Llama folders sharing one tokenizer (every tensor differs between them)."""
    tok = _tokenizer_file(tmp_path / "tokenizer.json")
    folders = []
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = Transformer(tiny_config(vocab_size=VOCAB))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        folders.append(export_hf(model, tmp_path / "hf" / name, fmt="llama", tokenizer_path=tok))
    return folders


@pytest.mark.parametrize(
    "method,fmt,via_cli",
    [
        ("moe-linear", "qwen2_moe", True),
        ("nexus-paper", "qwen2_moe", False),
        ("btx", "mixtral", False),
        ("btm", "llama", False),
    ],
)
def test_direct_upcycle_equals_import_upcycle_export(tmp_path, method, fmt, via_cli):
    """Dense HF folders -> upcycle --format fmt gives the folder that importing them, upcycling
    the native checkpoints and exporting the result gives (same tensors, bit for bit)."""
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.upcycle import upcycle

    domains = ["legal", "code"]
    hf = _dense_hf_inputs(tmp_path, ["seed", *domains])
    emb = None
    if method == "nexus-paper":
        vectors = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
        emb = DomainEmbeddings(domains, vectors, embedder="test", dim=8, num_chunks=4)
    direct = tmp_path / "direct"
    if via_cli:
        cmd = [sys.executable, "-m", "nexus_moe.cli", "upcycle", "--method", method]
        cmd += ["--seed", str(hf[0]), "--out", str(direct), "--format", fmt]
        cmd += [arg for p in hf[1:] for arg in ("--expert", str(p))]
        cmd += ["--domains", ",".join(domains)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    else:
        upcycle(
            method, hf[0], hf[1:], direct, domain_embeddings=emb, domains=domains, out_format=fmt
        )

    native = [import_hf(p, tmp_path / "native" / p.name) for p in hf]
    moe = upcycle(method, native[0], native[1:], tmp_path / "moe", emb, domains=domains)
    reference = export_hf(moe, tmp_path / "reference", fmt=fmt)

    files = sorted(p.name for p in direct.iterdir())
    assert files == sorted(p.name for p in reference.iterdir())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (direct / name).read_bytes() == (reference / name).read_bytes(), name
    got, want = load_file(direct / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if fmt != "llama":
        card = (direct / "README.md").read_text()
        assert method in card and hf[1].name in card and str(hf[1]) not in card  # file names only


def test_direct_upcycle_refuses_bad_hf_inputs(tmp_path):
    from nexus_moe.upcycle import upcycle

    hf = _dense_hf_inputs(tmp_path, ["seed", "a"])
    with pytest.raises(NexusError, match="names no 'domain'.*--domains"):
        upcycle("moe-linear", hf[0], hf[1:], tmp_path / "out", out_format="qwen2_moe")
    moe_dir = export_hf(_moe_model(), tmp_path / "moe_hf", fmt="qwen2_moe")
    with pytest.raises(NexusError, match="is an MoE; a dense model is needed"):
        upcycle("moe-linear", hf[0], [moe_dir], tmp_path / "out", domains=["a"])
    with pytest.raises(NexusError, match="AC model cannot be exported"):
        upcycle(
            "moe-linear", hf[0], hf[1:], tmp_path / "out", domains=["a"],
            moe_overrides={"router": "ac", "ac_base": "linear"}, out_format="qwen2_moe",
        )  # fmt: skip
    with pytest.raises(NexusError, match="shared_expert_gate comes from importing"):
        upcycle(
            "moe-linear", hf[0], hf[1:], tmp_path / "out", domains=["a"],
            moe_overrides={"shared_expert_gate": True}, out_format="qwen2_moe",
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_direct_upcycle_names_an_unknown_format(tmp_path):
    from nexus_moe.upcycle import upcycle

    hf = _dense_hf_inputs(tmp_path, ["seed", "a"])
    with pytest.raises(NexusError, match="output format 'qwen2moe' is unknown.*qwen2_moe"):
        upcycle("moe-linear", hf[0], hf[1:], tmp_path / "o", domains=["a"], out_format="qwen2moe")


def test_cli_export_and_upcycle_write_bf16_shards_with_an_index(tmp_path):
    """--dtype and --max-shard-size on `export` and `upcycle --format`; auto says its choice."""
    ours = _moe_model(shared_expert=False, renormalize=True)
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    ckpt = save_checkpoint(tmp_path / "ckpt", ours, tokenizer_path=tokenizer)
    cli = [sys.executable, "-m", "nexus_moe.cli"]
    out = tmp_path / "hf"
    args = ["export", str(ckpt), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "40KB"]
    result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--format auto chose mixtral" in " ".join(result.stdout.split())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    back = import_hf(out)  # every weight is ours rounded to bf16, nothing else
    for name, tensor in model_state_dict(back).items():
        assert torch.equal(tensor, model_state_dict(ours)[name].to(torch.bfloat16).float()), name

    hf_in = _dense_hf_inputs(tmp_path, ["seed", "a", "b"])
    direct = tmp_path / "direct"
    args = ["upcycle", "--method", "btx", "--seed", str(hf_in[0]), "--out", str(direct)]
    args += ["--expert", str(hf_in[1]), "--expert", str(hf_in[2]), "--domains", "a,b"]
    args += ["--format", "mixtral", "--dtype", "fp16", "--max-shard-size", "30KB"]
    result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (direct / "model.safetensors.index.json").is_file()
    weights = {}
    for shard in direct.glob("*.safetensors"):
        weights.update(load_file(shard))
    assert {t.dtype for t in weights.values()} == {torch.float16}

    args = ["upcycle", "--method", "btx", "--seed", str(hf_in[0]), "--out", str(tmp_path / "n")]
    args += ["--expert", str(hf_in[1]), "--domains", "a", "--dtype", "bf16"]
    result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--dtype and --max-shard-size apply to a Hugging" in (
        " ".join(result.stderr.split())
    )
    bad = ["export", str(ckpt), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]
    result = subprocess.run([*cli, *bad], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--max-shard-size 'lots'" in result.stderr
