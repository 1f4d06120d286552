"""Safe output writing (docs/design.md §12): write to a temporary path beside the target, then rename.

Every folder written through :func:`atomic_dir` carries a small marker file (``.nexus-moe.json``)
naming the command and configuration that wrote it and the files it holds. A folder is replaced
only when it is missing, empty, or holds nexus-moe's own output; a folder with files nexus-moe did
not write, a file where a folder is expected, or an output of another configuration (unless
``--overwrite``) is an error naming the folder. Leftover temporary files of an interrupted write
are removed the next time the same target is written.

Single files a command writes at a path the user chose (``evaluate --json``, ``tokenizer train
--out``, ``embed-domains --out``) go through :func:`output_file`, the one guard for them: the path
may not be one of the command's inputs nor lie inside an input folder, an existing file is replaced
only when nexus-moe wrote it (a record ``.NAME.nexus-moe.json`` beside it holds the sha256 of what
was written, so a file the user changed since is theirs again), and the file is written atomically.
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus_moe.errors import NexusError

# The names of the files nexus-moe writes that more than one module reads (defined here, the
# lowest module that needs them, and imported everywhere else).
CONFIG_FILE = "config.json"  # a checkpoint's config and metadata
WEIGHTS_FILE = "model.safetensors"  # a checkpoint's weights
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # a resumable training checkpoint's optimizer state
STATE_FILE = "trainer_state.json"  # ... its step, configs and inputs
RNG_FILE = "rng.safetensors"  # ... its random-number generator states
UNDO_FILE = "undo.safetensors"  # what `remove-expert` needs to undo an extension
STAGE_FILE = "stage.json"  # the fingerprint of a finished stage of `nexus-moe run`

OUTPUT_MARKER = ".nexus-moe.json"
# Names nexus-moe itself writes into an output folder after the folder was written (the stage
# fingerprint and cached evaluations of `nexus-moe run`, leftover temporaries).
_OWN_EXTRAS = (STAGE_FILE, "eval-*.json", ".*.tmp", ".*.old", ".*.nexus-moe.json")
FILE_RECORD_SUFFIX = ".nexus-moe.json"  # ".NAME.nexus-moe.json": the record of a file we wrote


@dataclass(frozen=True)
class OutputPolicy:
    """Who is writing: the command, a fingerprint of its inputs and options, and --overwrite."""

    command: str | None = None
    key: str | None = None
    overwrite: bool = False


_POLICY: contextvars.ContextVar[OutputPolicy | None] = contextvars.ContextVar(
    "nexus_moe_output_policy", default=None
)


@contextmanager
def output_policy(command: str, key: str | None = None, overwrite: bool = False) -> Iterator[None]:
    """Within the block, folders are written for ``command`` with configuration ``key``."""
    token = _POLICY.set(OutputPolicy(command, key, overwrite))
    try:
        yield
    finally:
        _POLICY.reset(token)


def set_output_policy(command: str, key: str | None = None, overwrite: bool = False) -> None:
    """Set the policy for the rest of the current context (one CLI command)."""
    _POLICY.set(OutputPolicy(command, key, overwrite))


def current_policy() -> OutputPolicy:
    return _POLICY.get() or OutputPolicy()


# A checkpoint written before output folders carried a marker holds only these files.
_LEGACY_CHECKPOINT_FILES = {
    CONFIG_FILE,
    WEIGHTS_FILE,
    TOKENIZER_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    RNG_FILE,
    UNDO_FILE,
}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return _legacy_marker(folder)
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None


def _legacy_marker(folder: Path) -> dict[str, Any] | None:
    """The marker a nexus-moe checkpoint from before markers would have had, else None."""
    try:
        doc = json.loads((folder / CONFIG_FILE).read_text())
        names = {p.name for p in folder.iterdir()}
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != "nexus-moe":
        return None
    files = sorted(names & _LEGACY_CHECKPOINT_FILES)
    return {"command": None, "key": None, "files": files, "legacy": True}


def is_own_output(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by nexus-moe (it holds our marker file)."""
    return _read_marker(Path(folder)) is not None


