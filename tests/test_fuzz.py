"""Fuzzing the readers of untrusted input (issue 18): only cnnlab's one-line errors, never another
exception, never a hang.

Each property runs its cases under a hard time limit (``within``: SIGALRM, so a case that never
returns fails instead of hanging the suite). Inputs: IDX headers and payloads, CIFAR pickle
batches (random bytes, mutated batches, hand-written hostile pickles that try to run code), TOML
recipes and ``--set`` overrides, corrupt PNG/JPEG files in an image folder, the layer notation.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import signal
import struct
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab import config, design, formats
from cnnlab.datasets import DATASETS
from cnnlab.errors import CnnlabError

SECONDS = 10  # a case that takes longer has hung
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextlib.contextmanager
def within(seconds: float = SECONDS):
    """Fail the case (TimeoutError) if the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"a fuzz case ran over {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_cnnlab_errors(call) -> str | None:
    """Run ``call``; it may succeed or raise a one-line CnnlabError, nothing else. Returns the message."""
    with within():
        try:
            call()
        except CnnlabError as e:
            msg = str(e)
            assert msg and "\n" not in msg, repr(msg)
            return msg
    return None


# ----------------------------------------------------------------------------- IDX


def idx(magic: bytes, dims: list[int], payload: bytes) -> bytes:
    return magic + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@FUZZ
@given(magic=st.one_of(st.binary(max_size=4), st.sampled_from([b"\0\0\x08\x01", b"\0\0\x08\x03", b"\0\0\x08\x02",
                                                               b"\0\0\x0d\x03"])),
       dims=st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=4),
       payload=st.binary(max_size=3000), cut=st.integers(0, 40))
def test_idx_headers_and_payloads(magic, dims, payload, cut):
    data = idx(magic, dims, payload)
    only_cnnlab_errors(lambda: formats.parse_idx(data, Path("fuzz-idx")))
    only_cnnlab_errors(lambda: formats.parse_idx(data[:-cut or None], Path("fuzz-idx")))


def test_idx_dimensions_whose_product_overflows_64_bits():
    """2^31 x 2^31 x 4 images is 2^64 bytes: as an int64 product that is 0 (it matched an empty payload)."""
    data = idx(b"\0\0\x08\x03", [2**31, 2**31, 4], b"")
    msg = only_cnnlab_errors(lambda: formats.parse_idx(data, Path("big-idx")))
    assert msg and "big-idx" in msg


@FUZZ
@given(data=st.binary(max_size=2000), flip=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                     max_size=8))
def test_gzip_idx_files(tmp_path, writers, data, flip):
    """Random bytes and damaged gzip streams of a real IDX file, as read from disk."""
    good = bytearray(gzip.compress(writers.idx_bytes(np.arange(600, dtype=np.uint8).reshape(6, 10, 10))))
    for i, x in flip:
        good[i % len(good)] ^= x
    for blob in (data, bytes(good)):
        path = tmp_path / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(blob)
        only_cnnlab_errors(lambda: formats.parse_idx(formats.read_idx_bytes(path), path))


def test_gzip_bomb_idx_is_read_no_further_than_its_header(tmp_path):
    """A 50 KiB .gz whose header says 10 x 10 x 10 images but which inflates to 50 MiB: the reader
    stops one byte past the 1,000 claimed, so memory stays small and the error names the file."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx(b"\0\0\x08\x03", [10, 10, 10], b""))
        for _ in range(50):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < 100_000
    data = formats.read_idx_bytes(path)
    assert len(data) == 16 + 1000 + 1
    msg = only_cnnlab_errors(lambda: formats.parse_idx(data, path))
    assert msg and "train-images-idx3-ubyte.gz" in msg and "1016" in msg


def test_idx_header_claiming_more_than_any_dataset_is_refused_before_reading(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx(b"\0\0\x08\x03", [2**20, 2**10, 2**10], bytes(100))))
    msg = only_cnnlab_errors(lambda: formats.read_idx_bytes(path))
    assert msg and "train-images-idx3-ubyte.gz" in msg and "claims 1,099,511,627,776 bytes" in msg


# ----------------------------------------------------------------------------- CIFAR pickles


def read_batch(blob: bytes) -> None:
    """What loading a CIFAR-10 training batch does with the file's bytes."""
    obj = formats.unpickle(blob, "fuzz/data_batch_1")
    formats.cifar_batch(obj, "fuzz/data_batch_1", b"labels")


def read_release(files: dict[str, bytes]) -> None:
    arrays, classes, _ = formats.read_cifar_files(DATASETS["cifar10"], files, "fuzz")
    formats.to_dataset("cifar10", arrays, classes, "fuzz", False)


@FUZZ
@given(st.binary(max_size=4000))
def test_random_bytes_as_a_cifar_batch(blob):
    only_cnnlab_errors(lambda: read_batch(blob))


