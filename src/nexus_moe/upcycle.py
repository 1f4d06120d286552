"""Build an MoE (or a merged dense model) from dense checkpoints (docs/design.md §5).

| method         | routed experts             | shared expert | non-FFN weights          | router        |
|----------------|----------------------------|---------------|--------------------------|---------------|
| sparse-upcycle | n copies of the seed FFN   | none          | seed                     | linear, top-2 |
| btm            | — (result is dense)        | —             | mean of experts (+ FFN)  | none          |
| btx            | expert FFNs (+ seed FFN)   | none          | mean of experts          | linear, top-2 |
| moe-linear     | expert FFNs                | seed FFN      | mean of experts          | linear, top-1 |
| nexus          | expert FFNs                | none          | mean of experts          | nexus, top-2* |
| nexus-paper    | expert FFNs                | seed FFN      | mean of experts          | nexus, top-1  |

``*``: renormalised, routing on context, router rows calibrated from each domain's text.

``moe_overrides`` may change any other MoE setting (``top_k``, ``router``, ``ac_base``, ...); the
method fixes only where each tensor comes from.

Inputs are native checkpoints or dense Hugging Face folders (read in place); the output is a
native checkpoint or, with ``out_format``, a Hugging Face folder written in the same single pass
(:func:`nexus_moe.hf.export_streamed` over the planned tensors).

Memory: the output is streamed. Input tensors are read one at a time through ``safe_open`` (and
released before the next is read), averages accumulate in float32 one tensor at a time, and the
output ``model.safetensors`` is written tensor by tensor, expert slice by expert slice, so peak
memory stays near the largest single tensor plus the interpreter, not the sum of the inputs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from nexus_moe import calibrate, domain_stats, peer_init
from nexus_moe.checkpoint import (
    WEIGHTS_FILE,
    NonFiniteModel,
    first_nonfinite,
    load_checkpoint,
    model_shapes,
    model_state_dict,
    require_text,
    seed_hash,
    write_checkpoint,
    write_routing_stats,
)
from nexus_moe.config import (
    DEFAULT_CALIBRATION_TOKENS,
    Method,
    ModelConfig,
    MoEConfig,
    check_option,
    from_dict,
    to_dict,
)
from nexus_moe.data import TokenShards
from nexus_moe.domain_stats import DomainStats
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import AUTO, FORMATS, NATIVE
from nexus_moe.routers import NexusRouter, build_router
from nexus_moe.safetensors_io import (
    NonFiniteTensor,
    TensorSource,
    TensorSpec,
    storage_order,
)
from nexus_moe.upcycle_inputs import (
    ARCHITECTURE_FIELDS,
    DenseInput,
    check_domains,
    check_inputs,
    open_input,
    resolve_domains,
)

# Importable from here as before (extend, tests).
__all__ = [
    "ARCHITECTURE_FIELDS",
    "SEED_DOMAIN",
    "UpcycleOptions",
    "method_defaults",
    "moe_config",
    "upcycle",
    "upcycle_with",
]
_open_input = open_input

if TYPE_CHECKING:
    from nexus_moe.embed import DomainEmbeddings


# MoEConfig fields that upcycling derives from its inputs; overriding them would contradict them.
_DERIVED_FIELDS = ("num_experts", "domains", "embedder", "domain_embedding_dim")
# Fields only an imported checkpoint sets (Qwen2-MoE's learned shared-expert gate).
_IMPORT_ONLY_FIELDS = ("shared_expert_gate",)

SEED_DOMAIN = "seed"  # domain name of the seed FFN when btx routes to it

_FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_proj|up_proj|down_proj)$")
_SHARED_RE = re.compile(r"^(model\.layers\.\d+\.mlp)\.shared_expert\.(\w+_proj\.weight)$")
_ROUTER_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.(.+)$")


@dataclass(frozen=True)
class UpcycleOptions:
    """The settings of :func:`upcycle` besides its inputs, method and output folder.

    * ``domain_embeddings``: required when the router uses them (nexus, or AC on nexus); each
      expert's domain must be present. They are written into every MoE layer's router buffer.
    * ``domains``: the domain of each expert checkpoint (sparse-upcycle: of each copy); by default
      read from each expert's metadata ``"domain"``.
    * ``num_experts``: sparse-upcycle only, the number of seed FFN copies (default 4).
    * ``moe_overrides``: further :class:`MoEConfig` fields, e.g. ``{"router": "ac",
      "ac_base": "nexus", "top_k": 2}``; unknown keys and wrong types are errors.
    * ``btx_include_seed``: btx only, the seed's FFN as one more routed expert.
    * ``seed``: seeds the random router initialisation (each router's ``reset_parameters``).
    * ``out_format``: ``native`` writes our checkpoint; a Hugging Face format (``auto``,
      ``qwen2_moe``, ``qwen3_moe``, ``mixtral``; for btm a dense one such as ``llama``) writes
      that folder directly, as :func:`nexus_moe.hf.export_hf` of the native result would, in
      one pass;
      ``out_dtype`` (bf16, fp16, fp32) and ``max_shard_size`` apply to that folder only.
    * ``calibration_shards`` / ``calibration_tokens`` / ``calibrate_router``: place the router
      rows from each expert's domain (``calibration_tokens`` tokens of its training split in
      ``calibration_shards``, tokenised with the seed's tokenizer) so the MoE routes by domain
      before any training (``nexus_moe.calibrate``). ``calibrate_router`` defaults to True for
      ``nexus`` (which then needs the shards) and to "when shards are given" for the others;
      ``nexus-paper`` is the paper's configuration (top-1 + shared seed expert, random
      projection) and is never calibrated by default.
    * ``domain_stats``: statistics files of some or all experts' domains
      (:mod:`nexus_moe.domain_stats`), in place of their text; the experts without one take
      theirs from ``calibration_shards``.
      When the experts share every weight but their FFNs (branched FFN-only) and the MoE has no
      shared expert, the statistics are measured on each dense expert alone, one in memory at a
      time (the same rows as on the assembled MoE), and any ``out_format`` may be calibrated;
      otherwise calibration runs on the assembled MoE and needs the native format.
    * ``router_init``: ``nexus``, or a training-free peer placing the rows instead (docs §5.8).
    """

    domain_embeddings: DomainEmbeddings | None = None
    domains: list[str] | None = None
    num_experts: int | None = None
    moe_overrides: dict[str, Any] | None = None
    btx_include_seed: bool = False
    seed: int = 0
    out_format: str = NATIVE
    calibration_shards: TokenShards | None = None
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    calibrate_router: bool | None = None
    out_dtype: str | None = None
    max_shard_size: int | str | None = None
    domain_stats: list[DomainStats] | None = None
    router_init: str = "nexus"


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
    out_format: str = NATIVE,
    calibration_shards: TokenShards | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    calibrate_router: bool | None = None,
    out_dtype: str | None = None,
    max_shard_size: int | str | None = None,
    domain_stats: list[DomainStats] | None = None,
    router_init: str = "nexus",
) -> Path:
    """Assemble dense checkpoints into ``out_dir`` with ``method`` (docs/design.md §5); returns ``out_dir``.

    * ``seed_dir``: the dense seed model (its FFN becomes the shared expert of moe-linear/nexus,
      the n routed copies of sparse-upcycle, or an extra routed expert of btx with
      ``btx_include_seed``). Its tokenizer.json is copied to the output.
    * ``expert_dirs``: dense domain experts, one routed expert each (empty for sparse-upcycle).
    * the other arguments are the fields of :class:`UpcycleOptions`, documented there
      (:func:`upcycle_with` takes them as one object).

    Each input is a native checkpoint or a dense Hugging Face folder (Llama, Mistral, Qwen2,
    Qwen3; read in place, no import step). All inputs must be dense and share one architecture,
    dtype and tokenizer; everything is checked before anything is written, and the output appears
    atomically.
    """
    options = UpcycleOptions(
        domain_embeddings=domain_embeddings,
        domains=domains,
        num_experts=num_experts,
        moe_overrides=moe_overrides,
        btx_include_seed=btx_include_seed,
        seed=seed,
        out_format=out_format,
        calibration_shards=calibration_shards,
        calibration_tokens=calibration_tokens,
        calibrate_router=calibrate_router,
        out_dtype=out_dtype,
        max_shard_size=max_shard_size,
        domain_stats=domain_stats,
        router_init=router_init,
    )
    return upcycle_with(method, seed_dir, expert_dirs, out_dir, options)


def upcycle_with(
    method: str | Method,
    seed_dir: str | Path,
    expert_dirs: list[str | Path] | list[Path],
    out_dir: str | Path,
    options: UpcycleOptions,
) -> Path:
    """:func:`upcycle` with its settings as one :class:`UpcycleOptions`."""
    method = _parse_method(method)
    o = peer_init.upcycle_options(method, options)
    check_option("calibration_tokens", o.calibration_tokens)
    out_dir = Path(out_dir)
    expert_paths = [Path(p) for p in expert_dirs]
    _check_request(method, expert_paths, o)
    stats_by_domain = _stats_by_domain(o.domain_stats or [])
    calibrate_router = _check_calibration(
        method, o.calibrate_router, o.calibration_shards, bool(stats_by_domain)
    )

    seed_in, expert_ins = check_inputs(Path(seed_dir), expert_paths)
    routed, expert_domains, base = _routed_experts(method, seed_in, expert_ins, o)
    if not method.is_moe:
        if o.moe_overrides:
            raise NexusError("btm produces a dense model; moe_overrides do not apply")
        cfg, vectors = seed_in.cfg, None
    else:
        cfg = moe_config(method, seed_in.cfg, len(routed), expert_domains, o.moe_overrides)
        vectors = _domain_vectors(cfg, expert_domains, o.domain_embeddings)

    model_dtype = seed_in.dtypes["model.embed_tokens.weight"]
    layer_stats = None
    if calibrate_router:
        by_dense = _calibrates_on_dense(cfg, base, o.out_format, bool(stats_by_domain))
        _check_stats_domains(stats_by_domain, expert_domains, o.calibration_shards)
        if by_dense:
            layer_stats = _dense_statistics(
                cfg, routed, expert_domains, o.calibration_shards, stats_by_domain,
                o.calibration_tokens,
            )  # fmt: skip
    rows = None if layer_stats is None else [calibrate.router_rows(s) for s in layer_stats]
    specs = _plan(cfg, seed_in, routed, base, model_dtype, vectors, o.seed, rows)
    metadata = {
        "stage": "upcycle",
        "method": method.value,
        "inputs": [str(seed_in.path), *(str(p.path) for p in expert_ins)],
        "domains": expert_domains,
        "router_seed": o.seed,
        "seed_sha256": seed_hash(seed_in.path),  # extend checks new experts against it
    }
    finish = _finish_step(layer_stats, calibrate_router, o) or peer_init.upcycle_placement(
        o, cfg, seed_in, expert_domains
    )
    hf_options = {"dtype": o.out_dtype}
    if o.max_shard_size is not None:
        hf_options["max_shard_size"] = o.max_shard_size
    try:
        return _write_output(
            out_dir, o.out_format, cfg, specs, metadata, seed_in.tokenizer, finish, hf_options
        )
    except (NonFiniteModel, NonFiniteTensor):  # name the input it came from, if one holds it
        _name_nonfinite_input([seed_in, *expert_ins])
        raise


def _check_request(method: Method, expert_paths: list[Path], o: UpcycleOptions) -> None:
    """Refuse a combination of method, experts and options that cannot be, before any reading."""
    rules = method.rules
    if not rules.takes_experts and expert_paths:
        raise NexusError(
            f"sparse-upcycle copies the seed's FFN and takes no expert checkpoints "
            f"(got {len(expert_paths)}); use btx, moe-linear or nexus to combine experts"
        )
    if rules.takes_experts and not expert_paths:
        raise NexusError(f"{method.value} needs at least one dense expert checkpoint; got none")
    if rules.takes_experts and o.num_experts is not None:
        raise NexusError(
            f"num_experts is only for sparse-upcycle; {method.value} has one routed expert per "
            f"expert checkpoint ({len(expert_paths)})"
        )

    if o.btx_include_seed and not rules.seed_expert:
        raise NexusError(f"btx_include_seed applies to btx only, not {method.value}")
    _check_out_format(o.out_format)
    if o.out_format == NATIVE and (o.out_dtype is not None or o.max_shard_size is not None):
        raise NexusError(
            "--dtype and --max-shard-size apply to a Hugging Face output; pass --format "
            "(e.g. --format auto), or `nexus-moe export` the native checkpoint with them"
        )


def _routed_experts(
    method: Method, seed_in: DenseInput, expert_ins: list[DenseInput], o: UpcycleOptions
) -> tuple[list[DenseInput], list[str], list[DenseInput]]:
    """Where each kind of tensor comes from: the routed experts, their domains, and the inputs
    whose non-FFN weights are averaged."""
    if not method.rules.takes_experts:
        copies = 4 if o.num_experts is None else o.num_experts
        if copies < 1:
            raise NexusError(f"num_experts={copies}: sparse-upcycle needs at least one copy")
        routed = [seed_in] * copies
        expert_domains = check_domains([f"copy {i}" for i in range(copies)], o.domains or [])
        base = [seed_in]  # non-FFN weights: the seed's
    else:
        expert_domains = resolve_domains(expert_ins, o.domains)
        routed = list(expert_ins)
        base = list(expert_ins)  # non-FFN weights: mean over the experts
        if method.rules.seed_expert and o.btx_include_seed:
            routed.append(seed_in)
            expert_domains = check_domains(
                [str(p.path) for p in routed], [*expert_domains, SEED_DOMAIN]
            )
    return routed, expert_domains, base


def _finish_step(
    layer_stats: list[calibrate.LayerStats] | None, calibrate_router: bool, o: UpcycleOptions
) -> Callable[[Path], None] | None:
    """What completes a written native checkpoint before it is published: its router
    statistics, or the calibration of its router on the assembled model."""
    if layer_stats is not None and o.out_format == NATIVE:
        return functools.partial(_write_stats, stats=layer_stats)
    if calibrate_router and layer_stats is None:
        assert o.calibration_shards is not None
        return functools.partial(
            _calibrate_in_place, shards=o.calibration_shards, num_tokens=o.calibration_tokens
        )
    return None


def _name_nonfinite_input(inputs: list[DenseInput]) -> None:
    """Raise the NexusError naming the first input tensor holding NaN or infinite values, if any."""
    for source in inputs:
        bad = first_nonfinite(source.tensors)
        if bad is not None:
            raise NexusError(
                f"{source.tensors.file_of(bad)}: tensor '{bad}' holds NaN or infinite "
                "values, so the upcycled model would too; nothing was written — restore "
                "this input or train it again"
            ) from None


def _check_out_format(out_format: str) -> None:
    """Refuse an unknown output format before anything is read."""
    if out_format not in (NATIVE, AUTO, *FORMATS):
        raise NexusError(
            f"output format '{out_format}' is unknown; choose native, auto or one of: "
            f"{', '.join(sorted(FORMATS))}"
        )


def _check_calibration(
    method: Method,
    calibrate_router: bool | None,
    calibration_shards: TokenShards | None,
    has_stats: bool,
) -> bool:
    """Whether the router rows are calibrated (docs/design.md §5.6); refuses what cannot be."""
    given = calibration_shards is not None or has_stats
    if calibrate_router is None:
        calibrate_router = method.calibrates_by_default or given
    if not calibrate_router:
        if has_stats:
            raise NexusError("--stats calibrates the router; drop it or --no-calibrate")
        return False
    if not method.rules.routes_domains:
        raise NexusError(
            f"{method.value} has no domain experts to calibrate a router for; drop --corpus "
            "and --stats"
        )
    if not given:
        raise NexusError(
            f"{method.value} places its router rows from each domain's training text: pass "
            "--corpus (the corpus the experts were branched on) or each expert's --stats, or "
            "--no-calibrate / --method nexus-paper for the paper's random router initialisation"
        )
    return True


def _stats_by_domain(stats: list[DomainStats]) -> dict[str, DomainStats]:
    out: dict[str, DomainStats] = {}
    for item in stats:
        if item.domain in out:
            raise NexusError(f"--stats: two statistics files for the domain '{item.domain}'")
        out[item.domain] = item
    return out


def _check_stats_domains(
    stats: dict[str, DomainStats], domains: list[str], shards: TokenShards | None
) -> None:
    """Every statistics file names an expert's domain; every other domain is in ``shards``."""
    for name in stats:
        if name not in domains:
            raise NexusError(
                f"--stats: statistics of the domain '{name}', which no expert has (experts: "
                f"{', '.join(domains)}); pass the matching --expert or drop the file"
            )
    missing = [d for d in domains if d not in stats]
    if missing and shards is None:
        raise NexusError(
            f"no statistics for the domain(s) {', '.join(missing)}: pass --stats for each, or "
            "--corpus holding their text"
        )


