"""Build an MoE (or a merged dense model) from dense checkpoints (SPEC §5).

| method         | routed experts             | shared expert | non-FFN weights          | router        |
|----------------|----------------------------|---------------|--------------------------|---------------|
| sparse-upcycle | n copies of the seed FFN   | none          | seed                     | linear, top-2 |
| btm            | — (result is dense)        | —             | mean of experts (+ FFN)  | none          |
| btx            | expert FFNs (+ seed FFN)   | none          | mean of experts          | linear, top-2 |
| moe-linear     | expert FFNs                | seed FFN      | mean of experts          | linear, top-1 |
| nexus          | expert FFNs                | seed FFN      | mean of experts          | nexus, top-1  |

``moe_overrides`` may change any other MoE setting (``top_k``, ``router``, ``ac_base``, ...); the
method fixes only where each tensor comes from.

Memory: the output is streamed. Input tensors are read one at a time through ``safe_open`` (and
released before the next is read), averages accumulate in float32 one tensor at a time, and the
output ``model.safetensors`` is written tensor by tensor, expert slice by expert slice, so peak
memory stays near the largest single tensor plus the interpreter, not the sum of the inputs.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from nexus_moe import __version__
from nexus_moe.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_tensor_table,
    load_config,
    model_state_dict,
)
from nexus_moe.config import ModelConfig, MoEConfig, RouterType, from_dict, to_dict
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir, write_json
from nexus_moe.model import Transformer
from nexus_moe.routers import NexusRouter, build_router

if TYPE_CHECKING:
    from nexus_moe.embed import DomainEmbeddings


class Method(enum.StrEnum):
    """How the dense inputs are assembled (SPEC §5)."""

    sparse_upcycle = "sparse-upcycle"
    btm = "btm"
    btx = "btx"
    moe_linear = "moe-linear"
    nexus = "nexus"


# ModelConfig fields that must agree between all inputs. max_seq_len and init_std do not change
# the weights' meaning, so the seed's values are kept.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_embeddings",
    "attention_bias",
    "qk_norm",
)

# MoEConfig fields that upcycling derives from its inputs; overriding them would contradict them.
_DERIVED_FIELDS = ("num_experts", "domains", "embedder", "domain_embedding_dim")

SEED_DOMAIN = "seed"  # domain name of the seed FFN when btx routes to it

_FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_proj|up_proj|down_proj)$")
_SHARED_RE = re.compile(r"^(model\.layers\.\d+\.mlp)\.shared_expert\.(\w+_proj\.weight)$")
_ROUTER_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.(.+)$")


def upcycle(
    method: str | Method,
    seed_dir: str | Path,
    expert_dirs: list[str | Path] | list[Path],
    out_dir: str | Path,
    domain_embeddings: DomainEmbeddings | None = None,
    domains: list[str] | None = None,
    num_experts: int | None = None,
    moe_overrides: dict[str, Any] | None = None,
    btx_include_seed: bool = False,
    seed: int = 0,
) -> Path:
    """Assemble dense checkpoints into ``out_dir`` with ``method`` (SPEC §5); returns ``out_dir``.

    * ``seed_dir``: the dense seed model (its FFN becomes the shared expert of moe-linear/nexus,
      the n routed copies of sparse-upcycle, or an extra routed expert of btx with
      ``btx_include_seed``). Its tokenizer.json is copied to the output.
    * ``expert_dirs``: dense domain experts, one routed expert each (empty for sparse-upcycle).
    * ``domains``: the domain of each expert checkpoint (sparse-upcycle: of each copy); by default
      read from each expert's metadata ``"domain"``.
    * ``domain_embeddings``: required when the router uses them (nexus, or AC on nexus); each
      expert's domain must be present. They are written into every MoE layer's router buffer.
    * ``num_experts``: sparse-upcycle only, the number of seed FFN copies (default 4).
    * ``moe_overrides``: further :class:`MoEConfig` fields, e.g. ``{"router": "ac",
      "ac_base": "nexus", "top_k": 2}``; unknown keys and wrong types are errors.
    * ``seed``: seeds the random router initialisation (each router's ``reset_parameters``).

    All inputs must be dense and share one architecture, dtype and tokenizer; everything is
    checked before anything is written, and the output appears atomically.
    """
    method = _parse_method(method)
    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    expert_paths = [Path(p) for p in expert_dirs]
    if method == Method.sparse_upcycle and expert_paths:
        raise NexusError(
            f"sparse-upcycle copies the seed's FFN and takes no expert checkpoints "
            f"(got {len(expert_paths)}); use btx, moe-linear or nexus to combine experts"
        )
    if method != Method.sparse_upcycle and not expert_paths:
        raise NexusError(f"{method.value} needs at least one dense expert checkpoint; got none")
    if method != Method.sparse_upcycle and num_experts is not None:
        raise NexusError(
            f"num_experts is only for sparse-upcycle; {method.value} has one routed expert per "
            f"expert checkpoint ({len(expert_paths)})"
        )

    if btx_include_seed and method != Method.btx:
        raise NexusError(f"btx_include_seed applies to btx only, not {method.value}")

    seed_cfg, dtypes, tokenizer = _check_inputs(seed_dir, expert_paths)

    # Where each kind of tensor comes from.
    if method == Method.sparse_upcycle:
        copies = 4 if num_experts is None else num_experts
        if copies < 1:
            raise NexusError(f"num_experts={copies}: sparse-upcycle needs at least one copy")
        routed = [seed_dir] * copies
        expert_domains = _check_domains([f"copy {i}" for i in range(copies)], domains or [])
        base = [seed_dir]  # non-FFN weights: the seed's
    else:
        expert_domains = _resolve_domains(expert_paths, domains)
        routed = list(expert_paths)
        base = list(expert_paths)  # non-FFN weights: mean over the experts
        if method == Method.btx and btx_include_seed:
            routed.append(seed_dir)
            expert_domains = _check_domains(
                [str(p) for p in routed], [*expert_domains, SEED_DOMAIN]
            )

    if method == Method.btm:
        if moe_overrides:
            raise NexusError("btm produces a dense model; moe_overrides do not apply")
        cfg, vectors = seed_cfg, None
    else:
        cfg = _moe_config(method, seed_cfg, len(routed), expert_domains, moe_overrides)
        vectors = _domain_vectors(cfg, expert_domains, domain_embeddings)

    model_dtype = dtypes["model.embed_tokens.weight"]
    specs = _plan(cfg, seed_dir, routed, base, dtypes, model_dtype, vectors, seed)
    metadata = {
        "stage": "upcycle",
        "method": method.value,
        "inputs": [str(seed_dir), *map(str, expert_paths)],
        "domains": expert_domains,
        "router_seed": seed,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(
            tmp / CONFIG_FILE,
            {"format": FORMAT, "version": __version__, "model": to_dict(cfg), "metadata": metadata},
        )
        write_safetensors(tmp / WEIGHTS_FILE, specs, metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return out_dir


def _parse_method(method: str | Method) -> Method:
    try:
        return Method(method)
    except ValueError:
        allowed = ", ".join(m.value for m in Method)
        raise NexusError(f"unknown upcycling method '{method}'; choose one of: {allowed}") from None


# --------------------------------------------------------------------------------------------
# input validation


def _check_inputs(
    seed_dir: Path, expert_dirs: list[Path]
) -> tuple[ModelConfig, dict[str, torch.dtype], Path | None]:
    """Seed config, per-tensor dtypes and tokenizer path, after checking every input agrees."""
    seed_cfg, _ = load_config(seed_dir)
    _require_dense(seed_dir, seed_cfg)
    for path in expert_dirs:
        cfg, _ = load_config(path)
        _require_dense(path, cfg)
        for name in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(cfg, name), getattr(seed_cfg, name)
            if mine != theirs:
                raise NexusError(
                    f"{path}: {name}={mine} but seed has {theirs}; all inputs must share one "
                    "architecture"
                )

    seed_tok = seed_dir / TOKENIZER_FILE
    seed_hash = _sha256(seed_tok) if seed_tok.is_file() else None
    for path in expert_dirs:
        tok = path / TOKENIZER_FILE
        digest = _sha256(tok) if tok.is_file() else None
        if digest != seed_hash:
            if digest is None or seed_hash is None:
                has = "has no" if digest is None else "has a"
                seed_has = "one" if seed_hash is not None else "none"
                raise NexusError(f"{path}: {has} {TOKENIZER_FILE} but seed has {seed_has}")
            raise NexusError(
                f"{path}: {TOKENIZER_FILE} differs from the seed's (sha256 {digest[:12]} vs "
                f"{seed_hash[:12]}); all inputs must share one tokenizer"
            )

    # The weight files must hold exactly the tensors the config implies (names, shapes, dtypes).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_state_dict(Transformer(seed_cfg)).items()}
    dtypes = _check_weights(seed_dir, expected, None)
    for path in expert_dirs:
        _check_weights(path, expected, dtypes)
    return seed_cfg, dtypes, seed_tok if seed_hash is not None else None


def _require_dense(path: Path, cfg: ModelConfig) -> None:
    if cfg.moe is not None:
        raise NexusError(
            f"{path}: is an MoE checkpoint (moe.num_experts={cfg.moe.num_experts}); upcycling "
            "takes dense checkpoints (use `extend` to add an expert to an MoE)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_weights(
    ckpt_dir: Path,
    expected: dict[str, tuple[int, ...]],
    seed_dtypes: dict[str, torch.dtype] | None,
) -> dict[str, torch.dtype]:
    """Compare a weight file's header with ``expected`` shapes (and the seed's dtypes)."""
    path = ckpt_dir / WEIGHTS_FILE
    if not path.is_file():
        raise NexusError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:  # reads the header only
            header = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise NexusError(
            f"{path}: cannot read weights ({exc}); the file is corrupt or truncated"
        ) from exc
    check_tensor_table(expected, {k: tuple(v[0]) for k, v in header.items()}, path)
    dtypes = {}
    for name in sorted(expected):
        dtype_name = header[name][1]
        if dtype_name not in _DTYPES_BY_NAME:
            raise NexusError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
        dtypes[name] = _DTYPES_BY_NAME[dtype_name]
        if seed_dtypes is not None and dtypes[name] != seed_dtypes[name]:
            raise NexusError(
                f"{ckpt_dir}: tensor '{name}' is {dtype_name} but seed has "
                f"{_DTYPE_NAMES[seed_dtypes[name]]}; save all inputs in one dtype"
            )
    return dtypes


def _resolve_domains(expert_dirs: list[Path], domains: list[str] | None) -> list[str]:
    """Each expert's domain: ``domains`` if given, else its checkpoint metadata."""
    where = [str(p) for p in expert_dirs]
    if domains is not None:
        if len(domains) != len(expert_dirs):
            raise NexusError(
                f"got {len(domains)} domain names for {len(expert_dirs)} expert checkpoints"
            )
        return _check_domains(where, list(domains))
    found = []
    for path in expert_dirs:
        domain = load_config(path)[1].get("domain")
        if not isinstance(domain, str) or not domain:
            raise NexusError(
                f"{path}: its metadata names no 'domain'; pass the domains explicitly "
                "(one per expert checkpoint)"
            )
        found.append(domain)
    return _check_domains(where, found)


