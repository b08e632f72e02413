"""Pruning the real all-MiniLM-L6-v2 (seq 16) updates its heads; every method's "runs, shrinks,
stays close" on it is part of tests/exporter/test_exporter_matrix.py (compressed once)."""

from __future__ import annotations

import torch


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
