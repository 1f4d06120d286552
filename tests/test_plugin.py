"""Plug-in experts: an assembled MoE that works before any training, and experts added later that
get their domain's tokens without finetuning (docs/design.md, plug-in experts)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import PLUGIN_DOMAINS, PLUGIN_NEW, PLUGIN_TEXTS, plugin_world, tiny_config
from nexus_moe import calibrate, config, placement
from nexus_moe.analyse import routing_counts
from nexus_moe.checkpoint import load_checkpoint, save_checkpoint
from nexus_moe.config import MoEConfig
from nexus_moe.embed import DomainEmbeddings
from nexus_moe.errors import NexusError
from nexus_moe.evaluate import EvalConfig, evaluate_domains
from nexus_moe.extend import extend, remove_expert
from nexus_moe.model import KVCache, Transformer
from nexus_moe.pipeline import train_model
from nexus_moe.train import FFN_PARAMETERS, TrainConfig
from nexus_moe.upcycle import upcycle

TEXTS, DOMAINS, NEW = PLUGIN_TEXTS, PLUGIN_DOMAINS, PLUGIN_NEW
EVAL = EvalConfig(seq_len=32, batch_size=4, max_tokens=1024)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A corpus of four domains, a seed and one FFN-only expert per domain (seconds)."""
    out = plugin_world(tmp_path_factory.mktemp("plugin"), 40, 100, 30, 256)
    vectors = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    emb = DomainEmbeddings(list(TEXTS), vectors, embedder="test-embedder", dim=8, num_chunks=4)
    return dict(out, emb=emb)


def _upcycled(world: dict, name: str = "moe", **kw) -> Path:
    out = world["root"] / name
    if not out.exists():
        _nexus(world, out, {"nexus_hidden_size": 8, **kw},
               calibration_shards=world["shards"], calibration_tokens=512)  # fmt: skip
    return out


def _nexus(world: dict, out: Path, overrides: dict | None = None, **kw) -> Path:
    """``upcycle`` of the world's seed and experts of DOMAINS into a nexus MoE at ``out``."""
    return upcycle(
        "nexus",
        world["seed"],
        [world["experts"][d] for d in DOMAINS],
        out,
        domain_embeddings=world["emb"],
        moe_overrides=overrides or {"nexus_hidden_size": 8},
        **kw,
    )


def _paper(world: dict, out: Path) -> Path:
    """The paper's Nexus MoE of the same experts (random projection, no calibration)."""
    return upcycle(
        "nexus-paper",
        world["seed"],
        [world["experts"][d] for d in DOMAINS],
        out,
        domain_embeddings=world["emb"],
        moe_overrides={"nexus_hidden_size": 8},
    )


def _own_share(model: Transformer, shards, domains: list[str]) -> dict[str, float]:
    counts = routing_counts(model, shards, domains, EVAL)  # (L, D, E)
    share = (counts.double() / counts.sum(-1, keepdim=True)).mean(0)
    experts = model.cfg.moe.domains
    return {d: float(share[i, experts.index(d)]) for i, d in enumerate(domains)}


def test_ffn_only_branch_keeps_every_other_weight_of_the_seed(world):
    seed, _ = load_checkpoint(world["seed"])
    expert, meta = load_checkpoint(world["experts"]["sports"])
    assert meta["train_only"] == list(FFN_PARAMETERS)
    changed = []
    for (name, a), (_, b) in zip(
        seed.state_dict().items(), expert.state_dict().items(), strict=True
    ):
        if ".mlp." in name:
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), name
    assert any(changed)  # the FFNs did train


