"""The decoder (docs/design.md §2): Llama/Qwen2/Qwen3-style, with dense or MoE feed-forward blocks.

Parameter names follow Hugging Face Llama (``model.layers.{i}.self_attn.q_proj.weight`` ...), so
dense checkpoints convert by renaming nothing. MoE blocks hold ``mlp.router``, ``mlp.experts``
(stacked (E, out, in) weights) and ``mlp.shared_expert``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.moe import MoELayer, RoutingInfo, SwiGLU
from nexus_moe.routers.base import normal_init_


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, half-split ("rotate_half") convention."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Computed on the CPU and moved: on the meta device the arithmetic would run through
        # Python references that import torch._dynamo, a slow import that every shape-only model
        # build would pay (BENCHMARKS.md, "Start-up costs").
        inv_freq = self._inv_freq().to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        positions = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu")
        return 1.0 / (self.theta ** (positions.float() / self.head_dim))

    @torch.no_grad()
    def reset(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, head_dim) by position."""
    return x * cos + _rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    # MoE layers that route on context: layer -> (sum (B, H) of its inputs so far, count).
    moe_context: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        assert hd is not None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.sliding_window

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past_k, past_v = cache.keys[layer], cache.values[layer]
            if past_k is not None and past_v is not None:
                past = past_k.shape[2]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        window = self.window if self.window is not None and past + seq > self.window else None
        if past == 0 and window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # queries at positions past..past+T-1 see keys 0..past+T-1
            total = past + seq
            mask = torch.ones(seq, total, dtype=torch.bool, device=x.device).tril(diagonal=past)
            if window is not None:  # ... and only the last `window` of them
                mask = mask.triu(diagonal=past - window + 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense or MoE feed-forward."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            assert cfg.moe is not None
            self.mlp: nn.Module = MoELayer(
                cfg.moe, cfg.hidden_size, cfg.intermediate_size, cfg.expert_intermediate_size
            )
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prev_assignment: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[torch.Tensor, RoutingInfo | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            prefix = None
            if cache is not None and self.mlp.cfg.router_context > 0:
                # Running sum of this layer's inputs over the tokens already decoded.
                prefix = cache.moe_context.get(layer)
                total = h.float().sum(dim=1) + (prefix[0] if prefix else 0.0)
                cache.moe_context[layer] = (total, (prefix[1] if prefix else 0) + h.shape[1])
            out, info = self.mlp(h, prev_assignment, prefix)
            return x + out, info
        return x + self.mlp(h), None


class Decoder(nn.Module):
    """Embeddings + blocks + final norm (the ``model.`` prefix of Hugging Face names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # An uninitialised weight: Transformer.reset_parameters draws it (nn.Embedding's own
        # N(0, 1) draw would be overwritten anyway, and on the meta device it costs the slow
        # torch._dynamo import, see BENCHMARKS.md "Start-up costs").
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    """Logits plus what the MoE layers report (an empty list for a dense model)."""

    logits: torch.Tensor  # (B, T, V)
    routing: list[RoutingInfo]
    load_balance_weight: float = 0.0
    z_loss_weight: float = 0.0

    @functools.cached_property
    def aux_loss(self) -> torch.Tensor:
        """Weighted load-balancing + z-loss, averaged over MoE layers (float32 scalar; zero for a
        dense model). Computed on first access, so inference does not pay for it."""
        if not self.routing:
            return self.logits.new_zeros((), dtype=torch.float32)
        lb = torch.stack([r.load_balance_loss for r in self.routing]).mean()
        z = torch.stack([r.z_loss for r in self.routing]).mean()
        return self.load_balance_weight * lb + self.z_loss_weight * z


class Transformer(nn.Module):
    """A causal language model; dense when ``cfg.moe`` is None."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        assert cfg.head_dim is not None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, ones for norms, zeros for biases."""
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif "router" in name:
                continue  # routers initialise themselves
            else:
                normal_init_(param, std)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Set the buffers that are not saved in checkpoints (rotary table, usage counters)."""
        self.rotary.reset()
        for layer in self.moe_layers():
            layer.tokens_per_expert.zero_()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of unique parameters (tied weights counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.model.layers if isinstance(b.mlp, MoELayer)]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> ModelOutput:
        """``input_ids`` (B, T) -> logits (B, T, V) and routing information."""
        seq = input_ids.shape[1]
        start = 0
        if cache is not None:
            start = cache.length
            if not cache.keys:
                cache.keys = [None] * self.cfg.num_layers
                cache.values = [None] * self.cfg.num_layers
        if start + seq > self.cfg.max_seq_len:
            raise NexusError(
                f"{start + seq} tokens exceed the model's max_seq_len={self.cfg.max_seq_len}; "
                "use a shorter seq_len (or prompt plus new tokens)"
            )
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        positions = torch.arange(start, start + seq, device=input_ids.device)
        cos, sin = self.rotary(positions, x.dtype)  # (T, head_dim)
        routing: list[RoutingInfo] = []
        prev_assignment = None
        for i, block in enumerate(self.model.layers):
            x, info = block(x, cos, sin, prev_assignment, cache, i)
            if info is not None:
                routing.append(info)
                prev_assignment = info.top1
        logits = self.lm_head(self.model.norm(x))
        moe = self.cfg.moe
        if moe is None:
            return ModelOutput(logits, routing)
        return ModelOutput(logits, routing, moe.load_balance_weight, moe.z_loss_weight)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation with a KV cache -> (B, T + new)."""
        cache = KVCache()
        tokens = input_ids
        next_input = input_ids
        for _ in range(max_new_tokens):
            logits = self(next_input, cache=cache).logits[:, -1, :].float()  # (B, V)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            else:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            next_input = next_token
            if eos_id is not None and bool((next_token == eos_id).all()):
                break
        return tokens
