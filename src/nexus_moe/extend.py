"""Grow and shrink a trained MoE (docs/design.md §7).

Extending appends a new dense expert (trained from the same seed, or brought by the user):

1. its FFN becomes a new routed expert in every MoE layer;
2. every other weight is merged ``phi = (1 - lambda) phi_moe + lambda phi_new``, ``lambda = 1/(n+1)``
   (FFNs of dense blocks included; the shared expert and routers are left alone); an expert
   branched with only its FFNs trained is not merged (lambda 0: its other weights are the seed's);
3. the router grows: Nexus appends the new domain embedding (its expert embedding comes from the
   trained projection, no new parameter), linear appends a random row or is re-initialised (the
   paper's baseline), AC grows its base router. An MoE upcycled with a calibrated router and
   given the new domain's text gets the new row placed from that text instead, and optionally
   the earlier rows refit among all the domains (§5.6).

The extended checkpoint keeps an *undo record* (the pre-merge values of the merged weights, the
earlier router rows and routing statistics before a refit), so ``remove_expert`` of the expert
just added gives back the original model bit-exactly. Removing any other expert drops its FFN
and router entry and keeps the merged weights as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexus_moe import calibrate, config, domain_stats, peer_init, placement
from nexus_moe.checkpoint import (
    TOKENIZER_FILE,
    load_checkpoint,
    load_config,
    read_safetensors,
    require_text,
    save_checkpoint,
)
from nexus_moe.config import (
    DEFAULT_CALIBRATION_TOKENS,
    ModelConfig,
    MoEConfig,
    RouterType,
    check_extend_options,
)
from nexus_moe.data import TokenShards
from nexus_moe.domain_stats import DomainStats
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import UNDO_FILE
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.train import FFN_PARAMETERS
from nexus_moe.upcycle import ARCHITECTURE_FIELDS

# Undo-record keys of the routing statistics before extension (the others are state-dict names).
_STATS_UNDO = "routing_stats."


def _merged_names(model: Transformer) -> list[str]:
    """Weights merged with lambda: everything but routed experts, shared experts and routers."""
    names = []
    for name in model.state_dict():
        if ".mlp.experts." in name or ".mlp.shared_expert." in name or ".mlp.router." in name:
            continue
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        names.append(name)
    return names


def _as_after_removal(
    state: dict[str, torch.Tensor], undo: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state-dict tensors of the undo record as removing the last expert leaves them (router
    rows without the last row), the values the record's fingerprint is taken from."""
    return {k: state[k][: undo[k].shape[0]] for k in undo if not k.startswith(_STATS_UNDO)}


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_compatible(moe_dir: Path, moe_cfg: ModelConfig, expert_dir: Path, cfg: ModelConfig):
    if cfg.moe is not None:
        raise NexusError(f"{expert_dir}: the new expert must be a dense checkpoint")
    for name in ARCHITECTURE_FIELDS:
        if getattr(cfg, name) != getattr(moe_cfg, name):
            raise NexusError(
                f"{expert_dir}: {name}={getattr(cfg, name)} but the MoE ({moe_dir}) has "
                f"{getattr(moe_cfg, name)}; train the new expert from the same seed"
            )
    if moe_cfg.expert_intermediate_size != cfg.intermediate_size:
        raise NexusError(
            f"{expert_dir}: intermediate_size={cfg.intermediate_size} but the MoE's experts have "
            f"{moe_cfg.expert_intermediate_size}"
        )
    tok_a, tok_b = moe_dir / TOKENIZER_FILE, expert_dir / TOKENIZER_FILE
    if tok_a.is_file() and tok_b.is_file() and tok_a.read_bytes() != tok_b.read_bytes():
        raise NexusError(f"{expert_dir}: {TOKENIZER_FILE} differs from the MoE's ({moe_dir})")


