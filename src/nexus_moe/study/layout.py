"""Where a study keeps each stage's output: one place for every path under a run's work directory.

Work directory layout::

    corpus/  tokenizer/  seed/  experts/<domain>/  experts-<set>/<domain>/  domain_embeddings/
    s<seed>/moe/<variant>/{upcycled,trained}/
    s<seed>/extend/<variant>[-append]-<domain>/{extended,ft<budget>}/
    s<seed>/routing/                      (routing reports of the seeds after the first)
    results/  results.md, scores.json, loss-curves.png, routing-*.png / .json

A stage folder holds ``stage.json`` (its fingerprint); a trained model is the ``model/``
subfolder of its stage folder. Scripts that read a run (benchmarks/) take their paths from here::

    layout = RunLayout(recipe.workdir)
    layout.trained_model("nexus", seed=0)   # runs/paper-small/s0/moe/nexus/trained/model
    layout.expert_model("code", "ffn")      # runs/paper-small/experts-ffn/code/model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nexus_moe.checkpoint import TOKENIZER_FILE
from nexus_moe.recipe import DEFAULT_EXPERT_SET

MODEL = "model"  # a training stage's final checkpoint, inside its stage folder


@dataclass(frozen=True)
class RunLayout:
    """The paths of a study's stages under ``workdir`` (nothing is created or read)."""

    workdir: Path

    def __init__(self, workdir: str | Path) -> None:
        object.__setattr__(self, "workdir", Path(workdir))

    # -- data and dense models -------------------------------------------------------------------
    @property
    def corpus(self) -> Path:
        return self.workdir / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer stage (unused when the recipe names ``tokenizer.path``)."""
        return self.workdir / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer file the tokenizer stage writes."""
        return self.tokenizer_dir / TOKENIZER_FILE

    @property
    def seed(self) -> Path:
        """The seed's stage folder (its checkpoint: :attr:`seed_model`)."""
        return self.workdir / "seed"

    @property
    def seed_model(self) -> Path:
        return self.seed / MODEL

    def experts(self, expert_set: str = DEFAULT_EXPERT_SET) -> Path:
        """The folder of an expert set's dense experts: ``experts/`` or ``experts-<set>/``."""
        default = expert_set == DEFAULT_EXPERT_SET
        return self.workdir / ("experts" if default else f"experts-{expert_set}")

    def expert(self, domain: str, expert_set: str = DEFAULT_EXPERT_SET) -> Path:
        """The branch stage folder of ``domain``'s dense expert."""
        return self.experts(expert_set) / domain

    def expert_model(self, domain: str, expert_set: str = DEFAULT_EXPERT_SET) -> Path:
        return self.expert(domain, expert_set) / MODEL

    @property
    def domain_embeddings(self) -> Path:
        return self.workdir / "domain_embeddings"

    # -- MoEs ------------------------------------------------------------------------------------
    def seed_dir(self, seed: int | str) -> Path:
        """Everything built for one training seed: ``s<seed>/``."""
        return self.workdir / f"s{seed}"

    def moe(self, variant: str, seed: int | str) -> Path:
        return self.seed_dir(seed) / "moe" / variant

    def upcycled(self, variant: str, seed: int | str) -> Path:
        """The MoE right after upcycling (a checkpoint and a stage folder in one)."""
        return self.moe(variant, seed) / "upcycled"

    def trained(self, variant: str, seed: int | str) -> Path:
        """The MoE training stage folder (its checkpoint: :meth:`trained_model`)."""
        return self.moe(variant, seed) / "trained"

    def trained_model(self, variant: str, seed: int | str) -> Path:
        return self.trained(variant, seed) / MODEL

    def final_model(self, variant: str, seed: int | str, trains: bool = True) -> Path:
        """The variant's final checkpoint: trained, or as upcycled when it is not trained."""
        return self.trained_model(variant, seed) if trains else self.upcycled(variant, seed)

    # -- extension -------------------------------------------------------------------------------
    def extension(self, variant: str, domain: str, seed: int | str, appended: bool = False) -> Path:
        """Variant ``variant`` extended with ``domain`` (``appended``: the appended-row baseline)."""
        folder = f"{variant}-append" if appended else variant
        return self.seed_dir(seed) / "extend" / f"{folder}-{domain}"

    def extended(self, variant: str, domain: str, seed: int | str, appended: bool = False) -> Path:
        """The extended MoE before finetuning (a checkpoint and a stage folder in one)."""
        return self.extension(variant, domain, seed, appended) / "extended"

    def finetuned(
        self, variant: str, domain: str, seed: int | str, budget: int, appended: bool = False
    ) -> Path:
        """The finetuning stage folder at ``budget`` tokens (its checkpoint: ``/model``)."""
        return self.extension(variant, domain, seed, appended) / f"ft{budget}"

    # -- results ---------------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        return self.workdir / "results"

    @property
    def scores_json(self) -> Path:
        """Every raw per-seed score (read it with :func:`nexus_moe.study.results.load_scores`)."""
        return self.results / "scores.json"

    @property
    def results_md(self) -> Path:
        return self.results / "results.md"

    @property
    def loss_curves(self) -> Path:
        return self.results / "loss-curves.png"

    def routing_dir(self, seed: int | str, first: bool) -> Path:
        """Where the routing reports of seed ``seed`` go: results/ for the first seed."""
        return self.results if first else self.seed_dir(seed) / "routing"
