"""Self-describing model checkpoints: a directory of safetensors + JSON (docs/design.md §14).

Layout of a checkpoint directory::

    config.json          {"format": "nexus-moe", "model": ModelConfig, "metadata": {...}}
    model.safetensors    weights (tied lm_head stored once, as the embedding)
    tokenizer.json       the tokenizer the model was trained with (when known), with the
                         Hugging Face files that travel with it when the source had them:
                         tokenizer_config.json (chat template, special tokens),
                         chat_template.jinja, special_tokens_map.json, generation_config.json
    routing_stats.safetensors   MoE only, optional: the domain statistics its router rows were
                         calibrated from (``nexus_moe.calibrate``), used to place new experts
    peer_router.safetensors     MoE upcycled with a peer's ``--router-init`` only: what its rows
                         were made from, to grow and shrink it by the peer's rule
                         (``nexus_moe.routers.peers``)

Everything is written to a temporary directory and renamed into place, so an interrupted save
never leaves a half-written checkpoint. Nothing is unpickled on load.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nexus_moe import __version__
from nexus_moe.calibrate import STATS_FILE, stats_from_tensors, stats_to_tensors
from nexus_moe.config import ModelConfig, from_dict, to_dict
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    file_sha256,
    read_json,
    write_json,
)
from nexus_moe.model import Transformer
from nexus_moe.routers import peers
from nexus_moe.safetensors_io import (
    NonFiniteTensor,
    SafetensorsFiles,
    TensorSource,
    TensorSpec,
    check_finite_tensor,
    read_safetensors,
    storage_order,
    write_safetensors,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "TOKENIZER_COMPANIONS",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "check_tensor_table",
    "checkpoint_tokenizer",
    "copy_tokenizer",
    "find_tokenizer",
    "load_checkpoint",
    "load_config",
    "load_routing_stats",
    "load_state_into",
    "model_shapes",
    "model_state_dict",
    "open_weights",
    "read_safetensors",
    "save_checkpoint",
    "seed_hash",
    "weights_hash",
    "write_checkpoint",
]

# Files that describe how a tokenizer.json is used (chat template, bos/eos/pad, generation
# defaults); wherever a tokenizer.json is copied, those beside it go with it.
TOKENIZER_COMPANIONS = (
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
FORMAT = "nexus-moe"


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Persistent tensors to save (the tied lm_head is dropped; it is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(
    out_dir: str | Path,
    model: Transformer,
    tokenizer_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a self-describing checkpoint directory, atomically.

    ``extra_files`` maps file names to either a dict (written as JSON), a dict of tensors
    (written as safetensors) or a path (copied).
    """
    out_dir = Path(out_dir)
    state = model_state_dict(model)
    check_model_finite(state.items(), out_dir)  # before anything is written
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(
            tmp / CONFIG_FILE, _config_doc(model.cfg, metadata, file_sha256(tmp / WEIGHTS_FILE))
        )
        if tokenizer_path is not None:
            copy_tokenizer(find_tokenizer(tokenizer_path), tmp)
        write_routing_stats(model, tmp)
        peers.write_model_state(model, tmp)
        for name, content in (extra_files or {}).items():
            _write_extra(tmp / name, content)
    return out_dir


def write_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    specs: list[TensorSpec],
    metadata: dict[str, Any],
    tokenizer: Path | None = None,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory whose weights are produced tensor by tensor (``specs``, our
    tensor names), atomically: the streaming counterpart of :func:`save_checkpoint`, for models
    that are never built in memory (an import, an upcycling).

    ``finish(folder)`` runs on the complete checkpoint before it is published; it may rewrite the
    weights (the recorded weights hash is then refreshed).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, finite_or_error(out_dir):
        write_safetensors(tmp / WEIGHTS_FILE, storage_order(specs), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, _config_doc(cfg, metadata, file_sha256(tmp / WEIGHTS_FILE)))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        if finish is not None:
            finish(tmp)
            rewritten = SafetensorsFiles([tmp / WEIGHTS_FILE])  # checked again, one at a time
            check_model_finite(((n, rewritten.get(n)) for n in rewritten.shapes), out_dir)
            doc = _config_doc(cfg, metadata, file_sha256(tmp / WEIGHTS_FILE))
            write_json(tmp / CONFIG_FILE, doc)
    return out_dir


NONFINITE_FIX = (
    "nothing was written; check the inputs and options that made it (a weight file with NaN "
    "values, a factor such as --row-scale or --merge-weight, a domain without training text)"
)


class NonFiniteModel(NexusError):
    """A model would have been written with NaN or infinite values (nothing was written);
    ``tensor`` names the first such tensor."""

    tensor: str = ""