@torch.no_grad()
def extend_model(
    moe: Transformer,
    expert: Transformer,
    domain: str,
    domain_embedding: torch.Tensor | None = None,
    reset_linear_router: bool = False,
    merge_lambda: float | None = None,
    seed: int = 0,
    calibration_windows: torch.Tensor | None = None,
    leak_budget: float | None = None,
    refit_rows: bool = calibrate.REFIT_EARLIER_ROWS,
    row_scale: float | None = None,
    loss_budget: float = config.LOSS_BUDGET,
    report: dict | None = None,
    calibration_moments: list[calibrate.DomainMoments] | None = None,
    new_held: torch.Tensor | None = None,
) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """Add ``expert`` to ``moe`` in place; returns (moe, undo record: the merged weights and,
    when the earlier rows are refit, their values and the routing statistics before).

    ``calibration_windows`` (rows, seq_len) of the new domain's training tokens place the new
    router row from the domain's hidden states (the MoE must carry routing statistics, see
    ``nexus_moe.calibrate``); without them the router's own rule applies. By default the
    calibrated rows are placed layer by layer on the model, each as large as it can be (up to
    ``config.new_row_scale`` of the router's context times the earlier rows' norm) while no
    earlier domain's perplexity on the windows kept with the statistics rises by more than
    ``loss_budget`` (``placement.place_new_rows``; ``report`` receives what it gave). Otherwise
    (``row_scale`` given, statistics without windows, or ``refit_rows``) the row gets
    ``row_scale`` (default ``config.new_row_scale``; ``config.REFIT_ROW_SCALE`` with
    ``refit_rows``) times the earlier rows' norm, or, with ``leak_budget`` (the share of the
    earlier domains' gates on their own experts it may take), a norm fitted per layer
    (``calibrate.fit_row_scale``). With ``refit_rows`` and no leak budget the earlier experts'
    rows are refit among all the domains as well (``calibrate.refit_earlier_rows``).

    ``calibration_moments`` (one per MoE layer, from the new domain's statistics file; its
    windows, if shared, ``new_held``) stand in for ``calibration_windows`` when the text is not
    at hand: the row is placed the same way, its direction from the dense expert's hidden states.
    """
    cfg = moe.cfg
    assert cfg.moe is not None
    n = cfg.moe.num_experts
    lam = 1.0 / (n + 1) if merge_lambda is None else merge_lambda
    stats = [layer.domain_stats for layer in moe.moe_layers()]
    calibrated = _check_extension(
        cfg.moe, domain, domain_embedding, stats, calibration_windows, calibration_moments,
        reset_linear_router,
    )  # fmt: skip
    undo = _merge_weights(moe, expert, lam)
    domains = list(cfg.moe.domains) or [f"expert{j}" for j in range(n)]
    grown_cfg = _grown_config(cfg.moe, n + 1, domains + [domain])
    embedding = domain_embedding if cfg.moe.uses_nexus else None
    _add_expert_ffns(moe, expert, grown_cfg, embedding, reset_linear_router, seed)
    moe.cfg.moe = grown_cfg
    if calibrated:
        # A leak budget bounds what the new row takes from the earlier rows as they are: it
        # keeps them.
        row = _NewRow(
            windows=calibration_windows,
            moments=calibration_moments,
            held=new_held,
            leak_budget=leak_budget,
            refit_rows=refit_rows and leak_budget is None,
            row_scale=row_scale,
            loss_budget=loss_budget,
            seed=seed,
        )
        _place_new_row(moe, stats, n, row, undo, report)
    return moe, undo


def _check_extension(
    moe_cfg: MoEConfig,
    domain: str,
    domain_embedding: torch.Tensor | None,
    stats: list[calibrate.LayerStats | None],
    calibration_windows: torch.Tensor | None,
    calibration_moments: list[calibrate.DomainMoments] | None,
    reset_linear_router: bool,
) -> bool:
    """Refuse an extension that cannot be made; whether the new row is calibrated."""
    if domain in moe_cfg.domains:
        raise NexusError(f"the MoE already has an expert for domain '{domain}'")
    if moe_cfg.uses_nexus and domain_embedding is None:
        raise NexusError(
            f"the Nexus router needs the embedding of domain '{domain}': run `nexus-moe "
            "embed-domains` for it with the MoE's embedder"
        )
    if calibration_windows is not None and calibration_moments is not None:
        raise NexusError("place the new row from the domain's text or its statistics, not both")
    calibrated = calibration_windows is not None or calibration_moments is not None
    if calibrated and reset_linear_router:
        raise NexusError("--reset-router re-initialises every row; it cannot be calibrated")
    if calibrated and any(s is None for s in stats):
        raise NexusError(
            "this MoE carries no routing statistics (it was not upcycled with a calibrated "
            "router), so the new expert's row cannot be calibrated; extend without --corpus"
        )
    return calibrated


