"""Data-parallel training under torchrun (docs/design.md §8): 2 CPU ranks (gloo) reproduce one process.

One ``torchrun --nproc_per_node 2`` run of this file (see ``_worker`` at the bottom) trains every
scenario; each test compares one of them with a single-process run over the same global batch
(2 ranks x batch 2 == 1 rank x batch 4, see DomainSampler). FSDP2 works on CPU with gloo in this
torch build, so it is tested here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from nexus_moe.checkpoint import WEIGHTS_FILE, read_safetensors
from nexus_moe.config import MoEConfig
from nexus_moe.data import TokenShards, tokenize_corpus
from nexus_moe.distributed import assign_to_devices
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.tokenizer import train_tokenizer
from nexus_moe.train import OPTIMIZER_FILE, TrainConfig, Trainer

TEXT = {
    "alpha": "The quick brown fox jumps over the lazy dog. {i} foxes were seen near the river.",
    "beta": "def f{i}(x):\n    return x * {i} + sum(range({i}))\n",
}
WORLD = 2
BATCH = 2  # per rank; the single-process reference uses WORLD * BATCH
# Reduction order differs (~1e-7 relative); AdamW divides each gradient element by its running
# RMS, which enlarges that on elements whose gradient is near zero, up to ~lr * 1e-3 per step.
# With lr 3e-3 the largest weight difference is ~4e-6.
TOLERANCE = 1e-5
TIMEOUT = int(os.environ.get("NEXUS_TEST_TORCHRUN_TIMEOUT", 300))
# name -> (parallelism, load-balancing weight, route all of rank 1's tokens to expert 0)
SCENARIOS = {
    "ddp": ("ddp", 0.0, False),
    "ddp_empty_expert": ("ddp", 0.0, True),
    "fsdp": ("fsdp", 0.0, False),
    "fsdp_empty_expert": ("fsdp", 0.0, True),
    "ddp_load_balance": ("ddp", 0.05, False),
}


def build_corpus(root: Path) -> tuple[Path, Path]:
    """A two-domain corpus, its tokenizer and token shards under ``root``."""
    for domain, template in TEXT.items():
        (root / domain).mkdir(parents=True)
        for split, n in (("train", 60), ("validation", 6)):
            with open(root / domain / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    doc = " ".join(template.format(i=i + j) for j in range(5))
                    f.write(json.dumps({"text": doc}) + "\n")
    tok = root.parent / f"{root.name}-tokenizer.json"  # (never inside its input corpus)
    train_tokenizer(root, tok, vocab_size=300)
    tokenize_corpus(root, tok, root / "tokens")
    return root / "tokens", tok


def make_trainer(
    corpus: Path, out: Path, parallelism: str, lb_weight: float, batch_size: int
) -> Trainer:
    shards = TokenShards(corpus / "tokens")
    moe = MoEConfig(
        num_experts=2, top_k=1, router="linear", moe_every=2, load_balance_weight=lb_weight
    )
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe=moe, vocab_size=shards.vocab_size, tie_embeddings=True))
    cfg = TrainConfig(
        steps=4,
        batch_size=batch_size,
        seq_len=16,
        grad_accum=2,
        lr=3e-3,
        eval_tokens=128,
        log_every=1,
        checkpoint_every=0,
        parallelism=parallelism,
    )
    return Trainer(
        model,
        shards,
        list(TEXT),
        cfg,
        out,
        tokenizer_path=corpus.parent / f"{corpus.name}-tokenizer.json",
        show_progress=False,
    )


def route_to_expert_zero(trainer: Trainer, rows: slice, seen: list[list[int]]) -> None:
    """Push ``rows`` of every training forward to expert 0 (``seen``: top-1 counts per call)."""
    for layer in trainer.model.moe_layers():

        def bias_logits(router, inputs, logits):  # logits: (N, E)
            if router.training:
                logits = logits.clone()
                logits[rows, 0] += 30.0
            return logits

        def record(moe, inputs, output):
            if moe.training:
                seen.append(torch.bincount(output[1].top1, minlength=2).tolist())

        layer.router.register_forward_hook(bias_logits)
        layer.register_forward_hook(record)


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root)
    return root


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> Path:
    """Every scenario trained by 2 gloo ranks under torchrun; returns the runs' parent dir."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(WORLD), __file__, str(corpus), str(out)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"")[-3000:] + (exc.stderr or b"")[-3000:]
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s:\n{output.decode(errors='replace')}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, Path]:
    """Single-process runs with the global batch, with and without the forced routing."""
    out = tmp_path_factory.mktemp("single")
    plain = make_trainer(corpus, out / "plain", "ddp", 0.0, WORLD * BATCH)
    plain.train()
    skewed = make_trainer(corpus, out / "empty_expert", "ddp", 0.0, WORLD * BATCH)
    # Rank 1's share of the global batch is its second half: rows [N/2, N) of the (N, E) logits.
    route_to_expert_zero(skewed, slice(BATCH * 16, None), [])
    skewed.train()
    return {"plain": out / "plain", "empty_expert": out / "empty_expert"}


