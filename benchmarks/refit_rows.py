"""Zero-shot extension of the study's trained Nexus MoEs: earlier rows refit or kept, and the new
row's norm.

Takes a finished study (`make paper`) and, for each seed and held-out domain, extends the trained
`nexus` MoE with that domain's FFN-only expert (calibrated row from the domain's text, no training
step) under each rule given as `refit@SCALE` (the earlier experts' rows refit among all the
domains, `extend --refit-rows`) or `keep@SCALE` (`extend --keep-rows`, the default), SCALE being
the new row's norm relative to the earlier rows' (`extend --row-scale`). Printed per seed, as the
study measures them: the share of the new domain's tokens on the new expert (mean over MoE
layers), the share of the gap between the MoE before extension and the new dense expert that the
extension closes (log perplexity, i.e. bits/byte), and the change of the earlier domains' mean
perplexity (scored on the same tokens before and after). Compare rules at equal cost to the
earlier domains: a larger norm buys share there too.

    .venv/bin/python benchmarks/refit_rows.py --study runs/paper-small \
        --rules keep@1.0 keep@1.1 refit@0.8 refit@0.9
"""

from __future__ import annotations

import argparse

from leak_budget import add_study_arguments, measure, start, table  # the study's zero-shot


def parse_rule(text: str) -> dict:
    """``refit@0.8`` / ``keep@0.9`` -> the keyword arguments of :func:`nexus_moe.extend.extend`."""
    kind, _, scale = text.partition("@")
    if kind not in ("refit", "keep") or not scale:
        raise SystemExit(f"rule '{text}': write refit@SCALE or keep@SCALE, e.g. refit@0.8")
    return {"refit_rows": kind == "refit", "row_scale": float(scale)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    parser.add_argument("--domains", nargs="+", default=None, help="default: the study's heldout")
    parser.add_argument("--rules", nargs="+", default=["keep@0.9", "refit@0.8", "refit@0.9"])
    args = parser.parse_args()
    ways = {text: parse_rule(text) for text in args.rules}
    start(args)

    rows = measure(args.study, args.seeds, args.domains, ways, args.new_tokens,
                   args.earlier_tokens)  # fmt: skip
    labels = {
        text: f"{'refit' if kw['refit_rows'] else 'kept'}, {kw['row_scale']:g}x"
        for text, kw in ways.items()
    }
    table(rows, labels, "earlier rows, new row's norm")


if __name__ == "__main__":
    main()
