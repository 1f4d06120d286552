"""A MoE that routes on context (``router_context`` > 0) exported for ``transformers``: the
folder runs the format's model with our modeling module (``trust_remote_code=True``), with the
logits and the KV-cache generation of nexus-moe, and imports back to the same model."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from conftest import tiny_bpe_file, tiny_config
from nexus_moe.checkpoint import model_state_dict, save_checkpoint
from nexus_moe.config import MoEConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf import export_hf, import_hf
from nexus_moe.model import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 300
CONTEXT = 0.75
TEXT = [
    "The mixture of experts routes every token to the experts whose domain it belongs to.",
    "A dense model is upcycled into a sparse one: its feed-forward layers become experts.",
    "Legal text, source code and recipes make three very different domains of data.",
]
PROMPT = "The router sends legal text and source code to different experts."
# One MoE per format, each with what only that format expresses.
SETTINGS = {
    "mixtral": dict(router="nexus", shared_expert=False, top_k=2, renormalize=True),
    "qwen2_moe": dict(router="nexus", top_k=1, moe_every=2, num_layers=3),
    "qwen3_moe": dict(router="linear", shared_expert=False, top_k=2, qk_norm=True),
}


def _moe(
    router: str = "linear",
    shared_expert: bool = True,
    top_k: int = 2,
    renormalize: bool = False,
    moe_every: int = 1,
    num_layers: int = 2,
    context: float = CONTEXT,
    **overrides,
) -> Transformer:
    """A tiny MoE routing on ``context``, every weight randomised."""
    moe = MoEConfig(
        num_experts=4,
        top_k=top_k,
        router=router,
        shared_expert=shared_expert,
        renormalize=renormalize,
        moe_every=moe_every,
        router_context=context,
        domain_embedding_dim=16,
        nexus_hidden_size=8,
        domains=["law", "code", "recipes", "news"],
    )
    cfg = tiny_config(
        moe=moe, vocab_size=VOCAB, num_layers=num_layers, max_seq_len=128, **overrides
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(
                (1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(param)
            )
        for name, buffer in model.named_buffers():
            if name.endswith("domain_embeddings"):
                buffer.copy_(torch.randn_like(buffer))
    return model.eval()


def _load(hf_dir: Path, attn: str = "sdpa"):
    """transformers' model for ``hf_dir`` with its remote code; no tensor missing or left over."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir,
        trust_remote_code=True,
        dtype=torch.float32,
        attn_implementation=attn,
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{hf_dir}: {problems}"
    model.generation_config.eos_token_id = None  # ours generates without stopping, too
    model.generation_config.pad_token_id = 0
    return model.eval()


def _logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Transformer, Path]:
    """A context MoE and its Mixtral export (read-only for the tests that share it)."""
    torch.manual_seed(1)
    ours = _moe(**SETTINGS["mixtral"])
    return ours, export_hf(ours, tmp_path_factory.mktemp("mixtral") / "hf", fmt="mixtral")


# --------------------------------------------------------------------------------------------
# the export runs in transformers as it runs here


@pytest.mark.parametrize("fmt", list(SETTINGS))
def test_checkpoint_export_matches_ours_in_transformers(tmp_path, fmt):
    """The CLI's path (a checkpoint directory, streamed): the folder declares the remote code,
    and transformers gives our logits (eager and sdpa) and our greedy KV-cache generation."""
    ours = _moe(**SETTINGS[fmt])
    tokenizer = tiny_bpe_file(tmp_path / "tokenizer.json", TEXT * 10, VOCAB)
    ckpt = save_checkpoint(tmp_path / "ckpt", ours, tokenizer_path=tokenizer)
    hf_dir = export_hf(ckpt, tmp_path / "hf", fmt=fmt)

    doc = json.loads((hf_dir / "config.json").read_text())
    arch = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}[fmt]
    assert doc["model_type"] == f"nexus_context_{fmt}"
    assert doc["architectures"] == [f"NexusContext{arch}ForCausalLM"]
    assert doc["auto_map"] == {
        "AutoConfig": f"modeling_nexus_context.NexusContext{arch}Config",
        "AutoModelForCausalLM": f"modeling_nexus_context.NexusContext{arch}ForCausalLM",
    }
    assert doc["router_context"] == CONTEXT
    module = resources.files("nexus_moe.hf.remote").joinpath("modeling_nexus_context.py")
    assert (hf_dir / "modeling_nexus_context.py").read_text() == module.read_text()
    card = (hf_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and f"c = {CONTEXT:g}" in card

    from tokenizers import Tokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    ids = torch.tensor([Tokenizer.from_file(str(tokenizer)).encode(PROMPT).ids])
    assert hf_tok(PROMPT).input_ids == ids[0].tolist()
    for attn in ("eager", "sdpa"):
        hf = _load(hf_dir, attn)
        diff = (_logits(ours, ids) - _logits(hf, ids)).abs().max().item()
        assert diff <= TOL, f"{fmt} {attn}: max |diff| {diff:.2e}"
    # The router does score the context: the same weights routed per token differ.
    ours.cfg.moe.router_context = 0.0
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max().item() > 100 * TOL
    ours.cfg.moe.router_context = CONTEXT

    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=10), theirs)