@pytest.mark.parametrize("scenario", ["ddp", "fsdp", "ddp_empty_expert", "fsdp_empty_expert"])
def test_two_ranks_match_one_process(two_ranks, reference, scenario):
    """Loss curve, final weights and optimizer state equal the single-process run (<= 1e-5),
    also when all of one rank's tokens go to one expert (the other runs on an empty slice)."""
    ref = reference["empty_expert" if scenario.endswith("empty_expert") else "plain"]
    run = two_ranks / scenario
    run_losses, ref_losses = losses(run), losses(ref)
    assert len(run_losses) == 4  # one record per step: only rank 0 logs
    assert run_losses == pytest.approx(ref_losses, abs=TOLERANCE)
    weights = read_safetensors(run / "model" / WEIGHTS_FILE)
    assert "lm_head.weight" not in weights  # same file format as a single-process run
    assert max_difference(weights, read_safetensors(ref / "model" / WEIGHTS_FILE)) <= TOLERANCE
    optimizer = read_safetensors(run / "checkpoint" / OPTIMIZER_FILE)
    assert max_difference(optimizer, read_safetensors(ref / "checkpoint" / OPTIMIZER_FILE)) <= (
        TOLERANCE
    )


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_expert_without_tokens_on_one_rank(two_ranks, parallelism):
    """Rank 1 routed every token to expert 0, rank 0 used both: the reduction still worked."""
    seen = json.loads(
        (two_ranks / f"{parallelism}_empty_expert" / "rank1_routing.json").read_text()
    )
    assert seen and all(counts[1] == 0 for counts in seen)
    record = json.loads(
        open(two_ranks / f"{parallelism}_empty_expert" / "metrics.jsonl").readline()
    )
    assert 0.5 < record["expert_load"][0][0] < 1.0  # summed over ranks: rank 0 used expert 1


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_resume_under_two_ranks_is_exact(two_ranks, reference, parallelism):
    """Stopped after 2 steps with DDP, resumed with ``parallelism``: same as uninterrupted."""
    run = two_ranks / f"resume_{parallelism}"
    assert losses(run) == pytest.approx(losses(reference["plain"]), abs=TOLERANCE)
    weights = read_safetensors(run / "model" / WEIGHTS_FILE)
    ref = read_safetensors(reference["plain"] / "model" / WEIGHTS_FILE)
    assert max_difference(weights, ref) <= TOLERANCE


