"""A run directory's single writer and clean stops: the flock'd lock file that names its holder, and the signal guard.

Kept apart from ``spectra.results`` (the run directory's files) because neither knows anything of
rows, tensors or checkpoints: the lock says who writes a directory, the guard when a signal may
end the process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from spectra.errors import SpectraError

LOCK_FILE = ".lock"
PARTIAL_SUFFIX = ".partial"


class Stop(BaseException):
    """Raised by the signal handler to abandon the current step; a BaseException, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalGuard:
    """SIGTERM and SIGINT stop a run between writes, never in the middle of one.

    Outside a write a signal abandons the current step at once (nothing of that step is on disk
    yet); inside ``writing()`` it is held until the write is complete. Handlers are installed only
    in the main thread, and only while the guard is entered.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._writing = 0
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._writing:
            self._pending = signum
        else:
            raise Stop(signum)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A write that a signal must not cut short; a signal received meanwhile stops the run right after it."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if not self._writing and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Stop(signum)


class RunLock:
    """An exclusive ``flock`` on a run directory's lock file, which names the process holding it.

    The kernel drops the lock when the holder exits, however it exits, so a lock is never stale.
    """

    def __init__(self, handle: IO[str], directory: Path) -> None:
        self._handle: IO[str] | None = handle
        self.directory = directory

    @classmethod
    def acquire(cls, directory: Path) -> "RunLock":
        """Lock ``directory`` for this process, or raise a SpectraError naming the process that has it."""
        path = directory / LOCK_FILE
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as err:
            raise SpectraError(
                f"Cannot lock the run directory {directory}: {reason(err)}. {fix(err, directory)} and run the command again."
            ) from err
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpectraError(busy_message(directory)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            handle.close()
            raise SpectraError(
                f"The run directory {directory} was moved or finished while spectra was locking it (another "
                "process wrote it). Run the command again."
            )
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
                   "command_line": " ".join(sys.argv)}, handle)
        handle.flush()
        return cls(handle, directory)

    def moved_to(self, directory: Path) -> None:
        """Record that the locked directory was renamed (the lock travels with its file)."""
        self.directory = directory

    def release(self, remove: bool = False) -> None:
        """Drop the lock (and with ``remove`` its file first); safe to call twice."""
        if self._handle is None:
            return
        if remove:
            (self.directory / LOCK_FILE).unlink(missing_ok=True)
        self._handle.close()
        self._handle = None

    def __del__(self) -> None:
        self.release()


def live_writer(directory: Path) -> dict[str, Any] | None:
    """Who holds ``directory``'s lock right now ({pid, host, started, command_line}), or None when nobody does."""
    try:
        handle = open(directory / LOCK_FILE, encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                owner = {}
            return owner if isinstance(owner, dict) else {}
        return None


def busy_message(directory: Path) -> str:
    """The refusal a second writer gets: which process holds the run, and what to do."""
    owner = live_writer(directory) or {}
    pid = owner.get("pid")
    who = f"process {pid}" if pid else "another process"
    if owner.get("host"):
        who += f" on {owner['host']}"
    details = ", ".join(part for part in (f"`{owner['command_line']}`" if owner.get("command_line") else "",
                                          f"started {owner['started']}" if owner.get("started") else "") if part)
    stop = f"stop it (kill {pid})" if pid else "stop it"
    run = run_of(directory)
    return (
        f"The run directory {directory} is being written by {who}{f' ({details})' if details else ''} right now. Two "
        f"writers would corrupt the run: wait for that process to finish, or {stop} and then continue the run with "
        f"--resume {run}; to run something else at the same time, choose another --out."
    )


def run_of(directory: Path) -> Path:
    """The run's own path for a run or partial directory (``runs/X.partial`` -> ``runs/X``)."""
    directory = Path(directory)
    if directory.name.endswith(PARTIAL_SUFFIX):
        return directory.with_name(directory.name.removesuffix(PARTIAL_SUFFIX))
    return directory


def partial_of(path: Path) -> Path:
    """The partial directory a run is written in (``runs/X`` -> ``runs/X.partial``)."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def reason(err: BaseException) -> str:
    """An OS error in words with its errno name ('No space left on device (ENOSPC)'), else the error's text."""
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code in errno.errorcode:
        return f"{os.strerror(code)} ({errno.errorcode[code]})"
    return str(err) or type(err).__name__


def fix(err: BaseException, where: Path) -> str:
    """What to do about a failed write, by cause."""
    code = getattr(err, "errno", None)
    text = str(err).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space" in text:
        return f"Free disk space on the device that holds {where}"
    if code == errno.EROFS or "read-only" in text:
        return f"The file system that holds {where} is read-only: remount it writable or move the run to a writable disk"
    if code in (errno.EACCES, errno.EPERM) or "permission" in text:
        return f"Make {where} writable for this user"
    return "Fix the cause"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
