"""Cleaning of corpus text (docs/design.md §11): pure functions, each taking and returning text
with "\n" newlines, and the cutting of long documents at paragraph boundaries."""

from __future__ import annotations

import re
from collections.abc import Callable

#: Documents longer than this (UTF-8 bytes) are cut at paragraph boundaries, so that a whole
#: play or a large module does not land in one split as a single unit.
MAX_DOCUMENT_BYTES = 8 * 1024  # long texts are cut so the split by document has granularity


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
