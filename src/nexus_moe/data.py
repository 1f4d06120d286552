"""Token shards of the corpus, the training sampler and evaluation batches (docs/design.md §8, §9).

Layout written by :func:`tokenize_corpus`::

    out_dir/meta.json               dtype, vocab size, tokenizer sha256, per domain/split counts
    out_dir/<domain>/<split>.bin    flat token ids (uint16 or uint32), every document + EOS

The corpus it reads is ``corpus_dir/<domain>/<split>.jsonl``, one ``{"text": ...}`` object per
line, one line per document.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nexus_moe.corpus import corpus_domains, iter_documents
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir, file_sha256, read_json, write_json
from nexus_moe.tokenizer import eos_id, load_tokenizer, tokenizer_file

META_FILE = "meta.json"
FORMAT_VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}

# Documents per encode_batch call and a byte budget per call: large enough for the Rust side to
# parallelise, small enough to bound memory on big domains.
_BATCH_DOCS = 2048
_BATCH_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------
# tokenisation


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips offset computation (tokenizers >= 0.20); ids are identical.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]


def _tokenize_file(tok: Any, eos: int, src: Path, dst: Path, dtype: type) -> dict[str, int]:
    """Tokenise one split file into ``dst``; returns its token, byte and document counts."""
    stats = {"tokens": 0, "bytes": 0, "documents": 0}
    limit = np.iinfo(dtype).max
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as out:

        def flush(batch: list[str]) -> None:
            ids = _encode(tok, batch)
            flat = np.fromiter(
                itertools.chain.from_iterable(itertools.chain(doc, (eos,)) for doc in ids),
                dtype=np.int64,
                count=sum(len(doc) for doc in ids) + len(ids),
            )
            if flat.size and int(flat.max()) > limit:
                raise NexusError(
                    f"{src}: token id {int(flat.max())} does not fit in {dtype.__name__}"
                )
            flat.astype(dtype).tofile(out)
            stats["tokens"] += int(flat.size)

        batch: list[str] = []
        batch_bytes = 0
        for text in iter_documents(src):
            if not text:
                continue  # an empty document carries no text, only a stray EOS
            size = len(text.encode("utf-8"))
            stats["bytes"] += size
            stats["documents"] += 1
            batch.append(text)
            batch_bytes += size
            if len(batch) >= _BATCH_DOCS or batch_bytes >= _BATCH_BYTES:
                flush(batch)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)
    return stats


def tokenize_corpus(
    corpus_dir: Path,
    tokenizer_path: Path,
    out_dir: Path,
    domains: list[str] | None = None,
) -> dict:
    """Tokenise every split of ``domains`` (default: all) of ``corpus_dir`` into ``out_dir``.

    Writes ``out_dir/<domain>/<split>.bin`` (documents concatenated, each followed by EOS; uint16
    when the vocabulary fits, else uint32) and ``out_dir/meta.json``; the directory is replaced
    atomically. Literal special-token strings inside documents are tokenised as ordinary text so
    that document text can never forge a document boundary. Empty documents are skipped. Returns
    the metadata written to ``meta.json``.
    """
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    tok_file = tokenizer_file(tokenizer_path)
    tok = load_tokenizer(tok_file)
    tok.encode_special_tokens = True
    eos = eos_id(tok)
    vocab_size = tok.get_vocab_size()
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    names = corpus_domains(corpus_dir, domains)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "tokenizer_sha256": file_sha256(tok_file),
        "domains": {},
    }
    with atomic_dir(out_dir, keyed=False) as tmp:  # a cache named by its inputs
        for name in names:
            entry: dict[str, dict[str, int]] = {}
            for src in sorted((corpus_dir / name).glob("*.jsonl")):
                split = src.stem
                entry[split] = _tokenize_file(
                    tok, eos, src, tmp / name / f"{split}.bin", _DTYPES[dtype_name]
                )
            if not any(stats["documents"] for stats in entry.values()):
                raise NexusError(
                    f"{corpus_dir / name}: domain {name!r} has no non-empty documents; "
                    "add text to it or leave it out"
                )
            meta["domains"][name] = entry
        write_json(tmp / META_FILE, meta)
    return meta


# ---------------------------------------------------------------------------------------------
# reading shards


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TokenShards:
    """Read-only, memory-mapped view of a directory written by :func:`tokenize_corpus`.

    The constructor checks ``meta.json`` and that every ``.bin`` file has the size it records, so
    a truncated or half-copied directory is caught before training starts.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / META_FILE
        if not meta_path.is_file():
            raise NexusError(
                f"{meta_path}: token shards not found; run tokenize_corpus on the corpus first"
            )
        meta = read_json(meta_path)
        bad = f"{meta_path}: corrupt token-shard metadata"
        if not isinstance(meta, dict):
            raise NexusError(f"{bad} (not a JSON object); delete the directory and re-tokenise")
        dtype = meta.get("dtype")
        if dtype not in _DTYPES:
            raise NexusError(f"{bad}: field 'dtype' is {dtype!r}, expected uint16 or uint32")
        if not _is_count(meta.get("vocab_size")) or not meta["vocab_size"]:
            raise NexusError(f"{bad}: field 'vocab_size' must be a positive integer")
        if not isinstance(meta.get("tokenizer_sha256"), str):
            raise NexusError(f"{bad}: field 'tokenizer_sha256' missing")
        domains = meta.get("domains")
        if not isinstance(domains, dict) or not domains:
            raise NexusError(f"{bad}: field 'domains' must be a non-empty object")
        self.dtype = np.dtype(_DTYPES[dtype])
        for domain, splits in domains.items():
            if not isinstance(splits, dict):
                raise NexusError(f"{bad}: field 'domains.{domain}' must be an object")
            for split, stats in splits.items():
                where = f"domains.{domain}.{split}"
                if not isinstance(stats, dict) or not all(
                    _is_count(stats.get(key)) for key in ("tokens", "bytes", "documents")
                ):
                    raise NexusError(f"{bad}: field '{where}' needs integer tokens/bytes/documents")
                path = self._path(domain, split)
                if not path.is_file():
                    raise NexusError(
                        f"{path}: token file missing; delete {self.data_dir} and re-tokenise"
                    )
                expected = stats["tokens"] * self.dtype.itemsize
                if path.stat().st_size != expected:
                    raise NexusError(
                        f"{path}: {path.stat().st_size} bytes, but meta.json records "
                        f"{stats['tokens']} tokens ({expected} bytes); the file is truncated or "
                        f"stale, delete {self.data_dir} and re-tokenise"
                    )
        self.meta: dict[str, Any] = meta
        self.domains: list[str] = list(domains)
        self.vocab_size: int = meta["vocab_size"]
        self.tokenizer_sha256: str = meta["tokenizer_sha256"]
        self.eos_id: int | None = meta.get("eos_id")
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def _path(self, domain: str, split: str) -> Path:
        return self.data_dir / domain / f"{split}.bin"

    def _splits(self, domain: str) -> dict[str, dict[str, int]]:
        splits = self.meta["domains"].get(domain)
        if splits is None:
            raise NexusError(
                f"domain {domain!r} is not in the token shards {self.data_dir} "
                f"(available: {', '.join(self.domains)})"
            )
        return splits

    def _stats(self, domain: str, split: str) -> dict[str, int]:
        splits = self._splits(domain)
        stats = splits.get(split)
        if stats is None:
            raise NexusError(
                f"domain {domain!r} has no {split!r} split in {self.data_dir} "
                f"(available: {', '.join(splits) or 'none'})"
            )
        return stats

    def splits(self, domain: str) -> list[str]:
        """The split names tokenised for ``domain``."""
        return list(self._splits(domain))

    def tokens(self, domain: str, split: str) -> np.memmap:
        """The token ids of ``domain``/``split`` as a read-only memory map (no copy)."""
        key = (domain, split)
        if key not in self._maps:
            stats = self._stats(domain, split)
            if stats["tokens"] == 0:
                # numpy cannot map an empty file; an empty read-only array behaves the same.
                empty = np.zeros(0, dtype=self.dtype)
                empty.flags.writeable = False
                self._maps[key] = empty
            else:
                self._maps[key] = np.memmap(
                    self._path(domain, split), dtype=self.dtype, mode="r", shape=(stats["tokens"],)
                )
        return self._maps[key]

    def num_tokens(self, domain: str, split: str) -> int:
        """Number of tokens (EOS included) of ``domain``/``split``."""
        return self._stats(domain, split)["tokens"]

    def num_bytes(self, domain: str, split: str) -> int:
        """Number of UTF-8 bytes of the text the tokens encode (for bits-per-byte)."""
        return self._stats(domain, split)["bytes"]

    def num_documents(self, domain: str, split: str) -> int:
        """Number of documents of ``domain``/``split``."""
        return self._stats(domain, split)["documents"]


