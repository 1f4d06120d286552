"""Sliding-window attention of imported Qwen MoE models, read as transformers reads it.

Qwen3-MoE slides on every layer when ``use_sliding_window`` is set (it reads neither
``layer_types`` nor ``max_window_layers``); Qwen2-MoE without ``layer_types`` slides on the even
layers below ``max_window_layers``. A window on every layer imports with logits equal to
transformers'; a window on some layers only is refused (nexus-moe's blocks attend alike).
Also: an export whose weights overflow the chosen dtype is refused, not written with infs.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_moe import TOL, VOCAB, _hf_moe, _ids, _load_hf, _max_diff

from nexus_moe.errors import NexusError
from nexus_moe.hf import import_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="transformers 5's window rules"
)
WINDOW = 6  # shorter than the sequences scored, so a missed window shows in the logits


def _drop_layer_types(hf_dir) -> None:
    path = hf_dir / "config.json"
    doc = json.loads(path.read_text())
    doc.pop("layer_types", None)
    path.write_text(json.dumps(doc))


def test_qwen3_moe_window_on_every_layer_whatever_max_window_layers(tmp_path):
    hf = _hf_moe("qwen3_moe", use_sliding_window=True, sliding_window=WINDOW)
    hf.save_pretrained(tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    doc["max_window_layers"] = 28  # as a 4.x-era config may carry: transformers ignores it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(doc))
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.sliding_window == WINDOW
    theirs = _load_hf(tmp_path / "hf")
    assert _max_diff(ours, theirs, _ids(seq=24)) <= TOL


def _one_layer_qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, use_sliding_window=True, sliding_window=WINDOW,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def test_qwen2_moe_without_layer_types_slides_on_the_even_layers(tmp_path):
    _one_layer_qwen2_moe().save_pretrained(tmp_path / "hf")
    _drop_layer_types(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.sliding_window == WINDOW  # layer 0: even and below max_window_layers
    theirs = _load_hf(tmp_path / "hf")
    assert theirs.config.layer_types == ["sliding_attention"]
    assert _max_diff(ours, theirs, _ids(seq=24)) <= TOL


def test_qwen2_moe_window_on_some_layers_only_is_refused(tmp_path):
    hf = _hf_moe("qwen2_moe", use_sliding_window=True, sliding_window=WINDOW)  # two layers
    hf.save_pretrained(tmp_path / "hf")
    _drop_layer_types(tmp_path / "hf")
    assert _load_hf(tmp_path / "hf").config.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(NexusError, match=r"sliding-window attention on layers \[0\] only"):
        import_hf(tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["qwen3_moe", "qwen2_moe"])
def test_qwen_moe_export_keeps_the_window(tmp_path, fmt):
    from nexus_moe.hf import export_hf

    if fmt == "qwen3_moe":
        hf = _hf_moe("qwen3_moe", use_sliding_window=True, sliding_window=WINDOW)
    else:
        hf = _one_layer_qwen2_moe()
    hf.save_pretrained(tmp_path / "hf")
    _drop_layer_types(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    export_hf(ours, tmp_path / fmt, fmt=fmt)
    assert import_hf(tmp_path / fmt).cfg.sliding_window == WINDOW, fmt
    assert _max_diff(ours, _load_hf(tmp_path / fmt), _ids(seq=24)) <= TOL, fmt


def test_export_refuses_weights_that_overflow_the_dtype(tmp_path):
    """A weight beyond float16's range would be written as inf: refused, naming the tensor."""
    from conftest import tiny_config
    from nexus_moe.hf import export_hf
    from nexus_moe.model import Transformer

    model = Transformer(tiny_config())
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(NexusError, match=r"model\.norm\.weight.*float16"):
        export_hf(model, tmp_path / "out", fmt="llama", dtype="fp16")
    assert not (tmp_path / "out").exists()
    export_hf(model, tmp_path / "out", fmt="llama", dtype="bf16")  # bf16 holds it


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
def test_import_names_the_source_file_holding_nan(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_moe("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    name = next(n for n in sorted(state) if n.endswith("self_attn.q_proj.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(NexusError, match=f"^{weights}: holds NaN"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
