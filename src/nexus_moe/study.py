"""``nexus-moe run RECIPE``: every stage of a study in order, each skipped when done (SPEC §1).

Work directory layout::

    corpus/  tokenizer/  seed/  experts/<domain>/  results/
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.config import to_dict
from nexus_moe.evaluate import evaluate_domains, scores_to_dict
from nexus_moe.io_utils import atomic_path, write_json
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


class Study:
    """Runs a recipe's stages; each ``stage_*`` method returns its output directory."""

    def __init__(self, recipe: Recipe, console: Console | None = None) -> None:
        self.recipe = recipe
        self.console = console or Console()
        self.workdir = Path(recipe.workdir)
        self.device = resolve_device(recipe.device)
        self.timings: dict[str, float] = {}

    def _stage(self, name: str, out_dir: Path, key: str, build) -> Path:
        if stage_done(out_dir, key):
            self.console.print(f"[dim]- {name}: done, skipped ({out_dir})[/]")
            return out_dir
        self.console.rule(f"{name}")
        start = time.perf_counter()
        build()
        mark_done(out_dir, key, stage=name)
        self.timings[name] = time.perf_counter() - start
        self.console.print(f"[green]{name}[/] finished in {self.timings[name]:.1f}s")
        return out_dir

    # -- stages ---------------------------------------------------------------------------------
    def stage_corpus(self) -> Path:
        from nexus_moe.corpus import build_corpus

        c = self.recipe.corpus
        out = self.workdir / "corpus"
        domains = c.domains + [d for d in c.heldout if d not in c.domains]
        key = fingerprint(c, self.recipe.seed)
        self._stage(
            "corpus",
            out,
            key,
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

    def available_domains(self, corpus_dir: Path) -> list[str]:
        from nexus_moe.corpus import load_manifest

        built = load_manifest(corpus_dir)["domains"]
        missing = [d for d in self.recipe.corpus.domains if d not in built]
        if missing:
            self.console.print(f"[yellow]warning:[/] domains not built, left out: {missing}")
        return [d for d in self.recipe.corpus.domains if d in built]

    def stage_tokenizer(self, corpus_dir: Path) -> Path:
        from nexus_moe.tokenizer import train_tokenizer

        t = self.recipe.tokenizer
        out = self.workdir / "tokenizer"
        key = fingerprint(t, stage_key(corpus_dir))
        if t.path is not None:
            return Path(t.path)
        self._stage(
            "tokenizer",
            out,
            key,
            lambda: train_tokenizer(
                corpus_dir,
                out / TOKENIZER_FILE,
                vocab_size=t.vocab_size,
                domains=self.available_domains(corpus_dir),
            ),
        )
        return out / TOKENIZER_FILE

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
            ),
        )
        return out / "model"

    def stage_embed(self, corpus_dir: Path, domains: list[str]) -> Path:
        from nexus_moe.embed import embed_domains

        e = self.recipe.embed
        out = self.workdir / "domain_embeddings"
        key = fingerprint(e, stage_key(corpus_dir), domains, self.recipe.seed)

        def build() -> None:
            embeddings = embed_domains(
                corpus_dir,
                domains,
                embedder=e.embedder,
                num_chunks=e.num_chunks,
                chunk_chars=e.chunk_chars,
                seed=self.recipe.seed,
                device="cuda" if self.device.type == "cuda" else "cpu",
            )
            embeddings.save(out)

        self._stage("embed-domains", out, key, build)
        return out

    def stage_upcycle(
        self, variant: MoEVariant, seed_dir: Path, experts: dict[str, Path], embeddings: Path
    ) -> Path:
        from nexus_moe.embed import DomainEmbeddings
        from nexus_moe.upcycle import upcycle

        out = self.workdir / "moe" / variant.name / "upcycled"
        overrides = {**self.recipe.moe.overrides, **variant.moe}
        key = fingerprint(
            variant,
            overrides,
            stage_key(seed_dir.parent),
            [stage_key(p.parent) for p in experts.values()],
            stage_key(embeddings),
        )
        expert_dirs = [] if variant.method == "sparse-upcycle" else list(experts.values())
        self._stage(
            f"upcycle:{variant.name}",
            out,
            key,
            lambda: upcycle(
                variant.method,
                seed_dir,
                expert_dirs,
                out,
                domain_embeddings=DomainEmbeddings.load(embeddings),
                num_experts=len(experts) if variant.method == "sparse-upcycle" else None,
                moe_overrides=overrides or None,
                seed=self.recipe.seed,
            ),
        )
        return out

    def stage_moe_train(
        self, variant: MoEVariant, upcycled: Path, corpus_dir: Path, domains: list[str]
    ) -> Path:
        if not variant.train:
            return upcycled
        out = self.workdir / "moe" / variant.name / "trained"
        key = fingerprint(self.recipe.moe.train, stage_key(upcycled), domains)

        def build() -> None:
            model, meta = load_checkpoint(upcycled)
            train_model(
                model,
                corpus_dir,
                upcycled / TOKENIZER_FILE,
                domains,
                self.recipe.moe.train,
                out,
                metadata={**meta, "stage": "moe-train", "variant": variant.name},
                device=self.device,
            )

        self._stage(f"train:{variant.name}", out, key, build)
        return out / "model"

    def evaluate_models(
        self, models: dict[str, Path], corpus_dir: Path, domains: list[str]
    ) -> dict[str, dict[str, dict[str, float]]]:
        results = {}
        for name, ckpt in models.items():
            model, _ = load_checkpoint(ckpt, device=str(self.device))
            shards = tokens_for(corpus_dir, ckpt / TOKENIZER_FILE)
            results[name] = scores_to_dict(
                evaluate_domains(model, shards, domains, self.recipe.evaluate, device=self.device)
            )
        return results

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> dict:
        corpus_dir = self.stage_corpus()
        domains = self.available_domains(corpus_dir)
        tokenizer = self.stage_tokenizer(corpus_dir)
        seed = self.stage_seed(corpus_dir, tokenizer, domains)
        experts = {d: self.stage_branch(seed, corpus_dir, d) for d in domains}
        models = {"seed": seed, **{f"expert:{d}": p for d, p in experts.items()}}
        if self.recipe.moe.variants:
            embeddings = self.stage_embed(corpus_dir, domains)
            for variant in self.recipe.moe.variants:
                upcycled = self.stage_upcycle(variant, seed, experts, embeddings)
                models[variant.name] = self.stage_moe_train(variant, upcycled, corpus_dir, domains)
        results = self.evaluate_models(models, corpus_dir, domains)
        self.write_results(results, domains)
        return results

    def write_results(self, results: dict, domains: list[str]) -> None:
        from nexus_moe.cli import score_table

        out = self.workdir / "results"
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", {"recipe": to_dict(self.recipe), "scores": results})
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(markdown_table(results, domains, "perplexity"))
        self.console.print(score_table("validation perplexity", results, "perplexity"))
        seed_scores = results.get("seed")
        if seed_scores:
            for d in domains:
                expert = results.get(f"expert:{d}")
                if expert:
                    better = expert[d]["perplexity"] < seed_scores[d]["perplexity"]
                    mark = "[green]beats[/]" if better else "[red]does not beat[/]"
                    self.console.print(
                        f"expert:{d} {mark} the seed on {d}: "
                        f"{expert[d]['perplexity']:.2f} vs {seed_scores[d]['perplexity']:.2f}"
                    )
        self.console.print(f"results written to {out}")


def markdown_table(results: dict, domains: list[str], metric: str) -> str:
    """Rows = models, columns = domains + mean; the best value per column in bold."""
    cols = domains + ["mean"]
    lines = [
        f"| model | {' | '.join(cols)} |",
        "|---|" + "---:|" * len(cols),
    ]
    best = {c: min((r[c][metric] for r in results.values() if c in r), default=None) for c in cols}
    for name, scores in results.items():
        cells = []
        for c in cols:
            if c not in scores:
                cells.append("-")
                continue
            value = scores[c][metric]
            cells.append(f"**{value:.2f}**" if value == best[c] else f"{value:.2f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def run_recipe(path: str | Path, console: Console | None = None) -> dict:
    """Load a recipe and run it (see :class:`Study`)."""
    return Study(load_recipe(path), console).run()
