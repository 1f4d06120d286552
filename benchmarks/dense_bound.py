"""What the dense-expert bound of target 4 contains: losses by position in the scoring window.

The study's bound scores each dense expert on its own domain: a router that knows every
window's domain before its first token. A MoE does not know it and has to infer it from the
window's tokens, which it cannot do at the start of a window (the study scores windows of
`evaluate.seq_len` tokens with no earlier context). This benchmark takes a finished study
(`make paper`) and, on the recipe's validation tokens of each training domain, scores per
position in the window:

* `dense experts (oracle)`: the domain's own dense expert (the study's bound);
* `dense mixture (no label)`: the same dense experts mixed at the output by the posterior of
  each one given the window so far, p(e | x_<t) proportional to prod_{s<t} p_e(x_s | x_<s),
  uniform prior: the document-level ensemble that knows everything about the experts but not
  the domain label;
* the step-0 MoE of the reference variant and the same MoE after the study's MoE training,
  per seed.

It prints the mean over domains of each bucket's perplexity (exp of the mean loss of that
bucket's tokens) and each row against the oracle. What the mixture loses to the oracle is the
worth of the domain label in such windows, which no router can make up; where a MoE matches
the oracle from some position on, what it loses in total sits before it.

    .venv/bin/python benchmarks/dense_bound.py --study runs/paper-small --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.evaluate import iter_eval_batches
from nexus_moe.pipeline import tokens_for
from nexus_moe.recipe import load_recipe
from nexus_moe.study.layout import RunLayout
from nexus_moe.train import tune_cpu_allocator


def token_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """(B, T) next-token losses in nats."""
    logits = model(inputs).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def output_mixture(losses: torch.Tensor) -> torch.Tensor:
    """(E, B, T) expert losses -> (B, T) losses of their mixture weighted by the posterior of
    each expert given the window's earlier tokens (uniform prior)."""
    log_lik = torch.cumsum(-losses, dim=2)
    before = torch.cat([torch.zeros_like(log_lik[:, :, :1]), log_lik[:, :, :-1]], dim=2)
    log_post = before - torch.logsumexp(before, dim=0, keepdim=True)
    return -torch.logsumexp(log_post - losses, dim=0)


def buckets_of(seq_len: int) -> list[tuple[int, int]]:
    edges = [0] + [p for p in (16, 32) if p < seq_len] + [seq_len]
    return [*zip(edges[:-1], edges[1:], strict=True), (0, seq_len)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("configs/paper-small.yaml"))
    parser.add_argument("--study", type=Path, default=None, help="default: the recipe's workdir")
    parser.add_argument("--variant", default="nexus")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="more MoE checkpoints to score, e.g. the ones benchmarks/moe_lr.py trains",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()

    recipe = load_recipe(args.recipe)
    run = RunLayout(args.study or recipe.workdir)
    domains, cfg = recipe.corpus.domains, recipe.evaluate
    variant = next((v for v in recipe.moe.variants if v.name == args.variant), None)
    if variant is None:
        raise SystemExit(f"error: {args.recipe} has no MoE variant named {args.variant!r}")
    experts = [run.expert_model(d, variant.experts) for d in domains]
    dense = [load_checkpoint(path)[0].eval() for path in experts]
    moes = {"step 0": load_checkpoint(run.upcycled(args.variant, args.seeds[0]))[0]}
    for seed in args.seeds:
        path = run.trained_model(args.variant, seed)
        moes[f"trained, seed {seed}"] = load_checkpoint(path)[0]
    for item in args.also:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"error: --also {item!r}: expected NAME=DIR with a checkpoint DIR")
        moes[name] = load_checkpoint(Path(path))[0]
    shards = tokens_for(run.corpus, experts[0] / TOKENIZER_FILE)

    names = ["dense experts (oracle)", "dense mixture (no label)", *moes]
    per_domain: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # mean loss by position
    with torch.no_grad():
        for index, domain in enumerate(domains):
            sums = {n: torch.zeros(cfg.seq_len, dtype=torch.float64) for n in names}
            windows = 0
            tokens = shards.tokens(domain, "validation")
            for inputs, targets in iter_eval_batches(
                tokens, cfg.seq_len, cfg.batch_size, cfg.max_tokens
            ):
                losses = torch.stack([token_losses(m, inputs, targets) for m in dense])
                rows = {names[0]: losses[index], names[1]: output_mixture(losses)}
                for name, model in moes.items():
                    rows[name] = token_losses(model.eval(), inputs, targets)
                for name, loss in rows.items():
                    sums[name] += loss.double().sum(0)
                windows += inputs.shape[0]
            for name in names:
                per_domain[name].append(sums[name] / windows)

    buckets = buckets_of(cfg.seq_len)
    table: dict[str, list[float]] = {}
    for name in names:
        table[name] = [
            statistics.fmean(math.exp(float(v[a:b].mean())) for v in per_domain[name])
            for a, b in buckets
        ]
    oracle = table[names[0]]
    heads = [f"positions {a}-{b - 1}" for a, b in buckets[:-1]] + ["whole window"]
    print(f"\n{args.variant}: mean perplexity over {', '.join(domains)} by position in the "
          f"{cfg.seq_len}-token window ({cfg.max_tokens} tokens per domain); vs the oracle")  # fmt: skip
    print("| model | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    for name in names:
        cells = [f"{v:.2f} ({v / o - 1:+.1%})" for v, o in zip(table[name], oracle, strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = run.results / f"dense-bound-{args.variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"buckets": buckets, "domains": domains, "perplexity": table}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
