"""A nexus-moe Mixture-of-Experts that routes on context, for transformers (``trust_remote_code``).

nexus-moe's ``export`` copies this file into the model folder, and
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` runs it. The model is
transformers' own Mixtral, Qwen2-MoE or Qwen3-MoE, with one change: the router of every MoE block
scores

    (1 - c) * x_t + c * mean(x_1, ..., x_t)

instead of ``x_t`` alone, where ``x`` is the block's input (after the post-attention norm), the
mean runs over the sequence's tokens so far (padding left out, by the attention mask), and ``c``
is ``config.router_context``. A domain is a property of the document, and the running mean of
the layer's inputs tells domains apart far better than one token does. Attention, the experts,
the top-k gating and the cache are transformers' code, unchanged; the router's logits, softmax
and top-k are computed in float32, as in nexus-moe.

Incremental decoding keeps, per MoE layer, the sum (batch, hidden) and count (batch,) of the
layer's inputs so far with the cache object: ``generate`` with the KV cache, a fresh or reset
cache, no cache, prefill in chunks, beam search (the sums follow ``reorder_cache``) and
``batch_select_indices`` / ``batch_repeat_interleave`` all work. A cache that holds tokens this
model did not route (filled elsewhere, or cropped, as assisted decoding does) is refused with a
ValueError: the sums of the removed tokens cannot be taken back. Padding is read from a 2-D
attention mask; a 4-D mask (a static cache in ``generate`` builds one) carries no padding
information here, so there every position counts.

This module imports only ``torch`` and ``transformers`` (5.x; written against 5.24).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

try:  # the MoE blocks with a router module of their own: transformers 5
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralForCausalLM,
        MixtralSparseMoeBlock,
        MixtralTopKRouter,
    )
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeForCausalLM,
        Qwen2MoeSparseMoeBlock,
        Qwen2MoeTopKRouter,
    )
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        Qwen3MoeForCausalLM,
        Qwen3MoeSparseMoeBlock,
        Qwen3MoeTopKRouter,
    )
except ImportError as error:  # transformers 4: no TopKRouter modules
    raise ImportError(
        f"this nexus-moe model (routing on context) needs transformers 5 (written against 5.24; "
        f"found {transformers.__version__}): pip install 'transformers>=5,<5.25' ({error})"
    ) from error

try:  # transformers >= 5: per-format weight renamings applied when loading
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
except ImportError:  # pragma: no cover - older transformers load the Hub layout as it is
    get_checkpoint_conversion_mapping = register_checkpoint_conversion_mapping = None

PREFIX = "nexus_context_"  # model_type of an export: PREFIX + the format it extends


# --------------------------------------------------------------------------------------------
# the running sums, kept with the cache


class _LayerSums:
    """One MoE layer's running sum (B, H) and count (B,) of its inputs, over ``seen`` positions
    of the cache (padding included in ``seen``, not in the count)."""

    def __init__(self, total: torch.Tensor, count: torch.Tensor, seen: int) -> None:
        self.total, self.count, self.seen = total, count, seen


class _ContextSums:
    """Every MoE layer's :class:`_LayerSums` of one cache."""

    def __init__(self) -> None:
        self.layers: dict[int, _LayerSums] = {}

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (in that order): beam search, batch selection."""
        for sums in self.layers.values():
            rows = index.to(sums.total.device)
            sums.total, sums.count = sums.total.index_select(0, rows), sums.count[rows]

    def repeat(self, repeats: int) -> None:
        for sums in self.layers.values():
            sums.total = sums.total.repeat_interleave(repeats, dim=0)
            sums.count = sums.count.repeat_interleave(repeats, dim=0)


_CACHE_CLASSES: dict[type, type] = {}


def _context_cache_class(base: type) -> type:
    """``base`` (a transformers Cache class) whose batch reorderings also reorder the sums."""
    if getattr(base, "_nexus_context", False):
        return base
    if base not in _CACHE_CLASSES:

        class ContextCache(base):
            _nexus_context = True

            def reorder_cache(self, beam_idx: torch.Tensor) -> Any:
                out = super().reorder_cache(beam_idx)
                self.nexus_context_sums.select(beam_idx)
                return out

            def batch_select_indices(self, indices: torch.Tensor) -> Any:
                out = super().batch_select_indices(indices)
                self.nexus_context_sums.select(indices)
                return out

            def batch_repeat_interleave(self, repeats: int) -> Any:
                out = super().batch_repeat_interleave(repeats)
                self.nexus_context_sums.repeat(repeats)
                return out

        ContextCache.__name__ = ContextCache.__qualname__ = f"NexusContext{base.__name__}"
        _CACHE_CLASSES[base] = ContextCache
    return _CACHE_CLASSES[base]


def _sums_of(cache: Any) -> _ContextSums:
    """The running sums kept with ``cache`` (attached on first use)."""
    sums = getattr(cache, "nexus_context_sums", None)
    if sums is None:
        cache.__class__ = _context_cache_class(type(cache))
        sums = cache.nexus_context_sums = _ContextSums()
    return sums


# --------------------------------------------------------------------------------------------
# the router


class _Routing:
    """What the context routers of one model share: the padding of the current forward pass."""

    def __init__(self) -> None:
        # (B, T) float32, 1 for a token and 0 for padding, of the tokens of the latest forward
        # pass (kept after it, so that recomputing a checkpointed layer sees it); None: every
        # position is a token.
        self.mask: torch.Tensor | None = None


class _ContextRouter:
    """The router of a MoE block, scoring the context mix of its inputs.

    Mixed into the format's own router class, whose ``weight`` (num_experts, hidden) it keeps,
    so that the weights load under the format's names. The hooks of :func:`_route_on_context`
    give it the shape of the block's input, the cache and the cache's length before this pass.
    """

    weight: torch.Tensor
    top_k: int
    scores_in_input_dtype = True  # Qwen MoE: top-k weights in the hidden states' dtype

    def _setup(self, layer_idx: int, context: float, routing: _Routing, renormalize: bool) -> None:
        self.layer_idx, self.router_context, self.renormalize = layer_idx, context, renormalize
        self._routing = routing
        self._shape: tuple[int, int] | None = None
        self._cache: Any = None
        self._past = 0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.weight.shape[1]
        flat = hidden_states.reshape(-1, hidden)
        batch, length = self._shape or (1, flat.shape[0])
        route = self._routing_input(flat.float().view(batch, length, hidden))
        logits = route.reshape(-1, hidden) @ self.weight.float().t()  # (N, E) float32
        probs = torch.softmax(logits, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.scores_in_input_dtype:
            top = top.to(hidden_states.dtype)
        return logits, top, index

    def _routing_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(1 - c) x + c * running mean`` of ``x`` (B, T, H) float32; updates the sums."""
        c = self.router_context
        batch, length, _ = x.shape
        mask = self._routing.mask
        if mask is not None and tuple(mask.shape) != (batch, length):
            mask = None
        prefix = self._prefix(batch)
        if mask is None:
            counts = torch.arange(1, length + 1, device=x.device, dtype=torch.float32)[None, :]
            kept = x
        else:
            mask = mask.to(x.device)
            counts = mask.cumsum(dim=1)
            kept = x * mask[:, :, None]
        running = kept.cumsum(dim=1)
        if prefix is not None:
            running = running + prefix.total[:, None, :]
            counts = counts + prefix.count[:, None]
        mean = running / counts.clamp(min=1.0)[:, :, None]
        if self._cache is not None:
            added = mask.sum(dim=1) if mask is not None else x.new_full((batch,), float(length))
            total = kept.sum(dim=1) + (prefix.total if prefix is not None else 0.0)
            count = added + (prefix.count if prefix is not None else 0.0)
            sums = _sums_of(self._cache)
            sums.layers[self.layer_idx] = _LayerSums(
                total.detach(), count.detach(), self._past + length
            )
        return (1.0 - c) * x + c * mean

    def _prefix(self, batch: int) -> _LayerSums | None:
        """This layer's sums over the tokens already in the cache (None: none are)."""
        if self._cache is None:
            return None
        sums = _sums_of(self._cache).layers.get(self.layer_idx)
        if self._past == 0:
            return None  # a fresh (or reset) cache
        if sums is None or sums.seen != self._past:
            raise ValueError(
                f"layer {self.layer_idx}: the cache holds {self._past} positions, but this "
                f"model's context router has routed {0 if sums is None else sums.seen} of them; "
                "context routing needs the running mean of every token in the cache, so it runs "
                "only with a cache this model filled itself (not one filled elsewhere or "
                "cropped, as assisted decoding does)"
            )
        if sums.total.shape[0] != batch:
            raise ValueError(
                f"layer {self.layer_idx}: the cache's running sums are for a batch of "
                f"{sums.total.shape[0]}, this pass has {batch}; change a cache's batch with its "
                "batch_select_indices / batch_repeat_interleave / reorder_cache"
            )
        return sums


