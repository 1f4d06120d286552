"""The on-disk corpus (layout in :mod:`nexus_moe.corpus`): reading a built corpus, and writing
one domain's documents de-duplicated, capped and split into its ``<split>.jsonl`` files."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexus_moe.corpus_clean import normalise_text, split_long_document
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import read_json

SPLITS = ("train", "validation")
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "nexus-moe-corpus"
MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------
# what a source yields (from the package sources or the user's folders)


@dataclass
class Loaded:
    """The raw (source-cleaned) documents of one domain and where they came from."""

    documents: list[tuple[str, str]]  # (relative source file name, text)
    sources: list[dict[str, Any]]
    licence: str
    files_read: int = 0
    undecodable: int = 0  # package files (or dictionary entries) skipped as not UTF-8
    notes: list[str] = field(default_factory=list)


def source_entry(name: str, version: str | None, kind: str, licence: str, location: Path) -> dict:
    """One entry of a domain's ``sources`` list in the manifest."""
    return {
        "name": name,
        "version": version,
        "kind": kind,
        "licence": licence,
        "location": str(location),
    }


# ---------------------------------------------------------------------------------------------
# reading a built corpus (the tokenizer and token shards read it this way)


def split_file(corpus_dir: str | Path, domain: str, split: str = "train") -> Path:
    """``corpus_dir/<domain>/<split>.jsonl``: one split (:data:`SPLITS`) of one domain."""
    return Path(corpus_dir) / domain / f"{split}.jsonl"


