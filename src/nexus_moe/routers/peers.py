"""Training-free peer routers (docs/design.md, "Training-free peer routers").

The router placements a user who wants "dense experts in, MoE out, experts added without
training" could pick instead of the calibrated Nexus rows, rebuilt here so that they can be
measured on the same experts (``benchmarks/peer_routers.py``). Each works on any MoE this project
builds: it replaces every MoE layer's router by a :class:`PeerRouter` that holds the peer's rows
(and, where the peer has one, a bias or a non-linear score), and it grows and shrinks by one
expert by the peer's own rule.

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
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from nexus_moe.calibrate import moe_inputs
from nexus_moe.errors import NexusError
from nexus_moe.model import Transformer
from nexus_moe.moe import MoELayer
from nexus_moe.routers.base import Router

METHODS = (
    "dume",
    "dume-bias",
    "mean",
    "arrow",
    "mergekit-hidden",
    "mergekit-hidden-avg",
    "phatgoose",
)
# Peers whose routing is ``x . e_i`` with no bias: their rows fit any router of this project
# (and the Hugging Face formats), see :func:`export_rows`.
LINEAR_METHODS = ("dume", "mean", "mergekit-hidden", "mergekit-hidden-avg")
DUME_LAMBDA = 1e-2  # DUME's ridge on the summed Gram matrix (its default)
MERGEKIT_PROMPTS = 8  # prompts per domain for the mergekit gates
MERGEKIT_PROMPT_LEN = 64
PHATGOOSE_STEPS = 100
PHATGOOSE_LR = 1e-2
PHATGOOSE_BATCH = 8
_TAU_GRID = torch.logspace(-3, 2.5, 56)
_KEEP_FOR_TAU = 1024  # tokens per domain and layer the temperature is fitted on


class PeerRouter(Router):
    """``logits = tau * score(x, rows) + bias`` with score ``dot`` (``x . r``), ``abs``
    (``|x . r|``, Arrow) or ``standardised`` (``LN(x) . LN(r) / sqrt(H)``, PHATGOOSE; LN
    without affine weights)."""

    def __init__(
        self,
        rows: torch.Tensor,
        score: str = "dot",
        temperature: float = 1.0,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if score not in ("dot", "abs", "standardised"):
            raise ValueError(f"unknown peer score '{score}'")
        self.score, self.temperature = score, float(temperature)
        self.num_experts = rows.shape[0]
        self.register_buffer("rows", rows.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def expert_embeddings(self) -> torch.Tensor:
        return self.rows

    def forward(self, x: torch.Tensor, prev_assignment: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        if self.score == "standardised":
            h = x.shape[-1]
            s = F.layer_norm(x, (h,)) @ F.layer_norm(self.rows, (h,)).t() / math.sqrt(h)
        else:
            s = x @ self.rows.t()
            if self.score == "abs":
                s = s.abs()
        s = self.temperature * s
        return s if self.bias is None else s + self.bias

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        pass  # nothing learned

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.rows = rows.detach().float().to(self.rows.device).clone()
        self.num_experts = rows.shape[0]
        if bias is not None:
            self.bias = bias.detach().float().to(self.rows.device).clone()

    @torch.no_grad()
    def set_row(self, index: int, row: torch.Tensor) -> None:
        self.rows[index].copy_(row.float())

    @torch.no_grad()
    def shift_rows(self, shift: torch.Tensor) -> None:
        self.rows[: shift.shape[0]] += shift.to(self.rows)

    @torch.no_grad()
    def add_expert(self, domain_embedding: torch.Tensor | None = None, reset: bool = False) -> None:
        """Append a zero row (and bias 0); the placement then sets it."""
        self.rows = torch.cat([self.rows, torch.zeros_like(self.rows[:1])])
        if self.bias is not None:
            self.bias = torch.cat([self.bias, torch.zeros_like(self.bias[:1])])
        self.num_experts += 1

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        keep = [i for i in range(self.num_experts) if i != index]
        self.rows = self.rows[keep].clone()
        if self.bias is not None:
            self.bias = self.bias[keep].clone()
        self.num_experts -= 1


@dataclass
class PeerState:
    """What a placement was made from, kept to grow and shrink the MoE by the peer's rule."""

    method: str
    temperatures: list[float]
    # Per expert, per MoE layer: (N, H) inputs of its domain with its tokens on its expert
    # (DUME, mean; a sample of them), or the seed's prompt states (mergekit, (H,) each).
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    # DUME: per layer the Gram matrix A = sum [x,1]^T [x,1] and B = sum [x,1]^T y (float64).
    gram: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    seed_ffns: list[torch.Tensor] | None = None  # Arrow: the seed's FFN input weights per layer
    # Per expert, per layer: its domain's inputs with its tokens on it (temperature fits, DUME).
    forced: list[list[torch.Tensor]] = field(default_factory=list)


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


