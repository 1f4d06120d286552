"""The command line turns bad input into one clear message (docs/design.md §12)."""

import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nexus_moe.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_stage():
    out = run_cli("--help").stdout
    for command in (
        "corpus",
        "tokenizer",
        "train",
        "branch",
        "embed-domains",
        "upcycle",
        "extend",
        "remove-expert",
        "analyse",
        "evaluate",
        "export",
        "import",
        "run",
    ):
        assert command in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "missing.yaml"], "missing.yaml: recipe not found"),
        (
            ["evaluate", "nowhere", "--corpus", "nowhere"],
            "manifest.json: corpus manifest not found",
        ),
        (["train", "--corpus", "c", "--out", "o", "--set", "stepz=3"], "unknown key"),
        (["evaluate", "m", "--corpus", "c", "--routing", "best"], "--routing 'best': choose"),
        (["run", "bad_set.yaml"], "bad_set.yaml: moe.variants 'nexus': experts 'fnn' is not"),
        (["run", "bad_ref.yaml"], "bad_ref.yaml: study.reference: 'nexus' is not a variant"),
        (
            ["evaluate", "m", "--corpus", "c", "--corrupt", "1.5"],
            "--corrupt: 1.5 is not a finite number in [0, 1]",
        ),
    ],
)
def test_bad_input_gives_one_clear_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    variant = "{name: nexus, method: nexus, experts: fnn}"
    (tmp_path / "bad_set.yaml").write_text(
        f"moe: {{variants: [{variant}]}}\nextend: {{variants: []}}\n"
    )
    (tmp_path / "bad_ref.yaml").write_text(
        "moe: {variants: [{name: nx, method: nexus}]}\nextend: {variants: [nx]}\n"
    )
    result = run_cli(*args)
    assert result.returncode == 2
    assert "error:" in result.stderr and message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


def test_help_uses_the_terminal_width_when_no_stream_is_one(monkeypatch):
    """Help piped and captured is drawn as wide as the controlling terminal, not at 80."""
    import contextlib
    import io

    import typer.rich_utils

    from nexus_moe import cli

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)
    monkeypatch.setattr(cli, "terminal_width", lambda: 150)
    monkeypatch.setattr(sys, "argv", ["nexus-moe", "upcycle", "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main()  # (help: exit status 0)
    widths = [len(line) for line in out.getvalue().splitlines()]
    assert max(widths) == 150, max(widths)
    text = " ".join(out.getvalue().split())
    assert "any --format but native" in text  # not "only qwen2_moe writes a Hugging Face folder"


def test_model_card_shows_no_absolute_path():
    from pathlib import Path

    from conftest import tiny_config
    from nexus_moe.hf.card import model_card
    from nexus_moe.hf.formats import FORMATS

    metadata = {
        "source": "gguf",
        "gguf_file": "/home/someone/models/smol.gguf",
        "inputs": ["/srv/runs/seed/model", "runs/experts/code"],
        "extended_with": {"from": "/srv/runs/moe/model", "domain": "math"},
    }
    card = model_card(tiny_config(), FORMATS["llama"], metadata, "out", Path("/nowhere"))
    assert "/home/someone" not in card and "/srv/" not in card
    assert "smol.gguf" in card and "runs/experts/code" in card


def test_a_disk_filling_up_under_numpy_is_one_line_not_a_traceback(monkeypatch, capsys):
    """numpy's tofile reports a full disk as an OSError without errno (seen writing the token
    cache onto a full tmpfs)."""
    from nexus_moe import cli

    def full_disk(**_):
        raise OSError("15822 requested and 12288 written")

    monkeypatch.setattr(cli, "app", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "disk is full" in err, err


@pytest.mark.parametrize(
    "args,option",
    [
        (["evaluate", "m", "--corpus", "c", "--seq-len", "abc"], "--seq-len"),
        (["upcycle", "--method", "best", "--seed", "s", "--out", "o"], "--method"),
        (["evaluate", "m", "--corpus", "c", "--bogus"], "--bogus"),
    ],
)
def test_usage_errors_are_one_line(args, option):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], lines


def test_a_model_too_large_for_memory_is_one_line(monkeypatch, capsys):
    """torch reports a failed allocation as a RuntimeError, not MemoryError (seen building a
    model with hidden_size 2**20: 4 TiB for one matrix)."""
    import torch

    from nexus_moe import cli

    def huge(**_):
        torch.empty(2**48, dtype=torch.float32)  # 1 PiB: beyond any address space

    monkeypatch.setattr(cli, "app", huge)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "out of memory" in err, err
