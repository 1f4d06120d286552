"""Zero-shot extension with a domain the user brings, through the command line only.

Takes a finished study (`make paper`: its seed, trained MoEs and domain embeddings) and a folder
of the user's own text (one sub-folder per domain, as `nexus-moe corpus build --from` reads it),
and for each seed adds the new domain to the trained `nexus` MoE (calibrated row from the new
domain's text: the default norm; the earlier rows refit among all the domains with
`--refit-rows`; and the norm fitted to a leak budget of 0.01 with `--leak-budget 0.01`) and to
the trained `moe-linear` MoE (the two linear baselines: router re-initialised, and the trained
rows kept with one appended), with no training step. Every step is a `nexus-moe` command, as a
user would run it:

    corpus build --from DATA     the user's corpus
    branch [--ffn-only]          the new dense experts (the study's expert settings)
    embed-domains --merge-into   the new domain's embedding next to the study's
    extend [--corpus]            per seed and variant
    evaluate --json / analyse    the new domain, the earlier domains, the routing share

Printed per seed: the share of the new domain's tokens on the new expert (mean over MoE layers),
the share of the bits/byte gap between the MoE before extension and the new dense expert that the
extension closes, and the change of the earlier domains' mean perplexity.

    .venv/bin/python benchmarks/user_domain.py --study runs/paper-small --data my-data

`--row-scales S...` adds the nexus extension with its new row at S times the earlier rows' norm
(`extend --row-scale S`); `--only LABEL...` runs only the extensions named (as printed).

Each step's result is kept in `--work` with a key of its inputs (the data, the study's models,
the token counts, and for the extensions the package's source) and is made again when they
change, so one `--work` can be rerun after new data or a code change without stale figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nexus_moe
from nexus_moe.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from nexus_moe.embed import EMBEDDINGS_FILENAME
from nexus_moe.io_utils import file_sha256
from nexus_moe.pipeline import corpus_fingerprint, fingerprint
from nexus_moe.study.layout import RunLayout
from nexus_moe.study.results import load_scores

CLI = [sys.executable, "-m", "nexus_moe.cli"]
# Extensions depend on code defaults (the new row's norm), so they are keyed on the source.
CODE = hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted(Path(nexus_moe.__file__).parent.rglob("*.py")))
).hexdigest()[:16]


def run(*args: str) -> None:
    start = time.perf_counter()
    result = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nexus-moe {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    print(
        f"  nexus-moe {args[0]} {args[1] if args[1:] else ''} ({time.perf_counter() - start:.0f}s)"
    )


def cached(out: Path, key: str, *command: str) -> str:
    """Makes ``out`` (runs ``nexus-moe COMMAND``, or makes the folder) unless this benchmark
    made it from the same inputs (``key``); returns the key.

    A result made from other inputs (other data, other token counts, an earlier version of
    the code), or left half made by an interrupted run, is removed and made again: the
    benchmark wrote it, beside a ``.key`` file. An ``out`` without that file was not written
    here and is left alone.
    """
    marker = out.with_name(out.name + ".key")
    made = marker.read_text().strip() if marker.is_file() else None
    if out.exists() and made == key:
        return key
    if out.exists() and made is None:
        sys.exit(f"{out}: exists and was not written by this benchmark; choose a fresh --work")
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    marker.write_text("unfinished\n")  # claims out before anything is written there
    if command:
        run(*command)
    else:
        out.mkdir(parents=True)
    marker.write_text(key + "\n")
    return key


def model_key(model: Path) -> str:
    return fingerprint(
        file_sha256(model / CONFIG_FILE)[:16], file_sha256(model / WEIGHTS_FILE)[:16]
    )


def scores(model: Path, corpus: Path, out: Path, tokens: int, domains: list[str]) -> dict:
    key = fingerprint(model_key(model), corpus_fingerprint(corpus), tokens, domains)
    cached(out, key, "evaluate", str(model), "--corpus", str(corpus), "--domains",
           ",".join(domains), "--max-tokens", str(tokens), "--seq-len", "128", "--json", str(out),
           "--device", "cpu")  # fmt: skip
    return json.loads(out.read_text())[str(model)]  # evaluate --json keys by the path given


def share(model: Path, corpus: Path, out: Path, domain: str, tokens: int) -> float:
    report = out / "routing-ext.json"
    key = fingerprint(model_key(model), corpus_fingerprint(corpus), tokens, domain)
    cached(report, key, "analyse", str(model), "--corpus", str(corpus), "--domains", domain,
           "--out", str(out), "--max-tokens", str(tokens), "--seq-len", "128", "--name", "ext",
           "--device", "cpu")  # fmt: skip
    return float(json.loads(report.read_text())["accuracy"][domain])


def data_key(folder: Path) -> str:
    """Names, sizes and modification times of the user's files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return fingerprint([[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                        for p in files])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--data", type=Path, required=True, help="one sub-folder per domain")
    parser.add_argument("--domain", help="the sub-folder to add (default: the only one)")
    parser.add_argument("--work", type=Path, default=Path("runs/user-domain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-tokens", type=int, default=131072)
    parser.add_argument("--branch-steps", type=int, default=100)
    parser.add_argument(
        "--row-scales",
        type=float,
        nargs="+",
        default=[],
        metavar="S",
        help="also extend the nexus MoE with the new row at S times the earlier rows' norm",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run only these extensions (labels as printed, e.g. 'nexus')",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    study, work = args.study, args.work
    domain = args.domain or next(p.name for p in sorted(args.data.iterdir()) if p.is_dir())
    run = RunLayout(study)
    earlier = load_scores(run.scores_json).domains
    corpus, study_corpus = work / "corpus", run.corpus
    work.mkdir(parents=True, exist_ok=True)
    # Every step below is redone when its inputs changed since this --work last made it.
    build = ["--domains", domain, "--max-mb", "3", "--val-fraction", "0.16"]
    corpus_key = cached(corpus, fingerprint(data_key(args.data / domain), build), "corpus",
                        "build", "--from", str(args.data), "--out", str(corpus), *build)  # fmt: skip
    branch = ["--set", f"steps={args.branch_steps}", "--set", "batch_size=16", "--set",
              "seq_len=128", "--set", "lr=1e-3", "--set", "warmup_frac=0.05", "--set",
              "checkpoint_every=0", "--device", "cpu"]  # fmt: skip
    seed_key = model_key(run.seed_model)
    experts = {"ffn": work / "experts-ffn", "full": work / "experts"}
    expert_keys = {}
    for kind, out in experts.items():
        flags = ["--ffn-only"] if kind == "ffn" else []
        expert_keys[kind] = cached(out, fingerprint(seed_key, corpus_key, flags, branch),
                                   "branch", "--seed", str(run.seed), "--corpus",
                                   str(corpus), "--out", str(out), *flags, *branch)  # fmt: skip
    embeddings = work / "domain_embeddings"
    merged = run.domain_embeddings / EMBEDDINGS_FILENAME
    embeddings_key = cached(embeddings, fingerprint(corpus_key, file_sha256(merged)[:16]),
                            "embed-domains", "--corpus", str(corpus), "--out", str(embeddings),
                            "--merge-into", str(merged), "--num-chunks", "128")  # fmt: skip

    tokens = args.eval_tokens
    dense = {
        kind: scores(out / domain / "model", corpus, work / f"dense-{kind}.json", tokens, [domain])
        for kind, out in experts.items()
    }
    ways = {  # label: (variant, expert set, extend flags)
        "nexus": ("nexus", "ffn", ["--corpus", str(corpus)]),
        # the option: the earlier rows refit among all the domains (new row at 0.8x)
        "nexus, earlier rows refit": ("nexus", "ffn", ["--corpus", str(corpus), "--refit-rows"]),
        # the opt-in rule: the calibrated row's norm fitted to a leak budget
        "nexus, leak budget 0.01": (
            "nexus",
            "ffn",
            ["--corpus", str(corpus), "--leak-budget", "0.01"],
        ),
        "moe-linear, re-initialised": ("moe-linear", "full", ["--reset-router"]),
        "moe-linear, appended row": ("moe-linear", "full", ["--no-reset-router"]),
    }
    for scale in args.row_scales:
        flags = ["--corpus", str(corpus), "--row-scale", f"{scale:g}"]
        ways[f"nexus, row at {scale:g}x"] = ("nexus", "ffn", flags)
    if args.only is not None:
        unknown = sorted(set(args.only) - set(ways))
        if unknown:
            raise SystemExit(f"--only: no extension named {unknown}; choose from {sorted(ways)}")
        ways = {label: way for label, way in ways.items() if label in args.only}
    rows: dict[str, dict[int, dict]] = {label: {} for label in ways}
    for seed in args.seeds:
        for label, (variant, kind, flags) in ways.items():
            trained = run.trained_model(variant, seed)
            out = work / f"s{seed}" / label.replace(", ", "-").replace(" ", "-")
            extended = out / "model"
            # The folder holds the extension and everything measured on it.
            key = fingerprint(CODE, model_key(trained), expert_keys[kind], embeddings_key, seed,
                              flags)  # fmt: skip
            cached(out, key)
            if not (extended / CONFIG_FILE).is_file():
                run("extend", "--moe", str(trained), "--expert", str(experts[kind] / domain),
                    "--domain", domain, "--embeddings", str(embeddings), "--random-seed",
                    str(seed), "--out", str(extended), *flags)  # fmt: skip
            base = work / f"s{seed}" / f"{variant}-before"
            base.mkdir(parents=True, exist_ok=True)
            before_new = scores(trained, corpus, base / "new.json", tokens, [domain])
            before_old = scores(trained, study_corpus, base / "old.json", tokens, earlier)
            after_new = scores(extended, corpus, out / "after-new.json", tokens, [domain])
            after_old = scores(extended, study_corpus, out / "after-old.json", tokens, earlier)
            b, a, d = (x[domain]["bits_per_byte"] for x in (before_new, after_new, dense[kind]))
            mean = lambda s: statistics.fmean(s[x]["perplexity"] for x in earlier)  # noqa: E731
            rows[label][seed] = {
                "share": share(extended, corpus, out, domain, tokens),
                "gap_recovered": (b - a) / (b - d),
                "earlier_change": mean(after_old) / mean(before_old) - 1,
                "bits_per_byte": {"before": b, "after": a, "dense": d},
            }
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nnew domain {domain!r}; dense experts: ffn-only {dense['ffn'][domain]['bits_per_byte']:.3f},"
          f" full {dense['full'][domain]['bits_per_byte']:.3f} bits/byte\n")  # fmt: skip
    print(
        "| extension (zero-shot) | seed | share on new expert | gap recovered | earlier domains |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, by_seed in rows.items():
        for seed, r in by_seed.items():
            print(f"| {label} | {seed} | {r['share']:.2f} | {r['gap_recovered']:.2f} | "
                  f"{100 * r['earlier_change']:+.2f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
