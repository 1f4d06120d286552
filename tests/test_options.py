"""Generated option values and recipe fields thrown at the commands (property-based).

Whatever the values, a command either succeeds with a finite model (or finite scores) written
to its output, or exits with code 2 and one line naming an option it was given; in both cases
no file outside the output changes. The commands run in-process through the real entry point
on the small world of ``test_bad_input`` (its fixture ``w``); few examples keep this fast.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_bad_input import run, snapshot, w  # noqa: F401 -- w: the module's world fixture

from nexus_moe.config import OPTION_RANGES
from nexus_moe.recipe import load_recipe

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Numbers as a user types them: edge values, out-of-range values and special floats.
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.5, -1.0, 2.0, 1e-9, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-3.0, max_value=3.0, allow_nan=False),
)
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 16, 64, 10**9]), st.integers(-100, 5000))
# What a user may type that is no number at all (click refuses it, naming the option).
TEXT = st.sampled_from(["abc", "", "1,5", "0x10", "--"])


SEEN: set[tuple[str, int]] = set()  # (command, exit code) of every generated call


def _text(value: float | int | str) -> str:
    return repr(value) if isinstance(value, int) else str(value)


def _check(result, given_options: list[str], before: dict, out: Path) -> None:
    """Exit 0 with a finite output, or exit 2 with one line naming a given option; the inputs
    (``before``) unchanged either way."""
    assert "Traceback" not in result.err + result.out
    if result.code == 0:
        _assert_finite(out)
    else:
        assert result.code == 2, (result.code, result.err)
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.err
        assert any(option in lines[0] for option in given_options), (given_options, lines[0])
    for path, state in before.items():
        assert Path(path).is_file(), f"{path} was removed"
        assert snapshot(Path(path))[path] == state, f"{path} was changed"


def _assert_finite(out: Path) -> None:
    if out.suffix == ".json":
        values = []

        def walk(node):
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, float | int):
                values.append(float(node))

        walk(json.loads(out.read_text()))
        assert values and all(math.isfinite(v) for v in values)
        return
    for tensor in load_file(out / "model.safetensors").values():
        assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


@pytest.fixture(scope="module")
def moe1(w, tmp_path_factory):  # noqa: F811
    """The world's MoE without its beta expert, so that extending it with beta is valid."""
    out = tmp_path_factory.mktemp("moe1") / "moe"
    result = run("remove-expert", "--moe", w / "moe", "--domain", "beta", "--out", out)
    assert result.code == 0, result.err
    return out


