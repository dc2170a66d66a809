"""Building cnnlab's C++ CPU kernels (``dwconv.cpp``, ``bnact.cpp``) on first use.

Each kernel file is compiled the first time it is needed (``torch.utils.cpp_extension.load_inline``,
ninja and a C++ compiler, a few seconds) into ``~/.cache/cnnlab/ext`` (``$CNNLAB_EXT_DIR``), in a
folder named by a hash of the sources, the compiler flags, torch's version, the CPU's features and
where cnnlab and torch are installed, so a cache copied to another machine never runs code built for
a different CPU, and two checkouts or venvs never rebuild each other's copy. Nothing is built
at install time: pip's isolated build environment would need its own (multi-GB) torch. Without a
compiler or ninja, ``load`` warns once and returns False, and the caller uses torch's kernels.

torch marks a build in progress with a file (``lock`` in the build folder) that the building process
removes when it is done; a process killed meanwhile (``kill -9`` while it starts up) leaves it, and
every later load would wait for it forever. cnnlab's processes take a kernel lock first
(``build.lock``, freed when its holder dies), under which a ``lock`` file can only be a dead
builder's: it is removed once the ninja and compiler that builder started, which outlive it and run
in the folder, are done. A cache folder that cannot be written is a failed build (a warning, torch's
kernels).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from cnnlab.atomic import held_lock

HERE = Path(__file__).parent
HEADER = HERE / "kernels.h"  # shared by every kernel file (#include "kernels.h")


class BuildError(Exception):
    """The extension could not be built or loaded (no compiler, no ninja, a compile error)."""


def compiler_flags() -> list[str]:
    """-O3 with OpenMP (torch's ``parallel_for``); on x86-64 also this CPU's instruction set
    (AVX-512 where there is one), which is why the cache folder is keyed by the CPU's features."""
    flags = ["-O3", "-fopenmp", "-Wno-c++20-extensions"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return flags


def cpu_features() -> str:
    """What the CPU can run (the flags line of /proc/cpuinfo on Linux, else the processor name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir(name: str, source: str) -> Path:
    """The cache folder of one build: ``source`` is every text that goes into it (kernel and header)."""
    root = Path(os.environ.get("CNNLAB_EXT_DIR") or Path.home() / ".cache" / "cnnlab" / "ext").expanduser()
    # the build's command line names this package's folder and torch's (include paths): two checkouts
    # or venvs sharing one folder would each find the other's build stale and recompile it
    installs = [str(HERE), str(Path(torch.__file__).parent)]
    key = "\n".join([source, " ".join(compiler_flags()), torch.__version__, sys.version, cpu_features(), *installs])
    return root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@contextmanager
def _ninja_on_path():
    """torch runs ``ninja`` from PATH; the pip package puts it beside the venv's python, which is on
    PATH only in an activated venv: add that folder for the build."""
    if shutil.which("ninja"):
        yield
        return
    try:
        import ninja
    except ImportError:
        raise BuildError("ninja is not installed (pip install ninja)") from None
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build(source: str, directory: Path, name: str) -> None:
    """Compile ``source`` in ``directory`` (a no-op when it is up to date) and load it into torch.ops.
    ``name``: torch keeps one build per name and process, so another source needs another name."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise BuildError(f"no C++ compiler ({compiler}) found; install g++ (or set CXX)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path(), held_lock(directory / "build.lock"):
            clear_dead_build(directory)
            cpp_extension.load_inline(name, [source], extra_cflags=compiler_flags(), extra_ldflags=["-fopenmp"],
                                      extra_include_paths=[str(HERE)], build_directory=str(directory),
                                      is_python_module=False, no_implicit_headers=True)
    except (RuntimeError, OSError) as e:  # a failed build (RuntimeError), a bad library or a folder we cannot write
        raise BuildError(f"{type(e).__name__}: {e}") from None


def clear_dead_build(directory: Path, wait_s: float = 300.0) -> None:
    """Under ``build.lock``, torch's ``lock`` marker in ``directory`` is a dead builder's: remove it,
    once the ninja and compiler that builder started are done (they outlive a SIGKILL of their
    parent and run in the folder; a second build beside them would write the same files)."""
    if not (directory / "lock").exists():
        return
    end = time.monotonic() + wait_s
    while working_in(directory) and time.monotonic() < end:
        time.sleep(0.1)
    (directory / "lock").unlink(missing_ok=True)


def working_in(directory: Path) -> bool:
    """Whether another process runs in ``directory`` (its working folder, from Linux's /proc; False
    where there is no /proc)."""
    target, me = str(directory.resolve()), str(os.getpid())
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.parent.name != me and os.readlink(cwd) == target:
                return True
        except OSError:  # ended meanwhile, or another user's
            continue
    return False


def kernel_file(name: str, filename: str) -> tuple[str, Path]:
    """The source of the kernel file ``filename`` and the cache folder of its build as ``name``."""
    source = (HERE / filename).read_text()
    return source, build_dir(name, HEADER.read_text() + source)


def cached(name: str, filename: str) -> bool:
    """Whether the cache holds a build of ``filename`` as ``name`` already (``load`` compiles nothing)."""
    _, directory = kernel_file(name, filename)
    return directory.is_dir() and any(p.suffix == ".so" for p in directory.iterdir())


@functools.cache
def load(name: str, filename: str, what: str) -> bool:
    """Build and load the kernel file ``filename`` as ``torch.ops.<name>`` (once per process; the
    compiled library is cached on disk). A failed build warns once, naming ``what`` falls back, and
    gives False."""
    source, directory = kernel_file(name, filename)
    try:
        build(source, directory, name)
    except BuildError as e:
        warnings.warn(f"cnnlab: the fast {what} could not be built ({e}); using torch's slower kernel",
                      RuntimeWarning, stacklevel=3)
        return False
    return True
