"""Zero-shot plug-in experts from many domains, near to far, on a study's MoEs.

For a finished study (`make demo`: runs/tiny, or `make paper`: runs/paper-small) and a folder of
user domains (`benchmarks/local_domains.py --out DATA` builds six from this machine's files),
each new domain is added zero-shot to the study's `nexus` MoE under each rule for the new row,
and scored as a user would see it: the share of the new domain's tokens whose top-1 expert is
the new one (mean over MoE layers), the share of the bits/byte gap between the MoE before
extension and the new FFN-only dense expert that the extension closes, and the change of each
earlier domain's perplexity (mean and worst), on the same tokens before and after.

MoEs: the study's step-0 (`upcycled`) and trained `nexus` MoEs of every seed, routing on
context as the study built them, and the same MoEs routing per token (the exportable setting):
the step-0 MoE recalibrated with `router_context: 0` (what `upcycle --set router_context=0`
gives) and, for `--trained`, that MoE trained with the study's MoE training settings and seed.

Preparation goes through the command line and is kept in `--work`, keyed on its inputs:

    corpus build --from DATA     the new domains' corpus
    branch --ffn-only            one dense expert per new domain (the study's expert settings)
    embed-domains --merge-into   their embeddings next to the study's
    train --init                 the per-token MoEs (with --trained)

The extensions and their scores run in this process (`nexus_moe.extend.extend_model`, the
function `nexus-moe extend` calls); nothing is written for them.

    .venv/bin/python benchmarks/plugin_domains.py --study runs/tiny --data DATA
    .venv/bin/python benchmarks/plugin_domains.py --study runs/paper-small --data DATA --trained
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from user_domain import cached, data_key, model_key  # noqa: E402

from nexus_moe import calibrate, config, placement  # noqa: E402
from nexus_moe.analyse import RoutingCounter  # noqa: E402
from nexus_moe.checkpoint import (  # noqa: E402
    CONFIG_FILE,
    TOKENIZER_FILE,
    load_checkpoint,
    save_checkpoint,
)
from nexus_moe.config import to_dict  # noqa: E402
from nexus_moe.embed import EMBEDDINGS_FILENAME, DomainEmbeddings  # noqa: E402
from nexus_moe.evaluate import EvalConfig, evaluate_domains  # noqa: E402
from nexus_moe.extend import extend_model  # noqa: E402
from nexus_moe.io_utils import file_sha256  # noqa: E402
from nexus_moe.pipeline import fingerprint, tokens_for  # noqa: E402
from nexus_moe.recipe import load_recipe  # noqa: E402
from nexus_moe.study import Study  # noqa: E402
from nexus_moe.study.layout import RunLayout  # noqa: E402

RULES = {
    # label: extend_model keyword arguments
    "default": {},
    "loss budget 0.01": {"loss_budget": 0.01},
    "loss budget 0.03": {"loss_budget": 0.03},
    "fixed norm": {"row_scale": "fixed"},
    "leak budget 0.01": {"leak_budget": 0.01},
    # the default's placement of models deeper than placement.LAYERWISE_MAX_LAYERS MoE layers
    "joint": {"layerwise_max_layers": 0},
}


def per_token(model):
    """The step-0 MoE recalibrated to route per token (``router_context`` 0)."""
    moe = replace(model.cfg.moe, router_context=0.0)
    model.cfg.moe = moe
    for layer in model.moe_layers():
        layer._set_config(moe)  # as growing and shrinking a layer set it
    return model


def score(model, shards, domains, tokens, new_index=None):
    """Per-domain scores and, with ``new_index``, each domain's top-1 share on that expert."""
    counter = RoutingCounter(model, len(domains)) if new_index is not None else None
    cfg = EvalConfig(seq_len=128, batch_size=16, max_tokens=tokens)
    out = evaluate_domains(model, shards, domains, cfg, on_routing=counter)
    shares = None
    if counter is not None:
        c = counter.counts.double()  # (layers, domains, experts)
        shares = (c[:, :, new_index] / c.sum(-1)).mean(0).tolist()
    return out, shares


