"""Peak memory of streamed upcycling (docs/design.md §5): it should stay near ONE input model.

Creates a seed and ``--experts`` synthetic dense checkpoints of ~500 MB each (float32 random
weights), then runs ``upcycle`` in a fresh subprocess and reads that process's peak resident set
(``VmHWM`` from /proc, which counts the memory-mapped input pages too). A second subprocess that
only imports the package gives the interpreter + torch baseline.

    .venv/bin/python benchmarks/upcycle_memory.py                    # nexus-paper, 4 experts, ~500 MB
    .venv/bin/python benchmarks/upcycle_memory.py --method moe-linear --workdir /big/disk
    .venv/bin/python benchmarks/upcycle_memory.py --calibrated      # see below

``--calibrated``: the experts are branched FFN-only (every other weight is the seed's), each
with a domain of synthetic tokens, and the plug-in ``nexus`` MoE (per-token routing, so a
Hugging Face format can hold it) is upcycled with a calibrated router straight to a
``--format mixtral`` folder, which measures each domain on its dense expert alone (docs/design.md
§5.7). It is compared, in the same run, with the path that calibrates the assembled MoE (native
output; forced here, since FFN-only experts no longer take it) and with one dense expert plus
the statistics written with the MoE (the target: peak within 1.3x of those).
Each upcycle runs as `nexus-moe upcycle` does, with glibc's mmap threshold held fixed
(``nexus_moe.memory``); one more row leaves it moving, as glibc does by default.

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

from nexus_moe.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, save_checkpoint
from nexus_moe.config import ModelConfig
from nexus_moe.data import META_FILE
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


def make_checkpoint(
    path: Path,
    cfg: ModelConfig,
    seed: int,
    domain: str | None,
    tok: Path,
    ffn_only_of: int | None = None,
):
    """A dense checkpoint with random weights, built and written one model at a time;
    ``ffn_only_of``: every weight but the FFNs is that seed's (an expert branched FFN-only)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")  # skip the slow default init; filled just below
    gen = torch.Generator().manual_seed(seed if ffn_only_of is None else ffn_only_of)
    ffn_gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            own = ffn_only_of is not None and ".mlp." in name
            values = torch.randn(param.shape, generator=ffn_gen if own else gen)
            param.copy_(values.mul_(cfg.init_std))
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


def make_token_shards(path: Path, domains: list[str], vocab: int, tokens: int) -> None:
    """Token shards (``data.TokenShards``) of random tokens, one training split per domain."""
    meta = {"dtype": "uint16", "vocab_size": vocab, "tokenizer_sha256": "synthetic", "domains": {}}
    for i, domain in enumerate(domains):
        gen = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, vocab, (tokens,), generator=gen).to(torch.int32).numpy()
        (path / domain).mkdir(parents=True)
        ids.astype("uint16").tofile(path / domain / "train.bin")
        meta["domains"][domain] = {"train": {"tokens": tokens, "bytes": tokens, "documents": 1}}
    (path / META_FILE).write_text(json.dumps(meta))


