"""``--router-init``: MoEs routed by a training-free peer, upcycled, saved, grown and shrunk by the
peer's own rule in a later process, evaluated and exported (docs/design.md §5.8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_bad_input import run

from conftest import PLUGIN_DOMAINS, PLUGIN_NEW, plugin_world
from nexus_moe.checkpoint import load_checkpoint, model_state_dict
from nexus_moe.errors import NexusError
from nexus_moe.extend import extend, remove_expert
from nexus_moe.routers import LinearRouter, PeerRouter, peers
from nexus_moe.upcycle import upcycle

DOMAINS, NEW = PLUGIN_DOMAINS, PLUGIN_NEW
TOKENS = 512  # calibration tokens per domain


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A corpus of four domains, a seed and one FFN-only expert per domain (seconds)."""
    return plugin_world(tmp_path_factory.mktemp("peers"), 30, 40, 15, 128)


def _peer_moe(world: dict, init: str, name: str | None = None, **overrides) -> Path:
    out = world["root"] / (name or f"moe-{init}")
    if not out.exists():
        shards = None if init == "arrow" else world["shards"]
        upcycle("nexus", world["seed"], [world["experts"][d] for d in DOMAINS], out,
                moe_overrides=overrides or None, calibration_shards=shards,
                calibration_tokens=TOKENS, router_init=init)  # fmt: skip
    return out


def _own_share(model, shards, domains) -> float:
    """Share of each domain's training windows whose top-1 expert is its own (MoE layer 0)."""
    from nexus_moe.calibrate import domain_windows

    hits = total = 0
    with torch.no_grad():
        for i, d in enumerate(domains):
            w = domain_windows(shards, d, 64, 512)
            top1 = model(w).routing[0].top1
            hits, total = hits + int((top1 == i).sum()), total + top1.numel()
    return hits / total


def _rows(model) -> list[torch.Tensor]:
    out = []
    for layer in model.moe_layers():
        r = layer.router
        out.append(r.weight.detach().clone() if isinstance(r, LinearRouter) else r.rows.clone())
    return out


@pytest.mark.parametrize("init", peers.METHODS)
def test_each_peer_upcycles_saves_grows_and_shrinks_back_bit_for_bit(world, init):
    """upcycle --router-init X writes a checkpoint whose config names the peer and whose router
    holds its rows; extend (a new process's load) grows it by the peer's rule; removing the
    expert just added gives the upcycled weights back exactly."""
    moe_dir = _peer_moe(world, init)
    model, _ = load_checkpoint(moe_dir)
    cfg = model.cfg.moe
    assert cfg.router_init == init and cfg.router == "linear"
    kind = PeerRouter if init in ("dume-bias", "arrow", "phatgoose") else LinearRouter
    assert all(type(layer.router) is kind for layer in model.moe_layers())
    assert (moe_dir / peers.STATE_FILE).is_file() and model.peer_state.method == init
    if init != "arrow":  # (arrow reads no text; the experts' weight changes are tiny here)
        # mergekit's unit rows at temperature 1 and PHATGOOSE's gates (nearly alike on experts
        # branched 15 steps) route these domains weakly; chance is 1/3
        floor = 0.6 if init in ("dume", "dume-bias", "mean") else 0.4
        assert _own_share(model, world["shards"], DOMAINS) >= floor

    grown_dir = world["root"] / f"grown-{init}"
    shards = None if init == "arrow" else world["shards"]
    extend(moe_dir, world["experts"][NEW], grown_dir, calibration_shards=shards,
           calibration_tokens=TOKENS)  # fmt: skip
    grown, _ = load_checkpoint(grown_dir)
    assert grown.cfg.moe.domains == [*DOMAINS, NEW] and grown.cfg.moe.router_init == init
    assert len(grown.peer_state.vectors) == 4
    assert all(r.shape[0] == 4 and r[3].norm() > 0 for r in _rows(grown))
    with torch.no_grad():
        grown(torch.randint(0, 300, (2, 16)))  # it runs

    back_dir = world["root"] / f"back-{init}"
    remove_expert(grown_dir, back_dir, NEW)
    back, _ = load_checkpoint(back_dir)
    before, after = model_state_dict(model), model_state_dict(back)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert (
        peers.state_tensors(back.peer_state).keys() == peers.state_tensors(model.peer_state).keys()
    )


