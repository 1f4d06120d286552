"""`nexus-moe run`: the whole study on a tiny user corpus, and resuming it."""

import json

import pytest
import torch
import yaml

from nexus_moe.recipe import load_recipe
from nexus_moe.study import Study

TEXTS = {
    "recipes": "Whisk {i} eggs with sugar, fold in flour and bake for {i} minutes at 180 degrees.",
    "sports": "The striker scored {i} goals as the home team won the league match {i} to nil.",
    "finance": "Shares rose {i} percent after the bank reported quarterly earnings of {i} million.",
    "music": "The orchestra tuned to A and played the symphony in {i} movements with a {i} bar coda.",
    "weather": "Rain is expected on day {i} with winds of {i} km/h and a high of {i} degrees.",
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
            "heldout": ["music", "weather"],
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
            "tie_embeddings": True,
        },
        "seed_train": {**train, "steps": 12},
        "branch_train": {**train, "steps": 6},
        "expert_sets": {"ffn": {"freeze": ["embed_tokens", "self_attn", "norm"]}},
        "embed": {"num_chunks": 4, "chunk_chars": 200},
        "seeds": [0, 1],
        "moe": {
            "variants": [
                {"name": "nexus", "method": "nexus"},
                {"name": "moe-linear", "method": "moe-linear"},
                {"name": "ac-linear", "method": "moe-linear", "moe": {"router": "ac"}},
                {"name": "sparse-matched", "method": "sparse-upcycle", "compute_matched": True},
                {"name": "nexus-ffn", "method": "nexus", "experts": "ffn"},
                {"name": "btm", "method": "btm", "train": False},
            ],
            "overrides": {"nexus_hidden_size": 16},
            "train": {**train, "steps": 6, "eval_every": 2},
        },
        "extend": {
            "variants": ["nexus", "moe-linear", "nexus-ffn"],
            "budgets": [256],
            "append_linear_baseline": True,
            "earlier_tokens": 256,
            "train": {**train, "steps": 1},
        },
        "evaluate": {"seq_len": 32, "batch_size": 4, "max_tokens": 512},
        "study": {"corrupt": [0.1, 0.3], "bounds_tokens": 256},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_study_runs_end_to_end_with_bounds_statistics_and_resumes(tmp_path, monkeypatch):
    path = tiny_recipe(tmp_path)
    first = Study(load_recipe(path))
    results = first.run()
    assert "seed" in first.ran and "train:nexus:s0" in first.ran and "train:nexus:s1" in first.ran
    assert "branch[ffn]:recipes" in first.ran and "branch[ffn]:music" in first.ran
    domains = ["recipes", "sports", "finance"]
    models = results["models"]
    assert set(models) >= {"seed", "expert:recipes", "expert[ffn]:sports", "expert:music"}
    assert set(models) >= {"nexus", "moe-linear", "ac-linear", "sparse-matched", "btm"}

    # The FFN-only experts changed only their FFNs.
    from nexus_moe.checkpoint import load_checkpoint

    seed, _ = load_checkpoint(tmp_path / "run" / "seed" / "model")
    ffn, _ = load_checkpoint(tmp_path / "run" / "experts-ffn" / "recipes" / "model")
    seed_w, ffn_w = seed.state_dict(), ffn.state_dict()
    assert all(torch.equal(seed_w[k], v) for k, v in ffn_w.items() if ".mlp." not in k)
    assert any(not torch.equal(seed_w[k], v) for k, v in ffn_w.items() if ".mlp." in k)

    # Compute matching: 3 experts x 6 branch steps of the same batch shape, plus the 6 steps.
    assert results["variants"]["sparse-matched"]["train_tokens"] == (3 * 6 + 6) * 4 * 32
    assert results["variants"]["nexus"]["train_tokens"] == 6 * 4 * 32
    assert results["curves"]["sparse-matched"]["0"][-1][0] == 24

    # Step 0, oracle, random and corrupted scores per MoE and seed.
    for name in ("nexus", "moe-linear", "ac-linear", "sparse-matched", "nexus-ffn"):
        assert set(results["step0"][name]) == {"0", "1"}
        assert set(results["random"][name]["0"]) == {*domains, "mean"}
        assert results["random"][name]["0"]["recipes"]["tokens"] == 256
        for share in ("0.1", "0.3"):
            entry = results["corrupted"][name][share]["1"]
            assert entry["scores"]["mean"]["loss"] != entry["clean_loss"]
    assert results["step0"]["nexus"]["1"]["sports"]["tokens"] == 256  # study.bounds_tokens
    assert set(models["ac-linear"]["0"]) == {*domains, "mean"}  # not extended: no held-out
    assert "music" in models["nexus"]["0"]
    assert set(results["oracle_step0"]["nexus-ffn"]["0"]) == {*domains, "mean"}
    assert "sparse-matched" not in results["oracle"]  # its experts belong to no domain
    assert set(results["oracle"]["nexus"]["1"]) == {*domains, "mean"}
    assert "btm" not in results["step0"] and "btm" in results["corrupted"]
    share = results["routing_share"]
    assert 0 <= share["step0"]["nexus"]["0"]["sports"] <= 1
    assert set(share["trained"]["moe-linear"]["1"]) == {*domains, "music", "weather"}

    # Validation curves: step 0 plus every eval_every steps up to the end.
    assert [p[0] for p in results["curves"]["nexus"]["0"]] == [0, 2, 4, 6]
    conv = results["convergence"]
    assert set(conv["variants"]) == {"nexus", "moe-linear", "ac-linear"}
    worst = max(results["curves"][n]["0"][-1][1] for n in conv["variants"])
    assert conv["target"]["0"] == worst
    assert all(conv["steps"][n]["0"] is not None for n in conv["variants"])

    # Paired differences: per seed, (baseline - nexus) / baseline of the mean perplexity.
    paired = results["paired"]["upcycling"]
    lin = paired["trained"]["moe-linear"]
    mean_ppl = {
        n: {s: sum(models[n][s][d]["perplexity"] for d in domains) / 3 for s in ("0", "1")}
        for n in ("nexus", "moe-linear")
    }
    expected = [(mean_ppl["moe-linear"][s] - mean_ppl["nexus"][s]) / mean_ppl["moe-linear"][s]
                for s in ("0", "1")]  # fmt: skip
    assert lin["values"] == pytest.approx(expected) and lin["n"] == 2
    assert lin["low"] <= lin["mean"] <= lin["high"]
    assert set(paired["step0"]) >= {"moe-linear", "ac-linear", "sparse-matched"}
    assert "btm" in paired["trained"]

    # Extension: each held-out domain separately, budget 0 always scored, both seeds.
    ext = results["extension"]
    extended = ("nexus", "moe-linear", "moe-linear (appended row)", "nexus-ffn")
    assert set(ext) == {f"{n}+{d}" for n in extended for d in ("music", "weather")}
    assert results["extension_models"]["moe-linear (appended row)"] == "moe-linear"
    # Gap recovered and earlier-domain change against the same seed's MoE before extension.
    import math

    summary = results["extension_summary"]["nexus+music"]["0"]["1"]
    before, dense = models["nexus"]["1"], models["expert:music"]["0"]["music"]["perplexity"]
    after = ext["nexus+music"]["0"]["1"]["scores"]
    # The new domain on evaluate.max_tokens; the earlier domains on extend.earlier_tokens, and
    # so the MoE before extension that their change is measured against.
    assert after["music"]["tokens"] == 512 and after["sports"]["tokens"] == 256
    earlier_before = results["extension_before"]["nexus"]["1"]
    assert earlier_before["sports"]["tokens"] == 256
    expected_gap = (math.log(before["music"]["perplexity"]) - math.log(after["music"]["perplexity"])
                    ) / (math.log(before["music"]["perplexity"]) - math.log(dense))  # fmt: skip
    assert summary["gap_recovered"] == pytest.approx(expected_gap)
    mean = {
        m: sum(x[d]["perplexity"] for d in domains) / 3
        for m, x in (("b", earlier_before), ("a", after))
    }
    assert summary["earlier_change"] == pytest.approx(mean["a"] / mean["b"] - 1)
    # The probes' bounds are scored on the probes' tokens.
    probed = results["bounds_models"]
    assert probed["expert[ffn]:sports"]["0"]["sports"]["tokens"] == 256
    assert probed["seed"]["0"]["finance"]["tokens"] == 256
    assert probed["nexus"]["1"]["recipes"]["tokens"] == 256
    assert set(ext["nexus+weather"]) == {"0", "256"}
    assert set(ext["moe-linear+music"]["0"]) == {"0", "1"}
    assert 0.0 <= ext["nexus+music"]["256"]["1"]["new_expert_share"] <= 1.0
    # One routing report over the earlier domains and the new one, scored on different tokens.
    routing = json.loads(
        (tmp_path / "run" / "results" / "routing-nexus+music-ft0.json").read_text()
    )
    assert routing["domains"] == [*domains, "music"]
    assert routing["tokens"]["music"] == 512 and routing["tokens"]["sports"] == 256
    assert sum(routing["load"].values()) == pytest.approx(1.0)
    assert routing["accuracy"]["music"] == ext["nexus+music"]["0"]["0"]["new_expert_share"]
    ext_paired = results["paired"]["extension"]["weather"]["256"]["moe-linear"]
    assert ext_paired["new"]["n"] == 2 and "verdict" in ext_paired["earlier"]
    # The seed reaches extend: the re-initialised linear router differs between seeds.
    from safetensors.torch import load_file

    routers = [
        load_file(
            tmp_path
            / "run"
            / f"s{s}"
            / "extend"
            / "moe-linear-music"
            / "extended"
            / "model.safetensors"
        )  # fmt: skip
        for s in (0, 1)
    ]
    key = next(k for k in routers[0] if ".router." in k)
    assert not torch.equal(routers[0][key], routers[1][key])
    # The appended-row baseline keeps the trained router's rows and adds one.
    run = tmp_path / "run" / "s0"
    trained = load_file(run / "moe" / "moe-linear" / "trained" / "model" / "model.safetensors")
    appended = load_file(
        run / "extend" / "moe-linear-append-music" / "extended" / "model.safetensors"
    )
    assert appended[key].shape[0] == trained[key].shape[0] + 1
    assert torch.equal(appended[key][: trained[key].shape[0]], trained[key])

    timings = results["timings"]
    assert timings["by_kind"]["seed"] > 0 and timings["wall_s"] > 0
    ran = sum(timings["stages"][name] for name in timings["ran_now"])
    # Every figure is rounded to 1 ms, each within 0.5 ms of its exact value: the stages run
    # now, evaluation, the rest and the wall. Their exact values add up, so the rounded ones
    # differ by at most 0.5 ms per figure (plus float error), however many stages ran.
    rounded = len(timings["ran_now"]) + 3
    assert ran + timings["evaluate_s"] + timings["other_s"] == pytest.approx(
        timings["wall_s"], abs=0.0005 * rounded + 1e-9
    )
    assert set(timings["by_kind"]) >= {"corpus", "branch", "upcycle", "train", "extend"}

    out = tmp_path / "run" / "results"
    report = (out / "results.md").read_text()
    for heading in (
        "| nexus |",
        "| dense experts (own domain) |",
        "| dense experts [ffn] (own domain) |",
        "| nexus (step 0) |",
        "| nexus (oracle routing) |",
        "| moe-linear (step 0, oracle routing) |",
        "| moe-linear (random routing) |",
        "## Paired differences: nexus vs each baseline",
        "## Robustness to corrupted input",
        "## Convergence",
        "## Routing share",
        "Extension with a held-out domain",
        "| nexus before extension |",
        "| dense expert expert:music |",
        "| moe-linear (appended row)+weather | 256 |",
        "gap recovered | earlier domains change |",
        "Validation tokens per domain: new domain 512, earlier domains 256",
        "worst domain vs dense |",
        "## Wall time",
    ):
        assert heading in report, heading
    assert (out / "loss-curves.png").stat().st_size > 1000
    saved = json.loads((out / "scores.json").read_text())
    assert saved["step0"]["nexus"]["1"] == results["step0"]["nexus"]["1"]
    assert saved["paired"]["upcycling"]["trained"]["moe-linear"]["values"] == lin["values"]
    assert (out / "routing-nexus.png").is_file()
    routing = json.loads((out / "routing-nexus.json").read_text())
    assert all(abs(sum(row) - 1) < 1e-9 for row in routing["mean"])

    again = Study(load_recipe(path))
    second = again.run()
    assert again.ran == []  # every stage was skipped
    assert second["paired"] == results["paired"]
    assert second["timings"]["by_kind"]["seed"] == timings["by_kind"]["seed"]  # from stage.json
    # The whole study's time: exact on the first run, a lower bound once evaluations are cached.
    assert timings["evaluations_cached"] == 0
    assert timings["study_s"] == pytest.approx(
        timings["stages_total_s"] + timings["evaluate_s"] + timings["other_s"], abs=0.005
    )
    assert second["timings"]["evaluations_cached"] > 0
    assert "whole study: every stage" in (tmp_path / "run" / "results" / "results.md").read_text()

    # Code defaults are inputs too. Another default norm for a calibrated new row (nexus
    # routes on context 0.75, which takes NEW_ROW_SCALE) redoes the nexus extensions only.
    monkeypatch.setattr("nexus_moe.config.NEW_ROW_SCALE", 0.8)
    third = Study(load_recipe(path))
    third.run()
    assert {"extend:nexus-music:s0", "extend:nexus-ffn-weather:s1"} <= set(third.ran)
    assert not [n for n in third.ran if not n.startswith(("extend:nexus", "finetune:nexus"))]
    # Another MoE default of the nexus method redoes its MoEs (and what is built on them).
    import nexus_moe.upcycle

    method_defaults = nexus_moe.upcycle.method_defaults

    def changed(method):
        defaults = method_defaults(method)
        return {**defaults, "router_context": 0.5} if method == "nexus" else defaults

    monkeypatch.setattr(nexus_moe.upcycle, "method_defaults", changed)
    fourth = Study(load_recipe(path))
    fourth.run()
    assert {"upcycle:nexus:s0", "upcycle:nexus-ffn:s1", "extend:nexus-music:s0"} <= set(fourth.ran)
    assert not [n for n in fourth.ran if "linear" in n or "sparse" in n or n.startswith("branch")]
    nexus_cfg = json.loads((tmp_path / "run/s0/moe/nexus/upcycled/config.json").read_text())
    assert nexus_cfg["model"]["moe"]["router_context"] == 0.5