# values a batch's keys may hold after a damaging edit
ODD = st.one_of(st.none(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5), st.binary(max_size=5),
                st.lists(st.one_of(st.integers(-5, 300), st.floats(), st.binary(max_size=3)), max_size=12),
                st.dictionaries(st.binary(max_size=3), st.integers(), max_size=3),
                st.builds(lambda n, c, t: np.zeros((n, c), dtype=t), st.integers(0, 9), st.sampled_from([3072, 3, 0]),
                          st.sampled_from([np.uint8, np.float32, np.int64, object])))


@FUZZ
@given(edits=st.dictionaries(st.sampled_from([b"data", b"labels", b"batch_label", b"filenames", "data", 7]), ODD,
                             max_size=3),
       meta=st.dictionaries(st.sampled_from([b"label_names", b"num_vis", "label_names"]), ODD, max_size=2),
       protocol=st.integers(0, 5))
def test_damaged_cifar_batches_and_meta(writers, edits, meta, protocol):
    """A real-format release (five batches, test batch, meta) with one batch and the meta file damaged."""
    batch = writers.cifar_batch(np.zeros((4, 3072), np.uint8), range(4))
    files = {f"data_batch_{i}": pickle.dumps(batch, protocol=2) for i in range(1, 6)}
    files["test_batch"] = files["data_batch_1"]
    files["data_batch_3"] = pickle.dumps({**batch, **edits}, protocol=protocol)
    files["batches.meta"] = pickle.dumps({b"label_names": [b"a"] * 10, **meta}, protocol=protocol)
    only_cnnlab_errors(lambda: read_release(files))


class RunsCode:
    """Unpickling this calls os.system (a hostile file): the unpickler must refuse it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that try to run code; each would create ``marker`` if it ran."""
    import builtins
    import os
    import subprocess

    cmd = f"touch {marker}"
    out = {f"{fn.__module__}.{fn.__name__}": pickle.dumps(RunsCode(fn, *args), protocol=2)
           for fn, args in [(os.system, (cmd,)), (subprocess.call, (["touch", str(marker)],)),
                            (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
                            (builtins.exec, (f"open({str(marker)!r}, 'w')",)),
                            (builtins.open, (str(marker), "w"))]}
    # the classic hand-written GLOBAL + REDUCE, and code smuggled inside a batch dict
    out["GLOBAL os.system"] = b"cos\nsystem\n(V" + cmd.encode() + b"\ntR."
    out["posix.system"] = b"cposix\nsystem\n(V" + cmd.encode() + b"\ntR."
    out["inside a batch"] = pickle.dumps({b"data": RunsCode(os.system, cmd), b"labels": [0]}, protocol=2)
    # numpy's allowed constructors asked for an object array holding a callable, and codecs with a custom codec
    out["object array"] = pickle.dumps({b"data": np.array([RunsCode(os.system, cmd)], dtype=object),
                                        b"labels": [0]}, protocol=2)
    out["codec"] = b"\x80\x02c_codecs\nencode\nq\x00X\x05\x00\x00\x00helloq\x01X\x08\x00\x00\x00punycodeq\x02\x86q\x03Rq\x04."
    out["copyreg"] = b"ccopyreg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR."
    out["find_class via getattr"] = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + cmd.encode() + b"\ntR."
    return out


@pytest.mark.parametrize("name", sorted(hostile_pickles(Path("/x"))))
def test_hostile_pickles_run_no_code(tmp_path, name):
    marker = tmp_path / "pwned"
    blob = hostile_pickles(marker)[name]
    msg = only_cnnlab_errors(lambda: read_batch(blob))
    assert msg and "fuzz/data_batch_1" in msg
    assert not marker.exists()


def test_codecs_other_than_latin1_are_refused():
    """numpy's pickles call _codecs.encode(text, "latin1"); another codec (punycode is quadratic) is refused."""
    import codecs

    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
    assert b"_codecs" in blob and b"latin1" in blob
    read_batch(blob)  # a real numpy batch loads
    for codec in ("punycode", "utf-16", "rot13"):
        hostile = pickle.dumps({b"data": RunsCode(codecs.encode, "\u1234" * 10, codec), b"labels": [0]}, protocol=2)
        assert b"_codecs" in hostile
        msg = only_cnnlab_errors(lambda: read_batch(hostile))
        assert msg and "refused" in msg and codec in msg


# ----------------------------------------------------------------------------- TOML recipes


KEYS = {"model": ["name", "dropout", "width", "layers"],
        "data": ["dataset", "val_split", "subset", "batch_size", "crop_pad", "crop_mode", "flip", "cutout_p"],
        "optim": ["name", "lr", "momentum", "betas", "weight_decay", "label_smoothing", "grad_clip"],
        "schedule": ["name", "knots", "values", "pct_start", "step_size", "warmup_epochs"],
        "train": ["epochs", "seed", "device", "dtype", "target", "patience", "ema", "threads", "tta_shift"]}
TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
              st.sampled_from(["sgd", "onecycle", "cpu", "float16", "reflect", "mnist"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
RECIPES = st.dictionaries(st.sampled_from([*KEYS, "extra"]),
                          st.one_of(st.dictionaries(st.sampled_from(sum(KEYS.values(), ["zzz"])), TOML_VALUES,
                                                    max_size=5), TOML_VALUES),
                          max_size=5)


@FUZZ
@given(raw=RECIPES)
def test_recipe_tables_and_values(raw):
    """Any TOML-shaped recipe gives a Config or one line; a Config's config.toml reads back to it."""
    def check():
        cfg = config.from_dict(raw)
        assert config.from_dict(tomllib.loads(config.to_toml(cfg))) == cfg or has_nan(cfg)

    only_cnnlab_errors(check)


def has_nan(cfg) -> bool:
    return "nan" in config.to_toml(cfg)  # NaN != NaN: the round trip holds but does not compare equal


@FUZZ
@given(text=st.text(max_size=300))
def test_recipe_files_of_any_text(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    only_cnnlab_errors(lambda: config.load_recipe(path))


@FUZZ
@given(sets=st.lists(st.text(max_size=30), max_size=4))
def test_set_overrides_of_any_text(sets):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mnist_tiny.toml"
    only_cnnlab_errors(lambda: config.load_recipe(recipe, sets))


@pytest.mark.parametrize("text", ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 3000 + "1" + "}" * 3000,
                                  "\udcff = 1", "[model]\nname = 1979-05-27\n", "\0"])
def test_recipe_edge_cases(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert only_cnnlab_errors(lambda: config.load_recipe(path)) is not None


# ----------------------------------------------------------------------------- corrupt images in an image folder


def image_bytes(fmt: str, size: int, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    arr = np.arange(size * size * (3 if mode == "RGB" else 1), dtype=np.uint8)
    Image.fromarray(arr.reshape(size, size, -1).squeeze(), mode=mode).save(buf, format=fmt)
    return buf.getvalue()


@FUZZ
@given(fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]), mode=st.sampled_from(["L", "RGB"]),
       cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 10**5), st.integers(1, 255)), max_size=6),
       junk=st.binary(max_size=64))