def _merge_weights(moe: Transformer, expert: Transformer, lam: float) -> dict[str, torch.Tensor]:
    """Merge the expert's non-expert weights into the MoE's with ``lam``; the values before."""
    moe_state, expert_state = moe.state_dict(), expert.state_dict()
    undo = {}
    if lam != 0.0:
        for name in _merged_names(moe):
            old = moe_state[name]
            undo[name] = old.clone()
            merged = (1.0 - lam) * old.float() + lam * expert_state[name].float()
            old.copy_(merged.to(old.dtype))
    return undo


def _add_expert_ffns(
    moe: Transformer,
    expert: Transformer,
    grown_cfg: MoEConfig,
    embedding: torch.Tensor | None,
    reset_linear_router: bool,
    seed: int,
) -> None:
    """Append the expert's FFN to every MoE layer, each router grown by its own rule."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # a new linear-router row is random: make it reproducible
    try:
        for i, block in enumerate(moe.model.layers):
            if not isinstance(block.mlp, MoELayer):
                continue
            ffn = expert.model.layers[i].mlp
            block.mlp.add_expert(
                ffn.gate_proj.weight,
                ffn.up_proj.weight,
                ffn.down_proj.weight,
                grown_cfg,
                domain_embedding=embedding,
                reset_router=reset_linear_router,
            )
    finally:
        torch.random.set_rng_state(generator_state)


@dataclass
class _NewRow:
    """How the new expert's router row is placed (the calibration arguments of extend_model)."""

    windows: torch.Tensor | None
    moments: list[calibrate.DomainMoments] | None
    held: torch.Tensor | None  # the statistics file's windows, if shared
    leak_budget: float | None
    refit_rows: bool
    row_scale: float | None
    loss_budget: float
    seed: int


def _place_new_row(
    moe: Transformer,
    stats: list,
    n: int,
    row: _NewRow,
    undo: dict[str, torch.Tensor],
    report: dict | None,
) -> None:
    """Calibrate the new row (and with ``row.refit_rows`` refit the earlier ones) of every MoE
    layer; ``undo`` receives the rows and statistics a refit replaces."""
    assert moe.cfg.moe is not None
    context = moe.cfg.moe.router_context
    # The default norm of a calibrated row is bounded by the earlier domains' loss on their held
    # windows (placement.place_new_rows); statistics made before windows were kept fall back to
    # the fixed norm of the router's context.
    held = stats[0].held if stats and stats[0] is not None else None
    bounded = (
        row.row_scale is None
        and row.leak_budget is None
        and not row.refit_rows
        and held is not None
    )
    row_scale = row.row_scale
    if row_scale is None and row.leak_budget is None and not bounded:  # (a budget fits the norm)
        row_scale = config.REFIT_ROW_SCALE if row.refit_rows else config.new_row_scale(context)
    if row.refit_rows:  # the rows and statistics as they were, for remove_expert
        undo.update(_router_rows(moe, n))
        undo.update({_STATS_UNDO + k: v for k, v in calibrate.stats_to_tensors(stats).items()})
    if bounded:
        _place_bounded(moe, stats, row, report)
        return
    _place_fixed(moe, stats, n, row, row_scale)


def _place_bounded(moe: Transformer, stats: list, row: _NewRow, report: dict | None) -> None:
    """Each layer's new row as large as the earlier domains' loss allows."""
    assert moe.cfg.moe is not None
    # Never larger than the fixed norm: a sample of the earlier text can miss the part
    # of a domain that looks like the new one (BENCHMARKS.md), so the bound only shrinks.
    grown_stats, factors, info = placement.place_new_rows(
        moe,
        row.windows,
        stats,
        row.loss_budget,
        max_factor=config.new_row_scale(moe.cfg.moe.router_context),
        new_moments=row.moments,
        new_held=row.held,
    )
    for layer, grown in zip(moe.moe_layers(), grown_stats, strict=True):
        layer.domain_stats = grown
    if report is not None:  # what the placement gave (recorded with the checkpoint)
        report.update(
            loss_budget=row.loss_budget,
            mean_loss_budget=config.MEAN_LOSS_BUDGET,
            held_confidence=config.HELD_CONFIDENCE,
            row_factors=[round(f, 3) for f in factors],
            held_worst_rise=round(info["worst"], 5),
            placement=info["placement"],
        )


