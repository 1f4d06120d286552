"""The plug-in `nexus` router against the training-free peer routers, on the same experts
(`make peers`; BENCHMARKS.md, "Training-free peer routers against `nexus`"; README's table).

On a finished study (`make paper`: runs/paper-small) every router is built the way a user would
build it: `upcycle --method nexus` of the study's seed and four FFN-only experts, with the
calibrated `nexus` rows (routing on context 0.75, as the study builds it), the same recalibrated
per token (`--set router_context=0`, the exportable setting: the row `nexus-token`) or
`--router-init PEER` (nexus_moe.routers.peers; docs/design.md §5.8). Then, for each router:

* step 0: each domain's perplexity against its dense FFN-only expert (mean and worst of the 4,
  in %) and the share of each domain's tokens whose top-1 expert is its own (mean over MoE
  layers and domains);
* zero-shot addition (`extend --corpus`, each router by its own rule: nexus's bounded row, DUME
  re-solving every row, ...) of math, legal (the study's held-out domains) and a user's domain
  (man pages from `--data`, benchmarks/local_domains.py's folders: `corpus build --from`, `branch
  --ffn-only` with the study's branch settings and `embed-domains`, made once in `--work`): the
  new domain's top-1 share on its expert, the share of the bits/byte gap between the MoE before
  and the new dense expert that the addition closes, the change of the earlier domains' mean
  perplexity;
* opt-out (`remove-expert` of each of the 4 experts in turn): the change of the remaining
  domains' mean perplexity;
* after the study's MoE training (its `moe.train`: 100 steps, lr 3e-4), one MoE per seed: mean
  perplexity over the 4 domains (`--train-routers`; "-" where not run).

Brackets: the 95% t-interval of nexus's paired advantage (> 0: nexus better) over the 4 domains
(step 0, own share), the 3 new domains (addition), the 4 removals (opt-out), or seeds x domains
(trained). The step-0, addition and opt-out figures come from the first seed alone: the study's
MoEs of different seeds compute the same function until they are trained (the seed only draws
the Nexus projection's W1, and W2 starts at 0; the peers use no seed), so more seeds would repeat
the same numbers and narrow the intervals for nothing. Trained rows use every seed.

    .venv/bin/python benchmarks/local_domains.py --out runs/local-domains
    .venv/bin/python benchmarks/peer_routers.py --data runs/local-domains --readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_domain import cached, data_key, model_key  # noqa: E402

from nexus_moe.analyse import RoutingCounter  # noqa: E402
from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint  # noqa: E402
from nexus_moe.config import from_dict  # noqa: E402
from nexus_moe.embed import EMBEDDINGS_FILENAME, DomainEmbeddings  # noqa: E402
from nexus_moe.evaluate import EvalConfig, evaluate_domains  # noqa: E402
from nexus_moe.extend import extend, remove_expert  # noqa: E402
from nexus_moe.io_utils import file_sha256  # noqa: E402
from nexus_moe.pipeline import fingerprint, tokens_for, train_model  # noqa: E402
from nexus_moe.routers import peers  # noqa: E402
from nexus_moe.study.stats import paired_interval  # noqa: E402
from nexus_moe.train import TrainConfig  # noqa: E402
from nexus_moe.upcycle import upcycle  # noqa: E402

OLD = ["code", "literature", "dictionary", "techdocs"]
ROUTERS = ["nexus", "nexus-token", *peers.METHODS]
BEGIN, END = "<!-- peers-table:begin -->", "<!-- peers-table:end -->"


def score(model, shards, domains, tokens, routing=False):
    """{domain: DomainScore} and, with ``routing``, the top-1 counts (layers, domains, experts)."""
    counter = RoutingCounter(model, len(domains)) if routing else None
    cfg = EvalConfig(seq_len=128, batch_size=16, max_tokens=tokens)
    with torch.no_grad():
        out = evaluate_domains(model.eval(), shards, domains, cfg, on_routing=counter)
    return out, None if counter is None else counter.counts.double()


def upcycled(router: str, ctx: dict, seed: int) -> Path:
    """The router's step-0 MoE of the study's seed and FFN-only experts (made once)."""
    out = ctx["work"] / f"s{seed}" / router / "upcycled"
    if (out / "config.json").is_file():
        return out
    init = "nexus" if router.startswith("nexus") else router
    overrides = dict(ctx["overrides"])
    if router == "nexus-token":
        overrides["router_context"] = 0.0
    upcycle("nexus", ctx["study"] / "seed" / "model", [ctx["experts"][d] for d in OLD], out,
            domain_embeddings=ctx["embeddings"] if init == "nexus" else None,
            moe_overrides=overrides, seed=seed,
            calibration_shards=None if init == "arrow" else ctx["old_shards"],
            router_init=init)  # fmt: skip
    return out


def run_router(router: str, ctx: dict, args) -> dict:
    """Every step-0 measure of one router (first seed)."""
    t0 = time.perf_counter()
    seed = args.seeds[0]
    moe_dir = upcycled(router, ctx, seed)
    placed = time.perf_counter() - t0
    model = load_checkpoint(moe_dir)[0]
    s0, counts = score(model, ctx["old_shards"], OLD, args.eval_tokens, routing=True)
    own = {d: (counts[:, i, i] / counts[:, i].sum(-1)).mean().item() for i, d in enumerate(OLD)}
    row = {"router": router, "upcycle_s": placed, "ppl": {d: s0[d].perplexity for d in OLD},
           "dense_ppl": ctx["dense_ppl"], "own": own, "add_share": {}, "add_gap": {}, "add_earlier": {}, "optout": {},
           "trained": {}}  # fmt: skip
    mean_before = statistics.fmean(s0[d].perplexity for d in OLD)
    for domain in args.new_domains:
        shards = ctx["new_shards"][domain]
        before, _ = score(model, shards, [domain], args.eval_tokens)
        out = ctx["work"] / f"s{seed}" / router / f"plus-{domain}"
        if not (out / "config.json").is_file():
            nexus = router.startswith("nexus")
            extend(moe_dir, ctx["experts"][domain], out, domain=domain,
                   domain_embeddings=ctx["embeddings"] if nexus else None, seed=seed,
                   calibration_shards=None if router == "arrow" else shards)  # fmt: skip
        grown = load_checkpoint(out)[0]
        after, c = score(grown, shards, [domain], args.eval_tokens, routing=True)
        after_old, _ = score(grown, ctx["old_shards"], OLD, args.eval_tokens)
        b, a = before[domain].bits_per_byte, after[domain].bits_per_byte
        row["add_share"][domain] = (c[:, 0, -1] / c[:, 0].sum(-1)).mean().item()
        row["add_gap"][domain] = (b - a) / (b - ctx["dense_bpb"][domain])
        row["add_earlier"][domain] = (
            statistics.fmean(after_old[d].perplexity for d in OLD) / mean_before - 1
        )
    for dropped in OLD:
        out = ctx["work"] / f"s{seed}" / router / f"minus-{dropped}"
        if not (out / "config.json").is_file():
            remove_expert(moe_dir, out, dropped)
        rest = [d for d in OLD if d != dropped]
        after, _ = score(load_checkpoint(out)[0], ctx["old_shards"], rest, args.eval_tokens)
        changes = [after[d].perplexity / s0[d].perplexity - 1 for d in rest]
        row["optout"][dropped] = statistics.fmean(changes)
    row["seconds"] = time.perf_counter() - t0
    print(f"  {router:<20} step0 {_pct(_step0(row)[0])} own {statistics.fmean(own.values()):.2f} "
          f"| add {statistics.fmean(row['add_share'].values()):.2f} / "
          f"{statistics.fmean(row['add_gap'].values()):.2f} / "
          f"{_pct(statistics.fmean(row['add_earlier'].values()))} | opt-out "
          f"{_pct(statistics.fmean(row['optout'].values()))} | {row['seconds']:.0f}s",
          flush=True)  # fmt: skip
    return row


def train_router(router: str, ctx: dict, args, seed: int) -> dict[str, float]:
    """Perplexity of each domain after the study's MoE training of the router's MoE (seed)."""
    out = ctx["work"] / f"s{seed}" / router / "trained"
    if not (out / "model" / "config.json").is_file():
        model = load_checkpoint(upcycled(router, ctx, seed))[0]
        cfg = TrainConfig(**{**vars(ctx["train"]), "seed": seed})
        train_model(model, ctx["study"] / "corpus", ctx["tokenizer"], OLD, cfg, out,
                    metadata={"stage": "peers-train", "router": router}, show_progress=False)  # fmt: skip
    scores, _ = score(load_checkpoint(out / "model")[0], ctx["old_shards"], OLD, args.eval_tokens)
    return {d: scores[d].perplexity for d in OLD}


# --------------------------------------------------------------------------------------------
# the table


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _step0(row: dict) -> tuple[float, float]:
    rel = [row["ppl"][d] / row["dense_ppl"][d] - 1 for d in OLD]
    return statistics.fmean(rel), max(rel)


# column: (header, how a row's value is shown, larger is better, nexus's paired advantages
# over the peer or None)
def _columns(rows: dict[str, dict]) -> list[tuple]:
    def ratio(key):  # peer / nexus - 1 of a perplexity, per unit
        return lambda p, n: [p[key][u] / n[key][u] - 1 for u in n[key] if u in p[key]]

    def higher(key):  # nexus - peer
        return lambda p, n: [n[key][u] - p[key][u] for u in n[key] if u in p[key]]

    def lower(key):  # peer - nexus
        return lambda p, n: [p[key][u] - n[key][u] for u in n[key] if u in p[key]]

    def mean(key):
        return lambda r: statistics.fmean(r[key].values()) if r[key] else None

    cols = [
        ("step-0 mean", lambda r: _step0(r)[0], False, ratio("ppl")),
        ("step-0 worst", lambda r: _step0(r)[1], False, None),
        ("own share", mean("own"), True, higher("own")),
        ("zero-shot share", mean("add_share"), True, higher("add_share")),
        ("gap recovered", mean("add_gap"), True, higher("add_gap")),
        ("earlier change", mean("add_earlier"), False, lower("add_earlier")),
        ("opt-out change", mean("optout"), False, lower("optout")),
    ]
    if any(r["trained"] for r in rows.values()):
        cols.append(("trained ppl", mean("trained"), False, ratio("trained")))
    return cols


PERCENT = {"step-0 mean", "step-0 worst", "earlier change", "opt-out change"}
ZERO_SHOT = {"zero-shot share", "gap recovered", "earlier change"}


def _show(header: str, value: float | None) -> str:
    if value is None:
        return "-"
    return _pct(value) if header in PERCENT else f"{value:.2f}"


def _same_step0(nexus: dict) -> str:
    checked = nexus.get("same_step0") or {}
    if not checked:
        return ""
    seeds = ", ".join(map(str, checked))
    if all(checked.values()):
        return f" (nexus's step-0 perplexities of seeds {seeds} are the same to every digit)"
    return f" (nexus's step-0 perplexities differ on seeds {seeds}: see the JSON)"


def table(rows: dict[str, dict]) -> tuple[str, dict[str, dict[str, dict]]]:
    """Markdown: routers as rows, measures as columns, each peer's cell with the interval of
    nexus's paired advantage; and those intervals (peer -> column -> interval)."""
    cols = _columns(rows)
    caption = "router vs nexus (`make peers`; [95% interval of nexus's paired advantage], > 0: nexus better)"
    lines = [f"| {caption} | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    nexus, intervals = rows["nexus"], {}
    for name, r in rows.items():
        cells, intervals[name] = [], {}
        for header, value, _, diff in cols:
            cell = _show(header, value(r))
            if name != "nexus" and diff is not None and cell != "-":
                p = paired_interval(diff(r, nexus))
                if p["low"] is not None:
                    scale = 100 if header in PERCENT | {"trained ppl"} else 1
                    cell += f" [{scale * p['low']:+.2f}, {scale * p['high']:+.2f}]"
                    intervals[name][header] = p
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), intervals


