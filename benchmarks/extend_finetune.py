"""The extension finetune: what to train, and how much replay, on the study's small budget.

Takes a finished study (`make paper`) and, for each seed and held-out domain, extends the trained
`nexus` MoE with that domain's FFN-only expert (the default calibrated row, as `extend --corpus`
places it), then finetunes it on the study's extension budget (recipe `extend.budgets`, its
largest; `extend.train` for batch, sequence length and learning rate) in each way asked for:

    all         every parameter (the study's default)
    router      the routers only      (extend.train.train_only: [mlp.router])
    experts     the experts' FFNs     (extend.train.train_only: [mlp.experts])
    experts+router
    <way>@<share>   with that share of the mix from the new domain (default extend.new_domain_share)
    <way>:<lr>      at that learning rate (default extend.train.lr)

Printed per seed and way: the new domain's perplexity (131,072 validation tokens) and its change
against the zero-shot extension, the share of its tokens on the new expert (mean over MoE layers),
and the earlier domains' mean perplexity change against the MoE before extension (8,192 tokens
per domain, the same tokens before and after).

    .venv/bin/python benchmarks/extend_finetune.py --study runs/paper-small \
        --ways all router experts experts+router all@0.25
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from leak_budget import add_study_arguments, score, start  # benchmarks/leak_budget.py

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.extend import extend
from nexus_moe.pipeline import tokens_for, train_model
from nexus_moe.recipe import load_recipe
from nexus_moe.study import tokens_per_step
from nexus_moe.study.layout import RunLayout

TRAIN_ONLY = {
    "all": [],
    "router": ["mlp.router"],
    "experts": ["mlp.experts"],
    "experts+router": ["mlp.experts", "mlp.router"],
}


def parse_way(way: str, default_share: float, default_lr: float) -> tuple[str, float, float]:
    """``<kind>[@share][:lr]`` -> (kind, share, lr)."""
    kind, _, lr = way.partition(":")
    kind, _, share = kind.partition("@")
    if kind not in TRAIN_ONLY:
        raise SystemExit(f"--ways: unknown '{kind}' (use one of {', '.join(TRAIN_ONLY)})")
    return kind, float(share) if share else default_share, float(lr) if lr else default_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    parser.add_argument("--recipe", type=Path, default=Path("configs/paper-small.yaml"))
    parser.add_argument("--ways", nargs="+", default=["all", "router", "experts"])
    args = parser.parse_args()
    start(args)

    recipe = load_recipe(args.recipe)
    tcfg = recipe.extend.train
    budget = max(recipe.extend.budgets)
    steps = max(1, budget // tokens_per_step(tcfg))  # as the study sets it
    ways = [parse_way(w, recipe.extend.new_domain_share, tcfg.lr) for w in args.ways]
    run = RunLayout(args.study)
    corpus = run.corpus
    earlier = list(recipe.corpus.domains)
    embeddings = DomainEmbeddings.load(run.domain_embeddings)
    mean = lambda s: statistics.fmean(s[d] for d in earlier)  # noqa: E731
    rows = []
    print(f"finetune: {steps} steps x {tcfg.batch_size} x {tcfg.seq_len} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            trained = run.trained_model("nexus", seed)
            shards = tokens_for(corpus, trained / TOKENIZER_FILE)
            before_old = mean(score(trained, shards, earlier, args.earlier_tokens))
            for domain in recipe.corpus.heldout:
                expert = run.expert_model(domain, "ffn")
                extended = Path(tmp) / f"s{seed}-{domain}"
                extend(trained, expert, extended, domain=domain, domain_embeddings=embeddings,
                       calibration_shards=shards, seed=seed)  # fmt: skip
                zero, zero_share = score(extended, shards, [domain], args.new_tokens, new=domain)
                zero_old = mean(score(extended, shards, earlier, args.earlier_tokens))
                print(f"s{seed} {domain} zero-shot: perplexity {zero[domain]:.2f}, share "
                      f"{zero_share:.2f}, earlier {100 * (zero_old / before_old - 1):+.2f}%",
                      flush=True)  # fmt: skip
                for way, (kind, share, lr) in zip(args.ways, ways, strict=True):
                    weights = {domain: share, **{d: (1 - share) / len(earlier) for d in earlier}}
                    cfg = replace(tcfg, steps=steps, seed=seed, lr=lr, domain_weights=weights,
                                  train_only=TRAIN_ONLY[kind])  # fmt: skip
                    model, meta = load_checkpoint(extended)
                    out = Path(tmp) / "ft"
                    tuned = train_model(model, corpus, extended / TOKENIZER_FILE,
                                        earlier + [domain], cfg, out, metadata=meta,
                                        show_progress=False)  # fmt: skip
                    new, new_share = score(tuned, shards, [domain], args.new_tokens, new=domain)
                    old = mean(score(tuned, shards, earlier, args.earlier_tokens))
                    shutil.rmtree(out)
                    rows.append({"seed": seed, "domain": domain, "way": way,
                                 "new": new[domain] / zero[domain] - 1, "share": new_share,
                                 "earlier": old / before_old - 1})  # fmt: skip
                    print(f"  {way}: perplexity {new[domain]:.2f} "
                          f"({100 * rows[-1]['new']:+.1f}% vs zero-shot), share {new_share:.2f}, "
                          f"earlier {100 * rows[-1]['earlier']:+.2f}%", flush=True)  # fmt: skip
                rows.append({"seed": seed, "domain": domain, "way": "zero-shot", "new": 0.0,
                             "share": zero_share, "earlier": zero_old / before_old - 1})  # fmt: skip
                shutil.rmtree(extended)
    print("\n| new domain | finetune | new domain vs zero-shot | share | earlier domains |")
    print("|---|---|---|---|---|")
    for domain in recipe.corpus.heldout:
        for way in ["zero-shot", *args.ways]:
            sel = [r for r in rows if r["domain"] == domain and r["way"] == way]
            cells = [
                " / ".join(f"{100 * r['new']:+.1f}%" for r in sel),
                " / ".join(f"{r['share']:.2f}" for r in sel),
                " / ".join(f"{100 * r['earlier']:+.2f}%" for r in sel),
            ]
            print(f"| {domain} | {way} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