def _place_fixed(
    moe: Transformer, stats: list, n: int, row: _NewRow, row_scale: float | None
) -> None:
    """Each layer's new row with ``row_scale`` times the earlier rows' norm, or the norm the
    leak budget fits (and with ``row.refit_rows`` the earlier rows refit first)."""
    layers = moe.moe_layers()
    # The new domain's inputs at every MoE layer with its tokens on the new expert: what the
    # MoE computes when it routes them there.
    # (From a statistics file: as the dense expert computes them, which is the same for an
    # expert branched FFN-only.)
    inputs: list[calibrate.NewInputs]
    if row.moments is not None:
        inputs = list(row.moments)
    else:
        assert row.windows is not None
        inputs = list(calibrate.moe_inputs(moe, row.windows, expert=n))
    new_windows = row.windows if row.windows is not None else row.held
    for layer, layer_stats, x in zip(layers, stats, inputs, strict=True):
        earlier = layer.router.expert_embeddings().detach()[:n].float()  # as before adding
        reference_norm = None  # the new row's norm is relative to the rows before a refit
        if row.refit_rows:
            reference_norm = earlier.norm(dim=-1).mean()
            shift, refit = calibrate.refit_earlier_rows(layer_stats, x, new_windows=new_windows)
            layer.router.shift_rows(shift.to(earlier.device))
            earlier = earlier + shift.to(earlier.device)
        new_row, grown = calibrate.new_expert_row(
            layer_stats,
            x,
            earlier,
            top_k=layer.top_k,
            renormalize=layer.cfg.renormalize,
            leak_budget=row.leak_budget,
            seed=row.seed,
            scale=row_scale,
            reference_norm=reference_norm,
            new_windows=new_windows,
        )
        layer.domain_stats = refit if row.refit_rows else grown
        layer.router.set_row(n, new_row)


def _router_rows(model: Transformer, n: int) -> dict[str, torch.Tensor]:
    """The router tensors with a row per routed expert (grown to n + 1 rows), their first n
    rows: what the earlier experts' rows were before a refit."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.router." in name and tensor.dim() == 2 and tensor.shape[0] == n + 1:
            out[name] = tensor[:n].clone()
    return out


def _grown_config(moe: MoEConfig, num_experts: int, domains: list[str]) -> MoEConfig:
    fields = {**vars(moe), "num_experts": num_experts, "domains": domains}
    fields["top_k"] = min(fields["top_k"], num_experts)
    return MoEConfig(**fields)


@torch.no_grad()
def remove_from_model(model: Transformer, index: int) -> Transformer:
    """Drop routed expert ``index`` (its FFN and router entry) in place."""
    cfg = model.cfg.moe
    assert cfg is not None
    if cfg.num_experts <= 1:
        raise NexusError("cannot remove the last routed expert of an MoE")
    domains = [d for j, d in enumerate(cfg.domains) if j != index] if cfg.domains else []
    shrunk = _grown_config(cfg, cfg.num_experts - 1, domains)
    for layer in model.moe_layers():
        stats = layer.domain_stats
        layer.remove_expert(
            index, shrunk, None if stats is None else calibrate.drop_expert(stats, index)
        )
    model.cfg.moe = shrunk
    return model


def _moments_of_file(
    stats: DomainStats, moe: Transformer, expert: Transformer, expert_dir: Path, domain: str
) -> tuple[list[calibrate.DomainMoments], torch.Tensor | None]:
    """The moments of the MoE's layers from the new domain's statistics file, checked against
    the domain, the router and the expert (``domain_stats.for_moe``), and the MoE checked to
    compute what the dense expert does on its tokens (every weight but its experts' is the
    expert's: docs/design.md §5.7)."""
    from nexus_moe.checkpoint import load_config, open_weights

    if stats.domain != domain:
        raise NexusError(
            f"--stats: statistics of the domain '{stats.domain}', the new expert's is '{domain}'"
        )
    differs = _first_shared_difference(moe, expert)
    if differs is not None:
        raise NexusError(
            f"--stats: the MoE's '{differs}' is not the new expert's, so the expert's statistics "
            "do not describe what the MoE computes (the MoE was trained beyond its experts, or "
            "the expert was not branched FFN-only from its seed); place the row from --corpus, "
            "or extend an MoE whose training kept its shared weights (train_only=[mlp.experts])"
        )
    cfg = moe.cfg
    assert cfg.moe is not None
    blocks = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    fingerprint = domain_stats.tensor_fingerprint(
        open_weights(expert_dir, load_config(expert_dir)[0])
    )
    return domain_stats.for_moe(stats, blocks, cfg.moe.router_context, fingerprint, "--stats")


def _first_shared_difference(moe: Transformer, expert: Transformer) -> str | None:
    """The first weight outside the MoE layers' experts and routers in which ``moe`` and the
    dense ``expert`` differ (None when they share all of them)."""
    mine = moe.state_dict()
    moe_blocks = {i for i, block in enumerate(moe.model.layers) if block.is_moe}
    for name, tensor in expert.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) in moe_blocks and parts[3] == "mlp":
            continue
        if name not in mine or not torch.equal(mine[name], tensor):
            return name
    return None


