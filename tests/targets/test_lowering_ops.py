"""Every edgestack op and every lowering against the numpy reference, on every backend.

Backends: ONNX Runtime x86 (``ort-cpu``), ONNX Runtime aarch64 under qemu (``ort-arm``; all
of its runs batched into ONE emulated process) and OpenVINO CPU with the f32 hint. Shapes are
odd (no dim a multiple of 8), batch 1 and > 1, conv with groups, stride and padding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgestack.targets import get_target
from edgestack.targets.emulate import AArch64Emulator
from edgestack.targets.parity import TOLERANCES, compare_output
from edgestack.targets.passes.shift_int8 import shift_to_int8

from targets_cases import conv_case, decode_case, linear_case, random_shift, random_stack

RNG = np.random.default_rng(20261127)


def _cases() -> dict:
    cases = {}
    # Every op variant in one model: shift bits 2..5 x zero on random bytes (every code
    # value occurs), then BitStack; outputs w0..w7 are shift, w8 BitStack.
    fmts = [random_shift(RNG, (7, 5) if bits % 2 else (13, 3, 3, 3), bits, zero)
            for bits in (2, 3, 4, 5) for zero in (False, True)]
    fmts.append(random_stack(RNG, (5, 3, 7), 3, 2))
    cases["decode_all_ops"] = decode_case(fmts)
    from edgestack.formats import ShiftCodes

    def enc(shape, bits, zero):
        return ShiftCodes.encode(RNG.standard_normal(shape).astype(np.float32), bits, zero)

    cases["linear_shift4z_b1"] = linear_case(enc((11, 13), 4, True), 1, 5, rng=RNG)
    cases["linear_shift4z_b3"] = linear_case(enc((11, 13), 4, True), 3, 7, rng=RNG)
    cases["gemm_shift3_b2"] = linear_case(enc((19, 21), 3, False), 2, 0, gemm=True, rng=RNG)
    cases["linear_shift4_8levels"] = linear_case(enc((11, 13), 4, False), 2, 3, rng=RNG)
    cases["linear_bitstack_b2"] = linear_case(random_stack(RNG, (9, 13), 2, 3), 2, 5, rng=RNG)
    cases["conv_shift3_g2_s2_p1"] = conv_case(enc((6, 3, 3, 3), 3, True), 2, (9, 7), 2, 2, 1,
                                              rng=RNG)
    cases["conv_bitstack_b1"] = conv_case(random_stack(RNG, (5, 3, 3, 3), 2, 2), 1, (7, 5), 1,
                                          1, 0, rng=RNG)
    return cases


CASES = _cases()
# (target, options, exact): exact lowerings must match the reference to fp32 rounding.
LOWERINGS = [
    ("ort-cpu", {"int8": "off"}, True),
    ("ort-cpu", {"int8": "weights"}, True),
    ("ort-cpu", {"int8": "off", "weights": "keep"}, True),
    ("ort-cpu", {"int8": "dynamic"}, False),
    ("ort-arm", {"int8": "off"}, True),
    ("ort-arm", {"int8": "weights"}, True),
    ("ort-arm", {"int8": "off", "weights": "keep"}, True),
    ("ort-arm", {"int8": "dynamic"}, False),
    ("openvino-cpu", {"int8": "off"}, True),
    ("openvino-cpu", {"int8": "weights"}, True),
]


def _label(target: str, opts: dict) -> str:
    return target + ":" + ",".join(f"{k}={v}" for k, v in opts.items())


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(case, lowering label) -> (outputs, artifact), every backend run once."""
    root = tmp_path_factory.mktemp("lowering")
    out: dict = {}
    arm_jobs = []
    for name, (model, feeds, _) in CASES.items():
        src = root / f"{name}.onnx"
        onnx.save(model, src)
        for target, opts, exact in LOWERINGS:
            if name.startswith("decode") and not exact:
                continue    # no matmul to make dynamic: the same graph as int8=weights
            label = _label(target, opts)
            t = get_target(target)
            art = t.lower(src, root / name / label.replace(":", "_").replace(",", "_")
                          .replace("=", "-"), **opts)
            if target == "ort-arm":
                arm_jobs.append(((name, label), art, feeds))
                continue
            with t.runner(art) as runner:
                out[(name, label)] = (runner.infer(feeds), art)
    emu = AArch64Emulator.find()
    got = emu.run_many([(art.path(), feeds) for _, art, feeds in arm_jobs])
    for (key, art, _), res in zip(arm_jobs, got, strict=True):
        if isinstance(res, Exception):
            raise res
        out[key] = (res, art)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lowering", LOWERINGS, ids=[_label(t, o) for t, o, _ in LOWERINGS])
