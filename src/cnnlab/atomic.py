"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half of one.

Every file cnnlab writes (checkpoints, metrics, results, the tensor cache, pictures, reports) goes
through ``atomic_write_bytes``: the bytes go to a hidden temp file beside the target, are flushed
to disk, then renamed over it. A process killed mid-write (``kill -9``, power loss) leaves the old
file intact plus, at worst, its hidden temp file ``.NAME~HOST~PID~XXXX.tmp``; the next write of
NAME removes temp files whose writer no longer runs. A full disk or another write error is one
line naming the file (``CnnlabError``), and the old file is left as it was.
"""

from __future__ import annotations

import errno
import glob
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
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path) + f"{socket.gethostname()}~{os.getpid()}~",
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


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_error(path: Path, e: OSError) -> CnnlabError:
    """The one-line error for a failed write of ``path``: a full disk says so."""
    if e.errno in DISK_FULL:
        return CnnlabError(f"disk full: cannot write {path} ({e.strerror}); free some space and run again "
                           f"(the previous {path.name}, if any, is unchanged)")
    return CnnlabError(f"cannot write {path} ({e.strerror or e}); check the folder exists and is writable")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}~"


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files of ``path`` left by writers on this host that no longer run (killed mid-write).

    A temp file of a writer that still runs (another process filling the same cache) is left alone."""
    prefix, host = _temp_prefix(path), socket.gethostname()
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        fields = tmp.name[len(prefix):].split("~")
        if len(fields) == 3 and fields[0] == host and fields[1].isdigit() and not pid_alive(int(fields[1])):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
