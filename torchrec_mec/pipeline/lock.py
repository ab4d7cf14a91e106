"""The run directory's lock: one writer at a time; under torchrun the job, not each rank, holds it.

The lock is ``flock(2)`` on ``DIR/mec.lock``. The kernel releases it when the holding process
ends, however it ends (SIGKILL, a crash, a lost node once its NFS lease expires), so a lock left
behind by a dead process is free again without any guess from pids (which are per host and get
reused), and two processes racing for it cannot both win: the kernel grants it to one. The file
itself is never removed (removing a lock file lets a late opener lock a file nobody else sees);
while held it names the holder (host, pid, since when, command), which is what a second writer is
told. A holder that ended without releasing leaves its name in the file: the next one to take the
lock says that it took over from it.

This module uses the standard library only (``runner.py`` holds the lock for a torchrun job).
``flock`` needs a local file system or NFS (Linux emulates it with NFS byte-range locks); run
directories on object stores cannot be locked.
"""
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

logger = logging.getLogger(__name__)

LOCK_FILE = "mec.lock"
_HOLDER_WAIT_S = 2.0  # how long a refused process waits for the holder to write its name
_COMMAND_CHARS = 100  # of the holder's command line, in the message


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock; the message names it (host, pid, since).

    Example::

        >>> str(RunLockedError("runs/x is in use"))
        'runs/x is in use'
    """


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run directory's lock.

    Args:
        host (str): the holder's host name.
        pid (int): its process id on that host.
        since (str): when it took the lock (ISO 8601, UTC).
        command (str): its command line.

    Example::

        >>> LockHolder("node1", 4242, "2026-01-01T10:00:00+00:00", "mec run").describe()
        'pid 4242 on node1 since 2026-01-01T10:00:00+00:00 (mec run)'
    """

    host: str
    pid: int
    since: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"

    @staticmethod
    def this_process() -> "LockHolder":
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else ["python"]
        command = " ".join(argv)
        if len(command) > _COMMAND_CHARS:
            command = command[: _COMMAND_CHARS - 3] + "..."
        return LockHolder(socket.gethostname(), os.getpid(), now, command)


class RunLock:
    """An exclusive lock on a run directory, held by this process from :meth:`acquire` to
    :meth:`release` (or the process's end).

    Args:
        run_dir (str): the run directory (created if missing).

    Example::

        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> with RunLock(run_dir):
        ...     try:
        ...         RunLock(run_dir).acquire()
        ...     except RunLockedError as e:
        ...         print("refused:", "is in use by pid" in str(e))
        refused: True
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[LockHolder]:
        """Takes the lock or raises :class:`RunLockedError` at once, naming the holder.

        Returns:
            Optional[LockHolder]: the previous holder if it ended without releasing the lock (a
            stale lock, now taken over), else ``None``.
        """
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self._wait_for_holder()
            who = holder.describe() if holder else "another process (its name is not written yet)"
            raise RunLockedError(
                f"{self.run_dir} is in use by {who}: one mec command at a time may write a run "
                f"directory. Wait for it to finish, or stop it; a lock whose process has ended is "
                f"taken over by the next command") from None
        previous = _parse_holder(_read_all(fd))
        me = LockHolder.this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous is not None:
            logger.warning("%s: took over the lock left by %s, which ended without releasing it",
                           self.run_dir, previous.describe())
        return previous

    def release(self) -> None:
        """Clears the holder's name and releases the lock (no-op if not held)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _wait_for_holder(self) -> Optional[LockHolder]:
        """The holder's name. It writes it right after taking the lock, over the name of the
        previous holder, so wait a moment while the file is empty or names a dead process."""
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            try:
                with open(self.path, "rb") as f:
                    holder = _parse_holder(f.read())
            except FileNotFoundError:
                holder = None
            current = holder is not None and (holder.host != socket.gethostname()
                                              or _alive(holder.pid))
            if current or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_all(fd: int) -> bytes:
    chunks: List[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _parse_holder(raw: bytes) -> Optional[LockHolder]:
    try:
        fields = json.loads(raw.decode("utf-8"))
        return LockHolder(str(fields["host"]), int(fields["pid"]), str(fields["since"]),
                          str(fields["command"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # empty (free, or the holder has not written its name yet) or foreign
