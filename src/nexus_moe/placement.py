"""The default placement of a new expert's router row: bounded by the earlier domains' loss
(docs/design.md §5.6).

``extend`` places a new expert's calibrated row layer by layer on the model itself, each as
large as it can be while no earlier domain's perplexity on the windows kept with the routing
statistics (``LayerStats.held``) rises by more than its share of ``config.LOSS_BUDGET``
(:func:`place_new_rows`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from nexus_moe.calibrate import (
    DEFAULT_RIDGE,
    DomainMoments,
    LayerStats,
    NewInputs,
    moe_inputs,
    new_expert_row,
    whitening,
)
from nexus_moe.config import HELD_CONFIDENCE, LOSS_BUDGET, MEAN_LOSS_BUDGET
from nexus_moe.model import Transformer

_NORM_GRID = torch.linspace(0.1, 2.5, 25)  # the candidates up to the cap place_new_rows gets
# Below the smallest norm a bias-free row still takes tokens (every logit near 0 ties with it),
# so the most cautious candidates add a negative bias along the direction all the layer's inputs
# share (times the earlier rows' mean norm; see _bias_carrier).
_BIAS_GRID = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
_CARRIER_SPREAD = 0.2
_HEAD_WINDOWS = 4  # held windows whose logits are computed at once
# Up to this many MoE layers a new row is placed layer by layer (each candidate runs the held
# windows from its layer up, O(L^2) block passes); above it, one norm factor for every layer
# (O(L)): on a 30-layer pretrained model the layer-by-layer placement ran for more than 17
# minutes on 2 CPU cores without finishing (BENCHMARKS.md, "A real pretrained model").
LAYERWISE_MAX_LAYERS = 8


@torch.no_grad()
def held_losses(
    model: Transformer,
    held: torch.Tensor,
    device: str | torch.device = "cpu",
    per_window: bool = False,
) -> torch.Tensor:
    """(E,) mean next-token loss of ``model`` on each domain's held windows (E, W, T), float64;
    (E, W) each window's with ``per_window``."""
    was_training = model.training
    model.eval()
    try:
        out = _HeldForward(model, held, device).losses()
    finally:
        model.train(was_training)
    return out if per_window else out.mean(dim=1)


class _HeldForward:
    """The model on held windows (E, W, T), with the residual stream at the input of one block
    kept: the blocks below a layer whose row is being placed are fixed by then, so each
    candidate runs only the blocks from it up (half the work of whole forward passes)."""

    @torch.no_grad()
    def __init__(
        self,
        model: Transformer,
        held: torch.Tensor,
        device: str | torch.device,
        scored: bool = True,
    ):
        """``scored`` False: every token of the windows is an input (no losses, only the
        residual stream)."""
        self.model, self.domains = model, held.shape[0]
        ids = held.long().reshape(-1, held.shape[-1]).to(device)
        self.inputs, self.targets = (ids[:, :-1], ids[:, 1:]) if scored else (ids, None)
        self.x = model.model.embed_tokens(self.inputs)
        positions = torch.arange(self.inputs.shape[1], device=ids.device)
        self.cos, self.sin = model.rotary(positions, self.x.dtype)
        self.block, self.prev = 0, None

    def _run(self, x, prev, start: int, stop: int):
        for i in range(start, stop):
            x, info = self.model.model.layers[i](x, self.cos, self.sin, prev, None, i)
            if info is not None:
                prev = info.top1
        return x, prev

    @torch.no_grad()
    def advance(self, block: int) -> None:
        """Keep the residual stream at the input of ``block`` (the blocks below it are final)."""
        self.x, self.prev = self._run(self.x, self.prev, self.block, block)
        self.block = block

    @torch.no_grad()
    def losses(self) -> torch.Tensor:
        """(E, W) mean next-token loss of each domain's held windows, float64."""
        import torch.nn.functional as F

        assert self.targets is not None, "a stream made with scored=False has no losses"
        x, _ = self._run(self.x, self.prev, self.block, len(self.model.model.layers))
        hidden = self.model.model.norm(x)
        out = []
        for start in range(0, hidden.shape[0], _HEAD_WINDOWS):  # a few windows' logits at once
            rows = slice(start, start + _HEAD_WINDOWS)
            logits = self.model.lm_head(hidden[rows]).float()
            loss = F.cross_entropy(logits.transpose(1, 2), self.targets[rows], reduction="none")
            out.append(loss.double().mean(dim=1))
        return torch.cat(out).reshape(self.domains, -1).cpu()


