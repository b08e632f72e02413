"""Issue 11's sign-matmul route for serving BitStack without decoding, measured and dropped.

A BitStack block of rank k is ``W_b = (U_b V_b) * S_b`` with ``S_b`` a +-1 matrix, so
``W_b x = sum_j u_j * (S_b (v_j * x))``: k matmuls with the sign matrix per block. ONNX Runtime
can hold ``S_b`` as 2-bit ``MatMulNBits`` (codes 0/2 around zero point 1, scale 1). This times
one such sign matmul (one block, one rank vector) on one MiniLM FFN layer ``[1536 x 384]`` at
seq 128, 2 threads, against the one int8 ``DynamicQuantizeMatMul`` and the one fp32 ``MatMul``
that a materialised layer costs; a 12-block package with k ~ 2 needs 24 sign matmuls a layer.
(4-bit codes, which waste half their bits, for comparison.)

Run:  .venv/bin/python bench/sign_matmul.py
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

M, N, S = 1536, 384, 128
BLOCK = 32


def session(nodes: list, inits: list, out_shape: list) -> ort.InferenceSession:
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, N])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def nbits(bits: int, codes: np.ndarray) -> ort.InferenceSession:
    """``MatMulNBits`` over ``codes`` ``[M, N/32, 32]`` (values < 2**bits), scale 1."""
    per = 8 // bits
    packed = np.zeros((M, N // BLOCK, BLOCK * bits // 8), np.uint8)
    for i in range(per):
        packed |= codes[:, :, i::per].astype(np.uint8) << (bits * i)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                            K=N, N=M, bits=bits, block_size=BLOCK, accuracy_level=4)
    return session([node], [numpy_helper.from_array(packed, "b"),
                            numpy_helper.from_array(np.ones((M, N // BLOCK), np.float32), "s")],
                   [S, M])


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((S, N)).astype(np.float32)
    w = rng.standard_normal((N, M)).astype(np.float32)
    q = rng.integers(-127, 127, (N, M)).astype(np.int8)
    subjects = {
        "fp32 MatMul": session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                               [numpy_helper.from_array(w, "w")], [S, M]),
        "int8 DynamicQuantizeMatMul": session(
            [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"],
                              domain="com.microsoft")],
            [numpy_helper.from_array(q, "q"),
             numpy_helper.from_array(np.ones(M, np.float32), "s")], [S, M]),
        "sign matmul, 2-bit MatMulNBits (1 block x 1 rank)": nbits(
            2, rng.integers(0, 2, (M, N // BLOCK, BLOCK)) * 2),
        "sign matmul, 4-bit MatMulNBits (1 block x 1 rank)": nbits(
            4, rng.integers(0, 2, (M, N // BLOCK, BLOCK)) * 2 + 7),
    }
    times: dict[str, list[float]] = {k: [] for k in subjects}
    for sess in subjects.values():
        for _ in range(3):
            sess.run(None, {"x": x})
    for _ in range(50):
        for label, sess in subjects.items():
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            times[label].append(time.perf_counter() - t0)
    for label, t in times.items():
        print(f"{label:52s} {1e3 * float(np.median(t)):7.3f} ms")


if __name__ == "__main__":
    main()