def nonfinite_error(out: Path, tensor: str, cause: str | None = None) -> NexusError:
    """The one message for a model that would be written with NaN or infinite values."""
    why = f" ({cause})" if cause else ""
    error = NonFiniteModel(
        f"{out}: the model to be written holds NaN or infinite values in '{tensor}'{why}; "
        + NONFINITE_FIX
    )
    error.tensor = tensor
    return error


def check_model_finite(tensors: Any, out: str | Path, cause: str | None = None) -> None:
    """NexusError (:func:`nonfinite_error`) unless every (name, tensor) of ``tensors`` is finite.

    Every model nexus-moe writes passes here or through ``write_safetensors``' own check.
    """
    for name, tensor in tensors:
        try:
            check_finite_tensor(name, tensor)
        except NonFiniteTensor as exc:
            raise nonfinite_error(Path(out), exc.tensor, cause) from None


@contextmanager
def finite_or_error(out: str | Path, cause: str | None = None) -> Iterator[None]:
    """Turn ``write_safetensors``' NonFiniteTensor inside the block into :func:`nonfinite_error`."""
    try:
        yield
    except NonFiniteTensor as exc:
        raise nonfinite_error(Path(out), exc.tensor, cause) from None


def _config_doc(
    cfg: ModelConfig, metadata: dict[str, Any] | None, weights_sha256: str
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": __version__,
        "model": to_dict(cfg),
        "metadata": metadata or {},
        "weights_sha256": weights_sha256,
    }


def _write_extra(path: Path, content: Any) -> None:
    if isinstance(content, str | Path):
        shutil.copyfile(content, path)
    elif (
        isinstance(content, dict)
        and content
        and all(isinstance(v, torch.Tensor) for v in content.values())
    ):
        save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(path))
    else:
        write_json(path, content)


def first_nonfinite(source: TensorSource) -> str | None:
    """The first tensor of ``source`` (an input's weights) holding NaN or infinite values."""
    for name in source.shapes:
        try:
            check_finite_tensor(name, source.get(name))
        except NonFiniteTensor:
            return name
    return None


def require_text(windows: torch.Tensor, corpus: Path, domain: str) -> None:
    """NexusError when ``domain``'s calibration ``windows`` hold no token (an empty train split):
    a router row placed from no text would be NaN."""
    if windows.numel() == 0:
        raise NexusError(
            f"{corpus}: the training split of domain '{domain}' holds no tokens, so its router "
            "row cannot be placed from its text; add text to the domain and rebuild the corpus"
        )


def check_branched_from(seed_dir: Path, expert_dir: Path, expert_meta: dict[str, Any]) -> None:
    """NexusError unless the expert in ``expert_dir`` was branched from the seed in ``seed_dir``
    (as far as both record it: the expert's ``seed_sha256`` metadata against the seed's weights;
    experts or seeds that are not native checkpoints are not checked)."""
    theirs, ours = expert_meta.get("seed_sha256"), seed_hash(seed_dir)
    if isinstance(theirs, str) and ours is not None and theirs != ours:
        raise NexusError(
            f"{expert_dir}: this expert was branched from another seed than {seed_dir} (seed "
            f"hashes {theirs[:12]} vs {ours[:12]}); pass its own seed, or branch it from this one"
        )


_HASHES: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime, inode) -> sha256


