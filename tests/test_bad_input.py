"""Bad input from a new user: real CLI calls in temp folders.

Each bad call must exit with code 2 and one line naming the file or field at fault, with no
traceback, and leave every file that existed before it unchanged. Output folders are written only
when missing, empty or holding nexus-moe's own output; a resumed training must have been made
from the same inputs. The commands run in-process through the real entry point
(:func:`nexus_moe.cli.main`), which keeps each call to well under a second.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nexus_moe import cli
from nexus_moe.embed import DomainEmbeddings

SRC = Path(__file__).resolve().parents[1] / "src" / "nexus_moe"
TEXTS = {
    "alpha": "The quick brown fox jumps over the lazy dog near river {i}. ",
    "beta": "def f{i}(x):\n    return x * {i} + sum(range({i}))\n",
}
MODEL = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_seq_len": 64,
}
TRAIN = {
    "steps": 4,
    "batch_size": 2,
    "seq_len": 16,
    "eval_tokens": 64,
    "log_every": 1,
    "checkpoint_every": 2,
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        """The error line (the last non-empty line of stderr)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run(*args) -> Result:
    """``nexus-moe ARGS`` through the console entry point, in this process."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["nexus-moe", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())


def ok(*args) -> Result:
    result = run(*args)
    assert result.code == 0, result.err
    return result


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``roots``: content hash and mode."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            files[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return files


def assert_unchanged(before: dict[str, tuple[str, int]]) -> None:
    """Every file of ``before`` still exists with the same bytes and mode."""
    for path, state in before.items():
        assert Path(path).is_file(), f"{path} was removed"
        now = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), Path(path).stat().st_mode)
        assert now == state, f"{path} was changed"


def fails(*args, names: str | list[str], keep: list[Path] | None = None) -> Result:
    """Run a bad call: exit 2, one error line holding each of ``names``, ``keep`` unchanged."""
    before = snapshot(*(keep or []))
    result = run(*args)
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err + result.out
    line = result.message
    assert line.startswith("error: "), result.err
    assert len(result.err.strip().splitlines()) == 1, result.err  # one line, nothing else
    for name in [names] if isinstance(names, str) else names:
        assert str(name) in line, (name, line)
    assert_unchanged(before)
    return result


def write_texts(root: Path, docs: int = 6, texts: dict[str, str] = TEXTS) -> Path:
    for domain, template in texts.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for k in range(docs):
            body = "".join(template.format(i=i + k) for i in range(40))
            (root / domain / f"doc{k}.txt").write_text(body)
    return root


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A small world made with the CLI: corpus, tokenizer, seed, two experts, an MoE."""
    root = tmp_path_factory.mktemp("world")
    write_texts(root / "src")
    (root / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    ok("corpus", "build", "--from", root / "src", "--out", root / "corpus", "--val-fraction", 0.2)
    ok("tokenizer", "train", "--corpus", root / "corpus", "--out", root / "tok.json")
    ok("--help")  # (exit 0 with the command list)
    seed_args = ["--model-config", root / "model.yaml", "--tokenizer", root / "tok.json"]
    common = ["--corpus", root / "corpus", "--config", root / "train.yaml", "--device", "cpu"]
    ok("train", *common, "--out", root / "seed", *seed_args)
    ok("train", *common, "--out", root / "seedB", *seed_args, "--set", "seed=1")
    ok("branch", "--seed", root / "seed", *common, "--out", root / "experts")
    emb = DomainEmbeddings(list(TEXTS), torch.randn(2, 16), "test-embedder", 16, 4)
    emb.save(root / "emb")
    experts = ["--expert", root / "experts" / "alpha", "--expert", root / "experts" / "beta"]
    ok(
        "upcycle",
        "--method",
        "nexus-paper",
        "--seed",
        root / "seed",
        *experts,
        "--embeddings",
        root / "emb",
        "--out",
        root / "moe",
        "--set",
        "nexus_hidden_size=8",
    )
    return root


def _common(w: Path) -> list:
    return ["--corpus", w / "corpus", "--config", w / "train.yaml", "--device", "cpu"]


def _upcycle(w: Path, out: Path, *extra) -> list:
    return [
        "upcycle",
        "--method",
        "nexus-paper",
        "--seed",
        w / "seed",
        "--expert",
        w / "experts" / "alpha",
        "--expert",
        w / "experts" / "beta",
        "--embeddings",
        w / "emb",
        "--out",
        out,
        "--set",
        "nexus_hidden_size=8",
        *extra,
    ]


def _foreign(folder: Path) -> Path:
    """A user's folder: a note and a sub-folder nexus-moe knows nothing about."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("my notes\n")
    (folder / "sub" / "data.txt").write_text("keep me\n")
    return folder


# --------------------------------------------------------------------------------------------
# 1. data loss through --out


def test_corpus_build_refuses_to_write_over_its_source(w, tmp_path):
    src = write_texts(tmp_path / "mine")
    fails("corpus", "build", "--from", src, "--out", src, names=[str(src), "input"], keep=[src])
    fails("corpus", "build", "--from", src, "--out", tmp_path, names="input", keep=[src])


@pytest.mark.parametrize("command", ["corpus", "upcycle", "export", "extend", "remove", "import"])
def test_out_with_foreign_files_is_refused_even_with_overwrite(w, tmp_path, command):
    out = _foreign(tmp_path / "out")
    args = {
        "corpus": ["corpus", "build", "--from", w / "src", "--out", out],
        "upcycle": _upcycle(w, out),
        "export": ["export", w / "moe", "--out", out],
        "extend": [
            "extend",
            "--moe",
            w / "moe",
            "--expert",
            w / "experts" / "beta",
            "--embeddings",
            w / "emb",
            "--domain",
            "beta",
            "--out",
            out,
        ],
        "remove": ["remove-expert", "--moe", w / "moe", "--domain", "beta", "--out", out],
        "import": ["import", w / "seed" / "model", "--out", out],
    }[command]
    for extra in ([], ["--overwrite"]):
        fails(*args, *extra, names=[str(out), "notes.md", "did not write"], keep=[out, w / "moe"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "sub"]


@pytest.mark.parametrize("command", ["corpus", "upcycle", "export", "train"])
def test_out_naming_a_file_is_an_error(w, tmp_path, command):
    target = tmp_path / "results.txt"
    target.write_text("important\n")
    args = {
        "corpus": ["corpus", "build", "--from", w / "src", "--out", target],
        "upcycle": _upcycle(w, target),
        "export": ["export", w / "moe", "--out", target],
        "train": ["train", "--init", w / "seed", *_common(w), "--out", target],
    }[command]
    fails(*args, names=[str(target), "is a file"], keep=[target])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no hidden .old copy


def test_train_out_naming_a_file_fails_before_any_step(w, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"user data")
    result = fails(
        "train",
        *_common(w),
        "--out",
        target,
        "--model-config",
        w / "model.yaml",
        "--tokenizer",
        w / "tok.json",
        names=str(target),
        keep=[target],
    )
    assert "train:" not in result.err  # no progress bar: nothing was trained


def test_out_equal_to_or_containing_an_input(w):
    fails(*_upcycle(w, w / "seed" / "model"), names="input", keep=[w / "seed"])
    fails(*_upcycle(w, w / "experts"), names="contains the input", keep=[w / "experts"])
    fails("export", w / "moe", "--out", w / "moe", names="input", keep=[w / "moe"])
    fails(
        "train",
        "--init",
        w / "seed",
        *_common(w),
        "--out",
        w / "seed",
        names="input",
        keep=[w / "seed"],
    )


def test_other_output_of_ours_needs_overwrite(w, tmp_path):
    out = tmp_path / "moe"
    ok(*_upcycle(w, out))
    ok(*_upcycle(w, out))  # the same command again replaces its own output
    first = snapshot(out)
    fails(*_upcycle(w, out, "--random-seed", 3), names=[str(out), "--overwrite"], keep=[out])
    # another checkpoint (a training run's model) is not replaced silently either
    fails(*_upcycle(w, w / "seedB" / "model"), names="--overwrite", keep=[w / "seedB"])
    ok(*_upcycle(w, out, "--random-seed", 3, "--overwrite"))
    assert snapshot(out) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_checkpoint_from_before_markers_counts_as_ours(w, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(w / "experts" / "alpha" / "model", old)
    (old / ".nexus-moe.json").unlink()  # as written by an earlier version
    fails(*_upcycle(w, old), names="--overwrite", keep=[old])
    (old / "notes.md").write_text("mine\n")
    fails(*_upcycle(w, old, "--overwrite"), names="notes.md", keep=[old])
    (old / "notes.md").unlink()
    ok(*_upcycle(w, old, "--overwrite"))
    assert json.loads((old / "config.json").read_text())["model"]["moe"] is not None


def test_train_keeps_foreign_files_in_its_run_folder(w, tmp_path):
    out = _foreign(tmp_path / "run")
    before = snapshot(out)
    ok("train", "--init", w / "seed", *_common(w), "--out", out)
    assert_unchanged(before)
    assert (out / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# 2. stale results


def _finished_run(w: Path, tmp_path: Path, init: Path) -> Path:
    out = tmp_path / "run"
    ok("train", "--init", init, *_common(w), "--out", out)
    return out


def test_resume_refuses_another_init_checkpoint(w, tmp_path):
    out = _finished_run(w, tmp_path, w / "seed")
    fails(
        "train",
        "--init",
        w / "seedB",
        *_common(w),
        "--out",
        out,
        names=[str(out), "init"],
        keep=[out],
    )
    ok("train", "--init", w / "seedB", *_common(w), "--out", out, "--overwrite")
    fresh = _finished_run(w, tmp_path / "fresh", w / "seedB")
    # trained afresh from B: the same weights as a run that never saw A
    assert _same(out, fresh)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def _same(a: Path, b: Path) -> bool:
    x, y = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_refuses_another_model_config(w, tmp_path):
    out = tmp_path / "seed"
    args = ["train", *_common(w), "--out", out, "--tokenizer", w / "tok.json"]
    ok(*args, "--model-config", w / "model.yaml")
    changed = tmp_path / "model2.yaml"
    changed.write_text(yaml.safe_dump({**MODEL, "init_std": 0.05, "rope_theta": 500.0}))
    fails(*args, "--model-config", changed, names="model", keep=[out])


def test_resume_refuses_another_tokenizer(w, tmp_path):
    out = tmp_path / "seed"
    args = ["train", *_common(w), "--out", out, "--model-config", w / "model.yaml"]
    ok(*args, "--tokenizer", w / "tok.json")
    other = tmp_path / "tok2.json"
    ok("tokenizer", "train", "--corpus", w / "corpus", "--out", other, "--domains", "beta")
    fails(*args, "--tokenizer", other, names="tokenizer", keep=[out])


def test_resume_refuses_another_corpus(w, tmp_path):
    corpus = tmp_path / "corpus"
    ok("corpus", "build", "--from", w / "src", "--out", corpus, "--val-fraction", 0.2)
    args = [
        "train",
        "--init",
        w / "seed",
        "--corpus",
        corpus,
        "--config",
        w / "train.yaml",
        "--out",
        tmp_path / "run",
    ]
    ok(*args)
    more = write_texts(tmp_path / "src2", docs=9)
    ok("corpus", "build", "--from", more, "--out", corpus, "--val-fraction", 0.2, "--overwrite")
    fails(*args, names="corpus", keep=[tmp_path / "run"])


def test_resume_refuses_other_settings(w, tmp_path):
    out = _finished_run(w, tmp_path, w / "seed")
    fails(
        "train",
        "--init",
        w / "seed",
        *_common(w),
        "--out",
        out,
        "--set",
        "lr=1e-4",
        names=["trainer_state.json", "train.lr"],
        keep=[out],
    )


def test_token_cache_follows_the_corpus_folders(w, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(w / "corpus", corpus, ignore=shutil.ignore_patterns("tokens-*"))
    shutil.move(corpus / "beta", tmp_path / "beta-away")
    ok(
        "train",
        "--init",
        w / "seed",
        "--corpus",
        corpus,
        "--domains",
        "alpha",
        "--config",
        w / "train.yaml",
        "--out",
        tmp_path / "a",
    )
    shutil.move(tmp_path / "beta-away", corpus / "beta")  # the folder is restored
    ok(
        "train",
        "--init",
        w / "seed",
        "--corpus",
        corpus,
        "--config",
        w / "train.yaml",
        "--out",
        tmp_path / "b",
    )


def test_study_redoes_a_stage_whose_config_changed(tmp_path):
    data = write_texts(tmp_path / "data", docs=8)
    train = {**TRAIN, "checkpoint_every": 0}
    recipe = {
        "workdir": str(tmp_path / "run"),
        "device": "cpu",
        "corpus": {
            "domains": list(TEXTS),
            "heldout": [],
            "from_dir": str(data),
            "val_fraction": 0.2,
        },
        "tokenizer": {"vocab_size": 300},
        "model": MODEL,
        "seed_train": train,
        "branch_train": {**train, "steps": 2},
        "moe": {"variants": []},
        "evaluate": {"seq_len": 16, "batch_size": 2, "max_tokens": 64},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ok("run", path)
    old = snapshot(tmp_path / "run" / "seed" / "model")
    recipe["model"] = {**MODEL, "init_std": 0.05, "rope_theta": 500.0}
    path.write_text(yaml.safe_dump(recipe))
    result = ok("run", path)
    assert "seed finished" in result.out and "branch:alpha finished" in result.out
    assert snapshot(tmp_path / "run" / "seed" / "model") != old
    # the redone seed is the model a fresh study with the new config trains
    recipe["workdir"] = str(tmp_path / "fresh")
    path.write_text(yaml.safe_dump(recipe))
    ok("run", path)
    assert _same(tmp_path / "run" / "seed", tmp_path / "fresh" / "seed")
    text = (tmp_path / "run" / "seed" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the old rows are gone


# --------------------------------------------------------------------------------------------
# 3. tracebacks become one-line errors


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable (chmod, or the immutable flag for root); skip if impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i not supported here ({made.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder(w, tmp_path):
    with read_only(tmp_path / "ro") as ro:
        commands = [
            ["corpus", "build", "--from", w / "src", "--out", ro / "c"],
            ["tokenizer", "train", "--corpus", w / "corpus", "--out", ro / "tok.json"],
            ["train", "--init", w / "seed", *_common(w), "--out", ro / "run"],
            ["branch", "--seed", w / "seed", *_common(w), "--out", ro / "experts"],
            _upcycle(w, ro / "moe"),
            ["export", w / "moe", "--out", ro / "hf"],
            ["remove-expert", "--moe", w / "moe", "--domain", "beta", "--out", ro / "m"],
            ["evaluate", w / "seed", "--corpus", w / "corpus", "--json", ro / "s.json"],
            ["analyse", w / "moe", "--corpus", w / "corpus", "--out", ro / "an"],
        ]
        for args in commands:
            result = fails(*args, names=[str(ro), "cannot write"])
            assert "train:" not in result.err  # refused before any step


def test_disk_full_is_reported_before_the_work(w, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("nexus_moe.io_utils.shutil.disk_usage", lambda p: usage._replace(free=1000))
    for args in (
        ["train", "--init", w / "seed", *_common(w), "--out", tmp_path / "run"],
        _upcycle(w, tmp_path / "moe"),
        ["export", w / "moe", "--out", tmp_path / "hf"],
    ):
        fails(*args, names=["MiB free", "needed"])
    assert not list(tmp_path.iterdir())


def test_disk_full_during_a_write_keeps_the_old_output(w, tmp_path, monkeypatch):
    out = tmp_path / "moe"
    ok("remove-expert", "--moe", w / "moe", "--domain", "beta", "--out", out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nexus_moe.checkpoint.save_file", full)
    fails(
        "remove-expert",
        "--moe",
        w / "moe",
        "--domain",
        "beta",
        "--out",
        out,
        names=["No space left on device", "free some space"],
        keep=[out],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary left


@pytest.mark.parametrize(
    "extra,names",
    [
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--set", "lr=.nan"], "train.lr"),
        (["--set", "log_every=0"], "train.log_every"),
        (["--set", "warmup_frac=-1"], "train.warmup_frac"),
        (["--set", "seq_len=100000"], ["train.seq_len", "max_seq_len"]),
        (["--set", "freeze=[model, lm_head]"], "train.freeze"),
        (["--set", "lr=[1e-3"], ["--set", "lr=[1e-3"]),
        (["--set", "stepz=3"], "stepz"),
        (["--model-config", "model.yaml"], ["--model-config", "--init"]),
    ],
)
def test_bad_training_settings(w, tmp_path, extra, names):
    extra = [w / e if e == "model.yaml" else e for e in extra]
    fails(
        "train",
        "--init",
        w / "seed",
        *_common(w)[:-2],
        *extra,
        "--out",
        tmp_path / "run",
        names=names,
        keep=[w / "seed"],
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text,names",
    [
        ("lr: .nan\n", "train.lr"),
        ("steps: [4\n", ["bad.yaml", "not valid YAML"]),
        ("- steps\n- 4\n", ["bad.yaml", "list"]),
        ("log_every: 0\n", "train.log_every"),
    ],
)
def test_bad_config_file(w, tmp_path, text, names):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    fails(
        "train",
        "--init",
        w / "seed",
        "--corpus",
        w / "corpus",
        "--config",
        bad,
        "--out",
        tmp_path / "run",
        names=names,
        keep=[bad],
    )


def test_set_reads_exponents_as_numbers(w, tmp_path):
    ok("train", "--init", w / "seed", *_common(w), "--out", tmp_path / "run", "--set", "lr=1e-3")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lr"] == pytest.approx(1e-3)


def test_checkpoint_without_tokenizer(w, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(w / "seed" / "model", ckpt)
    (ckpt / "tokenizer.json").unlink()
    for args in (
        ["evaluate", ckpt, "--corpus", w / "corpus", "--device", "cpu"],
        ["train", "--init", ckpt, *_common(w), "--out", tmp_path / "run"],
        ["branch", "--seed", ckpt, *_common(w), "--out", tmp_path / "experts"],
    ):
        fails(*args, names=str(ckpt / "tokenizer.json"), keep=[ckpt])


def test_tokenizer_larger_than_the_model(w, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(w / "seed" / "model", ckpt)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(400)]
    text = write_texts(tmp_path / "words", texts={"words": " ".join(words) + " {i}"})
    ok("corpus", "build", "--from", text, "--out", tmp_path / "wc")
    (ckpt / "tokenizer.json").unlink()  # (a file inside a checkpoint is never replaced)
    ok(
        "tokenizer",
        "train",
        "--corpus",
        tmp_path / "wc",
        "--out",
        ckpt / "tokenizer.json",
        "--vocab-size",
        600,
    )
    for args in (
        ["evaluate", ckpt, "--corpus", w / "corpus", "--device", "cpu"],
        ["train", "--init", ckpt, *_common(w), "--out", tmp_path / "run"],
    ):
        fails(*args, names=[str(ckpt / "tokenizer.json"), "vocab_size"], keep=[ckpt])


def _extend_beta(w) -> list:
    """``extend`` of the world's MoE with its ``beta`` expert (the options a test adds follow)."""
    return ["extend", "--moe", w / "moe", "--expert", w / "experts" / "beta"]


def test_extend_with_embeddings_of_the_wrong_dimension(w, tmp_path):
    emb = tmp_path / "emb"
    DomainEmbeddings(["gamma"], torch.randn(1, 24), "test-embedder", 24, 4).save(emb)
    fails(
        *_extend_beta(w),
        "--domain",
        "gamma",
        "--embeddings",
        emb,
        "--out",
        tmp_path / "out",
        names=["dimension 24", "16"],
        keep=[w / "moe", emb],
    )


@pytest.mark.parametrize("budget", ["1.5", "-1", "nan"])
def test_extend_with_a_leak_budget_that_is_not_a_share(w, tmp_path, budget):
    fails(
        *_extend_beta(w),
        "--leak-budget",
        budget,
        "--out",
        tmp_path / "out",
        names=[f"--leak-budget / extend.leak_budget: {float(budget)}", "0.01"],
        keep=[w / "moe"],
    )


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--row-scale", "0"], ["--row-scale: 0", "positive"]),
        (["--row-scale", "nan"], ["--row-scale: nan", "positive"]),
        (["--row-scale", "inf"], ["--row-scale: inf", "positive"]),
        (["--row-scale", "1.1", "--leak-budget", "0.01"], ["--row-scale 1.1", "--leak-budget"]),
    ],
)
def test_extend_with_a_row_scale_that_cannot_apply(w, tmp_path, flags, names):
    fails(*_extend_beta(w), *flags, "--out", tmp_path / "out", names=names, keep=[w / "moe"])