def _check_domains(where: list[str], names: list[str]) -> list[str]:
    """``names`` (one per routed expert, from ``where``; may be empty): non-empty and distinct."""
    if not names:
        return []
    if len(names) != len(where):
        raise NexusError(f"got {len(names)} domain names for {len(where)} routed experts")
    seen: dict[str, str] = {}
    for name, origin in zip(names, where, strict=True):
        if not isinstance(name, str) or not name.strip():
            raise NexusError(f"{origin}: empty domain name")
        if name in seen:
            raise NexusError(
                f"{origin}: domain '{name}' is already used by {seen[name]}; each routed expert "
                "needs its own domain"
            )
        seen[name] = origin
    return list(names)


def _moe_config(
    method: Method,
    seed_cfg: ModelConfig,
    num_routed: int,
    domains: list[str],
    overrides: dict[str, Any] | None,
) -> ModelConfig:
    """The output config: the seed's architecture with the method's MoE defaults + overrides."""
    linear, nexus = RouterType.linear.value, RouterType.nexus.value
    defaults: dict[Method, dict[str, Any]] = {
        # Top-2 of identical copies renormalised reproduces the dense model at initialisation.
        Method.sparse_upcycle: dict(top_k=2, shared_expert=False, renormalize=True, router=linear),
        Method.btx: dict(top_k=2, shared_expert=False, renormalize=True, router=linear),
        Method.moe_linear: dict(top_k=1, shared_expert=True, renormalize=False, router=linear),
        Method.nexus: dict(top_k=1, shared_expert=True, renormalize=False, router=nexus),
    }
    settings = dict(defaults[method])
    settings["top_k"] = min(settings["top_k"], num_routed)
    overrides = dict(overrides or {})
    for name in _DERIVED_FIELDS:
        if name in overrides:
            raise NexusError(
                f"moe.{name} is set by upcycling from its inputs and cannot be overridden"
            )
    settings.update(overrides)
    settings.update(num_experts=num_routed, domains=domains)
    moe = from_dict(MoEConfig, settings, "moe")
    if moe.expert_intermediate_size not in (None, seed_cfg.intermediate_size):
        raise NexusError(
            f"moe.expert_intermediate_size={moe.expert_intermediate_size}: upcycled experts keep "
            f"the dense FFN width ({seed_cfg.intermediate_size})"
        )
    cfg = from_dict(ModelConfig, to_dict(seed_cfg), "model")  # a deep copy
    cfg.moe = moe
    return cfg


