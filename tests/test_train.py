"""Trainer: exact resume, NaN guard, checkpoint integrity (docs/design.md §8, §12)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from nexus_moe.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from nexus_moe.config import MoEConfig
from nexus_moe.data import TokenShards, tokenize_corpus
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.tokenizer import train_tokenizer
from nexus_moe.train import TrainConfig, Trainer, lr_at

TEXT = {
    "alpha": "The quick brown fox jumps over the lazy dog. {i} foxes were seen near the river.",
    "beta": "def f{i}(x):\n    return x * {i} + sum(range({i}))\n",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for domain, template in TEXT.items():
        (root / domain).mkdir()
        for split, n in (("train", 120), ("validation", 12)):
            with open(root / domain / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    doc = " ".join(template.format(i=i + j) for j in range(5))
                    f.write(json.dumps({"text": doc, "source": f"{domain}{i}"}) + "\n")
    tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"  # (never inside its input corpus)
    train_tokenizer(root, tok, vocab_size=300)
    tokenize_corpus(root, tok, root / "tokens")
    return TokenShards(root / "tokens"), tok


def make_trainer(shards, out, moe=None, **cfg_kw):
    data, tok = shards
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe=moe, vocab_size=data.vocab_size))
    cfg = TrainConfig(
        **{
            "steps": 6,
            "batch_size": 4,
            "seq_len": 16,
            "lr": 3e-3,
            "eval_tokens": 256,
            "log_every": 1,
            "checkpoint_every": 0,
            **cfg_kw,
        }
    )
    return Trainer(model, data, list(TEXT), cfg, out, tokenizer_path=tok, show_progress=False)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


@pytest.mark.parametrize(
    "moe",
    [
        None,
        MoEConfig(
            num_experts=2, top_k=1, router="nexus", domain_embedding_dim=8, nexus_hidden_size=8
        ),
    ],
    ids=["dense", "moe"],
)
def test_resume_is_bit_exact(shards, tmp_path, moe):
    full = make_trainer(shards, tmp_path / "full", moe, grad_accum=2)
    full.train()
    half = make_trainer(shards, tmp_path / "half", moe, grad_accum=2)
    assert half.train(stop_at_step=3) is None
    resumed = make_trainer(shards, tmp_path / "half", moe, grad_accum=2)
    resumed.train()
    assert resumed.step == full.step == 6
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name

    def losses(run_dir):
        records = map(json.loads, open(run_dir / "metrics.jsonl"))
        return [r["loss"] for r in records if "loss" in r]

    assert losses(tmp_path / "full") == losses(tmp_path / "half")


def test_training_reduces_loss_and_logs(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path / "run", steps=30, lr=1e-2)
    final = trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert "eval" in records[-1] and set(records[-1]["eval"]) == {"alpha", "beta", "mean"}
    model, meta = load_checkpoint(final)
    assert meta["steps"] == 30


def test_moe_training_logs_routing_statistics(shards, tmp_path):
    moe = MoEConfig(num_experts=2, top_k=1, router="linear")
    make_trainer(shards, tmp_path / "run", moe, steps=3).train()
    rec = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][0]
    assert len(rec["expert_load"]) == 2 and sum(rec["expert_load"][0]) == pytest.approx(1.0)
    assert rec["load_balance_loss"] >= 1.0 - 1e-6


def test_nan_guard_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path / "run", checkpoint_every=2)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output

    trainer.model.lm_head.register_forward_hook(poison)
    with pytest.raises(
        NexusError, match=r"non-finite loss at step 4.*last good checkpoint \(step 2\)"
    ):
        trainer.train()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "run" / "model").exists()


def test_corrupt_or_truncated_checkpoint_gives_clear_error(tmp_path):
    model = Transformer(tiny_config())
    ckpt = save_checkpoint(tmp_path / "ck", model)
    weights = ckpt / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(NexusError, match="corrupt or truncated"):
        load_checkpoint(ckpt)
    weights.write_bytes(data)
    (ckpt / "config.json").write_text('{"format": "nexus-moe", "model": {')
    with pytest.raises(NexusError, match="config.json: not valid JSON"):
        load_checkpoint(ckpt)


def test_checkpoint_with_mismatched_config_names_tensor(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ck", Transformer(tiny_config()))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NexusError, match=r"mlp\.\w+_proj\.weight' has shape"):
        load_checkpoint(ckpt)


def test_resume_refuses_changed_config(shards, tmp_path):
    make_trainer(shards, tmp_path / "run").train(stop_at_step=2)
    with pytest.raises(NexusError, match="training config differs"):
        make_trainer(shards, tmp_path / "run", lr=1e-4).train()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc allocator tuning")
@pytest.mark.parametrize(
    "env,applied",
    [
        ({}, True),
        ({"NEXUS_MOE_MALLOC_TUNING": "0"}, False),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
    ],
)
def test_cpu_allocator_tuning_respects_opt_outs(env, applied):
    """In a fresh process (mallopt is process-wide): applied on glibc unless opted out."""
    code = "from nexus_moe.train import tune_cpu_allocator; print(tune_cpu_allocator())"
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NEXUS_MOE_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_")
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(applied)