def report(rows: dict[str, dict], args) -> str:
    """The table and one paragraph saying what it shows (all of it computed here)."""
    text, intervals = table(rows)
    cols = _columns(rows)
    peers_ = [n for n in rows if n not in ("nexus", "nexus-token")]
    wins = [f"{n} ({h})" for n in rows for h, p in intervals[n].items() if p["high"] < 0]
    ahead_zs = [n for n in peers_ if any(intervals[n][h]["low"] > 0 for h in ZERO_SHOT
                                          if h in intervals[n])]  # fmt: skip
    best = []
    for header, value, higher, _ in cols:
        scored = {n: value(r) for n, r in rows.items() if value(r) is not None}
        top = (max if higher else min)(scored, key=scored.get)
        best.append(f"{header} {top}")
    trained = sorted({s for r in rows.values() for s, _ in r["trained"]})
    notes = (
        f"Step 0, zero-shot ({', '.join(args.new_domains)}) and opt-out on seed {args.seeds[0]}"
        + _same_step0(rows["nexus"])
        + f", {args.eval_tokens:,} validation tokens per domain"
        + (
            f"; trained: seeds {', '.join(map(str, trained))}, the study's 100 steps"
            if trained
            else ""
        )  # fmt: skip
        + ". Brackets: 95% interval of nexus's paired advantage (> 0: nexus better; in % for "
        "perplexities). Strictly better than nexus (interval below 0): "
        + ("; ".join(wins) if wins else "none")
        + ". nexus strictly better on some zero-shot column against: "
        + (", ".join(ahead_zs) or "none")
        + "; against none of them: "
        + (", ".join(n for n in peers_ if n not in ahead_zs) or "-")
        + ". Best value per column: "
        + "; ".join(best)
        + ".\n"
    )
    return f"{text}\n\n{notes}"