# ---------------------------------------------------------------------------------------------
# training sampler


@dataclass
class SamplerState:
    """Position of a :class:`DomainSampler`: the next batch is batch number ``step``.

    The other fields identify the stream so that resuming with a different one is caught.
    """

    step: int = 0
    seed: int = 0
    domains: list[str] = field(default_factory=list)
    seq_len: int = 0


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise NexusError(f"{name} must be a positive integer, got {value!r}")


class DomainSampler:
    """Random training windows drawn from a weighted mix of domains, deterministic and resumable.

    Batch number k is a pure function of (seed, k, rank, world_size, shards): a generator seeded
    with ``[seed, k]`` draws, for each of the ``batch_size * world_size`` sequences of the global
    batch, a domain by the weights and a window start in that domain; rank r takes sequences
    ``[r*B, (r+1)*B)``. Hence W ranks with batch B see exactly the data of one rank with batch
    W*B, and a resumed run sees exactly the batches of an uninterrupted one.

    ``weighting``: "size" (proportional to each domain's tokens in ``split``), "uniform", or
    explicit ``{domain: weight}`` (domains left out get weight 0).
    """

    def __init__(
        self,
        shards: TokenShards,
        domains: list[str],
        seq_len: int,
        batch_size: int,
        weighting: str | dict[str, float] = "size",
        seed: int = 0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        _check_positive("world_size", world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise NexusError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise NexusError(f"seed must be a non-negative integer, got {seed!r}")
        domains = list(domains)
        if not domains:
            raise NexusError("domains: at least one training domain is needed")
        if len(set(domains)) != len(domains):
            raise NexusError(f"domains: {domains} lists a domain more than once")
        for name in domains:
            if name not in shards.domains:
                raise NexusError(
                    f"domains: {name!r} is not in the token shards {shards.data_dir} "
                    f"(available: {', '.join(shards.domains)})"
                )
        self.shards = shards
        self.domains = domains
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self._tokens = [shards.tokens(name, split) for name in domains]
        for name, tokens in zip(domains, self._tokens, strict=True):
            if len(tokens) < seq_len + 1:
                raise NexusError(
                    f"domain {name!r}: its {split} split has {len(tokens)} tokens, fewer than "
                    f"seq_len + 1 = {seq_len + 1}; add text to it, lower seq_len or drop the domain"
                )
        self.domain_weights: dict[str, float] = self._weights(weighting)
        probs = np.array([self.domain_weights[name] for name in domains], dtype=np.float64)
        self._cdf = np.cumsum(probs)
        self._cdf[-1] = 1.0  # u < 1 always lands inside the last positive-weight domain
        # Number of valid window starts per domain: a window needs seq_len + 1 tokens.
        self._num_starts = np.array([len(t) - seq_len for t in self._tokens], dtype=np.int64)
        self.state = SamplerState(step=0, seed=seed, domains=list(domains), seq_len=seq_len)

    def _weights(self, weighting: str | dict[str, float]) -> dict[str, float]:
        if isinstance(weighting, str):
            if weighting == "size":
                raw = {
                    name: float(len(t)) for name, t in zip(self.domains, self._tokens, strict=True)
                }
            elif weighting == "uniform":
                raw = {name: 1.0 for name in self.domains}
            else:
                raise NexusError(
                    f"domain_weighting: {weighting!r} is not one of 'size', 'uniform' "
                    "(or give explicit domain_weights)"
                )
        elif isinstance(weighting, dict):
            raw = {name: 0.0 for name in self.domains}
            for key, value in weighting.items():
                if key not in raw:
                    raise NexusError(
                        f"domain_weights.{key}: not a training domain (domains: {', '.join(self.domains)})"
                    )
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                    or value < 0
                ):
                    raise NexusError(
                        f"domain_weights.{key}: weight must be a finite number >= 0, got {value!r}"
                    )
                raw[key] = float(value)
        else:
            raise NexusError(
                f"domain_weights: expected 'size', 'uniform' or a {{domain: weight}} mapping, "
                f"got {type(weighting).__name__}"
            )
        total = sum(raw.values())
        if total <= 0:
            raise NexusError(
                "domain_weights: all weights are zero; give at least one domain a positive weight"
            )
        return {name: value / total for name, value in raw.items()}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch number ``step`` of this rank, without moving the sampler (see :meth:`next_batch`)."""
        rng = np.random.default_rng([self.seed, step])
        global_size = self.batch_size * self.world_size
        # Draw for the whole global batch, then slice: every rank draws identically.
        choice = np.searchsorted(self._cdf, rng.random(global_size), side="right")
        choice = np.minimum(choice, len(self.domains) - 1)
        starts = rng.integers(0, self._num_starts[choice])
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        window = self.seq_len + 1
        rows = np.stack(
            [
                np.asarray(self._tokens[d][s : s + window], dtype=np.int64)
                for d, s in zip(choice[lo:hi], starts[lo:hi], strict=True)
            ]
        )
        data = torch.from_numpy(rows)
        return (
            data[:, :-1].contiguous(),
            data[:, 1:].contiguous(),
            torch.from_numpy(choice[lo:hi].astype(np.int64)),
        )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch: inputs (B, T) int64, targets (B, T) int64 = inputs shifted by one,
        domain ids (B,) int64 indexing ``domains``."""
        out = self.batch(self.state.step)
        self.state.step += 1
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position; ``{"step": k, ...}`` where k is the next batch number."""
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; the next batch equals the uninterrupted run's.

        A state from a sampler with a different seed, domain list or sequence length would not
        continue the same stream, so it is rejected naming the field.
        """
        if not isinstance(state, dict) or not _is_count(state.get("step")):
            raise NexusError("sampler state: field 'step' must be a non-negative integer")
        for key in ("seed", "domains", "seq_len"):
            if key in state and state[key] != getattr(self.state, key):
                raise NexusError(
                    f"sampler state: field '{key}' is {state[key]!r} but this run has "
                    f"{getattr(self.state, key)!r}; resume with the original configuration"
                )
        self.state.step = state["step"]


# ---------------------------------------------------------------------------------------------
# evaluation batches


def iter_eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows over ``tokens``: (inputs, targets) int64 batches.

    Every token after the first is a target exactly once (up to ``max_tokens`` targets, when
    given). Full windows come in batches of up to ``batch_size`` rows of ``seq_len``; the
    remainder, shorter than ``seq_len``, comes last as a batch of one row.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    num_targets = max(len(tokens) - 1, 0)
    if max_tokens is not None:
        num_targets = min(num_targets, max(int(max_tokens), 0))
    full = num_targets // seq_len
    for first in range(0, full, batch_size):
        rows = min(batch_size, full - first)
        start = first * seq_len
        chunk = np.asarray(tokens[start : start + rows * seq_len + 1], dtype=np.int64)
        yield (
            torch.from_numpy(chunk[:-1].reshape(rows, seq_len).copy()),
            torch.from_numpy(chunk[1:].reshape(rows, seq_len).copy()),
        )
    rest = num_targets - full * seq_len
    if rest:
        start = full * seq_len
        chunk = np.asarray(tokens[start : start + rest + 1], dtype=np.int64)
        yield torch.from_numpy(chunk[None, :-1].copy()), torch.from_numpy(chunk[None, 1:].copy())
