"""Our upcycling vs ``mergekit-moe``: wall time and peak memory, dense Llama inputs -> Qwen2-MoE.

Writes a seed and ``--experts`` dense Llama-format Hugging Face checkpoints (random float32
weights, ~500 MB each with the defaults; written with ``nexus_moe.hf.export_hf``, plus a small
word-level ``tokenizer.json`` because mergekit loads the tokenizer), then builds a Qwen2-MoE
checkpoint (routed experts = the experts' FFNs, shared expert = the seed's FFN, top-1) both ways:

* ours: one ``nexus-moe upcycle --method moe-linear --format qwen2_moe`` command reading the
  Hugging Face folders in place (``--domains`` names the experts: a Hugging Face folder has no
  domain metadata);
* with ``--three-step`` also the older route, one subprocess per step, timed separately and
  summed: ``nexus-moe import`` of each input, ``nexus-moe upcycle`` of the native checkpoints,
  ``nexus-moe export --format qwen2_moe``;
* mergekit: one ``mergekit-moe`` run with ``architecture: qwen``, ``gate_mode: random``, the seed
  as ``base_model`` and as the one shared expert, ``experts_per_token: 1``, ``dtype: float32``.

The two do not do identical work: mergekit copies the base model's attention/embedding weights,
ours averages them over the experts (moe-linear), so ours reads 4x the non-FFN weights. Both
write the same 1.5 GB. Peak memory is each process's ``VmHWM`` (peak resident set,
memory-mapped input pages included), read from /proc/<pid>/status by polling; a multi-step
pipeline's peak is the largest over its steps. mergekit lives in its own virtual environment (it pins other versions of
transformers/pydantic); pass its ``mergekit-moe`` with ``--mergekit-bin``; if absent, that side
is skipped with a message.

    .venv/bin/python benchmarks/upcycle_vs_mergekit.py --mergekit-bin /tmp/mk-venv/bin/mergekit-moe --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str], poll_s: float = 0.02) -> dict:
    """Run ``cmd``; wall seconds and peak RSS (VmHWM, polled) of its process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"cmd": cmd, "wall_s": wall, "peak_rss": peak}


MAKE_INPUT = """
import sys, json, torch
from pathlib import Path
from nexus_moe.config import ModelConfig
from nexus_moe.hf import export_hf
from nexus_moe.model import Transformer
cfg = ModelConfig(**json.loads(sys.argv[1]))
out, seed, tok = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with torch.device("meta"):
    model = Transformer(cfg)
model = model.to_empty(device="cpu")
model.init_buffers()
gen = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen).mul_(cfg.init_std))
export_hf(model, out, fmt="llama", tokenizer_path=tok)
"""


def make_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, min(vocab_size, 1000))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))


