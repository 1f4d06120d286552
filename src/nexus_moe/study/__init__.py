"""``nexus-moe run RECIPE``: the study (moved to :mod:`nexus_moe.study.runner`; being split)."""

from nexus_moe.study.runner import *  # noqa: F403
from nexus_moe.study.runner import _dense_bound, _interval  # noqa: F401 (benchmarks use them)
