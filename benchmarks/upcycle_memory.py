"""Peak memory of streamed upcycling (docs/design.md §5): it should stay near ONE input model.

Creates a seed and ``--experts`` synthetic dense checkpoints of ~500 MB each (float32 random
weights), then runs ``upcycle`` in a fresh subprocess and reads that process's peak resident set
(``VmHWM`` from /proc, which counts the memory-mapped input pages too). A second subprocess that
only imports the package gives the interpreter + torch baseline.

    .venv/bin/python benchmarks/upcycle_memory.py                    # nexus-paper, 4 experts, ~500 MB
    .venv/bin/python benchmarks/upcycle_memory.py --method moe-linear --workdir /big/disk

``ru_maxrss`` of children is not used: with vfork-based spawning Linux folds the parent's
high-water mark into the child's, so the parent's memory would pollute the figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nexus_moe.checkpoint import WEIGHTS_FILE, save_checkpoint
from nexus_moe.config import ModelConfig
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.model import Transformer

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux: VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def make_checkpoint(path: Path, cfg: ModelConfig, seed: int, domain: str | None, tok: Path):
    """A dense checkpoint with random weights, built and written one model at a time."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")  # skip the slow default init; filled just below
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen).mul_(cfg.init_std))
    metadata = {"stage": "branch", "domain": domain} if domain else {"stage": "seed"}
    save_checkpoint(path, model, tokenizer_path=tok, metadata=metadata)


def run_child(payload: dict) -> dict:
    """Run this file in ``--child`` mode in a fresh interpreter; returns its JSON report."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(payload)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(payload: dict) -> None:
    """Subprocess body: optionally upcycle, then report peak RSS and wall time as JSON."""
    from nexus_moe.upcycle import upcycle

    wall = 0.0
    if payload.get("method"):
        emb = DomainEmbeddings.load(payload["embeddings"])
        start = time.perf_counter()
        upcycle(
            payload["method"],
            Path(payload["seed"]),
            [Path(p) for p in payload["experts"]],
            Path(payload["out"]),
            domain_embeddings=emb,
        )
        wall = time.perf_counter() - start
    print(json.dumps({"peak_rss": peak_rss_bytes(), "wall_s": wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method", default="nexus-paper", choices=["nexus-paper", "moe-linear", "btx"]
    )
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="upcycle-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        tok = workdir / "tokenizer.json"
        tok.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
        domains = [f"domain{i}" for i in range(args.experts)]
        start = time.perf_counter()
        make_checkpoint(workdir / "seed", cfg, 0, None, tok)
        for i, domain in enumerate(domains):
            make_checkpoint(workdir / domain, cfg, i + 1, domain, tok)
        print(f"made {args.experts + 1} checkpoints in {time.perf_counter() - start:.1f}s")
        DomainEmbeddings(domains, torch.randn(len(domains), 384), "synthetic", 384, 1).save(
            workdir / "emb"
        )

        one_input = (workdir / "seed" / WEIGHTS_FILE).stat().st_size
        baseline = run_child({})
        result = run_child(
            {
                "method": args.method,
                "seed": str(workdir / "seed"),
                "experts": [str(workdir / d) for d in domains],
                "out": str(workdir / "out"),
                "embeddings": str(workdir / "emb"),
            }
        )
        output = (workdir / "out" / WEIGHTS_FILE).stat().st_size
        peak = result["peak_rss"]
        rows = [
            ("one input checkpoint", f"{one_input / MIB:8.0f} MiB"),
            (
                f"all inputs (seed + {args.experts})",
                f"{one_input * (args.experts + 1) / MIB:8.0f} MiB",
            ),
            (f"output ({args.method})", f"{output / MIB:8.0f} MiB"),
            ("baseline RSS (python + torch)", f"{baseline['peak_rss'] / MIB:8.0f} MiB"),
            ("peak RSS during upcycle", f"{peak / MIB:8.0f} MiB"),
            ("peak RSS / one input", f"{peak / one_input:8.2f}    (target <= 2.00)"),
            ("(peak - baseline) / one input", f"{(peak - baseline['peak_rss']) / one_input:8.2f}"),
            ("wall time", f"{result['wall_s']:8.1f} s"),
        ]
        for label, value in rows:
            print(f"{label:<32}{value}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
