"""``nexus-moe run RECIPE``: every stage of a study in order, each skipped when done (docs/design.md §1, §10).

Work directory layout::

    corpus/  tokenizer/  seed/  experts/<domain>/  experts-<set>/<domain>/  domain_embeddings/
    s<seed>/moe/<variant>/{upcycled,trained}/
    s<seed>/extend/<variant>-<domain>/{extended,ft<budget>}/
    results/  results.md, scores.json, loss-curves.png, routing-*.png / .json

Each stage writes ``stage.json`` with a fingerprint of its config and inputs (and its wall time);
a stage whose output carries the same fingerprint is skipped, so an interrupted study resumes
where it stopped. Evaluations are cached the same way (``eval-*.json`` next to each model).

Every table carries its bounds, measured in the same run: the seed, the dense experts each on its
own domain, every MoE right after upcycling (step 0), and the trained MoEs under oracle routing
(every token to its domain's expert) and random routing. Variants are compared with the
reference variant (``study.reference``) per seed, paired: the relative difference
(baseline - reference) / baseline, its mean and 95% t-interval over seeds; a difference counts as
a win (or loss) only when the interval excludes 0. ``scores.json`` holds every raw per-seed score.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint, load_config, weights_hash
from nexus_moe.config import from_dict, to_dict
from nexus_moe.errors import NexusError
from nexus_moe.evaluate import EvalConfig, evaluate_domains, scores_to_dict
from nexus_moe.io_utils import atomic_path, read_json, write_json
from nexus_moe.pipeline import (
    DEFAULT_EXPERT_SET,
    STAGE_FILE,
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
from nexus_moe.train import TrainConfig

Scores = dict[str, dict[str, float]]  # domain -> {loss, perplexity, bits_per_byte, tokens}
APPENDED = "(appended row)"  # label suffix of the linear baseline that keeps its trained rows


def tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum


def expert_label(expert_set: str, domain: str) -> str:
    """Results key of a dense expert: ``expert:<domain>``, ``expert[<set>]:<domain>``."""
    return (
        f"expert:{domain}" if expert_set == DEFAULT_EXPERT_SET else f"expert[{expert_set}]:{domain}"
    )


def _default_row_scale(moe_dir: Path) -> float:
    """The norm factor ``extend`` gives a calibrated new row of this MoE by default."""
    from nexus_moe import config

    cfg, _ = load_config(moe_dir)
    return config.new_row_scale(cfg.moe.router_context if cfg.moe is not None else 0.0)


class Study:
    """Runs a recipe's stages; each ``stage_*`` method returns its output directory."""

    def __init__(self, recipe: Recipe, console: Console | None = None) -> None:
        self.recipe = recipe
        self.console = console or Console()
        self.workdir = Path(recipe.workdir)
        self.device = resolve_device(recipe.device)
        self.timings: dict[str, float] = {}  # seconds of the stages run in this invocation
        self.earlier: dict[str, float] = {}  # seconds recorded by skipped stages' earlier runs
        self.eval_seconds = 0.0  # evaluations computed (not read from cache) in this invocation
        self.evals_cached = 0  # evaluations an earlier run wrote (their time is not known here)
        self.evals_written: set[Path] = set()  # evaluation caches written by this invocation
        self.ran: list[str] = []  # stages actually run (not skipped) in this invocation
        self.sets = self._expert_sets()

    def _stage(self, name: str, out_dir: Path, key: str, build: Callable[[], Any]) -> Path:
        shown = escape(name)  # "branch[ffn]:code" is not rich markup
        if stage_done(out_dir, key):
            self.console.print(f"[dim]- {shown}: done, skipped ({escape(str(out_dir))})[/]")
            seconds = read_json(out_dir / STAGE_FILE).get("seconds")
            if isinstance(seconds, int | float):
                self.earlier[name] = float(seconds)
            return out_dir
        self.console.rule(shown)
        start = time.perf_counter()
        build()
        self.timings[name] = round(time.perf_counter() - start, 3)
        mark_done(out_dir, key, stage=name, seconds=self.timings[name])
        self.ran.append(name)
        self.console.print(f"[green]{shown}[/] finished in {self.timings[name]:.1f}s")
        return out_dir

    # -- recipe checks --------------------------------------------------------------------------
    def _expert_sets(self) -> dict[str, TrainConfig]:
        """Branch-training config of every expert set: ``default`` and ``expert_sets``."""
        r = self.recipe
        sets = {DEFAULT_EXPERT_SET: r.branch_train}
        for name, overrides in r.expert_sets.items():
            if name == DEFAULT_EXPERT_SET:
                raise NexusError(
                    f"expert_sets.{name}: '{name}' is the set branch_train makes; pick another name"
                )
            fields = {**to_dict(r.branch_train), **overrides}
            sets[name] = from_dict(TrainConfig, fields, f"expert_sets.{name}")
        names = [v.name for v in r.moe.variants]
        if names and r.study.reference not in names:
            raise NexusError(
                f"study.reference: '{r.study.reference}' is not a variant; choose one of: "
                f"{', '.join(names)}"
            )
        for v in r.moe.variants:
            v.kind  # noqa: B018 -- an unknown method fails here, before any stage runs
            if v.experts not in sets:
                raise NexusError(
                    f"moe.variants '{v.name}': experts '{v.experts}' is not an expert set; "
                    f"choose one of: {', '.join(sets)} (define others under expert_sets)"
                )
        return sets

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

    def stage_branch(
        self,
        seed_dir: Path,
        corpus_dir: Path,
        domain: str,
        expert_set: str = DEFAULT_EXPERT_SET,
    ) -> Path:
        default = expert_set == DEFAULT_EXPERT_SET
        out = self.workdir / ("experts" if default else f"experts-{expert_set}") / domain
        cfg = self.sets[expert_set]
        key = fingerprint(cfg, stage_key(seed_dir.parent), domain)
        self._stage(
            f"branch:{domain}" if default else f"branch[{expert_set}]:{domain}",
            out,
            key,
            lambda: branch_expert(
                seed_dir, corpus_dir, domain, cfg, out, device=self.device, restart_stale=True
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
        from nexus_moe.upcycle import method_defaults, upcycle

        out = self.workdir / f"s{seed}" / "moe" / variant.name / "upcycled"
        # Shared overrides apply to MoE variants; a dense merge (btm) takes none.
        shared = {} if variant.produces_dense else self.recipe.moe.overrides
        overrides = {**shared, **variant.moe}
        sparse = variant.copies_seed
        calibrates = variant.kind.calibrates_by_default  # reads the corpus
        key = fingerprint(
            [variant.method, variant.moe],
            method_defaults(variant.kind),  # a changed default makes a new MoE
            overrides,
            seed,
            stage_key(seed_dir.parent),
            [] if sparse else [stage_key(p.parent) for p in experts.values()],
            stage_key(embeddings),
            stage_key(corpus_dir) if calibrates else None,
        )
        self._stage(
            f"upcycle:{variant.name}:s{seed}",
            out,
            key,
            lambda: upcycle(
                variant.kind,
                seed_dir,
                [] if sparse else list(experts.values()),
                out,
                domain_embeddings=DomainEmbeddings.load(embeddings),
                num_experts=len(experts) if sparse else None,
                moe_overrides=overrides or None,
                seed=seed,
                calibration_shards=(
                    tokens_for(corpus_dir, seed_dir / TOKENIZER_FILE) if calibrates else None
                ),
            ),
        )
        return out

    def moe_train_config(self, variant: MoEVariant, seed: int, num_domains: int) -> TrainConfig:
        """``moe.train`` for ``variant``: its own steps and trained parameters, and compute matching
        (see MoEVariant)."""
        cfg = self.recipe.moe.train
        steps = variant.train_steps or cfg.steps
        if variant.compute_matched:
            branch = self.sets[DEFAULT_EXPERT_SET]
            branch_tokens = num_domains * branch.steps * tokens_per_step(branch)
            steps += math.ceil(branch_tokens / tokens_per_step(cfg))
        train_only = list(variant.train_only) or list(cfg.train_only)
        return replace(cfg, steps=steps, seed=seed, train_only=train_only)

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
        seed: int = 0,
        reset: bool | None = None,
    ) -> Path:
        """Extend ``trained`` with ``new_expert``; ``reset``: re-initialise a linear router
        (default: ``extend.reset_linear_router``) instead of appending a row."""
        from nexus_moe import calibrate, config
        from nexus_moe.calibrate import STATS_FILE
        from nexus_moe.embed import DomainEmbeddings
        from nexus_moe.extend import extend

        if reset is None:
            reset = self.recipe.extend.reset_linear_router
        calibrates = (trained / STATS_FILE).is_file()  # reads the corpus
        key = fingerprint(
            # an untrained variant's upcycled folder is itself a stage folder
            stage_key(trained) if (trained / STAGE_FILE).is_file() else stage_key(trained.parent),
            stage_key(new_expert.parent),
            domain,
            reset,
            stage_key(embeddings),
            seed,
            stage_key(corpus_dir) if calibrates else None,
            self.recipe.extend.leak_budget if calibrates else None,
            # (only when refitting: the other stages keep the keys they had before the option)
            *(["refit"] if calibrates and self.recipe.extend.refit_rows else []),
            # the default norms of a calibrated new row for this MoE, which the code sets, and
            # the default bound on the earlier domains' loss (calibrate.place_new_rows)
            *([_default_row_scale(trained), config.REFIT_ROW_SCALE] if calibrates else []),
            *(
                [
                    "placed on held windows, at most the fixed norm",
                    calibrate.LOSS_BUDGET,
                    calibrate._CARRIER_SPREAD,
                    calibrate.HELD_WINDOWS,
                    calibrate._NORM_GRID.tolist(),
                    calibrate._BIAS_GRID.tolist(),
                ]
                if calibrates
                else []
            ),
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
                    tokens_for(corpus_dir, trained / TOKENIZER_FILE) if calibrates else None
                ),
                seed=seed,  # the new linear-router row (or re-initialised router)
                leak_budget=self.recipe.extend.leak_budget,
                refit_rows=self.recipe.extend.refit_rows,
            )

        self._stage(f"extend:{out.parent.name}:s{seed}", out, key, build)
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def evaluation(
        self,
        ckpt: Path,
        corpus_dir: Path,
        domains: list[str],
        *,
        cfg: EvalConfig | None = None,
        routing: str = "model",
        corrupt: float = 0.0,
        seed: int = 0,
        route: bool = False,
    ) -> dict[str, Any]:
        """``{"scores": per-domain scores[, "routing": report]}`` of ``ckpt``, cached next to it.

        ``routing``/``corrupt``/``seed``: see :func:`evaluate_domains`; ``route``: also count the
        top-1 routing of each domain's tokens in the same pass (MoE models only).
        """
        from nexus_moe.analyse import RoutingCounter, expert_names, routing_report

        cfg = cfg or self.recipe.evaluate
        seeded = routing == "random" or corrupt > 0
        key = fingerprint(
            cfg,
            stage_key(ckpt) if (ckpt / STAGE_FILE).is_file() else stage_key(ckpt.parent),
            domains,
            [routing, corrupt, seed if seeded else None, route],
        )
        cache = ckpt.parent / f"eval-{ckpt.name}-{key}.json"
        if cache.is_file():
            self.evals_cached += cache not in self.evals_written
            return read_json(cache)
        start = time.perf_counter()
        model, _ = load_checkpoint(ckpt, device=str(self.device))
        shards = tokens_for(corpus_dir, ckpt / TOKENIZER_FILE)
        counter = RoutingCounter(model, len(domains)) if route and model.cfg.moe else None
        scores = evaluate_domains(
            model,
            shards,
            domains,
            cfg,
            device=self.device,
            routing=routing,
            corrupt=corrupt,
            seed=seed,
            on_routing=counter,
        )
        result: dict[str, Any] = {"scores": scores_to_dict(scores)}
        if counter is not None:
            result["routing"] = routing_report(counter.counts, domains, expert_names(model))
        write_json(cache, result)
        self.evals_written.add(cache)
        self.eval_seconds += time.perf_counter() - start
        return result

    def scores(self, ckpt: Path, corpus_dir: Path, domains: list[str]) -> Scores:
        """Per-domain scores of ``ckpt`` (cached, see :meth:`evaluation`)."""
        return self.evaluation(ckpt, corpus_dir, domains)["scores"]

    def routing(
        self, ckpt: Path, corpus_dir: Path, domains: list[str], name: str, out: Path | None = None
    ) -> dict:
        """Routing report of ``ckpt`` with heatmaps under ``out`` (default: results/)."""
        from nexus_moe.analyse import write_routing_report

        report = self.evaluation(ckpt, corpus_dir, domains, route=True)["routing"]
        return write_routing_report(report, out or self.workdir / "results", name)

    def _scored_on(self, tokens: int | None) -> EvalConfig:
        """``evaluate`` with ``tokens`` validation tokens per domain (None: as it is)."""
        evaluate = self.recipe.evaluate
        return evaluate if tokens is None else replace(evaluate, max_tokens=tokens)

    def earlier_config(self) -> EvalConfig:
        """How extended models' earlier domains are scored (``extend.earlier_tokens``)."""
        return self._scored_on(self.recipe.extend.earlier_tokens)

    def bounds_config(self) -> EvalConfig:
        """How the probes are scored (``study.bounds_tokens``)."""
        return self._scored_on(self.recipe.study.bounds_tokens)

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        started = time.perf_counter()
        corpus_dir = self.stage_corpus()
        domains = self.built_domains(corpus_dir, r.corpus.domains)
        heldout = self.built_domains(corpus_dir, r.extend.domains or r.corpus.heldout)
        heldout = [d for d in heldout if d not in domains]
        tokenizer = self.stage_tokenizer(corpus_dir, domains)
        seed_model = self.stage_seed(corpus_dir, tokenizer, domains)
        variants = r.moe.variants
        used_sets = [DEFAULT_EXPERT_SET] + sorted(
            {v.experts for v in variants} - {DEFAULT_EXPERT_SET}
        )
        experts = {
            s: {d: self.stage_branch(seed_model, corpus_dir, d, s) for d in domains}
            for s in used_sets
        }
        all_domains = domains + heldout

        results: dict[str, Any] = {
            "domains": domains,
            "heldout": heldout,
            "reference": r.study.reference,
            "expert_sets": used_sets,
            "variants": {},
            "models": {},  # trained (final) models: name -> seed -> scores
            "step0": {},  # MoEs right after upcycling: name -> seed -> scores
            "oracle": {},
            "oracle_step0": {},
            "random": {},
            "corrupted": {},  # name -> share -> seed -> {"scores", "clean_loss"}
            "routing_share": {"step0": {}, "trained": {}},  # name -> seed -> {domain: share}
            "curves": {},  # name -> seed -> [[step, mean validation loss], ...]
            "extension": {},  # "<label>+<domain>" -> budget -> seed -> scores, share
            "extension_models": {},  # extension label -> the variant it extends
            # variant -> seed -> the earlier domains' scores before extension, on the tokens
            # the extended models' earlier domains are scored on (extend.earlier_tokens)
            "extension_before": {},
            "bounds_models": {},  # seed, dense experts, trained MoEs: on the probes' tokens
        }
        models = results["models"]
        models["seed"] = {"0": self.scores(seed_model, corpus_dir, all_domains)}
        # Each dense expert on its own domain: the bound (what a document-level router over the
        # dense models gets).
        for s, by_domain in experts.items():
            for d, path in by_domain.items():
                models[expert_label(s, d)] = {"0": self.scores(path, corpus_dir, [d])}
        # The same bounds on the probes' tokens (step 0, oracle, random), so that those tables
        # compare every model on the same text.
        if self.bounds_config() != r.evaluate:
            probe = self.bounds_config()
            bounds_models = results["bounds_models"]
            bounds_models["seed"] = {
                "0": self.evaluation(seed_model, corpus_dir, domains, cfg=probe)["scores"]
            }
            for s, by_domain in experts.items():
                for d, path in by_domain.items():
                    ev = self.evaluation(path, corpus_dir, [d], cfg=probe)
                    bounds_models[expert_label(s, d)] = {"0": ev["scores"]}

        seeds = r.seeds or [r.seed]
        if variants:
            ext_sets = {v.experts for v in variants if v.name in r.extend.variants}
            new_experts = {
                s: {d: self.stage_branch(seed_model, corpus_dir, d, s) for d in heldout}
                for s in used_sets
                if s in ext_sets
            }
            for s, by_domain in new_experts.items():
                for d, path in by_domain.items():
                    models[expert_label(s, d)] = {"0": self.scores(path, corpus_dir, [d])}
            embeddings = self.stage_embed(corpus_dir, all_domains)
            for seed in seeds:
                trained = {}
                for v in variants:
                    trained[v.name] = self.run_variant(
                        v,
                        seed,
                        seeds,
                        seed_model,
                        experts[v.experts],
                        embeddings,
                        corpus_dir,
                        domains,
                        all_domains,
                        results,
                    )
                for name in r.extend.variants:
                    if name not in trained:
                        continue
                    v = next(v for v in variants if v.name == name)
                    # The appended-row baseline only where the main one re-initialises.
                    appends = [False]
                    if (
                        results["variants"][name]["router"] == "linear"
                        and r.extend.append_linear_baseline
                        and r.extend.reset_linear_router
                    ):
                        appends.append(True)
                    for appended in appends:
                        results["extension_models"][extension_label(name, appended)] = name
                        for d in heldout:
                            self.run_extension(
                                name,
                                d,
                                seed,
                                trained[name],
                                new_experts[v.experts][d],
                                embeddings,
                                corpus_dir,
                                domains,
                                results,
                                appended=appended,
                            )
        results["paired"] = paired_summary(results)
        results["extension_summary"] = extension_summary(results)
        results["convergence"] = convergence_summary(results)
        results["timings"] = self.timing_summary(time.perf_counter() - started)
        self.write_results(results)
        return results

    def run_variant(
        self,
        v: MoEVariant,
        seed: int,
        seeds: list[int],
        seed_model: Path,
        experts: dict[str, Path],
        embeddings: Path,
        corpus_dir: Path,
        domains: list[str],
        all_domains: list[str],
        results: dict[str, Any],
    ) -> Path:
        """Upcycle, score at step 0, train, score with bounds; returns the final checkpoint."""
        from nexus_moe.analyse import write_routing_report

        r = self.recipe
        s = str(seed)
        out = self.workdir / "results"
        upcycled = self.stage_upcycle(v, seed, seed_model, experts, embeddings, corpus_dir)
        is_moe = not v.produces_dense
        info = results["variants"].setdefault(
            v.name, {"method": v.method, "experts": v.experts, "router": None, "train_tokens": 0}
        )
        if is_moe:
            cfg0, _ = load_config(upcycled)
            assert cfg0.moe is not None
            info["router"] = str(cfg0.moe.router)
            if cfg0.moe.router == "ac":
                info["router"] = f"ac({cfg0.moe.ac_base})"
            step0 = self.evaluation(
                upcycled, corpus_dir, domains, cfg=self.bounds_config(), route=True
            )
            results["step0"].setdefault(v.name, {})[s] = step0["scores"]
            results["routing_share"]["step0"].setdefault(v.name, {})[s] = step0["routing"][
                "accuracy"
            ]
            if r.study.step0_oracle:  # how good the composition is when routing is not at fault
                ev = self.evaluation(
                    upcycled, corpus_dir, domains, cfg=self.bounds_config(), routing="oracle"
                )
                if ev["scores"]:
                    results["oracle_step0"].setdefault(v.name, {})[s] = ev["scores"]
        final = upcycled
        if v.train:
            cfg = self.moe_train_config(v, seed, len(domains))
            info["train_tokens"] = cfg.steps * tokens_per_step(cfg)
            # The curve's step-0 point, scored as the trainer scores its evaluations.
            curve_cfg = EvalConfig(cfg.seq_len, cfg.batch_size, cfg.eval_tokens)
            start = self.evaluation(upcycled, corpus_dir, domains, cfg=curve_cfg)
            final = self.stage_train(
                f"train:{v.name}:s{seed}",
                upcycled,
                upcycled.parent / "trained",
                corpus_dir,
                domains,
                cfg,
                {"stage": "moe-train", "variant": v.name},
            )
            curve = [[0, start["scores"]["mean"]["loss"]]]
            curve += validation_curve(final.parent / "metrics.jsonl")
            results["curves"].setdefault(v.name, {})[s] = curve
        # Held-out domains only where an extension needs the before-extension score.
        scored = all_domains if v.name in r.extend.variants else domains
        main = self.evaluation(final, corpus_dir, scored, route=is_moe)
        results["models"].setdefault(v.name, {})[s] = main["scores"]
        if is_moe:
            results["routing_share"]["trained"].setdefault(v.name, {})[s] = main["routing"][
                "accuracy"
            ]
            if seed == seeds[0]:
                write_routing_report(main["routing"], out, v.name)
        bounds = self.bounds_config()
        if bounds != r.evaluate and (r.study.bounds or r.study.corrupt):
            # The model's own routing on the probes' tokens: what oracle, random and corrupted
            # scores are compared with.
            own = self.evaluation(final, corpus_dir, domains, cfg=bounds)["scores"]
            results["bounds_models"].setdefault(v.name, {})[s] = own
        if is_moe and r.study.bounds:
            for mode in ("oracle", "random"):
                ev = self.evaluation(
                    final, corpus_dir, domains, cfg=bounds, routing=mode, seed=seed
                )
                if ev["scores"]:  # oracle: none when no expert belongs to a domain
                    results[mode].setdefault(v.name, {})[s] = ev["scores"]
        if r.study.corrupt:
            if bounds == r.evaluate:  # the same tokens as the model's own scores
                clean_loss = statistics.fmean(main["scores"][d]["loss"] for d in domains)
            else:
                clean_loss = results["bounds_models"][v.name][s]["mean"]["loss"]
            for share in r.study.corrupt:
                ev = self.evaluation(
                    final, corpus_dir, domains, cfg=bounds, corrupt=share, seed=seed
                )
                results["corrupted"].setdefault(v.name, {}).setdefault(str(share), {})[s] = {
                    "scores": ev["scores"],
                    "clean_loss": clean_loss,
                }
        return final

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
        results: dict[str, Any],
        appended: bool = False,
    ) -> None:
        """Extend MoE ``name`` with the held-out ``domain``, finetune at each budget, score.

        Budget 0 (the extended model before any finetuning) is always scored. ``appended``: keep
        a linear router's trained rows and append one (the second linear baseline) instead of
        following ``extend.reset_linear_router``. The earlier domains are scored on
        ``extend.earlier_tokens`` per domain, and so is the MoE before extension
        (``results["extension_before"]``), so their change is paired on the same tokens.
        """
        from nexus_moe.analyse import merge_routing_reports, write_routing_report

        r = self.recipe
        label = extension_label(name, appended)
        folder = f"{name}-append" if appended else name
        base = self.workdir / f"s{seed}" / "extend" / f"{folder}-{domain}"
        extended = self.stage_extend(
            trained,
            new_expert,
            domain,
            embeddings,
            base / "extended",
            corpus_dir,
            seed,
            reset=False if appended else None,
        )
        all_domains = domains + [domain]
        earlier_cfg = self.earlier_config()
        if earlier_cfg != r.evaluate:  # else its own scores (results["models"]) are on them
            before = self.evaluation(trained, corpus_dir, domains, cfg=earlier_cfg)["scores"]
            results["extension_before"].setdefault(name, {})[str(seed)] = before
        share = r.extend.new_domain_share
        weights = {domain: share, **{d: (1 - share) / len(domains) for d in domains}}
        first_seed = seed == (r.seeds or [r.seed])[0]
        for budget in sorted({0, *r.extend.budgets}):
            tcfg = r.extend.train
            per_step = tokens_per_step(tcfg)
            if budget <= 0:
                model_dir = extended
            else:
                steps = max(1, budget // per_step)
                train_only = r.extend.train_only.get(name, tcfg.train_only)
                cfg = replace(
                    tcfg, steps=steps, seed=seed, domain_weights=weights, train_only=train_only
                )
                model_dir = self.stage_train(
                    f"finetune:{folder}-{domain}:{budget}:s{seed}",
                    extended,
                    base / f"ft{budget}",
                    corpus_dir,
                    all_domains,
                    cfg,
                    {"stage": "extend-finetune", "budget_tokens": steps * per_step},
                )
            entry = (
                results["extension"].setdefault(f"{label}+{domain}", {}).setdefault(str(budget), {})
            )
            if earlier_cfg == r.evaluate:
                ev = self.evaluation(model_dir, corpus_dir, all_domains, route=True)
                scores, report = ev["scores"], ev["routing"]
            else:
                new = self.evaluation(model_dir, corpus_dir, [domain], route=True)
                old = self.evaluation(model_dir, corpus_dir, domains, cfg=earlier_cfg, route=True)
                scores = {d: old["scores"][d] for d in domains} | {domain: new["scores"][domain]}
                report = merge_routing_reports(old["routing"], new["routing"])
            out = self.workdir / ("results" if first_seed else f"s{seed}/routing")
            write_routing_report(report, out, f"{folder}+{domain}-ft{budget}")
            entry[str(seed)] = {
                "scores": scores,
                "new_expert_share": float(report["accuracy"][domain] or 0.0),
            }

    # -- reporting ------------------------------------------------------------------------------
    def timing_summary(self, wall: float) -> dict[str, Any]:
        """Seconds per stage (run now, or recorded by the run that made a skipped stage), per
        kind of stage, evaluation time and this invocation's wall time."""
        stages = {**self.earlier, **self.timings}
        kinds: dict[str, float] = {}
        for name, seconds in stages.items():
            kind = name.split(":", 1)[0].split("[", 1)[0]
            kinds[kind] = kinds.get(kind, 0.0) + seconds
        # This run's wall time outside its stages and evaluations: loading, heatmaps, plots.
        other = max(0.0, wall - sum(self.timings.values()) - self.eval_seconds)
        # Recorded to the millisecond, as the stages' own seconds are: a study has dozens of
        # stages of about 10 ms, and rounding each to 10 ms drifts their sum by a tenth of a
        # second, so that the figures no longer add up to the wall time.
        return {
            "stages": {k: round(v, 3) for k, v in stages.items()},
            "ran_now": list(self.ran),
            "by_kind": {k: round(v, 3) for k, v in kinds.items()},
            "evaluate_s": round(self.eval_seconds, 3),
            "stages_total_s": round(sum(stages.values()), 3),
            "other_s": round(other, 3),
            "wall_s": round(wall, 3),
            # The whole study's time: every stage wherever it ran, plus this run's evaluations
            # and the rest; exact when no evaluation was read from an earlier run's cache.
            "evaluations_cached": self.evals_cached,
            "study_s": round(sum(stages.values()) + self.eval_seconds + other, 3),
        }

    def write_results(self, results: dict[str, Any]) -> None:
        out = self.workdir / "results"
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", {"recipe": to_dict(self.recipe), **results})
        if self.recipe.study.plot and results.get("curves"):
            plot_curves(results["curves"], out / "loss-curves.png")
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
        self.console.print(timing_table(results["timings"]))
        t = results["timings"]
        self.console.print(
            f"total: {t['wall_s']:.1f}s wall in this run (stages {t['stages_total_s']:.1f}s "
            f"including earlier runs of skipped stages; evaluation {t['evaluate_s']:.1f}s); "
            f"the whole study {t['study_s']:.1f}s"
            + (
                f" at least ({t['evaluations_cached']} evaluations cached)"
                if t["evaluations_cached"]
                else ""
            )  # fmt: skip
        )
        self.console.print(f"results written to {out}/results.md")


def validation_curve(metrics: Path) -> list[list[float]]:
    """``[[step, mean validation loss], ...]`` from a training run's metrics.jsonl (a resumed
    run may log a step twice: the last record wins)."""
    points: dict[int, float] = {}
    if not metrics.is_file():
        return []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        mean = record.get("eval", {}).get("mean") if isinstance(record, dict) else None
        if mean is not None:
            points[int(record["step"])] = float(mean["loss"])
    return [[step, points[step]] for step in sorted(points)]


# ---------------------------------------------------------------------------------------------
# statistics

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), for df = 1..30. scipy is not a declared
# dependency (only a transitive one), and the table is exact to the digits shown.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df): the table above, then the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 values (df >= 1)")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def paired_interval(values: list[float]) -> dict[str, Any]:
    """Mean, 95% t-interval and verdict of per-seed paired differences (> 0: reference better).

    ``verdict`` is "win" / "loss" only when the interval excludes 0, else "no difference"; with
    one seed there is no interval and no verdict.
    """
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    if n < 2:
        return {"n": n, "values": values, "mean": mean, "low": None, "high": None,
                "verdict": "one seed: no interval"}  # fmt: skip
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "win" if low > 0 else "loss" if high < 0 else "no difference"
    return {"n": n, "values": values, "mean": mean, "low": low, "high": high, "verdict": verdict}