def _calibrates_on_dense(
    cfg: ModelConfig, base: list[DenseInput], out_format: str, has_stats: bool
) -> bool:
    """Whether the router statistics can be measured on each dense expert alone: the MoE with
    a token forced to an expert must compute that expert, so the MoE has no shared expert and
    every weight it averages over the experts is the same in all of them (branched FFN-only).
    Refuses what only the assembled MoE could calibrate, but cannot (a Hugging Face output,
    statistics files)."""
    assert cfg.moe is not None
    if cfg.moe.shared_expert:
        why = "the MoE has an always-on shared expert"
    else:
        averaged = [
            name
            for name in model_shapes(cfg)
            if not (_EXPERTS_RE.match(name) or _SHARED_RE.match(name) or _ROUTER_RE.match(name))
        ]
        why = _first_difference(base, averaged)
    if why is None:
        return True
    if has_stats:
        raise NexusError(
            f"--stats describe a domain on its dense expert, which is what the MoE computes "
            f"only for experts that differ in their FFNs alone, but {why}; calibrate from "
            "--corpus instead"
        )
    if out_format != NATIVE:
        raise NexusError(
            f"a calibrated router is computed here from the assembled model ({why}): upcycle "
            "to the native format, then `nexus-moe export` it (or pass --no-calibrate)"
        )
    return False