@torch.no_grad()
def place_new_rows(
    model: Transformer,
    windows: torch.Tensor | None,
    stats: list[LayerStats],
    budget: float = LOSS_BUDGET,
    ridge: float = DEFAULT_RIDGE,
    device: str | torch.device = "cpu",
    max_factor: float | None = None,
    new_moments: list[DomainMoments] | None = None,
    new_held: torch.Tensor | None = None,
    mean_budget: float | None = None,
    confidence: float | None = None,
    jointly: bool | None = None,
) -> tuple[list[LayerStats], list[float], dict]:
    """Place the row of the new (last) expert of every MoE layer of ``model`` from its domain's
    calibration ``windows``, with a norm bounded by what it costs the earlier domains on their
    held windows (``stats[0].held``): after the rows of the first l + 1 MoE layers are placed,
    no earlier domain's perplexity on its held windows may have risen by more than
    ``budget * (l + 1) / L``, nor their mean by more than ``mean_budget * (l + 1) / L``, each
    domain's rise taken as an upper bound over its windows (:func:`held_excess`). Returns the
    statistics grown by the new domain, each layer's norm factor (times the earlier rows' mean
    norm), the largest mean rise at the end (``worst``) and which ``placement`` it was.

    A token sent to the new expert changes the layers above it too (through attention and the
    router's running mean), and the new domain's own tokens reach a layer as the layers below
    routed them; neither shows in statistics of each layer taken alone (docs/design.md §5.6).
    So the rows are placed on the model itself, layer by layer from the first: the new
    domain's inputs at layer l are taken with the rows below placed (the new expert masked from
    layer l up), its direction is :func:`new_expert_row`'s from them, and its norm is the
    largest of the candidates (:func:`_candidate_rows`: ``_NORM_GRID`` up to ``max_factor``,
    below it negative biases) within the layer's share of the budgets (by bisection), measured
    on the whole model with the new expert masked above; the most cautious when none is.

    Without the new domain's text (``windows`` None), ``new_moments`` give its inputs' moments
    at each MoE layer as its dense expert computes them (a domain statistics file; its windows,
    if it shares them, ``new_held``), in place of its inputs as routed: the bound on the earlier
    domains holds the same, the direction is taken from the expert's own hidden states.
    With ``jointly`` (default: above ``LAYERWISE_MAX_LAYERS`` MoE layers) every layer gets the
    same factor instead, in ~8 forward passes (8 L block passes), not ~3 L^2 (:func:`_place_jointly`).
    """
    assert stats[0].held is not None
    assert (windows is None) != (new_moments is None)
    mean_budget = MEAN_LOSS_BUDGET if mean_budget is None else mean_budget
    confidence = HELD_CONFIDENCE if confidence is None else confidence
    if jointly is None:
        jointly = len(model.moe_layers()) > LAYERWISE_MAX_LAYERS
    if jointly:
        return _place_jointly(
            model, windows, stats, budget, ridge, device, max_factor, new_moments, new_held,
            mean_budget, confidence,
        )  # fmt: skip
    layers, blocks, new = _moe_blocks(model)
    grown_stats, factors = [], []
    with _new_expert_masked(model, device) as saved:
        held = _HeldForward(model, stats[0].held, device)
        before = held.losses()
        for index, (layer, layer_stats) in enumerate(
            _progress(list(zip(layers, stats, strict=True)), "new row: placing", "layer")
        ):
            held.advance(blocks[index])
            x = _new_inputs(model, windows, new_moments, index, device)
            earlier = layer.router.expert_embeddings().detach()[:new].float()
            new_windows = windows if windows is not None else new_held
            unit, grown = new_expert_row(
                layer_stats, x, earlier.cpu(), ridge, scale=1.0, new_windows=new_windows
            )
            layer.expert_mask = saved[index]
            share = (index + 1) / len(layers)

            def rise(row: torch.Tensor, layer=layer, share=share) -> float:
                layer.router.set_row(new, row.to(device))
                rises = held.losses() - before
                return held_excess(rises, budget, mean_budget, confidence, share)

            factor, row = _bounded_row(unit, layer_stats, ridge, max_factor, rise, 1.0)
            factors.append(factor)
            layer.router.set_row(new, row.to(device))
            grown_stats.append(grown)
        worst = float((held.losses() - before).mean(dim=1).max())
    return grown_stats, factors, {"worst": math.expm1(worst), "placement": "layerwise"}


