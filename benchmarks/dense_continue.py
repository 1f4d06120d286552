"""The dense experts trained further on their own domains: the control for a longer MoE training.

Target 4 asks the trained MoE to beat its dense experts, each on its own domain. A MoE trained
for longer sees more of every domain than its experts did, so this benchmark gives the dense
experts of a finished study (`make paper`; the expert set that `--expert-set` names) the same
extra text: each continues on its own domain for `--steps` steps with the MoE training settings
of the recipe (`moe.train`: batch, sequence length, schedule) at `--lr`, training only the
parameters that `--train-only` names (default: the FFNs, as the FFN-only experts were branched).
A MoE trained N steps on the four domains sees N/4 steps of each, so `--steps 250` matches
`benchmarks/moe_lr.py --steps 1000`. Each expert is then scored on the recipe's validation tokens
of its domain, like the study's dense-expert bound; printed per domain and as the mean
perplexity over the training domains, before and after, and paired per seed (same seed: same
data order) against the study's MoE variant `--against` (default `nexus-long`, trained 1000 steps)
when the study's scores have it.

    .venv/bin/python benchmarks/dense_continue.py --steps 250 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.evaluate import evaluate_domains, scores_to_dict
from nexus_moe.pipeline import tokens_for, train_model
from nexus_moe.recipe import load_recipe
from nexus_moe.study.layout import RunLayout
from nexus_moe.study.report import interval as _interval
from nexus_moe.study.results import load_scores
from nexus_moe.study.stats import paired_interval
from nexus_moe.train import FFN_PARAMETERS


def score(model_dir: Path, corpus: Path, domain: str, cfg) -> float:
    model, _ = load_checkpoint(model_dir)
    shards = tokens_for(corpus, model_dir / TOKENIZER_FILE)
    return scores_to_dict(evaluate_domains(model, shards, [domain], cfg))[domain]["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("configs/paper-small.yaml"))
    parser.add_argument("--expert-set", default="ffn", help="the study's expert set to continue")
    parser.add_argument("--steps", type=int, default=250, help="steps per expert")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-only", nargs="+", default=list(FFN_PARAMETERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--against", default="nexus-long", help="the study's MoE variant")
    parser.add_argument("--out", type=Path, default=Path("runs/dense-continue"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    run, domains = RunLayout(recipe.workdir), recipe.corpus.domains
    corpus = run.corpus
    experts = {d: run.expert_model(d, args.expert_set) for d in domains}
    before = {d: score(experts[d], corpus, d, recipe.evaluate) for d in domains}
    after: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        cfg = replace(recipe.moe.train, steps=args.steps, lr=args.lr, seed=seed, eval_every=0,
                      train_only=list(args.train_only))  # fmt: skip
        for domain in domains:
            init = experts[domain]
            model, meta = load_checkpoint(init)
            out = args.out / f"s{seed}" / f"{domain}-steps{args.steps}-lr{args.lr:g}"
            final = train_model(model, corpus, init / TOKENIZER_FILE, [domain], cfg, out,
                                metadata=meta, show_progress=False)  # fmt: skip
            after.setdefault(seed, {})[domain] = score(final, corpus, domain, recipe.evaluate)
            print(f"seed {seed} {domain}: {before[domain]:.3f} -> {after[seed][domain]:.3f}",
                  flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"before": before, "after": after, "args": vars(args)}, indent=2, default=str)
        + "\n"
    )
    mean_before = statistics.fmean(before.values())
    print(f"\n| dense experts ({args.expert_set}) | " + " | ".join(domains) + " | mean |")
    print("|---|" + "---:|" * (len(domains) + 1))
    print("| as branched | " + " | ".join(f"{before[d]:.2f}" for d in domains)
          + f" | {mean_before:.2f} |")  # fmt: skip
    for seed, scores in after.items():
        mean = statistics.fmean(scores.values())
        print(f"| +{args.steps} steps at {args.lr:g}, seed {seed} | "
              + " | ".join(f"{scores[d]:.2f}" for d in domains)
              + f" | {mean:.2f} ({100 * (mean / mean_before - 1):+.1f}%) |")  # fmt: skip
    moe = {}
    if run.scores_json.is_file():
        moe = load_scores(run.scores_json).models.get(args.against, {})
    seeds = [s for s in after if str(s) in moe]
    if seeds:
        print(
            f"\n{args.against} (the study) against these dense experts, per seed: "
            "(MoE - dense) / dense of the mean perplexity; > 0: the dense experts are better"
        )
        diffs = []
        for seed in seeds:
            m = statistics.fmean(moe[str(seed)][d]["perplexity"] for d in domains)
            dense = statistics.fmean(after[seed].values())
            diffs.append(m / dense - 1)
            print(f"  seed {seed}: {m:.3f} against {dense:.3f}: {100 * diffs[-1]:+.2f}%")
        p = paired_interval(diffs)
        interval = "" if p["low"] is None else f" {_interval(p, 2)}"
        print(f"  mean {100 * p['mean']:+.2f}%{interval}")


if __name__ == "__main__":
    main()