def test_step0_moe_with_its_domains_expert_forced_is_that_dense_expert(world):
    """Plug-in composition is exact: shared weights copied bit for bit (not averaged), no
    shared expert, renormalised gates, so a token on expert i gets dense expert i's FFN."""
    moe, _ = load_checkpoint(_upcycled(world))
    assert (moe.cfg.moe.shared_expert, moe.cfg.moe.renormalize) == (False, True)
    seed, _ = load_checkpoint(world["seed"])
    assert torch.equal(
        moe.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        seed.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    ids = torch.randint(0, 300, (2, 24))
    for i, domain in enumerate(DOMAINS):
        dense, _ = load_checkpoint(world["experts"][domain])
        for layer in moe.moe_layers():
            layer.expert_mask = torch.arange(len(DOMAINS)) == i
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_moe_of_identical_experts_is_the_dense_model_whatever_the_routing(world):
    seed, _ = load_checkpoint(world["seed"])
    out = world["root"] / "identical"
    upcycle(
        "nexus",
        world["seed"],
        [world["seed"]] * 3,
        out,
        domain_embeddings=world["emb"],
        domains=DOMAINS,
        moe_overrides={"nexus_hidden_size": 8},
        calibration_shards=world["shards"],
        calibration_tokens=256,
    )
    moe, _ = load_checkpoint(out)
    ids = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(moe(ids).logits, seed(ids).logits, atol=1e-5, rtol=1e-5)


def test_calibrated_router_routes_each_domain_to_its_expert_at_step0(world):
    moe, _ = load_checkpoint(_upcycled(world))
    share = _own_share(moe, world["shards"], DOMAINS)
    assert min(share.values()) >= 0.6 and sum(share.values()) / len(share) >= 0.7, share
    # The paper's random initialisation does not know the domains.
    paper = _paper(world, world["root"] / "paper")
    random_share = _own_share(load_checkpoint(paper)[0], world["shards"], DOMAINS)
    assert sum(random_share.values()) < sum(share.values())


def test_new_expert_gets_its_domains_tokens_zero_shot_and_the_others_keep_theirs(world):
    """At the fixed row norm (the default for statistics without held windows) the new expert
    takes its domain's tokens."""
    context = 0.75  # the plug-in default
    moe_dir = _upcycled(world, f"moe-ctx{context}", router_context=context)
    before = _own_share(load_checkpoint(moe_dir)[0], world["shards"], DOMAINS)
    out = world["root"] / f"extended-ctx{context}"
    extend(
        moe_dir,
        world["experts"][NEW],
        out,
        domain_embeddings=world["emb"],
        calibration_shards=world["shards"],
        calibration_tokens=512,
        leak_budget=None,
        row_scale=config.NEW_ROW_SCALE,
    )
    model, _ = load_checkpoint(out)
    share = _own_share(model, world["shards"], [*DOMAINS, NEW])
    assert share[NEW] >= 0.5, share
    # The earlier domains keep most of their routing (this tiny model's "music" and "sports"
    # texts share most of their words, so sports loses the most).
    assert all(share[d] >= 0.5 for d in DOMAINS), (before, share)
    mean_before = sum(before.values()) / len(DOMAINS)
    assert sum(share[d] for d in DOMAINS) / len(DOMAINS) >= mean_before - 0.15, (before, share)
    # An FFN-only expert is added without merging: every non-expert weight is unchanged.
    old, _ = load_checkpoint(moe_dir)
    for name, tensor in old.state_dict().items():
        if ".mlp." not in name:
            assert torch.equal(tensor, model.state_dict()[name]), name
    # The statistics grow with the expert and shrink with it again.
    assert model.moe_layers()[0].domain_stats.centroids.shape[0] == 4
    again = world["root"] / f"removed-ctx{context}"
    remove_expert(out, again, NEW)
    removed, _ = load_checkpoint(again)
    torch.testing.assert_close(
        removed.moe_layers()[0].domain_stats.centroids,
        old.moe_layers()[0].domain_stats.centroids,
    )


def _without_held_windows(moe_dir: Path, out: Path) -> Path:
    """The MoE as a checkpoint made before held windows were kept with its statistics."""
    model, meta = load_checkpoint(moe_dir)
    for layer in model.moe_layers():
        layer.domain_stats = replace(layer.domain_stats, held=None)
    return save_checkpoint(out, model, moe_dir / "tokenizer.json", metadata=meta)


def test_held_windows_scored_from_a_kept_block_match_whole_forward_passes(world):
    """Placing a row runs only the blocks from its layer up, on the residual stream kept at its
    input: the same losses as the whole model."""
    model, _ = load_checkpoint(_upcycled(world))
    held = model.moe_layers()[0].domain_stats.held
    whole = placement.held_losses(model, held)
    runner = placement._HeldForward(model.eval(), held, "cpu")
    for block in range(model.cfg.num_layers + 1):
        runner.advance(block)
        torch.testing.assert_close(runner.losses().mean(dim=1), whole, atol=1e-5, rtol=1e-5)


def test_joint_placement_with_no_candidate_within_the_budget_takes_the_most_cautious(
    world, monkeypatch
):
    """With budgets no row can meet, the joint placement ends on the most cautious candidate
    (the smallest norm with the largest negative bias) in every layer, and reports the rise it
    measured for it."""
    from nexus_moe.extend import extend_model

    monkeypatch.setattr(placement, "LAYERWISE_MAX_LAYERS", 0)
    monkeypatch.setattr(placement, "MEAN_LOSS_BUDGET", 1e-9)
    moe, _ = load_checkpoint(_upcycled(world))
    held = moe.moe_layers()[0].domain_stats.held
    before = placement.held_losses(moe, held)
    expert, _ = load_checkpoint(world["experts"][NEW])
    embedding = world["emb"].get([NEW])[0]
    windows = calibrate.domain_windows(world["shards"], NEW, moe.cfg.max_seq_len, 512)
    report: dict = {}
    extend_model(moe, expert, NEW, embedding, merge_lambda=0.0, calibration_windows=windows,
                 loss_budget=1e-9, report=report)  # fmt: skip
    assert report["placement"] == "joint"
    assert report["row_factors"] == [pytest.approx(float(placement._NORM_GRID[0]))] * len(
        moe.moe_layers()
    )
    rise = placement.held_losses(moe, held) - before
    assert report["held_worst_rise"] == pytest.approx(math.expm1(float(rise.max())), abs=1e-4)


@pytest.mark.parametrize("context", [0.75, 0.0])
def test_routed_inputs_of_a_kept_stream_match_the_calibration_pass(world, context):
    """The joint placement takes each layer's new inputs from one stream run up the model
    (each block once more with its row set): the same inputs as calibrate.moe_inputs."""
    model, _ = load_checkpoint(_upcycled(world, f"moe-ctx{context}", router_context=context))
    model.eval()
    windows = calibrate.domain_windows(world["shards"], NEW, model.cfg.max_seq_len, 512)
    expected = calibrate.moe_inputs(model, windows, None)
    stream = placement._HeldForward(model, windows[None], "cpu", scored=False)
    blocks = [i for i, block in enumerate(model.model.layers) if block.is_moe]
    assert len(blocks) == len(expected) > 1
    for block, layer, want in zip(blocks, model.moe_layers(), expected, strict=True):
        stream.advance(block)
        got = placement._routed_inputs(stream, block, layer)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("context", "row_scale", "expected"), [
    (0.75, None, config.NEW_ROW_SCALE),  # statistics without held windows: the fixed norm
    (0.5, None, config.NEW_ROW_SCALE_LESS_CONTEXT),
    (0.75, 1.3, 1.3),  # --row-scale
])  # fmt: skip
def test_new_rows_fixed_norm_follows_the_routers_context(world, tmp_path, context, row_scale,
                                                         expected):  # fmt: skip
    moe_dir = _upcycled(world, f"moe-ctx{context}", router_context=context)
    if row_scale is None:
        moe_dir = _without_held_windows(moe_dir, tmp_path / "old")
    extend(moe_dir, world["experts"][NEW], tmp_path / "out", domain_embeddings=world["emb"],
           calibration_shards=world["shards"], calibration_tokens=512, row_scale=row_scale)  # fmt: skip
    for layer in load_checkpoint(tmp_path / "out")[0].moe_layers():
        rows = layer.router.expert_embeddings().detach().float()
        earlier = rows[:-1].norm(dim=-1).mean()
        torch.testing.assert_close(rows[-1].norm() / earlier, torch.tensor(float(expected)))


