"""The study's statistics: paired intervals over seeds, the bounds, extension and convergence.

Variants are compared with the reference variant (``study.reference``) per seed, paired: the
relative difference (baseline - reference) / baseline, its mean and 95% t-interval over seeds; a
difference counts as a win (or loss) only when the interval excludes 0 (docs/design.md §10).
Every function reads a :class:`~nexus_moe.study.results.Results` and returns plain mappings, as
``scores.json`` stores them.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from nexus_moe.recipe import DEFAULT_EXPERT_SET
from nexus_moe.study.results import (
    BySeed,
    Curve,
    Interval,
    Results,
    expert_label,
    is_dense_bound,
    split_extension,
)

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


def paired_interval(values: list[float]) -> Interval:
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


def mean_ppl(by_seed: BySeed, domains: list[str]) -> dict[str, float]:
    """seed -> mean perplexity over ``domains`` (seeds scored on every one of them)."""
    return {
        s: statistics.fmean(scores[d]["perplexity"] for d in domains)
        for s, scores in by_seed.items()
        if all(d in scores for d in domains)
    }


# -- bounds ---------------------------------------------------------------------------------------
def bound_models(results: Results, probes: bool) -> dict[str, BySeed]:
    """The seed and the dense experts' scores; ``probes``: on the probes' tokens
    (``bounds_models``) where the run has those."""
    bounds = results.bounds_models or {}
    return bounds if probes and "seed" in bounds else results.models


def dense_own(results: Results, expert_set: str, probes: bool = False) -> dict[str, float]:
    """Each domain's dense expert (of ``expert_set``) on its own domain: domain -> perplexity."""
    models = bound_models(results, probes)
    return {
        d: models[expert_label(expert_set, d)]["0"][d]["perplexity"]
        for d in results.domains
        if expert_label(expert_set, d) in models
    }


def dense_bound(results: Results, expert_set: str, probes: bool = False) -> float | None:
    """Mean perplexity of the dense experts each on its own domain (None: one is missing)."""
    own = dense_own(results, expert_set, probes)
    if len(own) < len(results.domains):
        return None
    return statistics.fmean(own.values())


# -- paired differences ---------------------------------------------------------------------------
def paired_summary(results: Results) -> dict[str, Any]:
    """Reference vs every other variant, per stage (step 0, trained) and per extension budget."""
    ref = results.reference
    domains = results.domains
    out: dict[str, Any] = {"reference": ref, "upcycling": {}, "extension": {}}
    for key, table in (("step0", results.step0), ("trained", results.models)):
        if ref not in table:
            continue
        ref_ppl = mean_ppl(table[ref], domains)
        for name, by_seed in table.items():
            if name == ref or is_dense_bound(name):
                continue
            diffs = relative_differences(ref_ppl, mean_ppl(by_seed, domains))
            if diffs:
                out["upcycling"].setdefault(key, {})[name] = paired_interval(diffs)
    extension = results.extension
    for key, by_budget in extension.items():
        name, domain = split_extension(key)
        if name != ref:
            continue
        for other_key, other in extension.items():
            other_name, other_domain = split_extension(other_key)
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


# -- extension ------------------------------------------------------------------------------------
def extension_summary(results: Results) -> dict[str, Any]:
    """Per extension, budget and seed: the new expert's share, the share of the new domain's
    gap closed and the earlier domains' change, each against the same seed's MoE before the
    extension.

    Gap recovered = (ln ppl_before - ln ppl_after) / (ln ppl_before - ln ppl_dense) on the new
    domain, where ppl_dense is the new dense expert on its own domain; log perplexities are
    bits/byte up to the same factor on the same text, so this is also the bits/byte gap.
    Earlier change = mean earlier-domain perplexity after / before - 1.
    """
    domains = results.domains
    models = results.models
    out: dict[str, Any] = {}
    for key, by_budget in results.extension.items():
        label, domain = split_extension(key)
        name = results.extension_models.get(label, label)
        before = models.get(name, {})
        # The earlier domains before extension, on the tokens the extended models were scored on.
        before_old = results.extension_before.get(name, before)
        expert_set = results.variants.get(name, {}).get("experts", DEFAULT_EXPERT_SET)
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


# -- convergence ----------------------------------------------------------------------------------
def steps_to_reach(curve: Curve, target: float) -> float | None:
    """First step at which ``curve`` reaches ``target`` (linear between evaluations)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:], strict=False):
        if l0 <= target:
            return float(s0)
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return float(curve[-1][0]) if curve and curve[-1][1] <= target else None


def convergence_summary(results: Results) -> dict[str, Any]:
    """Steps each router needs to reach the same validation loss, per seed.

    Compared: the trained MoE variants built like the reference (same expert set and training
    length) whose methods differ only by router (``MethodRules.router_only``: moe-linear, nexus,
    nexus-paper; with or without AC). The target per seed is the highest final validation loss
    among them, so every one reaches it.
    """
    from nexus_moe.config import Method

    ref = results.reference
    info = results.variants
    curves = results.curves
    if ref not in curves:
        return {}
    ref_info = info[ref]
    group = [
        name
        for name, v in info.items()
        if name in curves
        and Method(v["method"]).rules.router_only
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