def mergekit_config(seed: Path, experts: list[Path]) -> str:
    lines = [
        f"base_model: {seed}",
        "architecture: qwen",
        "gate_mode: random",
        "dtype: float32",
        "experts_per_token: 1",
        "experts:",
    ]
    for i, e in enumerate(experts):
        lines += [f"  - source_model: {e}", "    positive_prompts:", f'      - "domain {i}"']
    lines += ["shared_experts:", f"  - source_model: {seed}"]
    return "\n".join(lines) + "\n"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mergekit-bin", type=Path, default=Path("/tmp/mk-venv/bin/mergekit-moe"))
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    p.add_argument(
        "--three-step", action="store_true", help="also time import x n + upcycle + export"
    )
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir in /tmp")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args()

    py = sys.executable
    cli = str(Path(py).parent / "nexus-moe")
    have_mergekit = args.mergekit_bin.is_file() and os.access(args.mergekit_bin, os.X_OK)
    if not have_mergekit:
        print(f"mergekit-moe not found at {args.mergekit_bin}: skipping the mergekit side")
    cfg = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="upcycle-vs-mergekit-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"ours": [], "ours_3step": [], "mergekit": []}
    try:
        tok = work / "tokenizer.json"
        make_tokenizer(tok, args.vocab)
        names = ["seed"] + [f"expert{i}" for i in range(args.experts)]
        start = time.perf_counter()
        for i, name in enumerate(names):
            run_measured(
                [py, "-c", MAKE_INPUT, json.dumps(cfg), str(work / "hf" / name), str(i), str(tok)]
            )
        one_input = dir_size(work / "hf" / "seed")
        print(
            f"made {len(names)} dense Llama checkpoints of {one_input / MIB:.0f} MiB in "
            f"{time.perf_counter() - start:.0f}s"
        )
        baseline = run_measured([py, "-c", "import torch, nexus_moe.hf"])["peak_rss"]

        def ours() -> dict:
            shutil.rmtree(work / "ours_out", ignore_errors=True)
            cmd = [cli, "upcycle", "--method", "moe-linear", "--format", "qwen2_moe"]
            cmd += ["--seed", str(work / "hf" / "seed"), "--out", str(work / "ours_out")]
            for n in names[1:]:
                cmd += ["--expert", str(work / "hf" / n)]
            cmd += ["--domains", ",".join(names[1:])]
            r = run_measured(cmd)
            out = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}
            out["output_bytes"] = dir_size(work / "ours_out")
            shutil.rmtree(work / "ours_out", ignore_errors=True)
            return out

        def ours_three_step() -> dict:
            steps = {}
            for name in names:
                shutil.rmtree(work / "nx" / name, ignore_errors=True)
                steps[f"import {name}"] = run_measured(
                    [cli, "import", str(work / "hf" / name), "--out", str(work / "nx" / name)]
                )
            shutil.rmtree(work / "nx_moe", ignore_errors=True)
            upcycle_cmd = [cli, "upcycle", "--method", "moe-linear"]
            upcycle_cmd += ["--seed", str(work / "nx" / "seed"), "--out", str(work / "nx_moe")]
            for n in names[1:]:
                upcycle_cmd += ["--expert", str(work / "nx" / n)]
            upcycle_cmd += ["--domains", ",".join(names[1:])]
            steps["upcycle moe-linear"] = run_measured(upcycle_cmd)
            shutil.rmtree(work / "ours_out", ignore_errors=True)
            steps["export qwen2_moe"] = run_measured(
                [
                    cli,
                    "export",
                    str(work / "nx_moe"),
                    "--out",
                    str(work / "ours_out"),
                    "--format",
                    "qwen2_moe",
                ]
            )
            out_size = dir_size(work / "ours_out")
            for n in names:  # intermediate checkpoints: not needed any more
                shutil.rmtree(work / "nx" / n, ignore_errors=True)
            shutil.rmtree(work / "nx_moe", ignore_errors=True)
            shutil.rmtree(work / "ours_out", ignore_errors=True)
            return {
                "steps": {
                    k: {"wall_s": v["wall_s"], "peak_rss": v["peak_rss"]} for k, v in steps.items()
                },
                "wall_s": sum(v["wall_s"] for v in steps.values()),
                "peak_rss": max(v["peak_rss"] for v in steps.values()),
                "output_bytes": out_size,
            }

        def mergekit() -> dict:
            conf = work / "mergekit.yaml"
            conf.write_text(
                mergekit_config(work / "hf" / "seed", [work / "hf" / n for n in names[1:]])
            )
            shutil.rmtree(work / "mk_out", ignore_errors=True)
            r = run_measured([str(args.mergekit_bin), str(conf), str(work / "mk_out"), "--quiet"])
            out = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}
            out["output_bytes"] = dir_size(work / "mk_out")
            config = json.loads((work / "mk_out" / "config.json").read_text())
            out["architecture"] = config.get("architectures")
            shutil.rmtree(work / "mk_out", ignore_errors=True)
            return out

        for _ in range(args.repeats):  # alternate, so slow phases of the machine hit both
            results["ours"].append(ours())
            if args.three_step:
                results["ours_3step"].append(ours_three_step())
            if have_mergekit:
                results["mergekit"].append(mergekit())

        print(
            f"{args.experts} experts + seed, hidden {args.hidden}, FFN {args.intermediate}, "
            f"{args.layers} layers, vocab {args.vocab}, float32; one input {one_input / MIB:.0f} MiB;"
            f" python+torch baseline RSS {baseline / MIB:.0f} MiB; load {os.getloadavg()[0]:.2f}"
        )
        if args.three_step:
            last = results["ours_3step"][-1]
            print(f"{'step (ours, three-step route)':<30} | {'wall s':>7} | {'peak RSS MiB':>12}")
            for k, v in last["steps"].items():
                print(f"{k:<30} | {v['wall_s']:>7.1f} | {v['peak_rss'] / MIB:>12.0f}")
            print()
        head = f"{'pipeline (median wall, max peak)':<44} | {'wall s':>7} | {'peak RSS MiB':>12} | {'output MiB':>10}"
        print(head)
        print("-" * len(head))
        rows = [("ours: nexus-moe upcycle --format qwen2_moe", results["ours"])]
        if args.three_step:
            rows.append((f"ours: import x{len(names)} + upcycle + export", results["ours_3step"]))
        if have_mergekit:
            rows.append(("mergekit-moe (qwen, gate_mode random)", results["mergekit"]))
        med = {}
        for label, rs in rows:
            wall = sorted(r["wall_s"] for r in rs)[len(rs) // 2]
            peak = max(r["peak_rss"] for r in rs)
            med[label] = (wall, peak)
            print(
                f"{label:<44} | {wall:>7.1f} | {peak / MIB:>12.0f} | {rs[-1]['output_bytes'] / MIB:>10.0f}"
            )
        for label, rs in rows:
            print(f"per repeat, {label}: " + " / ".join(f"{r['wall_s']:.1f}" for r in rs) + " s")
        if have_mergekit:
            mw, mp = med[rows[-1][0]]
            for label, _ in rows[:-1]:
                ow, op = med[label]
                print(
                    f"{label} / mergekit: wall {ow / mw:.2f}x, peak RSS {op / mp:.2f}x "
                    f"(target <= 1.00x: wall {'met' if ow <= mw else 'MISSED'}, "
                    f"memory {'met' if op <= mp else 'MISSED'})"
                )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "baseline_rss": baseline,
                        **results,
                    },
                    f,
                    indent=2,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