@pytest.mark.parametrize(("context", "gain", "jointly"), [
    (0.75, 0.9, False), (0.0, 1.0, False), (0.75, 0.9, True), (0.0, 1.0, True),
])  # fmt: skip
def test_default_new_row_keeps_the_earlier_domains_loss_within_the_budget(world, tmp_path, context,
                                                                         gain, jointly,
                                                                         monkeypatch):  # fmt: skip
    """The default norm of a new row is bounded by what it costs the earlier domains: on the
    windows of each domain kept with the statistics, no earlier domain's perplexity rises by
    more than the budget, measured on the saved model (every layer's row, with what its leaks
    do to the layers above), while the new domain gains (per token little: this tiny model's
    "music" shares most of its words with "sports"); the windows grow with the expert and
    shrink with it again. ``jointly``: as a model deeper than LAYERWISE_MAX_LAYERS MoE layers
    gets it, one norm factor for every layer."""
    if jointly:
        monkeypatch.setattr(placement, "LAYERWISE_MAX_LAYERS", 0)
    moe_dir = _upcycled(world, f"moe-ctx{context}", router_context=context)
    old, _ = load_checkpoint(moe_dir)
    held = old.moe_layers()[0].domain_stats.held
    # (as many calibration windows as there are, up to HELD_WINDOWS)
    assert held.shape[0] == 3 and 1 <= held.shape[1] <= calibrate.HELD_WINDOWS
    assert held.dtype == torch.int32
    out = tmp_path / "out"
    extend(moe_dir, world["experts"][NEW], out, domain_embeddings=world["emb"],
           calibration_shards=world["shards"], calibration_tokens=512)  # fmt: skip
    model, meta = load_checkpoint(out)
    rises = placement.held_losses(model, held, per_window=True) - placement.held_losses(
        old, held, per_window=True
    )
    bound = placement.held_excess(
        rises, config.LOSS_BUDGET, config.MEAN_LOSS_BUDGET, config.HELD_CONFIDENCE
    )
    rise = rises.mean(dim=1)
    assert bound <= 1 + 1e-6, rises
    assert float(rise.max()) <= math.log1p(config.LOSS_BUDGET) + 1e-6, rise
    # The checkpoint records what the placement gave.
    placed = meta["extended_with"]["new_row"]
    assert placed["held_worst_rise"] == pytest.approx(math.expm1(float(rise.max())), abs=1e-4)
    assert len(placed["row_factors"]) == len(model.moe_layers())
    assert placed["placement"] == ("joint" if jointly else "layerwise")
    if jointly:
        assert len(set(placed["row_factors"])) == 1, placed["row_factors"]
    before = evaluate_domains(old, world["shards"], [NEW], EVAL)[NEW].perplexity
    after = evaluate_domains(model, world["shards"], [NEW], EVAL)[NEW].perplexity
    assert after < gain * before, (before, after)
    grown = model.moe_layers()[0].domain_stats.held
    assert grown.shape[0] == 4 and torch.equal(grown[:3], held)
    remove_expert(out, tmp_path / "removed", NEW)
    removed, _ = load_checkpoint(tmp_path / "removed")
    assert torch.equal(removed.moe_layers()[0].domain_stats.held, held)


def test_fitted_row_norm_protects_an_overlapping_earlier_domain_zero_shot(world, tmp_path):
    """A row norm fitted to a leak budget: this tiny model's "music" and "sports" texts share
    most of their words, so the default fixed norm hands music sports' tokens (sports'
    perplexity rises by half); the fitted norm keeps every earlier domain within a few percent
    of its perplexity and routing, and music still gains from its new expert."""
    moe_dir = _upcycled(world, "moe-ctx0.5", router_context=0.5)
    everything = [*DOMAINS, NEW]
    ppl = {}
    for name, budget, scale in (("fixed", None, config.NEW_ROW_SCALE_LESS_CONTEXT),
                                ("fitted", calibrate.LEAK_BUDGET, None),
                                ("default", None, None)):  # fmt: skip
        extend(
            moe_dir,
            world["experts"][NEW],
            tmp_path / name,
            domain_embeddings=world["emb"],
            calibration_shards=world["shards"],
            calibration_tokens=512,
            leak_budget=budget,
            row_scale=scale,
        )
        model, _ = load_checkpoint(tmp_path / name)
        ppl[name] = {d: s.perplexity for d, s in evaluate_domains(model, world["shards"],
                     everything, EVAL).items()}  # fmt: skip
    before_model, _ = load_checkpoint(moe_dir)
    before = {d: s.perplexity for d, s in evaluate_domains(before_model, world["shards"],
              everything, EVAL).items()}  # fmt: skip
    assert ppl["fixed"]["sports"] > 1.2 * before["sports"], (before, ppl)
    assert all(ppl["fitted"][d] < 1.05 * before[d] for d in DOMAINS), (before, ppl)
    assert ppl["fitted"][NEW] < 0.8 * before[NEW], (before, ppl)
    # The default, bounded by the earlier domains' loss on their held windows, protects them too.
    assert all(ppl["default"][d] < 1.05 * before[d] for d in DOMAINS), (before, ppl)
    assert ppl["default"][NEW] < 0.85 * before[NEW], (before, ppl)
    shares = _own_share(load_checkpoint(tmp_path / "fitted")[0], world["shards"], DOMAINS)
    old_shares = _own_share(before_model, world["shards"], DOMAINS)
    assert all(shares[d] >= old_shares[d] - 0.05 for d in DOMAINS), (old_shares, shares)


