"""The results of a study: a typed schema of ``scores.json`` and its reader.

:class:`Results` is what the runner fills, what the statistics and the report read, and what
``results/scores.json`` holds (as ``{"recipe": ..., **Results.to_dict()}``)::

    from nexus_moe.study.layout import RunLayout
    from nexus_moe.study.results import load_scores

    results = load_scores(RunLayout("runs/paper-small").scores_json)
    results.models["nexus"]["0"]["code"]["perplexity"]    # model -> seed -> domain -> metric

Seeds, budgets and corruption shares are string keys (as JSON has them); every mapping keeps the
order the study wrote it in, which is the order of every table in the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from nexus_moe.errors import NexusError
from nexus_moe.io_utils import read_json
from nexus_moe.recipe import DEFAULT_EXPERT_SET

APPENDED = "(appended row)"  # label suffix of the linear baseline that keeps its trained rows


class Metrics(TypedDict):
    """One domain's validation scores (:func:`nexus_moe.evaluate.scores_to_dict`)."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int


Scores = dict[str, Metrics]  # domain (and "mean") -> metrics: one model, one seed
BySeed = dict[str, Scores]  # seed -> scores
Curve = list[list[float]]  # [[step, mean validation loss], ...]


class VariantInfo(TypedDict):
    method: str
    experts: str  # the expert set
    router: str | None  # None: a dense merge
    train_tokens: int


class Corrupted(TypedDict):
    scores: Scores
    clean_loss: float  # the same model's mean loss on the same clean tokens


class Extended(TypedDict):
    scores: Scores  # earlier domains and the new one
    new_expert_share: float  # the new domain's tokens routed to the new expert (top-1)


class Interval(TypedDict):
    """:func:`nexus_moe.study.stats.paired_interval`: per-seed differences, mean, 95% interval."""

    n: int
    values: list[float]
    mean: float
    low: float | None  # None with one seed
    high: float | None
    verdict: str


class ExtensionRow(TypedDict):
    share: float
    gap_recovered: float | None
    earlier_change: float


class Timings(TypedDict, total=False):
    stages: dict[str, float]
    ran_now: list[str]
    by_kind: dict[str, float]
    evaluate_s: float
    stages_total_s: float
    other_s: float
    wall_s: float
    evaluations_cached: int
    study_s: float


def _routing_share() -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    return {"step0": {}, "trained": {}}


@dataclass
class Results:
    """Every score of a study; field order is the key order of ``scores.json``."""

    domains: list[str]  # the training domains
    heldout: list[str] = field(default_factory=list)  # extension domains
    reference: str = "nexus"  # the variant the others are compared with
    expert_sets: list[str] = field(default_factory=lambda: [DEFAULT_EXPERT_SET])
    variants: dict[str, VariantInfo] = field(default_factory=dict)
    # Trained (final) models, the seed ("seed") and the dense experts (expert_label): name ->
    # seed -> scores; the dense models have the one seed "0".
    models: dict[str, BySeed] = field(default_factory=dict)
    step0: dict[str, BySeed] = field(default_factory=dict)  # MoEs right after upcycling
    oracle: dict[str, BySeed] = field(default_factory=dict)  # trained MoEs, oracle routing
    oracle_step0: dict[str, BySeed] = field(default_factory=dict)
    random: dict[str, BySeed] = field(default_factory=dict)  # trained MoEs, random routing
    corrupted: dict[str, dict[str, dict[str, Corrupted]]] = field(default_factory=dict)  # share
    # "step0"/"trained" -> name -> seed -> domain -> share of its tokens to its own expert
    routing_share: dict[str, dict[str, dict[str, dict[str, float | None]]]] = field(
        default_factory=_routing_share
    )
    curves: dict[str, dict[str, Curve]] = field(default_factory=dict)  # name -> seed -> curve
    # "<label>+<domain>" -> budget -> seed -> scores and share (extension_label)
    extension: dict[str, dict[str, dict[str, Extended]]] = field(default_factory=dict)
    extension_models: dict[str, str] = field(default_factory=dict)  # label -> variant it extends
    # variant -> seed -> the earlier domains' scores before extension, on the tokens the extended
    # models' earlier domains are scored on (extend.earlier_tokens)
    extension_before: dict[str, BySeed] = field(default_factory=dict)
    bounds_models: dict[str, BySeed] = field(default_factory=dict)  # on the probes' tokens
    # Derived by nexus_moe.study.stats once every score is in (None until then):
    paired: dict[str, Any] | None = None  # paired_summary
    extension_summary: dict[str, dict[str, dict[str, ExtensionRow]]] | None = None
    convergence: dict[str, Any] | None = None  # convergence_summary
    timings: Timings | None = None  # seconds per stage and kind of stage (the runner)

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping ``scores.json`` holds (without the recipe); derived fields that
        are not yet computed are left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in _DERIVED:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "scores") -> Results:
        """Results from a ``scores.json`` mapping (its ``recipe`` and unknown keys are ignored);
        a missing or mistyped field is a NexusError naming ``source`` and the field."""
        if not isinstance(doc, dict):
            raise NexusError(f"{source}: expected a JSON object of study results")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in doc:
                if f.name in _REQUIRED:
                    raise NexusError(
                        f"{source}: no '{f.name}'; not a study's scores.json (written by "
                        "nexus-moe run into <workdir>/results/)"
                    )
                continue
            value = doc[f.name]
            kind = _KINDS.get(f.name, dict)
            if not (value is None and f.name in _DERIVED) and not isinstance(value, kind):
                raise NexusError(
                    f"{source}: '{f.name}' is a {type(value).__name__}, expected a "
                    f"{'list' if kind is list else 'string' if kind is str else 'mapping'}; "
                    "the file is not a study's scores.json"
                )
            values[f.name] = value
        results = cls(**values)
        seed = results.models.get("seed", {}).get("0")
        if not isinstance(seed, dict) or any(d not in seed for d in results.domains):
            raise NexusError(
                f"{source}: models.seed has no scores of seed '0' on every domain; "
                "the study did not finish (rerun nexus-moe run to complete it)"
            )
        return results


_REQUIRED = ("domains", "models")
_DERIVED = ("paired", "extension_summary", "convergence", "timings")
_KINDS: dict[str, type] = {"domains": list, "heldout": list, "expert_sets": list, "reference": str}


def load_scores(path: str | Path) -> Results:
    """Read a study's ``results/scores.json`` (see :class:`Results`)."""
    return Results.from_dict(read_json(path), str(path))


def expert_label(expert_set: str, domain: str) -> str:
    """Results key of a dense expert: ``expert:<domain>``, ``expert[<set>]:<domain>``."""
    return (
        f"expert:{domain}" if expert_set == DEFAULT_EXPERT_SET else f"expert[{expert_set}]:{domain}"
    )


def is_dense_bound(name: str) -> bool:
    """True for the models that are bounds, not variants: the seed and the dense experts."""
    return name == "seed" or name.startswith(("expert:", "expert["))


def extension_label(name: str, appended: bool = False) -> str:
    """The results' name of variant ``name`` extended (``appended``: the appended-row baseline)."""
    return f"{name} {APPENDED}" if appended else name


def split_extension(key: str) -> tuple[str, str]:
    """``"<label>+<domain>"`` -> (label, domain); labels may hold "+" (domain names do not)."""
    label, domain = key.rsplit("+", 1)
    return label, domain
