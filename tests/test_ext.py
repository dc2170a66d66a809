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


def test_a_process_killed_while_building_does_not_stop_later_builds(tmp_path):
    """torch marks a build in progress with a ``lock`` file that only its builder removes: killed with
    SIGKILL mid-build, it left the file, and every later process waited for it forever (a CI run hung
    this way). The next process now builds and loads the kernel."""
    source = '#include "kernels.h"\nfloat thrice(float v) { return cnnlab::widen(v) * 3; }\n'
    folder = tmp_path / "build"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", BUILD, source, str(folder)]
    first = subprocess.Popen(cmd, env=env, start_new_session=True)  # its compiler dies with it
    end = time.monotonic() + 120
    while not (folder / "lock").exists():
        assert first.poll() is None and time.monotonic() < end, "the build ended before it could be killed"
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (folder / "lock").exists()  # what the killed builder left behind
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert not (folder / "lock").exists()
    assert any(p.suffix == ".so" for p in folder.iterdir())