def corpus_domains(corpus_dir: str | Path, domains: list[str] | None = None) -> list[str]:
    """The domains to use from ``corpus_dir``: ``domains`` checked to exist, or all of them.

    A domain is a sub-directory holding at least one ``<split>.jsonl`` file; hidden directories
    and other output placed in the corpus (e.g. cached token shards) are ignored.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise NexusError(
            f"{corpus_dir}: corpus directory not found; build it with the corpus stage"
        )
    available = sorted(
        p.name
        for p in corpus_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.jsonl"))
    )
    if domains is None:
        if not available:
            raise NexusError(
                f"{corpus_dir}: no domains found (expected <domain>/train.jsonl); "
                "build the corpus first"
            )
        return available
    if len(set(domains)) != len(domains):
        raise NexusError(f"domains: {domains} lists a domain more than once")
    for name in domains:
        if name not in available:
            raise NexusError(
                f"domains: {name!r} is not in corpus {corpus_dir} (available: {', '.join(available) or 'none'})"
            )
    return list(domains)


_LINE_FORMAT = 'each line must be a JSON object like {"text": "..."}'


def document_text(raw: bytes, path: Path, lineno: int, built: bool = True) -> str | None:
    """The ``text`` of one line of a JSONL corpus file; None for a blank line.

    Bytes that are not UTF-8, malformed JSON, a missing or non-string ``text`` and unpaired
    surrogates are NexusErrors naming the file and line. ``built``: the file is part of a corpus
    nexus-moe built (the fix is to rebuild it); otherwise it is one of the user's own files.
    """
    where = f"{path}:{lineno}"
    fix = "; rebuild the corpus" if built else ""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = fix or f"; re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}"
        raise NexusError(f"{where}: not UTF-8 text ({exc}){hint}") from exc
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise NexusError(f"{where}: not valid JSON ({exc.msg}); {_LINE_FORMAT}{fix}") from exc
    if not isinstance(record, dict) or "text" not in record:
        raise NexusError(f'{where}: missing "text" field; {_LINE_FORMAT}{fix}')
    text = record["text"]
    if not isinstance(text, str):
        raise NexusError(f'{where}: "text" must be a string{fix}')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a "\ud800" escape decodes to a string that is not text
        raise NexusError(
            f"{where}: text is not valid UTF-8 ({exc}){fix or '; clean the source text'}"
        ) from exc
    return text


def jsonl_documents(path: str | Path, built: bool = True) -> Iterator[tuple[int, str]]:
    """``(byte offset, text)`` of every non-blank line of a JSONL corpus file, in order: the one
    reader of corpus files (built ones and the user's own; see :func:`document_text`)."""
    path = Path(path)
    offset = 0
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                text = document_text(raw, path, lineno, built)
                if text is not None:
                    yield offset, text
                offset += len(raw)
    except FileNotFoundError as exc:
        raise NexusError(f"{path}: file not found") from exc


def iter_documents(path: str | Path) -> Iterator[str]:
    """Yield the ``text`` of every document in a corpus ``.jsonl`` file (blank lines skipped);
    a bad line is a NexusError naming the file and line (:func:`document_text`)."""
    return (text for _, text in jsonl_documents(path))


def load_manifest(corpus_dir: Path) -> dict:
    """Read ``corpus_dir/manifest.json``; a missing or corrupt manifest is a NexusError naming it."""
    path = Path(corpus_dir) / MANIFEST_FILE
    if not path.is_file():
        raise NexusError(f"{path}: corpus manifest not found; build the corpus first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("domains"), dict):
        raise NexusError(
            f"{path}: corrupt corpus manifest (no 'domains' table); rebuild the corpus"
        )
    return manifest


def read_documents(corpus_dir: Path, domain: str, split: str) -> Iterator[str]:
    """Iterate over the texts of one split (``"train"`` or ``"validation"``) of one domain.

    The file's existence is checked at once; malformed lines raise NexusError naming the file and
    line when reached.
    """
    if split not in SPLITS:
        raise NexusError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    path = split_file(corpus_dir, domain, split)
    if not path.is_file():
        raise NexusError(
            f"{path}: not found; domain {domain!r} is not in corpus {corpus_dir} "
            "(build it with the corpus stage)"
        )
    return iter_documents(path)


# ---------------------------------------------------------------------------------------------
# cleaning, capping and splitting a domain


@dataclass
class _Prepared:
    documents: list[tuple[str, str]]  # after normalisation, chunking and de-duplication
    duplicates: int
    chunked: int  # source documents that were cut into several


def _prepare(raw: Iterable[tuple[str, str]]) -> _Prepared:
    seen: set[bytes] = set()
    docs: list[tuple[str, str]] = []
    duplicates = chunked = 0
    for source, text in raw:
        pieces = split_long_document(normalise_text(text))
        chunked += len(pieces) > 1
        for piece in pieces:
            digest = hashlib.sha256(piece.encode("utf-8")).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            docs.append((source, piece))
    return _Prepared(docs, duplicates, chunked)


def _split_key(seed: int, text: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, text): the document's place in the split."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _cap_and_split(
    domain: str, docs: list[tuple[str, str]], cap_bytes: float, val_fraction: float, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """Shuffle with ``seed``, keep documents while they fit ``cap_bytes``, split by hash."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    chosen = []
    total = 0
    for source, text in order:
        size = len(text.encode("utf-8"))
        if total + size > cap_bytes:
            continue  # a smaller document later on may still fit
        chosen.append((source, text))
        total += size
    if len(chosen) < 2:
        raise NexusError(
            f"domain {domain!r}: only {len(chosen)} document(s) within the cap "
            f"({len(docs)} available); at least 2 are needed (one to train on, one to validate) "
            "- add text to the domain or raise max_mb_per_domain"
        )
    keys = [_split_key(seed, text) for _, text in chosen]
    is_val = [k < val_fraction for k in keys]
    # Both splits must be non-empty; move the document nearest the threshold if one is empty.
    if not any(is_val):
        is_val[min(range(len(keys)), key=keys.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(keys)), key=keys.__getitem__)] = False
    return {
        "train": [d for d, v in zip(chosen, is_val, strict=True) if not v],
        "validation": [d for d, v in zip(chosen, is_val, strict=True) if v],
    }


def _json_line(source: str, text: str) -> str:
    line = json.dumps({"text": text, "source": source}, ensure_ascii=False)
    # Unicode line separators are legal in JSON strings but split lines for str.splitlines().
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def _write_split(path: Path, docs: list[tuple[str, str]]) -> dict[str, Any]:
    sha = hashlib.sha256()
    text_bytes = 0
    with path.open("wb") as fh:
        for source, text in docs:
            line = (_json_line(source, text) + "\n").encode("utf-8")
            fh.write(line)
            sha.update(line)
            text_bytes += len(text.encode("utf-8"))
    return {
        "file": f"{path.parent.name}/{path.name}",
        "documents": len(docs),
        "text_bytes": text_bytes,
        "file_bytes": path.stat().st_size,
        "sha256": sha.hexdigest(),
    }


def write_domain(
    folder: Path, name: str, loaded: Loaded, cap_bytes: float, val_fraction: float, seed: int
) -> dict[str, Any]:
    """Clean, cap and split one loaded domain into ``folder``; its manifest entry."""
    prepared = _prepare(loaded.documents)
    if not prepared.documents:
        where = loaded.sources[0].get("location", name)
        raise NexusError(f"{where}: domain {name!r} has no non-empty documents")
    splits = _cap_and_split(name, prepared.documents, cap_bytes, val_fraction, seed)
    folder.mkdir()
    written = {
        s: _write_split(split_file(folder.parent, folder.name, s), splits[s]) for s in SPLITS
    }
    return {
        "sources": loaded.sources,
        "licence": loaded.licence,
        "files_read": loaded.files_read,
        "files_skipped_not_utf8": loaded.undecodable,
        "documents_available": len(prepared.documents),
        "bytes_available": sum(len(t.encode("utf-8")) for _, t in prepared.documents),
        "duplicates_dropped": prepared.duplicates,
        "documents_chunked": prepared.chunked,
        "splits": written,
    }