# -- the report on a small hand-made results object (no study run) ------------------------------
def _scores(ppl: dict[str, float], tokens: int = 100):
    import math

    out = {d: {"loss": math.log(p), "perplexity": p, "bits_per_byte": 1.0, "tokens": tokens}
           for d, p in ppl.items()}  # fmt: skip
    losses = [s["loss"] for s in out.values()]
    out["mean"] = {"loss": sum(losses) / len(losses), "perplexity": 0.0, "bits_per_byte": 1.0,
                   "tokens": tokens * len(losses)}  # fmt: skip
    return out


def hand_made_results():
    from nexus_moe.study.results import Results

    info = {"experts": "default", "router": None, "train_tokens": 1000}
    results = Results(domains=["a", "b"], heldout=["c"])
    results.variants = {
        "nexus": {**info, "method": "nexus", "router": "nexus"},
        "moe-linear": {**info, "method": "moe-linear", "router": "linear"},
    }
    results.models = {
        "seed": {"0": _scores({"a": 20.0, "b": 30.0, "c": 40.0})},
        "expert:a": {"0": _scores({"a": 10.0})},
        "expert:b": {"0": _scores({"b": 20.0})},
        "expert:c": {"0": _scores({"c": 8.0})},
        "nexus": {"0": _scores({"a": 11.0, "b": 22.0, "c": 30.0}),
                  "1": _scores({"a": 12.0, "b": 21.0, "c": 31.0})},
        "moe-linear": {"0": _scores({"a": 12.0, "b": 24.0}), "1": _scores({"a": 13.0, "b": 23.0})},
    }  # fmt: skip
    results.step0 = {"nexus": {"0": _scores({"a": 14.0, "b": 26.0}, 50)}}
    results.oracle = {"nexus": {"0": _scores({"a": 10.5, "b": 21.0}, 50)}}
    results.random = {"nexus": {"0": _scores({"a": 15.0, "b": 28.0}, 50)}}
    results.routing_share["trained"] = {"nexus": {"0": {"a": 0.9, "b": 0.8}}}
    results.curves = {
        "nexus": {"0": [[0, 3.0], [2, 2.5], [4, 2.0]]},
        "moe-linear": {"0": [[0, 3.0], [2, 2.8], [4, 2.4]]},
    }
    results.corrupted = {
        "nexus": {"0.1": {"0": {"scores": _scores({"a": 12.0, "b": 23.0}), "clean_loss": 2.0}}}
    }
    results.extension = {
        "nexus+c": {"0": {"0": {"scores": _scores({"a": 11.5, "b": 22.5, "c": 16.0}),
                                "new_expert_share": 0.75}}}
    }  # fmt: skip
    results.extension_models = {"nexus": "nexus"}
    results.timings = {"by_kind": {"seed": 1.25, "train": 2.5}, "evaluate_s": 0.5,
                       "other_s": 0.25, "wall_s": 4.5, "study_s": 4.5}  # fmt: skip
    return results