def _domain_vectors(
    cfg: ModelConfig, domains: list[str], embeddings: DomainEmbeddings | None
) -> torch.Tensor | None:
    """(num_experts, m) domain embeddings when the router uses them; sets dim and embedder."""
    moe = cfg.moe
    assert moe is not None
    if not moe.uses_nexus:
        return None
    if embeddings is None:
        raise NexusError(
            f"the {moe.router.value} router needs domain embeddings; compute them with "
            "`nexus-moe embed` and pass them in"
        )
    if not domains:
        raise NexusError(
            f"the {moe.router.value} router needs a domain name for each routed expert"
        )
    # get() raises NexusError naming the first domain that has no embedding.
    vectors = embeddings.get(domains).detach().float().cpu()  # (E, m)
    moe.domain_embedding_dim = int(vectors.shape[1])
    moe.embedder = embeddings.embedder
    return vectors


# --------------------------------------------------------------------------------------------
# the plan: one TensorSpec per output tensor


@dataclass
class TensorSpec:
    """One tensor of a safetensors file to be written by :func:`write_safetensors`.

    ``pieces`` returns an iterable of tensors of ``dtype`` whose row-major concatenation is the
    tensor (e.g. one (I, H) slice per expert of an (E, I, H) stack); it is called only when the
    tensor is written, so inputs are read just in time.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plan(
    cfg: ModelConfig,
    seed_dir: Path,
    routed: list[Path],
    base: list[Path],
    dtypes: dict[str, torch.dtype],
    model_dtype: torch.dtype,
    vectors: torch.Tensor | None,
    seed: int,
) -> list[TensorSpec]:
    """Map every tensor the output config implies to its source (SPEC §5 table)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_state_dict(Transformer(cfg)).items()}
    routers = _router_tensors(cfg, vectors, seed, model_dtype) if cfg.moe is not None else {}
    specs = []
    for name, shape in expected.items():
        if match := _EXPERTS_RE.match(name):
            dense = f"{match[1]}.{match[2]}.weight"
            sources = [(path, dense) for path in routed]
            specs.append(TensorSpec(name, dtypes[dense], shape, _stacked(sources)))
        elif match := _SHARED_RE.match(name):
            dense = f"{match[1]}.{match[2]}"
            specs.append(TensorSpec(name, dtypes[dense], shape, _copied(seed_dir, dense)))
        elif _ROUTER_RE.match(name):
            tensor = routers[name]
            specs.append(TensorSpec(name, tensor.dtype, shape, lambda t=tensor: [t]))
        else:  # attention, norms, embeddings (and the FFN of dense blocks): mean of `base`
            specs.append(TensorSpec(name, dtypes[name], shape, _averaged(base, name, dtypes[name])))
    for spec in specs:
        assert spec.shape == expected[spec.name], spec.name
    # Like safetensors' own writer: larger dtypes first, so every tensor stays aligned.
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))


