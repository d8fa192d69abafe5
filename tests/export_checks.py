"""Exporting models that run fastp2phd's fast paths: the graphs hold standard operators only.
Shared by the main suite (C++ paths) and the interpreter suite (Triton paths)."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch


def export_and_run_onnx(model: torch.nn.Module, example: tuple, other: tuple, names: list[str], path) -> float:
    """Export ``model`` (on any device, ``example`` on the same) to ONNX with dynamic batch and size, check
    that no fastp2phd operator is in the graph, run ``other`` inputs (another batch and size) in
    onnxruntime on the CPU; the largest difference from the model."""
    import onnx
    import onnxruntime

    dims = {0: "batch", 2: "height", 3: "width"}
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(path), input_names=names, output_names=["out"], dynamo=True,
                              dynamic_shapes=tuple(dims for _ in example), verbose=False)
    finally:
        logger.setLevel(level)
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "a custom operator reached the ONNX graph"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(["out"], {name: t.cpu().numpy() for name, t in zip(names, other)})
    with torch.no_grad():
        expected = model(*other).cpu()
    return float(np.abs(result - expected.numpy()).max())


def assert_no_fastp2phd_ops(graph_text: str) -> None:
    """No call of a fastp2phd operator (``fastp2phd::op`` in TorchScript, ``torch.ops.fastp2phd.op`` in FX)."""
    assert "fastp2phd::" not in graph_text and "ops.fastp2phd." not in graph_text, \
        "a fastp2phd operator reached the exported graph"