def relative_differences(reference: dict[str, float], baseline: dict[str, float]) -> list[float]:
    """(baseline - reference) / baseline for each seed both have, in seed order."""
    seeds = sorted(set(reference) & set(baseline), key=int)
    return [(baseline[s] - reference[s]) / baseline[s] for s in seeds]


def _mean_ppl(by_seed: dict[str, Scores], domains: list[str]) -> dict[str, float]:
    return {
        s: statistics.fmean(scores[d]["perplexity"] for d in domains)
        for s, scores in by_seed.items()
        if all(d in scores for d in domains)
    }


def paired_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Reference vs every other variant, per stage (step 0, trained) and per extension budget."""
    ref = results.get("reference", "nexus")
    domains = results["domains"]
    out: dict[str, Any] = {"reference": ref, "upcycling": {}, "extension": {}}
    for stage in ("step0", "models"):
        table = results.get(stage, {})
        if ref not in table:
            continue
        ref_ppl = _mean_ppl(table[ref], domains)
        for name, by_seed in table.items():
            if name == ref or name == "seed" or name.startswith(("expert:", "expert[")):
                continue
            diffs = relative_differences(ref_ppl, _mean_ppl(by_seed, domains))
            if diffs:
                key = "step0" if stage == "step0" else "trained"
                out["upcycling"].setdefault(key, {})[name] = paired_interval(diffs)
    extension = results.get("extension", {})
    for key, by_budget in extension.items():
        name, domain = _split_extension(key)
        if name != ref:
            continue
        for other_key, other in extension.items():
            other_name, other_domain = _split_extension(other_key)
            if other_domain != domain or other_name == ref:
                continue
            for budget, by_seed in by_budget.items():
                if budget not in other:
                    continue
                entry = {}
                for what, cols in (("new", [domain]), ("earlier", domains)):
                    r = {s: statistics.fmean(e["scores"][d]["perplexity"] for d in cols)
                         for s, e in by_seed.items()}  # fmt: skip
                    b = {s: statistics.fmean(e["scores"][d]["perplexity"] for d in cols)
                         for s, e in other[budget].items()}  # fmt: skip
                    entry[what] = paired_interval(relative_differences(r, b))
                out["extension"].setdefault(domain, {}).setdefault(budget, {})[other_name] = entry
    return out


def extension_label(name: str, appended: bool = False) -> str:
    """The results' name of variant ``name`` extended (``appended``: the appended-row baseline)."""
    return f"{name} {APPENDED}" if appended else name


