"""``nexus-moe run RECIPE``: every stage of a study in order, each skipped when done (docs/design.md §1, §10).

Work directory layout::

    corpus/  tokenizer/  seed/  experts/<domain>/  domain_embeddings/
    s<seed>/moe/<variant>/{upcycled,trained}/
    s<seed>/extend/<variant>-<domain>/{extended,ft<budget>}/
    results/  results.md, scores.json, routing-*.png / .json

Each stage writes ``stage.json`` with a fingerprint of its config and inputs; a stage whose output
carries the same fingerprint is skipped, so an interrupted study resumes where it stopped.
Evaluations are cached the same way (``eval.json`` next to each model).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint, load_config, weights_hash
from nexus_moe.config import to_dict
from nexus_moe.evaluate import evaluate_domains, scores_to_dict
from nexus_moe.io_utils import atomic_path, read_json, write_json
from nexus_moe.pipeline import (
    MoEVariant,
    Recipe,
    branch_expert,
    file_hash,
    fingerprint,
    load_recipe,
    mark_done,
    pretrain_seed,
    resolve_device,
    stage_done,
    stage_key,
    tokens_for,
    train_model,
)

Scores = dict[str, dict[str, float]]  # domain -> {loss, perplexity, bits_per_byte, tokens}


class Study:
    """Runs a recipe's stages; each ``stage_*`` method returns its output directory."""

    def __init__(self, recipe: Recipe, console: Console | None = None) -> None:
        self.recipe = recipe
        self.console = console or Console()
        self.workdir = Path(recipe.workdir)
        self.device = resolve_device(recipe.device)
        self.timings: dict[str, float] = {}
        self.ran: list[str] = []  # stages actually run (not skipped) in this invocation

    def _stage(self, name: str, out_dir: Path, key: str, build: Callable[[], Any]) -> Path:
        if stage_done(out_dir, key):
            self.console.print(f"[dim]- {name}: done, skipped ({out_dir})[/]")
            return out_dir
        self.console.rule(name)
        start = time.perf_counter()
        build()
        mark_done(out_dir, key, stage=name)
        self.timings[name] = time.perf_counter() - start
        self.ran.append(name)
        self.console.print(f"[green]{name}[/] finished in {self.timings[name]:.1f}s")
        return out_dir

    # -- data -----------------------------------------------------------------------------------
    def stage_corpus(self) -> Path:
        from nexus_moe.corpus import build_corpus

        c = self.recipe.corpus
        out = self.workdir / "corpus"
        domains = c.domains + [d for d in c.heldout if d not in c.domains]
        self._stage(
            "corpus",
            out,
            fingerprint(c, self.recipe.seed),
            lambda: build_corpus(
                out,
                domains=domains,
                source_dir=c.from_dir,
                max_mb_per_domain=c.max_mb_per_domain,
                val_fraction=c.val_fraction,
                seed=self.recipe.seed,
                console_print=self.console.print,
            ),
        )
        return out

    def built_domains(self, corpus_dir: Path, wanted: list[str]) -> list[str]:
        """``wanted`` domains that the corpus has (a warning names the others)."""
        from nexus_moe.corpus import load_manifest

        built = load_manifest(corpus_dir)["domains"]
        missing = [d for d in wanted if d not in built]
        if missing:
            self.console.print(
                f"[yellow]warning:[/] domains not in the corpus, left out: {missing}"
            )
        return [d for d in wanted if d in built]

    def stage_tokenizer(self, corpus_dir: Path, domains: list[str]) -> Path:
        from nexus_moe.tokenizer import train_tokenizer

        t = self.recipe.tokenizer
        if t.path is not None:
            return Path(t.path)
        out = self.workdir / "tokenizer"
        key = fingerprint(t, stage_key(corpus_dir), domains)
        self._stage(
            "tokenizer",
            out,
            key,
            lambda: train_tokenizer(
                corpus_dir,
                out / TOKENIZER_FILE,
                vocab_size=t.vocab_size,
                domains=domains,
            ),
        )
        return out / TOKENIZER_FILE

    # -- dense models ---------------------------------------------------------------------------
    def stage_seed(self, corpus_dir: Path, tokenizer: Path, domains: list[str]) -> Path:
        out = self.workdir / "seed"
        key = fingerprint(
            self.recipe.model,
            self.recipe.seed_train,
            stage_key(corpus_dir),
            file_hash(tokenizer),
            domains,
        )
        self._stage(
            "seed",
            out,
            key,
            lambda: pretrain_seed(
                self.recipe.model,
                corpus_dir,
                tokenizer,
                domains,
                self.recipe.seed_train,
                out,
                device=self.device,
                restart_stale=True,  # a stage re-run never resumes another config's checkpoint
            ),
        )
        return out / "model"

    def stage_branch(self, seed_dir: Path, corpus_dir: Path, domain: str) -> Path:
        out = self.workdir / "experts" / domain
        key = fingerprint(self.recipe.branch_train, stage_key(seed_dir.parent), domain)
        self._stage(
            f"branch:{domain}",
            out,
            key,
            lambda: branch_expert(
                seed_dir,
                corpus_dir,
                domain,
                self.recipe.branch_train,
                out,
                device=self.device,
                restart_stale=True,
            ),
        )
        return out / "model"

    def stage_embed(self, corpus_dir: Path, domains: list[str]) -> Path:
        from nexus_moe.embed import embed_domains

        e = self.recipe.embed
        out = self.workdir / "domain_embeddings"
        key = fingerprint(e, stage_key(corpus_dir), domains, self.recipe.seed)

        def build() -> None:
            embed_domains(
                corpus_dir,
                domains,
                embedder=e.embedder,
                num_chunks=e.num_chunks,
                chunk_chars=e.chunk_chars,
                seed=self.recipe.seed,
                device="cuda" if self.device.type == "cuda" else "cpu",
            ).save(out)

        self._stage("embed-domains", out, key, build)
        return out

    # -- MoE ------------------------------------------------------------------------------------
    def stage_upcycle(
        self,
        variant: MoEVariant,
        seed: int,
        seed_dir: Path,
        experts: dict[str, Path],
        embeddings: Path,
        corpus_dir: Path,
    ) -> Path:
        from nexus_moe.embed import DomainEmbeddings
        from nexus_moe.upcycle import upcycle

        out = self.workdir / f"s{seed}" / "moe" / variant.name / "upcycled"
        # Shared overrides apply to MoE variants; btm is a dense merge and takes none.
        shared = {} if variant.method == "btm" else self.recipe.moe.overrides
        overrides = {**shared, **variant.moe}
        key = fingerprint(
            variant,
            overrides,
            seed,
            stage_key(seed_dir.parent),
            [stage_key(p.parent) for p in experts.values()],
            stage_key(embeddings),
        )
        sparse = variant.method == "sparse-upcycle"
        self._stage(
            f"upcycle:{variant.name}:s{seed}",
            out,
            key,
            lambda: upcycle(
                variant.method,
                seed_dir,
                [] if sparse else list(experts.values()),
                out,
                domain_embeddings=DomainEmbeddings.load(embeddings),
                num_experts=len(experts) if sparse else None,
                moe_overrides=overrides or None,
                seed=seed,
                calibration_shards=(
                    tokens_for(corpus_dir, seed_dir / TOKENIZER_FILE)
                    if variant.method.calibrates_by_default
                    else None
                ),
            ),
        )
        return out

    def stage_train(
        self,
        name: str,
        init: Path,
        out: Path,
        corpus_dir: Path,
        domains: list[str],
        cfg,
        metadata: dict[str, Any],
    ) -> Path:
        """Continue training checkpoint ``init`` on ``domains``; returns ``out/model``."""
        key = fingerprint(cfg, stage_key(init), domains)

        def build() -> None:
            model, meta = load_checkpoint(init)
            train_model(
                model,
                corpus_dir,
                init / TOKENIZER_FILE,
                domains,
                cfg,
                out,
                metadata={**meta, **metadata},
                device=self.device,
                init=weights_hash(init),
                restart_stale=True,
            )

        self._stage(name, out, key, build)
        return out / "model"

    def stage_extend(
        self,
        trained: Path,
        new_expert: Path,
        domain: str,
        embeddings: Path,
        out: Path,
        corpus_dir: Path,
    ) -> Path:
        from nexus_moe.calibrate import STATS_FILE
        from nexus_moe.embed import DomainEmbeddings
        from nexus_moe.extend import extend

        reset = self.recipe.extend.reset_linear_router
        key = fingerprint(
            stage_key(trained.parent),
            stage_key(new_expert.parent),
            domain,
            reset,
            stage_key(embeddings),
        )

        def build() -> None:
            cfg, _ = load_config(trained)
            uses_linear = cfg.moe is not None and not cfg.moe.uses_nexus
            extend(
                trained,
                new_expert,
                out,
                domain=domain,
                domain_embeddings=DomainEmbeddings.load(embeddings),
                reset_linear_router=reset and uses_linear,
                calibration_shards=(
                    tokens_for(corpus_dir, trained / TOKENIZER_FILE)
                    if (trained / STATS_FILE).is_file()
                    else None
                ),
            )

        self._stage(f"extend:{out.parent.name}", out, key, build)
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def scores(self, ckpt: Path, corpus_dir: Path, domains: list[str]) -> Scores:
        """Per-domain scores of ``ckpt``, cached in ``ckpt/../eval-<key>.json``."""
        key = fingerprint(
            self.recipe.evaluate,
            stage_key(ckpt) if (ckpt / "stage.json").is_file() else stage_key(ckpt.parent),
            domains,
        )
        cache = ckpt.parent / f"eval-{ckpt.name}-{key}.json"
        if cache.is_file():
            return read_json(cache)
        model, _ = load_checkpoint(ckpt, device=str(self.device))
        shards = tokens_for(corpus_dir, ckpt / TOKENIZER_FILE)
        result = scores_to_dict(
            evaluate_domains(model, shards, domains, self.recipe.evaluate, device=self.device)
        )
        write_json(cache, result)
        return result

    def routing(
        self, ckpt: Path, corpus_dir: Path, domains: list[str], name: str, out: Path | None = None
    ) -> dict:
        """Routing report of ``ckpt`` with heatmaps under ``out`` (default: results/)."""
        from nexus_moe.analyse import analyse

        model, _ = load_checkpoint(ckpt, device=str(self.device))
        shards = tokens_for(corpus_dir, ckpt / TOKENIZER_FILE)
        return analyse(
            model,
            shards,
            domains,
            out or self.workdir / "results",
            name=name,
            cfg=self.recipe.evaluate,
            device=self.device,
        )

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        corpus_dir = self.stage_corpus()
        domains = self.built_domains(corpus_dir, r.corpus.domains)
        heldout = self.built_domains(corpus_dir, r.extend.domains or r.corpus.heldout)
        heldout = [d for d in heldout if d not in domains]
        tokenizer = self.stage_tokenizer(corpus_dir, domains)
        seed_model = self.stage_seed(corpus_dir, tokenizer, domains)
        experts = {d: self.stage_branch(seed_model, corpus_dir, d) for d in domains}
        all_domains = domains + heldout

        results: dict[str, Any] = {"domains": domains, "heldout": heldout, "models": {}}
        models = results["models"]
        models["seed"] = {"0": self.scores(seed_model, corpus_dir, all_domains)}
        for d, path in experts.items():
            models[f"expert:{d}"] = {"0": self.scores(path, corpus_dir, all_domains)}

        variants = r.moe.variants
        seeds = r.seeds or [r.seed]
        extension: dict[str, Any] = {}
        results["extension"] = extension
        if variants:
            new_experts = {d: self.stage_branch(seed_model, corpus_dir, d) for d in heldout}
            embeddings = self.stage_embed(corpus_dir, all_domains)
            for seed in seeds:
                trained = {}
                for v in variants:
                    upcycled = self.stage_upcycle(
                        v, seed, seed_model, experts, embeddings, corpus_dir
                    )
                    cfg = replace(r.moe.train, seed=seed)
                    trained[v.name] = (
                        self.stage_train(
                            f"train:{v.name}:s{seed}",
                            upcycled,
                            upcycled.parent / "trained",
                            corpus_dir,
                            domains,
                            cfg,
                            {"stage": "moe-train", "variant": v.name},
                        )
                        if v.train
                        else upcycled
                    )
                    models.setdefault(v.name, {})[str(seed)] = self.scores(
                        trained[v.name], corpus_dir, all_domains
                    )
                    if seed == seeds[0] and v.train and v.method != "btm":
                        results.setdefault("routing", {})[v.name] = self.routing(
                            trained[v.name], corpus_dir, all_domains, v.name
                        )
                for name in r.extend.variants:
                    if name not in trained:
                        continue
                    for d in heldout:
                        self.run_extension(
                            name,
                            d,
                            seed,
                            trained[name],
                            new_experts[d],
                            embeddings,
                            corpus_dir,
                            domains,
                            extension,
                        )
        self.write_results(results)
        return results

    def run_extension(
        self,
        name: str,
        domain: str,
        seed: int,
        trained: Path,
        new_expert: Path,
        embeddings: Path,
        corpus_dir: Path,
        domains: list[str],
        extension: dict[str, Any],
    ) -> None:
        """Extend MoE ``name`` with the held-out ``domain``, finetune at each budget, score."""
        r = self.recipe
        base = self.workdir / f"s{seed}" / "extend" / f"{name}-{domain}"
        extended = self.stage_extend(
            trained, new_expert, domain, embeddings, base / "extended", corpus_dir
        )
        all_domains = domains + [domain]
        share = r.extend.new_domain_share
        weights = {domain: share, **{d: (1 - share) / len(domains) for d in domains}}
        for budget in r.extend.budgets:
            tcfg = r.extend.train
            per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
            if budget <= 0:
                model_dir = extended
            else:
                steps = max(1, budget // per_step)
                cfg = replace(tcfg, steps=steps, seed=seed, domain_weights=weights)
                model_dir = self.stage_train(
                    f"finetune:{name}-{domain}:{budget}:s{seed}",
                    extended,
                    base / f"ft{budget}",
                    corpus_dir,
                    all_domains,
                    cfg,
                    {"stage": "extend-finetune", "budget_tokens": steps * per_step},
                )
            entry = extension.setdefault(f"{name}+{domain}", {}).setdefault(str(budget), {})
            scores = self.scores(model_dir, corpus_dir, all_domains)
            routing = self._routing_share(
                model_dir, corpus_dir, all_domains, domain, name, budget, seed
            )
            entry[str(seed)] = {"scores": scores, "new_expert_share": routing}

    def _routing_share(
        self,
        ckpt: Path,
        corpus_dir: Path,
        domains: list[str],
        domain: str,
        name: str,
        budget: int,
        seed: int,
    ) -> float:
        """Share of the new domain's tokens whose top-1 expert is the new expert."""
        first_seed = seed == (self.recipe.seeds or [self.recipe.seed])[0]
        out = None if first_seed else self.workdir / f"s{seed}" / "routing"
        report = self.routing(ckpt, corpus_dir, domains, f"{name}+{domain}-ft{budget}", out)
        return float(report["accuracy"][domain] or 0.0)

    # -- reporting ------------------------------------------------------------------------------
    def write_results(self, results: dict[str, Any]) -> None:
        out = self.workdir / "results"
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", {"recipe": to_dict(self.recipe), **results})
        text = results_markdown(results)
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(text)
        self.console.print(results_table(results))
        seed = results["models"]["seed"]["0"]
        for d in results["domains"]:
            expert = results["models"].get(f"expert:{d}", {}).get("0")
            if expert:
                ok = expert[d]["perplexity"] < seed[d]["perplexity"]
                verdict = "[green]beats[/]" if ok else "[red]does not beat[/]"
                self.console.print(
                    f"expert:{d} {verdict} the seed on {d}: "
                    f"{expert[d]['perplexity']:.2f} vs {seed[d]['perplexity']:.2f}"
                )
        self.console.print(f"results written to {out}/results.md")


# ---------------------------------------------------------------------------------------------
# tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def _model_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, list[float]]]]:
    """(model, {column: [perplexity per seed]}) for the upcycling table."""
    domains = results["domains"]
    rows = []
    models = results["models"]
    for name, by_seed in models.items():
        if name.startswith("expert:"):
            continue
        cols: dict[str, list[float]] = {}
        for scores in by_seed.values():
            for d in domains:
                cols.setdefault(d, []).append(scores[d]["perplexity"])
            mean = statistics.fmean(scores[d]["perplexity"] for d in domains)
            cols.setdefault("mean", []).append(mean)
        rows.append((name, cols))
        if name == "seed":  # dense experts, each on its own domain
            own = {
                d: [models[f"expert:{d}"]["0"][d]["perplexity"]]
                for d in domains
                if f"expert:{d}" in models
            }
            if len(own) == len(domains):
                own["mean"] = [statistics.fmean(v[0] for v in own.values())]
                rows.append(("dense experts (own domain)", own))
    return rows


def results_table(results: dict[str, Any]) -> Table:
    """The upcycling comparison as a rich table (validation perplexity)."""
    domains = results["domains"]
    table = Table(title="validation perplexity (lower is better)")
    table.add_column("model")
    for c in [*domains, "mean"]:
        table.add_column(c, justify="right")
    for name, cols in _model_rows(results):
        table.add_row(name, *[_fmt(cols[c]) if c in cols else "-" for c in [*domains, "mean"]])
    return table


def results_markdown(results: dict[str, Any]) -> str:
    """The study's Markdown report: upcycling table, extension table, relative changes."""
    domains = results["domains"]
    cols = [*domains, "mean"]
    lines = [
        "## Upcycling: per-domain validation perplexity",
        "",
        "Mean ± standard deviation over seeds where several were run; lower is better.",
        "",
        f"| model | {' | '.join(cols)} |",
        "|---|" + "---:|" * len(cols),
    ]
    rows = _model_rows(results)
    for name, values in rows:
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(values[c]) if c in values else "-" for c in cols)
            + " |"
        )
    by_name = dict(rows)
    if "nexus" in by_name and "moe-linear" in by_name:
        nexus, linear = (
            statistics.fmean(by_name["nexus"]["mean"]),
            statistics.fmean(by_name["moe-linear"]["mean"]),
        )
        lines += [
            "",
            f"Nexus vs moe-linear, mean perplexity: {nexus:.2f} vs {linear:.2f} "
            f"({100 * (linear - nexus) / linear:+.1f}% relative improvement).",
        ]
    routing = results.get("routing", {})
    if routing:
        lines += [
            "",
            "## Routing accuracy after MoE training",
            "",
            "Share of each domain's validation tokens whose top-1 routed expert is that "
            "domain's own expert (mean over MoE layers).",
            "",
            f"| model | {' | '.join(domains)} |",
            "|---|" + "---:|" * len(domains),
        ]
        for name, report in routing.items():
            acc = report["accuracy"]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{acc[d]:.2f}" if acc.get(d) is not None else "-" for d in domains)
                + " |"
            )
    extension = results.get("extension", {})
    if extension:
        lines += [
            "",
            "## Extension with a held-out domain",
            "",
            "Perplexity on the new domain and mean over the earlier domains after "
            "finetuning on the given token budget (50% new domain); routing share = share "
            "of the new domain's tokens sent to the new expert.",
            "",
            "| model | budget (tokens) | new domain ppl | earlier domains ppl | routing share |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, by_budget in extension.items():
            domain = key.split("+", 1)[1]
            for budget, by_seed in by_budget.items():
                new = [e["scores"][domain]["perplexity"] for e in by_seed.values()]
                old = [
                    statistics.fmean(e["scores"][d]["perplexity"] for d in domains)
                    for e in by_seed.values()
                ]
                share = [e["new_expert_share"] for e in by_seed.values()]
                lines.append(
                    f"| {key} | {int(budget):,} | {_fmt(new)} | {_fmt(old)} | {_fmt(share)} |"
                )
        lines += _relative_extension(extension)
    return "\n".join(lines) + "\n"


def _relative_extension(extension: dict[str, Any]) -> list[str]:
    out = []
    for key in extension:
        if not key.startswith("nexus+"):
            continue
        domain = key.split("+", 1)[1]
        linear = extension.get(f"moe-linear+{domain}")
        if not linear:
            continue
        if not out:
            out = ["", "Nexus vs moe-linear on the new domain (relative perplexity improvement):"]
        for budget, by_seed in extension[key].items():
            if budget not in linear:
                continue
            n = statistics.fmean(e["scores"][domain]["perplexity"] for e in by_seed.values())
            lin = statistics.fmean(
                e["scores"][domain]["perplexity"] for e in linear[budget].values()
            )
            out.append(
                f"- {domain}, budget {int(budget):,} tokens: {n:.2f} vs {lin:.2f} "
                f"({100 * (lin - n) / lin:+.1f}%)"
            )
    return out


def run_recipe(path: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Load a recipe and run it (see :class:`Study`)."""
    return Study(load_recipe(path), console).run()
