"""Hugging Face interop for dense models: logits parity with ``transformers``, through the same
converter users run (``import_hf`` / ``export_hf``), round trips, sharding, and bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_bpe_file, tiny_config
from nexus_moe.checkpoint import load_checkpoint, model_state_dict
from nexus_moe.errors import NexusError
from nexus_moe.hf import export_hf, import_hf
from nexus_moe.io_utils import OUTPUT_MARKER
from nexus_moe.model import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 300

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every weight (norms, biases included) off its init so a wrong mapping shows."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)


def _hf_model(model_type: str, tie: bool, **overrides):
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[model_type])
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tie,
    )
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    model = model_cls(config_cls(**kwargs))
    _perturb(model)
    return model.eval()


def _save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _hf_logits(path_or_model, ids: torch.Tensor, attn: str = "sdpa") -> torch.Tensor:
    model = path_or_model
    if isinstance(path_or_model, Path):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path_or_model, attn_implementation=attn, dtype=torch.float32
        ).eval()
    with torch.no_grad():
        return model(ids).logits


def _our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def _ids(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq))


def _tiny_ours(**overrides) -> Transformer:
    cfg = tiny_config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        max_seq_len=128,
        rope_theta=5000.0,
        **overrides,
    )
    model = Transformer(cfg)
    _perturb(model)
    return model.eval()


def _tokenizer_file(path: Path) -> Path:
    return tiny_bpe_file(path, ["hello world, the tokenizer of a tiny test model"] * 20, VOCAB)


# --------------------------------------------------------------------------------------------
# import: HF -> ours reproduces transformers' logits


@pytest.mark.parametrize(
    ("model_type", "tie"),
    [
        ("llama", False),
        ("llama", True),
        ("mistral", False),
        ("qwen2", False),
        ("qwen2", True),
        ("qwen3", False),
        ("qwen3", True),
    ],
)
def test_import_matches_transformers_logits(tmp_path, model_type, tie):
    hf_dir = _save_hf(_hf_model(model_type, tie), tmp_path / "hf")
    ours = import_hf(hf_dir)
    assert isinstance(ours, Transformer)
    assert ours.cfg.tie_embeddings == tie
    assert ours.cfg.attention_bias == (model_type == "qwen2")
    assert ours.cfg.qk_norm == (model_type == "qwen3")
    ids = _ids()
    logits = _our_logits(ours, ids)
    for attn in ("eager", "sdpa"):
        diff = (logits - _hf_logits(hf_dir, ids, attn)).abs().max().item()
        assert diff <= TOL, f"{model_type} tie={tie} {attn}: max |diff| {diff:.2e}"


def test_import_llama_with_attention_bias(tmp_path):
    hf = _hf_model("llama", False, attention_bias=True)
    with torch.no_grad():  # our o_proj has no bias: accepted only when it is zero
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    hf_dir = _save_hf(hf, tmp_path / "hf")
    ours = import_hf(hf_dir)
    assert ours.cfg.attention_bias
    ids = _ids()
    assert (_our_logits(ours, ids) - _hf_logits(hf, ids)).abs().max() <= TOL

    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias.fill_(0.1)
    _save_hf(hf, tmp_path / "hf_obias")
    with pytest.raises(NexusError, match=r"model\.layers\.1\.self_attn\.o_proj\.bias"):
        import_hf(tmp_path / "hf_obias")


def test_import_writes_native_checkpoint_with_tokenizer(tmp_path):
    hf_dir = _save_hf(_hf_model("qwen2", True), tmp_path / "hf")
    _tokenizer_file(hf_dir / "tokenizer.json")
    out = import_hf(hf_dir, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    model, metadata = load_checkpoint(out)
    assert metadata["hf_model_type"] == "qwen2"
    ids = _ids()
    assert (_our_logits(model, ids) - _hf_logits(hf_dir, ids)).abs().max() <= TOL


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("mistral", {}),
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}),
        ("qwen3", {"use_sliding_window": True, "max_window_layers": 0}),
    ],
)
def test_sliding_window_matches_transformers_past_the_window(tmp_path, model_type, overrides):
    """A window of 16 on 100 tokens: ours masks like transformers (full forward, the KV cache in
    generation, and the export back), so logits agree far past the window."""
    hf = _hf_model(model_type, False, sliding_window=16, **overrides)
    hf_dir = _save_hf(hf, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = import_hf(hf_dir)
    assert ours.cfg.sliding_window == 16 and ours.cfg.max_seq_len == 128
    ids = _ids(100)
    logits = _our_logits(ours, ids)
    for attn in ("eager", "sdpa"):
        diff = (logits - _hf_logits(hf_dir, ids, attn)).abs().max().item()
        assert diff <= TOL, f"{model_type} {attn}: max |diff| {diff:.2e}"
    full = Transformer(dataclasses.replace(ours.cfg, sliding_window=None))
    full.load_state_dict(ours.state_dict())
    assert (_our_logits(full, ids) - logits).abs().max() > 100 * TOL  # the window matters

    hf.generation_config.eos_token_id = None
    prompt = ids[:1, :10]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=30), theirs)

    back = export_hf(ours, tmp_path / "back", fmt=model_type)
    diff = (logits - _hf_logits(back, ids)).abs().max().item()
    assert diff <= TOL, f"{model_type} export: max |diff| {diff:.2e}"
    assert import_hf(back).cfg == ours.cfg
    auto = export_hf(ours, tmp_path / "auto")
    assert json.loads((auto / "config.json").read_text())["model_type"] == model_type
    if model_type != "qwen3":  # (qwen3 is refused by llama for its q/k norms first)
        with pytest.raises(NexusError, match="sliding window of 16.*--format mistral"):
            export_hf(ours, tmp_path / "llama", fmt="llama")


def test_window_on_some_layers_only_is_refused(tmp_path):
    hf = _hf_model("qwen2", False, sliding_window=16, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(NexusError, match=r"sliding-window attention on layers \[1\] only"):
        import_hf(_save_hf(hf, tmp_path / "hf"))


def test_longer_input_than_max_seq_len_is_an_error():
    ours = _tiny_ours()
    with pytest.raises(NexusError, match="129 tokens exceed the model's max_seq_len=128"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(NexusError, match="max_seq_len=128"):
        ours.generate(torch.zeros(1, 120, dtype=torch.long), max_new_tokens=20)


def test_qwen2_unused_sliding_window_is_ignored(tmp_path):
    hf_dir = _save_hf(_hf_model("qwen2", False), tmp_path / "hf")
    doc = json.loads((hf_dir / "config.json").read_text())
    doc.update(sliding_window=8, use_sliding_window=False)
    (hf_dir / "config.json").write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert import_hf(hf_dir).cfg.max_seq_len == 128


def test_legacy_rope_theta_key(tmp_path):
    """transformers 4.x configs carry a top-level rope_theta and no rope_parameters."""
    hf_dir = _save_hf(_hf_model("llama", False), tmp_path / "hf")
    doc = json.loads((hf_dir / "config.json").read_text())
    doc.pop("rope_parameters")
    doc.update(rope_theta=5000.0, rope_scaling=None, torch_dtype="float32")
    (hf_dir / "config.json").write_text(json.dumps(doc))
    assert import_hf(hf_dir).cfg.rope_theta == 5000.0


# --------------------------------------------------------------------------------------------
# export: ours -> HF loads in transformers with the same logits; import gives the same weights


@pytest.mark.parametrize(
    ("fmt", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_embeddings": True}),
        ("llama", {"attention_bias": True}),
        ("mistral", {}),
        ("qwen2", {"attention_bias": True}),
        ("qwen2", {"attention_bias": True, "tie_embeddings": True}),
        ("qwen3", {"qk_norm": True}),
        ("qwen3", {"qk_norm": True, "attention_bias": True, "tie_embeddings": True}),
    ],
)
def test_export_round_trip(tmp_path, fmt, overrides):
    ours = _tiny_ours(**overrides)
    hf_dir = export_hf(ours, tmp_path / "hf", fmt=fmt)
    assert sorted(p.name for p in hf_dir.iterdir() if p.name != OUTPUT_MARKER) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    ids = _ids()
    logits = _our_logits(ours, ids)
    for attn in ("eager", "sdpa"):
        diff = (logits - _hf_logits(hf_dir, ids, attn)).abs().max().item()
        assert diff <= TOL, f"{fmt} {overrides} {attn}: max |diff| {diff:.2e}"

    back = import_hf(hf_dir)
    assert back.cfg == ours.cfg
    expected, actual = model_state_dict(ours), model_state_dict(back)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_export_qwen2_without_bias_writes_zero_biases(tmp_path):
    ours = _tiny_ours()
    hf_dir = export_hf(ours, tmp_path / "hf", fmt="qwen2")
    weights = load_file(hf_dir / "model.safetensors")
    assert not weights["model.layers.0.self_attn.q_proj.bias"].any()
    ids = _ids()
    assert (_our_logits(ours, ids) - _hf_logits(hf_dir, ids)).abs().max() <= TOL


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    with pytest.raises(NexusError, match="qwen3"):
        export_hf(_tiny_ours(qk_norm=True), tmp_path / "a", fmt="llama")
    with pytest.raises(NexusError, match="qwen3"):
        export_hf(_tiny_ours(qk_norm=True), tmp_path / "b", fmt="qwen2")
    with pytest.raises(NexusError, match="qk_norm"):
        export_hf(_tiny_ours(), tmp_path / "c", fmt="qwen3")
    with pytest.raises(NexusError, match="biases"):
        export_hf(_tiny_ours(attention_bias=True), tmp_path / "d", fmt="mistral")
    with pytest.raises(NexusError, match="llama, mistral, qwen2, qwen3"):
        export_hf(_tiny_ours(), tmp_path / "e", fmt="gpt2")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_sharded_export_loads_in_transformers(tmp_path):
    ours = _tiny_ours()
    hf_dir = export_hf(ours, tmp_path / "hf", max_shard_size=60_000)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (hf_dir / "model.safetensors").exists()
    ids = _ids()
    assert (_our_logits(ours, ids) - _hf_logits(hf_dir, ids)).abs().max() <= TOL
    back = import_hf(hf_dir)
    for name, tensor in model_state_dict(ours).items():
        assert torch.equal(tensor, model_state_dict(back)[name]), name


def test_export_from_checkpoint_with_tokenizer(tmp_path):
    from nexus_moe.checkpoint import save_checkpoint

    ours = _tiny_ours()
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    ckpt = save_checkpoint(tmp_path / "ckpt", ours, tokenizer_path=tokenizer)
    hf_dir = export_hf(ckpt, tmp_path / "hf", fmt="llama", dtype=torch.bfloat16)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["bos_token_id"] is None
    assert config["torch_dtype"] == "bfloat16"
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    text = "hello world"
    assert tok.decode(tok(text).input_ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.dtype == torch.bfloat16
    assert hf.generation_config.eos_token_id == 0


def test_export_replaces_its_own_folder_atomically_and_never_a_users(tmp_path):
    target = tmp_path / "hf"
    export_hf(_tiny_ours(), target, fmt="qwen2")
    export_hf(_tiny_ours(), target)  # our own earlier export: replaced as a whole
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stale.txt").write_text("old")
    with pytest.raises(NexusError, match="stale.txt"):
        export_hf(_tiny_ours(), mine)
    assert sorted(p.name for p in mine.iterdir()) == ["stale.txt"]


# --------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    return _save_hf(_hf_model("llama", False), tmp_path / "hf")


def _edit_config(hf_dir: Path, **changes) -> None:
    doc = json.loads((hf_dir / "config.json").read_text())
    doc.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(doc))


def test_config_disagreeing_with_tensors_names_the_tensor(llama_dir):
    _edit_config(llama_dir, hidden_size=128)
    with pytest.raises(NexusError, match=r"'model\.embed_tokens\.weight' has shape \(300, 64\)"):
        import_hf(llama_dir)


def test_missing_and_unexpected_tensors_are_named(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, llama_dir / "model.safetensors")
    with pytest.raises(NexusError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        import_hf(llama_dir)
    _edit_config(llama_dir, num_hidden_layers=1)
    with pytest.raises(NexusError, match=r"unexpected tensor 'model\.layers\.1\."):
        import_hf(llama_dir)


def test_unsupported_model_type(llama_dir):
    _edit_config(llama_dir, model_type="gpt2")
    with pytest.raises(NexusError, match="'gpt2' is not supported; supported: llama, mistral"):
        import_hf(llama_dir)


def test_rope_scaling_refused(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(NexusError, match="rope_type='linear'"):
        import_hf(llama_dir)
    _edit_config(llama_dir, rope_parameters=None, rope_scaling={"type": "llama3", "factor": 8.0})
    with pytest.raises(NexusError, match="rope_type='llama3'"):
        import_hf(llama_dir)


def test_pickled_weights_refused(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(NexusError, match="pytorch_model.bin.*safetensors"):
        import_hf(llama_dir)


def test_corrupt_and_missing_files(llama_dir, tmp_path):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NexusError, match="corrupt or truncated"):
        import_hf(llama_dir)
    (llama_dir / "config.json").write_text("{ not json")
    with pytest.raises(NexusError, match="config.json"):
        import_hf(llama_dir)
    with pytest.raises(NexusError, match="not found"):
        import_hf(tmp_path / "nowhere")


# Text whose split depends on the pre-tokenizer: digit runs, newlines, spaces, punctuation.
TOKENIZER_TEXT = "x = 12345 + 678\n\n  def f(a):\n\treturn a*2  # ok?\nCafé 2024-01-02!"


@pytest.mark.parametrize(
    ("fmt", "overrides"),
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {"qk_norm": True}),
        ("qwen2_moe", {"moe": True}),
        ("mixtral", {"moe": True}),
    ],
)
def test_every_format_tokenizes_like_ours_under_autotokenizer(tmp_path, fmt, overrides):
    """transformers picks a model-specific tokenizer class for some model types (Qwen2Tokenizer
    for qwen2, which splits digits and newlines its own way); the export makes AutoTokenizer
    load our tokenizer.json unchanged, with a pad token."""
    from tokenizers import Tokenizer

    from nexus_moe.checkpoint import save_checkpoint
    from nexus_moe.config import MoEConfig

    texts = [TOKENIZER_TEXT * 3, "hello world 123\n\n 4567", "def g():\n    return 10"]
    tokenizer = tiny_bpe_file(tmp_path / "tokenizer.json", texts * 20, 300)
    if overrides.pop("moe", False):
        moe = MoEConfig(num_experts=2, top_k=2, shared_expert=fmt == "qwen2_moe", renormalize=True)
        overrides["moe"] = moe
    ours = Transformer(tiny_config(vocab_size=300, **overrides))
    ckpt = save_checkpoint(tmp_path / "ckpt", ours, tokenizer_path=tokenizer)
    hf_dir = export_hf(ckpt, tmp_path / "hf", fmt=fmt)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = Tokenizer.from_file(str(tokenizer)).encode(TOKENIZER_TEXT).ids
    assert tok(TOKENIZER_TEXT)["input_ids"] == expected
    trusting = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    assert trusting(TOKENIZER_TEXT)["input_ids"] == expected
    assert tok.decode(expected) == TOKENIZER_TEXT
    assert tok.pad_token == "<|endoftext|>"
    batch = tok(["a", TOKENIZER_TEXT], padding=True)
    assert len(batch["input_ids"][0]) == len(batch["input_ids"][1])


def test_hf_folder_import_keeps_chat_template_special_tokens_and_generation_config(tmp_path):
    """A folder's tokenizer_config.json (chat template, bos/eos/pad) and generation_config.json
    travel into the checkpoint, through a re-save, and out of the export to transformers."""
    from tokenizers import AddedToken, Tokenizer

    from nexus_moe.checkpoint import save_checkpoint

    tok = Tokenizer.from_file(str(_tokenizer_file(tmp_path / "tokenizer.json")))
    tok.add_special_tokens([AddedToken("<|im_start|>"), AddedToken("<|im_end|>")])
    hf_dir = _save_hf(_hf_model("llama", False), tmp_path / "hf")
    tok.save(str(hf_dir / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "tokenizer_class": "GPT2Tokenizer",  # a model-specific class: replaced on export
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": template,
    }
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (hf_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [im_end, 0], "temperature": 0.7, "do_sample": True})
    )
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (hf_dir / name).read_bytes(), name
    model, _ = load_checkpoint(ckpt)
    again = save_checkpoint(tmp_path / "again", model, tokenizer_path=ckpt / "tokenizer.json")
    assert (again / "tokenizer_config.json").is_file()

    out = export_hf(again, tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|im_end|>", im_end)
    assert hf_tok.pad_token == "<|im_end|>" and hf_tok.bos_token == "<|im_start|>"
    chat = [{"role": "user", "content": "hello"}]
    text = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [im_end, 0] and generation.temperature == 0.7
    assert generation.pad_token_id == im_end
    doc = json.loads((out / "config.json").read_text())
    assert (doc["eos_token_id"], doc["pad_token_id"]) == (im_end, im_end)