def _split_extension(key: str) -> tuple[str, str]:
    """``"<label>+<domain>"`` -> (label, domain); labels may hold "+" (domain names do not)."""
    label, domain = key.rsplit("+", 1)
    return label, domain


def extension_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per extension, budget and seed: the new expert's share, the share of the new domain's
    gap closed and the earlier domains' change, each against the same seed's MoE before the
    extension.

    Gap recovered = (ln ppl_before - ln ppl_after) / (ln ppl_before - ln ppl_dense) on the new
    domain, where ppl_dense is the new dense expert on its own domain; log perplexities are
    bits/byte up to the same factor on the same text, so this is also the bits/byte gap.
    Earlier change = mean earlier-domain perplexity after / before - 1.
    """
    domains = results["domains"]
    models = results["models"]
    variants = results.get("variants", {})
    owners = results.get("extension_models", {})
    earlier_before = results.get("extension_before", {})
    out: dict[str, Any] = {}
    for key, by_budget in results.get("extension", {}).items():
        label, domain = _split_extension(key)
        name = owners.get(label, label)
        before = models.get(name, {})
        # The earlier domains before extension, on the tokens the extended models were scored on.
        before_old = earlier_before.get(name, before)
        expert_set = variants.get(name, {}).get("experts", DEFAULT_EXPERT_SET)
        dense = models.get(expert_label(expert_set, domain), {}).get("0", {}).get(domain)
        for budget, by_seed in by_budget.items():
            rows = {}
            for s, e in by_seed.items():
                b = before.get(s)
                if b is None or domain not in b:
                    continue
                after = e["scores"]
                gap = None
                if dense is not None:
                    full = math.log(b[domain]["perplexity"]) - math.log(dense["perplexity"])
                    closed = math.log(b[domain]["perplexity"]) - math.log(
                        after[domain]["perplexity"]
                    )
                    gap = closed / full if full > 0 else None
                old = statistics.fmean(before_old[s][d]["perplexity"] for d in domains)
                new_old = statistics.fmean(after[d]["perplexity"] for d in domains)
                rows[s] = {
                    "share": e["new_expert_share"],
                    "gap_recovered": gap,
                    "earlier_change": new_old / old - 1,
                }
            out.setdefault(key, {})[budget] = rows
    return out


def steps_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First step at which ``curve`` reaches ``target`` (linear between evaluations)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:], strict=False):
        if l0 <= target:
            return float(s0)
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return float(curve[-1][0]) if curve and curve[-1][1] <= target else None


def convergence_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Steps each router needs to reach the same validation loss, per seed.

    Compared: the trained MoE variants built like the reference (same expert set and training
    length) whose methods differ only by router (moe-linear, nexus, nexus-paper; with or without
    AC). The
    target per seed is the highest final validation loss among them, so every one reaches it.
    """
    from nexus_moe.upcycle import Method

    ref = results.get("reference", "nexus")
    info = results.get("variants", {})
    curves = results.get("curves", {})
    if ref not in curves:
        return {}
    ref_info = info[ref]
    group = [
        name
        for name, v in info.items()
        if name in curves
        and Method(v["method"]) in (Method.moe_linear, Method.nexus, Method.nexus_paper)
        and v["experts"] == ref_info["experts"]
        and v["train_tokens"] == ref_info["train_tokens"]
    ]
    if not group:
        return {}
    seeds = sorted(set.intersection(*(set(curves[n]) for n in group)), key=int)
    out: dict[str, Any] = {"variants": group, "target": {}, "steps": {n: {} for n in group}}
    for s in seeds:
        target = max(curves[n][s][-1][1] for n in group)
        out["target"][s] = target
        for n in group:
            out["steps"][n][s] = steps_to_reach(curves[n][s], target)
    return out