def test_extend_refuses_calibration_for_an_uncalibrated_moe(world, tmp_path):
    paper = _paper(world, tmp_path / "paper")
    with pytest.raises(Exception, match="no routing statistics"):
        extend(
            paper,
            world["experts"][NEW],
            tmp_path / "x",
            domain_embeddings=world["emb"],
            calibration_shards=world["shards"],
        )


def test_nexus_needs_the_corpus_to_calibrate(world, tmp_path):
    with pytest.raises(Exception, match="--corpus"):
        upcycle(
            "nexus",
            world["seed"],
            [world["experts"][d] for d in DOMAINS],
            tmp_path / "x",
            domain_embeddings=world["emb"],
        )


def test_routing_statistics_survive_a_save_and_load(world, tmp_path):
    model, _ = load_checkpoint(_upcycled(world))
    save_checkpoint(tmp_path / "copy", model)
    copy, _ = load_checkpoint(tmp_path / "copy")
    for a, b in zip(model.moe_layers(), copy.moe_layers(), strict=True):
        torch.testing.assert_close(a.domain_stats.covariance, b.domain_stats.covariance)
        assert torch.equal(a.domain_stats.held, b.domain_stats.held)
        assert a.domain_stats.temperature == pytest.approx(b.domain_stats.temperature)


