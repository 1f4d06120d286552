"""Routers that know the domains before any training step (docs/design.md §5.6).

A router trained from random rows needs MoE training before it sends a domain's tokens to that
domain's expert. But the domain of every expert is known when the MoE is assembled, and a few
thousand tokens of each domain's text show where its tokens sit at each MoE layer's input. This
module measures that and turns it into router rows:

1. **Statistics.** For every routed expert i (domain i), run the MoE with all tokens forced to
   expert i (the expert mask) over ``tokens_per_domain`` tokens of domain i's *training* text, and
   collect each MoE layer's input x: the per-domain mean ``c_i`` and the within-domain covariance
   pooled over domains ``S``. With experts branched with only their FFNs trained, this is exactly
   what each dense expert computes on its own domain.
2. **Rows.** Linear discriminant directions without a bias (router logits are ``x . e_i``, and
   the Hugging Face MoE formats have no router bias): ``r_i = normalise(W (c_i - g) - a_i W g)``
   with ``W = (S + ridge * mean(diag S) I)^-1``, ``g`` the mean of the centroids and ``a_i``
   such that ``g . r_i = 0`` (so ``x . r_i = (x - g) . r_i``); normalising the rows makes the
   missing bias term equal for every expert. ``e_i = tau * r_i`` with ``tau`` the temperature
   that maximises the log-likelihood of the true domain on the calibration tokens.
3. **Growing.** A new expert's row is the discriminant direction of its domain's centroid from
   the stored ``g`` of each layer, under the ``W`` of the stored ``S`` with the new domain's own
   within-domain scatter pooled in. Optionally the rows of the earlier experts are refit among
   all the domains (:func:`refit_earlier_rows`): each gets the change of its discriminant
   direction when the new domain joins the centroids, their mean and the pooled covariance, so
   what training added to it is kept. The new row gets ``config.new_row_scale`` of the
   router's context (``config.REFIT_ROW_SCALE`` with the earlier rows refit) times their norm
   (``extend`` passes it) or, given a leak budget, the norm fitted per
   layer by :func:`fit_row_scale`: the largest that lets the new expert take at most that share of
   the earlier domains' own gates, estimated on samples drawn from the stored statistics
   (``N(c_i, S)``), so no earlier text is needed. A domain that overlaps an earlier one is then
   kept off that domain's tokens (and gets fewer of its own).

The statistics are kept with the checkpoint (``routing_stats.safetensors``), so ``extend`` can
place a new expert's row from the new domain's text alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from nexus_moe.config import DEFAULT_CALIBRATION_TOKENS
from nexus_moe.data import TokenShards
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer

# File in a checkpoint directory that holds the statistics (see :func:`stats_to_tensors`).
STATS_FILE = "routing_stats.safetensors"
CALIBRATION_SEQ_LEN = 128  # window length of the calibration text (capped by max_seq_len)
DEFAULT_RIDGE = 0.05  # shrinkage of the pooled covariance towards its mean variance
_TAU_GRID = torch.logspace(-3, 2.5, 56)  # candidate temperatures for the rows (unit vectors)
_KEEP_FOR_TAU = 1024  # tokens per domain and layer kept to fit the temperature
# Refit the earlier experts' rows among all the domains when a new expert is added (the stored
# statistics and the new domain's text are all it needs). Measured on the study's trained MoEs,
# zero-shot, it gives the new domain more of its tokens, but its cost grows with the new
# domain's distance: at 0.8x a user's changelogs cost the earlier domains up to +1.0% routing on
# context 0.75 (up to +1.6% on 0.5), so it is an option (docs/design.md §5.6).
REFIT_EARLIER_ROWS = False
# A leak budget for fit_row_scale: the share of the earlier domains' gates on their own experts
# that a new expert's row may take (estimated on samples of the stored statistics). Chosen on the
# held-out math domain only; not the default (docs/design.md §5.6).
LEAK_BUDGET = 0.01
_SCALE_GRID = torch.linspace(0.3, 2.5, 45)  # candidate row norms, times the earlier rows' mean
_SAMPLES_PER_DOMAIN = 2048  # samples of N(c_i, S) per earlier domain that estimate the leak
# The default safeguard of a new expert's row (docs/design.md §5.6; its budget is
# config.LOSS_BUDGET, nexus_moe.placement): windows of each domain's calibration tokens kept
# with the statistics.
HELD_WINDOWS = 64


@dataclass
class LayerStats:
    """Domain statistics of one MoE layer's input (float64 accumulators)."""

    centroids: torch.Tensor  # (E, H) mean input of each expert's domain
    covariance: torch.Tensor  # (H, H) within-domain covariance pooled over domains
    counts: torch.Tensor  # (E,) tokens each centroid was computed from
    center: torch.Tensor  # (H,) g: mean of the centroids the rows were made with
    temperature: float  # tau of the rows
    # (E, W, T) int32, W <= HELD_WINDOWS: calibration windows of each domain's tokens, on which
    # the default norm of a new expert's row is bounded by the rise of the earlier domains' loss
    # (``placement.place_new_rows``). None in statistics made before they were kept.
    held: torch.Tensor | None = None