def test_report_of_a_hand_made_results_object_has_its_figures_and_is_deterministic(tmp_path):
    from nexus_moe.study.report import REPORT_HEADER, results_markdown, write_report
    from nexus_moe.study.results import load_scores

    results = hand_made_results()
    text = results_markdown(results)
    assert text == results_markdown(results)
    lines = text.splitlines()
    # Means over seeds with their sd, and the bounds: dense experts (10, 20) mean 15.
    assert "| seed | 20.00 | 30.00 | 25.00 | - | - | - |" in lines
    assert "| dense experts (own domain) | 10.00 | 20.00 | 15.00 | - | - | - |" in lines
    # nexus: a 11.5 ± 0.71, b 21.5 ± 0.71, mean 16.5 (+10.0% vs the dense experts' 15); its
    # oracle mean is 15.75 (+4.8%).
    assert (
        "| nexus | 11.50 ± 0.71 | 21.50 ± 0.71 | 16.50 ± 0.00 | 1,000 | +10.0% | +4.8% |" in lines
    )
    # Paired per seed: moe-linear means 18 and 18, nexus 16.5 and 16.5: (18 - 16.5) / 18.
    assert (
        "| moe-linear | after training | 2 | +8.3%, +8.3% | +8.3% | [+8.3%, +8.3%] | win |" in lines
    )
    assert "| nexus (step 0) | 14.00 | 26.00 | 20.00 | +33.3% | +40.0% (a) |" in lines
    assert "| nexus | 0.90 | 0.80 |" in lines  # routing share
    assert "Target loss per seed: s0: 2.400." in text  # the worse final loss of the two routers
    # Extension: the gap (ln 30 - ln 16) / (ln 30 - ln 8) of seed 0; earlier 17 against 16.5.
    assert "| nexus+c | 0 | 16.00 | 17.00 | 0.75 | 0.48 | +3.0% |" in lines
    assert "| total wall (this run) | 4.5 |" in lines

    # The same text from scores.json, and a report outside the run: the same bytes each time.
    scores = tmp_path / "results" / "scores.json"
    scores.parent.mkdir()
    scores.write_text(json.dumps({"recipe": {}, **results.to_dict()}, indent=2))
    assert results_markdown(load_scores(scores)) == text
    out = tmp_path / "docs" / "results.md"
    first = write_report(scores, out).read_bytes()
    assert first == write_report(scores, out).read_bytes()
    assert first.decode() == f"{REPORT_HEADER}\n\n{text}"


