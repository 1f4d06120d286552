"""Training throughput of an upcycled MoE vs its dense seed, against the ratio of active FLOPs.

The dense model is configs/tiny.yaml's (``--size small``: 2x wider); the MoE is what ``upcycle
nexus`` builds from it and 5 domain experts: every block's FFN replaced by 5 routed experts of the
same width, top-1, plus the seed's FFN as shared expert, behind a Nexus router (domain embeddings
of dim 384 projected through a SwiGLU of inner width 64, the tiny config's override). Weights are
random (the timing does not depend on them). Steps are full training steps as
``benchmarks/train_throughput.py`` runs them (forward, LM + auxiliary loss, backward, clipping,
AdamW) on random tokens, batch 16 x seq 128, interleaved dense / MoE, medians.

Active FLOPs per token = 6 * (matmul weights a token passes through) + 12 * layers * d_attn * T:
for the MoE that is the dense weights with each FFN counted (1 shared + top_k routed) times plus
the router's (E x hidden) scoring matrix; the Nexus projection runs once per step on E vectors,
not per token, so it is not counted. Target (issue): MoE/dense time ratio within 1.15x of the
FLOP ratio.

    .venv/bin/python benchmarks/train_moe_vs_dense.py --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402
    SIZES,
    add_allocator_option,
    apply_allocator_option,
    make_step,
)

from nexus_moe.config import ModelConfig, MoEConfig  # noqa: E402
from nexus_moe.model import Transformer  # noqa: E402
from nexus_moe.routers import NexusRouter  # noqa: E402
from nexus_moe.train import TrainConfig, build_optimizer  # noqa: E402


def configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    hidden, inter, layers, heads, kv = SIZES[args.size]
    dense = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        max_seq_len=max(args.seq, 256),
    )
    moe = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        shared_expert=True,
        router="nexus",
        nexus_hidden_size=64,
        load_balance_weight=0.05,
        domains=[f"d{i}" for i in range(args.experts)],
    )
    return dense, dataclasses.replace(dense, moe=moe)


def active_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    assert cfg.head_dim is not None
    attn_w = h * cfg.num_heads * cfg.head_dim * 2 + h * cfg.num_kv_heads * cfg.head_dim * 2
    ffn = 3 * h * i
    params = cfg.vocab_size * h  # lm_head (the input embedding is a lookup)
    for layer in range(cfg.num_layers):
        params += attn_w
        if cfg.moe is not None and cfg.is_moe_layer(layer):
            moe = cfg.moe
            width = cfg.expert_intermediate_size
            params += moe.top_k * 3 * h * width + int(moe.shared_expert) * ffn
            params += moe.num_experts * h  # router scores
        else:
            params += ffn
    return 6.0 * params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def build(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NexusRouter):
                m.domain_embeddings.copy_(torch.randn_like(m.domain_embeddings))
    return model.train()


def run(args: argparse.Namespace) -> dict[str, Any]:
    allocator = apply_allocator_option(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_cfg, moe_cfg = configs(args)
    dtypes = [d for d in args.dtypes.split(",") if d]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tcfg = TrainConfig(lr=1e-3, batch_size=args.batch, seq_len=args.seq)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen) for _ in range(4)
    ]
    flops = {
        "dense": active_flops_per_token(dense_cfg, args.seq),
        "moe": active_flops_per_token(moe_cfg, args.seq),
    }
    rows = []
    for d in dtypes:
        amp = torch.bfloat16 if d == "bf16" else None
        steps = {}
        for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
            model = build(cfg, args.seed)
            steps[name] = make_step(model, build_optimizer(model, tcfg), amp, tcfg.grad_clip)
        repeats = args.repeats if d == "fp32" else args.bf16_repeats
        for name in steps:
            for i in range(args.warmup):
                b = batches[i % 4]
                steps[name](b[:, :-1], b[:, 1:])
        times: dict[str, list[float]] = {n: [] for n in steps}
        for rep in range(repeats):
            b = batches[rep % 4]
            for name, step in steps.items():
                start = clock()
                step(b[:, :-1], b[:, 1:])
                times[name].append(clock() - start)
        med = {n: statistics.median(t) for n, t in times.items()}
        tok = args.batch * args.seq
        rows.append(
            {
                "dtype": d,
                "repeats": repeats,
                "dense_ms": med["dense"] * 1e3,
                "moe_ms": med["moe"] * 1e3,
                "dense_tok_s": tok / med["dense"],
                "moe_tok_s": tok / med["moe"],
                "time_ratio": med["moe"] / med["dense"],
                "ms_all": {n: [x * 1e3 for x in t] for n, t in times.items()},
            }
        )
    return {
        "allocator": allocator,
        "size": args.size,
        "experts": args.experts,
        "top_k": args.top_k,
        "batch": args.batch,
        "seq": args.seq,
        "clock": args.clock,
        "flops_per_token": flops,
        "flop_ratio": flops["moe"] / flops["dense"],
        "params": {
            "dense": dense_cfg.num_params(),
            "moe": moe_cfg.num_params(),
            "moe_active": moe_cfg.num_params(active=True),
        },
        "threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
        "rows": rows,
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['size']} dense seed vs upcycled MoE ({r['experts']} experts top-{r['top_k']} + "
        f"shared, Nexus router); batch {r['batch']} x seq {r['seq']}; "
        f"params dense {r['params']['dense'] / 1e6:.2f}M, MoE {r['params']['moe'] / 1e6:.2f}M"
    )
    f = r["flops_per_token"]
    print(
        f"active training FLOPs/token: dense {f['dense'] / 1e6:.1f}M, MoE {f['moe'] / 1e6:.1f}M "
        f"-> FLOP ratio {r['flop_ratio']:.2f}; torch {torch.__version__}, {r['threads']} threads, "
        f"load {r['loadavg_1m']:.2f}; medians of interleaved repeats ({r['clock']} time); "
        f"allocator {r['allocator']}"
    )
    head = (
        f"{'dtype':<5} | {'reps':>4} | {'dense ms':>9} | {'MoE ms':>9} | {'dense tok/s':>11} | "
        f"{'MoE tok/s':>9} | {'time ratio':>10} | {'/ FLOP ratio':>12}"
    )
    print(head)
    print("-" * len(head))
    for row in r["rows"]:
        rel = row["time_ratio"] / r["flop_ratio"]
        print(
            f"{row['dtype']:<5} | {row['repeats']:>4} | {row['dense_ms']:>9.1f} | "
            f"{row['moe_ms']:>9.1f} | {row['dense_tok_s']:>11,.0f} | {row['moe_tok_s']:>9,.0f} | "
            f"{row['time_ratio']:>9.2f}x | {rel:>11.2f}x"
        )
    for row in r["rows"]:
        rel = row["time_ratio"] / r["flop_ratio"]
        print(
            f"target {row['dtype']}: time ratio within 1.15x of the FLOP ratio -> "
            f"{'met' if rel <= 1.15 else 'MISSED'} ({rel:.2f}x)"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--bf16-repeats", type=int, default=3)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--threads", type=int, default=0)
    add_allocator_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
