"""benchmarks/real_model.py: its presets, arguments and work-folder rules (fast; the benchmark
itself runs the 135M model and is run by hand, see BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "real_model.py"
_spec = importlib.util.spec_from_file_location("real_model_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["real_model_bench"] = bench
_spec.loader.exec_module(bench)


def test_presets_grow_from_quick_to_cpu_to_cuda():
    quick, cpu, cuda = (bench.PRESETS[k] for k in ("quick", "cpu", "cuda"))
    assert set(quick) == set(cpu) == set(cuda)
    assert cpu["device"] == "cpu" and cuda["device"] == "cuda"

    def tokens(p, steps):
        return p[steps] * p["batch_size"] * p["seq_len"]

    for steps in ("branch_steps", "moe_steps"):
        assert tokens(quick, steps) < tokens(cpu, steps) < tokens(cuda, steps)
    assert quick["eval_tokens"] < cpu["eval_tokens"] < cuda["eval_tokens"]
    assert cuda["seq_len"] > cpu["seq_len"]
    # every scored window is whole, and the export check is no larger than the scores
    for p in (quick, cpu, cuda):
        assert p["eval_tokens"] % p["seq_len"] == 0
        assert p["export_tokens"] <= p["eval_tokens"]
        assert "token" in p["train_routings"]  # the export is of the per-token MoE


def test_arguments(tmp_path):
    args = bench.parse(["--workdir", str(tmp_path), "--domains", "python,changelogs"])
    assert args.domains == ["python", "changelogs"] and args.new_domain == "locales"
    assert args.preset == "cpu"
    bad = [
        ["--domains", "python,poetry"],
        ["--domains", "python"],
        ["--domains", "python,python"],
        ["--domains", "python,locales"],  # locales is the default new domain
        ["--preset", "gpu"],
        ["--gguf", str(tmp_path / "absent.gguf")],
    ]
    for extra in bad:
        with pytest.raises(SystemExit) as exit_info:
            bench.parse(["--workdir", str(tmp_path), *extra])
        assert exit_info.value.code == 2, extra


def test_outputs_are_kept_remade_or_refused(tmp_path):
    runner = bench.Runner(tmp_path, env={})
    out = tmp_path / "made"
    calls = []

    def make():
        out.mkdir()
        (out / "f").write_text(str(len(calls)))
        calls.append(1)

    runner.local("made", out, ["a"], make)
    runner.local("made", out, ["a"], make)  # same inputs: kept
    assert len(calls) == 1 and (out / "f").read_text() == "0"
    runner.local("made", out, ["b"], make)  # other inputs: made again
    assert len(calls) == 2 and (out / "f").read_text() == "1"
    assert "made" in (tmp_path / "stages.json").read_text()

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep").write_text("user's")
    with pytest.raises(bench.Stop) as stop:
        runner.local("theirs", theirs, ["a"], make)
    assert stop.value.code == 2 and "not written by this benchmark" in str(stop.value)
    assert (theirs / "keep").read_text() == "user's"


def test_data_folders_skip_short_and_repeated_files(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(12):
        path = src / f"f{i:02d}"
        path.write_text(f"document {i} " * 400)
        files.append(str(path))
    (src / "copy").write_text("document 0 " * 400)  # the same text again
    (src / "short").write_text("too short")
    files += [str(src / "copy"), str(src / "short")]
    monkeypatch.setitem(bench.SOURCES, "toy", lambda: files)
    summary = bench.build_data(tmp_path / "data", ["toy"], max_bytes=10**9)
    assert summary["toy"]["files"] == 12
    assert len(list((tmp_path / "data" / "toy").iterdir())) == 12
    monkeypatch.setitem(bench.SOURCES, "few", lambda: files[:3])
    with pytest.raises(bench.Stop, match="only 3 usable"):
        bench.build_data(tmp_path / "data2", ["few"], max_bytes=10**9)
