"""Upcycling (docs/design.md §5): each method's output is checked against what it must reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from nexus_moe.checkpoint import (
    load_checkpoint,
    load_config,
    read_safetensors,
    save_checkpoint,
    weights_hash,
    write_checkpoint,
)
from nexus_moe.config import ModelConfig, MoEConfig
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import file_sha256
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.safetensors_io import TensorSpec, write_safetensors
from nexus_moe.upcycle import upcycle

DOMAINS = ["legal", "code", "bio"]
PROJ = ("gate_proj", "up_proj", "down_proj")


def dense_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    return path


def make_dense(
    path: Path,
    tokenizer: Path,
    seed: int,
    domain: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """A random dense model; every tensor (norms included) differs between seeds."""
    torch.manual_seed(seed)
    model = Transformer(dense_config(**overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    metadata = {"stage": "branch", "domain": domain} if domain else {"stage": "seed"}
    save_checkpoint(path, model.to(dtype), tokenizer_path=tokenizer, metadata=metadata)
    return path


@pytest.fixture
def inputs(tmp_path: Path, tokenizer: Path) -> tuple[Path, list[Path]]:
    seed = make_dense(tmp_path / "seed", tokenizer, 0)
    experts = [
        make_dense(tmp_path / "experts" / d, tokenizer, i + 1, d) for i, d in enumerate(DOMAINS)
    ]
    return seed, experts


def embeddings(names: list[str], dim: int = 16) -> DomainEmbeddings:
    gen = torch.Generator().manual_seed(123)
    vectors = torch.randn(len(names), dim, generator=gen)
    return DomainEmbeddings(names, vectors, embedder="test-embedder", dim=dim, num_chunks=8)


def logits(ckpt: Path, ids: torch.Tensor, train: bool = False) -> torch.Tensor:
    model, _ = load_checkpoint(ckpt)
    model.train(train)
    with torch.no_grad():
        return model(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def float32_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The reference average: float32 sum in input order, divided by n, cast back."""
    return (sum(t.float() for t in tensors) / len(tensors)).to(tensors[0].dtype)


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------
# each method reproduces what it must


@pytest.mark.parametrize("tie", [False, True])
def test_sparse_upcycle_reproduces_seed(tmp_path, tokenizer, tie):
    seed = make_dense(tmp_path / "seed", tokenizer, 0, tie_embeddings=tie)
    out = upcycle("sparse-upcycle", seed, [], tmp_path / "moe", num_experts=4)
    cfg, meta = load_config(out)
    assert cfg.moe is not None
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.shared_expert) == (4, 2, False)
    assert cfg.moe.renormalize and cfg.moe.router == "linear"
    assert meta["method"] == "sparse-upcycle" and meta["stage"] == "upcycle"
    diff = max_diff(logits(out, IDS), logits(seed, IDS))
    assert diff <= 1e-5, diff