@dataclass(frozen=True)
class ExtendOptions:
    """The settings of :func:`extend` besides its inputs and output folder (documented there)."""

    domain: str | None = None
    domain_embeddings: Any = None  # a DomainEmbeddings
    reset_linear_router: bool = False
    merge_lambda: float | None = None
    seed: int = 0
    calibration_shards: TokenShards | None = None
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    leak_budget: float | None = None
    refit_rows: bool = calibrate.REFIT_EARLIER_ROWS
    row_scale: float | None = None
    calibration_stats: DomainStats | None = None
    router_init: str | None = None  # None: the MoE's own; another than its own is refused


def extend(
    moe_dir: str | Path,
    expert_dir: str | Path,
    out_dir: str | Path,
    domain: str | None = None,
    domain_embeddings=None,
    reset_linear_router: bool = False,
    merge_lambda: float | None = None,
    seed: int = 0,
    calibration_shards: TokenShards | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    leak_budget: float | None = None,
    refit_rows: bool = calibrate.REFIT_EARLIER_ROWS,
    row_scale: float | None = None,
    calibration_stats: DomainStats | None = None,
    router_init: str | None = None,
) -> Path:
    """Extend the MoE checkpoint ``moe_dir`` with the dense expert ``expert_dir`` (docs/design.md §7).

    ``domain`` defaults to the expert's metadata ``domain``. ``domain_embeddings`` (a
    :class:`~nexus_moe.embed.DomainEmbeddings` holding that domain, made with the MoE's embedder)
    is required for Nexus routers. ``merge_lambda`` defaults to 0 for an expert branched with
    only its FFNs trained (its other weights are the seed's: merging them would only pull the
    MoE back towards the seed) and to 1/(n+1) otherwise. With ``calibration_shards`` (token
    shards holding the new domain, made with the MoE's tokenizer; see ``pipeline.tokens_for``)
    and an MoE with a calibrated router, the
    new expert's router row is placed from ``calibration_tokens`` tokens of the domain's
    training text, so the MoE routes the domain to it before any finetuning; its norm is
    bounded by the earlier domains' loss on the windows kept with the statistics (see
    :func:`extend_model`; the checkpoint's metadata records the result), or ``row_scale``
    times the earlier rows', or, with ``leak_budget``, fitted so that it takes at most that
    share of the earlier domains' gates on their own experts; with ``refit_rows`` (and no leak
    budget) the earlier experts' rows are refit among all the domains. ``calibration_stats``
    (the domain's statistics file, :mod:`nexus_moe.domain_stats`) place the row in place of its
    text, for an expert branched FFN-only. An MoE upcycled with a peer's ``--router-init`` grows
    by the peer's rule instead (``router_init``: None or the MoE's own; docs/design.md §5.8).
    """
    options = ExtendOptions(
        domain=domain,
        domain_embeddings=domain_embeddings,
        reset_linear_router=reset_linear_router,
        merge_lambda=merge_lambda,
        seed=seed,
        calibration_shards=calibration_shards,
        calibration_tokens=calibration_tokens,
        leak_budget=leak_budget,
        refit_rows=refit_rows,
        row_scale=row_scale,
        calibration_stats=calibration_stats,
        router_init=router_init,
    )
    return extend_with(moe_dir, expert_dir, out_dir, options)


