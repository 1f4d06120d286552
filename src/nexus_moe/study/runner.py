"""``nexus-moe run RECIPE``: every stage of a study in order, then its statistics and report.

Every table carries its bounds, measured in the same run: the seed, the dense experts each on its
own domain, every MoE right after upcycling (step 0), and the trained MoEs under oracle routing
(every token to its domain's expert) and random routing. The stages are
:class:`~nexus_moe.study.stages.Stages`, the statistics :mod:`nexus_moe.study.stats`, the report
:mod:`nexus_moe.study.report`, and every raw per-seed score goes to ``scores.json``
(:class:`~nexus_moe.study.results.Results`).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from nexus_moe.checkpoint import load_config
from nexus_moe.config import to_dict
from nexus_moe.evaluate import EvalConfig
from nexus_moe.io_utils import atomic_path, write_json
from nexus_moe.recipe import DEFAULT_EXPERT_SET, MoEVariant, load_recipe
from nexus_moe.study.report import plot_curves, results_markdown, results_table, timing_table
from nexus_moe.study.results import (
    Curve,
    Results,
    Timings,
    expert_label,
    extension_label,
)
from nexus_moe.study.stages import Stages, tokens_per_step
from nexus_moe.study.stats import convergence_summary, extension_summary, paired_summary
from nexus_moe.train import METRICS_FILE


class Study(Stages):
    """Runs a recipe: :meth:`run` builds every stage in order and scores every model."""

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every stage, then the statistics and the report. Returns ``Results.to_dict()``; the
        typed results are :attr:`results`."""
        r = self.recipe
        started = time.perf_counter()
        corpus_dir = self.stage_corpus()
        domains = self.built_domains(corpus_dir, r.corpus.domains)
        heldout = self.built_domains(corpus_dir, r.extend.domains or r.corpus.heldout)
        heldout = [d for d in heldout if d not in domains]
        tokenizer = self.stage_tokenizer(corpus_dir, domains)
        seed_model = self.stage_seed(corpus_dir, tokenizer, domains)
        used_sets = [DEFAULT_EXPERT_SET] + sorted(
            {v.experts for v in r.moe.variants} - {DEFAULT_EXPERT_SET}
        )
        experts = {
            s: {d: self.stage_branch(seed_model, corpus_dir, d, s) for d in domains}
            for s in used_sets
        }
        results = Results(domains, heldout, r.study.reference, used_sets)
        self.results = results
        self._score_dense(results, seed_model, experts, corpus_dir)
        if r.moe.variants:
            self._run_moes(results, seed_model, experts, corpus_dir)
        results.paired = paired_summary(results)
        results.extension_summary = extension_summary(results)
        results.convergence = convergence_summary(results)
        results.timings = self.timing_summary(time.perf_counter() - started)
        self.write_results(results)
        return results.to_dict()

    def _score_dense(
        self,
        results: Results,
        seed_model: Path,
        experts: dict[str, dict[str, Path]],
        corpus_dir: Path,
    ) -> None:
        """The bounds: the seed on every domain, each dense expert on its own domain (what a
        document-level router over the dense models gets), and both on the probes' tokens."""
        domains = results.domains
        models = results.models
        models["seed"] = {"0": self.scores(seed_model, corpus_dir, domains + results.heldout)}
        for s, by_domain in experts.items():
            for d, path in by_domain.items():
                models[expert_label(s, d)] = {"0": self.scores(path, corpus_dir, [d])}
        # The same bounds on the probes' tokens (step 0, oracle, random), so that those tables
        # compare every model on the same text.
        probe = self.bounds_config()
        if probe == self.recipe.evaluate:
            return
        bounds = results.bounds_models
        bounds["seed"] = {
            "0": self.evaluation(seed_model, corpus_dir, domains, cfg=probe)["scores"]
        }
        for s, by_domain in experts.items():
            for d, path in by_domain.items():
                ev = self.evaluation(path, corpus_dir, [d], cfg=probe)
                bounds[expert_label(s, d)] = {"0": ev["scores"]}

    def _run_moes(
        self,
        results: Results,
        seed_model: Path,
        experts: dict[str, dict[str, Path]],
        corpus_dir: Path,
    ) -> None:
        """The held-out domains' dense experts, then per seed every variant and its extensions."""
        r = self.recipe
        domains, heldout = results.domains, results.heldout
        all_domains = domains + heldout
        ext_sets = {v.experts for v in r.moe.variants if v.name in r.extend.variants}
        new_experts = {
            s: {d: self.stage_branch(seed_model, corpus_dir, d, s) for d in heldout}
            for s in results.expert_sets
            if s in ext_sets
        }
        for s, by_domain in new_experts.items():
            for d, path in by_domain.items():
                results.models[expert_label(s, d)] = {"0": self.scores(path, corpus_dir, [d])}
        embeddings = self.stage_embed(corpus_dir, all_domains)
        seeds = r.seeds or [r.seed]
        for seed in seeds:
            trained = {
                v.name: self.run_variant(
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
                for v in r.moe.variants
            }
            self._extend_variants(results, seed, trained, new_experts, embeddings, corpus_dir)

    def _extend_variants(
        self,
        results: Results,
        seed: int,
        trained: dict[str, Path],
        new_experts: dict[str, dict[str, Path]],
        embeddings: Path,
        corpus_dir: Path,
    ) -> None:
        """Every ``extend.variants`` MoE of ``seed`` extended with each held-out domain."""
        r = self.recipe
        for name in r.extend.variants:
            if name not in trained:
                continue
            v = next(v for v in r.moe.variants if v.name == name)
            # The appended-row baseline only where the main one re-initialises.
            appends = [False]
            if (
                results.variants[name]["router"] == "linear"
                and r.extend.append_linear_baseline
                and r.extend.reset_linear_router
            ):
                appends.append(True)
            for appended in appends:
                results.extension_models[extension_label(name, appended)] = name
                for d in results.heldout:
                    self.run_extension(
                        name,
                        d,
                        seed,
                        trained[name],
                        new_experts[v.experts][d],
                        embeddings,
                        corpus_dir,
                        results.domains,
                        results,
                        appended=appended,
                    )

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
        results: Results,
    ) -> Path:
        """Upcycle, score at step 0, train, score with bounds; returns the final checkpoint."""
        upcycled = self.stage_upcycle(v, seed, seed_model, experts, embeddings, corpus_dir)
        info = results.variants.setdefault(
            v.name, {"method": v.method, "experts": v.experts, "router": None, "train_tokens": 0}
        )
        if not v.produces_dense:
            info["router"] = _router_name(upcycled)
            self._score_step0(v, seed, upcycled, corpus_dir, domains, results)
        final = upcycled
        if v.train:
            final = self._train_variant(v, seed, upcycled, corpus_dir, domains, results)
        # Held-out domains only where an extension needs the before-extension score.
        scored = all_domains if v.name in self.recipe.extend.variants else domains
        self._score_final(v, seed, seed == seeds[0], final, corpus_dir, domains, scored, results)
        return final

    def _score_step0(
        self,
        v: MoEVariant,
        seed: int,
        upcycled: Path,
        corpus_dir: Path,
        domains: list[str],
        results: Results,
    ) -> None:
        """The MoE right after upcycling: scores and routing share (and oracle routing)."""
        s = str(seed)
        probe = self.bounds_config()
        step0 = self.evaluation(upcycled, corpus_dir, domains, cfg=probe, route=True)
        results.step0.setdefault(v.name, {})[s] = step0["scores"]
        results.routing_share["step0"].setdefault(v.name, {})[s] = step0["routing"]["accuracy"]
        if (
            self.recipe.study.step0_oracle
        ):  # how good the composition is when routing is not at fault
            ev = self.evaluation(upcycled, corpus_dir, domains, cfg=probe, routing="oracle")
            if ev["scores"]:
                results.oracle_step0.setdefault(v.name, {})[s] = ev["scores"]

    def _train_variant(
        self,
        v: MoEVariant,
        seed: int,
        upcycled: Path,
        corpus_dir: Path,
        domains: list[str],
        results: Results,
    ) -> Path:
        """Train the upcycled MoE; records its training tokens and validation curve."""
        cfg = self.moe_train_config(v, seed, len(domains))
        results.variants[v.name]["train_tokens"] = cfg.steps * tokens_per_step(cfg)
        # The curve's step-0 point, scored as the trainer scores its evaluations.
        curve_cfg = EvalConfig(cfg.seq_len, cfg.batch_size, cfg.eval_tokens)
        start = self.evaluation(upcycled, corpus_dir, domains, cfg=curve_cfg)
        final = self.stage_train(
            f"train:{v.name}:s{seed}",
            upcycled,
            self.layout.trained(v.name, seed),
            corpus_dir,
            domains,
            cfg,
            {"stage": "moe-train", "variant": v.name},
        )
        curve = [[0, start["scores"]["mean"]["loss"]]]
        curve += validation_curve(final.parent / METRICS_FILE)
        results.curves.setdefault(v.name, {})[str(seed)] = curve
        return final

    def _score_final(
        self,
        v: MoEVariant,
        seed: int,
        first_seed: bool,
        final: Path,
        corpus_dir: Path,
        domains: list[str],
        scored: list[str],
        results: Results,
    ) -> None:
        """The final model on ``scored``, and on the probes: own, oracle, random, corrupted."""
        from nexus_moe.analyse import write_routing_report

        r, s = self.recipe, str(seed)
        is_moe = not v.produces_dense
        main = self.evaluation(final, corpus_dir, scored, route=is_moe)
        results.models.setdefault(v.name, {})[s] = main["scores"]
        if is_moe:
            results.routing_share["trained"].setdefault(v.name, {})[s] = main["routing"]["accuracy"]
            if first_seed:
                write_routing_report(main["routing"], self.layout.results, v.name)
        bounds = self.bounds_config()
        if bounds != r.evaluate and (r.study.bounds or r.study.corrupt):
            # The model's own routing on the probes' tokens: what oracle, random and corrupted
            # scores are compared with.
            own = self.evaluation(final, corpus_dir, domains, cfg=bounds)["scores"]
            results.bounds_models.setdefault(v.name, {})[s] = own
        if is_moe and r.study.bounds:
            for mode in ("oracle", "random"):
                ev = self.evaluation(
                    final, corpus_dir, domains, cfg=bounds, routing=mode, seed=seed
                )
                if ev["scores"]:  # oracle: none when no expert belongs to a domain
                    getattr(results, mode).setdefault(v.name, {})[s] = ev["scores"]
        if not r.study.corrupt:
            return
        if bounds == r.evaluate:  # the same tokens as the model's own scores
            clean_loss = statistics.fmean(main["scores"][d]["loss"] for d in domains)
        else:
            clean_loss = results.bounds_models[v.name][s]["mean"]["loss"]
        for share in r.study.corrupt:
            ev = self.evaluation(final, corpus_dir, domains, cfg=bounds, corrupt=share, seed=seed)
            results.corrupted.setdefault(v.name, {}).setdefault(str(share), {})[s] = {
                "scores": ev["scores"],
                "clean_loss": clean_loss,
            }

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
        results: Results,
        appended: bool = False,
    ) -> None:
        """Extend MoE ``name`` with the held-out ``domain``, finetune at each budget, score.

        Budget 0 (the extended model before any finetuning) is always scored. ``appended``: keep
        a linear router's trained rows and append one (the second linear baseline) instead of
        following ``extend.reset_linear_router``. The earlier domains are scored on
        ``extend.earlier_tokens`` per domain, and so is the MoE before extension
        (``results.extension_before``), so their change is paired on the same tokens.
        """
        r = self.recipe
        folder = f"{name}-append" if appended else name
        extended = self.stage_extend(
            trained,
            new_expert,
            domain,
            embeddings,
            self.layout.extended(name, domain, seed, appended),
            corpus_dir,
            seed,
            reset=False if appended else None,
        )
        earlier_cfg = self.earlier_config()
        if earlier_cfg != r.evaluate:  # else its own scores (results.models) are on them
            before = self.evaluation(trained, corpus_dir, domains, cfg=earlier_cfg)["scores"]
            results.extension_before.setdefault(name, {})[str(seed)] = before
        share = r.extend.new_domain_share
        weights = {domain: share, **{d: (1 - share) / len(domains) for d in domains}}
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
                    self.layout.finetuned(name, domain, seed, budget, appended),
                    corpus_dir,
                    domains + [domain],
                    cfg,
                    {"stage": "extend-finetune", "budget_tokens": steps * per_step},
                )
            self._score_extended(
                name, domain, seed, budget, model_dir, corpus_dir, domains, results, appended
            )

    def _score_extended(
        self,
        name: str,
        domain: str,
        seed: int,
        budget: int,
        model_dir: Path,
        corpus_dir: Path,
        domains: list[str],
        results: Results,
        appended: bool,
    ) -> None:
        """An extended model at one budget: scores, the new expert's share, a routing report."""
        from nexus_moe.analyse import merge_routing_reports, write_routing_report

        r = self.recipe
        label = extension_label(name, appended)
        folder = f"{name}-append" if appended else name
        entry = results.extension.setdefault(f"{label}+{domain}", {}).setdefault(str(budget), {})
        earlier_cfg = self.earlier_config()
        if earlier_cfg == r.evaluate:
            ev = self.evaluation(model_dir, corpus_dir, domains + [domain], route=True)
            scores, report = ev["scores"], ev["routing"]
        else:
            new = self.evaluation(model_dir, corpus_dir, [domain], route=True)
            old = self.evaluation(model_dir, corpus_dir, domains, cfg=earlier_cfg, route=True)
            scores = {d: old["scores"][d] for d in domains} | {domain: new["scores"][domain]}
            report = merge_routing_reports(old["routing"], new["routing"])
        first_seed = seed == (r.seeds or [r.seed])[0]
        out = self.layout.routing_dir(seed, first_seed)
        write_routing_report(report, out, f"{folder}+{domain}-ft{budget}")
        entry[str(seed)] = {
            "scores": scores,
            "new_expert_share": float(report["accuracy"][domain] or 0.0),
        }

    # -- reporting ------------------------------------------------------------------------------
    def timing_summary(self, wall: float) -> Timings:
        """Seconds per stage (run now, or recorded by the run that made a skipped stage), per
        kind of stage, evaluation time and this invocation's wall time."""
        stages = {**self.earlier, **self.timings}
        kinds: dict[str, float] = {}
        for name, seconds in stages.items():
            kind = name.split(":", 1)[0].split("[", 1)[0]
            kinds[kind] = kinds.get(kind, 0.0) + seconds
        # This run's wall time outside its stages and evaluations: loading, heatmaps, plots.
        other = max(0.0, wall - sum(self.timings.values()) - self.eval_seconds)
        # Recorded to the millisecond, as the stages' own seconds are, so that the figures add
        # up to the wall time (why: docs/design.md §10).
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

    def write_results(self, results: Results) -> None:
        """scores.json, results.md and the loss curves under results/, and a console summary."""
        out = self.layout.results
        out.mkdir(parents=True, exist_ok=True)
        write_json(self.layout.scores_json, {"recipe": to_dict(self.recipe), **results.to_dict()})
        if self.recipe.study.plot and results.curves:
            plot_curves(results.curves, self.layout.loss_curves)
        text = results_markdown(results)
        with atomic_path(self.layout.results_md) as tmp:
            tmp.write_text(text)
        self.console.print(results_table(results))
        seed = results.models["seed"]["0"]
        for d in results.domains:
            expert = results.models.get(f"expert:{d}", {}).get("0")
            if expert:
                ok = expert[d]["perplexity"] < seed[d]["perplexity"]
                verdict = "[green]beats[/]" if ok else "[red]does not beat[/]"
                self.console.print(
                    f"expert:{d} {verdict} the seed on {d}: "
                    f"{expert[d]['perplexity']:.2f} vs {seed[d]['perplexity']:.2f}"
                )
        assert results.timings is not None
        self.console.print(timing_table(results.timings))
        t = results.timings
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


def _router_name(moe_dir: Path) -> str:
    """The router of an upcycled MoE as the results name it: ``linear``, ``nexus``, ``ac(<base>)``."""
    cfg, _ = load_config(moe_dir)
    assert cfg.moe is not None
    if cfg.moe.router == "ac":
        return f"ac({cfg.moe.ac_base})"
    return str(cfg.moe.router)


def validation_curve(metrics: Path) -> Curve:
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


def run_recipe(path: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Load a recipe and run it (see :class:`Study`)."""
    return Study(load_recipe(path), console).run()  # the recipe is checked whole at load
