"""Building cnnlab's C++ kernels: errors come back as one BuildError, builds are cached by what
goes into them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab import ext

ROOT = Path(__file__).resolve().parents[1]


def test_build_errors_are_reported_not_raised_raw(tmp_path, monkeypatch):
    with pytest.raises(ext.BuildError, match="Error building"):
        ext.build("#error this source does not compile\n", tmp_path / "broken", name="cnnlab_ext_broken")
    (tmp_path / "a file").write_text("")
    with pytest.raises(ext.BuildError, match="a file"):  # a cache folder that cannot be made or written
        ext.build("", tmp_path / "a file" / "build", name="cnnlab_ext_unwritable")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ext.BuildError, match="no C\\+\\+ compiler"):
        ext.build("", tmp_path / "none", name="cnnlab_ext_none")


def test_the_shared_header_is_found(tmp_path):
    """Kernel files include kernels.h from the package folder."""
    source = '#include "kernels.h"\nfloat twice(float v) { return cnnlab::widen(v) * 2; }\n'
    ext.build(source, tmp_path / "header", name="cnnlab_ext_header")
    assert any(p.suffix == ".so" for p in (tmp_path / "header").iterdir())


def test_cache_folder_is_keyed_by_name_source_and_cpu(monkeypatch):
    a = ext.build_dir("k", "int a;")
    assert ext.build_dir("k", "int a;") == a
    assert ext.build_dir("k", "int b;") != a
    assert ext.build_dir("other", "int a;") != a
    monkeypatch.setattr(ext, "cpu_features", lambda: "another cpu")
    assert ext.build_dir("k", "int a;") != a


def test_cache_folder_is_keyed_by_the_install(monkeypatch, tmp_path):
    """Two checkouts (or venvs) compile with different include paths: sharing a folder, each would
    find the other's build stale and recompile it on every switch."""
    a = ext.build_dir("k", "int a;")
    monkeypatch.setattr(ext, "HERE", tmp_path / "another" / "checkout" / "cnnlab")
    b = ext.build_dir("k", "int a;")
    assert b != a
    monkeypatch.setattr(ext.torch, "__file__", str(tmp_path / "another" / "venv" / "torch" / "__init__.py"))
    assert ext.build_dir("k", "int a;") not in (a, b)


BUILD = "import sys; from pathlib import Path; from cnnlab import ext; ext.build(sys.argv[1], Path(sys.argv[2]), 'cnnlab_ext_kill')"


@pytest.mark.parametrize("kill", ["the process", "its process group"])
def test_a_process_killed_while_building_does_not_stop_later_builds(tmp_path, kill):
    """torch marks a build in progress with a ``lock`` file that only its builder removes: killed with
    SIGKILL mid-build, it left the file, and every later process waited for it forever (a CI run hung
    this way). The next process now builds and loads the kernel, after the killed one's ninja and
    compiler (which outlive it when only the process is killed) are done."""
    source = '#include "kernels.h"\nfloat thrice(float v) { return cnnlab::widen(v) * 3; }\n'
    folder = tmp_path / "build"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", BUILD, source, str(folder)]
    first = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while not (folder / "lock").exists():
            assert first.poll() is None and time.monotonic() < end, "the build ended before it could be killed"
            time.sleep(0.005)
        if kill == "the process":
            os.kill(first.pid, signal.SIGKILL)
        else:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert (folder / "lock").exists()  # what the killed builder left behind
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the killed builder's compiler, if still running
        except ProcessLookupError:
            pass
    assert second.returncode == 0, second.stderr
    assert not (folder / "lock").exists()
    assert any(p.suffix == ".so" for p in folder.iterdir())
    assert not ext.working_in(folder)  # the first build's ninja was waited for, not raced


def sleeper_in(folder: Path, seconds: float) -> subprocess.Popen:
    """A process that sleeps with ``folder`` as its working folder, once ``working_in`` sees it."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], cwd=folder)
    end = time.monotonic() + 30
    while not ext.working_in(folder):
        assert time.monotonic() < end, "working_in never saw the process"
        time.sleep(0.01)
    return proc


def test_a_dead_builders_marker_goes_once_its_compiler_is_done(tmp_path):
    """The marker of a killed builder is removed only after the processes still working in the folder
    (its ninja and compiler) have ended, and not later than ``wait_s`` if one never ends."""
    (tmp_path / "lock").write_text("")
    ext.clear_dead_build(tmp_path)  # nobody works there: at once
    assert not (tmp_path / "lock").exists()
    (tmp_path / "lock").write_text("")
    compiler = sleeper_in(tmp_path, 2)
    ext.clear_dead_build(tmp_path)
    assert compiler.poll() is not None  # it waited for the process in the folder
    assert not (tmp_path / "lock").exists() and not ext.working_in(tmp_path)
    (tmp_path / "lock").write_text("")
    stuck = sleeper_in(tmp_path, 60)
    try:
        t0 = time.monotonic()
        ext.clear_dead_build(tmp_path, wait_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 30 and stuck.poll() is None
        assert not (tmp_path / "lock").exists()
    finally:
        stuck.kill()
        stuck.wait()