def test_truncated_gguf(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")  # valid magic and version, then nothing
    pytest.importorskip("gguf")
    fails("import", gguf, "--out", tmp_path / "out", names=[str(gguf), "truncated"], keep=[gguf])


def test_empty_validation_split(w, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(w / "corpus", corpus, ignore=shutil.ignore_patterns("tokens-*"))
    (corpus / "alpha" / "validation.jsonl").write_text("")
    fails(
        "evaluate",
        w / "seed",
        "--corpus",
        corpus,
        "--device",
        "cpu",
        names=["'alpha'", "validation"],
    )
    result = fails(
        "train",
        "--init",
        w / "seed",
        "--corpus",
        corpus,
        "--config",
        w / "train.yaml",
        "--out",
        tmp_path / "run",
        names=["'alpha'", "validation"],
    )
    assert "train:" not in result.err  # found before training, not after


# --------------------------------------------------------------------------------------------
# 4. nonsense is not accepted silently


def test_evaluate_rejects_nonsense(w):
    base = ["evaluate", w / "seed", "--corpus", w / "corpus", "--device", "cpu"]
    fails(*base, "--max-tokens", "-5", names=["--max-tokens", "-5"])
    fails(*base, "--seq-len", "1000", names=["seq_len=1000", "max_seq_len=64"])
    fails(*base, "--device", "tpu", names="tpu")
    fails(
        "analyse",
        w / "moe",
        "--corpus",
        w / "corpus",
        "--out",
        w / "an",
        "--seq-len",
        1000,
        names="max_seq_len",
    )


def test_recipe_is_checked_before_any_stage(tmp_path):
    recipe = {
        "workdir": str(tmp_path / "run"),
        "model": MODEL,
        "seed_train": {"seq_len": 100000},
        "branch_train": {"seq_len": 16},
        "evaluate": {"seq_len": 16},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fails("run", path, names=[str(path), "seed_train.seq_len", "max_seq_len"])
    recipe["seed_train"] = {"seq_len": 16}
    recipe["moe"] = {"variants": [{"name": "x", "method": "nexus", "moe": {"router": "bogus"}}]}
    path.write_text(yaml.safe_dump(recipe))
    fails("run", path, names=[str(path), "bogus"])
    recipe["moe"] = {"variants": [{"name": "x", "method": "nexsu"}]}
    path.write_text(yaml.safe_dump(recipe))
    fails("run", path, names=[str(path), "nexsu"])
    recipe["moe"], recipe["device"] = {}, "tpu"
    path.write_text(yaml.safe_dump(recipe))
    fails("run", path, names=[str(path), "tpu"])
    assert not (tmp_path / "run").exists()


def test_embeddings_labelled_with_a_known_embedder_must_have_its_dimension(w, tmp_path):
    emb = tmp_path / "emb"
    good = DomainEmbeddings.load(w / "emb")
    meta = {**good.metadata(), "embedder": "all-MiniLM-L6-v2"}
    emb.mkdir()
    save_file(
        {"domain_embeddings": good.vectors},
        str(emb / "domain_embeddings.safetensors"),
        metadata={"format": meta["format"], "nexus_moe": json.dumps(meta)},
    )
    fails(
        *_upcycle(w, tmp_path / "moe")[:-4],
        "--embeddings",
        emb,
        "--out",
        tmp_path / "moe",
        names=["all-MiniLM-L6-v2", "384", "16"],
        keep=[emb],
    )


def test_nan_weights_are_caught_on_load(w, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(w / "seed" / "model", ckpt)
    state = load_file(ckpt / "model.safetensors")
    name = sorted(state)[2]
    state[name][0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    fails(
        "evaluate",
        ckpt,
        "--corpus",
        w / "corpus",
        "--device",
        "cpu",
        names=[str(ckpt / "model.safetensors"), name, "NaN"],
        keep=[ckpt],
    )


def test_remove_expert_says_when_it_lowers_top_k(w, tmp_path):
    btx = tmp_path / "btx"
    ok(
        "upcycle",
        "--method",
        "btx",
        "--seed",
        w / "seed",
        "--expert",
        w / "experts" / "alpha",
        "--expert",
        w / "experts" / "beta",
        "--out",
        btx,
        "--set",
        "top_k=2",
    )
    result = ok("remove-expert", "--moe", btx, "--domain", "beta", "--out", tmp_path / "one")
    assert "top_k lowered from 2 to 1" in result.out


def test_extend_refuses_an_expert_of_another_seed(w, tmp_path):
    ok(
        "branch",
        "--seed",
        w / "seedB",
        *_common(w),
        "--domains",
        "beta",
        "--out",
        tmp_path / "experts",
    )
    fails(
        "extend",
        "--moe",
        w / "moe",
        "--expert",
        tmp_path / "experts" / "beta",
        "--domain",
        "gamma",
        "--embeddings",
        w / "emb",
        "--out",
        tmp_path / "out",
        names=["another seed", str(tmp_path / "experts" / "beta")],
        keep=[w / "moe"],
    )


# --------------------------------------------------------------------------------------------
# 5. leftovers


def test_leftover_temporaries_of_an_interrupted_write_are_removed(w, tmp_path):
    out = tmp_path / "hf"
    (tmp_path / ".hf.abcd1234.tmp").mkdir()  # as left by a kill inside a write
    (tmp_path / ".hf.abcd1234.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".hf.mine.tmp").write_text("a user's file that merely looks similar")
    ok("export", w / "moe", "--out", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.mine.tmp", "hf"]


@pytest.mark.parametrize("kill_at", [1, 3])  # 1: before any checkpoint was written
def test_resume_after_a_kill_logs_each_step_once(w, tmp_path, monkeypatch, kill_at):
    from nexus_moe.train import Trainer

    save = Trainer.save

    class Killed(BaseException):
        pass

    def killed(self):
        if self.step == kill_at:
            raise Killed  # killed after the step was logged, before its checkpoint
        save(self)

    out = tmp_path / "run"
    args = ["train", "--init", w / "seed", *_common(w), "--out", out, "--set", "checkpoint_every=1"]
    monkeypatch.setattr(Trainer, "save", killed)
    with pytest.raises(Killed):
        run(*args)
    monkeypatch.setattr(Trainer, "save", save)
    ok(*args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval" in r] == [4]
    fresh = tmp_path / "fresh"
    ok("train", "--init", w / "seed", *_common(w), "--out", fresh, "--set", "checkpoint_every=1")
    assert _same(out, fresh)


def test_checkpoint_files_share_one_mode(w):
    modes = {p.name: p.stat().st_mode & 0o777 for p in (w / "seed" / "checkpoint").iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_hints_name_existing_commands():
    commands = set()
    for line in cli.main.__globals__["app"].registered_commands:
        commands.add(line.name or line.callback.__name__.replace("_", "-"))
    commands |= {"corpus", "tokenizer"}
    for path in SRC.rglob("*.py"):
        for match in re.finditer(r"`nexus-moe ([a-z][a-z-]*)", path.read_text()):
            assert match.group(1) in commands, f"{path.name}: `nexus-moe {match.group(1)}`"


def test_real_entry_point_gives_exit_code_2(w, tmp_path):
    src = write_texts(tmp_path / "mine")
    before = snapshot(src)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexus_moe.cli",
            "corpus",
            "build",
            "--from",
            str(src),
            "--out",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(src) in done.stderr
    assert_unchanged(before)


# --------------------------------------------------------------------------------------------
# single-file outputs: never an input, never a file nexus-moe did not write, atomic


def _seed_weights(w: Path) -> Path:
    return w / "seed" / "model" / "model.safetensors"


@pytest.mark.parametrize(
    "kind", ["evaluate-into-checkpoint", "tokenizer-into-corpus", "embed-into-corpus"]
)
def test_single_file_output_inside_an_input_is_refused(w, kind):
    args, option, target = {
        "evaluate-into-checkpoint": (
            ["evaluate", w / "seed", "--corpus", w / "corpus", "--device", "cpu"],
            "--json",
            _seed_weights(w),
        ),
        "tokenizer-into-corpus": (
            ["tokenizer", "train", "--corpus", w / "corpus"],
            "--out",
            w / "corpus" / "manifest.json",
        ),
        "embed-into-corpus": (
            ["embed-domains", "--corpus", w / "corpus", "--embedder", "x"],
            "--out",
            w / "corpus" / "e.safetensors",
        ),
    }[kind]
    fails(*args, option, target, names=[option, "input"], keep=[w / "seed", w / "corpus"])


@pytest.mark.parametrize("command", ["evaluate", "tokenizer"])
def test_single_file_output_never_replaces_a_users_file(w, tmp_path, command):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}\n')
    if command == "evaluate":
        args = ["evaluate", w / "seed", "--corpus", w / "corpus", "--device", "cpu"]
        args += ["--max-tokens", 64, "--seq-len", 16, "--json"]
        option = "--json"
    else:
        args, option = ["tokenizer", "train", "--corpus", w / "corpus", "--out"], "--out"
    fails(*args, mine, names=[option, str(mine), "did not write"], keep=[mine])
    fresh = tmp_path / "fresh.json"
    ok(*args, fresh)
    record = tmp_path / ".fresh.json.nexus-moe.json"
    assert json.loads(record.read_text())["sha256"] == [
        hashlib.sha256(fresh.read_bytes()).hexdigest()
    ]
    ok(*args, fresh)  # its own earlier file is replaced
    fresh.write_text(fresh.read_text() + " ")  # changed by the user since: theirs now
    fails(*args, fresh, names=[option, "changed since"], keep=[fresh])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_recipes_results_written_before_records_are_its_own(tmp_path):
    """A study rerun in a work folder from before files carried records replaces its own
    results (the results folder beside its stage folders, a later seed's routing folder beside
    that seed's), and still no other file."""
    from nexus_moe.io_utils import is_own_file

    work = tmp_path / "run"
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "stage.json").write_text("{}\n")
    (work / "results").mkdir()
    old = work / "results" / "routing-nexus.png"
    old.write_bytes(b"an earlier run's heatmap")
    assert is_own_file(old)
    elsewhere = tmp_path / "results" / "routing-nexus.png"  # no stage folders beside it
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"a user's picture")
    assert not is_own_file(elsewhere)
    # a later seed's routing reports, beside that seed's stage folders (s1/moe/nexus/upcycled)
    stage = work / "s1" / "moe" / "nexus" / "upcycled"
    stage.mkdir(parents=True)
    (work / "s1" / "routing").mkdir()
    later = work / "s1" / "routing" / "routing-nexus+math-ft0.png"
    later.write_bytes(b"an earlier run's heatmap")
    assert not is_own_file(later)  # no stage there yet
    (stage / "stage.json").write_text("{}\n")
    assert is_own_file(later)
    for name in ("s1x", "routing"):  # another folder name: not a seed's
        other = tmp_path / name / "routing" / "x.png"
        other.parent.mkdir(parents=True)
        other.write_bytes(b"a user's picture")
        (other.parent.parent / "a" / "b" / "c").mkdir(parents=True)
        (other.parent.parent / "a" / "b" / "c" / "stage.json").write_text("{}\n")
        assert not is_own_file(other)


def test_embed_domains_out_is_checked_before_the_embedder_runs(w, tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "domain_embeddings.json").write_text("{}\n")  # a user's file of that name
    fails(
        "embed-domains", "--corpus", w / "corpus", "--embedder", tmp_path / "no-such-model",
        "--out", out, names=["--out", "did not write"], keep=[out],
    )  # fmt: skip


def test_analyse_out_inside_the_checkpoint_is_refused(w):
    fails(
        "analyse", w / "moe", "--corpus", w / "corpus", "--out", w / "moe" / "model",
        "--device", "cpu", names=["--out", "input"], keep=[w / "moe"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# every option in its declared range; no option that nothing would use


def _extend(w: Path, out: Path, *extra) -> list:
    return [
        "extend", "--moe", w / "moe", "--expert", w / "experts" / "beta", "--embeddings",
        w / "emb", "--domain", "beta", "--out", out, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra,option",
    [
        (["--merge-weight", "2"], "--merge-weight"),
        (["--merge-weight", "-1"], "--merge-weight"),
        (["--merge-weight", "nan"], "--merge-weight"),
        (["--calibration-tokens", "0"], "--calibration-tokens"),
        (["--calibration-tokens", "-1"], "--calibration-tokens"),
        (["--leak-budget", "-1"], "--leak-budget"),
        (["--leak-budget", "nan"], "--leak-budget"),
        (["--row-scale", "nan"], "--row-scale"),
        (["--row-scale", "1.0"], "--corpus"),  # nothing places a row without the text
        (["--leak-budget", "0.01"], "--corpus"),
        (["--refit-rows"], "--corpus"),
    ],
)
def test_extend_options_out_of_range_or_unused(w, tmp_path, extra, option):
    out = tmp_path / "out"
    fails(*_extend(w, out, *extra), names=option, keep=[w / "moe"])
    assert not out.exists()


@pytest.mark.parametrize(
    "args,option",
    [
        (["evaluate", "{w}/seed", "--corpus", "{w}/corpus", "--seq-len", "0"], "--seq-len"),
        (["analyse", "{w}/moe", "--corpus", "{w}/corpus", "--seq-len", "0"], "--seq-len"),
        (
            ["corpus", "build", "--from", "{w}/src", "--out", "{t}/x", "--val-fraction", "1.5"],
            "--val-fraction",
        ),  # fmt: skip
        (
            ["embed-domains", "--corpus", "{w}/corpus", "--out", "{t}/x", "--num-chunks", "0"],
            "--num-chunks",
        ),  # fmt: skip
        (
            [
                "tokenizer",
                "train",
                "--corpus",
                "{w}/corpus",
                "--out",
                "{t}/t.json",
                "--vocab-size",
                "1000000000",
            ],
            "--vocab-size",
        ),  # fmt: skip
        (
            [
                "branch",
                "--seed",
                "{w}/seed",
                "--corpus",
                "{w}/corpus",
                "--out",
                "{t}/x",
                "--parallel-devices",
                "-1",
            ],
            "--parallel-devices",
        ),  # fmt: skip
        (
            [
                "branch",
                "--seed",
                "{w}/seed",
                "--corpus",
                "{w}/corpus",
                "--out",
                "{t}/x",
                "--ffn-only",
                "--set",
                "train_only=[self_attn]",
            ],
            "--ffn-only",
        ),  # fmt: skip
        (
            [
                "upcycle",
                "--method",
                "moe-linear",
                "--seed",
                "{w}/seed",
                "--expert",
                "{w}/experts/alpha",
                "--out",
                "{t}/x",
                "--set",
                "load_balance_weight=.nan",
            ],
            "moe.load_balance_weight",
        ),  # fmt: skip
        (
            [
                "upcycle",
                "--method",
                "moe-linear",
                "--seed",
                "{w}/seed",
                "--expert",
                "{w}/experts/alpha",
                "--out",
                "{t}/x",
                "--corpus",
                "{w}/corpus",
                "--calibration-tokens",
                "0",
            ],
            "--calibration-tokens",
        ),  # fmt: skip
    ],
)
def test_cli_options_out_of_range(w, tmp_path, args, option):
    args = [a.format(w=w, t=tmp_path) for a in args]
    fails(*args, names=option, keep=[w / "seed", w / "corpus"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "t.json").exists()


def test_model_config_out_of_range_is_refused(w, tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**MODEL, "hidden_size": -8}))
    args = ["train", *_common(w), "--out", tmp_path / "run", "--tokenizer", w / "tok.json"]
    fails(
        *args, "--model-config", tmp_path / "m.yaml", names="model.hidden_size", keep=[w / "corpus"]
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "section,field",
    [
        ({"study": {"corrupt": [1.5]}}, "study.corrupt[0]"),
        ({"extend": {"budgets": [-8192]}}, "extend.budgets[0]"),
        ({"extend": {"leak_budget": float("nan")}}, "extend.leak_budget"),
        (
            {"moe": {"variants": [{"name": "n", "method": "nexus", "train_steps": 0}]}},
            "train_steps",
        ),
        ({"model": {"hidden_size": -8}}, "model.hidden_size"),
        ({"moe": {"overrides": {"load_balance_weight": float("nan")}}}, "load_balance_weight"),
        ({"tokenizer": {"vocab_size": 1_000_000_000}}, "tokenizer.vocab_size"),
        ({"extend": {"refit_rows": True, "variants": ["moe-linear"]}}, "extend.refit_rows"),
        ({"extend": {"leak_budget": 0.01, "variants": []}}, "extend.leak_budget"),
    ],
)
def test_recipe_fields_out_of_range_are_refused_at_load(tmp_path, section, field):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "wd"), **section}))
    fails("run", recipe, names=[str(recipe), field])
    assert not (tmp_path / "wd").exists()  # refused before any stage ran


# --------------------------------------------------------------------------------------------
# no model with NaN or infinite values is ever written; no stale result passed off as new


def test_upcycle_names_the_expert_with_nan_weights(w, tmp_path):
    bad = tmp_path / "alpha"
    shutil.copytree(w / "experts" / "alpha" / "model", bad)
    state = load_file(bad / "model.safetensors")
    name = next(n for n in sorted(state) if "mlp" in n)
    state[name][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "moe"
    args = _upcycle(w, out)
    args[args.index(w / "experts" / "alpha")] = bad
    fails(*args, names=[str(bad / "model.safetensors"), name, "NaN"], keep=[bad])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_refuses_a_model_with_nan(tmp_path):
    from conftest import tiny_config
    from nexus_moe.checkpoint import NonFiniteModel, save_checkpoint
    from nexus_moe.model import Transformer

    model = Transformer(tiny_config())
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(NonFiniteModel, match="model.norm.weight"):
        save_checkpoint(tmp_path / "ck", model)
    assert not (tmp_path / "ck").exists()


def test_upcycle_refuses_an_expert_branched_from_another_seed(w, tmp_path):
    args = _upcycle(w, tmp_path / "moe")
    args[args.index(w / "seed")] = w / "seedB"
    fails(*args, names=[str(w / "experts" / "alpha"), "another seed"], keep=[w / "experts"])


def test_init_weights_replaced_in_place_are_not_passed_off_as_the_old_result(w, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(w / "seed" / "model", init)
    args = ["train", "--init", init, *_common(w), "--out", tmp_path / "run"]
    ok(*args)
    first = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    shutil.copyfile(w / "seedB" / "model" / "model.safetensors", init / "model.safetensors")
    fails(*args, names=["init"], keep=[tmp_path / "run"])  # refused, not "model written"
    ok(*args, "--overwrite")
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() != first


def test_extend_with_an_empty_train_split_for_the_new_domain(w, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(w / "corpus", corpus, ignore=shutil.ignore_patterns("tokens-*"))
    (corpus / "beta" / "train.jsonl").write_text("")
    moe = tmp_path / "moe"
    ok(
        "upcycle", "--method", "moe-linear", "--seed", w / "seed", "--expert",
        w / "experts" / "alpha", "--corpus", w / "corpus", "--set", "top_k=1", "--out", moe,
    )  # fmt: skip
    out = tmp_path / "out"
    args = ["extend", "--moe", moe, "--expert", w / "experts" / "beta", "--out", out]
    fails(*args, "--corpus", corpus, names=["'beta'", "holds no tokens"], keep=[moe, corpus])
    assert not out.exists()


@pytest.mark.parametrize("command", ["upcycle", "extend"])
def test_calibration_tokens_without_a_corpus_is_refused(w, tmp_path, command):
    out = tmp_path / "out"
    args = _upcycle(w, out) if command == "upcycle" else _extend(w, out)
    fails(*args, "--calibration-tokens", "100", names=["--calibration-tokens", "--corpus"])
    assert not out.exists()
