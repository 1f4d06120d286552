"""Reading a local Hugging Face model folder (docs/design.md §15).

A folder is ``config.json`` + safetensors weights (one file, or shards listed in
``model.safetensors.index.json``) + optionally ``tokenizer.json``. Its weights are opened as one
lazy :class:`~nexus_moe.safetensors_io.TensorSource`; nothing is unpickled, so a folder holding
only ``pytorch_model.bin`` is refused with the command that converts it.
"""

from __future__ import annotations

from pathlib import Path

from nexus_moe.checkpoint import FORMAT
from nexus_moe.errors import NexusError
from nexus_moe.hf.config import CONFIG_FILE
from nexus_moe.io_utils import WEIGHTS_FILE, read_json
from nexus_moe.safetensors_io import SafetensorsFiles

INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a ``config.json`` that is not ours)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    doc = read_json(config_path)
    return isinstance(doc, dict) and doc.get("format") != FORMAT


def folder_tensors(hf_dir: Path) -> SafetensorsFiles:
    """The safetensors weights of folder ``hf_dir`` (headers read, tensors read on demand)."""
    files = _weight_files(hf_dir)
    for path in files:
        if not path.is_file():
            raise NexusError(f"{path}: weights file not found (listed in {INDEX_FILE})")
    return SafetensorsFiles(files, location=hf_dir)


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / INDEX_FILE
    if index.is_file():
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise NexusError(f"{index}: no 'weight_map'; the index file is corrupt")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [hf_dir / WEIGHTS_FILE]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = [n for n in PICKLED_WEIGHTS if (hf_dir / n).is_file()]
    if pickled or any(hf_dir.glob("*.bin")):
        raise NexusError(
            f"{hf_dir}: weights are only in pickled PyTorch format "
            f"({', '.join(pickled) or '*.bin'}), which nexus-moe never loads (unpickling can "
            "run arbitrary code); convert them to safetensors first, in an environment you "
            "trust, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)`"
        )
    raise NexusError(f"{hf_dir}: no *.safetensors weights found")
