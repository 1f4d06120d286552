"""Reading a ``.gguf`` file (llama.cpp) through ``transformers`` (docs/design.md §15).

transformers reads and dequantises the file (``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)``, float32 weights; needs the ``gguf`` and ``accelerate`` packages); its config and
state dict then go through the same format mapping as a folder. Quantised weights are
dequantised, not re-quantised: the result reproduces transformers' float32 logits for the file,
not llama.cpp's quantised arithmetic.
"""

from __future__ import annotations

import importlib.util
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from nexus_moe.checkpoint import TOKENIZER_FILE
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import write_json
from nexus_moe.safetensors_io import MemoryTensors

GENERATION_CONFIG_FILE = "generation_config.json"
_LOAD_ERRORS = (ValueError, OSError, KeyError, NotImplementedError)
# transformers' GGUF reader fails this way on a file cut short after a valid magic
_TRUNCATED_ERRORS = (struct.error, EOFError, IndexError, UnicodeDecodeError, OverflowError)


def read_gguf(path: Path) -> tuple[dict[str, Any], MemoryTensors]:
    """The HF config (as a dict) and the dequantised float32 tensors of GGUF file ``path``."""
    if not path.is_file():
        raise NexusError(f"{path}: GGUF file not found")
    transformers = _gguf_support(path)
    try:  # config from the GGUF header; quantised tensors dequantised to float32
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except _TRUNCATED_ERRORS as exc:
        raise NexusError(
            f"{path}: the GGUF file is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "download it again"
        ) from exc
    except _LOAD_ERRORS as exc:
        raise NexusError(f"{path}: transformers cannot load this GGUF file ({exc})") from exc
    return hf_model.config.to_dict(), MemoryTensors(hf_model.state_dict(), path)


def gguf_tokenizer(path: Path, tmp: Path, doc: dict[str, Any]) -> Path | None:
    """The GGUF file's tokenizer, written as ``tmp/tokenizer.json`` with its
    ``tokenizer_config.json`` (special tokens), chat template and a ``generation_config.json``
    holding the bos/eos/pad ids of config ``doc`` (None, with a warning, if transformers cannot
    turn it into a fast tokenizer)."""
    transformers = _gguf_support(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except _LOAD_ERRORS as exc:
        warnings.warn(f"{path}: tokenizer not imported ({exc})", stacklevel=3)
        return None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        warnings.warn(f"{path}: tokenizer has no tokenizer.json form; not imported", stacklevel=3)
        return None
    tokenizer.save_pretrained(str(tmp))
    target = tmp / TOKENIZER_FILE
    if not target.is_file():  # save_pretrained wrote another form: keep the backend's file
        tokenizer.backend_tokenizer.save(str(target))
    generation = {
        key: doc[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if doc.get(key) is not None
    }
    write_json(tmp / GENERATION_CONFIG_FILE, {"_from_model_config": True, **generation})
    return target


def _gguf_support(path: Path) -> Any:
    """The transformers module, after checking that it can read GGUF files here."""
    missing = [
        package
        for package in ("transformers", "gguf", "accelerate")
        if importlib.util.find_spec(package) is None
    ]
    if missing:
        raise NexusError(
            f"{path}: reading GGUF files needs the Python package(s) {', '.join(missing)} "
            f"(transformers dequantises the file); install them: pip install {' '.join(missing)}"
        )
    import transformers

    return transformers
