"""What a linear router could do for a new domain: the zero-shot row against a linear probe.

Takes a finished study (`make paper`) and, for each seed and held-out domain, the `nexus` MoE
extended zero-shot with that domain (`s<seed>/extend/nexus-<domain>/extended`). At every MoE
layer it collects what the router scores (the layer input mixed with its running mean, as the
model routes) for training and validation tokens of all five domains, and compares:

* the router as extended: the share of the new domain's validation tokens whose top-1 expert is
  the new one (recall), and the share of the earlier domains' tokens it takes (leak);
* a linear probe: multinomial logistic regression with a bias, trained on the real hidden states
  of every domain (which `extend` does not have: it sees only the new domain's text and the
  stored statistics of the earlier ones), read at the router's own leak (the recall of the
  score "new class minus best other class" at the threshold that lets through as many earlier
  tokens as the router does) and at a leak of 0.01.

The probe at the router's leak is the ceiling of any linear row at that cost to the earlier
domains, on these hidden states; where it is close to the router's recall, routing a single
(context-mixed) token cannot do much better.

The probe has its own rows for the earlier domains and a bias per class; a new expert's row has
neither. So the benchmark also fits the new row alone, by likelihood of the true domain under
the layer's softmax over the earlier rows (kept) and the new one, on the same training tokens of
all five domains (L-BFGS from the router's row, with a pull towards it), and compares the two
directions where it matters for perplexity: the new domain's recall at the loss of the earlier
domains' gates on their own experts (as the layer gates, top-k and renormalised) that the
router has, each direction swept over norms of 0.5-1.5x the router's row.

    .venv/bin/python benchmarks/routing_ceiling.py --study runs/paper-small --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from nexus_moe.calibrate import gates_of, moe_inputs, sample_windows, with_new_expert
from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
from nexus_moe.pipeline import tokens_for
from nexus_moe.study.layout import RunLayout
from nexus_moe.study.results import load_scores
from nexus_moe.train import tune_cpu_allocator


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-4):
    """Multinomial logistic regression on standardised features (L-BFGS); returns a scorer."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda v: ((v - mean) / std) @ w + b


def recall_at_leak(score: torch.Tensor, labels: torch.Tensor, new: int, leak: float) -> float:
    """Recall of the new class when the threshold on ``score`` passes ``leak`` of the others."""
    threshold = torch.quantile(score[labels != new], 1.0 - max(leak, 1e-4))
    return float((score[labels == new] > threshold).float().mean())


def fit_new_row(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, start: torch.Tensor):
    """The new expert's row (index ``len(rows)``) maximising the likelihood of the labels ``y``
    under ``softmax([x . rows, x . r])``, from ``start`` with an L2 pull towards it."""
    fixed = x @ rows.t()
    row = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([row], max_iter=100, line_search_fn="strong_wolfe")
    scale = (start**2).sum()

    def closure():
        opt.zero_grad()
        logits = torch.cat([fixed, (x @ row)[:, None]], dim=1)
        loss = F.cross_entropy(logits, y) + ((row - start) ** 2).sum() / scale
        loss.backward()
        return loss

    opt.step(closure)
    return row.detach()


def sweep(x, y, rows, direction, scales: torch.Tensor, top_k: int, renormalize: bool):
    """For the new expert's row at each norm ``scales`` (S,) along ``direction``: the top-1 recall
    of the new domain (label ``len(rows)``) and the mean loss of the earlier domains' gates on
    their own experts, each (S,)."""
    new = len(rows)
    unit = direction / direction.norm()
    logits = with_new_expert(x @ rows.t(), scales[:, None] * (x @ unit)[None])  # (S, N, E + 1)
    recall = (logits[:, y == new].argmax(-1) == new).float().mean(-1)
    old = y != new
    before = gates_of(logits[0, old, :new], y[old], top_k, renormalize)
    after = gates_of(logits[:, old], y[old], top_k, renormalize)
    return recall, (before[None] - after).mean(-1)


def recall_at_gate_loss(x, y, rows, direction, norm, budget: float, top_k: int, renormalize: bool):
    """The best recall of ``direction`` over norms of 0.5-1.5x ``norm`` (steps of 0.05) whose
    earlier gate loss stays within ``budget``."""
    scales = torch.arange(10, 31) / 20 * norm
    recall, loss = sweep(x, y, rows, direction, scales, top_k, renormalize)
    within = recall[loss <= budget + 1e-6]
    return float(within.max()) if len(within) else 0.0


