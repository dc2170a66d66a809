"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half of one.

Every file cnnlab writes (checkpoints, metrics, results, the tensor cache, pictures, reports) goes
through ``atomic_write_bytes``: the bytes go to a hidden temp file beside the target, are flushed
to disk, then renamed over it. A process killed mid-write (``kill -9``, power loss) leaves the old
file intact plus, at worst, its hidden temp file ``.NAME~HOST~PID~XXXX.tmp``; the next write into
that folder removes the temp files of writers that no longer run. A failed write leaves the old
file as it was: a full disk is one line naming the file (``CnnlabError``), another error an
``OSError`` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import socket
import tempfile
from pathlib import Path

import torch

from cnnlab.errors import CnnlabError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename; a failed write leaves ``path`` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~{socket.gethostname()}~{os.getpid()}~",
                                   suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file: a crash leaves one or the other
        umask = os.umask(0o022)
        os.umask(umask)  # (reading the umask means setting it; it is set straight back)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def check_writable(path: Path) -> Path:
    """Before any work, that ``--out PATH`` can be written by ``atomic_write_bytes`` (which makes
    missing folders): it is not a folder, and the nearest folder above it that exists is a
    writable folder (a dangling symlink counts as existing, and is no folder)."""
    path = Path(path)
    if path.is_dir():
        raise CnnlabError(f"--out {path}: a directory; give a file name inside it")
    above = path.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise CnnlabError(f"--out {path}: {above} is not a folder; choose another place")
    if not os.access(above, os.W_OK | os.X_OK):
        raise CnnlabError(f"--out {path}: the folder {above} is not writable; choose another place")
    return path


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_error(path: Path, e: OSError) -> Exception:
    """What to raise for a failed write of ``path``: one line for a full disk, else ``e`` naming ``path``."""
    if e.errno in DISK_FULL:
        return CnnlabError(f"disk full: could not write {path} ({e.strerror}); free some space and run again "
                           f"(what was there before is unchanged)")
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files in ``folder`` left by writers on this host that no longer run (killed
    mid-write). A temp file of a writer that still runs (another process filling the same cache) stays."""
    host = socket.gethostname()
    for tmp in folder.glob(".*~*~*~*.tmp"):
        _, tmp_host, pid, _ = tmp.name.rsplit("~", 3)
        if tmp_host == host and pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def held_lock(path: Path):
    """Hold an exclusive ``flock`` on the file ``path`` (made if missing) for the block; another
    process waits here. The kernel frees it when its holder dies, ``kill -9`` included, so a lock
    never outlives its process the way a lock *file* does."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