class ContextMixtralRouter(_ContextRouter, MixtralTopKRouter):
    scores_in_input_dtype = False  # Mixtral: float32 top-k weights


class ContextQwen2MoeRouter(_ContextRouter, Qwen2MoeTopKRouter):
    pass


class ContextQwen3MoeRouter(_ContextRouter, Qwen3MoeTopKRouter):
    pass


# --------------------------------------------------------------------------------------------
# the models


def _route_on_context(model: Any, block_class: type, router_class: type) -> None:
    """Make the router of every MoE block of ``model`` (a ...ForCausalLM) a context router (the
    same module, its class swapped for ``router_class``, a subclass of its own), with the hooks
    that feed it the padding mask, the input's shape and the cache."""
    config = model.config
    context = getattr(config, "router_context", None)
    if isinstance(context, bool) or not isinstance(context, int | float) or not 0 < context <= 1:
        raise ValueError(
            f"config.json: 'router_context' must be a number in (0, 1] (the weight of the "
            f"running mean in what the router scores), got {context!r}"
        )
    routing = _Routing()
    model._nexus_routing = routing
    model.model.register_forward_pre_hook(_take_mask(routing), with_kwargs=True)
    renormalize = bool(getattr(config, "norm_topk_prob", True))  # Mixtral always renormalises
    found = False
    for layer_idx, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None)
        if not isinstance(block, block_class):
            continue
        gate = block.gate
        expected = router_class.__bases__[1]  # the format's router
        if type(gate) is not expected:
            raise TypeError(
                f"layer {layer_idx}: expected a {expected.__name__} router, found "
                f"{type(gate).__name__}; this remote code was written for transformers 5.24"
            )
        gate.__class__ = router_class
        gate._setup(layer_idx, float(context), routing, renormalize)
        block.register_forward_pre_hook(_take_shape(gate))
        layer.register_forward_pre_hook(_take_cache(gate), with_kwargs=True)
        layer.register_forward_hook(_drop_cache(gate), always_call=True)
        found = True
    if not found:
        raise ValueError("config.json describes no MoE block; nothing routes on context")


