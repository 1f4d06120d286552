"""MoE layer vs the transformers Qwen2-MoE sparse block (every CPU experts backend) vs dense.

For each cell of a grid (tokens x routed experts x top-k x shared expert or not) this times, in
float32, forward+backward (gradients w.r.t. the input and all weights) and forward only
(``torch.no_grad``, eval mode) of

* ours: :class:`nexus_moe.moe.MoELayer` with the linear router (forward+backward also
  back-propagates its load-balancing loss, which it always computes; the HF block computes none);
* ``transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock`` with each experts
  implementation of ``transformers.integrations.moe`` that runs on CPU: ``eager`` (a Python loop
  over the experts hit), ``grouped_mm`` (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``,
  which has a CPU kernel in this torch) and ``batched_mm`` (gathers one weight matrix per
  (token, expert) pair: S x 3 x FFN x hidden floats, so it is skipped where that exceeds
  ``--batched-mm-max-gb``). ``deepgemm`` and ``sonicmoe`` are CUDA-only and not timed;
* a dense :class:`nexus_moe.moe.SwiGLU` of width (top_k + shared) * FFN: the same active expert
  matmul FLOPs per token, with no routing.

All variants share the same weights: ours are copied into the HF block (``gate_up_proj`` = gate
rows then up rows; the router matrix as ``gate.weight``; the shared expert with a zero
``shared_expert_gate``, i.e. a constant sigmoid(0) = 1/2, and a doubled ``down_proj``, as
``nexus_moe.hf.export_hf`` writes it; without a shared expert the HF block gets a width-0 one, as
our export writes). Before timing, every HF backend's output and input gradient are checked against
ours (max abs diff <= ``--atol``; the script stops otherwise).

Variants are timed interleaved (one repeat = each variant once, in turn) and medians reported.
``--ref-moe FILE`` also times the ``MoELayer`` of another version of ``nexus_moe/moe.py`` (e.g.
``git show HEAD~1:src/nexus_moe/moe.py > /tmp/moe_old.py``) with the same weights, for
before/after comparisons in one run.

    .venv/bin/python benchmarks/moe_vs_hf.py --quick --threads 1
    .venv/bin/python benchmarks/moe_vs_hf.py --tokens 32768 --experts 8 --top-k 2 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nexus_moe.config import MoEConfig
from nexus_moe.moe import MoELayer, SwiGLU

HF_BACKENDS = ("eager", "grouped_mm", "batched_mm")


def build_ours(cell: dict[str, Any], args: argparse.Namespace) -> MoELayer:
    cfg = MoEConfig(
        num_experts=cell["experts"],
        top_k=cell["top_k"],
        shared_expert=cell["shared"],
        router="linear",
        renormalize=False,
        expert_intermediate_size=args.ffn,
    )
    layer = MoELayer(cfg, args.hidden, args.ffn, args.ffn)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "router" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return layer


def build_ref(ours: MoELayer, path: str) -> nn.Module:
    """``MoELayer`` from another copy of moe.py, holding ``ours``' weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_ref"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    ref = module.MoELayer(
        ours.cfg,
        ours.router.weight.shape[1],
        ours.shared_expert.gate_proj.weight.shape[0] if ours.shared_expert else 1,
        ours.experts.gate_proj.shape[1],
    )
    ref.load_state_dict(ours.state_dict())
    return ref


def build_hf(ours: MoELayer, cell: dict[str, Any], args: argparse.Namespace, backend: str):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.ffn,
        shared_expert_intermediate_size=args.ffn if cell["shared"] else 0,
        num_experts=cell["experts"],
        num_experts_per_tok=cell["top_k"],
        norm_topk_prob=False,
        hidden_act="silu",
    )
    config._experts_implementation = backend
    block = Qwen2MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        ex = ours.experts
        block.experts.gate_up_proj.copy_(torch.cat([ex.gate_proj, ex.up_proj], dim=1))
        block.experts.down_proj.copy_(ex.down_proj)
        block.shared_expert_gate.weight.zero_()
        if ours.shared_expert is not None:
            sh = ours.shared_expert
            block.shared_expert.gate_proj.weight.copy_(sh.gate_proj.weight)
            block.shared_expert.up_proj.weight.copy_(sh.up_proj.weight)
            block.shared_expert.down_proj.weight.copy_(sh.down_proj.weight * 2)  # x sigmoid(0)
    return block


def build_dense(cell: dict[str, Any], args: argparse.Namespace) -> SwiGLU:
    dense = SwiGLU(args.hidden, (cell["top_k"] + int(cell["shared"])) * args.ffn)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return dense