def holds_only_own_files(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by nexus-moe and holds nothing else."""
    folder = Path(folder)
    marker = _read_marker(folder)
    return marker is not None and not _foreign_entries(folder, marker)


def _foreign_entries(folder: Path, marker: dict[str, Any] | None) -> list[str]:
    """Entries of ``folder`` that nexus-moe did not write (sorted)."""
    listed = set(marker["files"]) if marker else set()
    foreign = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name == OUTPUT_MARKER or name in listed:
            continue
        if marker is not None and any(fnmatch.fnmatchcase(name, p) for p in _OWN_EXTRAS):
            continue
        if (
            marker is not None
            and entry.is_dir()
            and not entry.is_symlink()
            and is_own_output(entry)
        ):
            continue  # a folder nexus-moe wrote inside its own output (e.g. cached token shards)
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_output_dir(
    target: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), keyed: bool = True
) -> None:
    """NexusError unless :func:`atomic_dir` may write ``target`` under the current policy.

    Commands call this before long work starts, so that a bad ``--out`` is reported at once.
    ``inputs`` are paths the command reads: ``target`` may be neither one of them nor contain one.
    ``keyed=False`` skips the same-configuration check (for caches named by their contents).
    """
    target = Path(target)
    resolved = target.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == resolved or resolved in path.parents:
            raise NexusError(
                f"{target}: the output folder {'is' if path == resolved else 'contains'} the "
                f"input {item}; writing it would destroy the input — choose another --out"
            )
    if not target.exists() and not target.is_symlink():
        _check_writable(target)
        return
    if not target.is_dir():
        raise NexusError(f"{target}: exists and is a file, not a folder; choose a folder for --out")
    marker = _read_marker(target)
    foreign = _foreign_entries(target, marker)
    if foreign:
        raise NexusError(
            f"{target}: folder holds files nexus-moe did not write ({_describe(foreign)}); "
            "nothing was changed — choose an empty or new folder for --out"
        )
    policy = current_policy()
    if (
        keyed
        and marker is not None
        and policy.command is not None
        and not policy.overwrite
        and (marker.get("command"), marker.get("key")) != (policy.command, policy.key)
    ):
        what = marker.get("command") or "nexus-moe"
        raise NexusError(
            f"{target}: holds the output of another `{what}` run (other inputs or options); "
            "pass --overwrite to replace it, or choose another --out"
        )
    _check_writable(target)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(target: Path) -> None:
    """NexusError when nothing can be created beside (or in place of) ``target``."""
    parent = _existing_ancestor(target.parent if target.name else target)
    if not parent.is_dir():
        raise NexusError(f"{parent}: is a file, so {target} cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nexus-moe-probe.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NexusError(
            f"{parent}: cannot write here ({exc.strerror or exc}); choose a writable folder"
        ) from exc


def check_free_space(target: str | os.PathLike, need_bytes: int) -> None:
    """NexusError when the file system of ``target`` has less than ``need_bytes`` free."""
    parent = _existing_ancestor(Path(target))
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise NexusError(
            f"{parent}: only {free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB "
            "needed; free some space or choose another output folder"
        )


def _remove_leftovers(target: Path) -> None:
    """Remove temporaries of earlier, interrupted writes of ``target`` (our names only)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for entry in siblings:
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and is_own_output(old):
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed onto ``target``, on error removed."""
    target = Path(target)
    if target.is_dir():
        raise NexusError(f"{target}: is a folder; a file path is expected here")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private (0600); outputs are ordinary
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(
    target: str | os.PathLike,
    guard: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
    keyed: bool = True,
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target``.

    With ``guard`` (the default) ``target`` must pass :func:`check_output_dir` first, and the
    written folder gets the marker file that lets later runs recognise it. ``guard=False`` is for
    private caches whose every file nexus-moe owns.
    """
    target = Path(target)
    inputs = list(inputs)
    if guard:
        check_output_dir(target, inputs, keyed)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp_path
        _finish_modes(tmp_path)
        if guard:
            policy = current_policy()
            files = sorted(p.name for p in tmp_path.iterdir() if p.name != OUTPUT_MARKER)
            marker = {"command": policy.command, "key": policy.key, "files": files}
            marker_path = tmp_path / OUTPUT_MARKER
            marker_path.write_text(json.dumps(marker, indent=2) + "\n")
            marker_path.chmod(0o666 & ~_umask())
        old = None
        if target.exists():
            if guard:
                check_output_dir(target, inputs, keyed)  # it may have changed meanwhile
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp_path, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def _finish_modes(folder: Path) -> None:
    """Ordinary permissions for everything written (mkdtemp and some writers make it private).

    Symbolic links are left alone: chmod would follow them, out of the folder or, for a link
    that dangles (Debian packages unpacked with ``dpkg -x`` have such links), fail.
    """
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o777 & ~mask)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask portably means setting it and restoring it
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{FILE_RECORD_SUFFIX}")


