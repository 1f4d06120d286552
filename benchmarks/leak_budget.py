"""Zero-shot extension of the study's trained Nexus MoEs: the new row's norm, fixed or fitted.

Takes a finished study (`make paper`) and, for each seed and held-out domain, extends the trained
`nexus` MoE with that domain's FFN-only expert (calibrated row from the domain's text, no training
step) under each rule for the new row's norm: the fixed 0.9 times the earlier rows' norm
(`--leak-budget 0` on the command line) and the norm fitted to each leak budget given. Printed per
seed, as the study measures them: the share of the new domain's tokens on the new expert (mean
over MoE layers), the share of the gap between the MoE before extension and the new dense expert
that the extension closes (log perplexity, i.e. bits/byte), and the change of the earlier
domains' mean perplexity (scored on the same tokens before and after).

    .venv/bin/python benchmarks/leak_budget.py --study runs/paper-small --budgets 0 0.005 0.01 0.02
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from nexus_moe.analyse import RoutingCounter, expert_names, routing_report
from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.config import EvalConfig
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.evaluate import evaluate_domains
from nexus_moe.extend import extend
from nexus_moe.pipeline import tokens_for
from nexus_moe.study.layout import RunLayout
from nexus_moe.study.results import load_scores
from nexus_moe.train import tune_cpu_allocator


def score(path: Path, shards, domains: list[str], tokens: int, new: str | None = None):
    """Per-domain perplexity of ``path`` on ``tokens`` per domain; with ``new``, also the share
    of that domain's tokens whose top-1 expert is its own (mean over MoE layers)."""
    model, _ = load_checkpoint(path)
    cfg = EvalConfig(seq_len=128, batch_size=16, max_tokens=tokens)
    if new is None:
        return {d: s.perplexity for d, s in evaluate_domains(model, shards, domains, cfg).items()}
    counter = RoutingCounter(model, len(domains))
    scores = evaluate_domains(model, shards, domains, cfg, on_routing=counter)
    share = routing_report(counter.counts, domains, expert_names(model))["accuracy"][new]
    return {d: s.perplexity for d, s in scores.items()}, share


def measure(study: Path, seeds: list[int], domains: list[str] | None, ways: dict[str, dict],
            new_tokens: int, earlier_tokens: int) -> list[dict]:  # fmt: skip
    """For each seed and held-out domain (``domains``, default the study's), extend the trained
    `nexus` MoE zero-shot in each of the ``ways`` (label -> keyword arguments of
    :func:`nexus_moe.extend.extend`) and measure it as the study does: rows with ``seed``,
    ``domain``, ``way``, ``share``, ``gap_recovered``, ``earlier_change``."""
    run = RunLayout(study)
    saved = load_scores(run.scores_json)
    earlier, heldout = saved.domains, domains or saved.heldout
    corpus = run.corpus
    embeddings = DomainEmbeddings.load(run.domain_embeddings)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for seed in seeds:
            trained = run.trained_model("nexus", seed)
            shards = tokens_for(corpus, trained / TOKENIZER_FILE)
            before_old = score(trained, shards, earlier, earlier_tokens)
            for domain in heldout:
                expert = run.expert_model(domain, "ffn")
                before_new = score(trained, shards, [domain], new_tokens)[domain]
                dense = score(expert, shards, [domain], new_tokens)[domain]
                for label, kwargs in ways.items():
                    out = Path(tmp) / f"s{seed}-{domain}"
                    extend(trained, expert, out, domain=domain, domain_embeddings=embeddings,
                           calibration_shards=shards, seed=seed, **kwargs)  # fmt: skip
                    new, share = score(out, shards, [domain], new_tokens, new=domain)
                    old = score(out, shards, earlier, earlier_tokens)
                    shutil.rmtree(out)
                    full = math.log(before_new) - math.log(dense)
                    mean = lambda s: statistics.fmean(s[d] for d in earlier)  # noqa: E731
                    rows.append(
                        {
                            "seed": seed,
                            "domain": domain,
                            "way": label,
                            "share": share,
                            "gap_recovered": (math.log(before_new) - math.log(new[domain])) / full,
                            "earlier_change": mean(old) / mean(before_old) - 1,
                        }
                    )
                    r = rows[-1]
                    print(f"s{seed} {domain} {label}: share {r['share']:.2f}, gap "
                          f"{r['gap_recovered']:.2f}, earlier {100 * r['earlier_change']:+.2f}%",
                          flush=True)  # fmt: skip
    return rows


def table(rows: list[dict], labels: dict[str, str], header: str) -> None:
    """Markdown table: one line per held-out domain and way (``labels``: way -> its cell)."""
    print(f"\n| new domain | {header} | share (per seed) | gap recovered | earlier domains |")
    print("|---|---|---|---|---|")
    for domain in dict.fromkeys(r["domain"] for r in rows):
        for way, label in labels.items():
            sel = [r for r in rows if r["domain"] == domain and r["way"] == way]
            cols = [" / ".join(f"{r[k]:.2f}" for r in sel) for k in ("share", "gap_recovered")] + [
                " / ".join(f"{100 * r['earlier_change']:+.2f}%" for r in sel)
            ]
            print(f"| {domain} | {label} | " + " | ".join(cols) + " |")


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every zero-shot benchmark on a finished study takes (this file's, and those
    of refit_rows.py and extend_finetune.py)."""
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--new-tokens", type=int, default=131072, help="per new domain")
    parser.add_argument("--earlier-tokens", type=int, default=8192, help="per earlier domain")
    parser.add_argument("--threads", type=int, default=2)


def start(args: argparse.Namespace) -> None:
    """CPU threads and allocator as the CLI sets them."""
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02])
    args = parser.parse_args()
    start(args)

    ways = {f"budget {b:g}": {"leak_budget": b if b > 0 else None} for b in args.budgets}
    rows = measure(args.study, args.seeds, None, ways, args.new_tokens, args.earlier_tokens)
    labels = {
        f"budget {b:g}": "fixed (default)" if b <= 0 else f"fitted, budget {b:g}"
        for b in args.budgets
    }
    table(rows, labels, "row norm")


if __name__ == "__main__":
    main()
