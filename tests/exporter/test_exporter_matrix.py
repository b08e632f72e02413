"""The exporter issue's acceptance matrix: every model x every method, whole models.

For all-MiniLM-L6-v2 (real weights), the GPT-2-style decoder and the small CNN, each method
compresses every supported layer; the export passes ``onnx.checker`` (full check), ONNX
Runtime matches the compressed torch model to <= 1e-4 relative error, and the compressed
layers' bytes in the file are within 10% of the format's theoretical size.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from edgestack import zoo
from edgestack.compress import compress
from edgestack.exporter import export, layer_sizes
from edgestack.formats import BitStackStack

#: "minilm" (seq 16) comes from tests/conftest.py's session fixtures: compressed once per
#: method and options. On the real MiniLM the compressed model also stays close to the
#: original: (token-level cosine bound, bits/weight range) per method. Measured on this
#: input (token cosine / mean-pooled cosine): shift-4 + calib .924/.903; bitstack 3 blocks +
#: calib .893/.885; lowrank 0.5 + calib .807/.872; prune 0.25 + calib .974/.990.
MINILM_BOUNDS = {"shift": (0.90, (4.0, 4.1)), "bitstack": (0.85, (3.6, 3.7)),
                 "lowrank": (0.75, (15.9, 16.0)), "prune": (0.95, (23.9, 24.1))}
MODELS = {
    "gpt2-tiny": zoo.gpt2_tiny,
    "small-cnn": zoo.small_cnn,
}
METHODS = {
    "shift": {"bits": 4},
    "bitstack": {"n_blocks": 3},
    "lowrank": {"ratio": 0.5},
    "prune": {"ratio": 0.25},
}


def _check_minilm_stays_close(dense, model, inputs, report, method: str) -> None:
    """Runs, shrinks, stays close: finite output, token cosine above the bound, bits/weight
    in range, every encoder linear (and the pooler, except for prune) compressed."""
    import torch

    with torch.no_grad():
        ref = dense(**inputs).last_hidden_state.flatten().double()
        out = model(**inputs).last_hidden_state.flatten().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    bound, (lo, hi) = MINILM_BOUNDS[method]
    cos = float(ref @ out / (ref.norm() * out.norm()))
    assert cos > bound, (method, cos)
    assert lo <= report.bits_per_weight <= hi, report.summary()
    assert report.compressed_bytes < report.dense_bytes
    assert len(report.layers) == (36 if method == "prune" else 37)  # 6 x 6 (+ pooler)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["minilm", *MODELS])
def test_every_model_every_method(request, tmp_path, name, method):
    if name == "minilm":
        dense, _ = request.getfixturevalue("minilm_s16")
        dense_params = sum(p.numel() for p in dense.parameters())
        model, inputs, report = request.getfixturevalue("minilm_compressed")(
            method, calib=True, **METHODS[method])
        _check_minilm_stays_close(dense, model, inputs, report, method)
    else:
        model, inputs = MODELS[name]()
        dense_params = sum(p.numel() for p in model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = compress(model, method, calib=[inputs], **METHODS[method])
    assert report.layers, f"{method} compressed nothing in {name}"
    out = tmp_path / f"{name}-{method}.onnx"

    result = export(model, inputs, out, metadata={"compression": report})

    onnx.checker.check_model(str(out), full_check=True)
    assert result.parity.passed, result.parity.table()
    assert result.parity.max_rel <= 1e-4, result.parity.table()

    if method == "prune":
        # physically smaller standard layers: fewer parameters, no custom ops
        assert sum(p.numel() for p in model.parameters()) < dense_params
        assert not [n for n in onnx.load(str(out)).graph.node if n.domain == "edgestack"]
    sizes = layer_sizes(out)
    assert len(sizes.layers) == len(report.layers)
    for row in sizes.layers:
        assert row.actual_bytes <= 1.10 * row.theoretical_bytes, sizes.table()
        assert row.actual_bytes >= row.theoretical_bytes * (1 - 1e-9), sizes.table()
    for layer in report.layers:
        row = sizes.layer(layer.name)
        numel = int(np.prod(layer.shape))
        if method == "shift":
            # 4-bit shift: 1/8 of fp32 plus one fp32 scale per output channel
            assert row.theoretical_bytes == pytest.approx(numel * 4 / 8 + 4 * layer.shape[0])
        elif method == "prune":
            # the smaller dense fp32 weight, exactly as the report counted it
            assert row.theoretical_bytes == layer.compressed_bytes
        elif method == "bitstack":
            m, n = layer.shape[0], numel // layer.shape[0]
            k = layer.details["k"]
            bpw = BitStackStack.theoretical_bits_per_weight(m, n, k, 3)
            assert row.theoretical_bytes == pytest.approx(bpw * numel / 8)