def test_corrupt_images_in_an_image_folder(tmp_path, writers, fmt, mode, cut, flips, junk):
    fake = writers.write_image_folder(tmp_path / "imgs", per_class=2, size=8, mode=mode)
    blob = bytearray(image_bytes(fmt, 8, mode))
    for i, x in flips:
        blob[i % len(blob)] ^= x
    blob = bytes(blob[:len(blob) - cut] if cut < len(blob) else blob) + junk
    (fake.root / "dog" / f"bad.{fmt.lower()}").write_bytes(blob)
    only_cnnlab_errors(lambda: formats.read_image_folder(fake.root))


def test_an_image_too_large_to_decode_is_one_line(tmp_path, writers):
    """A PNG header claiming 40000 x 40000 pixels (a decompression bomb) is refused, not decoded."""
    fake = writers.write_image_folder(tmp_path / "imgs", per_class=1, size=8)
    png = bytearray(image_bytes("PNG", 8, "RGB"))
    png[16:24] = struct.pack(">II", 40000, 40000)  # IHDR width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # and its checksum, so the header is valid
    (fake.root / "cat" / "bomb.png").write_bytes(bytes(png))
    msg = only_cnnlab_errors(lambda: formats.read_image_folder(fake.root))
    assert msg and "bomb.png" in msg


# ----------------------------------------------------------------------------- the layer notation


TOKENS = st.one_of(st.integers(0, 40).map(str), st.tuples(st.sampled_from("kpsdg"), st.integers(1, 9)).map(lambda t: f"{t[0]}{t[1]}"),
                   st.sampled_from(["classes", "0.5", "1e-3", "bias", "plain", "ceil", "nobias", "-1", "p0", "k0", "",
                                    "70000", "1e12"]),
                   st.text(max_size=4))
ENTRIES = st.tuples(st.sampled_from([*design.WORDS, "zzz"]), st.lists(TOKENS, max_size=4)).map(
    lambda t: " ".join([t[0], *t[1]]))
LAYER_LISTS = st.lists(st.recursive(ENTRIES, lambda inner: st.lists(inner, max_size=4).map(lambda b: ["res", *b]),
                                    max_leaves=8), max_size=8)


@FUZZ
@given(layers=st.one_of(LAYER_LISTS, TOML_VALUES), shape=st.sampled_from([(1, 28, 28), (3, 32, 32), (1, 4, 4)]),
       dropout=st.one_of(st.floats(0, 0.9), st.just(1.5)))
def test_layer_notation(layers, shape, dropout):
    """Layer lists (words with numbers up to 40 and a few far too large, settings, switches, junk,
    nested residual blocks): a network that runs on an image of ``shape``, or one line naming the
    layer (never an allocation error: sizes past design.MAX_COUNT are refused before building)."""
    def build_and_run():
        net = design.build_design(layers, 10, shape, dropout=dropout)
        with torch.no_grad():
            assert net.eval()(torch.zeros(2, *shape)).shape[0] == 2

    only_cnnlab_errors(build_and_run)