def extend_with(
    moe_dir: str | Path, expert_dir: str | Path, out_dir: str | Path, options: ExtendOptions
) -> Path:
    """:func:`extend` with its settings as one :class:`ExtendOptions`."""
    o = options
    check_extend_options(
        o.calibration_shards is not None or o.calibration_stats is not None,
        o.calibration_tokens, o.leak_budget, o.refit_rows, o.row_scale, o.merge_lambda,
    )  # fmt: skip
    if o.calibration_stats is not None and o.calibration_shards is not None:
        raise NexusError("--stats: the new row is placed from --corpus or --stats; give one")
    if o.calibration_stats is not None and o.leak_budget:
        raise NexusError("--leak-budget is estimated on the domain's text: pass --corpus")
    leak_budget = o.leak_budget or None  # 0: the default bound
    moe_dir, expert_dir, out_dir = Path(moe_dir), Path(expert_dir), Path(out_dir)
    peer = peer_init.check_extend(load_config(moe_dir)[0].moe, moe_dir, o)  # before the weights
    moe, moe_meta = load_checkpoint(moe_dir)
    expert, expert_meta = load_checkpoint(expert_dir)
    if moe.cfg.moe is None:
        raise NexusError(f"{moe_dir}: not an MoE checkpoint; use `upcycle` to build one")
    _check_compatible(moe_dir, moe.cfg, expert_dir, expert.cfg)
    ours, theirs = moe_meta.get("seed_sha256"), expert_meta.get("seed_sha256")
    if ours and theirs and ours != theirs:
        raise NexusError(
            f"{expert_dir}: this expert was branched from another seed than the MoE in "
            f"{moe_dir} (seed hashes {theirs[:12]} vs {ours[:12]}); branch it from the MoE's seed"
        )
    domain = o.domain or expert_meta.get("domain")
    if not domain:
        raise NexusError(f"{expert_dir}: no domain in its metadata; pass --domain NAME")
    embedding = _domain_embedding(moe.cfg.moe, moe_dir, domain, o.domain_embeddings)
    if moe.cfg.moe.router == RouterType.nexus and o.reset_linear_router:
        raise NexusError("--reset-router applies to linear routers only")
    merge_lambda = o.merge_lambda
    if merge_lambda is None and expert_meta.get("train_only") == list(FFN_PARAMETERS):
        merge_lambda = 0.0
    windows = None
    if o.calibration_shards is not None:
        windows = calibrate.domain_windows(
            o.calibration_shards, domain, moe.cfg.max_seq_len, o.calibration_tokens
        )
        require_text(windows, o.calibration_shards.data_dir, domain)
    moments, new_held = None, None
    if o.calibration_stats is not None:
        moments, new_held = _moments_of_file(o.calibration_stats, moe, expert, expert_dir, domain)
    placement: dict = {}
    if peer:  # by the peer's own rule (docs/design.md §5.8)
        undo = _extend_by_peer(moe, expert, domain, windows, merge_lambda, moe_meta, moe_dir)
    else:
        moe, undo = extend_model(
            moe, expert, domain, embedding, o.reset_linear_router, merge_lambda, o.seed, windows,
            leak_budget, o.refit_rows, o.row_scale, report=placement,
            calibration_moments=moments, new_held=new_held,
        )  # fmt: skip
    merged_now = _as_after_removal(moe.state_dict(), undo)
    metadata = {
        **moe_meta,
        "stage": "extend",
        "extended_with": {
            "domain": domain,
            "expert": str(expert_dir),
            "from": str(moe_dir),
            **({"new_row": placement} if placement else {}),
        },
        "undo": {"domain": domain, "merged_fingerprint": _fingerprint(merged_now)},
    }
    tokenizer = moe_dir / TOKENIZER_FILE
    save_checkpoint(
        out_dir,
        moe,
        tokenizer if tokenizer.is_file() else None,
        metadata=metadata,
        extra_files={UNDO_FILE: undo} if undo else None,
    )
    return out_dir