def _progress(items: list | None, desc: str, unit: str) -> tqdm:
    """A progress bar on a terminal (none otherwise): a deep model's placement takes minutes."""
    return tqdm(items, desc=desc, unit=unit, disable=None, leave=False)


def _moe_blocks(model: Transformer) -> tuple[list, list[int], int]:
    """The MoE layers, the indices of their blocks, and the new (last) expert's index."""
    layers = model.moe_layers()
    blocks = [i for i, block in enumerate(model.model.layers) if block.is_moe]
    return layers, blocks, layers[0].num_experts - 1


@contextlib.contextmanager
def _new_expert_masked(model: Transformer, device: str | torch.device):
    """``model`` in eval mode with its last expert masked in every MoE layer; yields the masks
    as they were (a layer whose row is placed gets its own back), restores masks and mode."""
    layers = model.moe_layers()
    saved = [layer.expert_mask for layer in layers]
    masked = torch.ones(layers[0].num_experts, dtype=torch.bool, device=device)
    masked[-1] = False
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            layer.expert_mask = masked
        yield saved
    finally:
        for layer, mask in zip(layers, saved, strict=True):
            layer.expert_mask = mask
        model.train(was_training)


def held_excess(
    rises: torch.Tensor, worst: float, mean: float, confidence: float, share: float = 1.0
) -> float:
    """How far the earlier domains' loss ``rises`` (E, W: per held window, nats) are from
    their limits, as a fraction (<= 1 within). The largest domain's rise may reach a perplexity
    rise of ``share * worst`` and their mean one of ``share * mean`` (the windows' means), and
    with ``confidence`` > 0 each domain's upper bound over its windows (mean + ``confidence`` x
    standard error) may reach ``worst`` and ``mean`` themselves: the windows are a sample of the
    domain's text, and a new expert's damage sits in a few of them (docs/design.md §5.6)."""
    windows = rises.shape[1]
    spread = rises.std(dim=1) / math.sqrt(windows) if windows > 1 else torch.zeros(len(rises))
    point = rises.mean(dim=1)
    upper = point + confidence * spread
    return max(
        float(point.max()) / math.log1p(share * worst),
        float(point.mean()) / math.log1p(share * mean),
        float(upper.max()) / math.log1p(worst),
        float(upper.mean()) / math.log1p(mean),
    )


def _new_inputs(
    model: Transformer,
    windows: torch.Tensor | None,
    new_moments: list[DomainMoments] | None,
    index: int,
    device: str | torch.device,
) -> NewInputs:
    """The new domain's inputs at MoE layer ``index``: as routed through ``model`` (from its
    ``windows``), or the moments of its statistics file."""
    if new_moments is not None:
        return new_moments[index]
    assert windows is not None
    return moe_inputs(model, windows, None, device=device, upto=index)[index]


def _bounded_row(
    unit: torch.Tensor,
    layer_stats: LayerStats,
    ridge: float,
    max_factor: float | None,
    rise: Callable[[torch.Tensor], float],
    limit: float,
) -> tuple[float, torch.Tensor]:
    """The most taking of the candidate rows (its norm factor and the row) whose ``rise`` of
    the earlier domains' loss is within ``limit``, by bisection; the most cautious when none
    is. (The most taking is tried first: where it is within the limit, as at most layers of a
    far domain, that is one evaluation of the held windows instead of two.)"""
    return _most_taking(
        _candidate_rows(unit, layer_stats, ridge, max_factor),
        lambda: _candidate_rows(unit, layer_stats, ridge, max_factor, True),
        lambda candidate: rise(candidate[1]),
        limit,
    )