# ---------------------------------------------------------------------------------------------
# tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 2, signed: bool = False) -> str:
    """Mean ± sd of ``values`` (the mean alone for one value); ``signed``: the mean with its
    sign (a change)."""
    if not values:
        return "-"
    mean, std = _mean_std(values)
    shown = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{shown} ± {std:.{digits}f}" if len(values) > 1 else shown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _bound_rows(
    results: dict[str, Any], probes: bool = False
) -> list[tuple[str, dict[str, list[float]]]]:
    """The seed and each expert set's dense experts on their own domains; ``probes``: scored on
    the probes' tokens (``bounds_models``) where the run has those."""
    domains = results["domains"]
    models = _bound_models(results, probes)
    seed = models["seed"]["0"]
    rows = [("seed", {**{d: [seed[d]["perplexity"]] for d in domains},
                      "mean": [statistics.fmean(seed[d]["perplexity"] for d in domains)]})]  # fmt: skip
    for s in results.get("expert_sets", [DEFAULT_EXPERT_SET]):
        own = {
            d: [models[expert_label(s, d)]["0"][d]["perplexity"]]
            for d in domains
            if expert_label(s, d) in models
        }
        if len(own) == len(domains):
            own["mean"] = [statistics.fmean(v[0] for v in own.values())]
            label = "" if s == DEFAULT_EXPERT_SET else f" [{s}]"
            rows.append((f"dense experts{label} (own domain)", own))
    return rows


