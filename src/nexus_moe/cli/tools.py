"""Commands around a model: analyse, import, export, run (a recipe), report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nexus_moe.cli.common import (
    EVAL_DEFAULTS,
    DeviceOpt,
    DomainsOpt,
    DtypeOpt,
    MaxShardOpt,
    OverwriteOpt,
    SeqLenOpt,
    app,
    check_out,
    check_out_file,
    chosen_format,
    claim,
    console,
    domain_list,
    tune_allocator,
)
from nexus_moe.config import (
    Device,
    EvalConfig,
)
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import ExportFormat


@app.command()
def analyse(
    checkpoint: Annotated[Path, typer.Argument(help="MoE checkpoint (or run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Directory for heatmaps and JSON.")] = Path("analysis"),
    domains: DomainsOpt = None,
    max_tokens: Annotated[
        int, typer.Option(help="Validation tokens per domain (0: all).")
    ] = EVAL_DEFAULTS.max_tokens or 0,
    seq_len: SeqLenOpt = None,
    name: Annotated[str, typer.Option(help="Label used in file names and titles.")] = "model",
    device: DeviceOpt = Device.auto,
) -> None:
    """Routing matrices (domain x expert), routing accuracy and expert load, with heatmaps."""
    tune_allocator()
    from nexus_moe.analyse import analyse as run_analysis
    from nexus_moe.checkpoint import checkpoint_tokenizer, load_checkpoint
    from nexus_moe.config import check_option
    from nexus_moe.pipeline import check_vocab, resolve_device, resolve_model_dir, tokens_for

    check_option("seq_len", seq_len, "--seq-len")
    cfg = EvalConfig(
        seq_len=seq_len if seq_len is not None else EVAL_DEFAULTS.seq_len,
        max_tokens=max_tokens or None,
    )
    if out.exists() and not out.is_dir():
        raise NexusError(f"{out}: exists and is a file, not a folder; choose a folder for --out")
    ckpt = resolve_model_dir(checkpoint)
    check_out_file(out / f"routing-{name}.json", [checkpoint, ckpt, corpus])
    dev = resolve_device(device)
    tok = checkpoint_tokenizer(ckpt)
    model, _ = load_checkpoint(ckpt, device=str(dev))
    if model.cfg.moe is None:
        raise NexusError(f"{ckpt}: a dense model has no routing to analyse")
    if seq_len is None:
        cfg.seq_len = min(EVAL_DEFAULTS.seq_len, model.cfg.max_seq_len)
    names = domain_list(domains, corpus)
    shards = tokens_for(corpus, tok)
    check_vocab(model, shards, tok)
    report = run_analysis(model, shards, names, out, name, cfg, device=dev)
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
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert a local Hugging Face (Llama/Mistral/Qwen2/Qwen3, safetensors or GGUF) model."""
    from nexus_moe.hf import import_hf

    claim("import", overwrite, source=source)
    check_out(out, [source])

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
            help="auto: qwen3_moe with q/k norms, mixtral when it can express the MoE, else "
            "qwen2_moe; llama (qwen3 with q/k norms, mistral/qwen2 with a sliding window) for "
            "a dense model.",
        ),
    ] = ExportFormat.auto,
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a transformers checkpoint (config, sharded safetensors, tokenizer, chat template,
    generation config, model card). A MoE that routes on context also gets the modeling code
    that transformers runs with trust_remote_code=True."""
    from nexus_moe.hf import export_hf
    from nexus_moe.hf.formats import CONTEXT_MODULE, parse_size
    from nexus_moe.hf.writer import DEFAULT_MAX_SHARD_SIZE
    from nexus_moe.pipeline import resolve_model_dir

    ckpt = resolve_model_dir(checkpoint)
    shard_size = parse_size(max_shard_size) if max_shard_size else DEFAULT_MAX_SHARD_SIZE
    claim("export", overwrite, checkpoint=ckpt, fmt=format_, dtype=dtype, max_shard_size=shard_size)
    check_out(out, [ckpt])
    export_hf(ckpt, out, fmt=format_, dtype=dtype, max_shard_size=shard_size)
    console.print(f"{format_} export written to {out}{chosen_format(format_, out)}")
    if (out / f"{CONTEXT_MODULE}.py").is_file():
        console.print(
            f"its router scores the context ({CONTEXT_MODULE}.py): load it with trust_remote_code=True"
        )


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/tiny.yaml.")],
) -> None:
    """Run every stage of a recipe in order, skipping stages already done."""
    tune_allocator()
    from nexus_moe.study import run_recipe

    run_recipe(recipe, console=console)


@app.command()
def report(
    scores: Annotated[Path, typer.Argument(help="A study's results/scores.json.")],
    out: Annotated[Path, typer.Option("--out", help="Markdown file to write (docs/results.md).")],
) -> None:
    """Write a study's report from its scores.json: the run's results.md under a header line,
    the same bytes for the same scores. Replaces --out only when this command wrote it."""
    from nexus_moe.study.report import write_report

    console.print(f"report written to {write_report(scores, out)}")
