"""The plug-in targets measured on the export itself, through ``transformers``, for context and
per-token routing side by side (docs/design.md §15.1).

For each seed of a finished study (`make paper`: runs/paper-small) and each routing, the
study's trained `nexus` MoE (routing on context) or the same MoE routing per token (the step-0
MoE recalibrated with `router_context: 0`, what `upcycle --set router_context=0` gives, then
trained with the study's MoE training settings and seed, as `benchmarks/plugin_domains.py`
does) is extended zero-shot with one near and one far user domain, each alone, by
`nexus_moe.extend.extend_model` (the function `extend --corpus` calls) with the default
placement. Every model - the dense experts, the step-0 and trained MoEs, each extension - is
written with `nexus_moe.hf.export_hf` (the function `nexus-moe export` calls; MoEs in the
mixtral format: per token the plain `MixtralForCausalLM`, on context `model_type
nexus_context_mixtral` with its modeling code), loaded with
`transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and scored
on the windows of the project's evaluate (the recipe's `evaluate` settings, the first
`--earlier-tokens` / `--eval-tokens` of each domain's validation split), and by our own
evaluate on the same windows for the parity column. The new expert's share is the top-1 share
of transformers' router logits (`output_router_logits=True`), mean over MoE layers.

Per row: the step-0 and trained MoEs against the dense experts (mean perplexity over the
study's domains relative to the dense experts' own-domain mean, as the study's report; worst:
the largest per-domain excess), and per new domain the share, the share of the bits-per-byte
gap between the MoE and the new dense expert closed, the change of the earlier domains' mean
perplexity and of the worst one; last, the largest |ours - transformers| perplexity over every
score of the row.

The user domains' corpus, FFN-only experts and embeddings are those `plugin_domains.py` built
in its work folder (`--prepared`), never rebuilt here: copied into `--work` (so that rebuilding
them there mid-run changes nothing), next to the per-token MoEs, each keyed on its inputs.

    .venv/bin/python benchmarks/plugin_domains.py --study runs/paper-small --data DATA
    .venv/bin/python benchmarks/export_plugin.py --study runs/paper-small \
        --near relnotes --far locales --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from plugin_domains import per_token  # noqa: E402
from user_domain import cached, model_key  # noqa: E402

from nexus_moe import calibrate  # noqa: E402
from nexus_moe.analyse import RoutingCounter  # noqa: E402
from nexus_moe.checkpoint import (  # noqa: E402
    CONFIG_FILE,
    TOKENIZER_FILE,
    load_checkpoint,
    save_checkpoint,
)
from nexus_moe.config import DEFAULT_CALIBRATION_TOKENS, to_dict  # noqa: E402
from nexus_moe.data import iter_eval_batches  # noqa: E402
from nexus_moe.embed import DomainEmbeddings  # noqa: E402
from nexus_moe.evaluate import evaluate_domains  # noqa: E402
from nexus_moe.extend import extend_model  # noqa: E402
from nexus_moe.hf import export_hf  # noqa: E402
from nexus_moe.io_utils import file_sha256  # noqa: E402
from nexus_moe.pipeline import fingerprint, tokens_for  # noqa: E402
from nexus_moe.recipe import load_recipe  # noqa: E402
from nexus_moe.study import Study  # noqa: E402
from nexus_moe.study.layout import RunLayout  # noqa: E402
from nexus_moe.train import FFN_PARAMETERS  # noqa: E402

RECIPES = {"tiny": Path("configs/tiny.yaml"), "paper-small": Path("configs/paper-small.yaml")}


class Scorer:
    """Scores a model through our evaluate and through its transformers export, on the same
    windows; keeps the largest |ours - transformers| perplexity seen."""

    def __init__(self, cfg, tokenizer: Path, tmp: Path) -> None:
        self.cfg, self.tokenizer, self.tmp = cfg, tokenizer, tmp
        self.exports = 0
        self.max_diff = 0.0  # since the last take_diff()

    def take_diff(self) -> float:
        diff, self.max_diff = self.max_diff, 0.0
        return diff

    def __call__(self, model, shards, domains, tokens, new_index=None):
        """{domain: (perplexity, bits/byte)} through transformers and, with ``new_index``,
        {domain: top-1 share of that expert} from transformers' router logits."""
        cfg = replace(self.cfg, max_tokens=tokens)
        counter = RoutingCounter(model, len(domains)) if new_index is not None else None
        ours = evaluate_domains(model, shards, domains, cfg, on_routing=counter)
        self.exports += 1
        folder = self.tmp / f"export{self.exports}"
        fmt = "mixtral" if model.cfg.is_moe else "auto"
        export_hf(model, folder, fmt=fmt, tokenizer_path=self.tokenizer)
        import transformers

        transformers.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, dtype=torch.float32
        ).eval()
        shutil.rmtree(folder)  # loaded: its weights are in memory
        scores, shares = {}, {}
        for d in domains:
            nats, count, top1, routed = 0.0, 0, None, 0
            batches = iter_eval_batches(
                shards.tokens(d, "validation"), cfg.seq_len, cfg.batch_size, cfg.max_tokens
            )
            for inputs, targets in batches:
                with torch.no_grad():
                    out = hf(input_ids=inputs, use_cache=False,
                             output_router_logits=new_index is not None)  # fmt: skip
                logits = out.logits.float().reshape(-1, out.logits.shape[-1])
                nats += F.cross_entropy(logits, targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
                if new_index is not None:
                    hits = torch.stack(
                        [(r.argmax(-1) == new_index).sum() for r in out.router_logits]
                    )
                    top1 = hits if top1 is None else top1 + hits
                    routed += out.router_logits[0].shape[0]
            bytes_per_token = shards.num_bytes(d, "validation") / shards.num_tokens(d, "validation")
            ppl = math.exp(nats / count)
            scores[d] = (ppl, nats / (math.log(2) * bytes_per_token * count))
            self.max_diff = max(self.max_diff, abs(ppl - ours[d].perplexity))
            if new_index is not None:
                shares[d] = (top1.double() / routed).mean().item()
                c = counter.counts.double()[:, domains.index(d)]  # (layers, experts)
                ours_share = (c[:, new_index] / c.sum(-1)).mean().item()
                if abs(ours_share - shares[d]) > 0.01:
                    print(f"      {d}: top-1 share {shares[d]:.4f} through transformers, "
                          f"{ours_share:.4f} ours", flush=True)  # fmt: skip
        return scores, shares


def vs_dense(scores, dense, domains):
    """(mean perplexity / the dense experts' mean - 1, the largest per-domain excess)."""
    mean = statistics.fmean(scores[d][0] for d in domains)
    bound = statistics.fmean(dense[d][0] for d in domains)
    return mean / bound - 1, max(scores[d][0] / dense[d][0] - 1 for d in domains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--recipe", type=Path, help="the study's recipe (default: by workdir)")
    parser.add_argument("--prepared", type=Path,
                        help="plugin_domains.py's work folder (default: STUDY-plugin-domains)")  # fmt: skip
    parser.add_argument("--work", type=Path, help="per-token MoEs (default: STUDY-export-plugin)")
    parser.add_argument("--near", default="relnotes")
    parser.add_argument("--far", default="locales")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--routing", nargs="+", default=["context", "token"],
                        choices=["context", "token"])  # fmt: skip
    parser.add_argument("--token-stage", default="trained", choices=["step0", "trained"],
                        help="the per-token MoE that is extended")  # fmt: skip
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--earlier-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    run = RunLayout(args.study)
    recipe = load_recipe(args.recipe or RECIPES[args.study.name])
    prepared = args.prepared or args.study.parent / f"{args.study.name}-plugin-domains"
    work = args.work or args.study.parent / f"{args.study.name}-export-plugin"
    new_domains = [args.near, args.far]
    prepared = snapshot(prepared, work, new_domains)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--short", "src"], capture_output=True,
                           text=True).stdout.split()[1::2]  # fmt: skip
    dirty = [f"{path} sha256 {file_sha256(Path(path))[:12]}" for path in dirty]
    print(f"commit {commit}" + (f" (uncommitted: {', '.join(dirty)})" if dirty else ""))

    variant = next(v for v in recipe.moe.variants if v.name == "nexus")
    old_domains = list(recipe.corpus.domains)
    tokenizer = run.seed_model / TOKENIZER_FILE
    old_shards = tokens_for(run.corpus, tokenizer)
    new_shards = tokens_for(prepared / "corpus", tokenizer)
    embeddings = DomainEmbeddings.load(prepared / "domain_embeddings")
    tmp_root = tempfile.TemporaryDirectory(prefix="export-plugin-")
    score = Scorer(recipe.evaluate, tokenizer, Path(tmp_root.name))

    # -- the dense experts, each on its own domain, through their exports ---------------------
    dense, experts = {}, {}
    for d in old_domains:
        model = load_checkpoint(run.expert_model(d, variant.experts))[0]
        dense[d] = score(model, old_shards, [d], args.earlier_tokens)[0][d]
    for d in new_domains:
        experts[d] = load_checkpoint(prepared / "experts-ffn" / d / "model")
        dense[d] = score(experts[d][0], new_shards, [d], args.eval_tokens)[0][d]
    dense_diff = score.take_diff()
    print(f"dense experts: {', '.join(f'{d} {p:.2f}' for d, (p, _) in dense.items())} "
          f"(|ours - transformers| <= {dense_diff:.2e})", flush=True)  # fmt: skip

    runner = Study(recipe)
    rows, step0_scores = [], {}
    for seed in args.seeds:
        for routing in args.routing:
            step0_dir, trained_dir = run.upcycled("nexus", seed), run.trained_model("nexus", seed)
            if routing == "token":
                step0_dir, trained_dir = token_moes(run, runner, variant, seed, work,
                                                    old_shards, tokenizer, old_domains)  # fmt: skip
                if args.token_stage == "step0":
                    trained_dir = step0_dir
            print(f"seed {seed}, routing {routing}: {step0_dir}, {trained_dir}", flush=True)
            key = model_key(step0_dir)  # the step-0 MoE is the same for every seed: scored once
            if key not in step0_scores:
                step0_scores[key] = score(load_checkpoint(step0_dir)[0], old_shards, old_domains,
                                          args.earlier_tokens)[0]  # fmt: skip
            step0 = step0_scores[key]
            moe = load_checkpoint(trained_dir)[0]
            held = moe.moe_layers()[0].domain_stats.held
            if held is None or held.shape[1] < calibrate.HELD_WINDOWS:
                # statistics kept from fewer windows than placement reads now: recomputed, the
                # rows kept (what upcycling and training write now; as plugin_domains.py)
                calibrate.refresh_statistics(moe, old_shards)
            before_old = score(moe, old_shards, old_domains, args.earlier_tokens)[0]
            row = {
                "seed": seed, "routing": routing, "commit": commit,
                "moe": str(trained_dir),
                "step0": vs_dense(step0, dense, old_domains),
                "trained": vs_dense(before_old, dense, old_domains),
            }  # fmt: skip
            for kind, d in (("near", args.near), ("far", args.far)):
                before_new = score(moe, new_shards, [d], args.eval_tokens)[0][d]
                extended = copy.deepcopy(moe)
                expert, meta = experts[d]
                windows = calibrate.domain_windows(
                    new_shards, d, moe.cfg.max_seq_len, DEFAULT_CALIBRATION_TOKENS
                )
                # extend --corpus's own defaults: merge_lambda 0 for an FFN-only expert, seed 0
                ffn_only = meta.get("train_only") == list(FFN_PARAMETERS)
                extend_model(extended, expert, d, embeddings.get([d])[0],
                             merge_lambda=0.0 if ffn_only else None, seed=0,
                             calibration_windows=windows)  # fmt: skip
                n = extended.cfg.moe.num_experts - 1
                after_new, share = score(extended, new_shards, [d], args.eval_tokens, n)
                after_old = score(extended, old_shards, old_domains, args.earlier_tokens)[0]
                b, a = before_new[1], after_new[d][1]
                mean_before = statistics.fmean(before_old[o][0] for o in old_domains)
                mean_after = statistics.fmean(after_old[o][0] for o in old_domains)
                changes = {o: after_old[o][0] / before_old[o][0] - 1 for o in old_domains}
                row[kind] = {
                    "domain": d,
                    "share": share[d],
                    "gap": (b - a) / (b - dense[d][1]),
                    "earlier": mean_after / mean_before - 1,
                    "worst": max(changes.values()),
                    "worst_domain": max(changes, key=changes.get),
                }
            row["max_diff"] = score.take_diff()
            rows.append(row)
            print("  " + _cells(row), f"({time.perf_counter() - start:.0f}s)", flush=True)
    tmp_root.cleanup()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\ncommit {commit}; dense experts |ours - transformers| <= {dense_diff:.1e}; "
          f"{time.perf_counter() - start:.0f}s\n")  # fmt: skip
    print("| seed | routing | step 0 vs dense: mean / worst | trained vs dense: mean / worst | "
          f"near ({args.near}): share / gap / earlier mean / worst | far ({args.far}): share / "
          "gap / earlier mean / worst | max \\|ours - transformers\\| ppl |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + _cells(row).replace(";", " |") + " |")


def snapshot(prepared: Path, work: Path, domains: list[str]) -> Path:
    """A copy under ``work`` of what plugin_domains.py prepared that this script reads (the
    corpus, the new domains' experts, the embeddings), so that rebuilding it there while this
    runs changes nothing here; made again when plugin_domains.py has remade any of it."""
    parts = ["corpus", "domain_embeddings", *(f"experts-ffn/{d}/model" for d in domains)]

    def keys() -> list[str]:
        out = []
        for name in ("corpus", "experts-ffn", "domain_embeddings"):
            key = prepared / f"{name}.key"
            out.append(key.read_text().strip() if key.is_file() else "unfinished")
            if out[-1] == "unfinished":
                sys.exit(f"{prepared / name}: not built; run benchmarks/plugin_domains.py first")
        return out

    key = fingerprint(keys(), domains)
    dest, marker = work / "prepared", work / "prepared.key"
    if dest.is_dir() and marker.is_file() and marker.read_text().strip() == key:
        return dest
    for d in domains:
        if not (prepared / "experts-ffn" / d / "model" / CONFIG_FILE).is_file():
            sys.exit(f"{prepared / 'experts-ffn' / d}: no expert; run plugin_domains.py first")
    tmp = work / "prepared.partial"  # this script's own folders, made again from scratch
    for old in (tmp, dest):
        if old.is_dir():
            shutil.rmtree(old)
    for part in parts:
        shutil.copytree(prepared / part, tmp / part)
    if fingerprint(keys(), domains) != key:
        sys.exit(f"{prepared}: rebuilt while it was copied; run again")
    tmp.rename(dest)
    marker.write_text(key + "\n")
    return dest


def token_moes(run, runner, variant, seed, work, old_shards, tokenizer, old_domains):
    """The per-token step-0 MoE (the study's, recalibrated with ``router_context`` 0) and that
    MoE trained with the study's MoE settings and ``seed`` (written under ``work``)."""
    token_dir = work / f"s{seed}" / "per-token" / "upcycled"
    source = run.upcycled("nexus", seed)
    key = fingerprint(model_key(source), calibrate.HELD_WINDOWS)
    marker = token_dir.with_name("upcycled.key")
    made = marker.read_text().strip() if marker.is_file() else None
    if not (token_dir / CONFIG_FILE).is_file() or made != key:
        model, meta = load_checkpoint(source)
        calibrate.calibrate_model(per_token(model), old_shards)
        save_checkpoint(token_dir, model, tokenizer, metadata=meta)
        marker.write_text(key + "\n")
    tcfg = runner.moe_train_config(variant, seed, len(old_domains))
    out = work / f"s{seed}" / "per-token" / "trained"
    cfg_file = work / f"s{seed}" / "per-token" / "train.json"
    cfg_file.write_text(json.dumps(to_dict(tcfg)))
    cached(out, fingerprint(model_key(token_dir), to_dict(tcfg)), "train", "--init",
           str(token_dir), "--corpus", str(run.corpus), "--out", str(out), "--config",
           str(cfg_file), "--device", "cpu")  # fmt: skip
    return token_dir, out / "model"


def _cells(row: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:+.2f}%"

    def ext(e: dict) -> str:
        met = e["share"] >= 0.5 and e["gap"] >= 0.70 and e["earlier"] <= 0.01
        return (f"{e['share']:.2f} / {e['gap']:.2f} / {pct(e['earlier'])} / {pct(e['worst'])} "
                f"({e['worst_domain']})" + (" ✓" if met else ""))  # fmt: skip

    s0, tr = row["step0"], row["trained"]
    return (f"{row['seed']}; {row['routing']}; {pct(s0[0])} / {pct(s0[1])}; {pct(tr[0])} / "
            f"{pct(tr[1])}; {ext(row['near'])}; {ext(row['far'])}; {row['max_diff']:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