def weights_hash(ckpt_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights file as it is now.

    The ``weights_sha256`` recorded in config.json when the checkpoint was saved is not trusted:
    resume and skip decisions key on this hash, and weights replaced in place must count as new
    inputs (a stale result is never passed off as new). The hash is computed once per file
    version (path, size, modification time, inode) in this process.
    """
    path = Path(ckpt_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise NexusError(f"{path}: weights file not found")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def seed_hash(model_dir: str | Path) -> str | None:
    """The weights hash of a native dense checkpoint used as a seed (None for other folders).

    Recorded as ``seed_sha256`` in the metadata of experts branched from it and of MoEs built
    from it, so that ``extend`` can tell an expert branched from another seed.
    """
    model_dir = Path(model_dir)
    try:
        doc = read_json(model_dir / CONFIG_FILE)
    except NexusError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    if not (model_dir / WEIGHTS_FILE).is_file():
        return None
    return weights_hash(model_dir)


def checkpoint_tokenizer(ckpt_dir: str | Path) -> Path:
    """``ckpt_dir/tokenizer.json``; NexusError naming it when the checkpoint has none."""
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise NexusError(
            f"{path}: the checkpoint has no tokenizer.json; copy the tokenizer the model was "
            "trained with into the checkpoint folder"
        )
    return path


def copy_tokenizer(tokenizer_file: Path, folder: Path) -> None:
    """Copy ``tokenizer_file`` as ``folder/tokenizer.json``, with the
    :data:`TOKENIZER_COMPANIONS` that lie beside it."""
    shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
    for name in TOKENIZER_COMPANIONS:
        companion = tokenizer_file.parent / name
        if companion.is_file():
            shutil.copyfile(companion, folder / name)


def find_tokenizer(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/tokenizer.json``; NexusError if absent."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise NexusError(f"{candidate}: tokenizer file not found")
    return candidate


def load_config(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a checkpoint's model config and metadata."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise NexusError(f"{ckpt_dir}: checkpoint directory not found")
    doc = read_json(ckpt_dir / CONFIG_FILE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise NexusError(
            f"{ckpt_dir / CONFIG_FILE}: not a nexus-moe checkpoint (a Hugging Face folder? "
            "convert it with `nexus-moe import`)"
        )
    cfg = from_dict(ModelConfig, doc["model"], "model")
    return cfg, doc.get("metadata", {})


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor a checkpoint of ``cfg`` holds, in state-dict order (from a
    model on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: (tuple(t.shape), t.dtype) for name, t in model_state_dict(model).items()}


def open_weights(ckpt_dir: str | Path, cfg: ModelConfig) -> SafetensorsFiles:
    """A checkpoint's weights as a lazy :class:`~nexus_moe.safetensors_io.TensorSource` (stored
    dtypes), after checking its tensor table against ``cfg`` from the header alone."""
    path = Path(ckpt_dir) / WEIGHTS_FILE
    source = SafetensorsFiles([path])
    expected = {name: shape for name, (shape, _) in model_shapes(cfg).items()}
    check_tensor_table(expected, source.shapes, path)
    return source


def check_tensor_table(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path
) -> None:
    """NexusError naming the first missing, unexpected or misshapen tensor of ``found``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        what = (
            f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        )
        raise NexusError(f"{source}: {what}; the weights do not match config.json")
    for name in sorted(found):
        if tuple(found[name]) != tuple(expected[name]):
            raise NexusError(
                f"{source}: tensor '{name}' has shape {tuple(found[name])}, config.json implies "
                f"{tuple(expected[name])}"
            )


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """NexusError naming the first tensor holding NaN or infinite values (one pass, no copies)."""
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NexusError(
                f"{source}: tensor '{name}' holds NaN or infinite values; the file is corrupt — "
                "restore it from a copy or re-run the stage that wrote it"
            )


def load_state_into(model: Transformer, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model``, naming the first missing/unexpected/misshapen tensor."""
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model).items()}
    check_tensor_table(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    check_finite(state, source)
    model.load_state_dict(state, strict=False)


def load_checkpoint(
    ckpt_dir: str | Path, device: str = "cpu"
) -> tuple[Transformer, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights bit-exactly."""
    ckpt_dir = Path(ckpt_dir)
    cfg, metadata = load_config(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)  # no random init: every weight is loaded below
    model.init_buffers()
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    state = read_safetensors(ckpt_dir / WEIGHTS_FILE, device=device)
    load_state_into(model, state, ckpt_dir / WEIGHTS_FILE)
    load_routing_stats(model, ckpt_dir)
    peers.attach_state(model, ckpt_dir)
    return model, metadata


def write_routing_stats(model: Transformer, ckpt_dir: Path) -> None:
    """Write ``ckpt_dir``'s routing statistics file when every MoE layer carries statistics."""
    stats = [layer.domain_stats for layer in model.moe_layers()]
    if stats and all(s is not None for s in stats):
        save_file(stats_to_tensors(stats), str(ckpt_dir / STATS_FILE))


def load_routing_stats(model: Transformer, ckpt_dir: Path) -> None:
    """Attach ``ckpt_dir``'s routing statistics (if any) to the model's MoE layers."""
    layers = model.moe_layers()
    path = ckpt_dir / STATS_FILE
    if not layers or not path.is_file():
        return
    try:
        stats = stats_from_tensors(read_safetensors(path), len(layers))
    except KeyError as exc:
        raise NexusError(
            f"{path}: incomplete routing statistics (no {exc}); delete the file to use the "
            "checkpoint without them"
        ) from None
    for layer, layer_stats in zip(layers, stats, strict=True):
        if layer_stats.centroids.shape != (layer.num_experts, model.cfg.hidden_size):
            raise NexusError(
                f"{path}: statistics for {layer_stats.centroids.shape[0]} experts, the model "
                f"has {layer.num_experts}; delete the file to use the checkpoint without them"
            )
        layer.domain_stats = layer_stats
