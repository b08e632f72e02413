"""`edgestack inspect`: exported ONNX files and device packages, text and JSON, bad paths."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgestack.cli import main
from edgestack.package import Package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_helpers import CREATED, synthetic_onnx


def inspect_json(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["-q", "inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def inspect_text(capsys, path) -> str:
    capsys.readouterr()
    assert main(["-q", "inspect", str(path)]) == 0
    return capsys.readouterr().out


def onnx_op_counts(path) -> dict[tuple[str, str], int]:
    m = onnx.load(str(path), load_external_data=False)
    return dict(Counter((n.domain or "ai.onnx", n.op_type) for n in m.graph.node))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """small-cnn exported with shift (4 bits) and with BitStack (3 blocks)."""
    folder = tmp_path_factory.mktemp("inspect")
    paths = {"shift": folder / "shift.onnx", "bitstack": folder / "bs.onnx"}
    assert main(["-q", "export", "small-cnn", "--method", "shift", "--out",
                 str(paths["shift"])]) == 0
    assert main(["-q", "export", "small-cnn", "--method", "bitstack", "--blocks", "3", "--out",
                 str(paths["bitstack"])]) == 0
    return paths


def test_onnx_json_matches_the_file(exported, capsys):
    path = exported["shift"]
    r = inspect_json(capsys, path)
    m = onnx.load(str(path))
    assert r["ok"] is True and r["kind"] == "onnx"
    assert r["producer"] == {"name": "edgestack", "version": m.producer_version}
    assert r["opset_imports"] == {(o.domain or "ai.onnx"): o.version for o in m.opset_import}
    assert r["opset_imports"]["edgestack"] == 1
    assert {(c["domain"], c["op_type"]): c["count"] for c in r["op_counts"]} == \
        onnx_op_counts(path)
    assert r["nodes"] == len(m.graph.node)
    assert r["functions"] == ["edgestack.ShiftWeight"]
    assert [i["name"] for i in r["inputs"]] == [i.name for i in m.graph.input]
    assert r["inputs"][0] == {"name": "pixel_values", "dtype": "float32",
                              "shape": [1, 3, 32, 32]}
    assert r["outputs"][0]["shape"] == [1, 10]
    arrays = [numpy_helper.to_array(t) for t in m.graph.initializer]
    assert r["initializers"]["count"] == len(arrays)
    assert r["initializers"]["bytes"] == sum(a.nbytes for a in arrays)
    assert r["initializers"]["by_dtype"]["uint8"]["bytes"] == sum(
        a.nbytes for a in arrays if a.dtype == np.uint8)
    assert r["external_data"] == []
    meta = r["metadata"]
    assert meta["edgestack.method"] == "shift"
    report = meta["edgestack.compression"]          # parsed JSON, not a string
    assert isinstance(report, dict) and len(report["layers"]) == 6

    layers = r["compressed_layers"]
    assert [x["name"] for x in layers] == [e["name"] for e in report["layers"]]
    for row, entry in zip(layers, report["layers"], strict=True):
        assert row["op"] == "ShiftWeight" and row["source"] == "graph"
        assert row["shape"] == entry["shape"] and row["kind"] == entry["kind"]
        assert row["details"]["bits"] == 4
        # the bytes stored in the file are the compression report's
        assert row["compressed_bytes"] == entry["compressed_bytes"]
        assert row["dense_bytes"] == 4 * int(np.prod(row["shape"])) == entry["dense_bytes"]
        assert row["bits_per_weight"] == pytest.approx(entry["bits_per_weight"], abs=1e-3)
    assert r["compression"]["compressed_bytes"] == sum(x["compressed_bytes"] for x in layers)


def test_bitstack_onnx_text(exported, capsys):
    path = exported["bitstack"]
    text = inspect_text(capsys, path)
    r = inspect_json(capsys, path)
    assert text.startswith(f"{path}: ONNX model")
    assert "producer edgestack" in text and "opsets: edgestack 1, ai.onnx" in text
    assert "compressed layers: 6" in text
    for row in r["compressed_layers"]:
        assert row["op"] == "BitStackWeight"
        assert row["details"] == {"blocks": 3, "k": 1}
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(row["name"] + " "))
        assert "BitStackWeight" in line and "blocks=3 k=1" in line
        assert str(row["compressed_bytes"]) in line
    counts = onnx_op_counts(path)
    assert counts[("edgestack", "BitStackWeight")] == 6
    for (domain, op), n in counts.items():
        assert any(ln.split() == [domain, op, str(n)] for ln in text.splitlines())
    assert "edgestack.bitstack_order" in text


def test_external_data_is_listed_not_read(tmp_path, capsys):
    path = tmp_path / "ext.onnx"
    assert main(["-q", "export", "small-cnn", "--method", "shift", "--external-data", "always",
                 "--out", str(path)]) == 0
    data = [f for f in tmp_path.iterdir() if f.name != "ext.onnx"]
    assert len(data) == 1
    r = inspect_json(capsys, path)
    (ext,) = r["external_data"]
    assert ext["file"] == data[0].name and ext["exists"] is True
    assert ext["bytes"] == ext["size"] == data[0].stat().st_size
    m = onnx.load(str(path))  # with the data: the total counts it too
    assert r["initializers"]["bytes"] == sum(numpy_helper.to_array(t).nbytes
                                             for t in m.graph.initializer)
    assert f"{data[0].name}" in inspect_text(capsys, path)


def check_package_report(r: dict, path: Path) -> None:
    with Package.open(path) as pkg:
        assert r["kind"] == "package" and r["archive"] == pkg.is_archive
        assert r["target"] == pkg.manifest.target and r["model"]["name"] == \
            pkg.manifest.model.name
        assert {f["name"]: (f["role"], f["size"]) for f in r["files"]} == {
            n: (e.role, e.size) for n, e in pkg.files.items()}
        assert len(r["tiers"]) == len(pkg.tiers) > 1
        for row, tier in zip(r["tiers"], pkg.tiers, strict=True):
            assert row["index"] == tier.index and row["blocks_loaded"] == tier.n_records
            assert row["bytes"] == tier.bytes and row["total_bytes"] == tier.total_bytes
            assert row["blocks"] == dict(tier.blocks)
        assert r["tiers"][-1]["blocks_loaded"] == r["blocks"] == len(pkg.block_index)
        assert [x["name"] for x in r["layers"]] == list(pkg.layers)
        for row in r["layers"]:
            info = pkg.layers[row["name"]]
            assert row["shape"] == list(info.shape) and row["rank"] == info.rank
            assert row["n_blocks"] == info.n_blocks
        assert sum(x["bytes"] for x in r["layers"]) <= r["block_file_bytes"] == \
            pkg.block_file_size
        assert r["golden"]["tier"] == pkg.golden_info.tier
        assert r["golden"]["inputs"] == pkg.golden_info.inputs
        assert "mixed" in r["variants"]
        graph = onnx.load_model_from_string(pkg.read_file(pkg.graph_file))
    assert r["graph"]["file"] == "model.onnx"
    assert {(c["domain"], c["op_type"]): c["count"] for c in r["graph"]["op_counts"]} == \
        dict(Counter((n.domain or "ai.onnx", n.op_type) for n in graph.graph.node))


def test_package_from_the_cli_dir_and_tar(exported, tmp_path, capsys):
    pkg = tmp_path / "bs.pkg"
    tar = tmp_path / "bs.tar"
    assert main(["-q", "pack", str(exported["bitstack"]), "--out", str(pkg)]) == 0
    assert main(["-q", "pack", str(exported["bitstack"]), "--out", str(tar)]) == 0
    r = inspect_json(capsys, pkg)
    check_package_report(r, pkg)
    assert len(r["layers"]) == 6 and all(x["n_blocks"] == 3 for x in r["layers"])
    assert r["model"]["method"] == "bitstack" and r["archive"] is False
    # the packed graph's blocks are graph inputs: counted apart from the model's inputs
    assert [i["name"] for i in r["graph"]["inputs"]] == ["pixel_values"]
    assert r["graph"]["block_inputs"] == 18
    rt = inspect_json(capsys, tar)
    check_package_report(rt, tar)
    assert rt["archive"] is True and rt["tiers"] == r["tiers"] and rt["layers"] == r["layers"]

    text = inspect_text(capsys, pkg)
    assert text.startswith(f"{pkg}: device package (folder)")
    assert f"tiers: {len(r['tiers'])}" in text
    assert "BitStack layers: 6, 18 blocks" in text
    assert "graph variants: mixed (model.mixed.onnx)" in text
    assert "golden: golden/inputs.npz, golden/outputs.npz" in text
    for row in r["layers"]:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(row["name"] + " "))
        assert "[" + ", ".join(map(str, row["shape"])) + "]" in line
        assert f" {row['n_blocks']} " in line and f" {row['bytes']} " in line
    for tier in r["tiers"]:
        assert any(ln.split()[:3] == [str(tier["index"]), f"{tier['blocks_loaded']}/18",
                                      str(tier["bytes"])] for ln in text.splitlines())
    assert "(.tar archive)" in inspect_text(capsys, tar)


def test_synthetic_package_with_weights_and_dense_variants(tmp_path, capsys):
    from edgestack.packer.pack import pack

    model = tmp_path / "mlp.onnx"
    stacks = synthetic_onnx(model)
    out = tmp_path / "mlp.pkg"
    pack(model, out, created=CREATED)
    r = inspect_json(capsys, out)
    check_package_report(r, out)
    assert r["created"] == CREATED
    assert {x["name"]: (x["shape"], x["n_blocks"]) for x in r["layers"]} == {
        n: (list(s.shape), s.n_blocks) for n, s in stacks.items()}
    with Package.open(out) as pkg:
        variants = sorted(n for n, e in pkg.files.items() if e.role == "variant")
        weights = [n for n, e in pkg.files.items() if e.role == "weights"]
    assert sorted(r["variants"].values()) == variants and len(variants) > 1
    (ext,) = r["graph"]["external_data"]       # the weights file is the package's own
    assert [ext["file"]] == weights and ext["exists"] is True
    assert ext["size"] == next(f["size"] for f in r["files"] if f["name"] == ext["file"])
    # the exported (unpacked) model: its BitStack rows measured from the initializers
    rm = inspect_json(capsys, model)
    for row in rm["compressed_layers"]:
        s = stacks[row["name"]]
        assert row["compressed_bytes"] == s.signs.nbytes + s.u.nbytes + s.v.nbytes
        assert row["details"] == {"blocks": s.n_blocks, "k": s.u.shape[-1]}


def test_missing_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("edgestack inspect: error:") and "not found" in err
    assert "expected an ONNX file" in err and "check the path" in err
    assert main(["inspect", str(missing), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "not found" in out["error"]


@pytest.mark.parametrize("what", ["text", "empty", "folder"])
def test_neither_onnx_nor_package_exits_2(tmp_path, capsys, what):
    path = tmp_path / "thing"
    if what == "text":
        path = tmp_path / "notes.txt"
        path.write_text("hello, not a model\n")
    elif what == "empty":
        path = tmp_path / "empty.onnx"
        path.write_bytes(b"")
    else:
        path.mkdir()
        (path / "model.onnx").write_bytes(b"")
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert "expected an ONNX file" in err and "found a" in err
    assert ("without manifest.json" in err) == (what == "folder")
    assert "edgestack export" in err and "edgestack pack" in err


def test_help_and_no_torch(exported):
    r = subprocess.run([sys.executable, "-m", "edgestack", "inspect", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--json" in r.stdout and "FILE|PKG" in r.stdout
    code = ("import sys; from edgestack.cli import main; "
            f"rc = main(['-q', 'inspect', {str(exported['bitstack'])!r}, '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "onnx"