def _most_taking(candidates: list, last_resort: Callable[[], list], rise: Callable, limit: float):
    """The most taking of ``candidates`` (from the most cautious to the most taking) whose
    ``rise`` is within ``limit``, by bisection; where even the most cautious is not, the same
    over ``last_resort()`` (more cautious ones first), and its most cautious when none is."""
    if rise(candidates[-1]) <= limit:
        return candidates[-1]
    if rise(candidates[0]) > limit:
        candidates = last_resort()
    lo, hi = 0, len(candidates) - 1  # the most taking candidate within the limit (hi is not)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rise(candidates[mid]) <= limit:
            lo = mid
        else:
            hi = mid
    return candidates[lo]


def _bias_carrier(stats: LayerStats, ridge: float) -> tuple[torch.Tensor | None, float]:
    """(H,) a direction on which every input scores about 1: ``W g`` scaled so the earlier
    centroids score 1 on average (None when they score 0 on it), and how much the inputs'
    scores on it vary (within-domain deviation). The layer's inputs all carry the common mean
    g; measured on the demo's MoE, their scores along ``W g`` vary by 4% (routing on context)
    to 10% (per token) above the first MoE layer, so a row's component along it acts as a bias
    there; in the first MoE layer by 30-50%, where it acts partly as noise."""
    carrier = whitening(stats.covariance, ridge) @ stats.center.double()
    scale = (stats.centroids.double() @ carrier).mean()
    if scale.abs() <= 1e-12:
        return None, math.inf
    spread = float((carrier @ stats.covariance.double() @ carrier).sqrt() / scale.abs())
    return (carrier / scale).float(), spread


def _candidate_rows(
    unit: torch.Tensor,
    stats: LayerStats,
    ridge: float,
    max_factor: float | None = None,
    last_resort: bool = False,
) -> list[tuple[float, torch.Tensor]]:
    """A new row's candidates from the most cautious to the most taking, with their norm factor:
    the smallest norm with ever larger negative biases (_BIAS_GRID; only where the inputs'
    scores on the bias direction vary by at most _CARRIER_SPREAD, or as the ``last_resort``),
    then _NORM_GRID up to ``max_factor`` (None: all of it)."""
    reference = float(unit.norm())
    smallest = float(_NORM_GRID[0]) * unit
    carrier, spread = _bias_carrier(stats, ridge)
    biased = []
    if carrier is not None and (spread <= _CARRIER_SPREAD or last_resort):
        biased = [
            (float(_NORM_GRID[0]), smallest - float(b) * reference * carrier)
            for b in _BIAS_GRID.flip(0)
        ]
    return biased + [(f, f * unit) for f in _norm_factors(max_factor)]