def test_report_refuses_a_file_it_did_not_write_and_a_file_that_is_not_scores(tmp_path):
    from nexus_moe.errors import NexusError
    from nexus_moe.study.report import write_report

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(hand_made_results().to_dict()))
    mine = tmp_path / "notes.md"
    mine.write_text("my own notes\n")
    with pytest.raises(NexusError, match="notes.md: exists and was not written by nexus-moe"):
        write_report(scores, mine)
    assert mine.read_text() == "my own notes\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"domains": ["a"]}))
    with pytest.raises(NexusError, match="bad.json: no 'models'"):
        write_report(bad, tmp_path / "out.md")
    bad.write_text(json.dumps({"domains": "a", "models": {}}))
    with pytest.raises(NexusError, match="'domains' is a str, expected a list"):
        write_report(bad, tmp_path / "out.md")
    assert not (tmp_path / "out.md").exists()


def test_run_layout_names_every_stage_folder(tmp_path):
    from nexus_moe.study.layout import RunLayout

    layout = RunLayout(tmp_path)
    assert layout.seed_model == tmp_path / "seed" / "model"
    assert layout.expert_model("code") == tmp_path / "experts" / "code" / "model"
    assert layout.expert_model("code", "ffn") == tmp_path / "experts-ffn" / "code" / "model"
    assert (
        layout.trained_model("nexus", 1) == tmp_path / "s1" / "moe" / "nexus" / "trained" / "model"
    )
    assert layout.extended("moe-linear", "law", 0, appended=True) == (
        tmp_path / "s0" / "extend" / "moe-linear-append-law" / "extended"
    )
    assert layout.finetuned("nexus", "law", 2, 256) == tmp_path / "s2/extend/nexus-law/ft256"
    assert layout.scores_json == tmp_path / "results" / "scores.json"
    assert layout.routing_dir(1, first=False) == tmp_path / "s1" / "routing"


def test_report_command_writes_the_same_bytes_and_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    def report(*args):
        cmd = [sys.executable, "-m", "nexus_moe.cli", "report", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(hand_made_results().to_dict()))
    out = tmp_path / "docs" / "results.md"
    assert report(scores, "--out", out).returncode == 0
    first = out.read_bytes()
    assert report(scores, "--out", out).returncode == 0 and out.read_bytes() == first
    theirs = tmp_path / "theirs.md"
    theirs.write_text("typed by hand\n")
    refused = report(scores, "--out", theirs)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {theirs}: exists and was not written by nexus-moe report; "
        "choose another --out or remove the file"
    ]
    assert theirs.read_text() == "typed by hand\n"
    missing = report(tmp_path / "none.json", "--out", tmp_path / "x.md")
    assert missing.returncode == 2 and "none.json: file not found" in missing.stderr
