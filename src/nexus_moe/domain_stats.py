"""A domain's routing statistics from its dense expert alone (docs/design.md §5.7).

For an expert branched with only its FFNs trained, the MoE with every token forced to that
expert computes exactly what the dense expert computes (the MoE's other weights are the
experts' shared ones, and the top-k gates renormalise to 1 on the one allowed expert). So what
calibration measures at each MoE layer's router input (``calibrate.DomainMoments``: token count,
mean, scatter) can be taken from the dense expert on its own domain, one model in memory at a
time, on any machine that has the expert and its text:

* ``upcycle`` calibrates that way whenever the experts share every weight but their FFNs, so a
  calibrated MoE can be written straight to a Hugging Face folder without the whole MoE ever in
  memory;
* an expert's owner runs ``nexus-moe domain-stats`` on their own machine and hands over the
  expert and this file, not the text; ``upcycle --stats`` and ``extend --stats`` place its row
  from the file.

The file (safetensors; the settings in its header's metadata) holds, for every block of the
model, the mean and the scatter of what a router there would score (float64), and the token
count. With ``share_samples`` it also holds the first router inputs of each block (which fit the
router's temperature exactly as ``--corpus`` does) and a few windows of the tokens themselves
(which let later extensions bound this domain's loss), and both reveal the text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nexus_moe import calibrate
from nexus_moe.calibrate import DomainMoments
from nexus_moe.config import ModelConfig
from nexus_moe.data import TokenShards
from nexus_moe.errors import NexusError
from nexus_moe.model import Block, RotaryEmbedding, Transformer
from nexus_moe.moe import routing_input
from nexus_moe.safetensors_io import TensorSource, read_safetensors

FORMAT = "nexus-moe-domain-stats"
VERSION = 1


@dataclass
class DomainStats:
    """One domain's routing statistics at every block of its dense expert."""

    domain: str
    router_context: float  # the context of the router whose input was measured
    expert_fingerprint: str  # tensor_fingerprint of the dense expert it was measured on
    moments: list[DomainMoments]  # one per block, in model order
    held: torch.Tensor | None = None  # (W, T) int32 calibration windows; only when shared

    @property
    def shares_text(self) -> bool:
        return self.held is not None or any(m.samples is not None for m in self.moments)


def tensor_fingerprint(tensors: TensorSource) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order): the same for a
    native checkpoint and a Hugging Face folder that hold the same weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors.shapes):
        tensor = tensors.get(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
        del tensor
    return digest.hexdigest()


@torch.no_grad()
def dense_moments(
    model: Transformer,
    windows: torch.Tensor,
    router_context: float,
    blocks: list[int] | None = None,
    device: str | torch.device = "cpu",
) -> list[DomainMoments]:
    """Moments of what a router on ``router_context`` would score at each of ``blocks``
    (default: every block) of the dense ``model`` (its FFN's input) over ``windows``."""
    if model.cfg.moe is not None:
        raise NexusError("domain statistics are measured on a dense expert, not an MoE")
    layers = model.model.layers
    modules = [layers[b].mlp for b in (range(len(layers)) if blocks is None else blocks)]
    return calibrate.accumulate_moments(
        model, windows, modules, lambda _, x: routing_input(x, router_context), device=device
    )


@torch.no_grad()
def streamed_moments(
    cfg: ModelConfig,
    tensors: TensorSource,
    windows: torch.Tensor,
    router_context: float,
    blocks: list[int] | None = None,
    batch_size: int = 16,
    finished: Callable[[int, DomainMoments], None] | None = None,
) -> list[DomainMoments]:
    """:func:`dense_moments` of the dense model ``cfg`` whose weights are ``tensors``, without
    the model in memory: the windows' hidden states (tokens x H) go through one block at a
    time, each block built from its own weights and dropped after. The same batches pass the
    same modules as in :func:`dense_moments`, so the moments are the same bit for bit; peak
    memory is one block, the embedding table and the hidden states.

    ``finished(position, moments)`` is called as soon as every window has passed the block
    ``blocks[position]``, so a caller can take its scatter (and drop it) before the next block
    adds one of its own."""
    if cfg.moe is not None:
        raise NexusError("domain statistics are measured on a dense expert, not an MoE")
    blocks = list(range(cfg.num_layers)) if blocks is None else blocks
    embed = tensors.get("model.embed_tokens.weight").to(torch.get_default_dtype())
    states = [
        F.embedding(windows[start : start + batch_size], embed)
        for start in range(0, windows.shape[0], batch_size)
    ]
    del embed
    assert cfg.head_dim is not None
    rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    cos, sin = rotary(torch.arange(windows.shape[1]), states[0].dtype)
    moments = {b: DomainMoments() for b in blocks}
    for index in range(max(blocks) + 1):
        block = _block(cfg, tensors, index)
        hook = None
        if index in moments:

            def capture(module: torch.nn.Module, args: tuple, m: DomainMoments = moments[index]):
                route = routing_input(args[0], router_context)
                m.update(route.reshape(-1, route.shape[-1]).float().cpu())

            hook = block.mlp.register_forward_pre_hook(capture)
        for k, x in enumerate(states):
            states[k] = block(x, cos, sin, None, None, index)[0]
        if hook is not None:
            hook.remove()
            if finished is not None:
                finished(blocks.index(index), moments[index])
        del block
    return [moments[b] for b in blocks]


def _block(cfg: ModelConfig, tensors: TensorSource, index: int) -> Block:
    """Block ``index`` of the dense model ``cfg`` with its weights from ``tensors``, eval mode."""
    with torch.device("meta"):
        block = Block(cfg, index)
    block = block.to_empty(device="cpu")
    prefix = f"model.layers.{index}."
    for name, param in block.state_dict().items():
        param.copy_(tensors.get(prefix + name))
    return block.eval()


def measure(
    cfg: ModelConfig,
    tensors: TensorSource,
    shards: TokenShards,
    domain: str,
    num_tokens: int,
    router_context: float,
    share_samples: bool = False,
) -> DomainStats:
    """:class:`DomainStats` of ``domain`` (``num_tokens`` of its training split) on the dense
    expert ``cfg`` with weights ``tensors`` (one block in memory at a time)."""
    windows = calibrate.domain_windows(shards, domain, cfg.max_seq_len, num_tokens)
    moments = streamed_moments(cfg, tensors, windows, router_context)
    if not share_samples:
        moments = [DomainMoments.of(m.count, m.mean, m.scatter) for m in moments]  # type: ignore[arg-type]
    held = None
    if share_samples:  # as many as the statistics of a checkpoint keep (upcycle keeps fewer when
        # another domain has fewer windows)
        held = calibrate.held_windows(windows, min(calibrate.HELD_WINDOWS, len(windows)))
    return DomainStats(domain, router_context, tensor_fingerprint(tensors), moments, held)


def write(stats: DomainStats, path: Path) -> None:
    """Write ``stats`` to ``path`` (a safetensors file; the caller makes it atomic)."""
    tensors: dict[str, torch.Tensor] = {}
    for block, m in enumerate(stats.moments):
        assert m.mean is not None and m.scatter is not None
        tensors[f"block.{block}.mean"] = m.mean.double().contiguous()
        tensors[f"block.{block}.scatter"] = m.scatter.double().contiguous()
        tensors[f"block.{block}.count"] = torch.tensor([m.count], dtype=torch.int64)
        if m.samples is not None:
            tensors[f"block.{block}.samples"] = m.samples.float().contiguous()
    if stats.held is not None:
        tensors["held"] = stats.held.to(torch.int32).contiguous()
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "domain": stats.domain,
        "router_context": repr(float(stats.router_context)),
        "expert_fingerprint": stats.expert_fingerprint,
        "num_blocks": str(len(stats.moments)),
    }
    save_file(tensors, str(path), metadata=meta)


