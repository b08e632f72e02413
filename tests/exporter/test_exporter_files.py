"""export(): external data, atomic writes and the ExportError messages."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgestack import zoo
from edgestack.errors import ExportError
from edgestack.exporter import export, ops
from edgestack.exporter.export import EXTERNAL_DATA_THRESHOLD

from exporter_models import compressed


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Boom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaboom in forward")


def test_external_data_always_then_never(tmp_path: Path) -> None:
    model, inputs, _ = compressed(zoo.small_cnn, "lowrank")
    out = tmp_path / "m.onnx"
    result = export(model, inputs, out, external_data="always")

    # the data file is named by its sha256: only this version of m.onnx refers to it
    data = result.data_path
    assert data is not None and data.parent == tmp_path and data.is_file()
    assert re.fullmatch(r"m\.onnx\.[0-9a-f]{12}\.data", data.name)
    assert data.name[7:19] == hashlib.sha256(data.read_bytes()).hexdigest()[:12]
    assert data.stat().st_size > 10_000
    assert leftovers(tmp_path) == ["m.onnx", data.name]
    assert out.stat().st_size < data.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert "features.2.v.weight" in external
    assert all(e.value == data.name for t in proto.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL
               for e in t.external_data if e.key == "location")
    onnx.checker.check_model(str(out), full_check=True)
    assert result.parity.passed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**inputs).numpy(), atol=1e-5)

    # the same weights again: the same name and bytes
    graph = out.read_bytes()
    again = export(model, inputs, out, external_data="always", parity=False, overwrite=True)
    assert again.data_path == data and out.read_bytes() == graph
    assert leftovers(tmp_path) == ["m.onnx", data.name]

    # re-export inline over it (only with overwrite): its data file goes too
    with pytest.raises(ExportError, match=r"m\.onnx already exists; pass --overwrite"):
        export(model, inputs, out, external_data="never", parity=False)
    result = export(model, inputs, out, external_data="never", parity=False, overwrite=True)
    assert result.data_path is None
    assert leftovers(tmp_path) == ["m.onnx"]
    assert result.file_bytes == out.stat().st_size


def test_external_data_auto_threshold_and_bad_value(tmp_path: Path) -> None:
    assert EXTERNAL_DATA_THRESHOLD == 100 * 2**20
    model, inputs, _ = compressed(zoo.conv1d_net, "shift")
    result = export(model, inputs, tmp_path / "a.onnx", parity=False)  # tiny: inline
    assert result.data_path is None
    with pytest.raises(ExportError, match="external_data must be 'auto', 'always' or 'never', "
                                          "found 'sometimes'"):
        export(model, inputs, tmp_path / "b.onnx", external_data="sometimes")
    assert leftovers(tmp_path) == ["a.onnx"]


def test_failed_export_leaves_nothing_and_keeps_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export(Boom(), (torch.randn(2, 3),), out)
    msg = str(info.value)
    assert msg.startswith("export: the model's forward failed on the example inputs "
                          "(x: (2, 3) torch.float32): RuntimeError: kaboom in forward")
    assert "expected inputs the model accepts" in msg
    assert leftovers(tmp_path) == []

    model, inputs, _ = compressed(zoo.small_cnn, "lowrank")  # tensors big enough for .data
    first = export(model, inputs, out, parity=False, external_data="always")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match="the model's forward failed"):
        export(Boom(), (torch.randn(2, 3),), out, external_data="always", overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # an existing file that is no export is never replaced, even with overwrite
    other = tmp_path / "notes.onnx"
    other.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"notes\.onnx exists and is not an ONNX file; "
                                          r"refusing to replace it even with --overwrite"):
        export(model, inputs, other, parity=False, overwrite=True)
    assert other.read_bytes() == b"previous export"
    other.unlink()

    # a stray m.onnx.data is the user's: kept (the export's data file has its own name)
    (tmp_path / "m.onnx.data").write_bytes(b"notes")
    export(model, inputs, out, parity=False, overwrite=True)
    onnx.checker.check_model(str(out))
    assert (tmp_path / "m.onnx.data").read_bytes() == b"notes"
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.data"]  # the old pair's data went
    assert first.data_path is not None and not first.data_path.exists()


def test_checker_failure_is_export_error_and_atomic(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs, _ = compressed(zoo.conv1d_net, "shift")
    out = tmp_path / "m.onnx"
    export(model, inputs, out, parity=False)
    kept = out.read_bytes()
    body = ops.SHIFT_WEIGHT.function

    # a function whose default-domain opset differs from the model's: the checker refuses it
    monkeypatch.setattr(ops.SHIFT_WEIGHT, "function", lambda opset=20: body(18))
    with pytest.raises(ExportError, match=r"^export: onnx.checker rejected the exported model: "
                                          r"ValidationError: .*imports version 18 whereas "
                                          r"model imports version 20"):
        export(model, inputs, out, overwrite=True)
    assert out.read_bytes() == kept
    assert leftovers(tmp_path) == ["m.onnx"]


def test_torch_export_failure_message(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on tensor values: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(ExportError) as info:
        export(DataDependent(), (torch.ones(3),), tmp_path / "m.onnx")
    msg = str(info.value)
    assert msg.startswith("export: torch.export failed: ")
    assert "data-dependent" in msg.lower() or "guard" in msg.lower()
    assert "expected a model that torch.export can trace" in msg
    assert len(msg.splitlines()) <= 16  # the head of torch's message, not all of it
    assert leftovers(tmp_path) == []


@torch.library.custom_op("edgestack::untranslated_for_test", mutates_args=())
def _untranslated(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@_untranslated.register_fake
def _untranslated_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_untranslated_edgestack_op_message(tmp_path: Path) -> None:
    class UsesUnknownOp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.edgestack.untranslated_for_test(x) * 2

    with pytest.raises(ExportError) as info:
        export(UsesUnknownOp(), (torch.ones(4),), tmp_path / "m.onnx")
    msg = str(info.value)
    assert msg.startswith("export: torch op(s) edgestack::untranslated_for_test have no ONNX "
                          "translation; expected only the translated ops (shift_weight -> "
                          "edgestack.ShiftWeight, bitstack_weight -> edgestack.BitStackWeight)")
    assert "add an EdgestackOp" in msg
    assert leftovers(tmp_path) == []


def test_onnx_conversion_failure_message(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("translation exploded")

    monkeypatch.setattr(ops.SHIFT_WEIGHT, "_translation", broken)
    model, inputs, _ = compressed(zoo.conv1d_net, "shift")
    with pytest.raises(ExportError) as info:
        export(model, inputs, tmp_path / "m.onnx")
    msg = str(info.value)
    assert msg.startswith("export: torch.onnx conversion failed: ")
    assert "translation exploded" in msg
    assert leftovers(tmp_path) == []


def test_bad_arguments(tmp_path: Path) -> None:
    model, inputs, _ = compressed(zoo.conv1d_net, "shift")
    with pytest.raises(ExportError, match="expected a dict of keyword tensors or a tuple of "
                                          "tensors, found list_iterator"):
        export(model, iter([1]), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"found non-tensor values \{'signal': 'int'\}"):
        export(model, {"signal": 3}, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="opset must be >= 18.*found 17"):
        export(model, inputs, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ExportError, match="output folder .* does not exist"):
        export(model, inputs, tmp_path / "nope" / "m.onnx")
    assert leftovers(tmp_path) == []


def test_failed_parity_is_reported_not_raised(tmp_path: Path) -> None:
    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)  # ONNX Runtime draws other random numbers

    out = tmp_path / "n.onnx"
    result = export(Noisy(), (torch.zeros(64),), out)
    assert out.is_file()
    assert result.parity is not None and not result.parity.passed
    assert result.parity.max_abs > 1e-3
    assert "FAILED" in result.parity.table()


def test_export_from_python_prints_no_torch_deprecation(tmp_path: Path) -> None:
    """torch.export's own ``LeafSpec`` FutureWarning (torch 2.13, inside torch) is not shown
    to a Python caller, and the caller's warning filters are left as they were."""
    import warnings

    model, inputs, _ = compressed(zoo.small_cnn, "lowrank")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        export(model, inputs, tmp_path / "m.onnx")
        assert warnings.filters == before
    assert not [w for w in caught if "LeafSpec" in str(w.message)], \
        [str(w.message)[:100] for w in caught]
