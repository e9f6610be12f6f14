"""Atomic outputs: a file or folder is either complete or absent, with the modes a plain ``open``/``mkdir`` gives.

* :class:`AtomicFolder` builds a folder under a hidden temporary sibling name (``.NAME.tmp-XXXXXXXX``) and
  renames it into place at the end; on any exception, Ctrl-C and SIGTERM included (see
  :mod:`nnunetv2_ohem.cli_common`), the temporary folder is removed.
* :func:`atomic_path` / :func:`atomic_file` / :func:`write_text_atomic` do the same for single files
  (temporary sibling ``.tmp-XXXXXXXX-NAME``, same extension, ``os.replace`` at the end).

``tempfile.mkdtemp``/``mkstemp`` are not used on purpose: they create ``0700``/``0600`` whatever the umask, so
group members of a shared project folder could not read the outputs. Here folders are made by ``os.mkdir``
(``0o777 & ~umask``) and files by ``os.open(..., 0o666)`` (``0o666 & ~umask``).

A temporary folder holds a marker file (:data:`MARKER`: pid, host, process start) until it is renamed into
place. A later run on the same target removes temporary siblings whose process is gone (same host, pid not
running) and names those it cannot judge (a live process, another host, no marker) in one line each.

Commit and cleanup run with SIGINT/SIGTERM blocked, so a second Ctrl-C cannot leave half a cleanup behind; a
signal that arrives meanwhile is delivered right after. Torch-free.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
from typing import IO, Callable, Iterator, List, Optional

from nnunetv2_ohem.cli_common import UserError

MARKER = ".nnunetv2_ohem_tmp.json"
_TMP_TAG = ".tmp-"
Log = Callable[[str], None]


class OutputError(UserError, OSError):
    """The output cannot be created where asked (exit code 1 under :func:`~nnunetv2_ohem.cli_common.run_cli`)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and must not be replaced, or appeared while it was being written."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer SIGINT and SIGTERM (this thread) for the duration of the block; pending ones fire afterwards."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - non-POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------------------------- owner markers

def process_start(pid: int) -> Optional[str]:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), ``None`` if
    unknown. Stored with the pid so that a pid reused by another process is not taken for the writer."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # fields after "(comm)" start at field 3


def pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether process ``pid`` runs (and, when ``start`` is given and knowable, is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, belongs to another user
        pass
    if start is not None:
        now = process_start(pid)
        return now is None or now == start
    return True


def owner_record() -> dict:
    """What :data:`MARKER` holds for this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def write_marker(folder: str) -> None:
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(owner_record(), f)


def stale_state(folder: str) -> str:
    """``"dead"`` when the marker of ``folder`` names a process of this host that no longer runs, else a
    short reason why the folder is left alone (``"of running process 123"``, ``"of a run on host h"``,
    ``"without owner marker"``)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "without owner marker"
    if host != socket.gethostname():
        return f"of a run on host {host} (pid {pid})"
    if pid_alive(pid, owner.get("start")):
        return f"of running process {pid}"
    return "dead"


def sweep_stale(target: str, log: Log = _stderr) -> List[str]:
    """Remove temporary siblings of ``target`` left by dead runs; name the others. Returns removed paths."""
    target = os.path.abspath(target)
    parent, prefix = os.path.dirname(target), f".{os.path.basename(target)}{_TMP_TAG}"
    removed = []
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        state = stale_state(path)
        if state == "dead":
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log(f"removed {path}: temporary folder of an interrupted run whose process is gone")
        else:
            log(f"note: {path}: temporary folder {state} left in place (remove it once no run writes {target})")
    return removed


# -------------------------------------------------------------------------------------------- folders

def _new_sibling(parent: str, prefix: str) -> str:
    """Create an empty folder ``parent/prefixXXXXXXXX`` with plain ``mkdir`` modes; return its path."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


class AtomicFolder:
    """``with AtomicFolder(target, overwrite) as tmp: ...`` — fill ``tmp``; on success it becomes ``target``.

    An existing ``target`` is replaced only with ``overwrite`` (moved aside first, deleted after the swap;
    whether it *may* be replaced is the caller's decision, made before any work). Without ``overwrite`` a
    target that appeared meanwhile raises :class:`OutputExistsError`. On any exception ``tmp`` is removed and so are
    the parent folders this created. ``log`` receives the one-line notes of :func:`sweep_stale`.
    """

    def __init__(self, target: str, overwrite: bool = False, log: Log = _stderr):
        self.target = os.path.abspath(target)
        self.overwrite = overwrite
        self.parent = os.path.dirname(self.target)
        self.log = log
        self._made_parents: List[str] = []
        self.tmp: Optional[str] = None

    def __enter__(self) -> str:
        missing, p = [], self.parent
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        self._made_parents = missing
        try:
            os.makedirs(self.parent, exist_ok=True)
            sweep_stale(self.target, self.log)
            with signals_blocked():   # no window with a folder that has no marker
                self.tmp = _new_sibling(self.parent, f".{os.path.basename(self.target)}{_TMP_TAG}")
                write_marker(self.tmp)
        except OSError as e:
            self._cleanup()
            raise OutputError(f"{self.target}: cannot create the output ({e.strerror or e}: "
                              f"{e.filename or self.parent})") from None
        except BaseException:
            self._cleanup()
            raise
        return self.tmp

    def _cleanup(self) -> None:
        if self.tmp and os.path.lexists(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        for p in self._made_parents:   # deepest first; some may not have been made
            if not os.path.isdir(p):
                continue
            try:
                os.rmdir(p)
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb) -> bool:
        with signals_blocked():
            if exc_type is not None:
                self._cleanup()
                return False
            try:
                self._commit()
            except BaseException:
                self._cleanup()
                raise
        return False

    def _commit(self) -> None:
        old = None
        if os.path.lexists(self.target):
            if not self.overwrite:
                raise OutputExistsError(f"{self.target}: appeared while writing; nothing was replaced")
            old = self.tmp + "-old"       # matches the sweep's prefix: a crash right here leaves a marked folder
            os.rename(self.target, old)
            if os.path.isdir(old) and not os.path.islink(old):
                write_marker(old)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.tmp, MARKER))
        try:
            os.rename(self.tmp, self.target)
        except BaseException:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(old, MARKER))
                os.rename(old, self.target)
            raise
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)


# ---------------------------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a fresh temporary file name next to ``path`` (same ending, so writers that choose the format by
    extension work); after the block it replaces ``path``, on any exception it is removed. The file exists
    (empty, ``0o666 & ~umask``) when the block starts; writers may overwrite it by name. Missing parent folders
    are made; a location that cannot be written raises :class:`OutputError` (one line)."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            tmp = os.path.join(folder, f"{_TMP_TAG}{secrets.token_hex(4)}-{name}")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as e:
        raise OutputError(f"{path}: cannot create the output ({e.strerror or e}: {e.filename or folder})") from None
    try:
        yield tmp
        with signals_blocked():
            os.replace(tmp, path)
    except BaseException:
        with signals_blocked():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``with atomic_file(path) as f: f.write(...)`` — ``open(tmp, mode, **open_kwargs)`` renamed onto ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(text)