def test_context_routing_decodes_incrementally_as_it_scores_whole_sequences():
    """Routing on the running mean of a layer's inputs: the KV cache carries the running sum,
    so token-by-token decoding routes (and scores) exactly as the full forward does."""
    moe = MoEConfig(num_experts=3, top_k=2, shared_expert=False, renormalize=True)
    moe.router = "linear"
    moe.router_context = 0.5
    model = Transformer(tiny_config(moe=moe)).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        step = [model(ids[:, :4], cache=cache).logits]
        step += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(step, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    # And it does route differently from per-token routing.
    per_token = Transformer(tiny_config(moe=replace(moe, router_context=0.0))).eval()
    per_token.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(per_token(ids).routing[1].top1, full.routing[1].top1)


def test_rows_are_discriminant_directions_scaled_by_the_fitted_temperature():
    """Two well separated Gaussian domains around a common mean: the rows point from one
    centroid to the other, orthogonal to the common mean (no expert-specific bias), and the
    fitted temperature makes the router confident."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 5.0, 0.0, 0.0], [-3.0, 5.0, 0.0, 0.0]])
    xs = [c + torch.randn(400, 4, generator=generator) for c in centres]
    stats_centroids = torch.stack([x.double().mean(0) for x in xs])
    covariance = (
        sum(
            ((x.double() - c).t() @ (x.double() - c))
            for x, c in zip(xs, stats_centroids, strict=True)
        )
        / 800
    )
    center = stats_centroids.mean(0)
    rows = calibrate.directions(stats_centroids, center, covariance, 0.05)
    assert rows[0, 0] > 0.99 and rows[1, 0] < -0.99
    assert (rows @ center).abs().max() < 1e-9  # the common mean scores every expert alike
    tau = calibrate.fit_temperature(rows, xs)
    probs = torch.softmax(tau * torch.cat(xs).double() @ rows.t(), dim=-1)
    assert probs[:400, 0].mean() > 0.95 and probs[400:, 1].mean() > 0.95


def test_training_refreshes_the_routing_statistics_and_keeps_the_rows(world, tmp_path):
    """After MoE training the stored statistics describe the trained hidden states (new experts
    are placed against the trained rows), computed as calibration computes them, from as many
    tokens as the upcycle's `--calibration-tokens` (512 here, not the default 8,192)."""
    moe_dir = _upcycled(world)
    model, meta = load_checkpoint(moe_dir)
    before = model.moe_layers()[0].domain_stats.centroids.clone()
    counts = model.moe_layers()[0].domain_stats.counts.clone()
    assert counts.max() == 512
    cfg = TrainConfig(
        steps=3, batch_size=4, seq_len=32, lr=3e-3, eval_tokens=128, checkpoint_every=0
    )
    final = train_model(
        model, world["corpus"], moe_dir / "tokenizer.json", DOMAINS, cfg, tmp_path / "ft"
    )
    trained, _ = load_checkpoint(final)
    after = trained.moe_layers()[0].domain_stats
    assert not torch.allclose(after.centroids, before)
    torch.testing.assert_close(after.counts, counts)
    windows = [
        calibrate.domain_windows(world["shards"], d, trained.cfg.max_seq_len, 512) for d in DOMAINS
    ]
    expected = calibrate.domain_statistics(trained, windows)[0]
    torch.testing.assert_close(after.centroids, expected.centroids, atol=1e-5, rtol=1e-5)


def _gaussian_stats(centres: torch.Tensor) -> calibrate.LayerStats:
    """Statistics of unit-covariance Gaussian domains around ``centres`` (E, H)."""
    size = centres.shape[1]
    return calibrate.LayerStats(
        centres.double(),
        torch.eye(size, dtype=torch.float64),
        torch.full((centres.shape[0],), 1000.0, dtype=torch.float64),
        centres.double().mean(0),
        1.0,
    )


@pytest.mark.parametrize("top_k,renormalize", [(2, True), (1, False)])
def test_fitted_row_norm_keeps_the_leak_within_budget_and_grows_with_distance(top_k, renormalize):
    """The new row's norm is the largest whose estimated loss of the earlier domains' own gates
    stays within the budget; the leak it reports is what the MoE layer's gating gives on fresh
    samples of those domains; a domain far from the earlier ones gets a larger norm (and more
    of its tokens) than one that overlaps them."""
    generator = torch.Generator().manual_seed(1)
    centres = 3.0 * torch.eye(4)[:3]
    stats = _gaussian_stats(centres)
    rows = 2.0 * calibrate.directions(stats.centroids, stats.center, stats.covariance, 0.05)
    own = torch.arange(3).repeat_interleave(4000)
    fits = {}
    for name, centre in {"far": [0.0, 0.0, 0.0, 4.0], "near": [1.5, 1.5, 0.0, 1.0]}.items():
        new = torch.tensor(centre) + torch.randn(4000, 4, generator=generator)
        direction = calibrate.directions(
            new.double().mean(0)[None], stats.center, stats.covariance, 0.05
        )[0]
        norm, info = calibrate.fit_row_scale(
            stats, direction, new, rows, top_k, renormalize, leak_budget=0.03, seed=0
        )
        assert info["leak"] <= 0.03
        # The estimate holds on fresh samples of the earlier domains.
        fresh = torch.cat([c + torch.randn(4000, 4, generator=generator) for c in centres])
        old = fresh.double() @ rows.t()
        grown = calibrate.with_new_expert(old, norm * (fresh.double() @ direction)[None])
        loss = calibrate.gates_of(old, own, top_k, renormalize) - calibrate.gates_of(
            grown, own, top_k, renormalize
        )
        assert float(loss.min()) >= -1e-6  # a new expert never adds to another's gate
        assert float(loss.mean()) <= 0.04, (name, float(loss.mean()))
        fits[name] = (norm, info)
    assert fits["far"][0] > fits["near"][0]
    assert fits["far"][1]["share"] > 0.9 > fits["near"][1]["share"]
    # A budget of 0 admits no candidate that takes anything: the smallest norm is returned.
    norm, _ = calibrate.fit_row_scale(
        stats, direction, new, rows, top_k, renormalize, leak_budget=0.0, seed=0
    )
    assert norm == pytest.approx(float(calibrate._SCALE_GRID[0]) * float(rows.norm(dim=-1).mean()))


def test_new_row_discounts_the_directions_its_own_domain_varies_in():
    """The new row is the discriminant direction under the covariance pooled over the earlier
    domains *and* the new one. A new domain shifted a little along a direction in which it varies
    widely (and the earlier domains do not) gets a row that leans on that direction less than
    the earlier domains' covariance alone would make it, and so more of its tokens at the same
    leak; the earlier rows and the stored covariance are unchanged."""
    generator = torch.Generator().manual_seed(0)
    size = 5
    centres = 3.0 * torch.eye(size)[:3]
    stats = _gaussian_stats(centres)
    rows = 2.0 * calibrate.directions(stats.centroids, stats.center, stats.covariance, 0.05)
    spread = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0])  # the new domain varies widely along e4
    noise = torch.randn(4000, size, generator=generator)
    new = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.5]) + spread * noise
    old = torch.cat([c + torch.randn(4000, size, generator=generator) for c in centres])
    row, grown = calibrate.new_expert_row(stats, new, rows.float(), scale=1.0)
    earlier_only = calibrate.directions(new.double().mean(0)[None], stats.center,
                                        stats.covariance, 0.05)[0].float()  # fmt: skip
    torch.testing.assert_close(row.norm(), rows.float().norm(dim=-1).mean())
    unit = row / row.norm()
    assert abs(float(unit[4])) < 0.5 * abs(float(earlier_only[4]))
    torch.testing.assert_close(grown.covariance, stats.covariance)
    # Its norm has no default of its own: the default depends on the router's context.
    with pytest.raises(ValueError, match="scale or leak_budget"):
        calibrate.new_expert_row(stats, new, rows.float())

    def recall_and_leak(direction: torch.Tensor) -> tuple[float, float]:
        grown_rows = torch.cat([rows.float(), row.norm() * direction[None]])
        recall = float(((new @ grown_rows.t()).argmax(-1) == 3).float().mean())
        return recall, float(((old @ grown_rows.t()).argmax(-1) == 3).float().mean())

    pooled_recall, pooled_leak = recall_and_leak(unit)
    old_recall, old_leak = recall_and_leak(earlier_only)
    assert pooled_leak <= old_leak + 0.005, (pooled_leak, old_leak)
    assert pooled_recall >= old_recall + 0.05, (pooled_recall, old_recall)


