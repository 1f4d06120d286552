"""The plug-in `nexus` router against the training-free peer routers, on the same experts.

On a finished study (`make paper`: runs/paper-small), every peer of `nexus_moe.routers.peers`
replaces the router of the study's step-0 `nexus` MoE (same FFN-only experts, same shared
weights), and is scored side by side with `nexus` itself, routing on context (as the study
builds it) and per token (`router_context` 0, the exportable setting; `nexus` recalibrated as
`upcycle --set router_context=0` would):

* step 0: each domain's perplexity against its dense FFN-only expert (worst and mean over the
  domains, in %) and the share of each domain's tokens whose top-1 expert is its own (mean over
  MoE layers and domains), on the study's evaluation tokens;
* zero-shot addition of math, legal (the study's held-out domains) and a user's domain built
  with `corpus build --from` (man pages, from `benchmarks/plugin_domains.py`'s work folder): the
  new domain's top-1 share on its expert, the share of the bits/byte gap between the MoE before
  and the new dense expert that the addition closes, and the change of the earlier domains'
  mean perplexity;
* opt-out: each expert removed in turn; the change of the remaining domains' mean perplexity.

Differences to `nexus` are paired with the study's t-intervals (`nexus_moe.study.paired_interval`)
over seeds and domains (step 0: the 4 domains' perplexity ratio; addition: the new domains;
opt-out: the removed experts). The study's step-0 MoEs of different seeds compute the same
function (the seed only draws the Nexus projection's W1, and W2 starts at 0), so at step 0 one
seed is all there is: more seeds repeat the same figures. Nothing is written but `--json`.

    .venv/bin/python benchmarks/peer_routers.py --seeds 0 --json /tmp/peers.json
    .venv/bin/python benchmarks/peer_routers.py --summary /tmp/peers-s0.json /tmp/peers-s1.json
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

from nexus_moe import calibrate
from nexus_moe.analyse import RoutingCounter
from nexus_moe.checkpoint import CONFIG_FILE, TOKENIZER_FILE, load_checkpoint
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.evaluate import EvalConfig, evaluate_domains
from nexus_moe.extend import extend_model, remove_from_model
from nexus_moe.pipeline import tokens_for
from nexus_moe.routers import peers

try:
    from nexus_moe.study import paired_interval
except ImportError:  # the study as a package, before its __init__ re-exports it
    from nexus_moe.study.stats import paired_interval

OLD = ["code", "literature", "dictionary", "techdocs"]
PEERS = ["nexus", *peers.METHODS]


def per_token(model):
    """The MoE routing per token (``router_context`` 0), as growing a layer sets the config."""
    moe = replace(model.cfg.moe, router_context=0.0)
    model.cfg.moe = moe
    for layer in model.moe_layers():
        layer._set_config(moe)
    return model


def score(model, shards, domains, tokens, routing=False):
    """{domain: DomainScore} and, with ``routing``, the top-1 counts (layers, domains, experts)."""
    counter = RoutingCounter(model, len(domains)) if routing else None
    cfg = EvalConfig(seq_len=128, batch_size=16, max_tokens=tokens)
    with torch.no_grad():
        out = evaluate_domains(model, shards, domains, cfg, on_routing=counter)
    return out, None if counter is None else counter.counts.double()


def run_peer(peer, base, ctx, args):
    """Every measure of one peer on one MoE (one seed, one routing)."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    state = None
    if peer != "nexus":
        state = peers.place_peer_rows(model, peer, ctx["windows"], ctx["seed_model"],
                                      phatgoose_steps=args.phatgoose_steps)  # fmt: skip
    placed = time.perf_counter() - t0
    s0, counts = score(model, ctx["old_shards"], OLD, args.eval_tokens, routing=True)
    own = (counts[:, range(len(OLD)), range(len(OLD))] / counts.sum(-1)).mean().item()
    rel = {d: s0[d].perplexity / ctx["dense_ppl"][d] - 1 for d in OLD}
    row = {"peer": peer, "place_s": placed, "step0_mean": statistics.fmean(rel.values()),
           "step0_worst": max(rel.values()), "own_share": own,
           "ppl": {d: s0[d].perplexity for d in OLD}, "add": {}, "optout": {}}  # fmt: skip
    mean_before = statistics.fmean(s0[d].perplexity for d in OLD)
    for domain in args.new_domains:
        shards = ctx["new_shards"][domain]
        before, _ = score(model, shards, [domain], args.eval_tokens)
        m, st = copy.deepcopy(model), copy.deepcopy(state)
        windows = ctx["new_windows"][domain]
        if peer == "nexus":
            extend_model(m, ctx["experts"][domain], domain, ctx["embeddings"].get([domain])[0],
                         merge_lambda=0.0, seed=ctx["seed"], calibration_windows=windows)  # fmt: skip
        else:
            peers.add_peer_expert(m, st, ctx["experts"][domain], domain, windows, ctx["seed_model"],
                                  phatgoose_steps=args.phatgoose_steps)  # fmt: skip
        after, c = score(m, shards, [domain], args.eval_tokens, routing=True)
        after_old, _ = score(m, ctx["old_shards"], OLD, args.eval_tokens)
        b, a = before[domain].bits_per_byte, after[domain].bits_per_byte
        row["add"][domain] = {
            "share": (c[:, 0, -1] / c[:, 0].sum(-1)).mean().item(),
            "gap": (b - a) / (b - ctx["dense_bpb"][domain]),
            "earlier": statistics.fmean(after_old[d].perplexity for d in OLD) / mean_before - 1,
        }
    for j, dropped in enumerate(OLD):
        m, st = copy.deepcopy(model), copy.deepcopy(state)
        if peer == "nexus":
            remove_from_model(m, j)
        else:
            peers.remove_peer_expert(m, st, j)
        rest = [d for d in OLD if d != dropped]
        after, _ = score(m, ctx["old_shards"], rest, args.eval_tokens)
        changes = [after[d].perplexity / s0[d].perplexity - 1 for d in rest]
        row["optout"][dropped] = {"mean": statistics.fmean(changes), "worst": max(changes)}
    row["seconds"] = time.perf_counter() - t0
    adds = " ".join(f"{d} {v['share']:.2f}/{v['gap']:.2f}/{100 * v['earlier']:+.2f}%"
                    for d, v in row["add"].items())  # fmt: skip
    opt = statistics.fmean(v["mean"] for v in row["optout"].values())
    print(f"  {peer:<20} step0 mean {100 * row['step0_mean']:+6.2f}% worst "
          f"{100 * row['step0_worst']:+6.2f}% own {own:.2f} | add {adds} | opt-out "
          f"{100 * opt:+.2f}% | {row['seconds']:.0f}s", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--plugin-work", type=Path, default=Path("runs/paper-small-plugin-domains"),
                        help="benchmarks/plugin_domains.py's work folder (the user domain)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--routing", nargs="+", default=["context", "token"],
                        choices=["context", "token"])  # fmt: skip
    parser.add_argument("--peers", nargs="+", default=PEERS, choices=PEERS)
    parser.add_argument("--new-domains", nargs="+", default=["math", "legal", "manpages"])
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--phatgoose-steps", type=int, default=peers.PHATGOOSE_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    study, work = args.study, args.plugin_work
    tokenizer = study / "seed" / "model" / TOKENIZER_FILE
    old_shards = tokens_for(study / "corpus", tokenizer)
    user_shards = tokens_for(work / "corpus", tokenizer)
    new_shards, experts = {}, {}
    for d in args.new_domains:
        local = d in old_shards.domains
        new_shards[d] = old_shards if local else user_shards
        experts[d] = load_checkpoint((study if local else work) / "experts-ffn" / d / "model")[0]
    seed_model = load_checkpoint(study / "seed" / "model")[0]
    max_len = seed_model.cfg.max_seq_len
    n_tok = calibrate.DEFAULT_CALIBRATION_TOKENS
    ctx = {
        "old_shards": old_shards, "new_shards": new_shards, "experts": experts,
        "seed_model": seed_model,
        "embeddings": DomainEmbeddings.load(work / "domain_embeddings"),
        "windows": [calibrate.domain_windows(old_shards, d, max_len, n_tok) for d in OLD],
        "new_windows": {d: calibrate.domain_windows(new_shards[d], d, max_len, n_tok)
                        for d in args.new_domains},
    }  # fmt: skip
    dense = {d: load_checkpoint(study / "experts-ffn" / d / "model")[0] for d in OLD}
    ctx["dense_ppl"] = {d: score(dense[d], old_shards, [d], args.eval_tokens)[0][d].perplexity
                        for d in OLD}  # fmt: skip
    ctx["dense_bpb"] = {d: score(experts[d], new_shards[d], [d], args.eval_tokens)[0][d]
                        .bits_per_byte for d in args.new_domains}  # fmt: skip
    results = []
    for seed in args.seeds:
        step0 = study / f"s{seed}" / "moe" / "nexus" / "upcycled"
        ctx["seed"] = seed
        for routing in args.routing:
            base = load_checkpoint(step0)[0]
            if routing == "token":
                cached = work / f"s{seed}" / "per-token" / "upcycled"
                if (cached / CONFIG_FILE).is_file():
                    base = load_checkpoint(cached)[0]
                else:
                    calibrate.calibrate_model(per_token(base), old_shards)
            held = base.moe_layers()[0].domain_stats.held
            if held is None or held.shape[1] < calibrate.HELD_WINDOWS:
                calibrate.refresh_statistics(base, old_shards)
            print(f"seed {seed}, routing {routing}", flush=True)
            for peer in args.peers:
                row = run_peer(peer, base, ctx, args)
                results.append({"seed": seed, "routing": routing, **row})
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))


