"""The MoE feed-forward layer (docs/design.md §3).

    y(x) = [shared(x)] + sum over i in topk(p(x)) of g_i(x) * FFN_i(x)

The router (``nexus_moe.routers``) only scores experts. This module does the float32 softmax,
top-k, gating, the auxiliary losses, the usage counters and the grouped dispatch: tokens are sorted
by expert and each expert runs one matmul over its contiguous slice (no per-token loop).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nexus_moe.config import MoEConfig
from nexus_moe.losses import load_balancing_loss, router_z_loss
from nexus_moe.routers import Router, build_router


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x)). Names follow Hugging Face Llama."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU FFNs stored as stacked weights (E, out, in).

    Forward and backward of all experts are one autograd node (:class:`_GroupedSwiGLU`): per
    expert three matmuls forward and five backward over its contiguous slice of the sorted
    tokens, written straight into preallocated outputs and stacked weight gradients. Compared
    with leaving the per-expert ops to autograd this saves the ~10 graph nodes per expert, the
    concatenation of outputs, the stack of per-expert weight gradients and half the saved
    activations (it keeps gate and up projections, not also silu(gate) and the product).
    Experts that receive no token are skipped; their weight gradient is zero.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # "auto": grouped_mm (one kernel for all experts) on CUDA in bf16 where torch has it for
        # the GPU, the per-expert loop elsewhere; "loop" / "grouped_mm" force one (tests and
        # benchmarks; this torch also has a CPU grouped_mm kernel, slower than the loop).
        self.backend = "auto"

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run expert e on rows ``x_sorted[offset_e : offset_e + counts[e]]`` -> (N, H)."""
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        device_type = x_sorted.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:
            # What autocast would do per matmul, done once: the stacked weights and the tokens
            # in the autocast dtype; the experts then run with autocast off.
            dtype = torch.get_autocast_dtype(device_type)
            x_sorted = x_sorted.to(dtype)
            weights = tuple(w.to(dtype) for w in weights)
        grouped = self._use_grouped_mm(x_sorted)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_sorted, *weights))):
            # Inference: no autograd node, nothing kept (each expert's intermediates are freed
            # before the next expert runs); decoding calls this per token, so overhead counts.
            return _experts_forward(x_sorted, *weights, counts, grouped, None)
        with torch.autocast(device_type, enabled=False) if autocast else nullcontext():
            return _GroupedSwiGLU.apply(x_sorted, *weights, counts, grouped)

    def runs_inference_path(self, x: torch.Tensor) -> bool:
        """Whether :meth:`inference_combined` applies: no autograd and the per-expert loop."""
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        return not needs_grad and not self._use_grouped_mm(x)

    def inference_combined(
        self,
        x: torch.Tensor,
        token_of_pair: torch.Tensor,
        counts: list[int],
        gates: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Without autograd: (N, H) = sum over each token's k experts of gate * expert(token).

        Expert by expert: gather its tokens, run it, scale by the gates, add into float32
        token rows. Nothing of size N*k x H is built (the training path's sorted inputs and
        outputs): at 32k tokens top-2 those are 64 MB buffers, which the allocator maps fresh
        each call and which cost a page fault per 4 KB on first touch (~10% of the layer's
        forward time on CPU). ``token_of_pair``/``order``: per sorted pair, its token and its
        position in the (N, k) gate matrix. Same rounding as the training path: the product
        with the gate in float32 (gate in the compute dtype), the k slots summed in float32.
        """
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        device_type = x.device.type
        dtype = x.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            weights = tuple(w.to(dtype) for w in weights)
        gate_w, up_w, down_w = weights
        pair_gates = gates.reshape(-1).index_select(0, order).to(dtype).float().unsqueeze(-1)
        y = torch.zeros(x.shape[0], down_w.shape[1], dtype=torch.float32, device=x.device)
        for e, (start, end) in _groups(counts):
            rows = token_of_pair[start:end]
            x_e = x.index_select(0, rows).to(dtype)
            hidden = F.silu(F.linear(x_e, gate_w[e])) * F.linear(x_e, up_w[e])
            out = F.linear(hidden, down_w[e]).float()
            y.index_add_(0, rows, out.mul_(pair_gates[start:end]))
        return y.to(dtype)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.backend == "loop":
            return False
        if self.backend == "grouped_mm":
            if _GROUPED_MM is None:
                raise RuntimeError("this torch has no grouped_mm; use backend='loop'")
            return True
        if _GROUPED_MM is None or not x.is_cuda or x.dtype != torch.bfloat16:
            return False
        # torch >= 2.9 runs grouped_mm on SM80+ (Ampere); older torch on Hopper (SM90) only.
        major, minor = torch.cuda.get_device_capability(x.device)
        return (major, minor) >= (8, 0) if hasattr(F, "grouped_mm") else major == 9


# Pairs below which the MoE layer unsorts expert outputs with one scatter (see MoELayer.forward).
_SCATTER_UNSORT_BELOW = 64

# One kernel for all experts' matmuls: the public name since torch 2.10, private before.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _GroupedSwiGLU(torch.autograd.Function):
    """y[rows of e] = down_e(silu(gate_e(x)) * up_e(x)) for contiguous row groups, fwd + bwd.

    Weights are stacked (E, out, in) like ``nn.Linear`` weights; ``counts`` are the group sizes.
    Saved for backward: the input, the weights and each expert's gate and up projections;
    silu(gate) and the product are recomputed (one elementwise op each).

    The loop path keeps every temporary per expert on purpose: a buffer over all rows at once
    (e.g. 16k x 512 floats = 32 MB) is above glibc's mmap threshold, so each step would get
    fresh pages and pay a page fault per 4 KB on first touch (measured: silu over such a buffer
    3x slower than over the same rows in per-expert pieces).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate_w: torch.Tensor,
        up_w: torch.Tensor,
        down_w: torch.Tensor,
        counts: list[int],
        grouped: bool,
    ) -> torch.Tensor:
        x = x.contiguous()
        ctx.counts, ctx.grouped = counts, grouped
        saved: list[torch.Tensor] = []
        out = _experts_forward(x, gate_w, up_w, down_w, counts, grouped, saved)
        ctx.save_for_backward(x, gate_w, up_w, down_w, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate_w, up_w, down_w, *saved = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()  # e.g. an expanded gradient of a sum
        if ctx.grouped:
            return _grouped_backward(
                ctx.counts, grad_out, x, gate_w, up_w, down_w, *saved, ctx.needs_input_grad
            )
        grad_x = torch.empty_like(x) if need_x else None
        grad_gate_w = _zeros_unless_all_used(gate_w, ctx.counts) if need_gate else None
        grad_up_w = _zeros_unless_all_used(up_w, ctx.counts) if need_up else None
        grad_down_w = _zeros_unless_all_used(down_w, ctx.counts) if need_down else None
        for i, (e, (start, end)) in enumerate(_groups(ctx.counts)):
            gate, up = saved[2 * i], saved[2 * i + 1]
            g_out, x_e = grad_out[start:end], x[start:end]
            act = F.silu(gate)
            if grad_down_w is not None:
                torch.mm(g_out.t(), act * up, out=grad_down_w[e])
            grad_hidden = g_out @ down_w[e]  # (n, I)
            grad_up = grad_hidden * act
            # silu'(g) * grad, fused, as autograd computes it for F.silu.
            grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
            if grad_up_w is not None:
                torch.mm(grad_up.t(), x_e, out=grad_up_w[e])
            if grad_gate_w is not None:
                torch.mm(grad_gate.t(), x_e, out=grad_gate_w[e])
            if grad_x is not None:
                torch.mm(grad_gate, gate_w[e], out=grad_x[start:end])
                grad_x[start:end].addmm_(grad_up, up_w[e])
        return grad_x, grad_gate_w, grad_up_w, grad_down_w, None, None


def _experts_forward(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    counts: list[int],
    grouped: bool,
    saved: list[torch.Tensor] | None,
) -> torch.Tensor:
    """The experts' outputs (M, H) for rows grouped by ``counts``; appends what backward needs
    (gate and up projections: one pair per non-empty expert, or one pair of (M, I) tensors when
    ``grouped``) to ``saved`` unless it is None."""
    if grouped:
        offsets = _offsets(counts, x.device)
        gate = _GROUPED_MM(x, gate_w.transpose(1, 2), offs=offsets)
        up = _GROUPED_MM(x, up_w.transpose(1, 2), offs=offsets)
        if saved is not None:
            saved += [gate, up]
        return _GROUPED_MM(F.silu(gate) * up, down_w.transpose(1, 2), offs=offsets)
    out = x.new_empty(x.shape[0], down_w.shape[1])
    for e, (start, end) in _groups(counts):
        x_e = x[start:end]
        gate = F.linear(x_e, gate_w[e])
        up = F.linear(x_e, up_w[e])
        torch.mm(F.silu(gate) * up, down_w[e].t(), out=out[start:end])
        if saved is not None:
            saved += [gate, up]
    return out


def _grouped_backward(
    counts: list[int],
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Backward of :class:`_GroupedSwiGLU` with one grouped_mm per matmul over all experts."""
    need_x, need_gate, need_up, need_down = needs_input_grad[:4]
    offsets = _offsets(counts, x.device)
    act = F.silu(gate)
    grad_hidden = _GROUPED_MM(grad_out, down_w, offs=offsets)
    grad_up = grad_hidden * act
    grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
    # Weight gradients: per group, (out, rows) @ (rows, in) -> (E, out, in).
    grad_down_w = _GROUPED_MM(grad_out.t(), act * up, offs=offsets) if need_down else None
    grad_up_w = _GROUPED_MM(grad_up.t(), x, offs=offsets) if need_up else None
    grad_gate_w = _GROUPED_MM(grad_gate.t(), x, offs=offsets) if need_gate else None
    for e, n in enumerate(counts):  # token-less experts: zero, whatever the kernel left there
        for grad in (grad_gate_w, grad_up_w, grad_down_w):
            if grad is not None and not n:
                grad[e].zero_()
    grad_x = None
    if need_x:
        grad_x = _GROUPED_MM(grad_gate, gate_w, offs=offsets)
        grad_x += _GROUPED_MM(grad_up, up_w, offs=offsets)
    return grad_x, grad_gate_w, grad_up_w, grad_down_w, None, None


def _groups(counts: list[int]) -> Iterator[tuple[int, tuple[int, int]]]:
    """(expert, (start, end)) of every expert with at least one row."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, (start, start + n)
        start += n


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """Cumulative group ends, the ``offs`` of ``grouped_mm`` (int32)."""
    return torch.tensor(counts, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _zeros_unless_all_used(weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """A gradient buffer for ``weight`` whose slices of token-less experts are zero."""
    if all(counts):
        return torch.empty_like(weight)
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


@dataclass
class RoutingInfo:
    """What one MoE layer reports besides its output.

    The auxiliary losses are computed on first access (training reads them every step;
    inference and evaluation never do, and skip their ~10 small ops per layer and step).
    """

    router_logits: torch.Tensor  # (N, E) float32
    top1: torch.Tensor  # (N,) top-1 routed expert per token
    probs: torch.Tensor  # (N, E) float32 router probabilities
    z_loss_enabled: bool = True

    @functools.cached_property
    def load_balance_loss(self) -> torch.Tensor:
        """Switch load-balancing loss (scalar; 1 when balanced)."""
        return load_balancing_loss(self.probs, self.top1)

    @functools.cached_property
    def z_loss(self) -> torch.Tensor:
        """Router z-loss (scalar; 0 when ``z_loss_weight`` is 0)."""
        if not self.z_loss_enabled:
            return self.router_logits.new_zeros(())
        return router_z_loss(self.router_logits)


def routing_input(
    x: torch.Tensor, context: float, prefix: tuple[torch.Tensor, int] | None = None
) -> torch.Tensor:
    """What a router on ``context`` scores for its layer's input ``x`` (B, T, H): ``x`` itself
    at 0, else ``(1 - c) x_t + c mean(x_1..x_t)`` (float32). ``prefix``: the sum (B, H) and
    count of the inputs before this chunk (incremental decoding). A function of ``x`` alone, so
    a dense model's FFN inputs give what an MoE router built from it would score
    (``calibrate.dense_moments``)."""
    if context == 0.0:
        return x
    running = x.float().cumsum(dim=1)  # (B, T, H)
    counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)
    if prefix is not None:
        running = running + prefix[0][:, None, :]
        counts = counts + prefix[1]
    mean = running / counts[None, :, None]
    return (1.0 - context) * x.float() + context * mean


class MoELayer(nn.Module):
    """Routed experts (+ optional always-on shared expert) behind a pluggable router."""

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        intermediate_size: int,
        expert_intermediate_size: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router: Router = build_router(cfg, hidden_size)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, expert_intermediate_size)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size) if cfg.shared_expert else None
        # Qwen2-MoE: the shared expert's output scaled per token by sigmoid(x . w_g).
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        )
        # Tokens routed to each expert (top-k assignments), accumulated in training only.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        # Optional (E,) bool: False experts get no tokens (logit -inf), e.g. to check that adding
        # an expert leaves the routing of the others unchanged.
        self.expert_mask: torch.Tensor | None = None
        # The domain statistics the router rows were calibrated from (nexus_moe.calibrate);
        # saved next to the weights, used to place the row of an expert added later.
        self.domain_stats: Any = None

    @torch.no_grad()
    def add_expert(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        cfg: MoEConfig,
        domain_embedding: torch.Tensor | None = None,
        reset_router: bool = False,
    ) -> None:
        """Append a routed expert with these SwiGLU weights ((I, H), (I, H), (H, I)); its router
        entry from ``domain_embedding`` (see Router.add_expert). ``cfg`` is the grown config (one
        more expert), shared with the other layers. The domain statistics are dropped (they
        would describe the wrong experts) until the caller sets grown ones."""
        experts = self.experts
        for name, new in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            old = getattr(experts, name)
            stacked = torch.cat([old.detach(), new.detach().to(old)[None]])
            setattr(experts, name, nn.Parameter(stacked))
        experts.num_experts += 1
        self.router.add_expert(domain_embedding, reset=reset_router)
        self._set_config(cfg)
        self.domain_stats = None

    @torch.no_grad()
    def remove_expert(self, index: int, cfg: MoEConfig, domain_stats: Any = None) -> None:
        """Drop routed expert ``index`` (its FFN and router entry); ``cfg``: the shrunk config,
        ``domain_stats``: the statistics without that expert (None drops them)."""
        keep = [j for j in range(self.num_experts) if j != index]
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(old.detach()[keep].clone()))
        self.experts.num_experts -= 1
        self.router.remove_expert(index)
        self._set_config(cfg)
        self.domain_stats = domain_stats

    def _set_config(self, cfg: MoEConfig) -> None:
        if (
            cfg.num_experts != self.experts.num_experts
            or cfg.num_experts != self.router.num_experts
        ):
            raise ValueError("MoE config, experts and router disagree on the number of experts")
        self.cfg, self.num_experts, self.top_k = cfg, cfg.num_experts, cfg.top_k
        device = self.experts.gate_proj.device
        self.tokens_per_expert = torch.zeros(cfg.num_experts, device=device)
        self.expert_mask = None

    def routing_input(
        self, x: torch.Tensor, prefix: tuple[torch.Tensor, int] | None = None
    ) -> torch.Tensor:
        """What the router scores: ``x`` (B, T, H) itself, or with ``cfg.router_context`` = c
        > 0, ``(1 - c) x_t + c mean(x_1..x_t)`` (float32). ``prefix``: the sum (B, H) and count
        of the inputs before this chunk (incremental decoding)."""
        return routing_input(x, self.cfg.router_context, prefix)

    def forward(
        self,
        x: torch.Tensor,
        prev_assignment: torch.Tensor | None = None,
        context_prefix: tuple[torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor, RoutingInfo]:
        """``x`` (B, T, H) -> (y (B, T, H), routing info). ``prev_assignment``: see ACRouter;
        ``context_prefix``: see :meth:`routing_input`."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])  # (N, H)
        num_tokens = x_flat.shape[0]
        route_in = self.routing_input(x, context_prefix).reshape(-1, shape[-1])
        logits = self.router(route_in, prev_assignment).float()  # (N, E)
        if self.expert_mask is not None:
            logits = logits.masked_fill(~self.expert_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # float32, docs/design.md §3
        top_probs, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = top_probs / top_probs.sum(-1, keepdim=True) if self.cfg.renormalize else top_probs

        # Group the N*k (token, expert) pairs by expert.
        flat_expert = top_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # pair positions sorted by expert
        counts_t = torch.bincount(flat_expert, minlength=self.num_experts)
        counts = counts_t.tolist()
        token_of_pair = order // self.top_k if self.top_k > 1 else order  # sorted pairs
        if self.experts.runs_inference_path(x_flat):
            y = self.experts.inference_combined(x_flat, token_of_pair, counts, gates, order)
        else:
            # index_select rather than x[idx]: its backward is a scatter-add, not an accumulating
            # index_put (slower on CPU).
            x_sorted = x_flat.index_select(0, token_of_pair)
            expert_out = self.experts(x_sorted, counts)  # (N*k, H), sorted
            if self.top_k == 1:
                # Undo the sort: row order[j] of `unsorted` is sorted row j. A gather through
                # the inverse permutation is 1.4-3x faster on CPU than the scatter index_copy_
                # from 128 rows up; below that the scatter's fewer ops win.
                if order.numel() < _SCATTER_UNSORT_BELOW:
                    unsorted = torch.empty_like(expert_out).index_copy_(0, order, expert_out)
                else:
                    inverse = torch.empty_like(order)
                    inverse[order] = torch.arange(order.numel(), device=order.device)
                    unsorted = expert_out.index_select(0, inverse)
                # The float32 product rounded once (exact for bf16 inputs), as below.
                y = unsorted * gates.to(unsorted.dtype)
            else:
                # Scale each sorted row by its gate and add it into its token's row: the k
                # slots accumulate in float32 and are rounded once. (Cheaper on CPU than
                # unsorting, multiplying (N, k, H) and summing over k: 5 vs 9 ms at 8k, top-2.)
                gate_sorted = gates.reshape(-1).index_select(0, order).to(expert_out.dtype)
                scaled = expert_out.float() * gate_sorted.float().unsqueeze(-1)
                y = expert_out.new_zeros(num_tokens, expert_out.shape[1], dtype=torch.float32)
                y = y.index_add_(0, token_of_pair, scaled).to(expert_out.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_flat)) * shared
            y = y + shared

        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts_t.to(self.tokens_per_expert.dtype)
        info = RoutingInfo(logits, top_idx[:, 0], probs, self.cfg.z_loss_weight > 0)
        return y.view(shape), info
