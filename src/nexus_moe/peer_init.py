"""``--router-init``: an MoE routed by a training-free peer, upcycled and grown by its own rule
(docs/design.md §5.8).

``upcycle --router-init METHOD`` assembles the MoE as the upcycling method says, then places the
peer's rows on it (:func:`nexus_moe.routers.peers.place_peer_rows`: each domain's training text
through its own expert, the seed's hidden states for mergekit, the experts' weights alone for
Arrow) and writes, beside the weights, what ``extend`` and ``remove-expert`` need to grow and
shrink it by the peer's rule later (``peer_router.safetensors``). ``extend`` of such an MoE
follows its peer: DUME re-solves every row, the mean rows and PHATGOOSE place the new row,
mergekit recomputes every negative from the seed the MoE was upcycled from.

The options that shape the calibrated ``nexus`` rows (``--calibrate``, ``--stats``, ``--row-scale``,
``--leak-budget``, ``--refit-rows``, ``--embeddings``) do nothing for a peer and are refused, as is
any combination a peer cannot be built from; each with one line naming the option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from nexus_moe import calibrate
from nexus_moe.checkpoint import (
    WEIGHTS_FILE,
    load_checkpoint,
    model_state_dict,
    require_text,
    seed_hash,
)
from nexus_moe.config import Method, ModelConfig, MoEConfig, RouterType, check_option
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.routers import peers

if TYPE_CHECKING:
    from nexus_moe.data import TokenShards
    from nexus_moe.upcycle_inputs import DenseInput

UpcycleOptions = Any  # nexus_moe.upcycle.UpcycleOptions (which imports this module)

NATIVE = "native"


def upcycle_options(method: Method, o: UpcycleOptions) -> UpcycleOptions:
    """``o`` checked for ``o.router_init``; for a peer, with the MoE settings that name it (a
    linear router holding the peer's rows) and nexus's calibration off."""
    init = o.router_init
    check_option("router_init", init)
    overrides = dict(o.moe_overrides or {})
    if "router_init" in overrides:
        raise NexusError("--set router_init: the router init is chosen with --router-init")
    if init == "nexus":
        return o
    flag = f"--router-init {init}"
    if not method.rules.routes_domains:
        what = "merges the experts into one dense model" if not method.is_moe else (
            "routes between copies of the seed, not domain experts")  # fmt: skip
        raise NexusError(f"{flag}: {method.value} {what}; use nexus, btx, moe-linear or "
                         "nexus-paper")  # fmt: skip
    if o.domain_embeddings is not None:
        raise NexusError(f"--embeddings: {flag} routes without domain embeddings; drop "
                         "--embeddings")  # fmt: skip
    if o.btx_include_seed:
        raise NexusError(f"{flag}: the seed as a routed expert has no domain of its own to place "
                         "a row from; drop --btx-include-seed")  # fmt: skip
    if o.domain_stats:
        raise NexusError(f"--stats: {flag} places its rows from the domains' text (--corpus), "
                         "not from statistics files; drop --stats")  # fmt: skip
    if o.calibrate_router is not None:
        raise NexusError(f"--calibrate/--no-calibrate: apply to nexus's calibrated rows; {flag} "
                         "places its own; drop the flag")  # fmt: skip
    _check_text(
        init, o.calibration_shards is not None,
        f"--corpus: {flag} places its rows from the experts' weights alone and reads no text; "
        "drop --corpus",
        f"{flag} places its rows from each domain's training text: pass --corpus (the corpus the "
        "experts were branched on)",
    )  # fmt: skip
    if o.out_format != NATIVE:
        raise NexusError(
            f"{flag}: the peer's rows are placed on the assembled MoE, written as a nexus-moe "
            "checkpoint; upcycle with --format native, then `nexus-moe export` it"
        )
    router = overrides.get("router", RouterType.linear.value)
    if router != RouterType.linear.value:
        raise NexusError(f"--set router={router}: {flag} places its rows in its own router; "
                         "drop --set router")  # fmt: skip
    overrides.update(router=RouterType.linear.value, router_init=init)
    return replace(o, moe_overrides=overrides, calibrate_router=False)


def upcycle_placement(
    o: UpcycleOptions, cfg: ModelConfig, seed: DenseInput, domains: list[str]
) -> Callable[[Path], None] | None:
    """The step that places a peer's rows on the written (not yet published) checkpoint, with
    each domain's windows read now (a domain without text is refused before anything is
    written); None for ``nexus``."""
    init = o.router_init
    if init == "nexus":
        return None
    windows = None
    if peers.reads_text(init):
        windows = _domain_windows(o.calibration_shards, domains, cfg, o.calibration_tokens)
    return functools.partial(_place_in_place, method=init, windows=windows,
                             seed=seed if peers.needs_seed(init) else None)  # fmt: skip


def _domain_windows(
    shards: TokenShards | None, domains: list[str], cfg: ModelConfig, num_tokens: int
) -> list[torch.Tensor]:
    assert shards is not None
    out = []
    for domain in domains:
        windows = calibrate.domain_windows(shards, domain, cfg.max_seq_len, num_tokens)
        require_text(windows, shards.data_dir, domain)
        out.append(windows)
    return out


def _place_in_place(
    ckpt_dir: Path, method: str, windows: list[torch.Tensor] | None, seed: DenseInput | None
) -> None:
    """Place peer ``method``'s rows on the checkpoint in ``ckpt_dir`` and write its state."""
    from nexus_moe.hf.importing import build_model

    model, _ = load_checkpoint(ckpt_dir)
    seed_model = None if seed is None else build_model(seed.cfg, seed.tensors)
    peers.place_peer_rows(model, method, windows, seed_model)
    save_file(model_state_dict(model), str(ckpt_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    peers.write_model_state(model, ckpt_dir)


# --------------------------------------------------------------------------------------------
# extend and remove-expert


def check_extend(moe_cfg: MoEConfig | None, moe_dir: Path, o: Any) -> bool:
    """Whether the MoE in ``moe_dir`` grows by a peer's rule; refuses a ``--router-init`` other
    than the MoE's and, for a peer, the options of nexus's calibrated row and missing text.
    ``o``: the :class:`~nexus_moe.extend.ExtendOptions`."""
    check_option("router_init", o.router_init)
    if moe_cfg is None:  # (not an MoE: refused where the model is loaded)
        return False
    own = moe_cfg.router_init
    if o.router_init is not None and o.router_init != own:
        raise NexusError(
            f"--router-init {o.router_init}: the MoE in {moe_dir} was upcycled with "
            f"--router-init {own} and grows by that rule; drop --router-init (a router init is "
            "chosen at upcycle)"
        )
    if own == "nexus":
        return False
    given = [
        flag
        for flag, value in (
            ("--leak-budget", o.leak_budget),
            ("--refit-rows", o.refit_rows),
            ("--row-scale", o.row_scale),
            ("--stats", o.calibration_stats is not None),
            ("--embeddings", o.domain_embeddings is not None),
            ("--reset-router", o.reset_linear_router),
        )
        if value
    ]
    if given:
        raise NexusError(f"{given[0]}: shapes nexus's rows; the {own}-routed MoE in {moe_dir} "
                         f"places its new row by {own}'s rule; drop {given[0]}")  # fmt: skip
    _check_text(
        own, o.calibration_shards is not None,
        f"--corpus: the arrow-routed MoE in {moe_dir} places the new row from the expert's "
        "weights alone and reads no text; drop --corpus",
        f"the {own}-routed MoE in {moe_dir} places the new row from the new domain's training "
        "text: pass --corpus holding it",
    )  # fmt: skip
    return True


def _check_text(method: str, given: bool, drop: str, need: str) -> None:
    """NexusError ``drop`` when text is ``given`` to a peer that reads none, ``need`` when a peer
    that reads it has none."""
    if given and not peers.reads_text(method):
        raise NexusError(drop)
    if not given and peers.reads_text(method):
        raise NexusError(need)


def _state(model: Transformer, moe_dir: Path) -> peers.PeerState:
    state = getattr(model, "peer_state", None)
    if state is None:
        assert model.cfg.moe is not None
        init = model.cfg.moe.router_init
        raise NexusError(
            f"{moe_dir}: no {peers.STATE_FILE}, so its {init}-routed experts cannot be changed "
            f"by {init}'s rule (a Hugging Face export does not carry it); upcycle the MoE again "
            "from its experts"
        )
    return state


def grow(
    moe: Transformer,
    expert: Transformer,
    domain: str,
    windows: torch.Tensor | None,
    moe_meta: dict[str, Any],
    moe_dir: Path,
) -> None:
    """Append ``expert`` to the peer-routed ``moe`` by its peer's rule (the other weights merged
    before, as ``extend`` does)."""
    state = _state(moe, moe_dir)
    seed = _recorded_seed(moe_meta, moe_dir) if state.method.startswith("mergekit") else None
    peers.add_peer_expert(moe, state, expert, domain, windows, seed)


def shrink(model: Transformer, index: int, ckpt_dir: Path) -> None:
    """Remove routed expert ``index`` of the peer-routed ``model`` by its peer's rule."""
    peers.remove_peer_expert(model, _state(model, ckpt_dir), index)


def _recorded_seed(meta: dict[str, Any], moe_dir: Path) -> Transformer:
    """The seed the MoE was upcycled from (its metadata's first input), checked by its hash."""
    from nexus_moe.hf.importing import build_model
    from nexus_moe.upcycle_inputs import open_input

    inputs = meta.get("inputs") or []
    path = Path(inputs[0]) if inputs and isinstance(inputs[0], str) else None
    if path is None or not path.exists():
        raise NexusError(
            f"{moe_dir}: mergekit's gates come from the seed's hidden states, but the seed it "
            f"was upcycled from ({path or 'not recorded'}) is not there; put it back there"
        )
    recorded, found = meta.get("seed_sha256"), seed_hash(path)
    if recorded and found and recorded != found:
        raise NexusError(
            f"{path}: not the seed {moe_dir} was upcycled from (seed hashes {found[:12]} vs "
            f"{recorded[:12]}); put that seed back there"
        )
    source = open_input(path)
    return build_model(source.cfg, source.tensors)
