"""Zero-shot extension of the study's trained Nexus MoEs: earlier rows refit or kept, and the new
row's norm.

Takes a finished study (`make paper`) and, for each seed and held-out domain, extends the trained
`nexus` MoE with that domain's FFN-only expert (calibrated row from the domain's text, no training
step) under each rule given as `refit@SCALE` (the earlier experts' rows refit among all the
domains, `extend --refit-rows`, the default) or `keep@SCALE` (`extend --keep-rows`), SCALE being
the new row's norm relative to the earlier rows'. Printed per seed, as the study measures them:
the share of the new domain's tokens on the new expert (mean over MoE layers), the share of the
gap between the MoE before extension and the new dense expert that the extension closes (log
perplexity, i.e. bits/byte), and the change of the earlier domains' mean perplexity (scored on
the same tokens before and after). Compare rules at equal cost to the earlier domains: a larger
norm buys share there too.

    .venv/bin/python benchmarks/refit_rows.py --study runs/paper-small \
        --rules keep@0.9 keep@1.0 refit@0.8 refit@0.9
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from leak_budget import score  # same folder: the study's scoring of an extended MoE

from nexus_moe.checkpoint import TOKENIZER_FILE
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.extend import extend
from nexus_moe.pipeline import tokens_for
from nexus_moe.train import tune_cpu_allocator


def parse_rule(text: str) -> tuple[bool, float]:
    kind, _, scale = text.partition("@")
    if kind not in ("refit", "keep") or not scale:
        raise SystemExit(f"rule '{text}': write refit@SCALE or keep@SCALE, e.g. refit@0.8")
    return kind == "refit", float(scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--domains", nargs="+", default=None, help="default: the study's heldout")
    parser.add_argument("--rules", nargs="+", default=["keep@0.9", "refit@0.8", "refit@0.9"])
    parser.add_argument("--new-tokens", type=int, default=131072, help="per new domain")
    parser.add_argument("--earlier-tokens", type=int, default=8192, help="per earlier domain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rules = [(text, *parse_rule(text)) for text in args.rules]
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()

    study = args.study
    saved = json.loads((study / "results" / "scores.json").read_text())
    earlier, heldout = saved["domains"], args.domains or saved["heldout"]
    corpus = study / "corpus"
    embeddings = DomainEmbeddings.load(study / "domain_embeddings")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for seed in args.seeds:
            trained = study / f"s{seed}" / "moe" / "nexus" / "trained" / "model"
            shards = tokens_for(corpus, trained / TOKENIZER_FILE)
            before_old = score(trained, shards, earlier, args.earlier_tokens)
            for domain in heldout:
                expert = study / "experts-ffn" / domain / "model"
                before_new = score(trained, shards, [domain], args.new_tokens)[domain]
                dense = score(expert, shards, [domain], args.new_tokens)[domain]
                for label, refit, scale in rules:
                    out = Path(tmp) / f"s{seed}-{domain}-{label}"
                    extend(trained, expert, out, domain=domain, domain_embeddings=embeddings,
                           calibration_shards=shards, seed=seed, refit_rows=refit,
                           row_scale=scale)  # fmt: skip
                    new, share = score(out, shards, [domain], args.new_tokens, new=domain)
                    old = score(out, shards, earlier, args.earlier_tokens)
                    shutil.rmtree(out)
                    full = math.log(before_new) - math.log(dense)
                    mean = lambda s: statistics.fmean(s[d] for d in earlier)  # noqa: E731
                    rows.append(
                        {
                            "seed": seed,
                            "domain": domain,
                            "rule": label,
                            "share": share,
                            "gap_recovered": (math.log(before_new) - math.log(new[domain])) / full,
                            "earlier_change": mean(old) / mean(before_old) - 1,
                        }
                    )
                    r = rows[-1]
                    print(f"s{seed} {domain} {label}: share {r['share']:.2f}, gap "
                          f"{r['gap_recovered']:.2f}, earlier {100 * r['earlier_change']:+.2f}%",
                          flush=True)  # fmt: skip
    seeds = " / ".join(f"s{s}" for s in args.seeds)
    print(f"\n| new domain | earlier rows, new row's norm | share ({seeds}) | gap recovered "
          "| earlier domains |")  # fmt: skip
    print("|---|---|---|---|---|")
    for domain in heldout:
        for label, refit, scale in rules:
            sel = [r for r in rows if r["domain"] == domain and r["rule"] == label]
            cols = [" / ".join(f"{r[k]:.2f}" for r in sel) for k in ("share", "gap_recovered")] + [
                " / ".join(f"{100 * r['earlier_change']:+.2f}%" for r in sel)
            ]
            kind = "refit" if refit else "kept"
            print(f"| {domain} | {kind}, {scale:g}x | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
