"""Every method on the real all-MiniLM-L6-v2 (seq 16 for speed): runs, shrinks, stays close."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ref(minilm_s16) -> torch.Tensor:
    """last_hidden_state of the original model (tests/conftest.py: seq 16, loaded once)."""
    model, inputs = minilm_s16
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


# (method, options, use calibration, token-level cosine bound, bits/weight range): the same
# configurations as tests/exporter/test_exporter_matrix.py, so each MiniLM is compressed once
# per session. Measured on this input (token cosine / mean-pooled cosine): shift-4 + calib
# .924/.903; bitstack 3 blocks + calib .893/.885; lowrank 0.5 + calib .807/.872; prune 0.25 +
# calib .974/.990 (without calib: .770/.747).
CASES = [
    ("shift", {"bits": 4}, True, 0.90, (4.0, 4.1)),
    ("bitstack", {"n_blocks": 3}, True, 0.85, (3.6, 3.7)),
    ("lowrank", {"ratio": 0.5}, True, 0.75, (15.9, 16.0)),
    ("prune", {"ratio": 0.25}, True, 0.95, (23.9, 24.1)),
]


@pytest.mark.parametrize("method,options,use_calib,bound,bpw", CASES,
                         ids=[c[0] for c in CASES])
def test_minilm_method(minilm_compressed, ref, method, options, use_calib, bound, bpw):
    # shared with tests/exporter/test_exporter_matrix.py where the configuration is the same
    model, inputs, report = minilm_compressed(method, calib=use_calib, **options)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()
    cos = _cos(ref, out)
    pooled = _cos(ref.mean(1), out.mean(1))
    assert cos > bound, (method, cos, pooled)
    assert bpw[0] <= report.bits_per_weight <= bpw[1], report.summary()
    assert report.compressed_bytes < report.dense_bytes
    if method != "prune":
        assert len(report.layers) == 37  # 6 x (q, k, v, o, up, down) + pooler


def test_minilm_prune_updates_heads(minilm_compressed):
    model, inputs, report = minilm_compressed("prune", calib=False, ratio=0.25)
    for layer in model.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 9 and att.all_head_size == 288
        assert att.query.weight.shape == (288, 384) and att.value.bias.shape == (288,)
        assert layer.attention.output.dense.weight.shape == (384, 288)
        assert layer.intermediate.dense.weight.shape == (1152, 384)
        assert layer.output.dense.weight.shape == (384, 1152)
    assert {s.name: s.reason for s in report.skipped}["pooler.dense"] == \
        "not part of a prunable structure"
    assert report.layer("encoder.layer.0.attention.self.query").details["heads"] == 9
    assert len(report.layers) == 36
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape == (1, 16, 384)