def _take_mask(routing: _Routing):
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        routing.mask = None
        if tokens is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return
        length = tokens.shape[1]
        if mask.shape[1] < length:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns for {length} new tokens; it must "
                "cover the cached tokens and the new ones"
            )
        mask = mask[:, -length:]
        if not bool(mask.all()):
            routing.mask = mask.to(torch.float32)

    return hook


def _take_shape(gate: _ContextRouter):
    def hook(module: Any, args: tuple) -> None:
        gate._shape = tuple(args[0].shape[:2])

    return hook


def _take_cache(gate: _ContextRouter):
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        gate._cache = cache
        gate._past = cache.get_seq_length(gate.layer_idx) if cache is not None else 0

    return hook


def _drop_cache(gate: _ContextRouter):
    def hook(module: Any, args: tuple, kwargs: dict | Any, output: Any = None) -> None:
        gate._cache = None

    return hook


class NexusContextMixtralConfig(MixtralConfig):
    model_type = PREFIX + "mixtral"


class NexusContextQwen2MoeConfig(Qwen2MoeConfig):
    model_type = PREFIX + "qwen2_moe"


class NexusContextQwen3MoeConfig(Qwen3MoeConfig):
    model_type = PREFIX + "qwen3_moe"


class NexusContextMixtralForCausalLM(MixtralForCausalLM):
    config_class = NexusContextMixtralConfig
    _can_compile_fullgraph = False

    def __init__(self, config: NexusContextMixtralConfig) -> None:
        super().__init__(config)
        _route_on_context(self, MixtralSparseMoeBlock, ContextMixtralRouter)


class NexusContextQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = NexusContextQwen2MoeConfig
    _can_compile_fullgraph = False

    def __init__(self, config: NexusContextQwen2MoeConfig) -> None:
        super().__init__(config)
        _route_on_context(self, Qwen2MoeSparseMoeBlock, ContextQwen2MoeRouter)


class NexusContextQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = NexusContextQwen3MoeConfig
    _can_compile_fullgraph = False

    def __init__(self, config: NexusContextQwen3MoeConfig) -> None:
        super().__init__(config)
        _route_on_context(self, Qwen3MoeSparseMoeBlock, ContextQwen3MoeRouter)


# transformers 5 renames the Hub layout's per-expert tensors to its fused ones when loading, by
# model_type, and skips custom code unless its model_type is registered: register ours.
if register_checkpoint_conversion_mapping is not None:
    for _base in ("mixtral", "qwen2_moe", "qwen3_moe"):
        _mapping = get_checkpoint_conversion_mapping(_base)
        if _mapping is not None:
            register_checkpoint_conversion_mapping(PREFIX + _base, _mapping, overwrite=True)
