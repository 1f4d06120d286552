"""Plug-in experts: step-0 composition and zero-shot extension, lever by lever (BENCHMARKS.md table).

Builds (or reuses, stage by stage) a testbed with the study machinery: the embedded corpus with
four domains plus held-out math and legal, a tied-embedding seed whose FFNs hold most of the
weights, fully trained and FFN-only experts. Then, without any MoE training step:

* step 0: each composition (paper: shared expert + p_i top-1; shared/2 + routed/2; routed only,
  renormalised) under oracle routing, and with calibrated routers (top-1 / top-2, per-token or
  on context), against each domain's dense expert;
* zero-shot extension of the default plug-in MoE with each held-out domain: share of its tokens
  on the new expert, bits/byte gain recovered, change of the earlier domains' perplexity.

    .venv/bin/python benchmarks/plugin_experts.py                  # ~15 min on 2 cores
    .venv/bin/python benchmarks/plugin_experts.py --workdir runs/plugin-bench --threads 2
    # an existing testbed: a folder with corpus/, tokenizer/tokenizer.json, seed/model,
    # experts/<domain>/model, experts-ffn/<domain>/model and domain_embeddings/
    .venv/bin/python benchmarks/plugin_experts.py --testbed runs/my-testbed
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from nexus_moe.analyse import routing_counts
from nexus_moe.checkpoint import load_checkpoint
from nexus_moe.config import EvalConfig, ModelConfig
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.evaluate import evaluate_domains
from nexus_moe.extend import extend
from nexus_moe.pipeline import tokens_for
from nexus_moe.recipe import Recipe
from nexus_moe.study import Study
from nexus_moe.study.layout import RunLayout
from nexus_moe.train import FFN_PARAMETERS, TrainConfig
from nexus_moe.upcycle import Method, method_defaults, upcycle

DEFAULT_CONTEXT = method_defaults(Method.nexus)["router_context"]
DOMAINS = ["code", "literature", "dictionary", "techdocs"]
HELDOUT = ["math", "legal"]


def testbed_recipe(workdir: Path) -> Recipe:
    recipe = Recipe(workdir=workdir, device="cpu")
    recipe.corpus.domains, recipe.corpus.heldout = list(DOMAINS), list(HELDOUT)
    recipe.corpus.max_mb_per_domain, recipe.corpus.val_fraction = 0.6, 0.1
    recipe.tokenizer.vocab_size = 4096
    recipe.model = ModelConfig(
        hidden_size=128,
        intermediate_size=704,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
        tie_embeddings=True,
    )
    common = dict(batch_size=16, seq_len=128, eval_tokens=16384, checkpoint_every=0)
    recipe.seed_train = TrainConfig(steps=400, lr=3e-3, **common)
    recipe.branch_train = TrainConfig(steps=150, lr=1e-3, warmup_frac=0.05, **common)
    recipe.expert_sets = {"ffn": {"train_only": list(FFN_PARAMETERS)}}
    recipe.embed.num_chunks = 64
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/plugin-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--testbed", type=Path, help="use these models instead of building them")
    parser.add_argument(
        "--leak-budget",
        type=float,
        default=0.0,
        help="the new rows' leak budget (docs/design.md §5.6); 0: the fixed default norm "
        "(config.new_row_scale of the router's context)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.testbed:
        bed = RunLayout(args.testbed)
        corpus, tokenizer, seed = bed.corpus, bed.tokenizer, bed.seed_model
        experts = {
            kind: {d: bed.expert_model(d, kind) for d in DOMAINS + HELDOUT}
            for kind in ("default", "ffn")
        }
        embeddings = DomainEmbeddings.load(bed.domain_embeddings)
    else:
        study = Study(testbed_recipe(args.workdir))
        corpus = study.stage_corpus()
        tokenizer = study.stage_tokenizer(corpus, DOMAINS)
        seed = study.stage_seed(corpus, tokenizer, DOMAINS)
        experts = {
            kind: {d: study.stage_branch(seed, corpus, d, kind) for d in DOMAINS + HELDOUT}
            for kind in ("default", "ffn")
        }
        embeddings = DomainEmbeddings.load(study.stage_embed(corpus, DOMAINS + HELDOUT))
    shards = tokens_for(corpus, tokenizer)
    ev = EvalConfig(seq_len=128, batch_size=16, max_tokens=args.eval_tokens)

    def scores(model, domains):
        s = evaluate_domains(model, shards, domains, ev)
        return {d: s[d].perplexity for d in domains}, {d: s[d].bits_per_byte for d in domains}

    def share(model, domains):
        names = model.cfg.moe.domains
        counts = routing_counts(model, shards, domains, ev)
        frac = (counts.double() / counts.sum(-1, keepdim=True)).mean(0)
        return {d: frac[i, names.index(d)].item() for i, d in enumerate(domains)}

    dense = {
        kind: {d: scores(load_checkpoint(p)[0], [d]) for d, p in sets.items()}
        for kind, sets in experts.items()
    }
    out = args.workdir / "bench"
    shutil.rmtree(out, ignore_errors=True)

    def build(name, kind, method="nexus", calibrate=True, **overrides):
        path = out / name
        upcycle(
            method,
            seed,
            [experts[kind][d] for d in DOMAINS],
            path,
            domain_embeddings=embeddings,
            moe_overrides={"nexus_hidden_size": 64, **overrides},
            calibration_shards=shards if calibrate else None,
            calibrate_router=calibrate,
        )
        return path

    def oracle(model):
        result = {}
        for i, d in enumerate(DOMAINS):
            for layer in model.moe_layers():
                layer.expert_mask = torch.arange(layer.num_experts) == i
            result[d] = scores(model, [d])[0][d]
        for layer in model.moe_layers():
            layer.expert_mask = None
        return result

    def scaled(path, shared, routed):
        model, _ = load_checkpoint(path)
        with torch.no_grad():
            for layer in model.moe_layers():
                layer.shared_expert.down_proj.weight.mul_(shared)
                layer.experts.down_proj.mul_(routed)
        return model

    rows = []

    def row(kind, composition, router, ppl, own):
        ref = {d: dense[kind][d][0][d] for d in DOMAINS}
        gap = max(ppl[d] / ref[d] - 1 for d in DOMAINS)
        mean_dense = sum(ref.values()) / len(ref)
        rows.append(
            (
                f"{kind} (dense {mean_dense:.1f})",
                composition,
                router,
                sum(ppl.values()) / len(ppl),
                gap,
                own,
            )
        )

    for kind in ("default", "ffn"):
        paper = build(f"paper-{kind}", kind, "nexus-paper", calibrate=False)
        row(kind, "paper: shared + p_i top-1", "oracle", oracle(scaled(paper, 1.0, 1.0)), None)
        if kind == "ffn":
            row(kind, "shared/2 + routed/2", "oracle", oracle(scaled(paper, 0.5, 0.5)), None)
        plug = build(f"plug-{kind}", kind)
        row(kind, "routed only, renormalised", "oracle", oracle(load_checkpoint(plug)[0]), None)
    ffn_variants = [
        ("paper: shared + p_i top-1", "calibrated", dict(method="nexus-paper"), {}),
        ("top-1 renormalised", "calibrated", {}, dict(top_k=1, router_context=0.0)),
        ("top-2 renormalised", "calibrated", {}, dict(router_context=0.0)),
        ("top-2 renormalised", "calibrated, context 0.5", {}, dict(router_context=0.5)),
        ("top-2 renormalised", f"calibrated, context {DEFAULT_CONTEXT:g} (default)", {}, {}),
    ]
    for i, (composition, router, kw, overrides) in enumerate(ffn_variants):
        path = build(f"cal-{i}", "ffn", **kw, **overrides)
        model, _ = load_checkpoint(path)
        row("ffn", composition, router, scores(model, DOMAINS)[0], share(model, DOMAINS))

    print("\nStep 0 (no MoE training): mean perplexity over the domains, worst gap to the dense")
    print("expert of the domain, share of each domain's tokens on its own expert\n")
    print("| experts | composition | router | mean ppl | worst gap | own-expert share |")
    print("|---|---|---|---:|---:|---:|")
    for kind, composition, router, mean, gap, own in rows:
        own_text = (
            "1.00 (forced)" if own is None else (f"{min(own.values()):.2f}-{max(own.values()):.2f}")
        )
        print(f"| {kind} | {composition} | {router} | {mean:.1f} | {gap:+.1%} | {own_text} |")

    print("\nZero-shot extension of the default plug-in MoE (no training step)\n")
    print("| new domain | share on new expert | gain recovered | earlier domains ppl |")
    print("|---|---:|---:|---:|")
    base = out / f"cal-{len(ffn_variants) - 1}"  # the last variant: the default plug-in MoE
    before_ppl, before_bpb = scores(load_checkpoint(base)[0], DOMAINS + HELDOUT)
    for domain in HELDOUT:
        path = out / f"plus-{domain}"
        extend(
            base,
            experts["ffn"][domain],
            path,
            domain=domain,
            domain_embeddings=embeddings,
            calibration_shards=shards,
            leak_budget=args.leak_budget if args.leak_budget > 0 else None,
        )
        model, _ = load_checkpoint(path)
        ppl, bpb = scores(model, DOMAINS + [domain])
        dense_bpb = dense["ffn"][domain][1][domain]
        recovered = (before_bpb[domain] - bpb[domain]) / (before_bpb[domain] - dense_bpb)
        earlier = sum(ppl[d] for d in DOMAINS) / sum(before_ppl[d] for d in DOMAINS) - 1
        new_share = share(model, [domain])[domain]
        print(f"| {domain} | {new_share:.2f} | {recovered:.2f} | {earlier:+.2%} |")


if __name__ == "__main__":
    main()