def _gram(x: torch.Tensor, label: int, num: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.double()
    if bias:
        xa = torch.cat([xa, torch.ones(len(xa), 1, dtype=xa.dtype)], 1)
    y = torch.zeros(xa.shape[1], num, dtype=xa.dtype)
    y[:, label] = xa.sum(0)  # X^T Y with one-hot rows
    return xa.t() @ xa, y


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


_SCORE = {m: "dot" for m in METHODS} | {"arrow": "abs", "phatgoose": "standardised"}


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
    hidden = layers[0].router.expert_embeddings().shape[1]
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


@torch.no_grad()
def _set_routers(model: Transformer, state: PeerState, rows, biases) -> None:
    for i, layer in enumerate(model.moe_layers()):
        bias = None if biases is None else biases[i]
        layer.router = PeerRouter(rows[i], _SCORE[state.method], state.temperatures[i], bias)


def _layer_rows(model: Transformer, state: PeerState, fit: bool) -> None:
    """(Re)compute every layer's rows from ``state`` (DUME re-solves every row; mergekit
    recomputes every negative) and install them; ``fit``: refit the temperatures."""
    method, layers = state.method, model.moe_layers()
    rows, biases = [], [] if method == "dume-bias" else None
    for i, layer in enumerate(layers):
        if method in ("dume", "dume-bias"):
            r, b = dume_solve(state.gram[i], state.targets[i], method == "dume-bias")
            if biases is not None:
                biases.append(b)
        elif method == "mean":
            r = F.normalize(torch.stack([x[i].double().mean(0) for x in state.inputs]), dim=-1)
            r = r.float()
        elif method.startswith("mergekit"):
            r = _mergekit_rows(state.inputs, i)
        elif method == "arrow":
            e = layer.experts
            r = torch.stack([
                arrow_vector(_ffn_inputs(e.gate_proj[j], e.up_proj[j]) - state.seed_ffns[i])
                for j in range(layer.num_experts)
            ])  # fmt: skip
        else:  # phatgoose: the gates themselves
            r = torch.stack([x[i] for x in state.inputs])
        rows.append(r)
        if fit and method in ("dume", "dume-bias", "mean", "phatgoose"):
            b = None if biases is None else biases[-1]
            samples = [x[i] for x in state.forced]
            state.temperatures[i] = fit_temperature(_scores(method, r, b), samples)
    _set_routers(model, state, rows, biases)


def place_peer_rows(
    model: Transformer,
    method: str,
    windows: list[torch.Tensor] | None = None,
    seed: Transformer | None = None,
    phatgoose_steps: int = PHATGOOSE_STEPS,
) -> PeerState:
    """Replace every MoE layer's router of ``model`` by peer ``method``'s placement.

    ``windows[i]`` (rows, T) int64: training windows of expert i's domain (all but Arrow need
    them); ``seed``: the dense model the experts were branched from (Arrow, mergekit).
    Returns the state :func:`add_peer_expert` and :func:`remove_peer_expert` grow it from.
    """
    layers = _check(model, method)
    n = layers[0].num_experts
    if method != "arrow" and (windows is None or len(windows) != n):
        raise NexusError(f"peer router '{method}' needs calibration windows of every domain")
    if method in ("arrow",) or method.startswith("mergekit"):
        if seed is None:
            raise NexusError(f"peer router '{method}' needs the seed model")
    state = PeerState(method, [1.0] * len(layers))
    if method == "arrow":
        blocks = [seed.model.layers[b].mlp for b in _moe_blocks(model)]
        state.seed_ffns = [_ffn_inputs(m.gate_proj.weight, m.up_proj.weight) for m in blocks]
    elif method.startswith("mergekit"):
        blocks = _moe_blocks(model)
        avg = method == "mergekit-hidden-avg"
        state.inputs = [seed_prompt_states(seed, w, blocks, avg) for w in windows]
    elif method == "phatgoose":
        state.inputs = [
            train_phatgoose_gates(model, i, w, phatgoose_steps, seed=i)
            for i, w in enumerate(windows)
        ]
        state.forced = forced_inputs(model, windows)  # for the temperature
    else:
        state.forced = forced_inputs(model, windows)
        _accumulate(state, state.forced)
    _layer_rows(model, state, fit=True)
    return state


def _accumulate(state: PeerState, forced: list[list[torch.Tensor]], start: int = 0) -> None:
    """Fold domains ``start..`` of ``forced`` into the DUME Gram matrices / the mean inputs."""
    bias = state.method == "dume-bias"
    num = len(forced)
    if state.method == "mean":
        state.inputs = [list(x) for x in forced]
        return
    num_layers = len(forced[0])
    if not state.gram:
        h = forced[0][0].shape[1] + (1 if bias else 0)
        state.gram = [torch.zeros(h, h, dtype=torch.float64) for _ in range(num_layers)]
        state.targets = [torch.zeros(h, 0, dtype=torch.float64) for _ in range(num_layers)]
    for i in range(num_layers):
        grown = torch.zeros(state.gram[i].shape[0], num, dtype=torch.float64)
        grown[:, : state.targets[i].shape[1]] = state.targets[i]
        state.targets[i] = grown
        for d in range(start, num):
            a, y = _gram(forced[d][i], d, num, bias)
            state.gram[i] += a
            state.targets[i] += y


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
    grown = replace(
        cfg, num_experts=n + 1, domains=[*cfg.domains, domain], top_k=min(cfg.top_k, n + 1)
    )
    for i, block in enumerate(model.model.layers):
        if isinstance(block.mlp, MoELayer):
            ffn = expert.model.layers[i].mlp
            block.mlp.add_expert(ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight,
                                 grown)  # fmt: skip
    model.cfg.moe = grown
    method = state.method
    if method != "arrow" and windows is None:
        raise NexusError(f"peer router '{method}' needs the new domain's windows")
    if method.startswith("mergekit"):
        avg = method == "mergekit-hidden-avg"
        state.inputs.append(seed_prompt_states(seed, windows, _moe_blocks(model), avg))
    elif method == "phatgoose":
        with torch.enable_grad():
            state.inputs.append(train_phatgoose_gates(model, n, windows, phatgoose_steps, seed=n))
    elif method != "arrow":
        new = moe_inputs(model, windows, n)
        state.forced.append(new)
        if method == "mean":
            state.inputs.append(new)
        else:
            _accumulate(state, state.forced, start=n)
    _layer_rows(model, state, fit=False)


@torch.no_grad()
def remove_peer_expert(model: Transformer, state: PeerState, index: int) -> None:
    """Drop routed expert ``index`` (opt-out); DUME re-solves without its domain, mergekit
    recomputes the negatives; the other peers drop the row."""
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
    if state.forced:
        del state.forced[index]
    if state.method in ("dume", "dume-bias"):
        state.gram, state.targets = [], []
        _accumulate(state, state.forced)
    elif state.inputs:
        del state.inputs[index]
    _layer_rows(model, state, fit=False)


def export_rows(model: Transformer) -> list[torch.Tensor]:
    """The ``tau * r_i`` rows of a bias-free ``dot`` peer, one (E, H) per MoE layer, for
    ``Router.set_rows`` of the model's own router type (a checkpoint or Hugging Face export)."""
    out = []
    for layer in model.moe_layers():
        r = layer.router
        if not isinstance(r, PeerRouter) or r.score != "dot" or r.bias is not None:
            raise NexusError("only the bias-free linear peers (" + ", ".join(LINEAR_METHODS)
                             + ") can be written as router rows")  # fmt: skip
        out.append(r.temperature * r.rows)
    return out


@torch.no_grad()
def place_native_rows(
    model: Transformer,
    method: str,
    windows: list[torch.Tensor],
    seed: Transformer | None = None,
) -> None:
    """Place a bias-free linear peer's rows (``LINEAR_METHODS``) into ``model``'s own routers
    (``Router.set_rows``: a linear router's weight, a Nexus router's anchors with the projection
    at zero), so the MoE is saved and exported as any other; what ``--router-init`` would do.
    ``windows``: each expert's domain windows, e.g. the ``held`` ones of its routing statistics."""
    if method not in LINEAR_METHODS:
        raise NexusError(
            f"router init '{method}' has a bias or a non-linear score and cannot be written as "
            f"router rows; choose one of {', '.join(LINEAR_METHODS)}"
        )
    layers = _check(model, method)
    own = [layer.router for layer in layers]
    place_peer_rows(model, method, windows, seed)
    rows = export_rows(model)
    for layer, router, r in zip(layers, own, rows, strict=True):
        layer.router = router
        router.set_rows(r)