def read(path: str | Path) -> DomainStats:
    """Read a domain statistics file; NexusError naming it when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: domain statistics file not found (write it with domain-stats)")
    meta = _header_metadata(path)
    if meta.get("format") != FORMAT:
        raise NexusError(
            f"{path}: not a domain statistics file (write one with `nexus-moe domain-stats`)"
        )
    if meta.get("version") != str(VERSION):
        raise NexusError(
            f"{path}: domain statistics version {meta.get('version')}, expected "
            f"{VERSION}; rerun domain-stats with this nexus-moe"
        )
    tensors = read_safetensors(path)
    try:
        blocks = int(meta["num_blocks"])
        moments = []
        for block in range(blocks):
            count = int(tensors[f"block.{block}.count"][0])
            moments.append(
                DomainMoments.of(
                    count,
                    tensors[f"block.{block}.mean"],
                    tensors[f"block.{block}.scatter"],
                    tensors.get(f"block.{block}.samples"),
                )
            )
        stats = DomainStats(
            meta["domain"],
            float(meta["router_context"]),
            meta["expert_fingerprint"],
            moments,
            tensors.get("held"),
        )
    except (KeyError, ValueError) as exc:
        raise NexusError(
            f"{path}: incomplete domain statistics ({exc}); rerun domain-stats"
        ) from None
    for block, m in enumerate(stats.moments):
        if m.count < 2 or not bool(
            torch.isfinite(m.scatter).all() and torch.isfinite(m.mean).all()
        ):  # type: ignore[arg-type]
            raise NexusError(
                f"{path}: block {block} has no usable statistics (tokens {m.count}, or "
                "non-finite values); rerun domain-stats"
            )
    return stats


def _header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (empty when it has none)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def for_moe(
    stats: DomainStats, blocks: list[int], router_context: float, fingerprint: str, where: str
) -> tuple[list[DomainMoments], torch.Tensor | None]:
    """The moments of the MoE blocks ``blocks``, after checking that ``stats`` were measured
    for this router (``router_context``) on this expert (``fingerprint``)."""
    if abs(stats.router_context - router_context) > 1e-9:
        raise NexusError(
            f"{where}: measured for a router on context {stats.router_context:g}, this MoE's "
            f"routes on {router_context:g}; rerun domain-stats with --router-context "
            f"{router_context:g}"
        )
    if stats.expert_fingerprint != fingerprint:
        raise NexusError(
            f"{where}: measured on other weights than this expert's ({stats.domain}); rerun "
            "domain-stats on the expert you pass"
        )
    if max(blocks, default=-1) >= len(stats.moments):
        raise NexusError(
            f"{where}: statistics of {len(stats.moments)} blocks, the MoE has block "
            f"{max(blocks)}; rerun domain-stats on this expert"
        )
    return [stats.moments[b] for b in blocks], stats.held