def test_refit_rows_are_the_discriminant_directions_among_all_the_domains():
    """The earlier rows' shift turns the rows the statistics give for the earlier domains into
    those they give for all the domains (the new one's centroid and scatter included), so rows
    that training moved keep that move; the new domain's tokens then score lower on the earlier
    experts, and the statistics returned are those of all the domains."""
    generator = torch.Generator().manual_seed(0)
    size, tau = 6, 2.5
    centres = 3.0 * torch.eye(size)[:3]
    stats = replace(_gaussian_stats(centres), temperature=tau)
    new = 3.0 * torch.eye(size)[3] + 1.5 * torch.randn(3000, size, generator=generator)
    trained = tau * calibrate.directions(stats.centroids, stats.center, stats.covariance, 0.05)
    trained = trained + 0.1 * torch.randn(trained.shape, generator=generator, dtype=torch.float64)
    shift, refit = calibrate.refit_earlier_rows(stats, new)
    assert refit.centroids.shape == (4, size) and refit.counts[-1] == 3000
    torch.testing.assert_close(refit.center, refit.centroids.mean(0))
    assert refit.covariance[4, 4] > stats.covariance[4, 4]  # the new domain's scatter pooled in
    everyone = calibrate.directions(refit.centroids, refit.center, refit.covariance, 0.05)
    expected = trained + tau * (everyone[:3] - calibrate.directions(
        stats.centroids, stats.center, stats.covariance, 0.05))  # fmt: skip
    torch.testing.assert_close((trained + shift.double()), expected, atol=1e-5, rtol=1e-5)
    centroid = new.double().mean(0)
    assert (centroid @ (trained + shift.double()).t() < centroid @ trained.t()).all()


def test_refit_earlier_rows_give_the_new_domain_more_of_its_tokens(world, tmp_path):
    """At the same new-row norm, refitting the earlier rows (`extend --refit-rows`) hands the new
    expert more of its domain's tokens than keeping them (the default); a leak budget keeps
    them; removing the expert gives back the MoE as it was, refit rows and statistics
    included."""
    moe_dir = _upcycled(world, "moe-ctx0.5", router_context=0.5)
    shares, rows = {}, {}
    for name, refit, budget in (("keep", False, None), ("refit", True, None),
                                ("budget", True, calibrate.LEAK_BUDGET)):  # fmt: skip
        extend(moe_dir, world["experts"][NEW], tmp_path / name, domain_embeddings=world["emb"],
               calibration_shards=world["shards"], calibration_tokens=512, refit_rows=refit,
               leak_budget=budget, row_scale=None if budget else 0.8)  # fmt: skip
        model, _ = load_checkpoint(tmp_path / name)
        shares[name] = _own_share(model, world["shards"], [NEW])[NEW]
        rows[name] = model.moe_layers()[0].router.expert_embeddings().detach()[:3]
    assert shares["refit"] >= shares["keep"] + 0.05, shares
    assert torch.equal(rows["keep"], rows["budget"])
    assert not torch.equal(rows["keep"], rows["refit"])
    remove_expert(tmp_path / "refit", tmp_path / "removed", NEW)
    old, removed = load_checkpoint(moe_dir)[0], load_checkpoint(tmp_path / "removed")[0]
    for name, tensor in old.state_dict().items():
        assert torch.equal(tensor, removed.state_dict()[name]), name
    for layer_old, layer_removed in zip(old.moe_layers(), removed.moe_layers(), strict=True):
        for field in ("centroids", "covariance", "counts", "center"):
            a = getattr(layer_old.domain_stats, field)
            assert torch.equal(a, getattr(layer_removed.domain_stats, field)), field


def test_fitted_row_norm_from_a_covariance_of_fewer_tokens_than_dimensions():
    """A real model calibrated on a few hundred tokens has a singular pooled covariance (more
    hidden dimensions than tokens), which float32 storage leaves slightly indefinite: the norm
    is still fitted, from the covariance shrunk as the rows' W is."""
    generator = torch.Generator().manual_seed(0)
    size, tokens = 256, 20
    xs = [
        torch.randn(tokens, size, generator=generator) + 4.0 * torch.eye(size)[i] for i in range(3)
    ]
    centroids = torch.stack([x.double().mean(0) for x in xs])
    covariance = sum(
        calibrate._covariance(x, c) * tokens for x, c in zip(xs, centroids, strict=True)
    ) / (3 * tokens)
    assert torch.linalg.matrix_rank(covariance) < size
    covariance = covariance.float().double()  # as stored with the checkpoint (float32)
    stats = calibrate.LayerStats(centroids, covariance, torch.full((3,), float(tokens)),
                                 centroids.mean(0), 1.0)  # fmt: skip
    rows = calibrate.router_rows(stats).double()
    new = torch.randn(tokens, size, generator=generator) + 4.0 * torch.eye(size)[3]
    row, _ = calibrate.new_expert_row(
        stats, new, rows, top_k=2, renormalize=True, leak_budget=calibrate.LEAK_BUDGET
    )
    assert torch.isfinite(row).all() and row.norm() > 0


# --------------------------------------------------------------------------------------------
# calibration from each dense expert alone, and from statistics files (docs/design.md §5.7)


def _router_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".router." in k}


