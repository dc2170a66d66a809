"""Export a run's model to one self-contained ONNX file, checked in ONNX Runtime (``cnnlab export``).

The model goes through ``torch.export`` and PyTorch's ONNX translation (``torch.onnx.export`` with
``dynamo=True``, BatchNorm folded into the convolutions by its optimiser), float32, with a dynamic
batch dimension, the weights inside the file and the run's preprocessing as ``cnnlab.*`` metadata
(``predict.onnx_metadata``). Before anything is written, ONNX Runtime runs the file's bytes on real
images of the run's evaluation split and the largest logit difference from PyTorch (float32, no
autocast) is reported; above 1e-4 the export fails and no file is written.

``int8``: ONNX Runtime's static post-training quantization in QDQ form (QuantizeLinear /
DequantizeLinear pairs that ONNX Runtime fuses into integer kernels, and that other runtimes read
as well), int8 weights per output channel, uint8 activations whose ranges are calibrated (min/max)
on training images. Grouped convolutions with more output than input channels (a depthwise conv
with a depth multiplier) stay float32: ONNX Runtime has no fast integer kernel for them and ran
cifar_dw56k 4-6x slower with them quantized. The fp32 and int8 files are then compared on the
whole evaluation split: accuracy of each, agreement of their predictions, file sizes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from pathlib import Path

import torch

from cnnlab import evaluate, runs
from cnnlab.augment import Loader
from cnnlab.atomic import atomic_write_bytes, check_writable
from cnnlab.data import Split
from cnnlab.errors import CnnlabError
from cnnlab.onnxfile import OrtModel, require
from cnnlab.predict import Preprocessing, onnx_metadata, run_preprocessing

FP32_TOLERANCE = 1e-4  # largest logit difference ONNX Runtime may show against PyTorch (float32)
CHECK_IMAGES = 256  # evaluation images the fp32 check runs on
CALIBRATION_IMAGES = 512  # training images the int8 ranges are calibrated on
EVAL_BATCH = 500


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's and the quantizer's notes off the console (torchvision is not installed,
    deprecations inside torch, graphs it could not trace); errors still raise."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("torch", "onnxruntime", "onnxscript")]
    loggers = [logging.getLogger(name) for name in names] + [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # torch.export prints the graphs it failed on
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: torch.nn.Module, shape: tuple[int, int, int], name: str):
    """The model as an ``onnx.ModelProto`` (float32, input ``image`` [batch, C, H, W], output ``logits``)."""
    require("onnx")
    require("onnxscript")
    x = torch.zeros(2, *shape)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter():
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
                                        input_names=["image"], output_names=["logits"], verbose=False)
        except torch.onnx.OnnxExporterError as e:
            raise CnnlabError(untranslatable(e, model, x, batch, name)) from None
    return program.model_proto


def untranslatable(err: Exception, model: torch.nn.Module, x: torch.Tensor, batch, name: str) -> str:
    """One line naming the operator ONNX has no translation for and the layer that calls it."""
    chain = []
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    text = "\n".join(chain)
    node_name = re.search(r"Error when translating node %(\S+) :", text)
    if node_name is None:  # failed before translating (tracing, decompositions): the exporter's summary line
        first = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>: (.*)", text)
        why = f"{first.group(1)}: {first.group(2)}" if first else chain[-1].splitlines()[0]
        return f"model {name} cannot be exported to ONNX: {' '.join(why.split())[:300]}"
    with quiet_exporter():
        graph = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False).graph
    node = next((n for n in graph.nodes if n.name == node_name.group(1)), None)
    if node is None:
        return f"model {name} cannot be exported to ONNX: no ONNX translation for node {node_name.group(1)}"
    path, kind = list((node.meta.get("nn_module_stack") or {"": ("", "model")}).values())[-1]
    layer = f"layer {path or '(top)'} ({str(getattr(kind, '__name__', kind)).rsplit('.', 1)[-1]})"
    return (f"model {name} cannot be exported to ONNX: operator {node.target} in {layer} has no ONNX "
            f"translation; write that layer with standard PyTorch operations")


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """ONNX bytes with ``metadata`` set as the model's metadata_props (replacing keys it had)."""
    onnx = require("onnx")
    proto = onnx.load_from_string(data)
    keep = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    onnx.helper.set_model_props(proto, {**keep, **metadata})
    return proto.SerializeToString()


def onnx_logits(source: bytes | torch.nn.Module, split: Split, prep: Preprocessing) -> torch.Tensor:
    """float32 logits, single view, of ONNX bytes (in ONNX Runtime) or a torch model on ``split``."""
    model = OrtModel(source, name="the exported model") if isinstance(source, bytes) else source
    loader = Loader(split.images, split.labels, EVAL_BATCH, prep.mean, prep.std)
    return evaluate.predict(model, loader)[0]