def _first_difference(sources: list[DenseInput], names: list[str]) -> str | None:
    """Why ``sources`` do not all hold the same tensor for each of ``names`` (None: they do)."""
    for name in names:
        first = _read(sources[0], name)
        for other in sources[1:]:
            if not torch.equal(_read(other, name), first):
                return (
                    f"the experts differ outside their FFNs ('{name}' of {other.path}); they "
                    "were not branched FFN-only"
                )
    return None


def _dense_statistics(
    cfg: ModelConfig,
    routed: list[DenseInput],
    domains: list[str],
    shards: TokenShards | None,
    stats: dict[str, DomainStats],
    num_tokens: int,
) -> list[calibrate.LayerStats]:
    """Each MoE layer's statistics, each domain measured on its dense expert alone (or read
    from its statistics file): one expert in memory at a time."""
    assert cfg.moe is not None
    blocks = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    context = cfg.moe.router_context
    moments, held = [], []
    pooled: list[torch.Tensor] = []  # each layer's sum of the domains' scatters (H, H)

    def pool(layer: int, m: calibrate.DomainMoments, borrowed: bool = False) -> None:
        # (the order sum() would add them in: domain after domain); a domain's scatter is
        # dropped once pooled, the moment its block is done, so one domain holds one at a time
        # (a statistics file's moments are the caller's: read, never dropped or summed into)
        ours = not borrowed and m.samples is not None
        scatter = m.drop_scatter() if ours else m.scatter
        assert scatter is not None
        if len(pooled) == layer:  # summed into in place: copied unless it is ours alone
            pooled.append(scatter if ours else scatter.clone())
        else:
            pooled[layer].add_(scatter)

    for expert, domain in zip(routed, domains, strict=True):
        if domain in stats:
            got, windows = domain_stats.for_moe(
                stats[domain],
                blocks,
                context,
                domain_stats.tensor_fingerprint(expert.tensors),
                f"--stats of {domain}",
            )
            for layer, m in enumerate(got):
                pool(layer, m, borrowed=True)
        else:
            assert shards is not None
            windows = calibrate.domain_windows(shards, domain, cfg.max_seq_len, num_tokens)
            require_text(windows, shards.data_dir, domain)
            got = domain_stats.streamed_moments(
                expert.cfg, expert.tensors, windows, context, blocks, finished=pool
            )
        moments.append(got)
        held.append(windows)
    return calibrate.statistics_from_moments(moments, held, pooled_scatter=pooled)


