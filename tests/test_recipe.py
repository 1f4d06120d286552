"""A recipe is checked whole when it is loaded: a typo fails in seconds, before any stage runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nexus_moe.config import Method
from nexus_moe.errors import NexusError
from nexus_moe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, **changes) -> Path:
    """configs/tiny.yaml with top-level sections replaced or edited by ``changes``."""
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["workdir"] = str(tmp_path / "run")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


VARIANTS = [{"name": "nexus", "method": "nexus"}, {"name": "moe-linear", "method": "moe-linear"}]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"moe__variants": [{"name": "n", "method": "nexsu"}]},
            r"moe\.variants\[0\]\.method: 'nexsu' is not one of: sparse-upcycle, btm",
        ),
        (
            {"moe__variants": [{"name": "n", "method": "nexus", "moe": {"routr": "ac"}}]},
            r"unknown key 'moe\.variants\[0\] \(n\)\.moe\.routr'; allowed MoE settings: .*router",
        ),
        (
            {"moe__overrides": {"router": "acc"}},
            r"moe\.variants\[0\] \(nexus\): moe\.router: 'acc' is not one of: linear, nexus, ac",
        ),
        ({"moe__overrides": {"top_kk": 2}}, r"unknown key 'moe\.overrides\.top_kk'"),
        ({"moe__overrides": {"top_k": 9}}, r"\(nexus\): moe\.top_k=9 must be between 1 and"),
        ({"moe__overrides": {"num_experts": 3}}, r"moe\.num_experts is set by upcycling"),
        (
            {"moe__variants": [{"name": "b", "method": "btm", "moe": {"top_k": 2}}]},
            r"moe\.variants\[0\] \(b\)\.moe: btm produces a dense model",
        ),
        (
            {"moe__variants": [VARIANTS[0], VARIANTS[0]]},
            r"moe\.variants\[1\] \(nexus\): name used by more than one variant",
        ),
        (
            {"corpus__domains": ["code", "legl"]},
            r"corpus: domains: unknown domain\(s\) legl for the package sources",
        ),
        ({"corpus__heldout": ["math", "code"]}, r"corpus\.heldout: code also in corpus\.domains"),
        ({"corpus__domains": []}, r"corpus\.domains: empty"),
        (
            {"extend__domains": ["maths"]},
            r"extend\.domains: maths not in corpus\.heldout \(math, locales\)",
        ),
        (
            {"extend__leak_budget": 1.5},
            r"extend\.leak_budget: 1\.5 is not a finite number in \[0, 1\)",
        ),
        (
            {"extend__train_only": {"btx": ["mlp.experts"]}},
            r"extend\.train_only: 'btx' is not one of extend\.variants \(nexus, moe-linear\)",
        ),
        (
            {"extend__train_only": {"nexus": "mlp.experts"}},
            r"extend\.train_only\.nexus: expected a list, got str",
        ),
        (
            {"moe__variants": [{"name": "nexus", "method": "nexus", "train_only": [""]}]},
            r"moe\.variants\[0\] \(nexus\)\.train_only: an empty pattern would name every",
        ),
        (
            {"extend__train_only": {"nexus": [""]}},
            r"extend\.train_only\.nexus: an empty pattern would name every parameter",
        ),
        (
            {"extend__variants": ["nexus", "btx"]},
            r"extend\.variants: 'btx' is not a trained MoE variant .*\(those are: nexus, moe-linear\)",
        ),
        ({"device": "gpu"}, r"device: 'gpu' is not one of: auto, cpu, cuda"),
        ({"device": "cuda:x"}, r"device: 'cuda:x' is not one of: auto, cpu, cuda or cuda:N"),
        (
            {"moe__overrides": {"router_context": 1.5}},
            r"\(nexus\): .*moe\.router_context: 1\.5 is not a finite number in \[0, 1\]",
        ),
        (
            {"seed_train__seq_len": 100000},
            r"seed_train\.seq_len=100000 exceeds model\.max_seq_len=",
        ),
        (
            {"study__reference": "nexsu"},
            r"study\.reference: 'nexsu' is not a variant; choose one of: nexus, moe-linear, btm",
        ),
        (
            {"moe__variants": [{**VARIANTS[0], "experts": "fnn"}, VARIANTS[1]]},
            r"moe\.variants 'nexus': experts 'fnn' is not an expert set; choose one of: default",
        ),
        (
            {"expert_sets": {"default": {"steps": 3}}},
            r"expert_sets\.default: 'default' is the set branch_train makes",
        ),
        ({"expert_sets": {"ffn": {"stpes": 3}}}, r"expert_sets\.ffn.*stpes"),
    ],
)
def test_bad_recipe_fails_at_load_naming_the_field(tmp_path, changes, message):
    path = _recipe(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(NexusError, match=message) as info:
        load_recipe(path)
    assert time.perf_counter() - start < 5.0
    assert str(info.value).startswith(f"{path}: ")
    assert not (tmp_path / "run").exists()


def test_plug_in_and_paper_variants_load(tmp_path):
    variants = [
        {"name": "nexus", "method": "nexus", "moe": {"router_context": 0.25}},
        {"name": "paper", "method": "nexus-paper"},
        {"name": "moe-linear", "method": "moe-linear"},
    ]
    recipe = load_recipe(_recipe(tmp_path, moe__variants=variants, device="cuda:1"))
    methods = [v.method for v in recipe.moe.variants]
    assert methods == [Method.nexus, Method.nexus_paper, Method.moe_linear]
    assert [m.calibrates_by_default for m in methods] == [True, False, False]
    assert recipe.moe.variants[0].moe == {"router_context": 0.25}
    assert recipe.device == "cuda:1"
    assert Method.btm.is_dense_merge and not Method.nexus_paper.is_dense_merge


def test_user_corpus_folders_are_checked(tmp_path):
    data = tmp_path / "data"
    for domain in ("recipes", "sports"):
        (data / domain).mkdir(parents=True)
    corpus = {"domains": ["recipes", "sprots"], "heldout": [], "from_dir": str(data)}
    with pytest.raises(NexusError, match=r"no sub-folder for domain\(s\) sprots"):
        load_recipe(_recipe(tmp_path, corpus=corpus))
    corpus["domains"] = ["recipes", "sports"]
    recipe = load_recipe(_recipe(tmp_path, corpus=corpus, extend__domains=[]))
    assert recipe.corpus.domains == ["recipes", "sports"]


def test_without_moe_variants_extension_is_not_checked(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, moe__variants=[]))
    assert recipe.moe.variants == [] and recipe.extend.variants == ["nexus", "moe-linear"]


def test_run_refuses_a_bad_recipe_before_any_stage(tmp_path):
    """`nexus-moe run` exits 2 with one line, and writes nothing."""
    path = _recipe(tmp_path, moe__variants=[{"name": "n", "method": "nexsu"}])
    result = subprocess.run(
        [sys.executable, "-m", "nexus_moe.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'nexsu' is not one of" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_defaults_have_one_home():
    """A recipe, the CLI and the library functions share each default."""
    import inspect

    from typer.main import get_command

    from nexus_moe import corpus, embed, tokenizer
    from nexus_moe.cli import app
    from nexus_moe.config import EmbedConfig, EvalConfig
    from nexus_moe.recipe import Recipe

    recipe = Recipe()
    build = inspect.signature(corpus.build_corpus).parameters
    assert recipe.corpus.max_mb_per_domain == build["max_mb_per_domain"].default
    assert recipe.corpus.val_fraction == build["val_fraction"].default
    assert recipe.corpus.domains + recipe.corpus.heldout == corpus.DEFAULT_DOMAINS
    assert recipe.evaluate == EvalConfig() and recipe.embed == EmbedConfig()
    embed_defaults = inspect.signature(embed.embed_domains).parameters
    assert embed_defaults["num_chunks"].default == recipe.embed.num_chunks
    vocab = inspect.signature(tokenizer.train_tokenizer).parameters["vocab_size"].default
    assert vocab == recipe.tokenizer.vocab_size == recipe.model.vocab_size

    commands = get_command(app).commands  # type: ignore[attr-defined]
    params = {p.name: p for p in commands["evaluate"].params}
    options = {name: p.default for name, p in params.items()}
    assert options["batch_size"] == EvalConfig.batch_size
    # --seq-len unset: EvalConfig's window, capped by the model's max_seq_len (known only later)
    assert options["seq_len"] is None
    assert f"default: {EvalConfig.seq_len}," in (params["seq_len"].help or "")
    assert options["max_tokens"] == EvalConfig.max_tokens
    options = {p.name: p.default for p in commands["corpus"].commands["build"].params}
    assert options["max_mb"] == recipe.corpus.max_mb_per_domain
    options = {p.name: p.default for p in commands["embed-domains"].params}
    assert options["num_chunks"] == recipe.embed.num_chunks


def test_a_variant_may_train_only_some_parameters(tmp_path):
    """`moe.variants[i].train_only` reaches that variant's MoE training config (and only its)."""
    from nexus_moe.study import Study

    variants = [
        {"name": "nexus", "method": "nexus", "train_only": ["mlp.experts", "router"]},
        {"name": "moe-linear", "method": "moe-linear"},
    ]
    recipe = load_recipe(_recipe(tmp_path, moe__variants=variants))
    study = Study(recipe)
    nexus, linear = recipe.moe.variants
    assert study.moe_train_config(nexus, 0, 4).train_only == ["mlp.experts", "router"]
    assert study.moe_train_config(linear, 0, 4).train_only == list(recipe.moe.train.train_only)
    assert not (tmp_path / "run").exists()
