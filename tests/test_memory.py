"""nexus_moe.memory: glibc's mmap threshold held fixed for streamed upcycling."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("user_value", [None, "65536"])
def test_fixes_the_threshold_on_glibc_unless_the_user_set_it(user_value):
    """(In a child process: the setting lasts for the process, and pytest's should not change.)"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if user_value is not None:  # the user's own choice stands
        env["MALLOC_MMAP_THRESHOLD_"] = user_value
    code = "from nexus_moe import memory; print(memory.fix_mmap_threshold())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == ("True" if user_value is None else "False"), out.stderr


def test_the_upcycle_command_fixes_it(monkeypatch, tmp_path):
    """`nexus-moe upcycle` sets it before any model is read (here it stops at the missing seed)."""
    from typer.testing import CliRunner

    from nexus_moe.cli import app, assemble

    calls = []
    monkeypatch.setattr(assemble, "fix_mmap_threshold", lambda: calls.append(1) or True)
    result = CliRunner().invoke(
        app,
        [
            "upcycle",
            "--method",
            "btm",
            "--seed",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert calls == [1], result.output
    assert "no model checkpoint" in str(result.exception)  # (main() turns it into exit 2)