def test_btm_one_expert_is_that_expert_two_is_the_average(tmp_path, inputs):
    seed, experts = inputs
    one = upcycle("btm", seed, experts[:1], tmp_path / "btm1")
    assert load_config(one)[0].moe is None
    want = read_safetensors(experts[0] / "model.safetensors")
    got = read_safetensors(one / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name

    two = upcycle("btm", seed, experts[:2], tmp_path / "btm2")
    parts = [read_safetensors(e / "model.safetensors") for e in experts[:2]]
    got = read_safetensors(two / "model.safetensors")
    for name in want:
        assert torch.equal(got[name], float32_mean([p[name] for p in parts])), name
    assert (two / "tokenizer.json").read_bytes() == (seed / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("order", [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0)])
def test_mean_of_partly_equal_inputs_is_the_float32_sum_in_input_order(tmp_path, tokenizer, order):
    """The sum starts only at the first input that differs from the first one (to save
    memory); the mean is still the float32 sum in input order, and equal inputs give
    themselves bit for bit."""
    seed = make_dense(tmp_path / "seed", tokenizer, 0)
    made = [make_dense(tmp_path / f"e{i}", tokenizer, 1 + k, f"d{i}") for i, k in enumerate(order)]
    out = upcycle("btm", seed, made, tmp_path / "btm")
    parts = [read_safetensors(e / "model.safetensors") for e in made]
    got = read_safetensors(out / "model.safetensors")
    for name, tensor in got.items():
        want = parts[0][name] if order == (0, 0, 0) else float32_mean([p[name] for p in parts])
        assert torch.equal(tensor, want), name


def test_btx_of_one_expert_reproduces_it(tmp_path, inputs):
    seed, experts = inputs
    out = upcycle("btx", seed, experts[:1], tmp_path / "btx", moe_overrides={"top_k": 1})
    diff = max_diff(logits(out, IDS), logits(experts[0], IDS))
    assert diff <= 1e-5, diff


def test_btx_defaults_and_seed_as_expert(tmp_path, inputs):
    seed, experts = inputs
    out = upcycle("btx", seed, experts, tmp_path / "btx", btx_include_seed=True)
    cfg, meta = load_config(out)
    assert cfg.moe is not None
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.shared_expert) == (4, 2, False)
    assert cfg.moe.domains == [*DOMAINS, "seed"] and meta["domains"] == cfg.moe.domains
    state = read_safetensors(out / "model.safetensors")
    seed_state = read_safetensors(seed / "model.safetensors")
    for proj in PROJ:
        assert torch.equal(
            state[f"model.layers.1.mlp.experts.{proj}"][3],
            seed_state[f"model.layers.1.mlp.{proj}.weight"],
        )


ROUTERS = [
    {"router": "linear"},
    {"router": "nexus"},
    {"router": "ac", "ac_base": "linear"},
    {"router": "ac", "ac_base": "nexus"},
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: "-".join(r.values()))
def test_identical_experts_equal_the_dense_model(tmp_path, tokenizer, router):
    dense = make_dense(tmp_path / "dense", tokenizer, 5, "any")
    names = ["a", "b", "c"]
    out = upcycle(
        "btx",
        dense,
        [dense] * 3,
        tmp_path / "moe",
        domains=names,
        domain_embeddings=embeddings(names),
        moe_overrides={**router, "top_k": 2, "renormalize": True},
    )
    cfg, _ = load_config(out)
    assert cfg.moe is not None and cfg.moe.router == router["router"]
    want = logits(dense, IDS)
    for train in (False, True):  # AC uses batch statistics in training, running ones in eval
        diff = max_diff(logits(out, IDS, train=train), want)
        assert diff <= 1e-5, (train, diff)


@pytest.mark.parametrize("method", ["moe-linear", "nexus-paper"])
def test_shared_expert_layout(tmp_path, inputs, method):
    seed, experts = inputs
    emb = embeddings([*DOMAINS, "unused"])
    out = upcycle(method, seed, experts, tmp_path / "moe", domain_embeddings=emb)
    cfg, meta = load_config(out)
    moe = cfg.moe
    assert moe is not None
    assert (moe.num_experts, moe.top_k, moe.shared_expert, moe.renormalize) == (3, 1, True, False)
    assert moe.router == ("nexus" if method == "nexus-paper" else "linear")
    assert moe.domains == DOMAINS and meta["domains"] == DOMAINS
    assert meta["inputs"] == [str(seed), *map(str, experts)]

    model, _ = load_checkpoint(out)
    state = model.state_dict()
    seed_state = read_safetensors(seed / "model.safetensors")
    parts = [read_safetensors(e / "model.safetensors") for e in experts]
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.mlp"
        for proj in PROJ:
            dense = f"{prefix}.{proj}.weight"
            shared = state[f"{prefix}.shared_expert.{proj}.weight"]
            assert torch.equal(shared, seed_state[dense])
            stacked = state[f"{prefix}.experts.{proj}"]
            assert stacked.shape == (3, *seed_state[dense].shape)
            for e, part in enumerate(parts):
                assert torch.equal(stacked[e], part[dense])
        if method == "nexus-paper":
            assert torch.equal(state[f"{prefix}.router.domain_embeddings"], emb.get(DOMAINS))
            assert state[f"{prefix}.router.w1.weight"].shape == (2 * moe.nexus_hidden_size, 16)
        else:
            assert state[f"{prefix}.router.weight"].shape == (3, cfg.hidden_size)
    for name in seed_state:
        if ".mlp." not in name:  # attention, norms, embeddings: float32 mean of the experts
            assert torch.equal(state[name], float32_mean([p[name] for p in parts])), name
    if method == "nexus-paper":
        assert (moe.embedder, moe.domain_embedding_dim) == ("test-embedder", 16)


