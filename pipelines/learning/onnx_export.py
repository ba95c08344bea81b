"""ONNX export with a parity check against ONNX Runtime, and ONNX Runtime inference."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.fileio import atomic_path
from pipelines.learning.train import logits_torch

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Write the model as ONNX: input `(batch, n_features)` float32 rows, output `(batch, classes)`
    logits, batch dimension dynamic. The TorchScript exporter is used: it is several times faster
    than the dynamo exporter for these models and gives the same graph."""
    model.eval()
    n_features = math.prod(model.input_shape)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # GroupNorm's batch-size check (an error only while training) is a Python branch the tracer
        # warns about; the exported graph does not depend on it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, n_features),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


@functools.lru_cache(maxsize=16)
def _session(path: str, mtime_ns: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_session(path: Path):
    return _session(str(path), path.stat().st_mtime_ns)


def logits_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return onnx_session(path).run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def parity_max_abs(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Largest absolute logit difference between PyTorch and ONNX Runtime on `x`."""
    return float(np.max(np.abs(logits_torch(model, x) - logits_onnx(path, x))))
