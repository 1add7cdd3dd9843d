"""Writing into the output directory without ever losing what is there.

fastdpo records every top-level name it writes in `OUTPUT_DIR/.fastdpo-files.json`, before writing it; it removes
only those, and it refuses a directory that holds anything else. Every file and directory goes to a temporary name
first and is renamed into place; a write that fails (no permission, a full disk, a file-size limit) removes its
temporary copy, leaves the previous state as it was and ends with one line: what failed, where, and how much
space it needed. What fastdpo writes follows the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from fastdpo.errors import UserError

RECORD = ".fastdpo-files.json"
TEMPORARY = ".tmp-"  # the prefix of every temporary name fastdpo writes


class WriteError(UserError):
    """A write into the output directory or a cache failed; nothing half-written was left."""


def write_error(what: str, where: str, error: OSError, needed: int | None = None) -> WriteError:
    """One line: what could not be written, where, why, and the space it needed where that is known."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)
        reason = "the disk is full" + (f": it needs {_size(needed)}" if needed else "") + \
            (f", {_size(free)} free there" if free is not None else "")
    elif error.errno == errno.EFBIG:
        reason = "a file is larger than this process may write (the file-size limit, ulimit -f)" + \
            (f"; it needs {_size(needed)}" if needed else "")
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"{reason}: choose a directory you can write to"
    return WriteError(f"could not write {what} to {where}: {reason}")


def os_error(error: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: the error itself, the one torch's serializer raised its
    RuntimeError from, or the one safetensors names in its message ("os error 28"); None for any other error."""
    import re

    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if type(error).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(error))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
    return None


def torch_save(obj, path: str) -> None:
    """torch.save through a Python file, so that a failed write keeps its operating-system error."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def _size(n: int | None) -> str:
    return "?" if n is None else (f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB")


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _mode(directory: bool) -> int:
    """The mode a new file (or directory) gets under the user's umask. Reading the umask sets it; it is put back
    at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_text(path: str, text: str, what: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_bytes(path: str, data: bytes, what: str | None = None) -> None:
    """Write `path` through a temporary file in the same directory and a rename: never half-written. A failure
    removes the temporary file, keeps what `path` held, and raises a WriteError (`what` names the file in it)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMPORARY, suffix=os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(directory=False))
        os.replace(tmp, path)
    except BaseException as e:
        failure = _failure(e, tmp, what or os.path.basename(path), directory, len(data))
        if failure is e:
            raise
        raise failure from None


@contextlib.contextmanager
def atomic_directory(path: str, what: str, needed: int | None = None):
    """A temporary directory beside `path` to write into; on success it replaces `path` (a stale `path` is removed
    first), on failure it is removed and a WriteError raised. Yields the temporary directory."""
    root = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=TEMPORARY + os.path.basename(path) + "-")
        yield tmp
        finish_directory(tmp, path)
    except BaseException as e:
        failure = _failure(e, tmp, what, root, needed)
        if failure is e:
            raise
        raise failure from None


def _failure(e: BaseException, tmp: str | None, what: str, where: str, needed: int | None) -> BaseException:
    """After a failed write: its temporary file or directory removed, the WriteError to raise for an OS error
    (`e` itself for anything else)."""
    _remove(tmp)
    cause = os_error(e)
    return e if cause is None else write_error(what, where, cause, needed)


def _remove(path: str | None) -> None:
    if path is None or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def finish_directory(tmp: str, path: str) -> None:
    """A directory written at `tmp` put in place as `path`: synced to disk, given the umask's modes, renamed (a
    stale `path` is removed first)."""
    _fsync_tree(tmp)
    _chmod_tree(tmp)
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def chmod_tree(path: str) -> None:
    """Give everything below `path` (and `path`) the modes the user's umask gives new files and directories."""
    _chmod_tree(path)


def _chmod_tree(path: str) -> None:
    files, dirs = _mode(directory=False), _mode(directory=True)
    for root, subdirs, names in os.walk(path):
        os.chmod(root, dirs)
        for name in names:
            os.chmod(os.path.join(root, name), files)


# --- what fastdpo wrote, and what a run may do with the directory ----------------------------------------------