def test_lowering_matches_numpy_reference(results: dict, case: str, lowering: tuple) -> None:
    target, opts, exact = lowering
    if (case, _label(target, opts)) not in results:
        assert case.startswith("decode") and not exact
        return
    got, art = results[(case, _label(target, opts))]
    ref = CASES[case][2]
    assert list(got) == list(ref)
    for name, want in ref.items():
        have = got[name]
        assert have.shape == want.shape and have.dtype == np.float32, name
        if case.startswith("decode") and name not in ("w8",) and exact:
            np.testing.assert_array_equal(have, want, err_msg=f"{case} {name}")
        elif exact or art.precision == "fp32":
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(have, want, rtol=0, atol=2e-5 * scale,
                                       err_msg=f"{case} {name}")
        else:
            check = compare_output(name, have, want, TOLERANCES["int8"])
            assert check.passed, (case, check)


def test_lowered_graphs_have_no_edgestack_nodes_unless_kept(results: dict) -> None:
    for (case, label), (_, art) in results.items():
        onnx_file = art.path("onnx") if "onnx" in art.files else art.path()
        model = onnx.load(str(onnx_file))
        domains = {n.domain for n in model.graph.node}
        if "keep" in label and art.target == "ort-cpu":
            assert "edgestack" in domains, (case, label)
        else:
            assert "edgestack" not in domains, (case, label)


def test_int8_reports_and_fallback(results: dict) -> None:
    _, art = results[("linear_shift4z_b1", "ort-cpu:int8=dynamic")]
    assert art.precision == "int8"
    assert art.report["passes"]["DynamicInt8MatMulPass"]["rewritten"] == 1
    _, art = results[("linear_shift4_8levels", "ort-cpu:int8=dynamic")]
    fallback = art.report["passes"]["ShiftToInt8Pass"]["fallback"]
    assert fallback and "8 exponent levels" in next(iter(fallback.values()))
    assert art.precision == "fp32"   # materialized instead: exact
    _, art = results[("conv_shift3_g2_s2_p1", "ort-cpu:int8=dynamic")]
    assert art.report["passes"]["ShiftToInt8Pass"]["lowered"] == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("zero", [False, True])
def test_shift_int8_is_exact_or_refuses(bits: int, zero: bool) -> None:
    from edgestack.formats import ShiftCodes
    from edgestack.formats.shift import levels

    rng = np.random.default_rng(bits + 10 * zero)
    for shape in [(7, 5), (13, 3, 3, 3), (1, 9)]:
        codes = ShiftCodes.encode(rng.standard_normal(shape).astype(np.float32), bits, zero)
        res = shift_to_int8(codes.codes, codes.scale, bits, int(zero), list(shape))
        if levels(bits, zero) <= 7:
            q, s = res
            assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 64
            got = q.reshape(shape[0], -1).astype(np.float32) * s[:, None]
            np.testing.assert_array_equal(got.reshape(shape), codes.decode())
            # the scale is the channel scale times a power of two
            ratio = s / codes.scale
            np.testing.assert_array_equal(np.exp2(np.round(np.log2(ratio))), ratio)
        elif isinstance(res, str):
            assert "levels" in res
        else:   # 8 levels fit when no channel uses both ends
            q, s = res
            got = q.reshape(shape[0], -1).astype(np.float32) * s[:, None]
            np.testing.assert_array_equal(got.reshape(shape), codes.decode())
