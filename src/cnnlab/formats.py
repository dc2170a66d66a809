"""Reading the file formats: IDX (MNIST family), CIFAR python-pickle batches, image folders.

Each reader checks what it reads and raises a one-line ``CnnlabError`` naming the file for
anything damaged or unexpected; a CIFAR pickle may hold only what a batch holds (no code runs).
``read_raw`` turns a folder of release files (or an image folder) into a ``Dataset``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from cnnlab.datasets import (CIFAR_LABEL_KEY, CIFAR_META, CIFAR_TEST, CIFAR_TRAIN, DATASETS, IDX_FILES, Dataset,
                             DatasetInfo, Split)
from cnnlab.errors import CnnlabError

MAX_IDX_BYTES = 1 << 32  # 4 GiB: EMNIST, the largest IDX dataset, is under 1 GiB
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def is_release_file(info: DatasetInfo, name: str, data: bytes) -> bool:
    """Whether ``data`` is the release file ``name`` (IDX: its uncompressed bytes), by published md5."""
    return md5_bytes(data) == info.md5.get(name)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def idx_dims(data: bytes) -> list[int]:
    """The dimensions in an IDX header (big-endian uint32s after the 4-byte magic; data[3] of them)."""
    return [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]


def read_idx_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, raw or .gz, read no further than its header says
    (plus one byte, so ``parse_idx`` sees that there is more): a small .gz that inflates without
    end (a gzip bomb) costs no more memory than the file it claims to be, and a header claiming
    more than ``MAX_IDX_BYTES`` is refused before anything is read."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\0\0\x08" or head[3] not in (1, 3):
                return head  # parse_idx names the wrong magic number
            head += f.read(4 * head[3])
            dims = idx_dims(head)
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise CnnlabError(f"{path}: its header {dims} claims {size:,} bytes of data, more than any image "
                                  f"dataset this reads ({MAX_IDX_BYTES:,}); the file is damaged or not an IDX file: "
                                  f"fetch it again with `cnnlab data get`")
            return head + f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip raises these for truncated or damaged archives
        raise CnnlabError(f"{path}: cannot read ({e}); expected an IDX file, raw or gzip: "
                          f"fetch it again with `cnnlab data get`") from None


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes (MNIST family): magic 0x0000 08 NDIM."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] not in (1, 3):
        raise CnnlabError(f"{path}: wrong magic number {data[:4].hex() or 'none'}; expected an IDX "
                          f"file of unsigned bytes (00000801 labels or 00000803 images)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path}: truncated header ({len(data)} bytes); expected {header}")
    dims = idx_dims(data)
    expected = header + math.prod(dims)  # exact: numpy's int64 product wraps (2^31 * 2^31 * 4 = 0)
    if len(data) != expected:
        raise CnnlabError(f"{path}: {len(data)} bytes but its header {dims} needs {expected}; "
                          f"the file is truncated or damaged: fetch it again with `cnnlab data get`")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def read_idx_dataset(info: DatasetInfo, folder: Path) -> tuple[dict[str, np.ndarray], bool]:
    """Read the four IDX files of an MNIST-family folder; return arrays and whether all verified."""
    arrays, verified = {}, True
    for key, stem in IDX_FILES.items():
        path = find_file(folder, stem)
        if path is None:
            raise CnnlabError(f"{folder / stem}: missing; expected the file (raw or .gz) from the "
                              f"{info.name} release: run `cnnlab data get {info.name}`")
        data = read_idx_bytes(path)
        verified &= is_release_file(info, stem, data)
        arrays[key] = parse_idx(data, path)
        want = 3 if key.endswith("images") else 1
        if arrays[key].ndim != want:
            raise CnnlabError(f"{path}: holds a {arrays[key].ndim}-dimensional array; expected {want} "
                              f"({'images N x H x W' if want == 3 else 'labels N'}): is it in the wrong slot?")
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise CnnlabError(f"{folder}: {part} has {n_img} images but {n_lab} labels; "
                              f"expected equal counts: fetch the files again")
    return arrays, verified


class _BatchUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): a pickle that asks
    for any other class is refused, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


def _latin1(text, encoding="utf-8", errors="strict") -> bytes:
    """Protocol-2 pickles store bytes as ``_codecs.encode(text, "latin1")``; no other codec is allowed
    (some are slow enough on crafted text to hang the reader)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1", "strict")