def _router_tensors(
    cfg: ModelConfig, vectors: torch.Tensor | None, seed: int, model_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Freshly initialised router tensors of every MoE layer (tiny, so built in memory)."""
    moe = cfg.moe
    assert moe is not None
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        if not cfg.is_moe_layer(layer):
            continue
        with torch.random.fork_rng(devices=[]):  # the router's own init must not move global RNG
            router = build_router(moe, cfg.hidden_size)
        with torch.no_grad():
            # Each router initialises itself, drawing from our generator, layer after layer.
            router.reset_parameters(generator)
            if vectors is not None:
                for module in router.modules():
                    if isinstance(module, NexusRouter):
                        module.domain_embeddings.copy_(vectors)
        params = {name for name, _ in router.named_parameters()}
        for name, tensor in router.state_dict().items():
            # Parameters take the model's dtype; buffers (domain embeddings, AC weights) stay
            # float32 as the routers keep them.
            dtype = model_dtype if name in params else tensor.dtype
            out[f"model.layers.{layer}.mlp.router.{name}"] = tensor.detach().to(dtype).contiguous()
    return out


def _read(path: Path, name: str) -> torch.Tensor:
    """One tensor of ``path/model.safetensors``.

    The returned tensor is backed by the file's memory map; the mapping (and the resident pages)
    go away with the tensor. The file is opened per tensor on purpose: a handle kept open keeps
    every page touched so far resident, which would add up to the sum of all inputs.
    """
    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise NexusError(f"{file}: cannot read tensor '{name}' ({exc})") from exc


def _copied(path: Path, name: str) -> Callable[[], Iterator[torch.Tensor]]:
    def pieces() -> Iterator[torch.Tensor]:
        yield _read(path, name)

    return pieces


def _stacked(sources: list[tuple[Path, str]]) -> Callable[[], Iterator[torch.Tensor]]:
    def pieces() -> Iterator[torch.Tensor]:
        for path, name in sources:  # one expert slice at a time
            yield _read(path, name)

    return pieces


def _averaged(paths: list[Path], name: str, dtype: torch.dtype) -> Callable[[], list[torch.Tensor]]:
    def pieces() -> list[torch.Tensor]:
        # float32 accumulation in input order: sum(x_i) / n, then back to the input dtype.
        total: torch.Tensor | None = None
        for path in paths:
            tensor = _read(path, name)
            if total is None:
                total = tensor.to(torch.float32, copy=True)
            else:
                total += tensor
            del tensor  # release the mapping before the next read
        assert total is not None
        total /= len(paths)
        return [total.to(dtype)]

    return pieces


# --------------------------------------------------------------------------------------------
# streaming safetensors writer

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def write_safetensors(
    path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file tensor by tensor, piece by piece, in the order of ``specs``.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; an upcycled MoE is
    several times larger than one input, so the file is written here directly: an 8-byte
    little-endian header length, the JSON header (computed from the shapes up front, padded with
    spaces to a multiple of 8), then each tensor's raw little-endian bytes. The result is read by
    ``safe_open`` exactly like a file from ``save_file``.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored")
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            written = 0
            for piece in spec.pieces():
                if piece.dtype != spec.dtype:
                    raise ValueError(
                        f"{spec.name}: got a {piece.dtype} piece, expected {spec.dtype}"
                    )
                # Raw bytes through a uint8 view: works for bf16, which numpy cannot represent.
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
                del piece, data  # do not hold this piece while the next one is read
            if written != spec.nbytes:
                raise ValueError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
