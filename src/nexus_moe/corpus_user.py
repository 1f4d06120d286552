"""The user's own corpus folders (``corpus build --from DIR``): one sub-folder per domain holding
``.txt`` files (one document each) and/or ``.jsonl`` files (one ``{"text": ...}`` per line)."""

from __future__ import annotations

import os
from pathlib import Path

from nexus_moe.corpus_files import Loaded, jsonl_documents, source_entry
from nexus_moe.errors import NexusError


def _utf8_error(path: Path, exc: UnicodeError, line: int | None = None) -> NexusError:
    where = f"{path}:{line}" if line is not None else str(path)
    return NexusError(
        f"{where}: not valid UTF-8 ({exc}); re-encode the file as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
    )


def load_user_domain(domain_dir: Path) -> Loaded:
    """Every ``.txt`` (one document) and ``.jsonl`` (one per line) file under ``domain_dir``."""
    files = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(domain_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix in (".txt", ".jsonl"):
                files.append(path)
            else:
                ignored += 1
    files.sort()
    if not files:
        raise NexusError(
            f"{domain_dir}: domain folder {domain_dir.name!r} has no .txt or .jsonl files; "
            "add some or leave the domain out"
        )
    docs: list[tuple[str, str]] = []
    for path in files:
        rel = path.relative_to(domain_dir).as_posix()
        if path.suffix == ".txt":
            try:
                docs.append((rel, path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise _utf8_error(path, exc) from exc
        else:
            docs.extend((rel, text) for _, text in jsonl_documents(path, built=False))
    licence = "user data (licence not recorded)"
    source = source_entry("user", None, "user", licence, domain_dir)
    loaded = Loaded(docs, [source], licence, files_read=len(files))
    if ignored:
        loaded.notes.append(f"ignored {ignored} file(s) that are not .txt or .jsonl")
    return loaded


def user_domains(source_dir: Path, domains: list[str] | None) -> list[str]:
    if not source_dir.is_dir():
        raise NexusError(
            f"{source_dir}: source folder not found (expected one sub-folder per domain)"
        )
    available = sorted(
        p.name for p in source_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if domains is None:
        if not available:
            raise NexusError(
                f"{source_dir}: no domain sub-folders; put each domain's .txt/.jsonl files "
                "in a folder named after the domain"
            )
        return available
    missing = [d for d in domains if d not in available]
    if missing:
        raise NexusError(
            f"{source_dir}: no sub-folder for domain(s) {', '.join(missing)} "
            f"(found: {', '.join(available) or 'none'})"
        )
    return list(domains)