def test_ac_on_nexus_layout(tmp_path, inputs):
    seed, experts = inputs
    emb = embeddings(DOMAINS)
    overrides = {"router": "ac", "ac_base": "nexus", "load_balance_weight": 0.01}
    out = upcycle("nexus-paper", seed, experts, tmp_path / "moe", emb, moe_overrides=overrides)
    cfg, _ = load_config(out)
    assert cfg.moe is not None and cfg.moe.load_balance_weight == 0.01
    state = read_safetensors(out / "model.safetensors")
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.mlp.router"
        assert torch.equal(state[f"{prefix}.base.domain_embeddings"], emb.get(DOMAINS))
        assert torch.equal(state[f"{prefix}.running_weights"], torch.ones(3, cfg.hidden_size))


def test_moe_every_other_layer_averages_the_dense_ffn(tmp_path, inputs):
    seed, experts = inputs
    out = upcycle("moe-linear", seed, experts, tmp_path / "moe", moe_overrides={"moe_every": 2})
    state = read_safetensors(out / "model.safetensors")
    parts = [read_safetensors(e / "model.safetensors") for e in experts]
    name = "model.layers.1.mlp.up_proj.weight"  # layer 1 stays dense
    assert torch.equal(state[name], float32_mean([p[name] for p in parts]))
    assert "model.layers.0.mlp.experts.up_proj" in state


def test_router_init_is_seeded_and_leaves_global_rng_alone(tmp_path, inputs):
    seed, experts = inputs
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = upcycle("moe-linear", seed, experts, tmp_path / "a", seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = upcycle("moe-linear", seed, experts, tmp_path / "b", seed=1)
    c = upcycle("moe-linear", seed, experts, tmp_path / "c", seed=2)
    ra, rb, rc = (read_safetensors(p / "model.safetensors") for p in (a, b, c))
    name0, name1 = "model.layers.0.mlp.router.weight", "model.layers.1.mlp.router.weight"
    assert torch.equal(ra[name0], rb[name0]) and not torch.equal(ra[name0], rc[name0])
    assert not torch.equal(ra[name0], ra[name1])  # layers get different rows
    assert abs(ra[name0].std().item() - 0.02) < 0.005


# --------------------------------------------------------------------------------------------
# the streamed file equals a naive in-memory construction


def naive_nexus_state(seed: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """Everything but the random router, built from fully loaded models."""
    seed_model, _ = load_checkpoint(seed)
    seed_state = seed_model.state_dict()
    parts = [load_checkpoint(e)[0].state_dict() for e in experts]
    state = {}
    for name in seed_state:
        if ".mlp." in name:
            prefix, proj = name.rsplit(".mlp.", 1)
            proj = proj.removesuffix(".weight")
            state[f"{prefix}.mlp.shared_expert.{proj}.weight"] = seed_state[name]
            state[f"{prefix}.mlp.experts.{proj}"] = torch.stack([p[name] for p in parts])
        else:
            state[name] = float32_mean([p[name] for p in parts])
    return state


def test_streamed_output_equals_naive_construction(tmp_path, inputs):
    seed, experts = inputs
    emb = embeddings(DOMAINS)
    out = upcycle("nexus-paper", seed, experts, tmp_path / "moe", domain_embeddings=emb)
    naive = naive_nexus_state(seed, experts)
    on_disk = read_safetensors(out / "model.safetensors")
    model, _ = load_checkpoint(out)
    loaded = model.state_dict()
    assert set(on_disk) == set(loaded)
    for name, want in naive.items():
        assert torch.equal(on_disk[name], want), name
        assert torch.equal(loaded[name], want), name
    router_names = {n for n in on_disk if ".router." in n}
    assert set(on_disk) == set(naive) | router_names
    for name in router_names:
        assert torch.equal(loaded[name], on_disk[name])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".moe*"))  # no temporary directory left behind