def test_statistics_of_the_dense_experts_give_the_rows_of_the_assembled_moe(world):
    """upcycle measures each FFN-only expert alone; the rows and statistics equal those of
    calibrating the assembled MoE with each domain forced to its expert (the earlier path)."""
    dense_path, _ = load_checkpoint(_upcycled(world))
    raw = _nexus(world, world["root"] / "uncalibrated", calibrate_router=False)
    moe_path, _ = load_checkpoint(raw)
    calibrate.calibrate_model(moe_path, world["shards"], 512)
    for name, tensor in _router_state(moe_path).items():
        torch.testing.assert_close(_router_state(dense_path)[name], tensor, atol=1e-5, rtol=1e-5)
    for a, b in zip(moe_path.moe_layers(), dense_path.moe_layers(), strict=True):
        torch.testing.assert_close(a.domain_stats.centroids, b.domain_stats.centroids)
        torch.testing.assert_close(a.domain_stats.covariance, b.domain_stats.covariance)
        assert torch.equal(a.domain_stats.held, b.domain_stats.held)
        assert a.domain_stats.temperature == b.domain_stats.temperature


def test_calibrated_upcycle_straight_to_a_hugging_face_folder(world):
    from safetensors.torch import load_file

    native = load_checkpoint(_upcycled(world, "moe-ctx0", router_context=0.0))[0]
    out = world["root"] / "mixtral"
    _nexus(world, out, {"nexus_hidden_size": 8, "router_context": 0.0},
           calibration_shards=world["shards"], calibration_tokens=512, out_format="mixtral")  # fmt: skip
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    gates = sorted(k for k in tensors if k.endswith("block_sparse_moe.gate.weight"))
    assert len(gates) == len(native.moe_layers()) > 0
    for name, layer in zip(gates, native.moe_layers(), strict=True):
        rows = layer.router.expert_embeddings().detach()
        torch.testing.assert_close(tensors[name].float(), rows, atol=1e-6, rtol=1e-6)


def test_an_moe_from_statistics_files_without_any_corpus(world):
    """Each owner hands over an expert and its statistics file; the MoE is built with no
    corpus: with samples shared, the rows are those of --corpus bit for bit; without them
    (means and covariances only) the same directions at a temperature fitted on samples of
    those, still routing each domain to its expert."""
    from nexus_moe import domain_stats
    from nexus_moe.upcycle import _open_input

    files = {}
    for share in (True, False):
        for d in DOMAINS:
            source = _open_input(world["experts"][d])
            stats = domain_stats.measure(
                source.cfg,
                source.tensors,
                world["shards"],
                d,
                512,
                router_context=0.75,
                share_samples=share,
            )
            path = world["root"] / f"stats-{d}-{share}.safetensors"
            domain_stats.write(stats, path)
            files[d, share] = path
            assert domain_stats.read(path).shares_text is share
    reference = load_checkpoint(_upcycled(world))[0]
    for share in (True, False):
        given = [domain_stats.read(files[d, share]) for d in DOMAINS]
        out = _nexus(world, world["root"] / f"from-stats-{share}", domain_stats=given)
        for d, stats in zip(DOMAINS, given, strict=True):  # read, not consumed or summed into
            fresh = domain_stats.read(files[d, share])
            for m, f in zip(stats.moments, fresh.moments, strict=True):
                assert m.scatter is not None and torch.equal(m.scatter, f.scatter)
        model = load_checkpoint(out)[0]
        for a, b in zip(reference.moe_layers(), model.moe_layers(), strict=True):
            ra, rb = a.router.expert_embeddings().detach(), b.router.expert_embeddings().detach()
            if share:
                assert torch.equal(ra, rb)
                assert torch.equal(a.domain_stats.held, b.domain_stats.held)
            else:
                torch.testing.assert_close(
                    torch.nn.functional.normalize(ra, dim=-1),
                    torch.nn.functional.normalize(rb, dim=-1),
                )
                assert b.domain_stats.held is None  # no text: later extensions fall back
        if not share:
            share_of = _own_share(model, world["shards"], DOMAINS)
            assert min(share_of.values()) >= 0.6, share_of
    # Statistics of another expert, or for another router, are refused.
    mixed = [domain_stats.read(files[d, False]) for d in DOMAINS]
    mixed[0], mixed[1] = replace(mixed[0], domain=DOMAINS[1]), replace(mixed[1], domain=DOMAINS[0])
    for bad, words in [
        (mixed, "other weights"),
        ([replace(s, router_context=0.5) for s in mixed[2:]], "context 0.5"),
    ]:
        with pytest.raises(NexusError, match=words):
            _nexus(world, world["root"] / "refused", domain_stats=bad,
                   calibration_shards=world["shards"])  # fmt: skip
    assert not (world["root"] / "refused").exists()


