"""Token shards, the domain sampler and evaluation batches (docs/design.md §8, §9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nexus_moe.corpus import iter_documents
from nexus_moe.data import (
    DomainSampler,
    TokenShards,
    iter_eval_batches,
    tokenize_corpus,
)
from nexus_moe.errors import NexusError
from nexus_moe.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

DOCS = {
    "code": [
        "def f(x):\n    return x * 2\n",
        "import os\nprint(os.getcwd())\n",
        "x = [i for i in y]",
    ],
    "prose": ["Once upon a time, there was a fox.", "Café — naïve résumé 🙂", "The end.\n"],
}


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text, "source": "test"}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for domain, docs in DOCS.items():
        write_jsonl(root / domain / "train.jsonl", [f"{d} #{i}" for i in range(30) for d in docs])
        write_jsonl(root / domain / "validation.jsonl", docs + [""])  # empty document is skipped
    (root / "manifest.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def real_shards(corpus, tokenizer_path, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("shards") / "tokens"
    meta = tokenize_corpus(corpus, tokenizer_path, out)
    return meta, out


def make_shards(root: Path, sizes: dict[str, int]) -> TokenShards:
    """Synthetic shards whose token at position i of domain k is (1000 * k + i) % 60000.

    Consecutive values make it easy to check that windows are contiguous and come from the
    domain they are labelled with.
    """
    meta = {"dtype": "uint16", "vocab_size": 60000, "tokenizer_sha256": "x", "domains": {}}
    for k, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        ((1000 * k + np.arange(n)) % 60000).astype(np.uint16).tofile(root / name / "train.bin")
        meta["domains"][name] = {"train": {"tokens": n, "bytes": 2 * n, "documents": 1}}
    (root / "meta.json").write_text(json.dumps(meta))
    return TokenShards(root)


# -- tokenize_corpus / TokenShards ------------------------------------------------------------


def test_tokenize_meta(real_shards, corpus, tokenizer_path):
    meta, out = real_shards
    tok = load_tokenizer(tokenizer_path)
    eos = tok.token_to_id(EOS_TOKEN)
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.get_vocab_size()
    assert json.loads((out / "meta.json").read_text()) == meta
    shards = TokenShards(out)
    assert shards.domains == ["code", "prose"]
    assert shards.vocab_size == meta["vocab_size"]
    assert len(shards.tokenizer_sha256) == 64
    for domain in DOCS:
        for split in ("train", "validation"):
            texts = [t for t in iter_documents(corpus / domain / f"{split}.jsonl") if t]
            stats = meta["domains"][domain][split]
            path = out / domain / f"{split}.bin"
            assert stats["tokens"] == path.stat().st_size // 2
            assert stats["documents"] == len(texts)
            assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
            tokens = shards.tokens(domain, split)
            assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
            assert len(tokens) == shards.num_tokens(domain, split) == stats["tokens"]
            assert shards.num_bytes(domain, split) == stats["bytes"]
            assert int((tokens == eos).sum()) == len(texts)
            # Splitting at EOS and decoding gives the documents back exactly.
            ids = np.asarray(tokens).tolist()
            decoded, current = [], []
            for t in ids:
                if t == eos:
                    decoded.append(tok.decode(current))
                    current = []
                else:
                    current.append(t)
            assert decoded == texts


def test_tokenize_domain_subset_and_literal_eos(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a" / "train.jsonl", [f"text {EOS_TOKEN} more", "second"])
    write_jsonl(corpus / "b" / "train.jsonl", ["other"])
    meta = tokenize_corpus(corpus, tokenizer_path.parent, tmp_path / "tok", domains=["a"])
    assert list(meta["domains"]) == ["a"]
    shards = TokenShards(tmp_path / "tok")
    eos = load_tokenizer(tokenizer_path).token_to_id(EOS_TOKEN)
    # A literal "<|endoftext|>" in a document is text, not a document boundary.
    assert int((np.asarray(shards.tokens("a", "train")) == eos).sum()) == 2


def test_tokenize_errors(tmp_path, tokenizer_path, corpus):
    with pytest.raises(NexusError, match="'nope'"):
        tokenize_corpus(corpus, tokenizer_path, tmp_path / "out", domains=["nope"])
    bad = tmp_path / "bad"
    (bad / "d").mkdir(parents=True)
    (bad / "d" / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(NexusError, match="UTF-8"):
        tokenize_corpus(bad, tokenizer_path, tmp_path / "out")
    (bad / "d" / "train.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(NexusError, match=r"train.jsonl:2"):
        tokenize_corpus(bad, tokenizer_path, tmp_path / "out")
    (bad / "d" / "train.jsonl").write_text("\n")
    with pytest.raises(NexusError, match="'d'"):
        tokenize_corpus(bad, tokenizer_path, tmp_path / "out")
    with pytest.raises(NexusError, match="tokenizer"):
        tokenize_corpus(corpus, tmp_path / "missing.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shards_detect_damage(real_shards, tmp_path):
    import shutil

    _, out = real_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    TokenShards(copy)
    with open(copy / "code" / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(NexusError, match=r"train.bin"):
        TokenShards(copy)
    (copy / "code" / "train.bin").unlink()
    with pytest.raises(NexusError, match="missing"):
        TokenShards(copy)
    (copy / "meta.json").write_text('{"dtype": ')
    with pytest.raises(NexusError, match="meta.json"):
        TokenShards(copy)
    (copy / "meta.json").write_text('{"dtype": "float32"}')
    with pytest.raises(NexusError, match="dtype"):
        TokenShards(copy)
    with pytest.raises(NexusError, match="meta.json"):
        TokenShards(tmp_path / "nothing")
    shards = TokenShards(out)
    with pytest.raises(NexusError, match="'nope'"):
        shards.tokens("nope", "train")
    with pytest.raises(NexusError, match="'test'"):
        shards.num_tokens("code", "test")


# -- DomainSampler ----------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path) -> TokenShards:
    return make_shards(tmp_path / "s", {"a": 5000, "b": 1000, "c": 3000})


def collect(sampler: DomainSampler, n: int) -> list[tuple[torch.Tensor, ...]]:
    return [sampler.next_batch() for _ in range(n)]


def same(x: list[tuple[torch.Tensor, ...]], y: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(
        torch.equal(a, b) for bx, by in zip(x, y, strict=True) for a, b in zip(bx, by, strict=True)
    )


def test_batch_shapes_and_windows(shards):
    sampler = DomainSampler(shards, ["a", "b", "c"], seq_len=16, batch_size=8)
    for _ in range(5):
        inputs, targets, dom = sampler.next_batch()
        assert inputs.shape == targets.shape == (8, 16) and dom.shape == (8,)
        assert inputs.dtype == targets.dtype == dom.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        # Windows are contiguous runs of the labelled domain's tokens.
        assert torch.equal(targets - inputs, torch.ones_like(inputs))
        for row, d in zip(inputs, dom, strict=True):
            start = int(row[0]) - 1000 * int(d)
            size = [5000, 1000, 3000][int(d)]
            assert 0 <= start <= size - 17


def test_determinism_and_seed(shards):
    def make(seed: int) -> DomainSampler:
        return DomainSampler(shards, ["a", "b", "c"], 8, 4, seed=seed)

    assert same(collect(make(3), 6), collect(make(3), 6))
    assert not same(collect(make(3), 6), collect(make(4), 6))
    # Consecutive batches differ too.
    first, second = collect(make(3), 2)
    assert not torch.equal(first[0], second[0])


def test_resume(shards):
    full = DomainSampler(shards, ["a", "b", "c"], 8, 4, seed=1)
    reference = collect(full, 10)
    part = DomainSampler(shards, ["a", "b", "c"], 8, 4, seed=1)
    collect(part, 6)
    state = json.loads(json.dumps(part.state_dict()))
    assert state["step"] == 6
    resumed = DomainSampler(shards, ["a", "b", "c"], 8, 4, seed=1)
    resumed.load_state_dict(state)
    assert same(collect(resumed, 4), reference[6:])
    other = DomainSampler(shards, ["a", "b", "c"], 8, 4, seed=2)
    with pytest.raises(NexusError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(NexusError, match="step"):
        resumed.load_state_dict({"step": -1})


def test_ranks_partition_global_batch(shards):
    single = DomainSampler(shards, ["a", "b", "c"], 8, 6, seed=5)
    ranks = [
        DomainSampler(shards, ["a", "b", "c"], 8, 3, seed=5, rank=r, world_size=2) for r in range(2)
    ]
    for _ in range(5):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for i in range(3):
            assert torch.equal(whole[i], torch.cat([parts[0][i], parts[1][i]]))


def frequencies(sampler: DomainSampler, n_batches: int) -> np.ndarray:
    counts = np.zeros(len(sampler.domains))
    for _ in range(n_batches):
        counts += np.bincount(sampler.next_batch()[2].numpy(), minlength=len(sampler.domains))
    return counts / counts.sum()


def test_weighting(shards):
    size = DomainSampler(shards, ["a", "b", "c"], 4, 64, weighting="size")
    assert size.domain_weights == pytest.approx({"a": 5 / 9, "b": 1 / 9, "c": 3 / 9})
    assert frequencies(size, 100) == pytest.approx([5 / 9, 1 / 9, 3 / 9], abs=0.03)
    uniform = DomainSampler(shards, ["a", "b", "c"], 4, 64, weighting="uniform")
    assert frequencies(uniform, 100) == pytest.approx([1 / 3] * 3, abs=0.03)
    explicit = DomainSampler(shards, ["a", "b", "c"], 4, 64, weighting={"a": 1, "b": 3})
    assert explicit.domain_weights == {"a": 0.25, "b": 0.75, "c": 0.0}
    freq = frequencies(explicit, 100)
    assert freq == pytest.approx([0.25, 0.75, 0.0], abs=0.03)
    assert freq[2] == 0
    # domain ids index the order given, not the shards' order.
    swapped = DomainSampler(shards, ["c", "a"], 4, 64, weighting={"c": 1.0})
    assert set(swapped.next_batch()[2].tolist()) == {0}


def test_sampler_errors(shards):
    with pytest.raises(NexusError, match="'zzz'"):
        DomainSampler(shards, ["a", "zzz"], 8, 4)
    with pytest.raises(NexusError, match="'b'"):
        DomainSampler(shards, ["a", "b"], 1000, 4)  # b has 1000 tokens < seq_len + 1
    with pytest.raises(NexusError, match=r"domain_weights\.a"):
        DomainSampler(shards, ["a", "b"], 8, 4, weighting={"a": -1.0, "b": 1.0})
    with pytest.raises(NexusError, match=r"domain_weights\.a"):
        DomainSampler(shards, ["a", "b"], 8, 4, weighting={"a": float("nan")})
    with pytest.raises(NexusError, match="domain_weights"):
        DomainSampler(shards, ["a", "b"], 8, 4, weighting={"a": 0, "b": 0})
    with pytest.raises(NexusError, match=r"domain_weights\.c"):
        DomainSampler(shards, ["a", "b"], 8, 4, weighting={"a": 1, "c": 1})
    with pytest.raises(NexusError, match="domain_weighting"):
        DomainSampler(shards, ["a", "b"], 8, 4, weighting="tokens")
    with pytest.raises(NexusError, match="seq_len"):
        DomainSampler(shards, ["a"], 0, 4)
    with pytest.raises(NexusError, match="rank"):
        DomainSampler(shards, ["a"], 8, 4, rank=2, world_size=2)
    with pytest.raises(NexusError, match="domains"):
        DomainSampler(shards, [], 8, 4)


def test_sampler_on_real_shards(real_shards):
    _, out = real_shards
    shards = TokenShards(out)
    sampler = DomainSampler(shards, shards.domains, 16, 4, weighting="uniform")
    inputs, targets, _ = sampler.next_batch()
    assert int(inputs.max()) < shards.vocab_size
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


# -- iter_eval_batches ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 17, 64, 65, 100])
@pytest.mark.parametrize("seq_len,batch_size", [(8, 3), (16, 1), (100, 4)])
def test_eval_batches_cover_once(n, seq_len, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    seen_inputs, seen_targets = [], []
    for inputs, targets in iter_eval_batches(tokens, seq_len, batch_size):
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape and inputs.shape[0] <= batch_size
        assert inputs.shape[1] <= seq_len
        assert torch.equal(targets, inputs + 1)
        seen_inputs += inputs.flatten().tolist()
        seen_targets += targets.flatten().tolist()
    # Every token but the first is a target exactly once, in order; no overlap.
    assert seen_targets == list(range(1, n))
    assert seen_inputs == list(range(0, max(n - 1, 0)))


def test_eval_batches_max_tokens_and_memmap(real_shards):
    _, out = real_shards
    tokens = TokenShards(out).tokens("code", "train")
    total = sum(t.numel() for _, t in iter_eval_batches(tokens, 16, 4))
    assert total == len(tokens) - 1
    limited = sum(t.numel() for _, t in iter_eval_batches(tokens, 16, 4, max_tokens=100))
    assert limited == 100
    first = next(iter_eval_batches(tokens, 16, 4))[0]
    assert torch.equal(first[0], torch.from_numpy(np.asarray(tokens[:16], dtype=np.int64)))