def sample_windows(tokens: np.ndarray, seq_len: int, num_tokens: int) -> torch.Tensor:
    """(rows, seq_len) int64 windows spread evenly over ``tokens`` (about ``num_tokens``)."""
    rows = max(1, num_tokens // seq_len)
    last = len(tokens) - seq_len
    if last < 0:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64)[None, :])
    starts = np.linspace(0, last, rows).astype(np.int64) if rows > 1 else np.zeros(1, np.int64)
    return torch.from_numpy(
        np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])
    )


def domain_windows(
    shards: TokenShards, domain: str, max_seq_len: int, num_tokens: int
) -> torch.Tensor:
    """Calibration windows of ``domain``'s training split; NexusError if the domain is absent."""
    if domain not in shards.domains:
        raise NexusError(
            f"{shards.data_dir}: no domain '{domain}' in the corpus (it has "
            f"{', '.join(shards.domains)}); build a corpus that includes it"
        )
    seq_len = min(max_seq_len, CALIBRATION_SEQ_LEN)
    return sample_windows(shards.tokens(domain, "train"), seq_len, num_tokens)


@torch.no_grad()
def moe_inputs(
    model: Transformer,
    windows: torch.Tensor,
    expert: int | None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    upto: int | None = None,
) -> list[torch.Tensor]:
    """What each MoE layer's router scores for ``windows`` (its input, or with context routing
    the input mixed with its running mean), tokens forced to ``expert`` (None: as routed).

    Returns one (tokens, H) float32 tensor per MoE layer; with ``upto``, of the MoE layers up to
    that one only. The forward pass stops at the last layer returned.
    """
    layers = model.moe_layers()[: None if upto is None else upto + 1]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(i: int, module: torch.nn.Module, x: torch.Tensor) -> None:
        assert isinstance(module, MoELayer)
        route_in = module.routing_input(x)  # what the router scores (B, T, H)
        captured[i].append(route_in.reshape(-1, route_in.shape[-1]))

    with _forced(model, expert, device):
        _run_to(model, windows, list(layers), keep, batch_size, device)
    return [torch.cat(xs).float().cpu() for xs in captured]


@contextlib.contextmanager
def _forced(model: Transformer, expert: int | None, device: str | torch.device) -> Iterator[None]:
    """Every MoE layer's tokens forced to ``expert`` inside the block (None: as routed); the
    masks as they were after."""
    layers = model.moe_layers()
    masks = [layer.expert_mask for layer in layers]
    try:
        if expert is not None:
            for layer in layers:
                mask = torch.zeros(layer.num_experts, dtype=torch.bool, device=device)
                mask[expert] = True
                layer.expert_mask = mask
        yield
    finally:
        for layer, mask in zip(layers, masks, strict=True):
            layer.expert_mask = mask