def test_owners_hand_over_statistics_files_on_the_command_line(world):
    """domain-stats on each owner's machine, then upcycle --stats with no corpus; the output
    file follows the file rules (never an input)."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nexus_moe.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    root = world["root"] / "owners"
    root.mkdir()
    emb = root / "emb.safetensors"
    world["emb"].save(emb)
    files = []
    for d in DOMAINS:
        files.append(root / f"{d}.safetensors")
        done = cli("domain-stats", "--expert", world["experts"][d], "--corpus", world["corpus"],
                   "--out", files[-1], "--calibration-tokens", 512)  # fmt: skip
        assert done.returncode == 0, done.stderr
    weights = world["experts"][DOMAINS[0]] / "model.safetensors"
    before = weights.read_bytes()
    refused = cli("domain-stats", "--expert", world["experts"][DOMAINS[0]], "--corpus",
                  world["corpus"], "--out", weights)  # fmt: skip
    assert refused.returncode == 2 and "--out" in refused.stderr + refused.stdout
    assert weights.read_bytes() == before
    args = ["upcycle", "--method", "nexus", "--seed", world["seed"], "--out", root / "moe",
            "--embeddings", emb, "--set", "nexus_hidden_size=8"]  # fmt: skip
    for d, f in zip(DOMAINS, files, strict=True):
        args += ["--expert", world["experts"][d], "--stats", f]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    model = load_checkpoint(root / "moe")[0]
    share = _own_share(model, world["shards"], DOMAINS)
    assert min(share.values()) >= 0.6, share


def test_held_excess_bounds_the_windows_means_and_their_upper_bound():
    """The placement's limit: each earlier domain's mean rise over its held windows within its
    layer's share of the budgets, and (with a confidence) each domain's upper bound mean + z x
    standard error within the budgets themselves, so a rise that sits in a few windows counts
    for more than the same mean spread evenly."""
    even = torch.full((2, 16), 0.004, dtype=torch.float64)
    lumpy = torch.zeros(2, 16, dtype=torch.float64)
    lumpy[:, 0] = 0.064  # the same mean rise, all of it in one window
    worst, mean = 0.02, 0.01
    point = max(0.004 / math.log1p(worst * 0.5), 0.004 / math.log1p(mean * 0.5))
    for rises in (even, lumpy):  # without a confidence, only the means count
        assert placement.held_excess(rises, worst, mean, 0.0, share=0.5) == pytest.approx(point)
    assert placement.held_excess(even, worst, mean, 2.0) == pytest.approx(0.004 / math.log1p(mean))
    spread = float(lumpy[0].std()) / 4.0
    upper = (0.004 + 2.0 * spread) / math.log1p(mean)
    assert placement.held_excess(lumpy, worst, mean, 2.0) == pytest.approx(upper)
    assert upper > 1.0 > placement.held_excess(even, worst, mean, 2.0)
    # one domain over the worst budget fails even when the mean is within its own
    one = torch.tensor([[0.025] * 4, [0.0] * 4], dtype=torch.float64)
    assert placement.held_excess(one, worst, mean, 0.0) == pytest.approx(0.025 / math.log1p(worst))
    assert placement.held_excess(one, worst, mean, 0.0) > 1.0


def test_extend_from_a_statistics_file_without_the_text(world):
    """The new domain's owner hands over its expert and statistics file: the row is placed with
    the default bound on the earlier domains' loss, its direction from the dense expert."""
    from nexus_moe import domain_stats
    from nexus_moe.upcycle import _open_input

    moe_dir = _upcycled(world)
    source = _open_input(world["experts"][NEW])
    stats = domain_stats.measure(
        source.cfg, source.tensors, world["shards"], NEW, 512, router_context=0.75
    )
    out = world["root"] / "extended-from-stats"
    extend(moe_dir, world["experts"][NEW], out, domain_embeddings=world["emb"],
           calibration_stats=stats)  # fmt: skip
    model, meta = load_checkpoint(out)
    held = load_checkpoint(moe_dir)[0].moe_layers()[0].domain_stats.held
    rise = placement.held_losses(model, held) - placement.held_losses(
        load_checkpoint(moe_dir)[0], held
    )
    assert float(rise.max()) <= math.log1p(config.LOSS_BUDGET) + 1e-6, rise
    assert meta["extended_with"]["new_row"]["loss_budget"] == config.LOSS_BUDGET
    # the new domain gains as from its text (test_default_new_row_keeps_the_earlier_domains...)
    old = load_checkpoint(moe_dir)[0]
    before = evaluate_domains(old, world["shards"], [NEW], EVAL)[NEW].perplexity
    after = evaluate_domains(model, world["shards"], [NEW], EVAL)[NEW].perplexity
    assert after < 0.9 * before, (before, after)
    # the statistics of another domain, or with the text as well, are refused
    for kw, words in [
        (dict(calibration_stats=replace(stats, domain="x")), "domain 'x'"),
        (dict(calibration_stats=stats, calibration_shards=world["shards"]), "give one"),
    ]:
        with pytest.raises(NexusError, match=words):
            extend(moe_dir, world["experts"][NEW], world["root"] / "refused-extend",
                   domain_embeddings=world["emb"], **kw)  # fmt: skip
    # An MoE whose shared weights were trained on: the expert's statistics do not describe it.
    trained, meta = load_checkpoint(moe_dir)
    with torch.no_grad():
        trained.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    save_checkpoint(world["root"] / "moe-trained-shared", trained, metadata=meta)
    with pytest.raises(NexusError, match="q_proj.weight' is not the new expert's"):
        extend(world["root"] / "moe-trained-shared", world["experts"][NEW],
               world["root"] / "refused-extend", domain_embeddings=world["emb"],
               calibration_stats=stats)  # fmt: skip
    assert not (world["root"] / "refused-extend").exists()


def test_block_by_block_statistics_equal_those_of_the_whole_dense_model(world):
    from nexus_moe import domain_stats
    from nexus_moe.upcycle import _open_input

    source = _open_input(world["experts"][DOMAINS[1]])
    model, _ = load_checkpoint(world["experts"][DOMAINS[1]])
    windows = calibrate.domain_windows(world["shards"], DOMAINS[1], model.cfg.max_seq_len, 512)
    for blocks in (None, [0]):
        whole = domain_stats.dense_moments(model, windows, 0.75, blocks)
        streamed = domain_stats.streamed_moments(source.cfg, source.tensors, windows, 0.75, blocks)
        assert len(whole) == len(streamed) == (model.cfg.num_layers if blocks is None else 1)
        for a, b in zip(whole, streamed, strict=True):
            assert a.count == b.count
            assert torch.equal(a.mean, b.mean) and torch.equal(a.scatter, b.scatter)
            assert torch.equal(a.samples, b.samples)
