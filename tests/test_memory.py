"""nexus_moe.memory: glibc's mmap threshold held fixed for streamed upcycling."""

from __future__ import annotations

import platform

import pytest

from nexus_moe import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_fixes_the_threshold_on_glibc_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.fix_mmap_threshold() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own choice stands
    assert memory.fix_mmap_threshold() is False


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
