"""MoE layer forward+backward time vs a dense SwiGLU doing the same active FLOPs.

A :class:`nexus_moe.moe.MoELayer` (E routed experts of width FFN, top-k, optional shared expert of
width FFN) is timed against a dense :class:`nexus_moe.moe.SwiGLU` of width (top_k + shared) * FFN,
which does the same expert matmul FLOPs per token. The MoE layer additionally pays for its router,
softmax/top-k, the load-balancing loss and the dispatch (sort, gather, unsort, combine); the ratio
MoE / dense is that overhead. Target (issue): MoE within 1.3x of dense.

Variants are timed interleaved (dense, MoE, dense, MoE, ...) in the same process and medians
reported, so background load affects all of them alike. ``--profile`` adds a torch.profiler
table of one MoE forward+backward. ``--experts-backend loop grouped_mm`` times the two kernels
of ``GroupedExperts`` side by side (``auto``: what the layer picks by itself); on a GPU:

    .venv/bin/python benchmarks/moe_layer.py
    .venv/bin/python benchmarks/moe_layer.py --router linear nexus ac --json moe.json
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --tokens 32768 --experts 16 \
        --top-k 2 --experts-backend loop grouped_mm auto
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from nexus_moe.config import MoEConfig
from nexus_moe.moe import MoELayer, SwiGLU
from nexus_moe.routers import NexusRouter


def build_moe(args: argparse.Namespace, router: str, backend: str = "auto") -> MoELayer:
    cfg = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        shared_expert=args.shared,
        router=router,
        expert_intermediate_size=args.ffn,
        domain_embedding_dim=args.domain_dim,
    )
    layer = MoELayer(cfg, args.hidden, args.ffn, args.ffn)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "router" not in name:
                p.normal_(0.0, 0.02)
        for m in layer.modules():
            if isinstance(m, NexusRouter):  # domain embeddings are filled in by upcycling
                m.domain_embeddings.copy_(torch.randn_like(m.domain_embeddings))
    layer.experts.backend = backend
    return layer.to(args.device).train()


def build_dense(args: argparse.Namespace) -> SwiGLU:
    width = (args.top_k + int(args.shared)) * args.ffn
    dense = SwiGLU(args.hidden, width)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    return dense.to(args.device).train()


def make_steps(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One closure per variant: forward + backward with fresh (set_to_none) gradients."""
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device).requires_grad_()
    grad_out = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
    prev = torch.randint(0, args.experts, (args.tokens,), generator=gen).to(device)  # AC router
    autocast = args.dtype == "bf16"

    def step(module: torch.nn.Module, is_moe: bool) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if is_moe:
                    y, info = module(x, prev)
                    loss = (y.float() * grad_out).sum() + info.load_balance_loss
                else:
                    loss = (module(x).float() * grad_out).sum()
            loss.backward()

        return run

    width = (args.top_k + int(args.shared)) * args.ffn
    steps = {f"dense SwiGLU (width {width})": step(build_dense(args), False)}
    for router in args.router:
        for backend in args.experts_backend:
            name = f"MoE {router} router"
            if args.experts_backend != ["auto"]:
                name += f" [{backend}]"
            steps[name] = step(build_moe(args, router, backend), True)
    return steps


def measure(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: str = "cpu"
) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant: (wall-clock seconds, process CPU seconds) of each repeat.

    CPU time is all threads of this process together; on a machine shared with other jobs it is
    less disturbed by them than wall-clock time (exactly so with ``--threads 1``).
    """

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def profile(args: argparse.Namespace) -> str:
    from torch.profiler import ProfilerActivity, profile

    steps = make_steps(args)
    name = next(n for n in steps if n.startswith("MoE"))
    fn = steps[name]
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    return f"profile of {name} (3 steps):\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=args.profile_rows
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = measure(make_steps(args), args.warmup, args.repeats, args.device)
    dense_wall, dense_cpu = (statistics.median(t) * 1e3 for t in next(iter(times.values())))
    rows = []
    for name, (wall, cpu) in times.items():
        ms, cpu_ms = statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3
        rows.append(
            {
                "variant": name,
                "ms": ms,
                "ratio": ms / dense_wall,
                "cpu_ms": cpu_ms,
                "cpu_ratio": cpu_ms / dense_cpu,
                "ms_all": [t * 1e3 for t in wall],
                "cpu_ms_all": [t * 1e3 for t in cpu],
            }
        )
    flops = 3 * 2 * 3 * args.tokens * args.hidden * (args.top_k + int(args.shared)) * args.ffn
    return {
        "benchmark": "moe_layer",
        "tokens": args.tokens,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "shared_expert": args.shared,
        "dtype": args.dtype,
        "expert_flops_fwd_bwd": flops,
        "repeats": args.repeats,
        "target_ratio": 1.3,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    mach = result["machine"]
    shared = " + shared expert" if result["shared_expert"] else ""
    print(
        f"{result['tokens']} tokens, hidden {result['hidden']}, FFN {result['ffn']}, "
        f"{result['experts']} routed experts top-{result['top_k']}{shared}, {result['dtype']}; "
        f"{result['expert_flops_fwd_bwd'] / 1e9:.1f} GFLOP fwd+bwd in the FFN matmuls"
    )
    print(
        f"torch {mach['torch']}, {mach['device']}, {mach['threads']} threads, "
        f"{mach['cpu_capability']}, "
        f"load {mach['loadavg_1m']:.2f}; medians of {result['repeats']} interleaved repeats"
    )
    width = max(len(r["variant"]) for r in result["rows"])
    header = (
        f"{'variant':<{width}} | {'fwd+bwd ms':>10} | {'ratio to dense':>14} | "
        f"{'CPU ms':>8} | {'CPU ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['variant']:<{width}} | {r['ms']:>10.1f} | {r['ratio']:>13.2f}x | "
            f"{r['cpu_ms']:>8.1f} | {r['cpu_ratio']:>8.2f}x"
        )
    worst = max(r["ratio"] for r in result["rows"][1:])  # row 0 is the dense baseline
    verdict = "met" if worst <= result["target_ratio"] else "MISSED"
    print(
        f"target: MoE within {result['target_ratio']}x of dense (wall clock) -> {verdict} "
        f"(worst {worst:.2f}x)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--ffn", type=int, default=1024, help="width of each expert (and the shared one)"
    )
    p.add_argument("--experts", type=int, default=4, help="routed experts")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument(
        "--shared", action=argparse.BooleanOptionalAction, default=True, help="shared expert"
    )
    p.add_argument("--router", nargs="+", choices=["linear", "nexus", "ac"], default=["linear"])
    p.add_argument("--domain-dim", type=int, default=384, help="Nexus domain embedding size")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--experts-backend",
        nargs="+",
        choices=["auto", "loop", "grouped_mm"],
        default=["auto"],
        help="GroupedExperts kernel(s) to time",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.profile:
        result["profile"] = profile(args)
        print()
        print(result["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