def test_incremental_decoding_equals_full_recompute(mixtral):
    """Prefill in chunks, then token by token with the cache, gives the logits of one pass
    without a cache (transformers) and of our model."""
    ours, hf_dir = mixtral
    hf = _load(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 20))
    full = _logits(hf, ids, use_cache=False)
    assert (full - _logits(ours, ids)).abs().max().item() <= TOL
    cache = transformers.DynamicCache(config=hf.config)
    pieces, start = [], 0
    for size in (7, 5, 1, 1, 3, 1, 1, 1):
        pieces.append(_logits(hf, ids[:, start : start + size], cache=cache, use_cache=True))
        start += size
    assert start == ids.shape[1] and cache.get_seq_length() == start
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL
    # A reset cache starts a new text.
    cache.reset()
    again = _logits(hf, ids[:, :9], cache=cache, use_cache=True)
    assert (again - full[:, :9]).abs().max().item() <= TOL


def test_beam_search_reorders_the_running_sums(mixtral):
    _, hf_dir = mixtral
    hf = _load(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        cached = hf.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        recomputed = hf.generate(
            ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, recomputed)


def test_left_padding_is_left_out_of_the_running_mean(mixtral):
    """A left-padded batch gives each row what our model gives that row alone."""
    ours, hf_dir = mixtral
    hf = _load(hf_dir)
    long, short = torch.randint(0, VOCAB, (1, 16)), torch.randint(0, VOCAB, (1, 9))
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    logits = _logits(hf, batch, attention_mask=mask)
    assert (logits[0] - _logits(ours, long)[0]).abs().max().item() <= TOL
    assert (logits[1, pad:] - _logits(ours, short)[0]).abs().max().item() <= TOL
    with torch.no_grad():
        theirs = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(theirs[0, -8:], ours.generate(long, max_new_tokens=8)[0, -8:])
    assert torch.equal(theirs[1, -8:], ours.generate(short, max_new_tokens=8)[0, -8:])


def test_a_cache_this_model_did_not_fill_is_refused(mixtral):
    """A cropped cache (assisted decoding) lost tokens whose sums cannot be taken back."""
    _, hf_dir = mixtral
    hf = _load(hf_dir)
    ids = torch.randint(0, VOCAB, (1, 10))
    cache = transformers.DynamicCache(config=hf.config)
    _logits(hf, ids, cache=cache, use_cache=True)
    cache.crop(-3)
    with pytest.raises(ValueError, match=r"holds 7 positions.*routed 10 of them.*cropped"):
        _logits(hf, ids[:, :1], cache=cache, use_cache=True)


def test_loading_without_trust_remote_code_fails_with_transformers_message(mixtral):
    """transformers refuses the folder rather than run the format's per-token router."""
    _, hf_dir = mixtral
    for trust in (False, None):
        with pytest.raises(ValueError, match=r"(?s)contains custom code.*`trust_remote_code=True`"):
            transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=trust)


# --------------------------------------------------------------------------------------------
# import, the per-token export, bad config.json


def test_import_gives_back_the_context_router(mixtral):
    ours, hf_dir = mixtral
    back = import_hf(hf_dir)
    assert back.cfg.moe.router_context == CONTEXT and back.cfg.moe.router == "linear"
    assert back.cfg.moe.domains == ours.cfg.moe.domains
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(_logits(back, ids), _logits(ours, ids))
    assert torch.equal(back.generate(ids, 6), ours.generate(ids, 6))


def test_bad_router_context_is_refused_on_import_and_load(tmp_path, mixtral):
    _, hf_dir = mixtral
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in hf_dir.iterdir():
        (edited / path.name).write_bytes(path.read_bytes())
    doc = json.loads((edited / "config.json").read_text())
    doc["router_context"] = 1.5
    (edited / "config.json").write_text(json.dumps(doc))
    with pytest.raises(NexusError, match=r"config\.json: 'router_context' must be a number in"):
        import_hf(edited)
    with pytest.raises(ValueError, match=r"'router_context' must be a number in \(0, 1\]"):
        transformers.AutoModelForCausalLM.from_pretrained(edited, trust_remote_code=True)


def test_per_token_export_is_unchanged(tmp_path):
    """router_context = 0: the format's own model, no remote code."""
    ours = _moe(**SETTINGS["mixtral"], context=0.0)
    hf_dir = export_hf(ours, tmp_path / "hf")
    doc = json.loads((hf_dir / "config.json").read_text())
    assert doc["model_type"] == "mixtral" and doc["architectures"] == ["MixtralForCausalLM"]
    assert "auto_map" not in doc and "router_context" not in doc
    assert not list(hf_dir.glob("*.py"))
    assert "trust_remote_code" not in (hf_dir / "README.md").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 16))
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max().item() <= TOL
    back = import_hf(hf_dir)
    assert back.cfg.moe.router_context == 0.0
    _ = model_state_dict(back)


def test_the_remote_module_names_the_transformers_it_needs(monkeypatch):
    """Under transformers 4 (no ``MixtralTopKRouter``) the folder's module says which
    transformers it needs, not a bare 'cannot import name'."""
    import importlib.util
    import sys
    import types

    path = resources.files("nexus_moe.hf.remote") / "modeling_nexus_context.py"
    old = types.ModuleType("transformers.models.mixtral.modeling_mixtral")  # 4.x: no router class
    old.MixtralForCausalLM = old.MixtralSparseMoeBlock = object
    monkeypatch.setitem(sys.modules, "transformers.models.mixtral.modeling_mixtral", old)
    spec = importlib.util.spec_from_file_location("nexus_context_under_test", str(path))
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"needs transformers 5 .*pip install"):
        spec.loader.exec_module(module)
