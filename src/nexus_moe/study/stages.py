"""The stages of a study (docs/design.md §1, §10), each skipped when its output is done.

Each stage writes ``stage.json`` with a fingerprint of its config and inputs (and its wall time)
into its folder (:class:`~nexus_moe.study.layout.RunLayout`); a stage whose output carries the
same fingerprint is skipped, so an interrupted study resumes where it stopped. Evaluations are
cached the same way (``eval-*.json`` next to each model). The order of the stages and what is
scored is :class:`~nexus_moe.study.runner.Study`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint, load_config, weights_hash
from nexus_moe.evaluate import EvalConfig, evaluate_domains, scores_to_dict
from nexus_moe.io_utils import STAGE_FILE, file_sha256, read_json, write_json
from nexus_moe.pipeline import (
    branch_expert,
    fingerprint,
    mark_done,
    pretrain_seed,
    resolve_device,
    stage_done,
    stage_key,
    tokens_for,
    train_model,
)
from nexus_moe.recipe import (
    DEFAULT_EXPERT_SET,
    MoEVariant,
    Recipe,
    check_recipe,
    expert_set_configs,
)
from nexus_moe.study.layout import RunLayout
from nexus_moe.study.results import (
    Results,
    Scores,
)
from nexus_moe.train import TrainConfig


def tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum


def _default_row_scale(moe_dir: Path) -> float:
    """The norm factor ``extend`` gives a calibrated new row of this MoE by default."""
    from nexus_moe import config

    cfg, _ = load_config(moe_dir)
    return config.new_row_scale(cfg.moe.router_context if cfg.moe is not None else 0.0)


def _statistics_defaults() -> list[Any]:
    """The code's defaults that shape the routing statistics a calibrated MoE carries (and that
    training refreshes), as stage-key inputs: an MoE upcycled when fewer windows were kept is
    made again, not extended against them."""
    from nexus_moe import calibrate, config

    return [
        config.DEFAULT_CALIBRATION_TOKENS,
        calibrate.CALIBRATION_SEQ_LEN,
        calibrate.HELD_WINDOWS,
        calibrate.DEFAULT_RIDGE,
    ]


def _calibration_defaults(trained: Path) -> list[Any]:
    """The code's defaults a calibrated extension depends on, as stage-key inputs: the default
    norms of a calibrated new row for this MoE, and the default bound on the earlier domains'
    loss (placement.place_new_rows)."""
    from nexus_moe import calibrate, config, placement

    return [
        _default_row_scale(trained),
        config.REFIT_ROW_SCALE,
        "placed on held windows, at most the fixed norm, upper bounds over the windows",
        config.LOSS_BUDGET,
        config.MEAN_LOSS_BUDGET,
        config.HELD_CONFIDENCE,
        placement._CARRIER_SPREAD,
        calibrate.HELD_WINDOWS,
        placement._NORM_GRID.tolist(),
        placement._BIAS_GRID.tolist(),
    ]


class Stages:
    """A recipe's stages, each skipped when done; each ``stage_*`` method returns its output
    directory. Evaluations are cached next to the model they score (:meth:`evaluation`)."""

    def __init__(self, recipe: Recipe, console: Console | None = None) -> None:
        check_recipe(recipe)  # a recipe built in code is checked as a loaded one is
        self.recipe = recipe
        self.console = console or Console()
        self.workdir = Path(recipe.workdir)
        self.layout = RunLayout(self.workdir)
        self.device = resolve_device(recipe.device)
        self.timings: dict[str, float] = {}  # seconds of the stages run in this invocation
        self.earlier: dict[str, float] = {}  # seconds recorded by skipped stages' earlier runs
        self.eval_seconds = 0.0  # evaluations computed (not read from cache) in this invocation
        self.evals_cached = 0  # evaluations an earlier run wrote (their time is not known here)
        self.evals_written: set[Path] = set()  # evaluation caches written by this invocation
        self.ran: list[str] = []  # stages actually run (not skipped) in this invocation
        self.sets = expert_set_configs(recipe)  # branch_train of each expert set
        self.results: Results | None = None  # filled by run()

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

    # -- data -----------------------------------------------------------------------------------
    def stage_corpus(self) -> Path:
        from nexus_moe.corpus import build_corpus

        c = self.recipe.corpus
        out = self.layout.corpus
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
        out = self.layout.tokenizer_dir
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
        out = self.layout.seed
        key = fingerprint(
            self.recipe.model,
            self.recipe.seed_train,
            stage_key(corpus_dir),
            file_sha256(tokenizer)[:16],
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
        out = self.layout.expert(domain, expert_set)
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
        out = self.layout.domain_embeddings
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
        from nexus_moe.routers.peers import reads_text
        from nexus_moe.upcycle import method_defaults, upcycle

        out = self.layout.upcycled(variant.name, seed)
        # Shared overrides apply to MoE variants; a dense merge (btm) takes none.
        shared = {} if variant.produces_dense else self.recipe.moe.overrides
        overrides = {**shared, **variant.moe}
        sparse = variant.copies_seed
        peer = variant.router_init != "nexus"  # a training-free peer places the rows (§5.8)
        # reads the corpus: nexus's calibration, or every peer but Arrow
        calibrates = reads_text(variant.router_init) if peer else variant.kind.calibrates_by_default
        key = fingerprint(
            [variant.method, variant.moe, *([variant.router_init] if peer else [])],
            method_defaults(variant.kind),  # a changed default makes a new MoE
            overrides,
            seed,
            stage_key(seed_dir.parent),
            [] if sparse else [stage_key(p.parent) for p in experts.values()],
            stage_key(embeddings),
            stage_key(corpus_dir) if calibrates else None,
            _statistics_defaults() if calibrates else None,
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
                domain_embeddings=None if peer else DomainEmbeddings.load(embeddings),
                num_experts=len(experts) if sparse else None,
                moe_overrides=overrides or None,
                seed=seed,
                calibration_shards=(
                    tokens_for(corpus_dir, seed_dir / TOKENIZER_FILE) if calibrates else None
                ),
                router_init=variant.router_init,
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
        from nexus_moe.calibrate import STATS_FILE
        from nexus_moe.embed import DomainEmbeddings
        from nexus_moe.extend import extend

        if reset is None:
            reset = self.recipe.extend.reset_linear_router
        calibrates = (trained / STATS_FILE).is_file()  # reads the corpus
        key = self._extend_key(trained, new_expert, domain, embeddings, corpus_dir, seed, reset)

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

    def _extend_key(
        self,
        trained: Path,
        new_expert: Path,
        domain: str,
        embeddings: Path,
        corpus_dir: Path,
        seed: int,
        reset: bool,
    ) -> str:
        """The extension stage's fingerprint (:meth:`stage_extend`)."""
        from nexus_moe.calibrate import STATS_FILE

        calibrates = (trained / STATS_FILE).is_file()  # reads the corpus
        return fingerprint(
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
            *(_calibration_defaults(trained) if calibrates else []),
        )

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
        return write_routing_report(report, out or self.layout.results, name)

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
