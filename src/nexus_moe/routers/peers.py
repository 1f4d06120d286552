"""Training-free peer routers (docs/design.md §5.8).

The router placements a user who wants "dense experts in, MoE out, experts added without
training" could pick instead of the calibrated Nexus rows, rebuilt here so that they can be
measured on the same experts (``benchmarks/peer_routers.py``) and chosen with ``upcycle
--router-init`` (:mod:`nexus_moe.peer_init`). Each works on any MoE this project builds: its rows
go into a linear router (the bias-free linear peers, ``LINEAR_METHODS``) or a fixed
:class:`~nexus_moe.routers.peer_router.PeerRouter` (a bias or a non-linear score), the model's
config names it (``moe.router_init``), and it grows and shrinks by one expert by the peer's own
rule from a :class:`PeerState` saved beside the weights (``peer_router.safetensors``).

=====================  =====================================================================
method                 rows (per MoE layer), from
=====================  =====================================================================
``dume``               ridge regression of one-hot domain labels on ``x`` (each domain's
                       tokens forced through its own expert), columns scaled to unit norm
``dume-bias``          the same on ``[x, 1]``: a bias per expert, scaled with its column
``mean``               the normalised mean input of each domain (its tokens on its expert)
``arrow``              no data: the top right singular vector of each expert's FFN input
                       weights minus the seed's; scores ``|x . v|``
``mergekit-hidden``    the seed's FFN inputs at the last token of a few prompts per domain,
                       the other domains' subtracted (negative prompts), unit norm
``mergekit-hidden-avg``  the same, averaged over each prompt's tokens
``phatgoose``          a sigmoid gate per expert and layer trained on its own domain with the
                       expert frozen; scores the standardised dot product
=====================  =====================================================================

Every peer's scores are multiplied by one temperature per layer (Arrow and mergekit keep their
own fixed one, 1), then the MoE layer applies its own softmax / top-k / renormalisation.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from nexus_moe.calibrate import moe_inputs
from nexus_moe.config import ROUTER_INITS, RouterType
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.routers import build_router
from nexus_moe.routers.peer_router import PEER_SCORES, PeerRouter

__all__ = [
    "LINEAR_METHODS",
    "METHODS",
    "STATE_FILE",
    "PeerRouter",
    "PeerState",
    "add_peer_expert",
    "attach_state",
    "place_peer_rows",
    "read_state",
    "remove_peer_expert",
    "write_model_state",
]

METHODS = ROUTER_INITS[1:]  # every name of --router-init but nexus
# Peers whose routing is ``x . e_i`` with no bias: their rows are a linear router's weight,
# which every Hugging Face MoE format holds as its gate.
LINEAR_METHODS = ("dume", "mean", "mergekit-hidden", "mergekit-hidden-avg")
STATE_FILE = "peer_router.safetensors"
DUME_LAMBDA = 1e-2  # DUME's ridge on the summed Gram matrix (its default)
MERGEKIT_PROMPTS = 8  # prompts per domain for the mergekit gates
MERGEKIT_PROMPT_LEN = 64
PHATGOOSE_STEPS = 100
PHATGOOSE_LR = 1e-2
PHATGOOSE_BATCH = 8
_TAU_GRID = torch.logspace(-3, 2.5, 56)
_KEEP_FOR_TAU = 1024  # tokens per domain and layer the temperature is fitted on
_SCORE = {m: PEER_SCORES.get(m, "dot") for m in METHODS}
_FITTED = ("dume", "dume-bias", "mean", "phatgoose")  # the peers with a fitted temperature


@dataclass
class PeerState:
    """What a placement was made from, kept to grow and shrink the MoE by the peer's rule.

    Everything is per expert (in the MoE's order), so removing an expert drops its entries and
    gives back the rows the MoE had before it was added, bit for bit.
    """

    method: str
    temperatures: list[float]  # per MoE layer
    # Per expert, per MoE layer: DUME's sum of its domain's [x, 1] (float64, the column of
    # X^T Y), the mean rows' mean input (float64), mergekit's prompt state of the seed,
    # PHATGOOSE's gate, or Arrow's singular vector.
    vectors: list[list[torch.Tensor]] = field(default_factory=list)
    grams: list[list[torch.Tensor]] = field(default_factory=list)  # DUME: X^T X of each domain
    seed_ffns: list[torch.Tensor] | None = None  # Arrow: the seed's FFN input weights per layer


def reads_text(method: str) -> bool:
    """Whether peer ``method`` places its rows from the domains' training text (every peer but
    Arrow, which reads the experts' weights alone)."""
    return method != "arrow"


def needs_seed(method: str) -> bool:
    """Whether peer ``method`` needs the seed model (Arrow's weight deltas, mergekit's prompts)."""
    return method == "arrow" or method.startswith("mergekit")


def _check(model: Transformer, method: str) -> list[MoELayer]:
    if method not in METHODS:
        raise NexusError(f"unknown peer router '{method}'; choose one of {', '.join(METHODS)}")
    layers = model.moe_layers()
    if not layers:
        raise NexusError("a peer router needs an MoE model")
    return layers


def fit_temperature(score_fn, inputs: list[torch.Tensor]) -> float:
    """The tau of ``_TAU_GRID`` maximising the mean log-probability of each domain's own expert
    under ``softmax(tau * score_fn(x))`` (``inputs[i]``: domain i's tokens)."""
    x = torch.cat([s[:_KEEP_FOR_TAU] for s in inputs])
    labels = torch.cat([torch.full((min(len(s), _KEEP_FOR_TAU),), i) for i, s in enumerate(inputs)])
    scores = score_fn(x).double()
    best, best_ll = 1.0, -math.inf
    for tau in _TAU_GRID.tolist():
        ll = torch.log_softmax(tau * scores, -1)[torch.arange(len(labels)), labels].mean().item()
        if ll > best_ll:
            best, best_ll = tau, ll
    return best


def _augmented(x: torch.Tensor, bias: bool) -> torch.Tensor:
    xa = x.double()
    return torch.cat([xa, torch.ones(len(xa), 1, dtype=xa.dtype)], 1) if bias else xa


def dume_solve(
    gram: torch.Tensor, targets: torch.Tensor, bias: bool, lam: float = DUME_LAMBDA
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (E, H) and bias (E,) (None without): ``W = (A + lam I)^-1 B``, each column of
    ``[W; b]`` divided by the norm of its W part."""
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), targets)
    b = w[-1] if bias else None
    w = w[:-1] if bias else w
    norm = w.norm(dim=0).clamp_min(1e-6)
    return (w / norm).t().float(), None if b is None else (b / norm).float()


def _scores(method: str, rows: torch.Tensor, bias: torch.Tensor | None):
    router = PeerRouter(rows, _SCORE[method], 1.0, bias)
    return lambda x: router(x)


def forced_inputs(model: Transformer, windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per expert i, per MoE layer: what the router scores for ``windows[i]`` with every token
    on expert i (each domain through its own expert, as the dense expert computes it)."""
    return [moe_inputs(model, w, i) for i, w in enumerate(windows)]


def seed_prompt_states(
    seed: Transformer, windows: torch.Tensor, moe_blocks: list[int], average: bool
) -> list[torch.Tensor]:
    """mergekit's gate vectors before subtraction: the seed's FFN input at each MoE block for
    ``MERGEKIT_PROMPTS`` prompts (the first ``MERGEKIT_PROMPT_LEN`` tokens of windows spread
    over ``windows``), at the last token or averaged over the prompt, then over prompts."""
    picks = torch.linspace(0, windows.shape[0] - 1, MERGEKIT_PROMPTS).round().long()
    prompts = windows[picks, :MERGEKIT_PROMPT_LEN]
    captured: dict[int, torch.Tensor] = {}

    def grab(i: int, module, args) -> None:
        h = args[0].float()
        captured[i] = h.mean(1) if average else h[:, -1]

    hooks = [
        seed.model.layers[b].mlp.register_forward_pre_hook(functools.partial(grab, b))
        for b in moe_blocks
    ]
    try:
        with torch.no_grad():
            seed.eval()
            seed(prompts)
    finally:
        for h in hooks:
            h.remove()
    return [captured[b].mean(0) for b in moe_blocks]


def _mergekit_rows(states: list[list[torch.Tensor]], layer: int) -> torch.Tensor:
    """Each domain's state minus the mean of the others' (the negative prompts), unit norm."""
    pos = torch.stack([s[layer] for s in states])
    n = len(pos)
    neg = (pos.sum(0, keepdim=True) - pos) / max(n - 1, 1)
    return F.normalize(pos - neg if n > 1 else pos, dim=-1)


def _ffn_inputs(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate.detach().float(), up.detach().float()])  # (2I, H): the weights reading x


def arrow_vector(delta: torch.Tensor) -> torch.Tensor:
    """The top right singular vector (H,) of an FFN's input-weight delta (2I, H)."""
    _, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return vh[0].float()


def _moe_blocks(model: Transformer) -> list[int]:
    return [i for i, b in enumerate(model.model.layers) if isinstance(b.mlp, MoELayer)]


def seed_ffn_inputs(seed: Transformer, moe_blocks: list[int]) -> list[torch.Tensor]:
    """Arrow's reference: the seed's FFN input weights (2I, H) at each MoE block."""
    mlps = [seed.model.layers[b].mlp for b in moe_blocks]
    return [_ffn_inputs(m.gate_proj.weight, m.up_proj.weight) for m in mlps]


def train_phatgoose_gates(
    model: Transformer,
    expert: int,
    windows: torch.Tensor,
    steps: int = PHATGOOSE_STEPS,
    lr: float = PHATGOOSE_LR,
    seed: int = 0,
) -> list[torch.Tensor]:
    """PHATGOOSE's gate of ``expert`` at every MoE layer: all tokens on that expert, its output
    scaled by ``sigmoid(x . g)`` (x: what the router scores), only g trained (from 0) on the
    language-modelling loss of its domain's ``windows``; every weight of the model frozen."""
    layers = model.moe_layers()
    hidden = model.cfg.hidden_size
    gates = [torch.zeros(hidden, requires_grad=True) for _ in layers]
    masks = [layer.expert_mask for layer in layers]
    flags = [p.requires_grad for p in model.parameters()]
    hooks = []

    def gated(i: int, module: MoELayer, args, output):
        y, info = output
        x = module.routing_input(args[0])
        return y * torch.sigmoid(x.float() @ gates[i]).unsqueeze(-1).to(y.dtype), info

    for i, layer in enumerate(layers):
        mask = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask[expert] = True
        layer.expert_mask = mask
        hooks.append(layer.register_forward_hook(functools.partial(gated, i)))
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(gates, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no usage counters, no dropout
    try:
        for _ in range(steps):
            batch = windows[torch.randint(0, windows.shape[0], (PHATGOOSE_BATCH,), generator=gen)]
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   batch[:, 1:].reshape(-1))  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for layer, mask in zip(layers, masks, strict=True):
            layer.expert_mask = mask
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return [g.detach().clone() for g in gates]


def _install(model: Transformer, method: str) -> None:
    """Make ``model`` a ``method``-routed MoE: its config names the peer (a linear router) and
    every MoE layer gets the router that config builds (a linear one, or a PeerRouter), unless
    it has it already; the rows are placed after."""
    cfg = model.cfg.moe
    assert cfg is not None
    peer_cfg = replace(cfg, router=RouterType.linear, router_init=method)
    model.cfg.moe = peer_cfg
    for layer in model.moe_layers():
        with torch.random.fork_rng(devices=[]):  # a linear router's own init: not the global RNG
            fresh = build_router(peer_cfg, model.cfg.hidden_size)
        if type(fresh) is not type(layer.router) or (
            getattr(fresh, "score", None) != getattr(layer.router, "score", None)
        ):
            ref = layer.experts.gate_proj
            # (a linear router's weight in the model's dtype; a peer router's buffers float32)
            layer.router = (
                fresh.to(ref.device)
                if isinstance(fresh, PeerRouter)
                else fresh.to(device=ref.device, dtype=ref.dtype)
            )
        layer._set_config(peer_cfg)


def _rows(state: PeerState, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``layer``'s rows (E, H) and bias from ``state``: DUME solves its ridge regression
    on every domain's sums, mean rows normalise the means, mergekit subtracts each domain's
    negatives, Arrow and PHATGOOSE take their vectors as they are."""
    method = state.method
    vectors = [v[layer] for v in state.vectors]
    if method in ("dume", "dume-bias"):
        gram = torch.zeros_like(state.grams[0][layer])
        for g in state.grams:  # in expert order, so that a removal gives the same sum back
            gram += g[layer]
        return dume_solve(gram, torch.stack(vectors, 1), method == "dume-bias")
    if method == "mean":
        return F.normalize(torch.stack(vectors).double(), dim=-1).float(), None
    if method.startswith("mergekit"):
        return _mergekit_rows(state.vectors, layer), None
    return torch.stack(vectors).float(), None


@torch.no_grad()
def _apply(model: Transformer, state: PeerState, only: int | None = None) -> None:
    """Write the rows of ``state`` (times each layer's temperature) into every MoE layer's
    router; ``only``: in a linear router, that expert's row alone (the others, trained or not,
    are kept)."""
    for i, layer in enumerate(model.moe_layers()):
        rows, bias = _rows(state, i)
        router, tau = layer.router, state.temperatures[i]
        if isinstance(router, PeerRouter):
            router.set_rows(rows, bias)
            router.temperature.fill_(tau)
        elif only is not None:
            router.set_row(only, tau * rows[only])
        else:
            router.set_rows(tau * rows)


def _domain_entry(
    state: PeerState,
    model: Transformer,
    expert: int,
    windows: torch.Tensor | None,
    seed: Transformer | None,
    phatgoose_steps: int,
) -> list[torch.Tensor] | None:
    """Append expert ``expert``'s entries to ``state`` (its domain's ``windows``, through the
    MoE with its tokens on that expert); returns those inputs, per layer, where the peer read
    them (for the temperature fit)."""
    method, forced = state.method, None
    if method == "arrow":
        e = [layer.experts for layer in model.moe_layers()]
        assert state.seed_ffns is not None
        state.vectors.append([
            arrow_vector(_ffn_inputs(x.gate_proj[expert], x.up_proj[expert]) - ref)
            for x, ref in zip(e, state.seed_ffns, strict=True)
        ])  # fmt: skip
        return None
    assert windows is not None
    if method.startswith("mergekit"):
        assert seed is not None
        avg = method == "mergekit-hidden-avg"
        state.vectors.append(seed_prompt_states(seed, windows, _moe_blocks(model), avg))
        return None
    if method == "phatgoose":
        with torch.enable_grad():
            state.vectors.append(
                train_phatgoose_gates(model, expert, windows, phatgoose_steps, seed=expert)
            )
    forced = moe_inputs(model, windows, expert)
    if method == "mean":
        state.vectors.append([x.double().mean(0) for x in forced])
    elif method in ("dume", "dume-bias"):
        xs = [_augmented(x, method == "dume-bias") for x in forced]
        state.grams.append([xa.t() @ xa for xa in xs])
        state.vectors.append([xa.sum(0) for xa in xs])
    return forced


def place_peer_rows(
    model: Transformer,
    method: str,
    windows: list[torch.Tensor] | None = None,
    seed: Transformer | None = None,
    phatgoose_steps: int = PHATGOOSE_STEPS,
) -> PeerState:
    """Make ``model`` a ``method``-routed MoE: its config names the peer, every MoE layer's
    router holds the peer's rows, and ``model.peer_state`` the state they were made from.

    ``windows[i]`` (rows, T) int64: training windows of expert i's domain (all but Arrow need
    them); ``seed``: the dense model the experts were branched from (Arrow, mergekit).
    Returns the state :func:`add_peer_expert` and :func:`remove_peer_expert` grow it from.
    """
    layers = _check(model, method)
    n = layers[0].num_experts
    if reads_text(method) and (windows is None or len(windows) != n):
        raise NexusError(f"peer router '{method}' needs calibration windows of every domain")
    if needs_seed(method) and seed is None:
        raise NexusError(f"peer router '{method}' needs the seed model")
    state = PeerState(method, [1.0] * len(layers))
    if method == "arrow":
        assert seed is not None
        state.seed_ffns = seed_ffn_inputs(seed, _moe_blocks(model))
    forced = [
        _domain_entry(state, model, i, None if windows is None else windows[i], seed,
                      phatgoose_steps)
        for i in range(n)
    ]  # fmt: skip
    if method in _FITTED:
        for i in range(len(layers)):
            rows, bias = _rows(state, i)
            samples = [f[i] for f in forced if f is not None]
            state.temperatures[i] = fit_temperature(_scores(method, rows, bias), samples)
    _install(model, method)
    _apply(model, state)
    model.peer_state = state
    return state


@torch.no_grad()
def add_peer_expert(
    model: Transformer,
    state: PeerState,
    expert: Transformer,
    domain: str,
    windows: torch.Tensor | None = None,
    seed: Transformer | None = None,
    phatgoose_steps: int = PHATGOOSE_STEPS,
) -> None:
    """Append ``expert``'s FFNs as a new routed expert and place its row by the peer's rule,
    without training the MoE: DUME adds the new domain's statistics and re-solves every row;
    mean / PHATGOOSE / Arrow place the new row only (temperatures kept); mergekit recomputes
    every row (each domain's negatives now include the new one)."""
    cfg = model.cfg.moe
    assert cfg is not None
    n = cfg.num_experts
    if domain in cfg.domains:
        raise NexusError(f"the MoE already has an expert for domain '{domain}'")
    method = state.method
    if reads_text(method) and windows is None:
        raise NexusError(f"peer router '{method}' needs the new domain's windows")
    if method.startswith("mergekit") and seed is None:
        raise NexusError(f"peer router '{method}' needs the seed model")
    grown = replace(
        cfg, num_experts=n + 1, domains=[*cfg.domains, domain], top_k=min(cfg.top_k, n + 1)
    )
    with torch.random.fork_rng(devices=[]):  # a linear router's random new row: replaced below
        for i, block in enumerate(model.model.layers):
            if isinstance(block.mlp, MoELayer):
                ffn = expert.model.layers[i].mlp
                block.mlp.add_expert(ffn.gate_proj.weight, ffn.up_proj.weight,
                                     ffn.down_proj.weight, grown)  # fmt: skip
    model.cfg.moe = grown
    _domain_entry(state, model, n, windows, seed, phatgoose_steps)
    _apply(model, state, only=n if method in ("mean", "arrow", "phatgoose") else None)
    model.peer_state = state


@torch.no_grad()
def remove_peer_expert(model: Transformer, state: PeerState, index: int) -> None:
    """Drop routed expert ``index`` (opt-out); DUME re-solves without its domain, mergekit
    recomputes the negatives; the other peers drop the row. Right after :func:`add_peer_expert`
    of that expert, the rows are those before it, bit for bit."""
    cfg = model.cfg.moe
    assert cfg is not None
    if cfg.num_experts <= 1:
        raise NexusError("cannot remove the last routed expert of an MoE")
    domains = [d for j, d in enumerate(cfg.domains) if j != index]
    shrunk = replace(cfg, num_experts=cfg.num_experts - 1, domains=domains,
                     top_k=min(cfg.top_k, cfg.num_experts - 1))  # fmt: skip
    for layer in model.moe_layers():
        layer.remove_expert(index, shrunk, None)
    model.cfg.moe = shrunk
    del state.vectors[index]
    if state.grams:
        del state.grams[index]
    if state.method in ("dume", "dume-bias") or state.method.startswith("mergekit"):
        _apply(model, state)
    model.peer_state = state


# --------------------------------------------------------------------------------------------
# the state on disk: safetensors, the method and domains in its metadata


def state_tensors(state: PeerState) -> dict[str, torch.Tensor]:
    """``state`` as named tensors (``expert.{i}.layer.{l}.vector`` / ``.gram``,
    ``layer.{l}.seed_ffn``, ``temperatures``)."""
    out = {"temperatures": torch.tensor(state.temperatures, dtype=torch.float64)}
    for i, per_layer in enumerate(state.vectors):
        for j, v in enumerate(per_layer):
            out[f"expert.{i}.layer.{j}.vector"] = v.contiguous()
    for i, per_layer in enumerate(state.grams):
        for j, g in enumerate(per_layer):
            out[f"expert.{i}.layer.{j}.gram"] = g.contiguous()
    for j, w in enumerate(state.seed_ffns or []):
        out[f"layer.{j}.seed_ffn"] = w.contiguous()
    return out


def write_model_state(model: Transformer, folder: Path) -> None:
    """Write ``model.peer_state`` (if the model has one) as ``folder/peer_router.safetensors``."""
    state = getattr(model, "peer_state", None)
    if state is None or model.cfg.moe is None:
        return
    meta = {"method": state.method, "domains": json.dumps(list(model.cfg.moe.domains))}
    save_file(state_tensors(state), str(Path(folder) / STATE_FILE), metadata=meta)


def read_state(path: Path, method: str, domains: list[str], num_layers: int) -> PeerState:
    """The state in ``path``, checked to be that of a ``method``-routed MoE with these experts'
    ``domains`` and MoE layers; NexusError naming the file otherwise."""
    fix = "it does not belong to this checkpoint: delete it, or upcycle the MoE again"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as exc:
        raise NexusError(f"{path}: not a readable safetensors file ({exc}); {fix}") from None
    if meta.get("method") != method or json.loads(meta.get("domains", "null")) != list(domains):
        raise NexusError(
            f"{path}: the state of a '{meta.get('method')}' router of the experts "
            f"{meta.get('domains')}, the MoE is '{method}' of {list(domains)}; {fix}"
        )
    try:
        temps = tensors["temperatures"].tolist()
        state = PeerState(method, temps)
        layers = range(num_layers)
        state.vectors = [[tensors[f"expert.{i}.layer.{j}.vector"] for j in layers]
                         for i in range(len(domains))]  # fmt: skip
        if method in ("dume", "dume-bias"):
            state.grams = [[tensors[f"expert.{i}.layer.{j}.gram"] for j in layers]
                           for i in range(len(domains))]  # fmt: skip
        if method == "arrow":
            state.seed_ffns = [tensors[f"layer.{j}.seed_ffn"] for j in layers]
    except KeyError as exc:
        raise NexusError(f"{path}: incomplete peer router state (no {exc}); {fix}") from None
    if len(temps) != num_layers:
        raise NexusError(f"{path}: {len(temps)} layers' temperatures for {num_layers}; {fix}")
    return state


def attach_state(model: Transformer, folder: Path) -> None:
    """Set ``model.peer_state`` from ``folder``'s state file when the model is peer-routed and
    the file is there (an exported and re-imported model has none)."""
    cfg = model.cfg.moe
    path = Path(folder) / STATE_FILE
    if cfg is None or cfg.router_init == "nexus" or not path.is_file():
        return
    model.peer_state = read_state(path, cfg.router_init, cfg.domains, len(model.moe_layers()))
