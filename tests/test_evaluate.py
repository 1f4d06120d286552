"""Scoring under routing overrides (oracle, random), on corrupted input, and the study's
statistics (paired t-intervals, steps to reach a loss)."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from nexus_moe.config import MoEConfig
from nexus_moe.evaluate import EvalConfig, corrupt_tokens, evaluate_domains, routing_override
from nexus_moe.model import Transformer
from nexus_moe.study import paired_interval, steps_to_reach, t_quantile_975


class ArrayShards:
    """The part of TokenShards that evaluate_domains reads, over in-memory token arrays."""

    def __init__(self, tokens: dict[str, np.ndarray]) -> None:
        self._tokens = tokens

    def tokens(self, domain, split):
        return self._tokens[domain]

    def num_tokens(self, domain, split):
        return len(self._tokens[domain])

    def num_bytes(self, domain, split):
        return 3 * len(self._tokens[domain])


def moe_model(top_k=1, num_experts=4, router="linear"):
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        shared_expert=top_k == 1,
        renormalize=top_k > 1,
        router=router,
        domains=["a", "b", "c", "d"][:num_experts],
        nexus_hidden_size=16,
        domain_embedding_dim=8,
    )
    torch.manual_seed(0)
    return Transformer(tiny_config(moe)).eval()


def shards(n=600):
    rng = np.random.default_rng(0)
    return ArrayShards({d: rng.integers(0, 128, n).astype(np.uint16) for d in "abcde"})


@pytest.mark.parametrize("router", ["linear", "ac"])
def test_oracle_routing_equals_masking_all_other_experts(router):
    model = moe_model(router=router)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad(), routing_override(model, "oracle", expert=2):
        forced = model(x)
    assert all(bool((info.top1 == 2).all()) for info in forced.routing)
    for layer in model.moe_layers():
        layer.expert_mask = torch.tensor([False, False, True, False])
    with torch.no_grad():
        masked = model(x)
    torch.testing.assert_close(forced.logits, masked.logits)
    for layer in model.moe_layers():
        layer.expert_mask = None
    with torch.no_grad():  # the hooks are gone after the block
        assert not torch.equal(model(x).logits, forced.logits)


def test_oracle_scores_each_domain_with_its_own_expert_and_skips_the_others():
    model = moe_model()
    cfg = EvalConfig(seq_len=16, batch_size=4, max_tokens=256)
    seen = []
    scores = evaluate_domains(
        model,
        shards(),
        ["a", "c", "e"],
        cfg,
        routing="oracle",
        on_routing=lambda d, routing: seen.append((d, {int(r.top1.unique()) for r in routing})),
    )
    assert set(scores) == {"a", "c", "mean"}  # "e" has no expert
    assert {d: e for d, e in seen} == {0: {0}, 1: {2}}
    for d in "ac":
        for layer in model.moe_layers():
            layer.expert_mask = torch.arange(4) == "abcd".index(d)
        alone = evaluate_domains(model, shards(), [d], cfg)
        assert alone[d].loss == pytest.approx(scores[d].loss, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_random_routing_is_uniform_distinct_and_seeded(top_k):
    model = moe_model(top_k=top_k)
    x = torch.randint(0, 128, (8, 64))

    def route(seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad(), routing_override(model, "random", generator=gen):
            out = model(x)
        return out.routing

    first = route(1)
    for info in first:
        probs = info.probs
        share = (probs > 0).double().mean(0) / top_k  # each expert's share of the picks
        assert share.min() > 0.18 and share.max() < 0.32  # 512 tokens, uniform: 0.25
        assert torch.allclose((probs > 0).sum(-1), torch.tensor(top_k))  # k distinct experts
        assert torch.allclose(probs[probs > 0], torch.tensor(1.0 / top_k))
    assert all(torch.equal(a.top1, b.top1) for a, b in zip(first, route(1), strict=True))
    assert not torch.equal(first[0].top1, route(2)[0].top1)


def test_corrupt_tokens_replaces_the_given_share_and_leaves_targets_clean():
    inputs = torch.randint(0, 1000, (64, 128))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(corrupt_tokens(inputs, 0.0, 1000, gen), inputs)
    out = corrupt_tokens(inputs, 0.3, 1000, gen)
    changed = (out != inputs).double().mean().item()
    assert changed == pytest.approx(0.3 * (1 - 1 / 1000), abs=0.02)
    assert int(out.max()) < 1000 and int(out.min()) >= 0
    with pytest.raises(ValueError):
        corrupt_tokens(inputs, 1.5, 1000, gen)

    # evaluate_domains: the same seed gives the same corrupted score, which differs from the clean
    # one; every target is still scored.
    model = moe_model()
    cfg = EvalConfig(seq_len=16, batch_size=4, max_tokens=256)
    clean = evaluate_domains(model, shards(), ["a"], cfg)
    noisy = evaluate_domains(model, shards(), ["a"], cfg, corrupt=0.3, seed=5)
    again = evaluate_domains(model, shards(), ["a"], cfg, corrupt=0.3, seed=5)
    assert noisy["a"].loss == again["a"].loss != clean["a"].loss
    assert noisy["a"].tokens == clean["a"].tokens == 256


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 40), 60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1.5e-3)


def test_paired_interval_calls_a_win_only_when_it_excludes_zero():
    win = paired_interval([0.05, 0.06, 0.055])
    assert win["verdict"] == "win" and win["low"] > 0
    half = t_quantile_975(2) * np.std([0.05, 0.06, 0.055], ddof=1) / math.sqrt(3)
    assert win["high"] - win["mean"] == pytest.approx(half)
    assert paired_interval([0.05, -0.04, 0.01])["verdict"] == "no difference"
    assert paired_interval([-0.02, -0.03, -0.025])["verdict"] == "loss"
    one = paired_interval([0.2])
    assert one["low"] is None and "one seed" in one["verdict"]


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [[0, 5.0], [10, 4.0], [20, 3.0], [30, 2.9]]
    assert steps_to_reach(curve, 3.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 5.0) == 0.0
    assert steps_to_reach(curve, 2.9) == pytest.approx(30.0)
    assert steps_to_reach(curve, 2.0) is None
