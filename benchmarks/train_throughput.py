"""Dense training throughput: tokens/s and achieved FLOP/s, fp32 vs bf16 autocast.

Builds a dense :class:`nexus_moe.model.Transformer` and times full training steps the way
:class:`nexus_moe.train.Trainer` runs them (forward, LM loss, backward, gradient clipping, AdamW
from :func:`nexus_moe.train.build_optimizer`) on random token batches, in float32 and under bf16
autocast. In the same run it times a large square matmul in each dtype and reports the achieved
FLOP/s as a fraction of that measured matmul peak.

The two dtypes and the matmul peaks are measured interleaved (fp32 step, fp32 matmul, bf16 step,
bf16 matmul, repeat) and the medians are reported, so background load hits all of them alike.

    .venv/bin/python benchmarks/train_throughput.py                  # configs/tiny.yaml's model
    .venv/bin/python benchmarks/train_throughput.py --size small --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from nexus_moe.config import ModelConfig
from nexus_moe.losses import language_model_loss
from nexus_moe.model import Transformer
from nexus_moe.train import TrainConfig, build_optimizer

# hidden, intermediate, layers, heads, kv heads ("tiny" is the model of configs/tiny.yaml)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 352, 4, 4, 2),
    "small": (256, 704, 4, 4, 2),
    "medium": (512, 1408, 4, 8, 4),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def model_config(args: argparse.Namespace) -> ModelConfig:
    hidden, inter, layers, heads, kv_heads = SIZES[args.size]
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=args.layers or layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_seq_len=max(args.seq, 512),
    )


def train_flops_per_token(model: Transformer, cfg: ModelConfig, seq: int) -> tuple[float, int]:
    """Training FLOPs per token and the matmul parameter count behind them.

    FLOPs/token = 6 * P_matmul + 12 * L * (n_heads * head_dim) * T

    * ``P_matmul``: every weight that takes part in a matmul, i.e. all >= 2-D parameters except
      the input embedding table (a lookup, not a matmul); the lm_head *is* counted (with tied
      embeddings its single weight is counted once, as the lm_head). Norm weights (1-D) are
      left out: they are elementwise. 6 = 2 (multiply-add) * 3 (forward + two backward matmuls).
    * attention scores and weighted values: 2 matmuls of 2 * T * d_attn FLOPs per token and layer
      in the forward pass, times 3 for forward + backward -> 12 * L * d_attn * T. The causal mask
      is not halved (the PaLM / Chinchilla MFU convention), so this slightly over-credits SDPA.
    """
    embed = model.model.embed_tokens.weight
    p_matmul = sum(
        p.numel()
        for p in model.parameters()
        if p.ndim >= 2 and (p is not embed or cfg.tie_embeddings)
    )
    assert cfg.head_dim is not None
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    return 6.0 * p_matmul + attn, p_matmul


def make_step(
    model: Transformer, opt: torch.optim.Optimizer, dtype: torch.dtype | None, clip: float
):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = model(inputs)
            loss = language_model_loss(out.logits, targets) + out.aux_loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # a sync point, as in the trainer's logging

    return step


def square_operands(n: int, dtype: torch.dtype, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return a, (b.t() if layout == "NT" else b)


def add_allocator_option(p: argparse.ArgumentParser) -> None:
    """``--allocator tuned|default`` (shared with the other training benchmarks)."""
    p.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: nexus_moe.train.tune_cpu_allocator(), as the CLI's train/branch/run do",
    )


def apply_allocator_option(args: argparse.Namespace) -> str:
    """Apply ``--allocator`` (process-wide, so once per process); what is in effect."""
    if args.allocator != "tuned":
        return "glibc default"
    from nexus_moe.train import tune_cpu_allocator

    return "tuned (as the CLI)" if tune_cpu_allocator() else "default (tuning n/a)"


def time_call(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    allocator = apply_allocator_option(args)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")

    # One model + optimizer per dtype, all from the same initial weights.
    base = Transformer(cfg)
    flops_per_token, p_matmul = train_flops_per_token(base, cfg, args.seq)
    tcfg = TrainConfig(lr=1e-3, batch_size=args.batch, seq_len=args.seq)
    steps = {}
    for d in dtypes:
        model = Transformer(cfg)
        model.load_state_dict(base.state_dict())
        model.train()
        steps[d] = make_step(model, build_optimizer(model, tcfg), DTYPES[d], tcfg.grad_clip)

    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        for _ in range(4)
    ]
    # Matmul peak operands: a (n, n) @ b, where b is either a plain (n, n) matrix ("NN") or the
    # transpose of one ("NT", the layout nn.Linear multiplies by). The faster layout is picked per
    # dtype with a quick probe at n = 256: on this torch's CPU build a bf16 NN matmul without
    # native bf16 (no AVX512-BF16 / AMX) falls back to a slow reference kernel (~1 GFLOP/s),
    # while NT goes through MKL/oneDNN. If one matmul at --matmul-size still takes longer than
    # --matmul-budget seconds, the largest halved size that fits is used (n is reported).
    mats: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
    for d in dtypes:
        dt = DTYPES[d] or torch.float32
        probe = {layout: square_operands(256, dt, layout) for layout in ("NN", "NT")}
        for a, b in probe.values():
            torch.mm(a, b)  # warmup
        layout = min(probe, key=lambda lay: time_call(torch.mm, *probe[lay]))
        n = args.matmul_size
        while True:
            a, b = square_operands(n, dt, layout)
            torch.mm(a, b)  # warmup
            if time_call(torch.mm, a, b) <= args.matmul_budget or n <= 256:
                break
            n //= 2
        mats[d] = (a, b, layout)

    def matmul(d: str) -> None:
        a, b, _ = mats[d]
        for _ in range(args.matmul_iters):
            torch.mm(a, b)

    def train(d: str, i: int) -> None:
        for j in range(args.steps_per_rep):
            batch = batches[(i + j) % len(batches)]
            steps[d](batch[:, :-1], batch[:, 1:])

    for d in dtypes:  # warmup: allocator, oneDNN kernels, optimizer state
        for i in range(args.warmup):
            train(d, i)

    step_times: dict[str, list[float]] = {d: [] for d in dtypes}
    mm_times: dict[str, list[float]] = {d: [] for d in dtypes}
    for rep in range(args.repeats):
        for d in dtypes:
            step_times[d].append(time_call(train, d, rep) / args.steps_per_rep)
            mm_times[d].append(time_call(matmul, d) / args.matmul_iters)

    tokens_per_step = args.batch * args.seq
    rows = []
    for d in dtypes:
        step_s = statistics.median(step_times[d])
        mm_s = statistics.median(mm_times[d])
        n, layout = mats[d][0].shape[0], mats[d][2]
        tps = tokens_per_step / step_s
        achieved = tps * flops_per_token
        peak = 2.0 * n**3 / mm_s
        rows.append(
            {
                "dtype": d,
                "step_ms": step_s * 1e3,
                "tokens_per_s": tps,
                "achieved_gflops": achieved / 1e9,
                "matmul_peak_gflops": peak / 1e9,
                "matmul_size": n,
                "matmul_layout": layout,
                "ratio": achieved / peak,
                "step_ms_all": [t * 1e3 for t in step_times[d]],
            }
        )
    return {
        "allocator": allocator,
        "benchmark": "train_throughput",
        "size": args.size,
        "model": {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "vocab_size": cfg.vocab_size,
            "params_total": base.num_params(),
            "params_matmul": p_matmul,
        },
        "batch_size": args.batch,
        "seq_len": args.seq,
        "flops_per_token": flops_per_token,
        "flops_formula": "6 * P_matmul (all 2-D weights incl. lm_head, excl. embedding) "
        "+ 12 * layers * n_heads * head_dim * seq",
        "repeats": args.repeats,
        "steps_per_rep": args.steps_per_rep,
        "machine": machine_info(),
        "rows": rows,
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import os

        info["loadavg_1m"] = os.getloadavg()[0]
        info["cpu_count"] = os.cpu_count()
    except OSError:
        pass
    return info


def print_table(result: dict[str, Any]) -> None:
    m = result["model"]
    mach = result["machine"]
    print(
        f"dense Transformer ({result['size']}): hidden {m['hidden_size']}, inter "
        f"{m['intermediate_size']}, {m['num_layers']} layers, {m['num_heads']}/{m['num_kv_heads']}"
        f" heads, vocab {m['vocab_size']}; {m['params_total'] / 1e6:.2f}M params "
        f"({m['params_matmul'] / 1e6:.2f}M in matmuls)"
    )
    print(
        f"batch {result['batch_size']} x seq {result['seq_len']}; "
        f"{result['flops_per_token'] / 1e6:.1f} MFLOP/token; matmul peak: n x n @ n x n "
        f"(n, layout in the table; NT = second operand transposed); medians of {result['repeats']} interleaved repeats"
    )
    print(
        f"torch {mach['torch']}, {mach['threads']} threads, {mach['cpu_capability']}, "
        f"load {mach.get('loadavg_1m', float('nan')):.2f}; allocator {result['allocator']}"
    )
    header = f"{'dtype':<6} | {'step ms':>8} | {'tokens/s':>9} | {'achieved GFLOP/s':>16} | {'matmul peak GFLOP/s':>19} | {'n':>4} | {'layout':>6} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['dtype']:<6} | {r['step_ms']:>8.1f} | {r['tokens_per_s']:>9,.0f} | "
            f"{r['achieved_gflops']:>16.1f} | {r['matmul_peak_gflops']:>19.1f} | "
            f"{r['matmul_size']:>4} | {r['matmul_layout']:>6} | "
            f"{r['ratio']:>6.1%}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--layers", type=int, default=0, help="override the size's layer count")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    p.add_argument("--warmup", type=int, default=2, help="warmup steps per dtype")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats")
    p.add_argument("--steps-per-rep", type=int, default=1, help="training steps per repeat")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-iters", type=int, default=1, help="matmuls per repeat")
    p.add_argument(
        "--matmul-budget",
        type=float,
        default=2.0,
        help="seconds one peak matmul may take before its size is halved",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    add_allocator_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