def _bound_models(results: dict[str, Any], probes: bool) -> dict[str, Any]:
    bounds = results.get("bounds_models") or {}
    return bounds if probes and "seed" in bounds else results["models"]


def _dense_own(results: dict[str, Any], expert_set: str, probes: bool = False) -> dict[str, float]:
    """Each domain's dense expert (of ``expert_set``) on its own domain: domain -> perplexity."""
    models = _bound_models(results, probes)
    return {
        d: models[expert_label(expert_set, d)]["0"][d]["perplexity"]
        for d in results["domains"]
        if expert_label(expert_set, d) in models
    }


def _dense_bound(results: dict[str, Any], expert_set: str, probes: bool = False) -> float | None:
    own = _dense_own(results, expert_set, probes)
    if len(own) < len(results["domains"]):
        return None
    return statistics.fmean(own.values())


def _variant_rows(
    results: dict[str, Any], table: dict[str, dict[str, Scores]], suffix: str = ""
) -> list[tuple[str, dict[str, list[float]]]]:
    domains = results["domains"]
    rows = []
    for name, by_seed in table.items():
        if name == "seed" or name.startswith(("expert:", "expert[")):
            continue
        cols: dict[str, list[float]] = {}
        for scores in by_seed.values():
            for d in domains:
                if d in scores:
                    cols.setdefault(d, []).append(scores[d]["perplexity"])
            if all(d in scores for d in domains):
                cols.setdefault("mean", []).append(
                    statistics.fmean(scores[d]["perplexity"] for d in domains)
                )
        rows.append((f"{name}{suffix}", cols))
    return rows