def batched_mm_gb(cell: dict[str, Any], args: argparse.Namespace) -> float:
    """GB of per-pair weight copies batched_mm materialises (gate_up + down, float32)."""
    pairs = cell["tokens"] * cell["top_k"]
    return pairs * 3 * args.ffn * args.hidden * 4 / 1e9


def output_of(module: nn.Module, x: torch.Tensor, is_ours: bool) -> torch.Tensor:
    if is_ours:
        return module(x)[0]
    return module(x)


def make_closures(
    module: nn.Module, kind: str, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward+backward, forward-only) closures for one variant."""
    is_ours = kind == "ours"

    def fwd_bwd() -> None:
        module.train()
        module.zero_grad(set_to_none=True)
        x.grad = None
        if is_ours:
            y, info = module(x)
            loss = (y * grad_out).sum() + info.load_balance_loss
        else:
            loss = (module(x) * grad_out).sum()
        loss.backward()

    def fwd() -> None:
        module.eval()
        with torch.no_grad():
            output_of(module, x, is_ours)

    return fwd_bwd, fwd


def check_equal(ours: MoELayer, hf: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """Max abs difference of output and input gradient (no aux loss on either side)."""
    diffs = []
    grads = []
    for module, is_ours in ((ours, True), (hf, False)):
        module.train()
        xi = x.detach().clone().requires_grad_()
        y = output_of(module, xi, is_ours)
        (y * grad_out).sum().backward()
        diffs.append(y.detach())
        grads.append(xi.grad)
        module.zero_grad(set_to_none=True)
    return max((diffs[0] - diffs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item())


def run_cell(cell: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(1, cell["tokens"], args.hidden, generator=gen)
    grad_out = torch.randn(1, cell["tokens"], args.hidden, generator=gen)
    ours = build_ours(cell, args)
    variants: dict[str, tuple[nn.Module, str]] = {
        "dense": (build_dense(cell, args), "dense"),
        "ours": (ours, "ours"),
    }
    if args.ref_moe:
        variants["ref"] = (build_ref(ours, args.ref_moe), "ours")
    notes = []
    max_diff = 0.0
    for backend in args.backends:
        if backend == "batched_mm" and batched_mm_gb(cell, args) > args.batched_mm_max_gb:
            notes.append(f"batched_mm skipped ({batched_mm_gb(cell, args):.1f} GB of weights)")
            continue
        hf = build_hf(ours, cell, args, backend)
        try:
            diff = check_equal(ours, hf, x, grad_out)
        except Exception as exc:  # a backend that does not run here is reported, not fatal
            notes.append(f"{backend} failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if diff > args.atol:
            raise SystemExit(f"{cell}: HF {backend} differs from ours by {diff:.3g} > {args.atol}")
        max_diff = max(max_diff, diff)
        variants[f"hf {backend}"] = (hf, "hf")
    xg = x.clone().requires_grad_()
    closures = {name: make_closures(m, kind, xg, grad_out) for name, (m, kind) in variants.items()}
    for fb, f in closures.values():  # warmup
        for _ in range(args.warmup):
            fb()
            f()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "fwd": []} for n in closures}
    for _ in range(args.repeats):
        for name, (fb, f) in closures.items():
            for label, fn in (("fwd_bwd", fb), ("fwd", f)):
                start = clock()
                fn()
                times[name][label].append(clock() - start)
    med = {n: {k: statistics.median(v) * 1e3 for k, v in t.items()} for n, t in times.items()}
    return {**cell, "ms": med, "ms_all": times, "max_abs_diff": max_diff, "notes": notes}


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    ms = row["ms"]
    out = {}
    for label in ("fwd_bwd", "fwd"):
        hf = {n: v[label] for n, v in ms.items() if n.startswith("hf ")}
        best = min(hf, key=hf.get) if hf else None
        out[label] = {
            "ours_ms": ms["ours"][label],
            "dense_ms": ms["dense"][label],
            "best_hf": best,
            "best_hf_ms": hf[best] if best else float("nan"),
            "ours_vs_best_hf": ms["ours"][label] / hf[best] if best else float("nan"),
            "ours_vs_dense": ms["ours"][label] / ms["dense"][label],
        }
    return out


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"hidden {args.hidden}, FFN {args.ffn} per expert (shared expert: same width), fp32; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.2f} at the end; "
        f"medians of {args.repeats} interleaved repeats of {args.clock} time"
    )
    backends = [f"hf {b}" for b in args.backends]
    head = (
        f"{'tokens':>6} | {'E':>2} | {'k':>1} | {'sh':>2} | {'pass':>7} | {'ours ms':>8} | "
        + " | ".join(f"{b:>13}" for b in backends)
        + f" | {'dense ms':>8} | {'ours/best HF':>12} | {'ours/dense':>10}"
        + (f" | {'ref ms':>8} | {'ours/ref':>8}" if args.ref_moe else "")
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        s = summarise(row)
        for label in ("fwd_bwd", "fwd"):
            cols = [
                f"{row['ms'][b][label]:>13.1f}" if b in row["ms"] else f"{'-':>13}"
                for b in backends
            ]
            print(
                f"{row['tokens']:>6} | {row['experts']:>2} | {row['top_k']:>1} | "
                f"{'y' if row['shared'] else 'n':>2} | {label:>7} | "
                f"{row['ms']['ours'][label]:>8.1f} | "
                + " | ".join(cols)
                + f" | {row['ms']['dense'][label]:>8.1f} | "
                f"{s[label]['ours_vs_best_hf']:>11.2f}x | {s[label]['ours_vs_dense']:>9.2f}x"
                + (
                    f" | {row['ms']['ref'][label]:>8.1f} | "
                    f"{row['ms']['ours'][label] / row['ms']['ref'][label]:>7.2f}x"
                    if args.ref_moe
                    else ""
                )
            )
    # Targets: ours <= fastest HF backend everywhere; ours <= 1.25x dense at >= 8k tokens.
    hf_miss = [
        (r["tokens"], r["experts"], r["top_k"], r["shared"], lab)
        for r in rows
        for lab in ("fwd_bwd", "fwd")
        if summarise(r)[lab]["ours_vs_best_hf"] > 1.0
    ]
    dense_miss = [
        (r["tokens"], r["experts"], r["top_k"], r["shared"], lab)
        for r in rows
        for lab in ("fwd_bwd", "fwd")
        if r["tokens"] >= 8192 and summarise(r)[lab]["ours_vs_dense"] > 1.25
    ]
    worst_hf = max(summarise(r)[lab]["ours_vs_best_hf"] for r in rows for lab in ("fwd_bwd", "fwd"))
    print(
        f"target ours <= fastest HF backend: {'met' if not hf_miss else 'MISSED'} "
        f"(worst {worst_hf:.2f}x){'' if not hf_miss else '; misses: ' + str(hf_miss)}"
    )
    # Noise check: ours / best HF per repeat (the variants of a repeat ran back to back); a miss
    # is clear when even the lower quartile of those paired ratios is above 1.
    clear = []
    for r in rows:
        for lab in ("fwd_bwd", "fwd"):
            best = summarise(r)[lab]["best_hf"]
            if best is None:
                continue
            mine, theirs = r["ms_all"]["ours"][lab], r["ms_all"][best][lab]
            paired = [a / b for a, b in zip(mine, theirs, strict=True)]
            q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
            r.setdefault("paired_iqr", {})[lab] = (q1, q3)
            if q1 > 1.0:
                clear.append(
                    (r["tokens"], r["experts"], r["top_k"], r["shared"], lab, round(q1, 2))
                )
    print(
        f"misses outside the noise (lower quartile of per-repeat ours/best-HF ratios > 1): "
        f"{len(clear)} of {2 * len(rows)} cells{': ' + str(clear) if clear else ''}"
    )
    big = [r for r in rows if r["tokens"] >= 8192]
    if big:
        worst_d = max(summarise(r)[lab]["ours_vs_dense"] for r in big for lab in ("fwd_bwd", "fwd"))
        print(
            f"target ours <= 1.25x dense at >= 8k tokens: {'met' if not dense_miss else 'MISSED'} "
            f"(worst {worst_d:.2f}x){'' if not dense_miss else '; misses: ' + str(dense_miss)}"
        )
    notes = sorted({n for r in rows for n in r["notes"]})
    diff = max(r["max_abs_diff"] for r in rows)
    print(f"outputs and input gradients checked: max abs diff ours vs HF {diff:.2g}")
    for n in notes:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--quick", action="store_true", help="tokens 1024 and 8192 only")
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shared", choices=["yes", "no", "both"], default="both")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument(
        "--backends",
        nargs="+",
        choices=HF_BACKENDS,
        default=["eager", "grouped_mm"],
        help="HF experts implementations (batched_mm: ~50x slower here, so not by default)",
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time (all threads; least disturbed by other jobs with --threads 1)",
    )
    p.add_argument("--batched-mm-max-gb", type=float, default=2.0)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-moe", metavar="FILE", help="also time MoELayer from this moe.py")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [t for t in args.tokens if t <= 8192] if args.quick else args.tokens
    shared = {"yes": [True], "no": [False], "both": [True, False]}[args.shared]
    print(f"load {os.getloadavg()[0]:.2f} at the start")
    rows = []
    for t, e, k, s in itertools.product(tokens, args.experts, args.top_k, shared):
        rows.append(run_cell({"tokens": t, "experts": e, "top_k": k, "shared": s}, args))
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
