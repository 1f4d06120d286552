"""Generation with the KV cache (``Transformer.generate``): upcycled MoE vs its dense seed.

Greedy decoding of ``--new`` tokens after a random prompt of ``--prompt`` tokens, batch 1 and
batch 16, for the dense model of configs/tiny.yaml (``--sizes tiny small``) and the MoE ``upcycle
nexus`` makes of it (5 routed experts top-1 + the seed FFN as shared expert, Nexus router).
Tokens/s counts generated tokens (batch x new) over the whole ``generate`` call, prompt included.
Dense and MoE are timed interleaved, medians reported; the ratio is MoE time / dense time. The
per-token active FLOP ratio is printed alongside (decoding is overhead-bound at these sizes, so
expect the time ratio to exceed it).

    .venv/bin/python benchmarks/generation.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_moe_vs_dense import active_flops_per_token, build, configs  # noqa: E402


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for size in args.sizes:
        ns = argparse.Namespace(
            size=size, vocab=args.vocab, seq=args.prompt + args.new, experts=5, top_k=1
        )
        dense_cfg, moe_cfg = configs(ns)
        models = {"dense": build(dense_cfg, 0).eval(), "moe": build(moe_cfg, 0).eval()}
        # Decoding FLOPs: forward only, so a third of the training figure (the attention term,
        # at the full sequence length, is an upper bound here).
        fl = {n: active_flops_per_token(m.cfg, 0) for n, m in models.items()}
        for batch in args.batch:
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, args.vocab, (batch, args.prompt), generator=gen)
            for m in models.values():
                m.generate(prompt, 4)  # warmup
            times: dict[str, list[float]] = {n: [] for n in models}
            for _ in range(args.repeats):
                for name, m in models.items():
                    start = clock()
                    m.generate(prompt, args.new)
                    times[name].append(clock() - start)
            med = {n: statistics.median(t) for n, t in times.items()}
            rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "dense_tok_s": batch * args.new / med["dense"],
                    "moe_tok_s": batch * args.new / med["moe"],
                    "time_ratio": med["moe"] / med["dense"],
                    "flop_ratio": fl["moe"] / fl["dense"],
                    "ms_all": {n: [x * 1e3 for x in t] for n, t in times.items()},
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    rows = run(args)
    print(
        f"greedy generate(): prompt {args.prompt}, {args.new} new tokens, vocab {args.vocab}; "
        f"MoE = 5 experts top-1 + shared (Nexus); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; medians of "
        f"{args.repeats} interleaved repeats ({args.clock} time)"
    )
    head = (
        f"{'model':<5} | {'batch':>5} | {'dense tok/s':>11} | {'MoE tok/s':>9} | "
        f"{'time ratio':>10} | {'FLOP ratio':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['size']:<5} | {r['batch']:>5} | {r['dense_tok_s']:>11,.0f} | "
            f"{r['moe_tok_s']:>9,.0f} | {r['time_ratio']:>9.2f}x | {r['flop_ratio']:>9.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
