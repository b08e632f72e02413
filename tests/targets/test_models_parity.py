"""The exporter issue's models and methods pass parity on every available target.

zoo.small_cnn and zoo.gpt2_tiny x {shift, bitstack, lowrank, prune}, and MiniLM (seq 16,
shift: emulating it is the slow part), compressed and exported, then run through ort-cpu,
ort-arm (aarch64 under qemu: every case in ONE emulated process), openvino-cpu (f32) and
tensorrt-gpu (skipped with the reason where TensorRT is absent) against the compressed torch
model. The shift models are DeepShift 4-bit (7 levels: exact int8); gpt2_tiny's also runs the
int8 lowering on both ORT targets.

Compressing and exporting is most of the time (and not what these tests test), so the exported
models, inputs and torch outputs are cached in ``.cache/targets-test-models/<key>`` where the
key hashes the sources of the compress, exporter and formats packages and the zoo: any change
there re-exports.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgestack.targets.parity import Case, cross_check

METHODS = ("shift", "bitstack", "lowrank", "prune")
#: Fast method options: these tests check lowering, not compression quality.
#: shift is DeepShift 4-bit (7 levels), so the same export also serves the int8 test.
FAST = {"shift": {"scale": "maxabs", "bits": 4, "zero": True}, "bitstack": {"act_aware": False},
        "lowrank": {"act_aware": False}, "prune": {}}


def _cache_dir() -> Path:
    import edgestack

    src = Path(edgestack.__file__).parent
    h = hashlib.sha256()
    for f in sorted([*src.glob("compress/**/*.py"), *src.glob("exporter/**/*.py"),
                     *src.glob("formats/*.py"), src / "zoo.py"]):
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    root = Path(__file__).resolve().parents[2] / ".cache" / "targets-test-models"
    return root / h.hexdigest()[:16]


def _case(tmp, name: str, factory, method: str, **opts) -> Case:
    opts = {**FAST[method], **opts}
    tag = "_".join(f"{k}-{v}" for k, v in sorted(opts.items()))
    cache = _cache_dir() / f"{name}_{method}_{tag}"
    if (cache / "io.npz").is_file():
        with np.load(cache / "io.npz", allow_pickle=False) as npz:
            feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in:")}
            ref = {k[4:]: npz[k] for k in npz.files if k.startswith("out:")}
        return Case(f"{name}:{method}", cache / "model.onnx", feeds, ref, "torch (compressed)")
    case = _export_case(cache, name, factory, method, **opts)
    np.savez(cache / "io.npz", **{f"in:{k}": v for k, v in case.feeds.items()},
             **{f"out:{k}": v for k, v in case.reference.items()})
    return case


def _export_case(folder: Path, name: str, factory, method: str, **opts) -> Case:
    import torch

    from edgestack.compress import compress
    from edgestack.exporter import export
    from edgestack.exporter.export import compacted_tables
    from edgestack.exporter.signature import flatten_outputs, normalize_inputs

    model, inputs = factory()
    compress(model, method, calib=[inputs], **opts)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, inputs, path, parity=False, overwrite=True)  # a cache folder
    norm = normalize_inputs(model, inputs)
    # the file stores the word/position tables as int8 per row: so does the reference
    with torch.no_grad(), compacted_tables(model, result.compact_embeddings):
        ref = [t.numpy() for _, t in flatten_outputs(model(*norm.args, **norm.kwargs))]
    return Case(f"{name}:{method}", path, norm.numpy(),
                dict(zip(result.output_names, ref, strict=False)), "torch (compressed)")


@pytest.fixture(scope="module")
def cases(tmp_path_factory, request) -> list[Case]:
    import copy

    from edgestack import zoo

    def minilm_s16():
        """A copy of tests/conftest.py's MiniLM (seq 16), loaded only on a cache miss."""
        model, inputs = request.getfixturevalue("minilm_s16")
        return copy.deepcopy(model), inputs

    tmp = tmp_path_factory.mktemp("models")
    out = [_case(tmp, name, factory, m) for name, factory in
           (("small_cnn", zoo.small_cnn), ("gpt2_tiny", zoo.gpt2_tiny)) for m in METHODS]
    out.append(_case(tmp, "minilm_s16", minilm_s16, "shift"))
    return out


@pytest.fixture(scope="module")
def reports(cases) -> list:
    return cross_check(cases, "all")


@pytest.mark.slow
def test_every_model_passes_on_every_available_target(reports) -> None:
    failures = [r.table() for r in reports if not r.passed]
    assert not failures, "\n\n".join(failures)
    for r in reports:
        by_target = {c.target: c for c in r.checks}
        for name in ("ort-cpu", "ort-arm", "openvino-cpu"):
            assert by_target[name].status == "pass", (r.case, name, by_target[name].reason)
        trt = by_target["tensorrt-gpu"]
        assert trt.status == "pass" or (trt.status == "skipped" and "tensorrt" in trt.reason)
        for c in r.checks:
            # shift models compile to int8 kernels by default (activations rounded per call)
            exact = c.precision != "int8"
            assert exact or (r.case.endswith(":shift") and c.target == "ort-cpu")
            for o in c.outputs:
                assert (o.max_rel < 1e-4 and o.cosine > 0.99999) if exact else (
                    o.passed), (r.case, c.target, o)  # the int8 tolerance


def test_int8_lowering_on_both_ort_targets(tmp_path) -> None:
    from edgestack import zoo

    case = _case(tmp_path, "gpt2_tiny", zoo.gpt2_tiny, "shift")
    (rep,) = cross_check([case], ["ort-cpu", "ort-arm"],
                         options={"ort-cpu": {"int8": "dynamic"},
                                  "ort-arm": {"int8": "dynamic"}})
    assert rep.passed, rep.table()
    for c in rep.checks:
        assert c.precision == "int8" and c.status == "pass", c


def test_every_model_lowers_for_tensorrt_without_rejections(cases, tmp_path) -> None:
    """Runs without TensorRT: only ops/dtypes its ONNX parser accepts, symmetric Q/DQ."""
    import onnx

    from edgestack.targets import get_target

    t = get_target("tensorrt-gpu")
    for i, case in enumerate(cases):
        art = t.lower(case.model, tmp_path / str(i), "jetson-orin-nano-8gb")
        assert art.report["rejected"] == [], case.name
        lowered = onnx.load(str(art.path()))
        assert {n.domain for n in lowered.graph.node} <= {""}
        assert all(len(n.input) == 2 for n in lowered.graph.node
                   if n.op_type == "DequantizeLinear"), case.name
