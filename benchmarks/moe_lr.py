"""MoE training learning rate: retrain upcycled MoEs of a finished study at other learning rates.

Takes the step-0 MoEs of `make paper` (`runs/paper-small/s<seed>/moe/<variant>/upcycled`) and
trains each with the recipe's `moe.train` settings except the learning rate (no intermediate
evaluations), then scores it on the recipe's validation tokens per domain. Prints the mean
perplexity over the training domains per variant, learning rate and seed, and the paired
difference of the first variant against the others at each learning rate.

    .venv/bin/python benchmarks/moe_lr.py --lrs 3e-4 1e-4 --seeds 0
    .venv/bin/python benchmarks/moe_lr.py --lrs 3e-4 --seeds 0 1 2
    .venv/bin/python benchmarks/moe_lr.py --variants nexus --lrs 1e-3 --train-only mlp.experts router

With `--train-only PATTERN...` only the parameters whose names contain one of the patterns train
(`TrainConfig.train_only`; e.g. the experts' FFNs and the routers, leaving the attention, norms
and embeddings the experts share as the seed's). Every row also prints the mean perplexity of
the dense experts on their own domains from the study's scores (the bound of target 4).
`--steps N` trains for N steps instead of the recipe's; `--against VARIANT` pairs every row per
seed with a variant the study trained itself (e.g. `nexus-long`, the nexus MoE trained 1000
steps on its experts and routers):

    .venv/bin/python benchmarks/moe_lr.py --variants moe-linear --steps 1000 --against nexus-long
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
from nexus_moe.study.stats import dense_bound, paired_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("configs/paper-small.yaml"))
    parser.add_argument("--variants", nargs="+", default=["nexus", "moe-linear"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/moe-lr"))
    parser.add_argument("--train-only", nargs="+", default=[], metavar="PATTERN")
    parser.add_argument("--warmup-frac", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--against", help="a variant of the study's own to pair every row with")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    run, domains = RunLayout(recipe.workdir), recipe.corpus.domains
    means: dict[str, dict[float, dict[int, float]]] = {v: {} for v in args.variants}
    step0: dict[str, dict[int, float]] = {v: {} for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            init = run.upcycled(variant, seed)
            model, _ = load_checkpoint(init)
            shards = tokens_for(run.corpus, init / TOKENIZER_FILE)
            scores = scores_to_dict(evaluate_domains(model, shards, domains, recipe.evaluate))
            step0[variant][seed] = statistics.fmean(scores[d]["perplexity"] for d in domains)
            print(f"{variant} step 0 seed {seed}: mean perplexity {step0[variant][seed]:.3f}")
            for lr in args.lrs:
                tag = "-only-" + "+".join(args.train_only) if args.train_only else ""
                tag += f"-steps{args.steps}" if args.steps is not None else ""
                out = args.out / f"s{seed}" / f"{variant}-lr{lr:g}{tag}"
                cfg = replace(recipe.moe.train, seed=seed, lr=lr, eval_every=0,
                              train_only=list(args.train_only))  # fmt: skip
                if args.warmup_frac is not None:
                    cfg = replace(cfg, warmup_frac=args.warmup_frac)
                if args.steps is not None:
                    cfg = replace(cfg, steps=args.steps)
                model, meta = load_checkpoint(init)
                final = train_model(model, run.corpus, init / TOKENIZER_FILE, domains, cfg,
                                    out, metadata=meta, show_progress=False)  # fmt: skip
                trained, _ = load_checkpoint(final)
                shards = tokens_for(run.corpus, final / TOKENIZER_FILE)
                scores = scores_to_dict(evaluate_domains(trained, shards, domains, recipe.evaluate))
                mean = statistics.fmean(scores[d]["perplexity"] for d in domains)
                means[variant].setdefault(lr, {})[seed] = mean
                print(f"{variant} lr {lr:g} seed {seed}: mean perplexity {mean:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"trained": means, "step0": step0}, indent=2) + "\n"
    )
    study = load_scores(run.scores_json) if run.scores_json.exists() else None
    if study:  # the study's dense experts (FFN-only set) on their own domains
        bound = dense_bound(study, "ffn")
        if bound is not None:
            print(f"\ndense experts (ffn set), each on its own domain: mean perplexity {bound:.2f}")
    if args.against:
        by_seed = study.models.get(args.against) if study else None
        if by_seed is None:
            raise SystemExit(
                f"--against: the study at {run.workdir} has no trained '{args.against}'"
            )
        own = {int(s): statistics.fmean(v[d]["perplexity"] for d in domains)
               for s, v in by_seed.items()}  # fmt: skip
        print(f"\n(row - {args.against}) / row per seed, > 0: {args.against} (the study) is better")
        for variant in args.variants:
            for lr in args.lrs:
                row = means[variant][lr]
                diffs = [(row[s] - own[s]) / row[s] for s in args.seeds]
                p = paired_interval(diffs)
                interval = "" if p["low"] is None else f" {_interval(p, 2)} {p['verdict']}"
                each = ", ".join(f"{100 * d:+.2f}%" for d in diffs)
                print(f"  {variant} lr {lr:g}: {each}; mean {100 * p['mean']:+.2f}%{interval}")
    ref = args.variants[0]
    print("\n| variant | lr | per seed | mean | vs " + ref + " (paired, 95% interval) |")
    print("|---|---:|---|---:|---|")
    for variant in args.variants:
        per_seed = ", ".join(f"{step0[variant][s]:.2f}" for s in args.seeds)
        print(
            f"| {variant}, step 0 | - | {per_seed} | {statistics.fmean(step0[variant].values()):.2f} | - |"
        )
        for lr in args.lrs:
            by_seed = means[variant][lr]
            diffs = [(by_seed[s] - means[ref][lr][s]) / by_seed[s] for s in args.seeds]
            p = paired_interval(diffs)
            cell = "-" if variant == ref else f"{100 * p['mean']:+.1f}% {_interval(p)}"
            per_seed = ", ".join(f"{by_seed[s]:.2f}" for s in args.seeds)
            print(
                f"| {variant} | {lr:g} | {per_seed} | {statistics.fmean(by_seed.values()):.2f} | {cell} |"
            )


if __name__ == "__main__":
    main()