def write_readme(path: Path, table_text: str) -> None:
    """Replace the table between the markers of ``path`` (``BEGIN`` ends the line before the
    table, ``END`` its last row: the README's line budget has no room for marker lines)."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to write the table into")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    path.write_text(f"{before}{BEGIN}\n{table_text}{END}{after}")


# --------------------------------------------------------------------------------------------


def user_domains(args, recipe: dict, study: Path, domains: list[str]) -> Path:
    """The user domains' corpus, FFN-only experts and embeddings (next to the study's), made
    through the command line in ``--work/user`` once; returns that folder."""
    work = args.work / "user"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    build = ["--domains", ",".join(domains), "--max-mb", "2", "--val-fraction", "0.16"]
    corpus_key = cached(corpus, fingerprint([data_key(args.data / d) for d in domains], build),
                        "corpus", "build", "--from", str(args.data), "--out", str(corpus), *build)  # fmt: skip
    b = recipe["branch_train"]
    sets = [x for k in ("steps", "lr", "batch_size", "seq_len", "warmup_frac")
            for x in ("--set", f"{k}={b[k]}")] + ["--set", "checkpoint_every=0", "--device", "cpu"]  # fmt: skip
    seed = study / "seed" / "model"
    cached(work / "experts-ffn", fingerprint(model_key(seed), corpus_key, sets), "branch",
           "--seed", str(seed), "--corpus", str(corpus), "--out", str(work / "experts-ffn"),
           "--ffn-only", *sets)  # fmt: skip
    merged = study / "domain_embeddings" / EMBEDDINGS_FILENAME
    num_chunks = str(recipe.get("embed", {}).get("num_chunks", 256))
    cached(work / "domain_embeddings", fingerprint(corpus_key, file_sha256(merged)[:16]),
           "embed-domains", "--corpus", str(corpus), "--out", str(work / "domain_embeddings"),
           "--merge-into", str(merged), "--num-chunks", num_chunks)  # fmt: skip
    return work


def context(args) -> dict:
    study = args.study
    if not (study / "experts-ffn").is_dir():
        raise SystemExit(f"{study / 'experts-ffn'} is missing: run make paper first")
    tokenizer = study / "seed" / "model" / TOKENIZER_FILE
    old_shards = tokens_for(study / "corpus", tokenizer)
    recipe = yaml.safe_load(args.recipe.read_text())
    mine = [d for d in args.new_domains if d not in old_shards.domains]
    missing = [d for d in mine if not (args.data / d).is_dir()]
    if missing:
        raise SystemExit(f"{args.data}: no folder for {', '.join(missing)}; build them with "
                         f"benchmarks/local_domains.py --out {args.data}")  # fmt: skip
    work = user_domains(args, recipe, study, mine) if mine else None
    user_shards = tokens_for(work / "corpus", tokenizer) if work else None
    train = from_dict(TrainConfig, {**recipe["moe"]["train"], "eval_every": 0}, "moe.train")
    emb_dir = work / "domain_embeddings" if work else study / "domain_embeddings"
    ctx = {"study": study, "work": args.work, "tokenizer": tokenizer, "old_shards": old_shards,
           "overrides": recipe["moe"].get("overrides") or {}, "train": train,
           "embeddings": DomainEmbeddings.load(emb_dir), "new_shards": {}, "experts": {}}  # fmt: skip
    for d in OLD + args.new_domains:
        local = d in old_shards.domains
        ctx["new_shards"][d] = old_shards if local else user_shards
        ctx["experts"][d] = (study if local else work) / "experts-ffn" / d / "model"
    dense = {d: load_checkpoint(ctx["experts"][d])[0] for d in OLD + args.new_domains}
    ctx["dense_ppl"] = {d: score(dense[d], old_shards, [d], args.eval_tokens)[0][d].perplexity
                        for d in OLD}  # fmt: skip
    ctx["dense_bpb"] = {
        d: score(dense[d], ctx["new_shards"][d], [d], args.eval_tokens)[0][d].bits_per_byte
        for d in args.new_domains
    }
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--recipe", type=Path, default=Path("configs/paper-small.yaml"),
                        help="the study's recipe (its moe.overrides and moe.train)")  # fmt: skip
    parser.add_argument("--data", type=Path, default=Path("runs/local-domains"),
                        help="one folder per user domain (benchmarks/local_domains.py --out)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("runs/peers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--routers", nargs="+", default=ROUTERS, choices=ROUTERS)
    parser.add_argument("--train-routers", nargs="*", default=ROUTERS, choices=ROUTERS,
                        help="routers whose MoE is also trained (one per seed)")  # fmt: skip
    parser.add_argument("--new-domains", nargs="+", default=["math", "legal", "manpages"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--readme", type=Path, help="and into this file's table block")
    parser.add_argument("--from-json", type=Path,
                        help="measure nothing: write the table of this --json of a run")  # fmt: skip
    args = parser.parse_args()
    if "nexus" not in args.routers:
        parser.error("--routers: nexus is the reference every interval is paired with")
    if args.readme and not all(m in args.readme.read_text() for m in (BEGIN, END)):
        parser.error(f"--readme: {args.readme} has no {BEGIN} ... {END} block")
    if args.from_json:  # the table of an earlier run's results, written again
        rows = _from_json(json.loads(args.from_json.read_text()))
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        rows = measure(args)
        print(f"measured in {time.perf_counter() - t0:.0f}s")
    text = report(rows, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.readme:
        write_readme(args.readme, table(rows)[0])


def measure(args) -> dict[str, dict]:
    """Every router's row (written to ``--json`` as it grows)."""
    ctx = context(args)
    rows: dict[str, dict] = {}
    for router in args.routers:
        rows[router] = run_router(router, ctx, args)
        _save(rows, args)
    train = [r for r in args.routers if r in args.train_routers]
    if train and "nexus" not in train:
        train.insert(0, "nexus")
    for seed in args.seeds if train else []:
        for router in train:
            t1 = time.perf_counter()
            ppl = train_router(router, ctx, args, seed)
            rows[router]["trained"].update({(seed, d): v for d, v in ppl.items()})
            print(f"  trained {router:<20} seed {seed}: mean ppl "
                  f"{statistics.fmean(ppl.values()):.3f} | {time.perf_counter() - t1:.0f}s",
                  flush=True)  # fmt: skip
            _save(rows, args)
    if len(args.seeds) > 1 and "nexus" in train:  # the step-0 MoEs of the seeds: one function
        for seed in args.seeds[1:]:
            other, _ = score(load_checkpoint(upcycled("nexus", ctx, seed))[0],
                             ctx["old_shards"], OLD, args.eval_tokens)  # fmt: skip
            same = all(other[d].perplexity == rows["nexus"]["ppl"][d] for d in OLD)
            rows["nexus"].setdefault("same_step0", {})[seed] = same
    _save(rows, args)
    return rows


def _save(rows: dict[str, dict], args) -> None:
    if args.json:
        doc = {name: {**r, "trained": {f"s{s}/{d}": v for (s, d), v in r["trained"].items()}}
               for name, r in rows.items()}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


def _from_json(doc: dict) -> dict[str, dict]:
    for r in doc.values():
        r["trained"] = {(int(k.split("/")[0][1:]), k.split("/")[1]): v
                        for k, v in r["trained"].items()}  # fmt: skip
    return doc


if __name__ == "__main__":
    main()