def slow_int8_convs(proto) -> list[str]:
    """Conv nodes ONNX Runtime has no fast int8 kernel for: grouped, with more outputs than groups."""
    weights = {init.name: list(init.dims) for init in proto.graph.initializer}
    slow = []
    for node in proto.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and weights.get(node.input[1], [group])[0] != group:
            slow.append(node.name)
    return slow


def quantize(data: bytes, calibration: torch.Tensor, prep: Preprocessing) -> bytes:
    """int8 ONNX bytes (QDQ) of the float32 ``data``, activation ranges from ``calibration`` (uint8 images)."""
    onnx = require("onnx")
    quant = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(quant.CalibrationDataReader):
        def __init__(self):
            x = Loader(calibration, torch.zeros(len(calibration), dtype=torch.long), 64, prep.mean, prep.std)
            self.batches = iter([{"image": b.numpy()} for b, _ in x.epoch(None)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as tmp, quiet_exporter():
        fp32, ready, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "ready.onnx", Path(tmp) / "int8.onnx"
        fp32.write_bytes(data)
        quant_pre_process(fp32, ready, skip_symbolic_shape=True)  # shapes + graph fusions before quantizing
        quant.quantize_static(ready, int8, Batches(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                              activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                              calibrate_method=quant.CalibrationMethod.MinMax,
                              nodes_to_exclude=slow_int8_convs(onnx.load(ready)))
        return int8.read_bytes()


def int8_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".onnx") + ".int8.onnx")


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "best", int8: bool = False,
               log=print) -> dict:
    """Write ``out`` (default RUN/model.onnx) and, with ``int8``, ``out`` as .int8.onnx; return what
    was measured (also written to RUN/export.json)."""
    run_dir = Path(run_dir)
    if out:
        if Path(out).suffix != ".onnx":
            raise CnnlabError(f"--out {out}: expected a file name ending in .onnx")
        out = check_writable(out)
    else:
        out = run_dir / "model.onnx"
    ckpt, model = evaluate.load_run_model(run_dir, checkpoint)
    prep = run_preprocessing(ckpt)
    split, split_name = evaluate.load_eval_split(ckpt)
    metadata = onnx_metadata(ckpt, prep, run_dir.resolve().name, checkpoint)
    data = with_metadata(to_onnx(model, prep.shape, ckpt["model_name"]).SerializeToString(), metadata)
    check = Split(split.images[:CHECK_IMAGES], split.labels[:CHECK_IMAGES])
    diff = float((onnx_logits(data, check, prep) - onnx_logits(model, check, prep)).abs().max())
    log(f"ONNX Runtime vs PyTorch (float32) on {len(check)} {split_name} images: largest logit difference {diff:.2e}")
    if not diff <= FP32_TOLERANCE:
        raise CnnlabError(f"the exported model's logits differ from PyTorch's by {diff:.2e} (> {FP32_TOLERANCE:g}) "
                          f"in ONNX Runtime; nothing written: report the model ({ckpt['model_name']}) as a bug")
    atomic_write_bytes(out, data)
    log(f"wrote {out} ({len(data):,} bytes, float32, dynamic batch)")
    record = {"run": str(run_dir), "checkpoint": checkpoint, "model": ckpt["model_name"], "file": str(out),
              "bytes": len(data), "check_split": split_name, "check_images": len(check), "max_logit_diff": diff}
    if int8:
        record["int8"] = export_int8(ckpt, data, metadata, split, split_name, int8_path(out), log)
    runs.write_json(run_dir / "export.json", record)
    return record


def export_int8(ckpt: dict, data: bytes, metadata: dict[str, str], split: Split, split_name: str, out: Path,
                log) -> dict:
    """Quantize ``data``, write it to ``out``, compare it with float32 on the whole evaluation split."""
    prep = run_preprocessing(ckpt)
    val_split = int(ckpt["config"].get("data", {}).get("val_split", 0) or 0)
    train = evaluate.load_run_dataset(ckpt, val_split).train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CALIBRATION_IMAGES]
    q = with_metadata(quantize(data, train.images[pick], prep), {**metadata, "cnnlab.int8": "true"})
    pred32, pred8 = (onnx_logits(d, split, prep).argmax(1) for d in (data, q))
    acc32, acc8 = ((p == split.labels).float().mean().item() for p in (pred32, pred8))
    agree = (pred32 == pred8).float().mean().item()
    atomic_write_bytes(out, q)
    log(f"wrote {out} ({len(q):,} bytes, {len(q) / len(data):.2f}x float32; calibrated on {len(pick)} training images)")
    log(f"{split_name} accuracy on {len(split):,} images (single view): float32 {acc32:.2%}, int8 {acc8:.2%} "
        f"({100 * (acc8 - acc32):+.2f} points); predictions agree on {agree:.2%}")
    return {"file": str(out), "bytes": len(q), "calibration_images": len(pick), "split": split_name,
            "images": len(split), "fp32_accuracy": acc32, "int8_accuracy": acc8, "agreement": agree}
