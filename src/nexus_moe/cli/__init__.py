"""The ``nexus-moe`` command line: one sub-command per pipeline stage (docs/design.md §1).

The commands live in :mod:`~nexus_moe.cli.training` (dense models), :mod:`~nexus_moe.cli.assemble`
(MoEs) and :mod:`~nexus_moe.cli.tools`, their shared options and checks in
:mod:`~nexus_moe.cli.common`; here is the entry point, :func:`main`, which turns every error a
user can cause into one line and exit code 2.
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import sys

import typer
from rich.console import Console

# isort: off
# The commands register on ``app`` as they are imported: this order is their order in --help.
from nexus_moe.cli import training  # noqa: F401
from nexus_moe.cli import assemble  # noqa: F401
from nexus_moe.cli import tools  # noqa: F401

# isort: on
from nexus_moe.cli.common import app, console, score_table
from nexus_moe.errors import NexusError

__all__ = ["app", "console", "main", "score_table", "terminal_width"]


def main() -> None:
    """Console entry point: NexusError becomes one clear message and exit code 2.

    So do click's usage errors (an unknown option, a value of the wrong type), the file system's
    refusals (read-only folder, permission denied, disk full) and
    running out of memory, which no check made in advance can rule out entirely.
    """
    click = _click_exceptions()
    _help_at_terminal_width()
    try:
        # standalone_mode=False: click's usage errors come here, to be one line like ours
        code = contextvars.copy_context().run(app, standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # a group alone: its help, as typer shows it
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # an unknown option, a value of the wrong type
        command = exc.ctx.command_path if exc.ctx is not None else "nexus-moe"
        _fail(f"{exc.format_message()} (see `{command} --help`)")
    except typer.Abort:
        sys.exit(130)
    except NexusError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.errno is None and _SHORT_WRITE.search(str(exc)):  # numpy's tofile: disk full
            _fail(
                f"writing the output failed ({exc}): the disk is full; free some space or write "
                "elsewhere; nothing half-written was left in place"
            )
        if exc.errno not in _FS_ERRNOS:
            raise
        advice = (
            "free some space or write elsewhere; nothing half-written was left in place"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "choose a folder you can write to"
        )
        where = f"{exc.filename}: " if exc.filename else "writing the output failed: "
        _fail(f"{where}{exc.strerror or exc}; {advice}")
    except MemoryError:
        _fail("out of memory; use a smaller model, batch_size or seq_len")
    except RuntimeError as exc:  # torch's allocators (CPU and CUDA) raise these, not MemoryError
        if not _ALLOCATION_FAILED.search(str(exc)):
            raise
        tried = _TRIED.search(str(exc))
        size = f" (tried to allocate {int(tried.group(1)) / 2**30:,.1f} GiB)" if tried else ""
        _fail(f"out of memory{size}; use a smaller model, batch_size or seq_len")
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_exceptions():
    """The exceptions of the click that typer runs on (typer 0.2x carries its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer on the click package
        from click import exceptions
    return exceptions


def _help_at_terminal_width() -> None:
    """``--help`` as wide as the terminal. Typer draws help with rich at ``rich_utils.MAX_WIDTH``
    (from $TERMINAL_WIDTH) or, when unset, what rich detects: $COLUMNS, else the size of a
    standard stream that is a terminal, else 80 columns. When no standard stream is one (help
    piped and captured), the controlling terminal's width is used instead of 80."""
    import typer.rich_utils

    if os.environ.get("TERMINAL_WIDTH") or os.environ.get("COLUMNS"):
        return  # the user's choice, honoured by typer and rich themselves
    width = terminal_width()
    if width is not None:
        typer.rich_utils.MAX_WIDTH = width


def terminal_width() -> int | None:
    """Columns of the terminal of a standard stream or, failing that, of /dev/tty."""
    for fd in (1, 2, 0):
        try:
            return os.get_terminal_size(fd).columns
        except (OSError, ValueError):
            continue
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns
    except OSError:
        return None
    finally:
        os.close(fd)


# What torch raises when an allocation fails (CPU: DefaultCPUAllocator; CUDA: OutOfMemoryError).
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_TRIED = re.compile(r"tried to allocate (\d+) bytes")
# What numpy's ndarray.tofile raises (no errno) when the file system fills up mid-write.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fail(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the message held
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(2)
