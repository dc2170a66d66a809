"""ONNX files: the optional packages, and an ONNX Runtime session that runs like a torch module.

``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``[onnx]`` extra) are imported only when a
function here runs; without them ``require`` raises one line saying what to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from cnnlab.errors import CnnlabError

INSTALL = "pip install 'cnnlab[onnx]'"


def require(name: str):
    """Import ``name`` (onnx, onnxscript or onnxruntime) or raise one line naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CnnlabError(f"ONNX support needs the optional package {name}, which is not installed: {INSTALL}") from None


def session_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises for a file it cannot load or inputs it cannot run."""
    state = require("onnxruntime").capi.onnxruntime_pybind11_state
    return (state.Fail, state.InvalidProtobuf, state.NoSuchFile, state.InvalidGraph, state.InvalidArgument,
            state.RuntimeException, state.NotImplemented)


class OrtModel(nn.Module):
    """An ONNX model in ONNX Runtime (CPU) behind torch's module interface: float32 tensors in, logits
    out. ``source`` is a path or the file's bytes; ``threads`` 0 leaves ONNX Runtime's default."""

    def __init__(self, source: str | Path | bytes, threads: int = 0, name: str | None = None):
        super().__init__()
        ort = require("onnxruntime")
        self.name = name or str(source)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), opts,
                                                providers=["CPUExecutionProvider"])
        except session_errors() as e:
            raise CnnlabError(f"{self.name}: not a model ONNX Runtime can load ({str(e).splitlines()[0]}); "
                              f"pass a .onnx file made by `cnnlab export` or another ONNX exporter") from None
        self.input = self.session.get_inputs()[0]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input.name: x.float().contiguous().numpy()})[0]
        except session_errors() as e:
            raise CnnlabError(f"{self.name} cannot run on images shaped {list(x.shape[1:])} (its input "
                              f"{self.input.name} is {self.input.shape}): {str(e).splitlines()[0]}") from None
        return torch.from_numpy(out)