@torch.no_grad()
def _place_jointly(
    model: Transformer,
    windows: torch.Tensor | None,
    stats: list[LayerStats],
    budget: float,
    ridge: float,
    device: str | torch.device,
    max_factor: float | None,
    new_moments: list[DomainMoments] | None,
    new_held: torch.Tensor | None,
    mean_budget: float,
    confidence: float,
) -> tuple[list[LayerStats], list[float], dict]:
    """:func:`place_new_rows` with one norm factor for every layer, in O(L) block passes.

    Each layer's direction is :func:`new_expert_row`'s from the new domain's inputs there as
    routed with the rows below it placed at the largest candidate (its windows run up the model
    once, each block twice: before and after its row is set). Then the candidates of every
    layer (the same norm factors; below the smallest, the negative biases) are taken together,
    and the most taking whose rise of the earlier domains' loss on their held windows, through
    the whole model, is within the budgets (no per-layer shares) is kept, by bisection."""
    layers, blocks, new = _moe_blocks(model)
    units, grown_stats = [], []
    largest = _norm_factors(max_factor)[-1]  # the rows below a layer's, while it is placed
    with _new_expert_masked(model, device) as saved:
        held = _HeldForward(model, stats[0].held, device)
        before = held.losses()
        stream = None if windows is None else _HeldForward(model, windows[None], device, False)
        for index, (layer, layer_stats) in enumerate(
            _progress(list(zip(layers, stats, strict=True)), "new row: directions", "layer")
        ):
            if stream is None:
                assert new_moments is not None
                x: NewInputs = new_moments[index]
            else:
                stream.advance(blocks[index])
                x = _routed_inputs(stream, blocks[index], layer)
            earlier = layer.router.expert_embeddings().detach()[:new].float()
            unit, grown = new_expert_row(
                layer_stats, x, earlier.cpu(), ridge, scale=1.0,
                new_windows=windows if windows is not None else new_held,
            )  # fmt: skip
            layer.expert_mask = saved[index]
            layer.router.set_row(new, (largest * unit).to(device))
            units.append(unit)
            grown_stats.append(grown)

        scored: dict[int, tuple[list, torch.Tensor]] = {}  # each candidate's rises, by id
        passes = _progress(None, "new row: bounding", "pass")

        def rise(rows: list[tuple[float, torch.Tensor]]) -> float:
            passes.update(1)
            for layer, (_, row) in zip(layers, rows, strict=True):
                layer.router.set_row(new, row.to(device))
            scored[id(rows)] = (rows, held.losses() - before)  # (kept alive: ids stay unique)
            return held_excess(scored[id(rows)][1], budget, mean_budget, confidence)

        def joint(last_resort: bool) -> list[list[tuple[float, torch.Tensor]]]:
            return _joint_candidates(units, stats, ridge, max_factor, last_resort)

        chosen = _most_taking(joint(False), lambda: joint(True), rise, 1.0)
        if id(chosen) not in scored:  # the most cautious last resort, where none was within
            rise(chosen)
        for layer, (_, row) in zip(layers, chosen, strict=True):
            layer.router.set_row(new, row.to(device))
        worst = float(scored[id(chosen)][1].mean(dim=1).max())
        passes.close()
    info = {"worst": math.expm1(worst), "placement": "joint"}
    return grown_stats, [f for f, _ in chosen], info


def _routed_inputs(stream: _HeldForward, block: int, layer: torch.nn.Module) -> torch.Tensor:
    """(tokens, H) float32: what ``layer`` (the MoE of ``block``, the stream's current block)
    scores for the stream's windows, as the model routes them now (the block runs once)."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple) -> None:
        route_in = module.routing_input(args[0])
        captured.append(route_in.reshape(-1, route_in.shape[-1]).float().cpu())

    handle = layer.register_forward_pre_hook(keep)
    try:
        stream._run(stream.x, stream.prev, block, block + 1)
    finally:
        handle.remove()
    return captured[0]


def _joint_candidates(
    units: list[torch.Tensor],
    stats: list[LayerStats],
    ridge: float,
    max_factor: float | None,
    last_resort: bool,
) -> list[list[tuple[float, torch.Tensor]]]:
    """Every layer's candidate rows at once, from the most cautious to the most taking: the
    norm factors of _NORM_GRID; with ``last_resort``, before them each layer's negative biases
    (a layer without a bias direction keeps its smallest norm there)."""
    per_layer = []
    for unit, layer_stats in zip(units, stats, strict=True):
        candidates = _candidate_rows(unit, layer_stats, ridge, max_factor, last_resort)
        norms = candidates[-len(_norm_factors(max_factor)) :]
        biased = candidates[: len(candidates) - len(norms)] if last_resort else []
        if last_resort and not biased:
            biased = [norms[0]] * len(_BIAS_GRID)
        per_layer.append(biased + norms)
    return [list(rows) for rows in zip(*per_layer, strict=True)]


def _norm_factors(max_factor: float | None) -> list[float]:
    """The norm factors of _NORM_GRID up to ``max_factor`` (None: all of them)."""
    return [float(f) for f in _NORM_GRID if max_factor is None or f <= max_factor + 1e-6]
