"""Reading and writing safetensors: the one way tensors are read by name (docs/design.md §14).

Every weight file the package reads goes through a :class:`TensorSource`: tensors by name, with
their shapes and dtypes known up front and each tensor read only when asked for. Sources are a
set of safetensors files (:class:`SafetensorsFiles`: a native checkpoint, a Hugging Face folder),
tensors already in memory (:class:`MemoryTensors`: a model, what transformers read from a GGUF
file) or views over other sources (:class:`CastTensors`, the Hugging Face import mapping, an
upcycling plan). A file that cannot be read raises :func:`unreadable`'s error, whoever reads it.

:func:`write_safetensors` writes a file tensor by tensor from :class:`TensorSpec` producers, so a
model larger than memory can be written while its inputs are read one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from nexus_moe.errors import NexusError

# safetensors' dtype names (the header's "dtype" field).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
# The errors safetensors raises for a corrupt, truncated or unreadable file.
READ_ERRORS = (SafetensorError, OSError, ValueError)


def unreadable(path: Path, exc: Exception, tensor: str | None = None) -> NexusError:
    """The one error for a weights file that cannot be read (corrupt, truncated, unreadable)."""
    what = f"tensor '{tensor}'" if tensor is not None else "weights"
    return NexusError(
        f"{path}: cannot read {what} ({exc}); the file is corrupt or truncated — restore it "
        "(download it again, or re-run the stage that wrote it)"
    )


# --------------------------------------------------------------------------------------------
# reading


class TensorSource:
    """Tensors by name, read lazily.

    ``shapes`` and ``dtypes`` list every tensor up front (nothing is read to know them);
    :meth:`get` reads one tensor, or only its ``index``-th slice along dim 0;
    :meth:`file_of` names the file a tensor comes from, for error messages.
    """

    location: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def file_of(self, name: str) -> Path:
        return self.location

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsFiles(TensorSource):
    """The tensors of one or more safetensors files (a tensor name lives in one of them).

    Only the headers are read up front. Every :meth:`get` opens its file afresh and returns a
    tensor backed by the file's memory map, which goes away with the tensor: a handle kept open
    would keep every page touched so far resident, adding up to the whole input.
    """

    def __init__(self, files: list[Path], location: Path | None = None) -> None:
        self.location = location if location is not None else files[0]
        self.shapes, self.dtypes = {}, {}
        self._file: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise NexusError(f"{path}: weights file not found")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        self._file[name] = path
                        self.shapes[name] = tuple(piece.get_shape())
                        self.dtypes[name] = _torch_dtype(piece.get_dtype(), path, name)
            except READ_ERRORS as exc:
                raise unreadable(path, exc) from exc

    def file_of(self, name: str) -> Path:
        return self._file.get(name, self.location)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        path = self._file[name]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(name) if index is None else f.get_slice(name)[index]
        except READ_ERRORS as exc:
            raise unreadable(path, exc, name) from exc


class MemoryTensors(TensorSource):
    """Tensors already in memory (a model's state dict, a model transformers loaded), on CPU."""

    def __init__(self, tensors: dict[str, torch.Tensor], location: Path) -> None:
        self.location = location
        self._tensors = tensors
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self.dtypes = {name: t.dtype for name, t in tensors.items()}

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        tensor = self._tensors[name].detach()
        return (tensor if index is None else tensor[index]).cpu()  # slice first: copy less


class CastTensors(TensorSource):
    """``source`` with each tensor converted to ``dtypes[name]`` when read."""

    def __init__(self, source: TensorSource, dtypes: dict[str, torch.dtype]) -> None:
        self.source = source
        self.location = source.location
        self.shapes = source.shapes
        self.dtypes = {name: dtypes[name] for name in source.shapes}

    def file_of(self, name: str) -> Path:
        return self.source.file_of(name)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        return self.source.get(name, index).to(self.dtypes[name])


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; corrupt or truncated files raise NexusError."""
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc


def _torch_dtype(dtype_name: str, file: Path, name: str) -> torch.dtype:
    if dtype_name not in DTYPES_BY_NAME:
        raise NexusError(f"{file}: tensor '{name}' has unsupported dtype {dtype_name}")
    return DTYPES_BY_NAME[dtype_name]


# --------------------------------------------------------------------------------------------
# writing


@dataclass
class TensorSpec:
    """One tensor of a safetensors file to be written by :func:`write_safetensors`.

    ``pieces`` returns an iterable of tensors of ``dtype`` whose row-major concatenation is the
    tensor (e.g. one (I, H) slice per expert of an (E, I, H) stack); it is called only when the
    tensor is written, so inputs are read just in time.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]
    # For a stack along dim 0 read slice by slice: slice i alone (lets an exporter write
    # per-expert tensors without reading the others).
    slices: list[Callable[[], torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class NonFiniteTensor(NexusError):
    """A tensor about to be written holds NaN or infinite values (``tensor``: its name)."""

    def __init__(self, tensor: str) -> None:
        super().__init__(f"tensor '{tensor}' holds NaN or infinite values")
        self.tensor = tensor


def check_finite_tensor(name: str, tensor: torch.Tensor) -> None:
    """:class:`NonFiniteTensor` when floating-point ``tensor`` holds NaN or infinite values."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteTensor(name)


def storage_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """``specs`` in the order of safetensors' own writer: larger dtypes first, then by name
    (so every tensor stays aligned to its element size)."""
    return sorted(specs, key=lambda spec: (-spec.dtype.itemsize, spec.name))


def write_safetensors(
    path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file tensor by tensor, piece by piece, in the order of ``specs``.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; an upcycled MoE is
    several times larger than one input, so the file is written here directly: an 8-byte
    little-endian header length, the JSON header (computed from the shapes up front, padded with
    spaces to a multiple of 8), then each tensor's raw little-endian bytes. The result is read by
    ``safe_open`` exactly like a file from ``save_file``. A floating-point piece holding NaN or
    infinite values stops the write with :class:`NonFiniteTensor` (the caller discards the file).
    """
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored")
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            written = 0
            for piece in spec.pieces():
                if piece.dtype != spec.dtype:
                    raise ValueError(
                        f"{spec.name}: got a {piece.dtype} piece, expected {spec.dtype}"
                    )
                check_finite_tensor(spec.name, piece)  # no broken model is ever written
                # Raw bytes through a uint8 view: works for bf16, which numpy cannot represent.
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
                del piece, data  # do not hold this piece while the next one is read
            if written != spec.nbytes:
                raise ValueError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
