from pathlib import Path

import pytest

from nexus_moe.config import ModelConfig, MoEConfig, from_dict
from nexus_moe.errors import NexusError
from nexus_moe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_is_named():
    with pytest.raises(NexusError, match="unknown key 'moe.topk'"):
        from_dict(ModelConfig, {"moe": {"topk": 2}})


def test_wrong_type_is_named():
    with pytest.raises(NexusError, match="hidden_size: expected an integer"):
        from_dict(ModelConfig, {"hidden_size": "big"})
    with pytest.raises(NexusError, match="moe.router: 'mlp' is not one of"):
        from_dict(ModelConfig, {"moe": {"router": "mlp"}})


def test_invalid_values_rejected():
    with pytest.raises(NexusError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(NexusError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)


def test_recipe_unknown_key_names_file_and_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("seed_train:\n  stepz: 3\n")
    with pytest.raises(NexusError, match=r"r.yaml: unknown key 'seed_train.stepz'"):
        load_recipe(bad)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    load_recipe(recipe)


def test_every_method_has_one_row_of_rules():
    """The method rules are one table (config.METHOD_RULES) that upcycle and the study read."""
    from nexus_moe.config import METHOD_RULES, Method
    from nexus_moe.upcycle import method_defaults, moe_config

    assert set(METHOD_RULES) == set(Method)
    routed = {m for m in Method if m.rules.routes_domains}
    assert routed == set(Method) - {Method.btm, Method.sparse_upcycle}
    assert [m for m in Method if m.calibrates_by_default] == [Method.nexus]
    assert [m for m in Method if m.rules.seed_expert] == [Method.btx]
    for method in Method:
        defaults = method_defaults(method)
        assert defaults == method.rules.moe_defaults and defaults is not method.rules.moe_defaults
        assert bool(defaults) == method.is_moe
        if method.is_moe:  # the config upcycling builds carries the row's settings
            moe = moe_config(method, ModelConfig(), 4, ["a", "b", "c", "d"], None).moe
            assert all(getattr(moe, k) == v for k, v in defaults.items()), method