def _write_stats(ckpt_dir: Path, stats: list[calibrate.LayerStats]) -> None:
    save_file(calibrate.stats_to_tensors(stats), str(ckpt_dir / calibrate.STATS_FILE))


def _write_output(
    out_dir: Path,
    out_format: str,
    cfg: ModelConfig,
    specs: list[TensorSpec],
    metadata: dict[str, Any],
    tokenizer: Path | None,
    finish: Callable[[Path], None] | None = None,
    hf_options: dict[str, Any] | None = None,
) -> Path:
    """Write the planned tensors as a native checkpoint or, in one pass, a Hugging Face folder
    (``hf_options``: dtype and max_shard_size of :func:`nexus_moe.hf.export_streamed`).

    ``finish`` (native only) completes the written checkpoint before it is published, e.g. by
    calibrating its router rows.
    """
    if out_format == NATIVE:
        return write_checkpoint(out_dir, cfg, specs, metadata, tokenizer, finish=finish)
    assert finish is None
    from nexus_moe.hf import export_streamed

    return export_streamed(
        _PlannedTensors(cfg, specs, out_dir),
        cfg,
        out_dir,
        fmt=out_format,
        metadata=metadata,
        tokenizer_path=tokenizer,
        **(hf_options or {}),
    )


def _calibrate_in_place(ckpt_dir: Path, shards: TokenShards, num_tokens: int) -> None:
    """Calibrate the router rows of the (not yet published) checkpoint in ``ckpt_dir``.

    This holds the whole MoE in memory, unlike the streamed assembly before it.
    """
    model, _ = load_checkpoint(ckpt_dir)
    calibrate.calibrate_model(model, shards, num_tokens)
    save_file(model_state_dict(model), str(ckpt_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    write_routing_stats(model, ckpt_dir)


def _parse_method(method: str | Method) -> Method:
    try:
        return Method(method)
    except ValueError:
        allowed = ", ".join(m.value for m in Method)
        raise NexusError(f"unknown upcycling method '{method}'; choose one of: {allowed}") from None


def method_defaults(method: Method) -> dict[str, Any]:
    """The MoE settings ``method`` sets before the user's overrides (``METHOD_RULES``; a study
    keys its upcycling stages on them, so that a changed default is not served from an earlier
    run's result)."""
    return dict(method.rules.moe_defaults)  # a dense merge (btm) has none


def moe_config(
    method: Method,
    seed_cfg: ModelConfig,
    num_routed: int,
    domains: list[str],
    overrides: dict[str, Any] | None,
) -> ModelConfig:
    """The output config: the seed's architecture with the method's MoE defaults + overrides."""
    settings = method_defaults(method)
    settings["top_k"] = min(settings["top_k"], num_routed)
    overrides = dict(overrides or {})
    for name in _DERIVED_FIELDS:
        if name in overrides:
            raise NexusError(
                f"moe.{name} is set by upcycling from its inputs and cannot be overridden"
            )
    for name in _IMPORT_ONLY_FIELDS:
        if overrides.get(name):
            raise NexusError(
                f"moe.{name} comes from importing a Qwen2-MoE checkpoint; an upcycled MoE's "
                "shared expert is the seed's FFN, always on (drop the setting)"
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
            "`nexus-moe embed-domains` and pass them with --embeddings"
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


def _plan(
    cfg: ModelConfig,
    seed: DenseInput,
    routed: list[DenseInput],
    base: list[DenseInput],
    model_dtype: torch.dtype,
    vectors: torch.Tensor | None,
    router_seed: int,
    rows: list[torch.Tensor] | None = None,
) -> list[TensorSpec]:
    """Map every tensor the output config implies to its source (docs/design.md §5 table);
    ``rows``: calibrated router rows of each MoE layer."""
    expected = {name: shape for name, (shape, _) in model_shapes(cfg).items()}
    routers = (
        _router_tensors(cfg, vectors, router_seed, model_dtype, rows) if cfg.moe is not None else {}
    )
    dtypes = seed.dtypes
    specs: list[TensorSpec] = []
    for name, shape in expected.items():
        if match := _EXPERTS_RE.match(name):
            dense = f"{match[1]}.{match[2]}.weight"
            spec = TensorSpec(name, dtypes[dense], shape, _stacked(routed, dense))
            spec.slices = [functools.partial(_read, e, dense) for e in routed]
        elif match := _SHARED_RE.match(name):
            dense = f"{match[1]}.{match[2]}"
            spec = TensorSpec(name, dtypes[dense], shape, _copied(seed, dense))
        elif _ROUTER_RE.match(name):
            tensor = routers[name]
            spec = TensorSpec(name, tensor.dtype, shape, lambda t=tensor: [t])
        else:  # attention, norms, embeddings (and the FFN of dense blocks): mean of `base`
            spec = TensorSpec(name, dtypes[name], shape, _averaged(base, name, dtypes[name]))
        specs.append(spec)
    for spec in specs:
        assert spec.shape == expected[spec.name], spec.name
    return storage_order(specs)


class _PlannedTensors(TensorSource):
    """The tensors of a planned upcycle output, produced on demand (a ``TensorSource``):
    an expert slice reads just that expert's dense tensor."""

    def __init__(self, cfg: ModelConfig, specs: list[TensorSpec], location: Path) -> None:
        self.location = location
        order = list(model_shapes(cfg))
        by_name = {spec.name: spec for spec in specs}
        self._specs = {name: by_name[name] for name in order}
        self.shapes = {name: spec.shape for name, spec in self._specs.items()}
        self.dtypes = {name: spec.dtype for name, spec in self._specs.items()}

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        spec = self._specs[name]
        if index is not None and spec.slices is not None:
            return spec.slices[index]()
        pieces = [piece.reshape(-1) for piece in spec.pieces()]
        tensor = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(spec.shape)
        return tensor if index is None else tensor[index]


def _router_tensors(
    cfg: ModelConfig,
    vectors: torch.Tensor | None,
    seed: int,
    model_dtype: torch.dtype,
    rows: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Freshly initialised router tensors of every MoE layer (tiny, so built in memory), with
    the calibrated ``rows`` of each MoE layer set when given."""
    moe = cfg.moe
    assert moe is not None
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    moe_blocks = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
    for layer in moe_blocks:
        with torch.random.fork_rng(devices=[]):  # the router's own init must not move global RNG
            router = build_router(moe, cfg.hidden_size)
        with torch.no_grad():
            # Each router initialises itself, drawing from our generator, layer after layer.
            router.reset_parameters(generator)
            if vectors is not None:
                for module in router.modules():
                    if isinstance(module, NexusRouter):
                        module.domain_embeddings.copy_(vectors)
            if rows is not None:
                router.set_rows(rows[moe_blocks.index(layer)])
        params = {name for name, _ in router.named_parameters()}
        for name, tensor in router.state_dict().items():
            # Parameters take the model's dtype; buffers (domain embeddings, AC weights) stay
            # float32 as the routers keep them.
            dtype = model_dtype if name in params else tensor.dtype
            out[f"model.layers.{layer}.mlp.router.{name}"] = tensor.detach().to(dtype).contiguous()
    return out


def _read(source: DenseInput, name: str) -> torch.Tensor:
    """One tensor of an input, backed by the file's memory map, which (with its resident
    pages) goes away with the tensor."""
    return source.tensors.get(name)


def _copied(source: DenseInput, name: str) -> Callable[[], Iterator[torch.Tensor]]:
    def pieces() -> Iterator[torch.Tensor]:
        yield _read(source, name)

    return pieces


def _stacked(sources: list[DenseInput], name: str) -> Callable[[], Iterator[torch.Tensor]]:
    def pieces() -> Iterator[torch.Tensor]:
        for source in sources:  # one expert slice at a time
            yield _read(source, name)

    return pieces


def _averaged(
    sources: list[DenseInput], name: str, dtype: torch.dtype
) -> Callable[[], list[torch.Tensor]]:
    def pieces() -> list[torch.Tensor]:
        # float32 accumulation in input order: sum(x_i) / n, then back to the input dtype.
        # Inputs that all hold the same tensor (experts branched with only their FFNs trained
        # share the seed's other weights) give that tensor bit for bit, not a rounded mean.
        # The sum is started only at the first input that differs (the inputs before it
        # equal the first, so it is the same sum): the common case holds two inputs' pages,
        # not a copy and a float32 sum besides.
        first = _read(sources[0], name)
        total: torch.Tensor | None = None
        for position, source in enumerate(sources[1:], start=1):
            tensor = _read(source, name)
            if total is None and not torch.equal(tensor, first):
                total = first.to(torch.float32, copy=True)
                for _ in range(position - 1):
                    total += first
            if total is not None:
                total += tensor
            del tensor  # release the mapping before the next read
        if total is None:
            return [first.to(dtype)]
        total /= len(sources)
        return [total.to(dtype)]

    return pieces