def _model_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, list[float]]]]:
    """(model, {column: [perplexity per seed]}) of the upcycling table: bounds, trained MoEs."""
    return _bound_rows(results) + _variant_rows(results, results["models"])


def results_table(results: dict[str, Any]) -> Table:
    """The upcycling comparison as a rich table (validation perplexity)."""
    domains = results["domains"]
    table = Table(title="validation perplexity (lower is better)")
    table.add_column("model")
    for c in [*domains, "mean"]:
        table.add_column(c, justify="right")
    rows = _model_rows(results)
    rows += _variant_rows(results, results.get("step0", {}), " (step 0)")
    rows += _variant_rows(results, results.get("oracle", {}), " (oracle routing)")
    for name, cols in rows:
        table.add_row(escape(name), *[_fmt(cols.get(c, [])) for c in [*domains, "mean"]])
    return table


def timing_table(timings: dict[str, Any]) -> Table:
    table = Table(title="wall time per kind of stage (s)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for kind, seconds in timings["by_kind"].items():
        table.add_row(kind, f"{seconds:.1f}")
    table.add_row("evaluation (this run)", f"{timings['evaluate_s']:.1f}")
    table.add_row("other: loading, heatmaps, plots (this run)", f"{timings['other_s']:.1f}")
    table.add_row("total wall (this run)", f"{timings['wall_s']:.1f}")
    if "study_s" in timings:
        table.add_row(_whole_study_label(timings), f"{timings['study_s']:.1f}")
    return table


def _whole_study_label(timings: dict[str, Any]) -> str:
    """Row label of the whole study's time, flagged when earlier runs' evaluations were read."""
    cached = timings.get("evaluations_cached", 0)
    note = f" (at least: {cached} evaluations were read from cache)" if cached else ""
    return f"whole study: every stage, wherever it ran, + evaluation + other{note}"


def _ppl_table(
    results: dict[str, Any],
    rows: list[tuple[str, dict[str, list[float]]]],
    extra: dict[str, Callable[[str, dict[str, list[float]]], str]] | None = None,
) -> list[str]:
    cols = [*results["domains"], "mean"]
    extra = extra or {}
    lines = [
        f"| model | {' | '.join([*cols, *extra])} |",
        "|---|" + "---:|" * (len(cols) + len(extra)),
    ]
    for name, values in rows:
        cells = [_fmt(values.get(c, [])) for c in cols]
        cells += [fn(name, values) for fn in extra.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    """The study's Markdown report; every table repeats the bounds (seed, dense experts)."""
    domains = results["domains"]
    variants = results.get("variants", {})
    oracle = {n: _mean_ppl(v, domains) for n, v in results.get("oracle", {}).items()}
    probed = results.get("bounds_models") or {}

    def vs_dense(name: str, values: dict[str, list[float]], probes: bool = False) -> str:
        base = name.split(" (", 1)[0]
        expert_set = variants.get(base, {}).get("experts", DEFAULT_EXPERT_SET)
        bound = _dense_bound(results, expert_set, probes)
        if bound is None or not values.get("mean") or base not in variants:
            return "-"
        return _pct(statistics.fmean(values["mean"]) / bound - 1)

    def worst_vs_dense(name: str, values: dict[str, list[float]]) -> str:
        """The largest per-domain excess over that domain's dense expert (mean over seeds)."""
        base = name.split(" (", 1)[0]
        expert_set = variants.get(base, {}).get("experts", DEFAULT_EXPERT_SET)
        own = _dense_own(results, expert_set, probes=True)
        if base not in variants or len(own) < len(domains) or not values.get("mean"):
            return "-"
        excess = {d: statistics.fmean(values[d]) / own[d] - 1 for d in domains}
        d = max(excess, key=excess.__getitem__)
        return f"{_pct(excess[d])} ({d})"

    def probe_vs_dense(name: str, values: dict[str, list[float]]) -> str:
        return vs_dense(name, values, probes=True)

    def vs_oracle(name: str, values: dict[str, list[float]]) -> str:
        """The MoE against itself under oracle routing, on the same (the probes') tokens."""
        if name not in oracle or not oracle[name] or not values.get("mean"):
            return "-"
        own = _mean_ppl(probed[name], domains) if name in probed else None
        mean = statistics.fmean(own.values()) if own else statistics.fmean(values["mean"])
        return _pct(mean / statistics.fmean(oracle[name].values()) - 1)

    def tokens(name: str, values: dict[str, list[float]]) -> str:
        n = variants.get(name, {}).get("train_tokens")
        return f"{n:,}" if n else "-"

    lines = [
        "## Upcycling: per-domain validation perplexity",
        "",
        "After MoE training. Mean ± standard deviation over seeds where several were run; lower "
        "is better. Bounds measured in the same run: the seed, and the dense experts each scored "
        "on its own domain (a document-level router over the dense models). 'vs dense experts' "
        "/ 'vs oracle': mean perplexity relative to the dense experts (of the variant's expert "
        "set) and to the same MoE under oracle routing.",
        "",
        *_ppl_table(
            results,
            _model_rows(results),
            {"train tokens": tokens, "vs dense experts": vs_dense, "vs oracle": vs_oracle},
        ),
    ]
    if results.get("step0"):
        lines += [
            "",
            "## Step 0: every MoE right after upcycling, before training",
            "",
            f"Validation tokens per domain: {_tokens_scored(results, ('step0',))}.",
            "",
            *_ppl_table(
                results,
                _bound_rows(results, probes=True)
                + _variant_rows(results, results["step0"], " (step 0)")
                + _variant_rows(
                    results, results.get("oracle_step0", {}), " (step 0, oracle routing)"
                ),
                {"vs dense experts": probe_vs_dense, "worst domain vs dense": worst_vs_dense},
            ),
        ]
    if results.get("oracle") or results.get("random"):
        lines += [
            "",
            "## Routing bounds: the trained MoEs under oracle and random routing",
            "",
            "Oracle: every token of a domain forced to that domain's expert (MoEs without "
            "per-domain experts have no oracle row); random: each token to top-k experts drawn "
            "uniformly (seeded). Validation tokens per domain: "
            f"{_tokens_scored(results)}.",
            "",
            *_ppl_table(
                results,
                _bound_rows(results, probes=True)
                + _variant_rows(results, results.get("oracle", {}), " (oracle routing)")
                + _variant_rows(results, results.get("random", {}), " (random routing)"),
                {"vs dense experts": probe_vs_dense},
            ),
        ]
    lines += _paired_markdown(results)
    lines += _routing_markdown(results)
    lines += _robustness_markdown(results)
    lines += _convergence_markdown(results)
    lines += _extension_markdown(results)
    lines += _timing_markdown(results)
    return "\n".join(lines) + "\n"


def _tokens_scored(results: dict[str, Any], tables: tuple[str, ...] = ("oracle", "random")) -> str:
    for table in tables:
        for by_seed in results.get(table, {}).values():
            for scores in by_seed.values():
                return ", ".join(f"{d} {int(scores[d]['tokens']):,}" for d in results["domains"]
                                 if d in scores)  # fmt: skip
    return "-"


def _interval(p: dict[str, Any], digits: int = 1) -> str:
    """A :func:`paired_interval` as "[low%, high%]" ("-" with one seed)."""
    if p["low"] is None:
        return "-"
    return f"[{100 * p['low']:+.{digits}f}%, {100 * p['high']:+.{digits}f}%]"


def _paired_markdown(results: dict[str, Any]) -> list[str]:
    paired = results.get("paired") or paired_summary(results)
    ref = paired["reference"]
    up = paired.get("upcycling", {})
    if not up:
        return []
    lines = [
        "",
        f"## Paired differences: {ref} vs each baseline",
        "",
        f"Per seed (same seed, same data order): (baseline - {ref}) / baseline of the mean "
        f"perplexity over the training domains; > 0: {ref} is better. Mean and 95% t-interval "
        "over seeds; a win (or loss) only when the interval excludes 0.",
        "",
        "| baseline | stage | seeds | per seed | mean | 95% interval | verdict |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for stage, label in (("step0", "step 0"), ("trained", "after training")):
        for name, p in up.get(stage, {}).items():
            per_seed = ", ".join(_pct(x) for x in p["values"])
            lines.append(
                f"| {name} | {label} | {p['n']} | {per_seed} | {_pct(p['mean'])} | "
                f"{_interval(p)} | {p['verdict']} |"
            )
    return lines


def _routing_markdown(results: dict[str, Any]) -> list[str]:
    share = results.get("routing_share", {})
    domains = results["domains"]
    rows = []
    for stage, label in (("step0", " (step 0)"), ("trained", "")):
        for name, by_seed in share.get(stage, {}).items():
            cells = []
            for d in domains:
                vals = [acc[d] for acc in by_seed.values() if acc.get(d) is not None]
                cells.append(_fmt(vals) if vals else "-")
            if any(c != "-" for c in cells):  # MoEs without per-domain experts have no share
                rows.append(f"| {name}{label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "## Routing share",
        "",
        "Share of each domain's validation tokens whose top-1 routed expert is that domain's own "
        "expert (mean over MoE layers; chance is 1 / number of experts).",
        "",
        f"| model | {' | '.join(domains)} |",
        "|---|" + "---:|" * len(domains),
        *rows,
    ]


def _robustness_markdown(results: dict[str, Any]) -> list[str]:
    corrupted = results.get("corrupted", {})
    if not corrupted:
        return []
    shares = sorted({float(s) for by_share in corrupted.values() for s in by_share})
    lines = [
        "",
        "## Robustness to corrupted input",
        "",
        "Mean validation loss (nats/token, training domains) on clean text, and its increase "
        "when a share of the input tokens is replaced by uniformly random tokens (the same "
        "tokens for every model of a seed; targets stay clean). Mean ± sd over seeds.",
        "",
        "| model | router | clean loss | " + " | ".join(f"+loss at {s:.0%}" for s in shares) + " |",
        "|---|---|---:|" + "---:|" * len(shares),
    ]
    variants = results.get("variants", {})
    for name, by_share in corrupted.items():
        first = next(iter(by_share.values()))
        clean = [e["clean_loss"] for e in first.values()]
        cells = []
        for s in shares:
            entries = by_share.get(str(s), {})
            cells.append(
                _fmt([e["scores"]["mean"]["loss"] - e["clean_loss"] for e in entries.values()], 3)
            )
        router = variants.get(name, {}).get("router") or "dense"
        lines.append(f"| {name} | {router} | {_fmt(clean, 3)} | " + " | ".join(cells) + " |")
    return lines


def _convergence_markdown(results: dict[str, Any]) -> list[str]:
    curves = results.get("curves", {})
    if not curves:
        return []
    conv = results.get("convergence") or convergence_summary(results)
    variants = results.get("variants", {})
    lines = [
        "",
        "## Convergence: validation loss against MoE training steps",
        "",
        "![validation loss curves](loss-curves.png)",
        "",
        "Final validation loss (mean over training domains, the trainer's evaluations) and, for "
        "the variants that differ only by router, the steps each needs to reach the highest "
        "final loss among them (per seed; interpolated between evaluations).",
        "",
        "| model | router | steps | loss at step 0 | final loss | steps to reach target |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by_seed in curves.items():
        first = [c[0][1] for c in by_seed.values()]
        final = [c[-1][1] for c in by_seed.values()]
        steps = [c[-1][0] for c in by_seed.values()]
        reach = [x for x in conv.get("steps", {}).get(name, {}).values() if x is not None]
        router = variants.get(name, {}).get("router") or "-"
        lines.append(
            f"| {name} | {router} | {int(max(steps))} | {_fmt(first, 3)} | {_fmt(final, 3)} | "
            f"{_fmt(reach, 0) if reach else '-'} |"
        )
    if conv.get("target"):
        target = ", ".join(f"s{s}: {t:.3f}" for s, t in conv["target"].items())
        lines += ["", f"Target loss per seed: {target}."]
    return lines


def _extension_markdown(results: dict[str, Any]) -> list[str]:
    extension = results.get("extension", {})
    if not extension:
        return []
    domains = results["domains"]
    models = results["models"]
    variants = results.get("variants", {})
    first = next(iter(next(iter(extension.values())).values()))
    scored = next(iter(first.values()))["scores"]
    new_domain = next(d for d in scored if d not in domains and d != "mean")
    lines = [
        "",
        "## Extension with a held-out domain",
        "",
        "Perplexity on the new domain and mean over the earlier domains after "
        "finetuning on the given token budget (budget 0: right after extension, no training); "
        "routing share = share of the new domain's tokens sent to the new expert. Bounds: the "
        "MoE before extension, and the new dense expert on its own domain. Gap recovered: the "
        "share of the new domain's log-perplexity (equivalently bits/byte) gap between the MoE "
        "before extension and the new dense expert that the extension closes; earlier domains "
        "change: their mean perplexity against the same seed's MoE before extension. Mean ± sd "
        "over seeds.",
        "",
        f"Validation tokens per domain: new domain {int(scored[new_domain]['tokens']):,}, "
        f"earlier domains {int(scored[domains[0]]['tokens']):,} (the MoE before extension is "
        "scored on the same tokens, so their change is paired).",
        "",
        "| model | budget (tokens) | new domain ppl | earlier domains ppl | routing share | "
        "gap recovered | earlier domains change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = results.get("extension_summary") or extension_summary(results)
    owners = results.get("extension_models", {})
    earlier_before = results.get("extension_before", {})
    shown: set[tuple[str, str]] = set()
    for key, by_budget in extension.items():
        label, domain = _split_extension(key)
        name = owners.get(label, label)
        before = models.get(name, {})
        if before and (name, domain) not in shown:
            new = [s[domain]["perplexity"] for s in before.values() if domain in s]
            old = [
                statistics.fmean(s[d]["perplexity"] for d in domains)
                for s in earlier_before.get(name, before).values()
            ]
            lines.append(f"| {name} before extension | - | {_fmt(new)} | {_fmt(old)} | - | - | - |")
        expert_set = variants.get(name, {}).get("experts", DEFAULT_EXPERT_SET)
        dense = models.get(expert_label(expert_set, domain), {}).get("0")
        if dense and (expert_set, domain) not in shown:
            lines.append(
                f"| dense expert {expert_label(expert_set, domain)} | - | "
                f"{dense[domain]['perplexity']:.2f} | - | - | - | - |"
            )
        shown |= {(name, domain), (expert_set, domain)}
        for budget, by_seed in by_budget.items():
            new = [e["scores"][domain]["perplexity"] for e in by_seed.values()]
            old = [
                statistics.fmean(e["scores"][d]["perplexity"] for d in domains)
                for e in by_seed.values()
            ]
            share = [e["new_expert_share"] for e in by_seed.values()]
            rows = summary.get(key, {}).get(budget, {}).values()
            gap = [x["gap_recovered"] for x in rows if x["gap_recovered"] is not None]
            change = [100 * x["earlier_change"] for x in rows]
            lines.append(
                f"| {key} | {int(budget):,} | {_fmt(new)} | {_fmt(old)} | {_fmt(share)} | "
                f"{_fmt(gap)} | {_fmt(change, 1, signed=True)}% |"
            )
    paired = (results.get("paired") or paired_summary(results)).get("extension", {})
    ref = results.get("reference", "nexus")
    if paired:
        lines += [
            "",
            f"Paired per seed, {ref} vs each other extended variant: (baseline - {ref}) / "
            "baseline of the perplexity on the new domain and of the mean over the earlier "
            "domains; 95% t-interval; a win only when it excludes 0.",
            "",
            "| new domain | budget | baseline | new domain: mean [95%] | verdict | "
            "earlier domains: mean [95%] | verdict |",
            "|---|---:|---|---|---|---|---|",
        ]
        for domain, by_budget in paired.items():
            for budget, by_name in by_budget.items():
                for name, e in by_name.items():
                    new, old = e["new"], e["earlier"]
                    lines.append(
                        f"| {domain} | {int(budget):,} | {name} | {_pct(new['mean'])} "
                        f"{_interval(new)} | {new['verdict']} | {_pct(old['mean'])} "
                        f"{_interval(old)} | {old['verdict']} |"
                    )
    return lines


def _timing_markdown(results: dict[str, Any]) -> list[str]:
    t = results.get("timings")
    if not t:
        return []
    lines = [
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in t["by_kind"].items()],
        f"| evaluation (this run) | {t['evaluate_s']:.1f} |",
        f"| other: loading, heatmaps, plots (this run) | {t['other_s']:.1f} |",
        f"| total wall (this run) | {t['wall_s']:.1f} |",
    ]
    if "study_s" in t:
        lines.append(f"| {_whole_study_label(t)} | {t['study_s']:.1f} |")
    return lines


def plot_curves(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> Path:
    """Validation loss against MoE training steps, one line per variant (mean over seeds, with
    the seeds' range shaded), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_seed in curves.items():
        runs = list(by_seed.values())
        steps = [p[0] for p in runs[0]]
        same = [r for r in runs if [p[0] for p in r] == steps]
        losses = [[r[i][1] for r in same] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in losses]
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=name)
        if len(same) > 1:
            ax.fill_between(steps, [min(v) for v in losses], [max(v) for v in losses],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_xlabel("MoE training step")
    ax.set_ylabel("validation loss (nats/token, mean over domains)")
    ax.set_title("validation loss during MoE training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def run_recipe(path: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Load a recipe and run it (see :class:`Study`)."""
    recipe = load_recipe(path)
    try:
        study = Study(recipe, console)  # checks across sections (expert sets, reference)
    except NexusError as exc:
        raise NexusError(f"{path}: {exc}") from None
    return study.run()