def _extend_by_peer(
    moe: Transformer,
    expert: Transformer,
    domain: str,
    windows: torch.Tensor | None,
    merge_lambda: float | None,
    moe_meta: dict[str, Any],
    moe_dir: Path,
) -> dict[str, torch.Tensor]:
    """Add ``expert`` to an MoE upcycled with a peer's ``--router-init``: the other weights
    merged as for any MoE, the new row placed by the peer's rule; returns the undo record."""
    assert moe.cfg.moe is not None
    if domain in moe.cfg.moe.domains:
        raise NexusError(f"the MoE already has an expert for domain '{domain}'")
    n = moe.cfg.moe.num_experts
    undo = _merge_weights(moe, expert, 1.0 / (n + 1) if merge_lambda is None else merge_lambda)
    peer_init.grow(moe, expert, domain, windows, moe_meta, moe_dir)
    return undo


def _domain_embedding(
    moe_cfg: MoEConfig, moe_dir: Path, domain: str, domain_embeddings
) -> torch.Tensor | None:
    """The new domain's embedding for a Nexus router (checked against the MoE's), else None."""
    if not moe_cfg.uses_nexus:
        return None
    if domain_embeddings is None:
        raise NexusError(
            f"the MoE in {moe_dir} routes with domain embeddings: pass --embeddings with an "
            f"embedding for '{domain}'"
        )
    if moe_cfg.embedder and domain_embeddings.embedder != moe_cfg.embedder:
        raise NexusError(
            f"domain embeddings were made with {domain_embeddings.embedder} but the MoE uses "
            f"{moe_cfg.embedder}; re-run embed-domains with --embedder "
            f"{moe_cfg.embedder}"
        )
    embedding = domain_embeddings.get([domain])[0]
    if embedding.numel() != moe_cfg.domain_embedding_dim:
        raise NexusError(
            f"domain embeddings have dimension {embedding.numel()} but the MoE in {moe_dir} "
            f"routes with {moe_cfg.domain_embedding_dim}-dimensional ones; re-run "
            "embed-domains with the MoE's embedder"
        )
    return embedding


def remove_expert(ckpt_dir: str | Path, out_dir: str | Path, domain: str) -> Path:
    """Remove the routed expert of ``domain`` from an MoE checkpoint.

    When ``ckpt_dir`` is the unmodified output of :func:`extend` for that domain, the merged
    weights are restored from its undo record, giving back the original model bit-exactly.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model, meta = load_checkpoint(ckpt_dir)
    if model.cfg.moe is None:
        raise NexusError(f"{ckpt_dir}: not an MoE checkpoint")
    domains = model.cfg.moe.domains
    if domain not in domains:
        raise NexusError(f"{ckpt_dir}: no expert for domain '{domain}' (experts: {domains})")
    if model.cfg.moe.router_init != "nexus":  # by the peer's own rule
        peer_init.shrink(model, domains.index(domain), ckpt_dir)
    else:
        remove_from_model(model, domains.index(domain))
    undo_info = meta.get("undo") or {}
    restored = False
    if undo_info.get("domain") == domain and (ckpt_dir / UNDO_FILE).is_file():
        undo = read_safetensors(ckpt_dir / UNDO_FILE)
        state = model.state_dict()
        current = _as_after_removal(state, undo)
        if _fingerprint(current) == undo_info.get("merged_fingerprint"):
            for name in current:
                state[name].copy_(undo[name])
            stats = {k[len(_STATS_UNDO) :]: v for k, v in undo.items() if k.startswith(_STATS_UNDO)}
            if stats:  # the statistics as they were before a refit
                layers = model.moe_layers()
                for layer, layer_stats in zip(
                    layers, calibrate.stats_from_tensors(stats, len(layers)), strict=True
                ):
                    layer.domain_stats = layer_stats
            restored = True
    meta = {k: v for k, v in meta.items() if k not in ("undo", "extended_with")}
    meta.update({"stage": "remove-expert", "removed": domain, "merge_undone": restored})
    tok = ckpt_dir / TOKENIZER_FILE
    save_checkpoint(out_dir, model, tok if tok.is_file() else None, metadata=meta)
    return out_dir