def test_dume_extension_resolves_every_row_as_if_placed_with_all_experts(world):
    """DUME's rule: the extended MoE's rows are those of DUME placed on all four experts at
    once (each row's direction; the temperatures are kept from the three-expert MoE)."""
    three = load_checkpoint(_peer_moe(world, "dume"))[0]
    grown_dir = world["root"] / "grown-dume"
    if not grown_dir.exists():
        extend(_peer_moe(world, "dume"), world["experts"][NEW], grown_dir,
               calibration_shards=world["shards"], calibration_tokens=TOKENS)  # fmt: skip
    grown = load_checkpoint(grown_dir)[0]
    out = world["root"] / "moe-dume-4"
    upcycle("nexus", world["seed"], [world["experts"][d] for d in [*DOMAINS, NEW]], out,
            calibration_shards=world["shards"], calibration_tokens=TOKENS, router_init="dume")  # fmt: skip
    four = load_checkpoint(out)[0]
    for a, b, old in zip(_rows(grown), _rows(four), _rows(three), strict=True):
        torch.testing.assert_close(F.normalize(a, dim=-1), F.normalize(b, dim=-1), atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        # every earlier row moved: the new domain's statistics entered the regression
        assert (F.normalize(a[:3], dim=-1) - F.normalize(old, dim=-1)).norm(dim=-1).min() > 1e-4


def test_evaluate_and_generate_run_a_peer_routed_moe(world, tmp_path):
    """`evaluate` scores a peer-routed MoE from its checkpoint; generation with the KV cache
    (routing on context 0.75) continues as greedy decoding over whole sequences does."""
    moe_dir = _peer_moe(world, "dume-bias")
    done = run("evaluate", moe_dir, "--corpus", world["corpus"], "--max-tokens", "256",
               "--json", tmp_path / "scores.json")  # fmt: skip
    assert done.code == 0, done.err
    assert (tmp_path / "scores.json").is_file()
    model = load_checkpoint(moe_dir)[0].eval()
    assert model.cfg.moe.router_context == 0.75
    prompt = torch.randint(1, 300, (1, 6))
    out = model.generate(prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_linear_peers_export_as_a_gate_and_the_others_are_refused_naming_why(world, tmp_path):
    from nexus_moe.hf import export_hf, import_hf

    moe_dir = _peer_moe(world, "mean", "moe-mean-token", router_context=0.0)
    ours = load_checkpoint(moe_dir)[0]
    hf_dir = export_hf(moe_dir, tmp_path / "hf")
    back = import_hf(hf_dir)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, back(ids).logits)
    for init, why in (("dume-bias", "bias"), ("arrow", "absolute value"),
                      ("phatgoose", "standardised")):  # fmt: skip
        bad = _peer_moe(world, init, f"moe-{init}-token", router_context=0.0)
        done = run("export", bad, "--out", tmp_path / f"hf-{init}")
        assert done.code == 2 and "Traceback" not in done.err, done.err
        assert why in done.message and f"--router-init {init}" in done.message, done.message
        assert not (tmp_path / f"hf-{init}").exists()


def test_bad_router_inits_are_one_line_each(world, tmp_path):
    experts = [a for d in DOMAINS for a in ("--expert", world["experts"][d])]
    up = ["upcycle", "--method", "nexus", "--seed", world["seed"], *experts]
    dume = _peer_moe(world, "dume")
    ext = ["extend", "--moe", dume, "--expert", world["experts"][NEW], "--out", tmp_path / "x"]
    cases = [
        ([*up, "--out", tmp_path / "a", "--router-init", "nope"], "--router-init"),
        ([*up, "--out", tmp_path / "b", "--router-init", "dume"], "--corpus"),
        ([*up, "--out", tmp_path / "c", "--router-init", "arrow", "--corpus", world["corpus"]],
         "--corpus"),
        ([*up, "--out", tmp_path / "d", "--corpus", world["corpus"], "--set", "router_init=dume"],
         "--router-init"),
        ([*up, "--out", tmp_path / "e", "--router-init", "mean", "--corpus", world["corpus"],
          "--set", "router=nexus"], "router"),
        ([*ext, "--corpus", world["corpus"], "--router-init", "mean"], "--router-init mean"),
        ([*ext], "--corpus"),
        ([*ext, "--corpus", world["corpus"], "--row-scale", "1.0"], "--row-scale"),
    ]  # fmt: skip
    for args, named in cases:
        done = run(*args)
        assert done.code == 2 and "Traceback" not in done.err, (args, done.err)
        assert len(done.err.strip().splitlines()) == 1 and named in done.message, done.message
    for out in "abcde":
        assert not (tmp_path / out).exists()
    assert not (tmp_path / "x").exists()


def test_a_peer_moe_without_its_state_file_is_refused_by_extend(world, tmp_path):
    import shutil

    copy = tmp_path / "moe"
    shutil.copytree(_peer_moe(world, "mean"), copy)
    (copy / peers.STATE_FILE).unlink()
    with pytest.raises(NexusError, match="peer_router.safetensors"):
        extend(copy, world["experts"][NEW], tmp_path / "out", calibration_shards=world["shards"],
               calibration_tokens=TOKENS)  # fmt: skip


def test_a_recipe_variant_names_a_peer_and_the_study_upcycles_it(world, tmp_path):
    """`moe.variants: - {name: dume, method: nexus, router_init: dume}`: the study's upcycle
    stage places DUME's rows from the corpus, without domain embeddings; a bad name, the field
    under `moe:` or a peer variant in extend.variants fail at load, naming the field."""
    from test_recipe import _recipe

    from nexus_moe.pipeline import mark_done
    from nexus_moe.recipe import load_recipe
    from nexus_moe.study import Study

    variants = [{"name": "nexus", "method": "nexus"},
                {"name": "dume", "method": "nexus", "router_init": "dume"}]  # fmt: skip
    recipe = load_recipe(_recipe(tmp_path, moe__variants=variants, extend__variants=["nexus"]))
    dume = recipe.moe.variants[1]
    assert dume.router_init == "dume"
    embeddings = tmp_path / "no-embeddings"  # a peer reads none: only its stage key is used
    experts = {d: world["experts"][d] for d in DOMAINS}
    for folder in (world["seed"].parent, *(p.parent for p in experts.values()), embeddings,
                   world["corpus"]):  # fmt: skip
        folder.mkdir(exist_ok=True)
        mark_done(folder, f"key-of-{folder.name}")
    out = Study(recipe).stage_upcycle(dume, 0, world["seed"], experts, embeddings, world["corpus"])
    model = load_checkpoint(out)[0]
    assert model.cfg.moe.router_init == "dume" and model.peer_state.method == "dume"
    assert _own_share(model, world["shards"], DOMAINS) >= 0.6

    for change, named in (
        ({"moe__variants": [*variants[:1], {**variants[1], "router_init": "nope"}]},
         "moe.variants 'dume'.router_init: 'nope' is not one of"),
        ({"moe__variants": [*variants[:1], {"name": "dume", "method": "nexus",
                                            "moe": {"router_init": "dume"}}]},
         "router_init is the variant's own field"),
        ({"moe__variants": variants, "extend__variants": ["nexus", "dume"]},
         "extend.variants: 'dume' is routed by a training-free peer"),
        ({"moe__variants": [*variants[:1], {**variants[1], "method": "sparse-upcycle"}]},
         "routes between copies of the seed"),
    ):  # fmt: skip
        with pytest.raises(NexusError, match=named):
            load_recipe(_recipe(tmp_path, **change))