def test_streaming_writer_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    bf16 = torch.randn(3, 5, 7, generator=gen).to(torch.bfloat16)  # odd sizes: alignment
    f32 = torch.randn(4, 3, generator=gen)
    i64 = torch.arange(5)
    specs = [
        TensorSpec("a.f32", torch.float32, (4, 3), lambda: [f32]),
        TensorSpec("b.stacked", torch.bfloat16, (3, 5, 7), lambda: iter(bf16.unbind(0))),
        TensorSpec("c.int", torch.int64, (5,), lambda: [i64]),
    ]
    path = tmp_path / "w.safetensors"
    write_safetensors(path, specs, metadata={"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert torch.equal(got["a.f32"], f32) and torch.equal(got["c.int"], i64)
    assert got["b.stacked"].dtype == torch.bfloat16 and torch.equal(got["b.stacked"], bf16)
    bad = [TensorSpec("x", torch.float32, (4,), lambda: [torch.zeros(3)])]
    with pytest.raises(ValueError, match="expected 16"):
        write_safetensors(tmp_path / "bad.safetensors", bad)


def test_bf16_inputs(tmp_path, tokenizer):
    seed = make_dense(tmp_path / "seed", tokenizer, 0, dtype=torch.bfloat16)
    experts = [
        make_dense(tmp_path / d, tokenizer, i + 1, d, dtype=torch.bfloat16)
        for i, d in enumerate(DOMAINS[:2])
    ]
    out = upcycle("nexus-paper", seed, experts, tmp_path / "moe", embeddings(DOMAINS[:2]))
    state = read_safetensors(out / "model.safetensors")
    parts = [read_safetensors(e / "model.safetensors") for e in experts]
    assert state["model.layers.0.mlp.experts.up_proj"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.router.w1.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.router.domain_embeddings"].dtype == torch.float32
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[name], float32_mean([p[name] for p in parts]))
    assert torch.equal(
        state["model.layers.1.mlp.experts.down_proj"][1],
        parts[1]["model.layers.1.mlp.down_proj.weight"],
    )
    btx = upcycle("btx", seed, experts[:1], tmp_path / "btx")
    diff = max_diff(logits(btx, IDS), logits(experts[0], IDS))
    assert diff <= 1e-5, diff


# --------------------------------------------------------------------------------------------
# bad input


def test_mismatched_inputs_are_refused(tmp_path, inputs, tokenizer):
    seed, experts = inputs
    out = tmp_path / "out"

    def refused(match: str, *args, **kwargs) -> None:
        with pytest.raises(NexusError, match=match):
            upcycle(*args, **kwargs)
        assert not out.exists()

    wide = make_dense(tmp_path / "wide", tokenizer, 9, "wide", hidden_size=64)
    refused(rf"{wide}: hidden_size=64 but seed has 32", "btx", seed, [experts[0], wide], out)

    other_tok = tmp_path / "other_tokenizer.json"
    other_tok.write_text('{"different": true}')
    odd = make_dense(tmp_path / "odd_tok", other_tok, 9, "odd")
    refused(rf"{odd}: tokenizer.json differs", "moe-linear", seed, [experts[0], odd], out)

    moe = upcycle("moe-linear", seed, experts[:2], tmp_path / "already_moe")
    refused(r"already_moe: is an MoE checkpoint", "btx", seed, [experts[0], moe], out)
    refused(r"already_moe: is an MoE checkpoint", "btx", moe, experts, out)

    refused(r"no domain embedding for domain 'bio'", "nexus-paper", seed, experts, out,
            domain_embeddings=embeddings(["legal", "code"]))  # fmt: skip
    refused(r"needs domain embeddings", "nexus-paper", seed, experts, out)
    refused(r"needs at least one dense expert", "btx", seed, [], out)
    refused(r"domain 'legal' is already used", "btx", seed, experts[:2], out,
            domains=["legal", "legal"])  # fmt: skip
    refused(r"unknown upcycling method 'moe'", "moe", seed, experts, out)
    refused(r"unknown key 'moe.topk'", "btx", seed, experts, out, moe_overrides={"topk": 2})
    refused(r"moe.num_experts is set by upcycling", "btx", seed, experts, out,
            moe_overrides={"num_experts": 8})  # fmt: skip
    refused(r"takes no expert checkpoints", "sparse-upcycle", seed, experts, out)

    weights = experts[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(r"bio/model.safetensors: cannot read weights .* corrupt or truncated", "btx", seed,
            experts, out)  # fmt: skip
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # holds no tensor
    refused(r"bio/model.safetensors: missing tensor", "btx", seed, experts, out)


def test_failed_upcycle_keeps_existing_output(tmp_path, inputs):
    seed, experts = inputs
    out = upcycle("btm", seed, experts, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NexusError):
        upcycle("nexus-paper", seed, experts, out)  # no embeddings
    assert (out / "model.safetensors").read_bytes() == before


def test_streamed_checkpoints_record_the_hash_of_their_final_weights(tmp_path, inputs):
    seed, experts = inputs
    out = upcycle("btx", seed, experts, tmp_path / "moe")
    doc = json.loads((out / "config.json").read_text())
    assert doc["weights_sha256"] == file_sha256(out / "model.safetensors") == weights_hash(out)

    # A finishing step that rewrites the weights before publishing (as router calibration
    # does) leaves the recorded hash that of the weights on disk.
    cfg, meta = load_config(seed)
    state = read_safetensors(seed / "model.safetensors")
    specs = [
        TensorSpec(name, t.dtype, tuple(t.shape), lambda t=t: [t]) for name, t in state.items()
    ]

    def finish(folder: Path) -> None:
        changed = read_safetensors(folder / "model.safetensors")
        changed["model.norm.weight"] = changed["model.norm.weight"] + 1.0
        save_file(changed, str(folder / "model.safetensors"))

    written = write_checkpoint(tmp_path / "finished", cfg, specs, meta, finish=finish)
    doc = json.loads((written / "config.json").read_text())
    assert doc["weights_sha256"] == file_sha256(written / "model.safetensors")
    assert doc["weights_sha256"] != weights_hash(seed)
    model, _ = load_checkpoint(written)
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"] + 1.0)


# --------------------------------------------------------------------------------------------
# grouped dispatch (docs/design.md §3) against a per-token, per-expert loop


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    x_flat = x.reshape(-1, x.shape[-1])  # (N, H)
    probs = torch.softmax(layer.router(x_flat).float(), dim=-1)
    top_probs, top_idx = probs.topk(layer.top_k, dim=-1)
    if layer.cfg.renormalize:
        top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    experts = layer.experts
    rows = []
    for t in range(x_flat.shape[0]):
        y = torch.zeros_like(x_flat[t])
        for slot in range(layer.top_k):
            e = int(top_idx[t, slot])
            hidden = F.silu(experts.gate_proj[e] @ x_flat[t]) * (experts.up_proj[e] @ x_flat[t])
            y = y + top_probs[t, slot] * (experts.down_proj[e] @ hidden)
        if layer.shared_expert is not None:
            y = y + layer.shared_expert(x_flat[t])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("shared,renormalize", [(False, True), (True, False)])
def test_grouped_dispatch_matches_naive_loop(shared, renormalize):
    cfg = MoEConfig(
        num_experts=4, top_k=2, router="linear", shared_expert=shared, renormalize=renormalize
    )
    layer = MoELayer(cfg, hidden_size=16, intermediate_size=24, expert_intermediate_size=24)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(3, 7, 16, requires_grad=True)
    grad_out = torch.randn(3, 7, 16)

    fast, _ = layer(x)
    fast_grads = torch.autograd.grad((fast * grad_out).sum(), [x, *layer.parameters()])
    slow = naive_moe(layer, x)
    slow_grads = torch.autograd.grad((slow * grad_out).sum(), [x, *layer.parameters()])

    assert max_diff(fast, slow) <= 1e-5
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, fast_grads, slow_grads, strict=True):
        assert max_diff(a, b) <= 1e-5, name
