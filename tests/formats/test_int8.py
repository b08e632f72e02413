"""The int8 codecs the runtime materialises tiers with (:mod:`edgestack.formats.int8`)."""

from __future__ import annotations

import numpy as np

from edgestack.formats.int8 import quantize_int8, quantize_nbits8


def test_quantize_int8_is_per_output_channel():
    rng = np.random.default_rng(0)
    wt = (rng.standard_normal((300, 7)) * np.array([1e-3, 1, 10, 0, 5, 2, 0.1])).astype(
        np.float32)
    q, scale = quantize_int8(wt)
    assert q.dtype == np.int8 and q.shape == wt.shape and scale.shape == (7,)
    assert np.all(np.abs(q.astype(np.int32)) <= 127)
    assert scale[3] == 1 and not q[:, 3].any()            # an all-zero column
    err = np.abs(q * scale - wt)
    assert np.all(err <= scale / 2 + 1e-7)                 # rounding: half a step at most
    assert np.abs(q).max(axis=0)[[0, 1, 2, 4, 5, 6]].min() == 127  # each column uses its range


def test_quantize_nbits8_is_what_matmulnbits_computes():
    """The 8-bit blockwise codes the runtime serves, in ONNX Runtime's MatMulNBits (K not a multiple
    of the block: padded), give x @ dequantized(W).T; the codes are within half a step."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    n, k = 6, 70
    w = (rng.standard_normal((n, k)) * np.linspace(0.01, 3, n)[:, None]).astype(np.float32)
    w[2, 32:64] = 0                                          # an all-zero block
    codes, scales = quantize_nbits8(w)
    assert codes.shape == (n, 3, 32) and scales.shape == (n, 3) and scales[2, 1] == 1
    deq = ((codes.astype(np.float32) - 128) * scales[:, :, None]).reshape(n, -1)[:, :k]
    assert np.all(np.abs(deq - w) <= np.repeat(scales, 32, axis=1)[:, :k] / 2 + 1e-6)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=8, block_size=32, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        [numpy_helper.from_array(codes, "b"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((4, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)
