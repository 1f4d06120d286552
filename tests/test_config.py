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
