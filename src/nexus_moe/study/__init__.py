"""``nexus-moe run RECIPE``: a study of upcycling and extension (docs/design.md §1, §10).

The package's parts, each usable on its own:

* :mod:`~nexus_moe.study.runner`: :class:`Study` runs a recipe's stages in order and scores
  every model, and :func:`run_recipe`;
* :mod:`~nexus_moe.study.stages`: :class:`Stages`, each stage (skipped when done) and the cached
  evaluations;
* :mod:`~nexus_moe.study.layout`: :class:`RunLayout`, where each stage's output lives in a run;
* :mod:`~nexus_moe.study.results`: :class:`Results`, the typed schema of ``scores.json``, and
  :func:`load_scores`;
* :mod:`~nexus_moe.study.stats`: paired intervals over seeds, the bounds, extension and
  convergence summaries;
* :mod:`~nexus_moe.study.report`: ``results.md`` (:func:`results_markdown`), the console tables,
  the loss-curve plot and :func:`write_report` (``nexus-moe report``).
"""

from nexus_moe.study.layout import RunLayout
from nexus_moe.study.report import (
    plot_curves,
    results_markdown,
    results_table,
    timing_table,
    write_report,
)
from nexus_moe.study.results import (
    APPENDED,
    Results,
    Scores,
    expert_label,
    extension_label,
    load_scores,
)
from nexus_moe.study.runner import Study, run_recipe, validation_curve
from nexus_moe.study.stages import Stages, tokens_per_step
from nexus_moe.study.stats import (
    convergence_summary,
    extension_summary,
    paired_interval,
    paired_summary,
    relative_differences,
    steps_to_reach,
    t_quantile_975,
)

__all__ = [
    "APPENDED",
    "Results",
    "RunLayout",
    "Scores",
    "Stages",
    "Study",
    "convergence_summary",
    "expert_label",
    "extension_label",
    "extension_summary",
    "load_scores",
    "paired_interval",
    "paired_summary",
    "plot_curves",
    "relative_differences",
    "results_markdown",
    "results_table",
    "run_recipe",
    "steps_to_reach",
    "t_quantile_975",
    "timing_table",
    "tokens_per_step",
    "validation_curve",
    "write_report",
]
