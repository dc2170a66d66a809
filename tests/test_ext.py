"""Building cnnlab's C++ kernels: errors come back as one BuildError, builds are cached by what
goes into them."""

import pytest

from cnnlab import ext


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
