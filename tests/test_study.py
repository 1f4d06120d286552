"""`nexus-moe run`: the whole study on a tiny user corpus, and resuming it."""

import json

import pytest
import yaml

from nexus_moe.pipeline import load_recipe
from nexus_moe.study import Study

TEXTS = {
    "recipes": "Whisk {i} eggs with sugar, fold in flour and bake for {i} minutes at 180 degrees.",
    "sports": "The striker scored {i} goals as the home team won the league match {i} to nil.",
    "finance": "Shares rose {i} percent after the bank reported quarterly earnings of {i} million.",
    "music": "The orchestra tuned to A and played the symphony in {i} movements with a {i} bar coda.",
}


def tiny_recipe(tmp_path):
    data = tmp_path / "data"
    for domain, template in TEXTS.items():
        (data / domain).mkdir(parents=True)
        for i in range(40):
            text = " ".join(template.format(i=(i * 7 + j) % 97) for j in range(12))
            (data / domain / f"doc{i}.txt").write_text(text)
    train = {
        "batch_size": 4,
        "seq_len": 32,
        "lr": 3e-3,
        "eval_tokens": 512,
        "checkpoint_every": 0,
        "log_every": 5,
    }
    recipe = {
        "workdir": str(tmp_path / "run"),
        "device": "cpu",
        "corpus": {
            "domains": ["recipes", "sports", "finance"],
            "heldout": ["music"],
            "from_dir": str(data),
            "val_fraction": 0.1,
        },
        "tokenizer": {"vocab_size": 300},
        "model": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 64,
        },
        "seed_train": {**train, "steps": 12},
        "branch_train": {**train, "steps": 6},
        "embed": {"num_chunks": 4, "chunk_chars": 200},
        "moe": {
            "variants": [
                {"name": "nexus", "method": "nexus"},
                {"name": "moe-linear", "method": "moe-linear"},
                {"name": "btm", "method": "btm", "train": False},
            ],
            "overrides": {"nexus_hidden_size": 16},
            "train": {**train, "steps": 6},
        },
        "extend": {"budgets": [0, 256], "train": {**train, "steps": 1}},
        "evaluate": {"seq_len": 32, "batch_size": 4, "max_tokens": 512},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes(tmp_path):
    path = tiny_recipe(tmp_path)
    first = Study(load_recipe(path))
    results = first.run()
    assert "seed" in first.ran and "train:nexus:s0" in first.ran
    assert set(results["models"]) >= {"seed", "expert:recipes", "nexus", "moe-linear", "btm"}
    ext = results["extension"]
    assert set(ext) == {"nexus+music", "moe-linear+music"}
    assert set(ext["nexus+music"]) == {"0", "256"}
    share = ext["nexus+music"]["256"]["0"]["new_expert_share"]
    assert 0.0 <= share <= 1.0
    out = tmp_path / "run" / "results"
    report = (out / "results.md").read_text()
    assert "| nexus |" in report and "Extension with a held-out domain" in report
    assert (out / "routing-nexus.png").is_file()
    routing = json.loads((out / "routing-nexus.json").read_text())
    assert all(abs(sum(row) - 1) < 1e-9 for row in routing["mean"])

    again = Study(load_recipe(path))
    again.run()
    assert again.ran == []  # every stage was skipped