def _recorded_hashes(target: Path) -> list[str]:
    try:
        doc = json.loads(_record_path(target).read_text())
    except (OSError, ValueError):
        return []
    hashes = doc.get("sha256") if isinstance(doc, dict) else None
    return [h for h in hashes if isinstance(h, str)] if isinstance(hashes, list) else []


def is_own_file(target: str | os.PathLike) -> bool:
    """True when nexus-moe wrote the file ``target`` as it is now.

    Its record beside it (``.NAME.nexus-moe.json``) names the sha256 of what was written; a file
    in a stage folder of ``nexus-moe run`` (``stage.json`` beside it), or in a folder where it
    writes a recipe's reports (:func:`_in_recipe_reports`), is the recipe's own too.
    A symbolic link is never ours (nexus-moe writes none).
    """
    target = Path(target)
    if target.is_symlink() or not target.is_file():
        return False
    if (target.parent / STAGE_FILE).is_file():
        return True
    if _in_recipe_reports(target.parent):
        return True  # runs written before files carried records are re-run in place
    hashes = _recorded_hashes(target)
    return bool(hashes) and file_sha256(target) in hashes


def _in_recipe_reports(folder: Path) -> bool:
    """``folder`` is where ``nexus-moe run`` writes a recipe's reports: its ``results`` folder
    beside stage folders, or a later seed's ``s<N>/routing`` folder beside that seed's stages."""
    if folder.name == "results":
        return any(folder.parent.glob(f"*/{STAGE_FILE}"))
    if folder.name == "routing" and re.fullmatch(r"s\d+", folder.parent.name):
        return any(folder.parent.glob(f"*/*/*/{STAGE_FILE}"))
    return False


def check_output_file(
    target: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), option: str = "--out"
) -> None:
    """NexusError naming ``option`` unless :func:`output_file` may write ``target``.

    ``target`` may be neither one of ``inputs`` nor inside an input folder, nor a folder, nor an
    existing file nexus-moe did not write; its folder must be writable.
    """
    target = Path(target)
    if target.is_dir():
        raise NexusError(f"{option} {target}: is a folder; {option} takes a file path")
    resolved = target.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == resolved or path in resolved.parents:
            where = "is" if path == resolved else "is inside"
            raise NexusError(
                f"{option} {target}: {where} the input {item}; writing it would change the "
                f"command's input — choose a path outside its inputs for {option}"
            )
    if (target.exists() or target.is_symlink()) and not is_own_file(target):
        raise NexusError(
            f"{option} {target}: the file exists and nexus-moe did not write it (or it was "
            f"changed since); nothing was changed — choose a new path for {option}, or remove "
            "the file yourself"
        )
    _check_writable(target)


@contextmanager
def output_file(
    target: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), option: str = "--out"
) -> Iterator[Path]:
    """Yield a temporary path for the user-chosen output file ``target``; on success it replaces
    ``target`` and a record beside it marks the file as nexus-moe's (see :func:`is_own_file`).

    ``target`` is checked with :func:`check_output_file` before and again right before the rename.
    """
    target = Path(target)
    inputs = list(inputs)
    check_output_file(target, inputs, option)
    record = _record_path(target)
    with atomic_path(target) as tmp:
        yield tmp
        check_output_file(target, inputs, option)  # it may have changed meanwhile
        new = file_sha256(tmp)
        old = _recorded_hashes(target) if target.is_file() else []
        doc = {"command": current_policy().command, "file": target.name}
        # Until the rename, the file in place may still be the old one: both hashes are ours.
        write_json(record, {**doc, "sha256": [new, *old[:1]]})
    write_json(record, {**doc, "sha256": [new]})


def write_output_json(
    path: str | os.PathLike,
    obj: Any,
    inputs: Iterable[str | os.PathLike] = (),
    option: str = "--out",
) -> None:
    """Write ``obj`` as indented JSON to the user-chosen ``path`` through :func:`output_file`."""
    with output_file(path, inputs, option) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a missing or malformed file into a NexusError that names it."""
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NexusError(
            f"{path}: not valid JSON ({exc}); the file is corrupt or truncated"
        ) from exc
