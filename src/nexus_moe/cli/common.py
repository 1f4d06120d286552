"""The ``nexus-moe`` command line: one sub-command per pipeline stage (docs/design.md §1).

Defaults live in the config dataclasses; ``--config FILE.yaml`` and ``--set key=value`` fill a
:class:`TrainConfig`, validated like recipes (unknown keys and wrong types are errors).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from nexus_moe.config import (
    DEVICE_CHOICES,
    EmbedConfig,
    EvalConfig,
)
from nexus_moe.corpus import load_manifest
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import ExportDtype

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
EVAL_DEFAULTS = EvalConfig()
EMBED_DEFAULTS = EmbedConfig()
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Tokens per scored window (default: {EVAL_DEFAULTS.seq_len}, or the model's max_seq_len "
        "when shorter)."
    ),
]


def claim(command: str, overwrite: bool, **params: Any) -> None:
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


def check_out(out: Path, inputs: list[Path | None] | None = None, space: bool = True) -> None:
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


def check_out_file(
    out: Path, inputs: list[Path | None] | None = None, option: str = "--out"
) -> None:
    """A bad output file (a folder, an input or inside one, a file nexus-moe did not write, an
    unwritable folder) is reported before any work (see ``io_utils.output_file``)."""
    from nexus_moe.io_utils import check_output_file

    check_output_file(out, [p for p in inputs or [] if p is not None], option)


def check_device(device: str) -> None:
    from nexus_moe.config import check_device_name

    check_device_name(device)


def split_list(domains: str | None) -> list[str] | None:
    return [d.strip() for d in domains.split(",") if d.strip()] if domains else None


def domain_list(domains: str | None, corpus: Path) -> list[str]:
    """The ``--domains`` given, else every domain of the corpus (from its manifest)."""
    return split_list(domains) or list(load_manifest(corpus)["domains"])


def settings_from(
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


def train_config(config: Path | None, overrides: list[str] | None, section: str):
    from nexus_moe.config import from_dict
    from nexus_moe.train import TrainConfig

    return from_dict(TrainConfig, settings_from(config, overrides, section), "train")


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


def tune_allocator() -> None:
    """Training and evaluation commands: keep large freed blocks for reuse (see
    :func:`nexus_moe.train.tune_cpu_allocator`)."""
    from nexus_moe.train import tune_cpu_allocator

    tune_cpu_allocator()


def chosen_format(fmt: str, out: Path) -> str:
    """`` (auto chose mixtral)`` after --format auto wrote a Hugging Face folder, else ""."""
    from nexus_moe.hf.formats import AUTO
    from nexus_moe.io_utils import CONFIG_FILE, read_json

    config = out / CONFIG_FILE
    if fmt != AUTO or not config.is_file():
        return ""
    return f" (--format auto chose {read_json(config).get('model_type')})"