def recorded(output_dir: str) -> dict:
    """The record of what fastdpo wrote in `output_dir`: {"files": [names], "finished": bool}."""
    try:
        with open(os.path.join(output_dir, RECORD), encoding="utf-8") as f:
            record = json.load(f)
        return {"files": list(record.get("files", [])), "finished": bool(record.get("finished"))}
    except (OSError, ValueError):
        return {"files": [], "finished": False}


def claim(output_dir: str, *names: str, finished: bool | None = None) -> None:
    """Add `names` (top-level entries of `output_dir`) to the record, before they are written."""
    record = recorded(output_dir)
    files = list(dict.fromkeys(record["files"] + list(names)))
    if files == record["files"] and (finished is None or finished == record["finished"]):
        return
    record = {"fastdpo": 1, "files": files, "finished": record["finished"] if finished is None else finished}
    atomic_write_text(os.path.join(output_dir, RECORD), json.dumps(record, indent=1) + "\n", "the record of "
                      "fastdpo's files")


def foreign(output_dir: str) -> list[str]:
    """The entries of `output_dir` that fastdpo did not write."""
    ours = set(recorded(output_dir)["files"]) | {RECORD}
    return sorted(e for e in os.listdir(output_dir) if e not in ours and not e.startswith(TEMPORARY))


def remove_ours(output_dir: str) -> None:
    """Remove what fastdpo wrote in `output_dir` (its record says what), and nothing else."""
    for name in recorded(output_dir)["files"] + [n for n in os.listdir(output_dir) if n.startswith(TEMPORARY)]:
        _remove(os.path.join(output_dir, name))
    _remove(os.path.join(output_dir, RECORD))


@dataclass(frozen=True)
class Plan:
    """What a run does with its output directory, decided before any heavy work."""

    resume_from: str | None = None  # the checkpoint to continue from
    clear: bool = False  # remove fastdpo's earlier files (only those) before writing
    notice: str | None = None  # one line to print


def plan_output_dir(output_dir: str, overwrite: bool, resume: bool, latest_checkpoint) -> Plan:
    """Check `output_dir` against --overwrite and --resume; refuse, in one line, anything that could lose a file
    fastdpo did not write or a run the user did not ask to replace. `latest_checkpoint(dir)`: the newest complete
    checkpoint there, or None."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir: {output_dir} exists and is not a directory", exit_code=2)
    _check_writable(output_dir)
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        notice = (f"fastdpo: --resume: {output_dir} holds no run yet; starting from the beginning" if resume
                  else None)
        return Plan(notice=notice)
    checkpoint = latest_checkpoint(output_dir)
    if resume and checkpoint:
        return Plan(resume_from=checkpoint)
    others = foreign(output_dir)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise UserError(f"--output_dir: {output_dir} is not empty: it holds files fastdpo did not write ({shown}); "
                        "choose an empty or new directory (--overwrite replaces only fastdpo's own files; nothing was "
                        "changed)", exit_code=2)
    record = recorded(output_dir)
    if resume:
        return Plan(clear=True, notice=f"fastdpo: --resume: {output_dir} has no checkpoint yet (its run stopped "
                                       "before the first); starting from the beginning")
    if not record["finished"] and not checkpoint:
        return Plan(clear=True, notice=f"fastdpo: {output_dir} holds a run that stopped before its first checkpoint; "
                                       "starting it again")
    if not overwrite:
        what = "a finished run" if record["finished"] else f"a run with a checkpoint ({os.path.basename(checkpoint)})"
        raise UserError(f"--output_dir: {output_dir} holds {what}; pass --overwrite to replace it or --resume to "
                        "continue it", exit_code=2)
    return Plan(clear=True)


def _check_writable(output_dir: str) -> None:
    """Refuse an output directory that cannot be written to, before anything is loaded."""
    target = output_dir
    while target and not os.path.exists(target):
        target = os.path.dirname(target)
    target = target or "."
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=TEMPORARY + "probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--output_dir: {output_dir}: cannot write there ({e.strerror or e}); choose a directory "
                        "you can write to", exit_code=2) from None