def measure(moe, experts, embeddings, new_shards, old_shards, old_domains, dense_bpb, args):
    """Rows of every new domain x rule for one MoE."""
    before_old, _ = score(moe, old_shards, old_domains, args.earlier_tokens)
    rows = []
    for domain in args.domains:
        before_new, _ = score(moe, new_shards, [domain], args.eval_tokens)
        expert = experts[domain]
        windows = calibrate.domain_windows(new_shards, domain, moe.cfg.max_seq_len, 8192)
        for rule, kwargs in RULES.items():
            if args.rules and rule not in args.rules:
                continue
            start = time.perf_counter()
            model = copy.deepcopy(moe)
            if kwargs.get("row_scale") == "fixed":
                kwargs = {"row_scale": config.new_row_scale(moe.cfg.moe.router_context)}
            kwargs = dict(kwargs)
            layerwise = kwargs.pop("layerwise_max_layers", placement.LAYERWISE_MAX_LAYERS)
            saved, placement.LAYERWISE_MAX_LAYERS = placement.LAYERWISE_MAX_LAYERS, layerwise
            try:
                extend_model(model, expert, domain, embeddings.get([domain])[0],
                             merge_lambda=0.0, seed=args.seed_of_moe,
                             calibration_windows=windows, **kwargs)  # fmt: skip
            finally:
                placement.LAYERWISE_MAX_LAYERS = saved
            n = model.cfg.moe.num_experts - 1
            after_new, share = score(model, new_shards, [domain], args.eval_tokens, n)
            after_old, leak = score(model, old_shards, old_domains, args.earlier_tokens, n)
            b, a = before_new[domain].bits_per_byte, after_new[domain].bits_per_byte
            changes = {
                d: after_old[d].perplexity / before_old[d].perplexity - 1 for d in old_domains
            }
            mean_before = statistics.fmean(before_old[d].perplexity for d in old_domains)
            mean_after = statistics.fmean(after_old[d].perplexity for d in old_domains)
            row = {
                "domain": domain,
                "rule": rule,
                "share": share[0],
                "gap": (b - a) / (b - dense_bpb[domain]),
                "earlier": mean_after / mean_before - 1,
                "worst": max(changes.values()),
                "worst_domain": max(changes, key=changes.get),
                "earlier_to_new": dict(zip(old_domains, leak, strict=True)),
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(f"    {domain:<11} {rule:<22} share {row['share']:.2f}  gap {row['gap']:.2f}  "
                  f"earlier {100 * row['earlier']:+.2f}%  worst {100 * row['worst']:+.2f}% "
                  f"({row['worst_domain']})  leak {max(leak):.3f}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--recipe", type=Path, help="the study's recipe (default: by workdir)")
    parser.add_argument("--data", type=Path, required=True, help="one sub-folder per domain")
    parser.add_argument("--domains", nargs="+", help="sub-folders to add (default: all)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--routing", nargs="+", default=["context", "token"],
                        choices=["context", "token"])  # fmt: skip
    parser.add_argument("--stages", nargs="+", default=["step0"], choices=["step0", "trained"])
    parser.add_argument("--rules", nargs="+", help=f"of {list(RULES)} (default: all)")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--earlier-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    study = args.study
    run = RunLayout(study)
    recipe_path = args.recipe or {
        "tiny": Path("configs/tiny.yaml"), "paper-small": Path("configs/paper-small.yaml")
    }[study.name]  # fmt: skip
    recipe = load_recipe(recipe_path)
    work = args.work or study.parent / f"{study.name}-plugin-domains"
    work.mkdir(parents=True, exist_ok=True)
    args.domains = args.domains or sorted(p.name for p in args.data.iterdir() if p.is_dir())
    old_domains = list(recipe.corpus.domains)

    # -- preparation, through the command line ------------------------------------------------
    corpus = work / "corpus"
    build = ["--domains", ",".join(args.domains), "--max-mb", "2", "--val-fraction", "0.16"]
    corpus_key = cached(corpus, fingerprint([data_key(args.data / d) for d in args.domains],
                        build), "corpus", "build", "--from", str(args.data), "--out",
                        str(corpus), *build)  # fmt: skip
    seed_dir = run.seed
    branch_cfg = to_dict(recipe.branch_train)
    sets = ["--set", f"steps={branch_cfg['steps']}", "--set", f"lr={branch_cfg['lr']}", "--set",
            f"batch_size={branch_cfg['batch_size']}", "--set", f"seq_len={branch_cfg['seq_len']}",
            "--set", f"warmup_frac={branch_cfg['warmup_frac']}", "--set", "checkpoint_every=0",
            "--device", "cpu"]  # fmt: skip
    experts_dir = work / "experts-ffn"
    cached(experts_dir, fingerprint(model_key(run.seed_model), corpus_key, sets), "branch",
           "--seed", str(seed_dir), "--corpus", str(corpus), "--out", str(experts_dir),
           "--ffn-only", *sets)  # fmt: skip
    embeddings_dir = work / "domain_embeddings"
    merged = run.domain_embeddings / EMBEDDINGS_FILENAME
    cached(embeddings_dir, fingerprint(corpus_key, file_sha256(merged)[:16]), "embed-domains",
           "--corpus", str(corpus), "--out", str(embeddings_dir), "--merge-into", str(merged),
           "--num-chunks", str(recipe.embed.num_chunks))  # fmt: skip

    tokenizer = run.seed_model / TOKENIZER_FILE
    new_shards = tokens_for(corpus, tokenizer)
    old_shards = tokens_for(run.corpus, tokenizer)
    experts = {d: load_checkpoint(experts_dir / d / "model")[0] for d in args.domains}
    embeddings = DomainEmbeddings.load(embeddings_dir)
    dense_bpb = {}
    for d in args.domains:
        s, _ = score(experts[d], new_shards, [d], args.eval_tokens)
        dense_bpb[d] = s[d].bits_per_byte

    variant = next(v for v in recipe.moe.variants if v.name == "nexus")
    runner = Study(recipe)
    results = []
    for seed in args.seeds:
        step0_dir = run.upcycled("nexus", seed)
        trained_dir = run.trained_model("nexus", seed)
        for routing in args.routing:
            models = {}
            if routing == "context":
                models["step0"] = step0_dir
                models["trained"] = trained_dir
            else:
                token_dir = work / f"s{seed}" / "per-token" / "upcycled"
                if not (token_dir / CONFIG_FILE).is_file():
                    model, meta = load_checkpoint(step0_dir)
                    calibrate.calibrate_model(per_token(model), old_shards)
                    save_checkpoint(token_dir, model, tokenizer, metadata=meta)
                models["step0"] = token_dir
                if "trained" in args.stages:
                    tcfg = runner.moe_train_config(variant, seed, len(old_domains))
                    out = work / f"s{seed}" / "per-token" / "trained"
                    cfg_file = work / f"s{seed}" / "per-token" / "train.json"
                    cfg_file.write_text(json.dumps(to_dict(tcfg)))
                    cached(out, fingerprint(model_key(token_dir), to_dict(tcfg)), "train",
                           "--init", str(token_dir), "--corpus", str(run.corpus),
                           "--out", str(out), "--config", str(cfg_file),
                           "--device", "cpu")  # fmt: skip
                    models["trained"] = out / "model"
            for stage in args.stages:
                print(f"seed {seed}, routing {routing}, {stage}: {models[stage]}", flush=True)
                moe = load_checkpoint(models[stage])[0]
                held = moe.moe_layers()[0].domain_stats.held
                if held is None or held.shape[1] < calibrate.HELD_WINDOWS:
                    # statistics from before (as many) windows were kept: recomputed, rows kept
                    # (what upcycling and training write now)
                    calibrate.refresh_statistics(moe, old_shards)
                args.seed_of_moe = seed
                for row in measure(moe, experts, embeddings, new_shards, old_shards, old_domains,
                                   dense_bpb, args):  # fmt: skip
                    results.append({"seed": seed, "routing": routing, "stage": stage, **row})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    _summary(results)


def _summary(results):
    print("\n| routing | MoE | new domain | rule | share | gap recovered | earlier (mean) | "
          "earlier (worst) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["routing"], r["stage"], r["domain"], r["rule"]) for r in results})
    for routing, stage, domain, rule in keys:
        rs = [r for r in results if (r["routing"], r["stage"], r["domain"], r["rule"]) ==
              (routing, stage, domain, rule)]  # fmt: skip
        print(f"| {routing} | {stage} | {domain} | {rule} | {_per_seed(rs, 'share')} | "
              f"{_per_seed(rs, 'gap')} | {_per_seed(rs, 'earlier', True)} | "
              f"{_per_seed(rs, 'worst', True)} |")  # fmt: skip


def _per_seed(rows: list[dict], key: str, percent: bool = False) -> str:
    return " / ".join(f"{100 * r[key]:+.2f}%" if percent else f"{r[key]:.2f}" for r in rows)


if __name__ == "__main__":
    main()