@torch.no_grad()
def _run_to(
    model: Transformer,
    windows: torch.Tensor,
    modules: list[torch.nn.Module],
    sink: Callable[[int, torch.nn.Module, torch.Tensor], None],
    batch_size: int,
    device: str | torch.device,
) -> None:
    """Run ``model`` (eval mode) over ``windows`` in batches, calling ``sink(i, module, input)``
    at each of ``modules`` (in the order the forward pass reaches them); each pass stops at the
    last of them, so the blocks above and the logits are never computed."""

    def capture(i: int, module: torch.nn.Module, args: tuple) -> None:
        sink(i, module, args[0])
        if i == len(modules) - 1:
            raise _Enough

    hooks = [
        m.register_forward_pre_hook(functools.partial(capture, i)) for i, m in enumerate(modules)
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(windows[start : start + batch_size].to(device))
            except _Enough:
                pass
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


class _Enough(Exception):
    """Raised by :func:`_run_to`'s last hook: nothing above it is needed."""


def _covariance(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    centred = x.double() - mean
    return centred.t() @ centred / max(x.shape[0], 1)


def whitening(covariance: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``(S + ridge * mean(diag S) I)^-1`` (float64)."""
    size = covariance.shape[0]
    shrink = ridge * covariance.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.inv(covariance + shrink * torch.eye(size, dtype=covariance.dtype))


def directions(
    centroids: torch.Tensor, center: torch.Tensor, covariance: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Unit router rows (E, H), float64: ``normalise(W (c_i - g) - a_i W g)``.

    ``a_i`` makes each row orthogonal to g. Every input carries the common mean g, and with
    ``g . r_i != 0`` that term would act as a different bias for each expert (measured: one
    domain's share of its own tokens fell to 0.1 on a small model); subtracting along ``W g``
    rather than g keeps the row a whitened discriminant direction.
    """
    w = whitening(covariance, ridge)
    center = center.double()
    raw = (centroids.double() - center) @ w  # W is symmetric
    w_center = w @ center
    norm = center @ w_center
    if norm > 1e-12 * (raw.norm() ** 2 + 1):  # no common mean to remove when g ~ 0
        raw = raw - (raw @ center / norm)[:, None] * w_center  # g . row = 0
    return F.normalize(raw, dim=-1)


def fit_temperature(rows: torch.Tensor, samples: list[torch.Tensor]) -> float:
    """The tau in ``_TAU_GRID`` that maximises the mean log-probability of each sample's own
    expert (``samples[i]``: inputs of expert i's domain) under ``softmax(tau * x . r)``."""
    x = torch.cat(samples).double()
    labels = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])
    scores = x @ rows.t()
    best, best_ll = float(_TAU_GRID[0]), -math.inf
    for tau in _TAU_GRID.tolist():
        ll = torch.log_softmax(tau * scores, dim=-1)[torch.arange(len(labels)), labels].mean()
        if ll.item() > best_ll:
            best, best_ll = tau, ll.item()
    return best


class DomainMoments:
    """One domain's inputs at one router, accumulated batch by batch: token count, mean and
    scatter (sum of centred outer products, float64; batches merged by Chan et al.'s pairwise
    update), and the first ``_KEEP_FOR_TAU`` inputs (float32), which fit the temperature.

    Only these moments are kept, not every input: calibration holds (H, H) per layer and
    domain, whatever the number of tokens."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []
        self._num_kept = 0

    def update(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` (N, H)."""
        if len(x) == 0:
            return
        xd = x.double()
        mean = xd.mean(0)
        centred = xd - mean
        scatter = centred.t() @ centred
        if self.mean is None or self.scatter is None:
            self.mean, self.scatter = mean, scatter
        else:
            total = self.count + len(x)
            delta = mean - self.mean
            self.mean = self.mean + delta * (len(x) / total)
            self.scatter = (
                self.scatter + scatter + torch.outer(delta, delta) * (self.count * len(x) / total)
            )
        self.count += len(x)
        if self._num_kept < _KEEP_FOR_TAU:
            take = x[: _KEEP_FOR_TAU - self._num_kept].float().clone()
            self._kept.append(take)
            self._num_kept += len(take)

    def drop_scatter(self) -> torch.Tensor:
        """Give up the scatter (returned), keeping the mean, count and samples."""
        assert self.scatter is not None
        scatter, self.scatter = self.scatter, None
        return scatter

    @property
    def samples(self) -> torch.Tensor | None:
        """The first inputs (up to ``_KEEP_FOR_TAU``, float32); None when none were kept."""
        return torch.cat(self._kept) if self._kept else None

    @classmethod
    def of(
        cls,
        count: int,
        mean: torch.Tensor,
        scatter: torch.Tensor,
        samples: torch.Tensor | None = None,
    ) -> DomainMoments:
        """Moments read back (e.g. from a domain statistics file)."""
        out = cls()
        out.count, out.mean, out.scatter = count, mean.double(), scatter.double()
        if samples is not None and len(samples):
            out._kept, out._num_kept = [samples.float()], len(samples)
        return out


NewInputs = torch.Tensor | DomainMoments  # a new domain's inputs at a layer, or their moments


@torch.no_grad()
def accumulate_moments(
    model: Transformer,
    windows: torch.Tensor,
    modules: list[torch.nn.Module],
    route: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> list[DomainMoments]:
    """Run ``model`` over ``windows`` and accumulate, at each of ``modules`` (in the order the
    forward pass reaches them), the moments of ``route(module, input)`` (what a router there
    scores). The pass stops at the last of them: the blocks above and the logits are never
    computed."""
    moments = [DomainMoments() for _ in modules]

    def update(i: int, module: torch.nn.Module, x: torch.Tensor) -> None:
        routed = route(module, x)
        moments[i].update(routed.reshape(-1, routed.shape[-1]).float().cpu())

    _run_to(model, windows, modules, update, batch_size, device)
    return moments


@torch.no_grad()
def forced_moments(
    model: Transformer, windows: torch.Tensor, expert: int, device: str | torch.device = "cpu"
) -> list[DomainMoments]:
    """Moments of every MoE layer's router input over ``windows``, tokens forced to ``expert``
    (with experts branched FFN-only, what the dense expert computes on its own)."""
    with _forced(model, expert, device):
        return accumulate_moments(
            model, windows, list(model.moe_layers()), lambda m, x: m.routing_input(x), device=device
        )


def statistics_from_moments(
    moments: list[list[DomainMoments]],
    held_per_expert: list[torch.Tensor | None],
    ridge: float = DEFAULT_RIDGE,
    pooled_scatter: list[torch.Tensor] | None = None,
) -> list[LayerStats]:
    """Each MoE layer's statistics from each expert's domain moments (``moments[i][layer]``)
    and calibration windows (``held_per_expert[i]``; the held windows are kept only when every
    domain has them). A domain without kept inputs takes, for the temperature fit only, samples
    of a Gaussian with its mean and covariance (a fixed generator: the same rows every time).
    ``pooled_scatter``: each layer's sum of the domains' scatters, in domain order, when the
    caller has summed them already (and dropped each domain's, to save memory); they are
    divided in place into the covariances, so the caller must not use them after."""
    num_layers = len(moments[0])
    out = []
    for layer in range(num_layers):
        per_domain = [m[layer] for m in moments]
        centroids = torch.stack([m.mean for m in per_domain])  # type: ignore[misc]
        counts = torch.tensor([float(m.count) for m in per_domain], dtype=torch.float64)
        if pooled_scatter is not None:
            covariance = pooled_scatter[layer].div_(counts.sum())
        else:
            covariance = sum(m.scatter for m in per_domain) / counts.sum()  # type: ignore[operator]
        center = centroids.mean(0)
        rows = directions(centroids, center, covariance, ridge)
        samples = [_samples_of(m, layer) for m in per_domain]
        temperature = fit_temperature(rows, samples)
        held = None
        if all(w is not None for w in held_per_expert):
            keep = min([HELD_WINDOWS] + [w.shape[0] for w in held_per_expert])  # type: ignore[union-attr]
            held = torch.stack([held_windows(w, keep) for w in held_per_expert])  # type: ignore[arg-type]
        out.append(LayerStats(centroids, covariance, counts, center, temperature, held))
    return out


def _samples_of(moments: DomainMoments, layer: int) -> torch.Tensor:
    """The kept inputs of a domain, or Gaussian samples of its moments when none were kept."""
    if moments.samples is not None:
        return moments.samples
    assert moments.mean is not None and moments.scatter is not None
    generator = torch.Generator().manual_seed(layer)
    covariance = moments.scatter / max(moments.count - 1, 1)
    root = _covariance_root(covariance, 1e-6)
    noise = torch.randn(_KEEP_FOR_TAU, len(moments.mean), generator=generator, dtype=torch.float64)
    return (moments.mean + noise @ root.t()).float()


@torch.no_grad()
def domain_statistics(
    model: Transformer,
    windows_per_expert: list[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
    device: str | torch.device = "cpu",
) -> list[LayerStats]:
    """Statistics of every MoE layer, expert i's domain given by ``windows_per_expert[i]``."""
    moments = [forced_moments(model, w, i, device) for i, w in enumerate(windows_per_expert)]
    return statistics_from_moments(moments, list(windows_per_expert), ridge)


def held_windows(windows: torch.Tensor, keep: int = HELD_WINDOWS) -> torch.Tensor:
    """``keep`` of a domain's calibration windows (rows, T), spread evenly over them, int32
    (some repeated when there are fewer)."""
    picks = torch.linspace(0, windows.shape[0] - 1, keep).round().long()
    return windows[picks].to(torch.int32).clone()


def router_rows(stats: LayerStats, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """(E, H) float32 router rows ``tau * r_i`` of every expert in ``stats``."""
    rows = directions(stats.centroids, stats.center, stats.covariance, ridge)
    return (stats.temperature * rows).float()


def gates_of(logits: torch.Tensor, expert: torch.Tensor, top_k: int, renormalize: bool):
    """Gate of expert ``expert[n]`` for token n, as the MoE layer gates (softmax, top-k,
    renormalised over the top-k when ``renormalize``; 0 outside the top-k). ``logits``
    (..., N, E), ``expert`` (N,) -> (..., N)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, top_idx = probs.topk(top_k, dim=-1)
    gates = top_probs / top_probs.sum(-1, keepdim=True) if renormalize else top_probs
    return (gates * (top_idx == expert[:, None])).sum(-1)


def with_new_expert(old_logits: torch.Tensor, new_scores: torch.Tensor) -> torch.Tensor:
    """(S, N, E + 1) logits: ``old_logits`` (N, E) with the new expert's ``new_scores`` (S, N)
    appended, one set per candidate norm."""
    s = new_scores.shape[0]
    return torch.cat([old_logits.expand(s, -1, -1), new_scores.unsqueeze(-1)], dim=-1)


def _covariance_root(covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """A square root L (L L^T = S) of the pooled covariance S (float64): its Cholesky factor,
    or, when S is singular (e.g. from fewer calibration tokens than hidden dimensions, as with
    a real model calibrated on a few hundred tokens), that of S shrunk by ``ridge`` as the rows'
    ``W`` is."""
    size = covariance.shape[0]
    eye = torch.eye(size, dtype=torch.float64)
    jitter = 1e-9 * covariance.diagonal().mean().clamp_min(1e-12)
    root, info = torch.linalg.cholesky_ex(covariance + jitter * eye)
    if int(info) == 0:
        return root
    shrink = ridge * covariance.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(covariance + shrink * eye)


def fit_row_scale(
    stats: LayerStats,
    direction: torch.Tensor,
    new_inputs: torch.Tensor,
    current_rows: torch.Tensor,
    top_k: int,
    renormalize: bool,
    leak_budget: float = LEAK_BUDGET,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[float, dict[str, float]]:
    """Norm of a new expert's row along ``direction`` (unit, (H,)): the largest candidate
    (``_SCALE_GRID`` times the earlier rows' mean norm) whose row takes at most
    ``leak_budget`` of the earlier domains' own gates, else the smallest candidate.

    The leak is what a token of earlier domain i loses on its own expert i: its gate before
    the new expert minus its gate after (a new expert that only displaces another wrong expert
    from a token's top-k takes nothing from the right one). The earlier domains are
    represented by samples of ``N(c_i, S)`` from the stored statistics (centroids of the
    earlier experts, pooled within-domain covariance; see :func:`_covariance_root` for one
    estimated from fewer tokens than dimensions), ``_SAMPLES_PER_DOMAIN`` each, drawn from a
    generator seeded by ``seed``; the leak is the mean over domains of the mean loss. Returns
    the norm and what it gives: ``leak`` (estimated), ``gate`` (the new expert's mean gate on
    ``new_inputs``) and ``share`` (its top-1 share of them).
    """
    rows = current_rows.double()
    n = rows.shape[0]
    base = rows.norm(dim=-1).mean()
    candidates = (_SCALE_GRID.double() * base).tolist()
    generator = torch.Generator().manual_seed(seed)
    root = _covariance_root(stats.covariance.double(), ridge)
    size = root.shape[0]
    noise = torch.randn(n, _SAMPLES_PER_DOMAIN, size, generator=generator, dtype=torch.float64)
    samples = (stats.centroids[:n, None, :].double() + noise @ root.t()).reshape(-1, size)
    own = torch.arange(n).repeat_interleave(_SAMPLES_PER_DOMAIN)
    direction = direction.double()
    scale_t = torch.tensor(candidates, dtype=torch.float64)[:, None]
    old_logits = samples @ rows.t()
    before = gates_of(old_logits, own, top_k, renormalize)
    after = gates_of(
        with_new_expert(old_logits, scale_t * (samples @ direction)[None]), own, top_k, renormalize
    )
    leak = (before[None] - after).reshape(len(candidates), n, -1).mean(-1).mean(-1)  # (S,)
    ok = (leak <= leak_budget).nonzero()
    pick = int(ok[-1]) if len(ok) else 0
    x = new_inputs.double()
    new_logits = with_new_expert(x @ rows.t(), candidates[pick] * (x @ direction)[None])[0]
    gate = gates_of(new_logits, torch.full((len(x),), n), top_k, renormalize)
    share = float((new_logits.argmax(-1) == n).double().mean())
    info = {"leak": float(leak[pick]), "gate": float(gate.mean()), "share": share}
    return candidates[pick], info


def new_expert_row(
    stats: LayerStats,
    new_inputs: NewInputs,
    current_rows: torch.Tensor,
    ridge: float = DEFAULT_RIDGE,
    scale: float | None = None,
    *,
    top_k: int = 1,
    renormalize: bool = False,
    leak_budget: float | None = None,
    seed: int = 0,
    reference_norm: torch.Tensor | None = None,
    new_windows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LayerStats]:
    """The row of a new expert whose domain gives ``new_inputs`` (N, H) at this layer.

    ``current_rows`` are the earlier rows as they will route next to it (as trained, and refit
    by :func:`refit_earlier_rows` if they are); this function does not change them. The new
    row is the discriminant direction of the new centroid from the stored g, under the W of the
    stored pooled covariance with the new domain's own within-domain scatter pooled in (weighted by
    calibration tokens; measured on the study's trained MoEs, zero-shot: legal 0.41-0.46 ->
    0.46-0.53 of its tokens at a smaller cost to the earlier domains, math about the same,
    docs/design.md §5.6). Its norm: with
    ``leak_budget``, fitted by :func:`fit_row_scale` for a layer with these ``top_k`` and
    ``renormalize``; otherwise ``scale`` (``extend`` passes ``config.new_row_scale`` of the
    router's context, or the user's ``--row-scale``) times ``reference_norm`` (default: the
    mean norm of the current rows). Returns the row (H,) float32 and the statistics grown by
    the new domain (the pooled covariance keeps the earlier domains', which the
    earlier rows were made with).
    """
    # The within-domain scatter of the new domain joins the pooled covariance (weighted by
    # tokens) for its own direction: a direction in which the new domain varies widely says
    # little about whether a token belongs to it.
    centroid, covariance = _pooled_with(stats, new_inputs)
    direction = directions(centroid[None], stats.center, covariance, ridge)[0].float()
    if leak_budget is not None and scale is None:
        if isinstance(new_inputs, DomainMoments):
            raise NexusError("a leak budget is estimated on the new domain's text; pass --corpus")
        norm, _ = fit_row_scale(
            stats, direction, new_inputs, current_rows, top_k, renormalize, leak_budget, seed, ridge
        )
        row = norm * direction
    else:
        if scale is None:  # the default depends on the router's context: config.new_row_scale
            raise ValueError("new_expert_row: give scale or leak_budget")
        # A unit direction at the norm of the rows as trained (which may have moved from tau).
        if reference_norm is None:
            reference_norm = current_rows.float().norm(dim=-1).mean()
        row = scale * reference_norm * direction
    grown = replace(
        stats,
        centroids=torch.cat([stats.centroids, centroid[None]]),
        counts=torch.cat(
            [stats.counts, torch.tensor([_num_tokens(new_inputs)], dtype=torch.float64)]
        ),
        held=_grown_held(stats, new_windows),
    )
    return row, grown


def _grown_held(stats: LayerStats, new_windows: torch.Tensor | None) -> torch.Tensor | None:
    """The held windows with the new domain's appended (None unless both are there and of one
    length)."""
    if stats.held is None or new_windows is None:
        return None
    new = held_windows(new_windows, stats.held.shape[1])
    if new.shape[-1] != stats.held.shape[-1]:
        return None
    return torch.cat([stats.held, new[None]])


def _num_tokens(new_inputs: NewInputs) -> float:
    return float(new_inputs.count if isinstance(new_inputs, DomainMoments) else len(new_inputs))


def _pooled_with(stats: LayerStats, new_inputs: NewInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The new domain's centroid (H,) and the stored pooled covariance with its within-domain
    scatter pooled in, weighted by calibration tokens (float64). ``new_inputs``: (N, H), or
    their moments (e.g. from a domain statistics file)."""
    earlier_tokens, new_tokens = stats.counts.sum(), _num_tokens(new_inputs)
    if isinstance(new_inputs, DomainMoments):
        assert new_inputs.mean is not None and new_inputs.scatter is not None
        centroid, scatter = new_inputs.mean.double(), new_inputs.scatter.double()
    else:
        centroid = new_inputs.double().mean(0)
        scatter = _covariance(new_inputs, centroid) * new_tokens
    covariance = (stats.covariance * earlier_tokens + scatter) / (earlier_tokens + new_tokens)
    return centroid, covariance


def refit_earlier_rows(
    stats: LayerStats,
    new_inputs: NewInputs,
    ridge: float = DEFAULT_RIDGE,
    new_windows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LayerStats]:
    """How the earlier experts' rows change when the new domain (``new_inputs`` (N, H) at this
    layer) joins them, and the statistics of all the domains.

    Each earlier row was ``tau * r_i``, the discriminant direction of domain i among the
    earlier domains (:func:`directions` of the stored centroids, their mean g and the pooled
    covariance). Among all the domains it is ``r'_i``: the new centroid joins the centroids and
    their mean g', and the new domain's scatter the pooled covariance. The returned shift
    ``tau * (r'_i - r_i)`` (E, H) float32 is added to the rows as they are, which keeps what
    MoE training added to them. Every earlier row then scores tokens from g' (the new
    domain's side of the old mean), so the new domain's tokens score lower on the earlier
    experts, while the new row, made from the stored g, keeps its own score on them
    (:func:`new_expert_row`): measured on the study's trained MoEs, this gives the new expert
    more of its domain's tokens at the same cost to the earlier domains than a larger new row
    (docs/design.md §5.6). The statistics returned (E + 1 centroids, the pooled covariance,
    g') are what the refit rows were made from, so a later extension refits from them.
    """
    centroid, covariance = _pooled_with(stats, new_inputs)
    centroids = torch.cat([stats.centroids.double(), centroid[None]])
    center = centroids.mean(0)
    before = directions(stats.centroids, stats.center, stats.covariance, ridge)
    after = directions(centroids, center, covariance, ridge)[: len(before)]
    refit = LayerStats(
        centroids,
        covariance,
        torch.cat([stats.counts, torch.tensor([_num_tokens(new_inputs)], dtype=torch.float64)]),
        center,
        stats.temperature,
        _grown_held(stats, new_windows),
    )
    return (stats.temperature * (after - before)).float(), refit


def drop_expert(stats: LayerStats, index: int) -> LayerStats:
    """Statistics without expert ``index`` (the pooled covariance is kept as it was)."""
    keep = [i for i in range(stats.centroids.shape[0]) if i != index]
    return LayerStats(
        stats.centroids[keep].clone(),
        stats.covariance,
        stats.counts[keep].clone(),
        stats.center,
        stats.temperature,
        None if stats.held is None else stats.held[keep].clone(),
    )


# --------------------------------------------------------------------------------------------
# storage with a checkpoint


def stats_to_tensors(stats: list[LayerStats]) -> dict[str, torch.Tensor]:
    """Flat float32 tensors for safetensors, one group per MoE layer (in model order)."""
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(stats):
        out[f"moe_layer.{i}.centroids"] = s.centroids.float()
        out[f"moe_layer.{i}.covariance"] = s.covariance.float()
        out[f"moe_layer.{i}.counts"] = s.counts.float()
        out[f"moe_layer.{i}.center"] = s.center.float()
        out[f"moe_layer.{i}.temperature"] = torch.tensor([s.temperature], dtype=torch.float32)
        if s.held is not None:
            out[f"moe_layer.{i}.held"] = s.held.to(torch.int32).contiguous()
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor], num_layers: int) -> list[LayerStats]:
    """Inverse of :func:`stats_to_tensors`; KeyError when a layer's group is incomplete."""
    return [
        LayerStats(
            tensors[f"moe_layer.{i}.centroids"].double(),
            tensors[f"moe_layer.{i}.covariance"].double(),
            tensors[f"moe_layer.{i}.counts"].double(),
            tensors[f"moe_layer.{i}.center"].double(),
            float(tensors[f"moe_layer.{i}.temperature"][0]),
            tensors.get(f"moe_layer.{i}.held"),
        )
        for i in range(num_layers)
    ]


@torch.no_grad()
def calibrate_model(
    model: Transformer,
    shards: TokenShards,
    num_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    ridge: float = DEFAULT_RIDGE,
    device: str | torch.device = "cpu",
) -> list[LayerStats]:
    """Set every MoE layer's router rows from its experts' domains (``model.cfg.moe.domains``)
    and attach the statistics to the layers; returns them."""
    moe = model.cfg.moe
    if moe is None or not model.moe_layers():
        raise NexusError("router calibration needs an MoE model")
    if len(moe.domains) != moe.num_experts:
        raise NexusError(
            "router calibration needs the domain of every routed expert (moe.domains); "
            "name them with --domains"
        )
    stats = _statistics_of_domains(model, shards, num_tokens, ridge, device)
    for layer, layer_stats in zip(model.moe_layers(), stats, strict=True):
        layer.router.set_rows(router_rows(layer_stats, ridge).to(device))
        layer.domain_stats = layer_stats
    return stats


@torch.no_grad()
def refresh_statistics(
    model: Transformer,
    shards: TokenShards,
    num_tokens: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    device: str | torch.device = "cpu",
) -> bool:
    """Recompute the statistics of a trained MoE that carries them, keeping its router rows,
    from ``num_tokens`` per domain (None: as many as the statistics it carries were made from,
    so `upcycle --calibration-tokens` holds through training).

    Training moves the hidden states the step-0 statistics describe; a new expert's row is
    placed against the rows as trained, so it should use statistics of the trained model too
    (measured on the study's math domain: zero-shot share 0.53-0.61 -> 0.61-0.68 over three
    seeds, with the earlier domains still within 0.5%). Returns False (and changes nothing) when
    the model has no statistics or ``shards`` lacks one of its experts' domains.
    """
    layers = model.moe_layers()
    moe = model.cfg.moe
    if not layers or moe is None or any(layer.domain_stats is None for layer in layers):
        return False
    if not moe.domains or any(d not in shards.domains for d in moe.domains):
        return False
    if num_tokens is None:
        num_tokens = int(layers[0].domain_stats.counts.max())
    stats = _statistics_of_domains(model, shards, num_tokens, ridge, device)
    for layer, layer_stats in zip(layers, stats, strict=True):
        layer.domain_stats = layer_stats
    return True


def _statistics_of_domains(
    model: Transformer,
    shards: TokenShards,
    num_tokens: int,
    ridge: float,
    device: str | torch.device,
) -> list[LayerStats]:
    """:func:`domain_statistics` of each expert's domain (``model.cfg.moe.domains``)."""
    assert model.cfg.moe is not None
    windows = [
        domain_windows(shards, d, model.cfg.max_seq_len, num_tokens) for d in model.cfg.moe.domains
    ]
    return domain_statistics(model, windows, ridge, device=device)
