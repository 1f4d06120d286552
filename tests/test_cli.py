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