def _measures(row):
    """Measure name -> list of values (paired across peers by position)."""
    adds = list(row["add"].values())
    return {
        "step0 mean": [row["step0_mean"]],  # (paired per domain in summary)
        "step0 worst": [row["step0_worst"]],
        "own share": [row["own_share"]],
        "add share": [a["share"] for a in adds],
        "add gap": [a["gap"] for a in adds],
        "add earlier": [a["earlier"] for a in adds],
        "opt-out": [o["mean"] for o in row["optout"].values()],
    }


# For each measure, whether larger is better (sets the sign of the paired difference).
HIGHER = {"step0 mean": False, "step0 worst": False, "own share": True, "add share": True,
          "add gap": True, "add earlier": False, "opt-out": False}  # fmt: skip
PERCENT = {"step0 mean", "step0 worst", "add earlier", "opt-out"}


def summary(results: list[dict]) -> str:
    """Markdown: per routing, peers as rows, each measure's mean (and the paired interval of
    nexus minus the peer, signed so that > 0 means nexus is better)."""
    lines = []
    for routing in sorted({r["routing"] for r in results}):
        rows = [r for r in results if r["routing"] == routing]
        seeds = sorted({r["seed"] for r in rows})
        names = [p for p in PEERS if any(r["peer"] == p for r in rows)]
        by = {(r["peer"], r["seed"]): _measures(r) for r in rows}
        by_ppl = {(r["peer"], r["seed"]): r["ppl"] for r in rows}
        lines += [f"\nrouting: {routing}, seeds {seeds}; cells: mean [95% interval of the paired "
                  "advantage of nexus; > 0: nexus better]", "",
                  "| router | " + " | ".join(HIGHER) + " |",
                  "|---" * (len(HIGHER) + 1) + "|"]  # fmt: skip
        for peer in names:
            cells = []
            for m in HIGHER:
                vals = [v for s in seeds if (peer, s) in by for v in by[peer, s][m]]
                scale, unit = (100, "%") if m in PERCENT else (1, "")
                cell = f"{scale * statistics.fmean(vals):+.2f}{unit}" if unit else (
                    f"{statistics.fmean(vals):.2f}")  # fmt: skip
                if peer != "nexus" and m == "step0 mean":  # paired per domain: ppl ratio
                    diffs = [
                        by_ppl[peer, s][d] / by_ppl["nexus", s][d] - 1
                        for s in seeds if (peer, s) in by and ("nexus", s) in by
                        for d in by_ppl[peer, s]
                    ]  # fmt: skip
                elif peer != "nexus":
                    diffs = [
                        (a - b) * (1 if HIGHER[m] else -1)
                        for s in seeds if (peer, s) in by and ("nexus", s) in by
                        for a, b in zip(by["nexus", s][m], by[peer, s][m], strict=True)
                    ]  # fmt: skip
                if peer != "nexus":
                    p = paired_interval(diffs)
                    if p["low"] is not None:
                        cell += f" [{scale * p['low']:+.2f}, {scale * p['high']:+.2f}]"
                cells.append(cell)
            lines.append(f"| {peer} | " + " | ".join(cells) + " |")
        new = list(dict.fromkeys(d for r in rows for d in r["add"]))
        lines += ["", f"zero-shot addition by new domain ({routing}; share / gap recovered / "
                  "earlier domains, mean over seeds)", "",
                  "| router | " + " | ".join(new) + " |", "|---" * (len(new) + 1) + "|"]  # fmt: skip
        for peer in names:
            cells = []
            for d in new:
                a = [r["add"][d] for r in rows if r["peer"] == peer and d in r["add"]]
                cells.append(f"{statistics.fmean(x['share'] for x in a):.2f} / "
                             f"{statistics.fmean(x['gap'] for x in a):.2f} / "
                             f"{100 * statistics.fmean(x['earlier'] for x in a):+.2f}%")  # fmt: skip
            lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":
        # --summary A.json [B.json ...]: the table of runs made separately (e.g. one per seed)
        print(summary([r for f in sys.argv[2:] for r in json.loads(Path(f).read_text())]))
    else:
        main()