@SETTINGS
@given(
    merge_weight=st.none() | FLOATS | TEXT,
    calibration_tokens=st.none() | INTS | TEXT,
    leak_budget=st.none() | FLOATS,
    row_scale=st.none() | FLOATS,
    refit=st.booleans(),
)
@example(merge_weight=None, calibration_tokens=None, leak_budget=None, row_scale=None, refit=False)
@example(merge_weight=0.25, calibration_tokens=64, leak_budget=0.0, row_scale=None, refit=False)
def test_extend_with_generated_options(
    w,  # noqa: F811
    moe1,
    merge_weight,
    calibration_tokens,
    leak_budget,
    row_scale,
    refit,
):
    before = snapshot(w, moe1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        options = {
            "--merge-weight": merge_weight,
            "--calibration-tokens": calibration_tokens,
            "--leak-budget": leak_budget,
            "--row-scale": row_scale,
        }
        args = [
            "extend", "--moe", moe1, "--expert", w / "experts" / "beta", "--embeddings",
            w / "emb", "--domain", "beta", "--out", out,
        ]  # fmt: skip
        given_options = [flag for flag, value in options.items() if value is not None]
        for flag in given_options:
            args += [flag, _text(options[flag])]
        if refit:
            args.append("--refit-rows")
            given_options.append("--refit-rows")
        result = run(*args)
        _check(result, given_options, before, out)
        SEEN.add(("extend", result.code))
        if result.code == 0:  # then every option given was in its range
            for flag in given_options:
                if flag == "--refit-rows":
                    continue
                name = flag[2:].replace("-", "_")
                value = options[flag]
                assert isinstance(value, str) or OPTION_RANGES[name].admits(value), (flag, value)


@SETTINGS
@given(
    seq_len=st.none() | INTS.filter(lambda n: n <= 64) | TEXT,
    max_tokens=st.none() | INTS.filter(lambda n: n <= 4096),
    batch_size=st.none() | INTS.filter(lambda n: n <= 64),
    corrupt=st.none() | FLOATS,
)
@example(seq_len=16, max_tokens=64, batch_size=2, corrupt=0.5)
def test_evaluate_with_generated_options(w, seq_len, max_tokens, batch_size, corrupt):  # noqa: F811
    before = snapshot(w)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.json"
        options = {
            "--seq-len": seq_len,
            "--max-tokens": max_tokens,
            "--batch-size": batch_size,
            "--corrupt": corrupt,
        }
        args = ["evaluate", w / "seed", "--corpus", w / "corpus", "--device", "cpu", "--json", out]
        given_options = [flag for flag, value in options.items() if value is not None]
        for flag in given_options:
            args += [flag, _text(options[flag])]
        result = run(*args)
        _check(result, given_options, before, out)
        SEEN.add(("evaluate", result.code))


# Recipe fields and the values a user may write for them; a recipe is checked whole at load,
# so a value out of its range is refused before any stage runs (nothing is created).
RECIPE_FIELDS = {
    ("study", "corrupt"): st.lists(FLOATS, min_size=1, max_size=2),
    ("extend", "budgets"): st.lists(INTS, min_size=1, max_size=2),
    ("extend", "leak_budget"): st.none() | FLOATS,
    ("model", "hidden_size"): INTS,
    ("moe", "overrides", "load_balance_weight"): FLOATS,
    ("tokenizer", "vocab_size"): INTS,
    ("seed_train", "steps"): INTS,
    ("evaluate", "seq_len"): INTS,
}


@SETTINGS
@given(data=st.data())
def test_recipes_with_generated_fields(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("recipe")
    path = data.draw(st.sampled_from(sorted(RECIPE_FIELDS)))
    value = data.draw(RECIPE_FIELDS[path])
    doc: dict = {"workdir": str(tmp / "wd"), "model": {"hidden_size": 32, "num_heads": 4}}
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(recipe)
        accepted = True
    except Exception as exc:  # noqa: BLE001 -- anything but NexusError fails below
        from nexus_moe.errors import NexusError

        assert isinstance(exc, NexusError), repr(exc)
        accepted = False
    if accepted:
        return  # (running the whole study here would take minutes; the stages check again)
    result = run("run", recipe)
    assert result.code == 2 and "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert path[-1] in lines[0], (path, lines[0])
    assert not (tmp / "wd").exists()  # refused before any stage ran


@pytest.mark.parametrize("name", sorted(OPTION_RANGES))
def test_every_declared_range_refuses_nan_and_names_the_option(name):
    from nexus_moe.config import check_option, option_label
    from nexus_moe.errors import NexusError

    with pytest.raises(NexusError, match=f"^{re.escape(option_label(name))}: nan"):
        check_option(name, math.nan)


MOE_FIELDS = [
    "top_k", "load_balance_weight", "z_loss_weight", "router_init_std", "moe_every",
    "expert_intermediate_size", "router_context",
]  # fmt: skip


@SETTINGS
@given(field=st.sampled_from(MOE_FIELDS), value=FLOATS | INTS | TEXT)
@example(field="load_balance_weight", value=0.01)
def test_upcycle_with_generated_moe_settings(w, field, value):  # noqa: F811
    before = snapshot(w)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "moe"
        args = [
            "upcycle", "--method", "moe-linear", "--seed", w / "seed", "--expert",
            w / "experts" / "alpha", "--expert", w / "experts" / "beta", "--out", out,
            "--set", f"{field}={_text(value)}",
        ]  # fmt: skip
        result = run(*args)
        _check(result, [field], before, out)
        SEEN.add(("upcycle", result.code))


def test_the_generated_calls_both_succeeded_and_failed():
    """The examples above reached both outcomes for each command (a property that only ever
    saw refusals would prove little). Runs after them, in file order."""
    if not SEEN:
        pytest.skip("the generated tests did not run in this session")
    both = {(command, code) for command, _ in SEEN for code in (0, 2)}  # commands that ran
    assert SEEN >= both, SEEN