def unpickle(data: bytes, path: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types for damaged input
        why = f": {' '.join(str(e).split())[:120]}" if isinstance(e, pickle.UnpicklingError) else ""
        raise CnnlabError(f"{path}: not a readable python-pickle batch ({type(e).__name__}{why}); "
                          f"expected a CIFAR release file: fetch it again") from None
    if not isinstance(obj, dict):
        raise CnnlabError(f"{path}: holds a {type(obj).__name__}; expected a dict (CIFAR batch)")
    return obj


def cifar_batch(obj: dict, path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or label_key not in obj:
        raise CnnlabError(f"{path}: keys {sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)}; expected 'data' and "
                          f"'{label_key.decode()}' (CIFAR batch format)")
    x, y = obj[b"data"], _labels(obj[label_key], path, label_key)
    if not isinstance(x, np.ndarray):
        raise CnnlabError(f"{path}: data is a {type(x).__name__}; expected a uint8 array [N, 3072] (CIFAR batch)")
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != len(y):
        raise CnnlabError(f"{path}: data has shape {list(x.shape)} ({x.dtype}) for {len(y)} labels; "
                          f"expected uint8 [N, 3072] (3x32x32 in CHW order) with N labels")
    return x.reshape(-1, 3, 32, 32), y


def _labels(value, path: str, key: bytes) -> np.ndarray:
    """A batch's labels as int64 [N]: a list (or array) of integers, nothing else."""
    y = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if y is None or y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise CnnlabError(f"{path}: '{key.decode()}' is a {type(value).__name__} "
                          f"{'' if y is None else 'of ' + str(y.dtype) + ' ' + str(list(y.shape))}; "
                          f"expected a list of integer class labels (CIFAR batch format)")
    return y.astype(np.int64)


def read_cifar_files(info: DatasetInfo, files: dict[str, bytes], where: str):
    """Arrays from the raw bytes of CIFAR release files (keyed by file name)."""
    verified = all(is_release_file(info, n, files[n]) for n in files)
    out = {}
    for part, names in (("train", CIFAR_TRAIN[info.name]), ("test", CIFAR_TEST[info.name])):
        present = [n for n in names if n in files]
        if not present:
            if part == "train":
                raise CnnlabError(f"{where}: no training batches; expected {', '.join(names)} "
                                  f"(CIFAR python-pickle format)")
            continue
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise CnnlabError(f"{where}: missing {', '.join(missing)}; expected all of {', '.join(names)}")
        xs, ys = zip(*(cifar_batch(unpickle(files[n], f"{where}/{n}"), f"{where}/{n}",
                                   CIFAR_LABEL_KEY[info.name]) for n in names))
        out[f"{part}_images"], out[f"{part}_labels"] = np.concatenate(xs), np.concatenate(ys)
    meta_name, meta_key = CIFAR_META[info.name]
    classes = list(info.classes)
    if meta_name in files:
        meta = unpickle(files[meta_name], f"{where}/{meta_name}")
        names = meta.get(meta_key, classes)
        if not isinstance(names, (list, tuple)) or not all(isinstance(c, (bytes, str)) for c in names):
            raise CnnlabError(f"{where}/{meta_name}: '{meta_key.decode()}' is a {type(names).__name__}, not a list "
                              f"of class names; expected the CIFAR meta file: fetch it again")
        classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in names]
    if not classes:
        raise CnnlabError(f"{where}: no '{meta_name}' file with class names; expected it beside the batches")
    return out, classes, verified


def cifar_files_from(path: Path, info: DatasetInfo) -> dict[str, bytes]:
    """Release files of a CIFAR directory or .tar.gz archive, as bytes keyed by file name."""
    wanted = set(info.md5)
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                        if m.isfile() and Path(m.name).name in wanted}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            why = " ".join(str(e).split())  # tarfile's messages span several lines
            raise CnnlabError(f"{path}: not a readable .tar.gz archive ({why}); expected the CIFAR "
                              f"python release archive") from None
    folder = path / info.archive_dir if (path / info.archive_dir).is_dir() else path
    return {n: (folder / n).read_bytes() for n in wanted if (folder / n).is_file()}