def child(payload: dict) -> None:
    """Subprocess body: optionally upcycle, then report peak RSS and wall time as JSON."""
    from nexus_moe import upcycle as upcycle_module
    from nexus_moe.data import TokenShards

    wall = 0.0
    if payload.get("method"):
        if not payload.get("moving_threshold"):  # as `nexus-moe upcycle` does
            from nexus_moe.memory import fix_mmap_threshold

            fix_mmap_threshold()
        emb = DomainEmbeddings.load(payload["embeddings"])
        shards = TokenShards(Path(payload["corpus"])) if payload.get("corpus") else None
        if payload.get("force_moe_path"):  # the path FFN-only experts no longer take
            upcycle_module._calibrates_on_dense = lambda *args: False
        start = time.perf_counter()
        upcycle_module.upcycle(
            payload["method"],
            Path(payload["seed"]),
            [Path(p) for p in payload["experts"]],
            Path(payload["out"]),
            domain_embeddings=emb,
            moe_overrides=payload.get("overrides"),
            calibration_shards=shards,
            calibrate_router=shards is not None,
            out_format=payload.get("format", "native"),
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
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="FFN-only experts, calibrated nexus upcycle to --format mixtral (see above)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.calibrated:
        calibrated(args)
        return

    cfg, workdir = _setup(args)
    try:
        tok = workdir / TOKENIZER_FILE
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


def _setup(args: argparse.Namespace, max_vocab: int | None = None) -> tuple[ModelConfig, Path]:
    """The model config of the command line and the work folder (made)."""
    cfg = ModelConfig(
        vocab_size=args.vocab if max_vocab is None else min(args.vocab, max_vocab),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="upcycle-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return cfg, workdir


def calibrated(args: argparse.Namespace) -> None:
    """The ``--calibrated`` comparison (module docstring)."""
    from nexus_moe.calibrate import STATS_FILE
    from nexus_moe.config import DEFAULT_CALIBRATION_TOKENS

    cfg, workdir = _setup(args, max_vocab=65535)  # uint16 token shards
    try:
        tok = workdir / TOKENIZER_FILE  # a Hugging Face folder needs a real one
        from tokenizers import Tokenizer, models

        bpe = models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>")
        Tokenizer(bpe).save(str(tok))
        domains = [f"domain{i}" for i in range(args.experts)]
        make_checkpoint(workdir / "seed", cfg, 0, None, tok)
        for i, domain in enumerate(domains):
            make_checkpoint(workdir / domain, cfg, i + 1, domain, tok, ffn_only_of=0)
        make_token_shards(
            workdir / "tokens", domains, cfg.vocab_size, 2 * DEFAULT_CALIBRATION_TOKENS
        )
        DomainEmbeddings(domains, torch.randn(len(domains), 384), "synthetic", 384, 1).save(
            workdir / "emb"
        )
        common = {
            "method": "nexus",
            "seed": str(workdir / "seed"),
            "experts": [str(workdir / d) for d in domains],
            "embeddings": str(workdir / "emb"),
            "corpus": str(workdir / "tokens"),
            "overrides": {"router_context": 0.0},
        }
        baseline = run_child({})
        dense = run_child({**common, "out": str(workdir / "mixtral"), "format": "mixtral"})
        moving = run_child(
            {
                **common,
                "out": str(workdir / "moving"),
                "format": "mixtral",
                "moving_threshold": True,
            }
        )
        native = run_child({**common, "out": str(workdir / "native")})
        forced = run_child({**common, "out": str(workdir / "forced"), "force_moe_path": True})
        one_input = (workdir / "seed" / WEIGHTS_FILE).stat().st_size
        stats = (workdir / "native" / STATS_FILE).stat().st_size
        reference = one_input + stats
        rows = [
            ("one dense expert", f"{one_input / MIB:8.0f} MiB"),
            ("statistics written with the MoE", f"{stats / MIB:8.0f} MiB"),
            ("baseline RSS (python + torch)", f"{baseline['peak_rss'] / MIB:8.0f} MiB"),
        ]
        for label, result in [
            ("--format mixtral, on each dense expert", dense),
            ("the same, glibc's moving mmap threshold", moving),
            ("native, on each dense expert", native),
            ("native, on the assembled MoE (before)", forced),
        ]:
            ratio = result["peak_rss"] / reference
            above = (result["peak_rss"] - baseline["peak_rss"]) / reference
            rows.append(
                (
                    label,
                    f"{result['peak_rss'] / MIB:8.0f} MiB  {ratio:5.2f}x expert + statistics "
                    f"({above:5.2f}x above the baseline)  {result['wall_s']:6.1f} s",
                )
            )
        for label, value in rows:
            print(f"{label:<42}{value}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