def test_load_balancing_loss_trains_under_two_ranks(two_ranks):
    """With the (per-rank) load-balancing loss on, training runs and logs it."""
    records = [json.loads(line) for line in open(two_ranks / "ddp_load_balance" / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    assert all(r["load_balance_loss"] >= 1.0 - 1e-6 and r["aux_loss"] > 0 for r in steps)
    weights = read_safetensors(two_ranks / "ddp_load_balance" / "model" / WEIGHTS_FILE)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_the_gathered_model_keeps_the_routing_statistics_and_peer_state(
    corpus, tmp_path, monkeypatch
):
    """Under FSDP the model written is rebuilt from the gathered state; what the state dict
    does not hold (each layer's routing statistics, a peer router's state file contents) must
    come along, or a trained peer-routed MoE could not be extended by its peer's rule."""
    import nexus_moe.distributed as dist_utils

    trainer = make_trainer(corpus, tmp_path / "run", "fsdp", 0.0, BATCH)
    stats = [object() for _ in trainer.model.moe_layers()]
    for layer, s in zip(trainer.model.moe_layers(), stats, strict=True):
        layer.domain_stats = s
    trainer.model.peer_state = state = object()
    monkeypatch.setattr(dist_utils, "is_sharded", lambda model: True)  # as FSDP would say
    model, _ = trainer._full_model_and_optimizer()
    assert model is not trainer.model
    assert [layer.domain_stats for layer in model.moe_layers()] == stats
    assert model.peer_state is state


def test_assign_to_devices_round_robin():
    domains = ["code", "legal", "math", "prose", "wiki"]
    assert assign_to_devices(domains, 2) == [["code", "math", "wiki"], ["legal", "prose"]]
    assert assign_to_devices(domains, 8) == [[d] for d in domains]  # no idle processes
    assert assign_to_devices(domains, 1) == [domains]
    with pytest.raises(NexusError, match="devices must be >= 1"):
        assign_to_devices(domains, 0)


def test_branch_starts_one_process_per_gpu(monkeypatch, tmp_path):
    """With 3 GPUs, `branch` runs 3 processes, each seeing one GPU and a subset of domains."""
    from typer.testing import CliRunner

    import nexus_moe.distributed as dist_utils
    from nexus_moe.cli import app

    started = []

    class FakeProcess:
        def __init__(self, command, env, stdout, stderr):
            started.append((command, env["CUDA_VISIBLE_DEVICES"]))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(dist_utils.subprocess, "Popen", FakeProcess)
    args = ["branch", "--seed", "seed", "--corpus", "corpus", "--out", str(tmp_path)]
    args += ["--domains", "a,b,c,d", "--set", "steps=5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [gpu for _, gpu in started] == ["0", "1", "2"]
    for (command, _), domains in zip(started, ["a,d", "b", "c"], strict=True):
        assert command[command.index("--domains") + 1] == domains
        assert command[command.index("--device") + 1] == "cuda"
        assert command[command.index("--parallel-devices") + 1] == "1"
        assert command[command.index("--set") + 1] == "steps=5"


def test_parallelism_is_validated():
    with pytest.raises(NexusError, match="train.parallelism"):
        TrainConfig(parallelism="tp")


# ---------------------------------------------------------------------------------------------


def _worker(corpus: Path, out: Path) -> None:
    """One rank under torchrun: train every scenario, then the stop/resume runs."""
    for name, (parallelism, lb_weight, skew) in SCENARIOS.items():
        trainer = make_trainer(corpus, out / name, parallelism, lb_weight, BATCH)
        seen: list[list[int]] = []
        if skew and trainer.rank == 1:
            route_to_expert_zero(trainer, slice(None), seen)
        trainer.train()
        if seen:  # a test file of rank 1's own routing, beside rank 0's outputs
            (out / name / "rank1_routing.json").write_text(json.dumps(seen))
    for parallelism in ("ddp", "fsdp"):
        run = out / f"resume_{parallelism}"
        assert make_trainer(corpus, run, "ddp", 0.0, BATCH).train(stop_at_step=2) is None
        make_trainer(corpus, run, parallelism, 0.0, BATCH).train()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