def open_image(path: Path, grey: bool | None = None):
    """An image file as a Pillow image in mode "L" (grey) or "RGB", as a viewer shows it: upright per
    its EXIF orientation, 16- and 32-bit grey scaled to 8 bits (not clipped at 255), alpha dropped
    (unless the picture is only in the alpha channel: ``picture_from_alpha``).
    ``grey``: True or False forces one mode; None keeps grey files grey and makes the others RGB.
    Training data and ``cnnlab predict`` read files through this one function, so both see the same
    pixels. Damaged or unreadable files raise a one-line ``CnnlabError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # large but under Pillow's limit: read it without a warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = picture_from_alpha(eight_bit(ImageOps.exif_transpose(im)))
                keep_grey = im.mode in ("1", "L", "LA") if grey is None else grey
                return im.convert("L" if keep_grey else "RGB")
    except UnidentifiedImageError:
        raise CnnlabError(f"{path}: not an image (no format Pillow reads); expected a PNG, JPEG, BMP, GIF, WebP or "
                          f"TIFF file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # damaged or too large
        why = " ".join(str(e).split())[:160]
        raise CnnlabError(f"{path}: not a readable image ({type(e).__name__}: {why}); expected a valid PNG, "
                          f"JPEG, BMP, GIF, WebP or TIFF file") from None


def picture_from_alpha(im):
    """An image whose colour is one flat colour everywhere, its picture drawn only in the alpha channel
    (a digit drawn on a transparent canvas), composited over black or white, whichever contrasts with
    that colour: dropping its alpha would leave a blank image. Grey stays grey. Any other image,
    with or without alpha, is returned as it is."""
    from PIL import Image

    if 0 in im.size or not (im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info):
        return im
    grey = im.mode in ("LA", "La")
    with_alpha = im.convert("LA" if grey else "RGBA")
    *colour, (alpha_low, alpha_high) = with_alpha.getextrema()
    if alpha_low == alpha_high or any(low != high for low, high in colour):
        return im
    ink = [low for low, _ in colour]
    background = 255 if sum(ink) / len(ink) < 128 else 0
    alpha = with_alpha.getchannel("A")
    bands = [alpha.point([round((c * a + background * (255 - a)) / 255) for a in range(256)]) for c in ink]
    return bands[0] if grey else Image.merge("RGB", bands)


def eight_bit(im):
    """A grey image of more than 8 bits as mode "L": 16-bit values (modes "I;16*", and "I", in which
    Pillow opens 16-bit PNGs) scaled by 255 / 65535; float ("F") values in [0, 1] scaled by 255;
    anything else clipped to 0..255. Other modes are returned as they are."""
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F":
        scale = 255.0 if 0 <= low and high <= 1 else 1.0
    else:
        scale = 1 / 257 if im.mode.startswith("I;16") or (0 <= low and high <= 65535) else 1.0
    return Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8))


def image_array(path: Path) -> np.ndarray:
    """One image file as uint8 [C, H, W]: grey images keep one channel, any other mode becomes RGB."""
    arr = np.asarray(open_image(path))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """``root/<class>/*.png`` (single tree) or ``root/train/<class>/`` + ``root/test/<class>/``.
    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped; one colour image
    makes the dataset colour (its grey images get three equal channels)."""
    if not root.is_dir():
        raise CnnlabError(f"{root}: not a directory; expected an image folder root/<class>/*.png")
    parts = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() else {"train": root}
    classes = class_folders(parts["train"])
    if not classes:
        raise CnnlabError(f"{parts['train']}: no class folders; expected {parts['train']}/<class>/*.png")
    if len(classes) < 2:
        raise CnnlabError(f"{parts['train']}: one class folder ({classes[0]}); a classifier needs at least 2, "
                          f"expected {parts['train']}/<class>/ for each class")
    if "test" in parts:
        extra = sorted(set(class_folders(parts["test"])) - set(classes))
        if extra:
            raise CnnlabError(f"{parts['test'] / extra[0]}: class not in {parts['train']} (its classes: "
                              f"{', '.join(classes)}); expected the same class folders in train/ and test/")
    listed = {}  # part -> (files, labels)
    for part, folder in parts.items():
        per_class = [image_files(folder / cls) for cls in classes]
        files = [f for these in per_class for f in these]
        if not files:
            raise CnnlabError(f"{folder}: no images in any class folder; expected {folder}/<class>/*.png")
        empty = [cls for cls, these in zip(classes, per_class) if not these]
        if part == "train" and empty:
            raise CnnlabError(f"{folder / empty[0]}: no images in this class folder; expected images in every "
                              f"class folder of {folder} (add some, or remove the folder)")
        listed[part] = files, [label for label, these in enumerate(per_class) for _ in these]
    arrays = {part: [image_array(f) for f in files] for part, (files, _) in listed.items()}
    channels = max(a.shape[0] for images in arrays.values() for a in images)
    out, size = {}, None
    for part, (files, labels) in listed.items():
        images = [np.repeat(a, channels, 0) if a.shape[0] < channels else a for a in arrays[part]]
        for f, a in zip(files, images):
            size = size or a.shape[1:]
            if a.shape[1:] != size:
                turned = " (as shown, after any EXIF rotation)" if a.shape[1:] == size[::-1] else ""
                raise CnnlabError(f"{f}: size {a.shape[1]}x{a.shape[2]}{turned} differs from {size[0]}x{size[1]}; "
                                  f"expected all images the same size")
        out[f"{part}_images"] = np.stack(images)
        out[f"{part}_labels"] = np.asarray(labels, dtype=np.int64)
    return out, classes


def visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, recursively and sorted, but hidden ones (.DS_Store, macOS's ._
    copies) and those in hidden folders (.ipynb_checkpoints)."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def image_files(folder: Path) -> list[Path]:
    """The image files of a class folder, sorted (none if it is missing); hidden files are skipped,
    any other file that is not an image is an error."""
    files = sorted(f for f in folder.glob("*") if f.is_file() and not f.name.startswith(".")) if folder.is_dir() else []
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise CnnlabError(f"{f}: not an image file; expected only {', '.join(sorted(IMAGE_SUFFIXES))} files "
                              f"in class folders")
    return files


def class_folders(folder: Path) -> list[str]:
    """The names of the class folders in ``folder``, sorted; hidden folders are not classes."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def to_dataset(name, arrays, classes, source, verified) -> Dataset:
    def split(part):
        if f"{part}_images" not in arrays:
            return None
        x = torch.from_numpy(np.array(arrays[f"{part}_images"], dtype=np.uint8))  # owned, writable copy
        if x.ndim == 3:
            x = x[:, None]
        y = torch.from_numpy(np.asarray(arrays[f"{part}_labels"], dtype=np.int64))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise CnnlabError(f"{name}: {part} labels range {int(y.min())}..{int(y.max())} but there are "
                              f"{len(classes)} classes; expected labels 0..{len(classes) - 1}: the files are damaged")
        return Split(x, y)

    return Dataset(name, list(classes), split("train"), split("test"), source, verified)


def read_raw(name: str, raw: Path) -> Dataset:
    """Parse the release files under ``raw`` (no cache)."""
    if name in DATASETS:
        info = DATASETS[name]
        if info.kind == "idx":
            arrays, verified = read_idx_dataset(info, raw)
            classes = info.classes
        else:
            arrays, classes, verified = read_cifar_files(info, cifar_files_from(raw, info), str(raw))
    else:
        arrays, classes = read_image_folder(raw)
        verified = False
    return to_dataset(name, arrays, classes, "", verified)
