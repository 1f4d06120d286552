"""Build user domains from this machine's own files, near to far from the study's domains.

The study's experts know Python code, Shakespeare, a dictionary and kernel documentation. A
user adds whatever they have; these folders stand in for that, from text every Debian/Python
machine carries, one sub-folder per domain as `nexus-moe corpus build --from` reads it:

    relnotes    git release notes (technical prose, near techdocs)
    perl        Perl modules with their POD (code and prose, near code)
    manpages    English man pages, troff source (markup, between code and techdocs)
    changelogs  Debian package changelogs (short entries, names, e-mail addresses, dates)
    locales     glibc locale definitions (<U0041> code points, keyword tables: far from all)
    numbers     CSV test vectors of floating-point and random-number libraries (far from all)

Files are taken in path order and capped per domain, so the same machine gives the same data.
A domain whose sources are missing is left out with a note.

    .venv/bin/python benchmarks/local_domains.py --out DATA [--max-mb 2]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import sys
import sysconfig
from pathlib import Path


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _numbers() -> list[str]:
    """CSV test vectors shipped with NumPy (and any other site-packages data)."""
    site = sysconfig.get_paths()["purelib"]
    roots = {site, *glob.glob(f"{sys.base_prefix}/lib/python3*/site-packages")}
    return sorted({p for r in roots for p in glob.glob(f"{r}/**/tests/data/*.csv", recursive=True)})


SOURCES = {
    "relnotes": lambda: sorted(glob.glob("/usr/share/doc/git/RelNotes/*.txt")),
    "perl": lambda: sorted(glob.glob("/usr/share/perl/5.*/**/*.pm", recursive=True)),
    "manpages": lambda: sorted(glob.glob("/usr/share/man/man1/*.1.gz")),
    "changelogs": lambda: sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")),
    "locales": lambda: sorted(glob.glob("/usr/share/i18n/locales/*_*")),
    "numbers": _numbers,
}


def build(out: Path, max_bytes: int, domains: list[str]) -> dict[str, int]:
    written = {}
    for domain in domains:
        target = out / domain
        total, count = 0, 0
        for path in map(Path, SOURCES[domain]()):
            text = _read(path)
            if not text or len(text) < 2000:
                continue
            text = text[:200_000]  # one very long file must not be the whole domain
            if count == 0:
                target.mkdir(parents=True, exist_ok=True)
            name = f"{count:04d}-{path.name.removesuffix('.gz')}.txt"
            (target / name).write_text(text, encoding="utf-8")
            total += len(text.encode())
            count += 1
            if total >= max_bytes:
                break
        if count == 0:
            print(f"{domain}: no source files on this machine; left out")
        else:
            written[domain] = total
            print(f"{domain}: {count} files, {total / 1e6:.2f} MB")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-mb", type=float, default=2.0)
    parser.add_argument("--domains", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out}: exists and is not empty; choose a new folder")
    build(args.out, int(args.max_mb * 1e6), args.domains)


if __name__ == "__main__":
    main()
