"""all-MiniLM-L6-v2 (real weights): one export covering shift, BitStack and low-rank layers.

Encoder layer 0 is shift-coded, layer 1 BitStack, layer 2 low-rank, the rest stays dense:
one ~5 s dynamo export checks all three methods on a real Hugging Face model.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import pytest

from edgestack.exporter import export, layer_sizes
from edgestack.exporter.export import META_COMPRESSION, META_LOWRANK, NODE_LAYER_KEY

PLAN = {"shift": ("encoder.layer.0", {"bits": 4, "scale": "maxabs"}),
        "bitstack": ("encoder.layer.1", {"n_blocks": 2, "k": 4}),
        "lowrank": ("encoder.layer.2", {"ratio": 0.75})}
ALL = [f"encoder.layer.{i}" for i in range(6)] + ["pooler"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, minilm_s16) -> dict[str, Any]:
    from edgestack.compress import compress

    model, inputs = copy.deepcopy(minilm_s16[0]), minilm_s16[1]  # tests/conftest.py, seq 16
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method, (prefix, opts) in PLAN.items():
            skip = tuple(p for p in ALL if p != prefix)
            reports[method] = compress(model, method, skip=skip, **opts)
    out = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    result = export(model, inputs, out, metadata={"compression": reports["shift"]})
    return {"model": model, "inputs": inputs, "reports": reports, "out": out,
            "result": result}


def test_minilm_checker_names_and_nodes(exported: dict[str, Any]) -> None:
    out: Path = exported["out"]
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    assert [v.name for v in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [v.name for v in proto.graph.output] == ["last_hidden_state", "pooler_output"]
    reports = exported["reports"]
    by_op: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.domain == "edgestack":
            layer = next(p.value for p in node.metadata_props if p.key == NODE_LAYER_KEY)
            by_op.setdefault(node.op_type, []).append(layer)
    assert by_op == {
        "ShiftWeight": [layer.name for layer in reports["shift"].layers],
        "BitStackWeight": [layer.name for layer in reports["bitstack"].layers],
    }
    assert len(by_op["ShiftWeight"]) == len(by_op["BitStackWeight"]) == 6
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_LOWRANK]) == [r.name for r in reports["lowrank"].layers]
    assert json.loads(props[META_COMPRESSION])["method"] == "shift"
    # the compressed layers' dense weights are nowhere in the file
    names = {t.name for t in proto.graph.initializer}
    for layer in by_op["ShiftWeight"] + by_op["BitStackWeight"]:
        assert f"{layer}.weight" not in names
    assert {f.name for f in proto.functions} == {"ShiftWeight", "BitStackWeight"}


def test_minilm_parity(exported: dict[str, Any]) -> None:
    parity = exported["result"].parity
    assert parity.passed, parity.table()
    # the word and position tables are int8 in the file; the parity reference uses them too
    assert [t["name"] for t in exported["result"].compact_embeddings] == [
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"]
    assert [o.name for o in parity.outputs] == ["last_hidden_state", "pooler_output"]
    for row in parity.outputs:
        assert row.max_rel <= 1e-4 and row.cosine > 0.999999


def test_minilm_sizes(exported: dict[str, Any]) -> None:
    sizes = layer_sizes(exported["out"])
    kinds = {}
    for row in sizes.layers:
        kinds.setdefault(row.kind, []).append(row)
        assert 1.0 <= row.ratio <= 1.1, sizes.table()
    assert {k: len(v) for k, v in kinds.items()} == {"shift": 6, "bitstack": 6, "lowrank": 6}
    for row in kinds["bitstack"]:
        assert row.details == {"blocks": 2, "k": 4}
    for row in kinds["shift"]:
        # 4-bit codes: about 8x smaller than fp32
        assert row.actual_bytes < 4 * row.shape[0] * row.shape[1] / 7
    for row in kinds["lowrank"]:
        assert len(row.initializers) == 2
