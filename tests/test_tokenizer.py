"""Tokenizer stage: training, round trip, loading and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_moe.errors import NexusError
from nexus_moe.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer

DOMAIN_TEXTS = {
    "code": [
        "def add(a, b):\n    return a + b\n",
        "class Foo:\n\tdef bar(self):\n\t\tpass  # comment\n",
        "for i in range(10):\n    print(i, end='')\n",
    ],
    "prose": [
        "It was the best of times, it was the worst of times.",
        "Café, naïve, façade — résumé. Ünïcödé everywhere!",
        "The quick brown fox jumps over the lazy dog.\n\nNew paragraph.",
    ],
    "intl": ["日本語のテキスト。中文文本。한국어 텍스트.", "Ελληνικά και русский язык 🙂🚀"],
}


def write_corpus(root: Path, texts: dict[str, list[str]], repeat: int = 20) -> Path:
    """Write a tiny corpus ``root/<domain>/{train,validation}.jsonl``."""
    for domain, docs in texts.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", repeat), ("validation", 2)):
            with (root / domain / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
                for i in range(n):
                    for doc in docs:
                        fh.write(json.dumps({"text": f"{doc} {i}", "source": domain}) + "\n")
    (root / "manifest.json").write_text(json.dumps({"domains": sorted(texts)}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(root / "corpus", DOMAIN_TEXTS)
    tok = train_tokenizer(corpus, root / "out", vocab_size=400)
    return tok, root / "out" / "tokenizer.json", corpus


ROUND_TRIP = [
    "",
    "hello world",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\rreturns\n\n\n",
    "def f(x):\n    return {'a': [x ** 2 for x in range(3)]}\n",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧 family",
    "combining: e\u0301 vs é, nul \x00 and bell \x07",
    "中文、日本語、한국어、العربية، עברית",
    "unseen chars ☃ ∮ ⅀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained, text):
    tok, _, _ = trained
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text


def test_vocab_and_eos(trained):
    tok, path, _ = trained
    assert tok.get_vocab_size() == 400
    assert eos_id(tok) == tok.token_to_id(EOS_TOKEN)
    assert path.is_file()


def test_load_round_trip(trained):
    tok, path, _ = trained
    for where in (path, path.parent):
        loaded = load_tokenizer(where)
        for text in ROUND_TRIP:
            assert loaded.encode(text).ids == tok.encode(text).ids
            assert loaded.decode(loaded.encode(text).ids) == text


def test_domain_subset_and_cap(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", DOMAIN_TEXTS)
    tok = train_tokenizer(
        corpus, tmp_path / "t.json", vocab_size=300, domains=["code"], max_bytes_per_domain=500
    )
    assert (tmp_path / "t.json").is_file()
    assert tok.decode(tok.encode("naïve ☃").ids) == "naïve ☃"


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(NexusError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(NexusError, match="not found"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab"')
    with pytest.raises(NexusError, match="tokenizer.json"):
        load_tokenizer(bad)
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(NexusError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_training_errors(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", DOMAIN_TEXTS)
    with pytest.raises(NexusError, match="vocab_size"):
        train_tokenizer(corpus, tmp_path / "out", vocab_size=100)
    with pytest.raises(NexusError, match="'nope'"):
        train_tokenizer(corpus, tmp_path / "out", domains=["nope"])
    with pytest.raises(NexusError, match="not found"):
        train_tokenizer(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(NexusError, match="max_bytes_per_domain"):
        train_tokenizer(corpus, tmp_path / "out", max_bytes_per_domain=0)
    (corpus / "empty").mkdir()
    (corpus / "empty" / "train.jsonl").write_text("")
    with pytest.raises(NexusError, match="no text"):
        train_tokenizer(corpus, tmp_path / "out", domains=["empty"])
    (corpus / "broken").mkdir()
    (corpus / "broken" / "train.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(NexusError, match=r"train.jsonl:2"):
        train_tokenizer(corpus, tmp_path / "out", domains=["broken"])
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_domain_sample_is_capped_and_spread(tmp_path):
    from nexus_moe.tokenizer import _domain_texts

    path = tmp_path / "train.jsonl"
    with path.open("w") as fh:
        for i in range(1000):
            fh.write(json.dumps({"text": f"document number {i:04d}"}) + "\n")
    texts = list(_domain_texts(path, path.stat().st_size, cap=2000))
    assert sum(len(t.encode()) for t in texts) <= 2000
    # Every k-th document, not the first few: the sample reaches the end of the file.
    assert int(texts[-1].split()[-1]) > 800
