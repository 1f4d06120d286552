"""Where does each domain's text go? Routing matrices, routing accuracy, expert load (docs/design.md §9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nexus_moe.data import TokenShards, iter_eval_batches
from nexus_moe.evaluate import EvalConfig, check_seq_len
from nexus_moe.io_utils import output_file, write_output_json
from nexus_moe.model import Transformer
from nexus_moe.moe import RoutingInfo


class RoutingCounter:
    """Top-1 assignment counts, shape (MoE layers, domains, routed experts), fed batch by batch:
    ``counter(domain_index, routing)`` with each forward's routing information (it fits
    :func:`nexus_moe.evaluate.evaluate_domains`' ``on_routing``, so scoring and routing analysis
    share one pass)."""

    def __init__(self, model: Transformer, num_domains: int) -> None:
        layers = model.moe_layers()
        if not layers:
            raise ValueError("routing analysis needs an MoE model")
        self.num_experts = layers[0].num_experts
        self.counts = torch.zeros(len(layers), num_domains, self.num_experts, dtype=torch.long)

    def __call__(self, domain_index: int, routing: list[RoutingInfo]) -> None:
        for layer, info in enumerate(routing):
            self.counts[layer, domain_index] += torch.bincount(
                info.top1.cpu(), minlength=self.num_experts
            )


def expert_names(model: Transformer) -> list[str]:
    """The domain of each routed expert, or ``expert<j>`` where the model names none."""
    moe = model.cfg.moe
    assert moe is not None
    return list(moe.domains) or [f"expert{j}" for j in range(moe.num_experts)]


@torch.no_grad()
def routing_counts(
    model: Transformer,
    shards: TokenShards,
    domains: list[str],
    cfg: EvalConfig | None = None,
    split: str = "validation",
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Top-1 assignment counts, shape (MoE layers, domains, routed experts)."""
    cfg = cfg or EvalConfig()
    check_seq_len(model, cfg)
    counter = RoutingCounter(model, len(domains))
    was_training = model.training
    model.eval()
    for d, domain in enumerate(domains):
        tokens = shards.tokens(domain, split)
        for inputs, _ in iter_eval_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.max_tokens):
            counter(d, model(inputs.to(device)).routing)
    model.train(was_training)
    return counter.counts


def routing_report(counts: torch.Tensor, domains: list[str], experts: list[str]) -> dict[str, Any]:
    """Row-normalised matrices, routing accuracy and load from :func:`routing_counts`.

    * ``per_layer[l][d][e]``: share of domain d's tokens whose top-1 expert at MoE layer l is e;
    * ``mean``: that share averaged over layers (each row sums to 1);
    * ``accuracy[d]``: mean share routed to the expert of domain d itself (None if it has none);
    * ``load[e]``: share of all tokens (all domains, all layers) whose top-1 is e.
    """
    totals = counts.sum(dim=-1, keepdim=True).clamp_min(1)
    per_layer = counts.double() / totals  # (L, D, E)
    mean = per_layer.mean(dim=0)  # (D, E)
    accuracy = {
        d: (float(mean[i, experts.index(d)]) if d in experts else None)
        for i, d in enumerate(domains)
    }
    load = counts.sum(dim=(0, 1)).double()
    load = load / load.sum().clamp_min(1)
    return {
        "domains": domains,
        "experts": experts,
        "per_layer": per_layer.tolist(),
        "mean": mean.tolist(),
        "accuracy": accuracy,
        "load": dict(zip(experts, load.tolist(), strict=True)),
        "tokens": dict(zip(domains, counts[0].sum(-1).tolist(), strict=True)),
    }


def merge_routing_reports(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One report over the domains of both (same experts and layers), e.g. domains scored on
    different numbers of tokens; the load is weighted by each domain's tokens."""
    if first["experts"] != second["experts"] or len(first["per_layer"]) != len(second["per_layer"]):
        raise ValueError("routing reports of different experts or layers cannot be merged")
    domains = first["domains"] + second["domains"]
    tokens = {**first["tokens"], **second["tokens"]}
    per_layer = [a + b for a, b in zip(first["per_layer"], second["per_layer"], strict=True)]
    shares = torch.tensor(per_layer, dtype=torch.float64)  # (L, D, E)
    weights = torch.tensor([float(tokens[d]) for d in domains], dtype=torch.float64)
    load = (shares * weights[None, :, None]).sum(dim=(0, 1))
    load = load / load.sum().clamp_min(1e-12)
    return {
        "domains": domains,
        "experts": first["experts"],
        "per_layer": per_layer,
        "mean": first["mean"] + second["mean"],
        "accuracy": {**first["accuracy"], **second["accuracy"]},
        "load": dict(zip(first["experts"], load.tolist(), strict=True)),
        "tokens": tokens,
    }


def plot_heatmap(
    matrix: list[list[float]], rows: list[str], cols: list[str], title: str, path: Path
) -> Path:
    """Draw a (rows x cols) share matrix as an annotated heatmap PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed expert (top-1)")
    ax.set_ylabel("domain of the text")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="black" if value > 0.6 else "white",
                fontsize=9,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of tokens")
    ax.set_title(title)
    fig.tight_layout()
    with output_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def analyse(
    model: Transformer,
    shards: TokenShards,
    domains: list[str],
    out_dir: Path,
    name: str = "model",
    cfg: EvalConfig | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Routing report + heatmaps (mean over layers and one per layer) written under ``out_dir``."""
    report = routing_report(
        routing_counts(model, shards, domains, cfg, device=device), domains, expert_names(model)
    )
    return write_routing_report(report, out_dir, name)


def write_routing_report(report: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
    """Write ``routing-<name>.json`` and its heatmaps (mean over layers, one per layer)."""
    domains, experts = report["domains"], report["experts"]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_heatmap(
        report["mean"],
        domains,
        experts,
        f"{name}: routing (mean over layers)",
        out_dir / f"routing-{name}.png",
    )
    for layer, matrix in enumerate(report["per_layer"]):
        plot_heatmap(
            matrix,
            domains,
            experts,
            f"{name}: MoE layer {layer}",
            out_dir / f"routing-{name}-layer{layer}.png",
        )
    write_output_json(out_dir / f"routing-{name}.json", report)
    return report