def domain_inputs(model, shards, domains: list[str], split: str, tokens: int):
    """Per domain, what each MoE layer's router scores for ``tokens`` of ``split``."""
    return [
        moe_inputs(model, sample_windows(shards.tokens(d, split), 128, tokens), None)
        for d in domains
    ]


def stack(per_domain: list[list[torch.Tensor]], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s inputs of every domain, and the domain index of each token."""
    x = torch.cat([inputs[layer] for inputs in per_domain])
    y = torch.cat([torch.full((len(inputs[layer]),), i) for i, inputs in enumerate(per_domain)])
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/paper-small"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-tokens", type=int, default=32768, help="per domain, probe fit")
    parser.add_argument("--val-tokens", type=int, default=8192, help="per domain, measured")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)

    run = RunLayout(args.study)
    saved = load_scores(run.scores_json)
    earlier, heldout = saved.domains, saved.heldout
    rows = []
    for seed in args.seeds:
        for domain in heldout:
            path = run.extended("nexus", domain, seed)
            model, _ = load_checkpoint(path)
            model.eval()
            shards = tokens_for(run.corpus, path / TOKENIZER_FILE)
            domains, new = earlier + [domain], len(earlier)

            train = domain_inputs(model, shards, domains, "train", args.train_tokens)
            val = domain_inputs(model, shards, domains, "validation", args.val_tokens)
            for layer_index, layer in enumerate(model.moe_layers()):
                (xt, yt), (xv, yv) = stack(train, layer_index), stack(val, layer_index)
                with torch.no_grad():
                    logits = layer.router(xv).float()
                top = logits.argmax(-1)
                recall = float((top[yv == new] == new).float().mean())
                leak = float((top[yv != new] == new).float().mean())
                probe = fit_probe(xt, yt, len(domains))
                with torch.no_grad():
                    scores = probe(xv)
                margin = scores[:, new] - scores[:, :new].max(-1).values
                rows_, row = layer.router.expert_embeddings().detach().float().split([new, 1])
                gating = (layer.top_k, layer.cfg.renormalize)
                own_norm = row[0].norm()[None]  # the router's row as it is
                gate_loss = float(sweep(xv, yv, rows_, row[0], own_norm, *gating)[1][0])
                fitted = fit_new_row(xt, yt, rows_, row[0])
                same_cost = [  # norms relative to the router's row: 1.0x is the router
                    recall_at_gate_loss(xv, yv, rows_, d, row[0].norm(), gate_loss, *gating)
                    for d in (row[0], fitted)
                ]
                rows.append(
                    {
                        "seed": seed,
                        "domain": domain,
                        "layer": layer_index,
                        "router": recall,
                        "leak": leak,
                        "probe_at_leak": recall_at_leak(margin, yv, new, leak),
                        "probe_at_1pct": recall_at_leak(margin, yv, new, 0.01),
                        "gate_loss": gate_loss,
                        "router_swept": same_cost[0],
                        "fitted_row": same_cost[1],
                    }
                )
                r = rows[-1]
                print(
                    f"s{seed} {domain} layer {layer_index}: router recall {r['router']:.2f} at "
                    f"leak {r['leak']:.3f}; probe {r['probe_at_leak']:.2f} at that leak, "
                    f"{r['probe_at_1pct']:.2f} at 0.01; at the router's gate loss "
                    f"{r['gate_loss']:.3f}: its direction {r['router_swept']:.2f}, the fitted row "
                    f"{r['fitted_row']:.2f}",
                    flush=True,
                )
    print(
        "\nMean over MoE layers (per seed s0 / s1 / s2): the new domain's tokens on the new "
        "expert, and the earlier domains' tokens it takes"
    )
    print(
        "\n| new domain | router recall | router leak | probe, same leak | probe, leak 0.01 "
        "| earlier gate loss | router's direction, same gate loss | fitted row, same gate loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    columns = (
        ("router", ".2f"),
        ("leak", ".3f"),
        ("probe_at_leak", ".2f"),
        ("probe_at_1pct", ".2f"),
        ("gate_loss", ".3f"),
        ("router_swept", ".2f"),
        ("fitted_row", ".2f"),
    )
    for domain in heldout:
        cells = []
        for key, fmt in columns:
            per_seed = [
                statistics.fmean(r[key] for r in rows if r["domain"] == domain and r["seed"] == s)
                for s in args.seeds
            ]
            cells.append(" / ".join(format(v, fmt) for v in per_seed))
        print(f"| {domain} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
