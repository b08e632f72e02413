"""parity.compare / ParityReport and sizes.layer_sizes on hand-built inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edgestack.errors import ExportError
from edgestack.exporter.export import NODE_LAYER_KEY
from edgestack.exporter.parity import ParityReport, check_parity, compare
from edgestack.exporter.sizes import layer_sizes

from exporter_models import random_shift, random_stack


def test_compare_metrics_and_rule() -> None:
    ref = np.array([[0.0, 2.0], [-4.0, 1.0]], np.float32)
    got = ref + np.array([[0.0, 0.001], [0.0, -0.002]], np.float32)
    row = compare("y", got, ref, atol=1e-4, rtol=1e-3)
    assert row.max_abs == pytest.approx(0.002, rel=1e-3)
    assert row.max_rel == pytest.approx(0.002 / 4.0, rel=1e-3)  # max|a-b| / max|ref|
    assert 0.99999 < row.cosine <= 1.0
    assert row.passed  # max_abs > atol but max_rel <= rtol: OR rule
    assert not compare("y", got, ref, atol=1e-4, rtol=1e-4).passed
    assert compare("y", got, ref, atol=3e-3, rtol=0).passed


def test_compare_edge_cases() -> None:
    zeros = np.zeros(3, np.float32)
    both = compare("z", zeros, zeros, 0, 0)
    assert (both.max_abs, both.max_rel, both.cosine, both.passed) == (0.0, 0.0, 1.0, True)
    only_ref_zero = compare("z", np.ones(3), zeros, 0.1, 0.1)
    assert only_ref_zero.max_rel == math.inf and only_ref_zero.cosine == 0.0
    assert not only_ref_zero.passed
    shape = compare("s", np.zeros((2, 3)), np.zeros((3, 2)), 1, 1)
    assert not shape.passed and shape.shape == (2, 3) and shape.ref_shape == (3, 2)
    nan = compare("n", np.array([1.0, np.nan]), np.array([1.0, 2.0]), 1, 1)
    assert nan.max_abs == math.inf and not nan.passed
    ints = compare("i", np.array([1, 2, 3]), np.array([1, 2, 3]), 0, 0)
    assert ints.passed


def test_report_dict_and_table() -> None:
    rows = [compare("last_hidden_state", np.ones((1, 4)), np.ones((1, 4)), 1e-4, 1e-4),
            compare("pooler_output", np.ones(2), np.zeros(2), 1e-4, 1e-4)]
    report = ParityReport(rows, 1e-4, 1e-4)
    assert not report.passed and report.max_rel == math.inf
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["outputs"][1]["max_rel"] == "inf"
    assert data["outputs"][0]["shape"] == [1, 4]
    table = report.table()
    assert "last_hidden_state" in table and "1x4" in table and "NO" in table
    assert table.splitlines()[-1].startswith("parity FAILED")
    assert not ParityReport([], 1, 1).passed  # nothing compared is not a pass


def _linear_onnx(weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_check_parity_detects_a_changed_model() -> None:
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    proto = _linear_onnx(w)

    class Lin(torch.nn.Module):
        def __init__(self, w: np.ndarray) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(w))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    x = {"x": torch.randn(2, 3)}
    assert check_parity(proto, Lin(w), x).passed
    bad = check_parity(proto, Lin(w * 1.01), x)
    assert not bad.passed and bad.outputs[0].max_rel == pytest.approx(0.01 / 1.01, rel=1e-3)
    with pytest.raises(ExportError, match="ONNX input 'x' has no matching torch input; given z"):
        check_parity(proto, Lin(w), {"z": torch.randn(2, 3)})
    assert check_parity(proto, Lin(w), (torch.randn(2, 3),)).passed  # positional


def _sizes_model() -> tuple[onnx.ModelProto, object, object]:
    rng = np.random.default_rng(0)
    shift = random_shift(rng, (6, 5, 3), 4, False)
    stack = random_stack(rng, (10, 7), 3, 2)
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("a.codes", shift.codes), ("a.scale", shift.scale), ("b.signs", stack.signs),
              ("b.u", stack.u), ("b.v", stack.v)]]
    n1 = helper.make_node("ShiftWeight", ["a.codes", "a.scale"], ["wa"], domain="edgestack",
                          name="n1", bits=4, zero=0, shape=[6, 5, 3])
    n1.metadata_props.add(key=NODE_LAYER_KEY, value="layer_a")
    n2 = helper.make_node("BitStackWeight", ["b.signs", "b.u", "b.v"], ["wb"],
                          domain="edgestack", name="n2", shape=[10, 7])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([n1, n2], "g", [], [vi("wa", onnx.TensorProto.FLOAT, [6, 5, 3]),
                                                  vi("wb", onnx.TensorProto.FLOAT, [10, 7])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("edgestack", 1)])
    return model, shift, stack


def test_layer_sizes_formulas() -> None:
    model, shift, stack = _sizes_model()
    report = layer_sizes(model)
    a, b = report.layers
    assert (a.layer, a.kind, a.node, a.shape) == ("layer_a", "shift", "n1", (6, 5, 3))
    assert a.actual_bytes == shift.nbytes == 45 + 24
    assert a.theoretical_bytes == 90 * 4 / 8 + 4 * 6
    assert (b.layer, b.kind, b.details) == ("n2", "bitstack", {"blocks": 3, "k": 2})
    assert b.actual_bytes == stack.nbytes == 3 * 9 + 3 * 2 * (10 + 7) * 2  # fp16 factors
    assert b.theoretical_bytes == pytest.approx(3 * (1 + 16 * 2 * 17 / 70) * 70 / 8)
    assert b.ratio == pytest.approx(b.actual_bytes / b.theoretical_bytes)
    assert report.initializer_bytes == a.actual_bytes + b.actual_bytes
    assert report.layer("layer_a") is a
    with pytest.raises(KeyError, match="no compressed layer named 'zz'"):
        report.layer("zz")
    assert "layer_a" in report.table() and json.dumps(report.to_dict())
