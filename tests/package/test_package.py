"""Device package: writer state machine, format layout (golden bytes), reader checks, archives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgestack.errors import EdgestackError, PackageError
from edgestack.formats import BitStackStack, pack_bits
from edgestack.package import (
    BLOCK_ALIGN,
    LayerGraph,
    Package,
    PackageWriter,
    extract_archive,
    write_archive,
)
from edgestack.package import writer as writer_mod

SHAPES = {"enc.q": ((7, 5), 2, 3), "conv": ((3, 4, 3), 1, 4), "head": ((13, 11), 3, 2)}
ORDER = [
    ("enc.q", 0), ("conv", 0), ("head", 0), ("enc.q", 1), ("conv", 1),
    ("conv", 2), ("head", 1), ("enc.q", 2), ("conv", 3),
]
TIERS = [3, 5, 6, 8, 9]
CREATED = "2026-01-02T03:04:05Z"
HEAD = LayerGraph(node="head_decode", signs="head.signs", u="head.u", v="head.v",
                  output="head.weight", torch_layer="head")


def make_stacks(seed: int = 0) -> dict[str, BitStackStack]:
    rng = np.random.default_rng(seed)
    stacks = {}
    for name, (shape, k, nb) in SHAPES.items():
        m, n = shape[0], int(np.prod(shape[1:]))
        signs = np.stack([pack_bits(rng.integers(0, 2, m * n)) for _ in range(nb)])
        u = rng.standard_normal((nb, m, k)).astype(np.float16)
        v = rng.standard_normal((nb, k, n)).astype(np.float16)
        stacks[name] = BitStackStack(signs, u, v, shape)
    return stacks


def write_package(out: Path, stacks: dict[str, BitStackStack] | None = None, **kw) -> Path:
    stacks = stacks if stacks is not None else make_stacks()
    with PackageWriter(out, overwrite=kw.pop("overwrite", False)) as w:
        w.begin(name="tiny", target="ort-cpu", source="test", method="bitstack", created=CREATED)
        w.add_file("model.onnx", b"fake onnx graph bytes", role="graph")
        w.add_file("weights/extra.data", bytes(range(100)), role="weights")
        w.add_blocks(ORDER, stacks, graphs={"head": HEAD})
        w.set_tiers(TIERS)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        w.add_golden({"x": x}, {"y": np.ones(4, np.float32)})
        w.finish()
    return out


@pytest.fixture
def pkg_dir(tmp_path: Path) -> Path:
    return write_package(tmp_path / "pkg")


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def tier_views(pkg: Package, tier: int, start_tier: int | None = None) -> list:
    """The blocks tier ``tier`` adds to ``start_tier`` (default: all of them), read with one
    counted ``read_prefix``."""
    start = 0 if start_tier is None else pkg.tiers[start_tier].bytes
    return pkg.views_of(pkg.read_prefix(start, pkg.tiers[tier].bytes), start)


def layer_views(pkg: Package, layer: str) -> list:
    return [v for v in tier_views(pkg, len(pkg.tiers) - 1) if v.layer == layer]


# ---- round trip ---------------------------------------------------------------------------


def test_round_trip_views_tiers_and_counter(pkg_dir: Path):
    stacks = make_stacks()
    with Package.open(pkg_dir) as pkg:
        pkg.verify()
        assert pkg.graph_file == "model.onnx"
        assert pkg.read_file("model.onnx") == b"fake onnx graph bytes"
        assert [t.n_records for t in pkg.tiers] == TIERS
        assert pkg.layers["head"].graph == HEAD and pkg.layers["conv"].graph is None
        blocks_bin = (pkg_dir / "blocks.bin").read_bytes()
        assert pkg.tiers[-1].bytes == len(blocks_bin) == pkg.block_file_size
        for rec in pkg.block_index:
            assert rec.offset % BLOCK_ALIGN == rec.u % BLOCK_ALIGN == rec.v % BLOCK_ALIGN == 0

        # Each tier is a prefix of the file, and its blocks are the first records in order.
        for t, tier in enumerate(pkg.tiers):
            data = pkg.read_prefix(0, tier.bytes)
            assert data.tobytes() == blocks_bin[: tier.bytes]
            views = pkg.views_of(data, 0)
            assert [(b.layer, b.block) for b in views] == ORDER[: TIERS[t]]
            assert {n: sum(v.layer == n for v in views) for n in SHAPES} == dict(tier.blocks)
            assert tier.total_bytes == tier.bytes + len(b"fake onnx graph bytes") + 100

        # Views equal the written arrays.
        for name, stack in stacks.items():
            views = layer_views(pkg, name)
            assert len(views) == stack.n_blocks
            for i, view in enumerate(views):
                assert np.array_equal(view.signs, stack.signs[i])
                assert np.array_equal(view.u, stack.u[i]) and view.u.dtype == np.float16
                assert np.array_equal(view.v, stack.v[i])
            two = BitStackStack(np.stack([v.signs for v in views[:2]]),
                                np.stack([v.u for v in views[:2]]),
                                np.stack([v.v for v in views[:2]]), stack.shape)
            np.testing.assert_array_equal(two.decode(), stack.prefix(2).decode())

        golden_in, golden_out = pkg.golden()
        assert np.array_equal(golden_in["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
        assert golden_out["y"].tolist() == [1.0] * 4
        assert pkg.golden_info.tier == 4


def test_growing_a_tier_reads_only_the_new_bytes(pkg_dir: Path):
    with Package.open(pkg_dir) as pkg:
        chunks = [tier_views(pkg, 0)]
        assert pkg.counter.bytes_read == pkg.tiers[0].bytes
        for t in range(1, len(pkg.tiers)):
            before = pkg.counter.bytes_read
            chunks.append(tier_views(pkg, t, start_tier=t - 1))
            assert pkg.counter.bytes_read - before == pkg.tiers[t].bytes - pkg.tiers[t - 1].bytes
            assert pkg.counter.ranges[-1] == (pkg.tiers[t - 1].bytes, pkg.tiers[t].bytes)
            assert [(b.layer, b.block) for b in chunks[-1]] == ORDER[TIERS[t - 1] : TIERS[t]]
        assert pkg.counter.bytes_read == pkg.block_file_size
        assert pkg.counter.reads == len(pkg.tiers)
        # buffers keep file-offset alignment: every part view starts 64-byte aligned in memory
        for views in chunks:
            for view in views:
                for part in (view.signs, view.u, view.v):
                    assert part.ctypes.data % BLOCK_ALIGN == 0
        data = pkg.read_prefix(7, 700)
        assert data.tobytes() == (pkg_dir / "blocks.bin").read_bytes()[7:700]
        assert [(v.layer, v.block) for v in pkg.views_of(data, 7)] == ORDER[1:3]
        with pytest.raises(PackageError, match=r"end must be an integer in \[0, 1944\], found 5"):
            pkg.read_prefix(0, 5000)


def test_package_without_blocks_has_one_tier(tmp_path: Path):
    with PackageWriter(tmp_path / "p") as w:
        w.begin(name="dense", target="ort-cpu")
        w.add_file("model.onnx", b"graph", role="graph")
        with pytest.raises(PackageError, match="no blocks were added"):
            w.set_tiers([1])
        w.finish()
    with Package.open(tmp_path / "p") as pkg:
        assert len(pkg.tiers) == 1 and pkg.tiers[0].bytes == 0 and pkg.tiers[0].total_bytes == 5
        assert pkg.views_of(pkg.read_prefix(0, 0), 0) == []
        assert "blocks.bin" not in pkg.files
        with pytest.raises(PackageError, match="no golden data"):
            pkg.golden()


# ---- golden bytes: the format must not drift silently ----------------------------------------


def tiny_stacks() -> dict[str, BitStackStack]:
    def stack(m, n, k, nb, seed):
        cells = np.arange(nb * m * n).reshape(nb, m * n)
        signs = np.stack([pack_bits((cells[i] * 7 + seed) % 3 == 0) for i in range(nb)])
        u = (np.arange(nb * m * k).reshape(nb, m, k) % 5 - 2 + seed).astype(np.float16) / 4
        v = (np.arange(nb * k * n).reshape(nb, k, n) % 7 - 3).astype(np.float16) / 8
        return BitStackStack(signs, u, v, (m, n))

    return {"a": stack(3, 5, 1, 2, 0), "b": stack(4, 2, 2, 1, 1)}


def test_golden_bytes_of_a_tiny_package(tmp_path: Path):
    out = tmp_path / "tiny"
    with PackageWriter(out) as w:
        w.begin(name="tiny", target="ort-cpu", created="2026-01-01T00:00:00Z")
        w.add_file("model.onnx", b"graph", role="graph")
        w.add_blocks([("a", 0), ("b", 0), ("a", 1)], tiny_stacks())
        w.set_tiers([2, 3])
        w.finish()
    blocks = (out / "blocks.bin").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["order"] == ["a", "b", "a"] and manifest["tiers"] == [2, 3]
    assert set(manifest["layers"]["a"]) == {"shape", "rank", "n_blocks", "dtype", "graph"}
    with Package.open(out) as pkg:   # derived: offsets from shapes and order, tier bytes
        assert [(r.layer, r.block, r.offset, r.length, r.signs, r.u, r.v)
                for r in pkg.block_index] == [
            ("a", 0, 0, 138, 0, 64, 128),
            ("b", 0, 192, 136, 192, 256, 320),
            ("a", 1, 384, 138, 384, 448, 512),
        ]
        assert [(t.bytes, t.total_bytes) for t in pkg.tiers] == [(328, 333), (522, 527)]
        assert [dict(t.blocks) for t in pkg.tiers] == [{"a": 1, "b": 1}, {"a": 2, "b": 1}]
    assert len(blocks) == 522
    assert blocks[2:64] == bytes(62) and blocks[138:192] == bytes(54)  # zero padding
    assert hashlib.sha256(blocks).hexdigest() == BLOCKS_SHA256
    # each record's span, from the previous record's end to its own, is hashed: the spans
    # tile the file (so the padding before a record is checked with it)
    assert manifest["block_sha256"] == [hashlib.sha256(blocks[a:b]).hexdigest()
                                        for a, b in ((0, 138), (138, 328), (328, 522))]
    text = (out / "manifest.json").read_bytes()
    text = text.replace(b'"edgestack_version": "0.1.0"', b'"edgestack_version": "X"')
    import edgestack

    if edgestack.__version__ == "0.1.0":
        assert hashlib.sha256(text).hexdigest() == MANIFEST_SHA256
    # the archive form is deterministic too, and keeps member data 512-byte aligned
    write_archive(out, tmp_path / "a.tar")
    write_archive(out, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json", "model.onnx", "blocks.bin"]
        assert all(m.offset_data % 512 == 0 and m.isreg() and m.mode == 0o644 for m in members)


BLOCKS_SHA256 = "7c534f60ac06d4b04179018bb57591cd4e1faadbe31db9696312e707475d576c"
MANIFEST_SHA256 = "ad15b92e85f4e07b10ab15aa3552fef857aad2fff8cce49e072b8d93d94bbbf9"


# ---- atomicity and the state machine -------------------------------------------------------


def test_exception_mid_pack_leaves_nothing(tmp_path: Path):
    out = tmp_path / "pkg"
    with pytest.raises(RuntimeError, match="boom"), PackageWriter(out) as w:
        w.begin(name="m", target="ort-cpu")
        w.add_file("model.onnx", b"g", role="graph")
        w.add_blocks(ORDER, make_stacks())
        raise RuntimeError("boom")
    assert siblings(out) == []


def test_io_failure_mid_write_aborts_without_context_manager(tmp_path: Path, monkeypatch):
    out = tmp_path / "pkg"
    w = PackageWriter(out)
    w.begin(name="m", target="ort-cpu")
    w.add_file("model.onnx", b"g", role="graph")
    def full_disk(fd):  # delayed allocation: the disk is found full when the data is synced
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        w.add_blocks(ORDER, make_stacks())
    monkeypatch.undo()
    assert w.state == "aborted"
    assert siblings(out) == []
    with pytest.raises(PackageError, match="state 'aborted'"):
        w.finish()


def test_leaving_the_with_block_without_finish(tmp_path: Path):
    with pytest.raises(PackageError, match="without finish"), PackageWriter(tmp_path / "pkg") as w:
        w.begin(name="m", target="ort-cpu")
    assert siblings(tmp_path / "pkg") == []


def test_out_of_order_calls_name_the_state(tmp_path: Path):
    w = PackageWriter(tmp_path / "pkg")
    with pytest.raises(PackageError) as exc:
        w.add_file("model.onnx", b"g", role="graph")
    assert str(exc.value) == (
        "PackageWriter.add_file() is not allowed in state 'new' (allowed in 'open'); the call "
        "order is begin() -> add_file()/add_blocks() -> set_tiers() -> add_golden() -> finish()"
    )
    w.begin(name="m", target="ort-cpu")
    with pytest.raises(PackageError, match="begin\\(\\) is not allowed in state 'open'"):
        w.begin(name="m", target="ort-cpu")
    w.add_file("model.onnx", b"g", role="graph")
    w.add_blocks(ORDER, make_stacks())
    with pytest.raises(PackageError, match="finish\\(\\) is not allowed in state 'open'"):
        w.finish()
    with pytest.raises(PackageError, match="add_golden\\(\\) is not allowed in state 'open'"):
        w.add_golden({"x": np.zeros(1)}, {"y": np.zeros(1)})
    w.set_tiers(TIERS)
    with pytest.raises(PackageError, match="add_file\\(\\) is not allowed in state 'tiered'"):
        w.add_file("more.bin", b"x", role="aux")
    with pytest.raises(PackageError, match="set_tiers\\(\\) is not allowed in state 'tiered'"):
        w.set_tiers(TIERS)
    w.finish()
    with pytest.raises(PackageError, match="state 'finished'"):
        w.add_golden({"x": np.zeros(1)}, {"y": np.zeros(1)})
    Package.open(tmp_path / "pkg").verify()


def test_writer_validates_order_tiers_and_files(tmp_path: Path):
    stacks = make_stacks()
    with PackageWriter(tmp_path / "pkg") as w:
        w.begin(name="m", target="ort-cpu")
        with pytest.raises(PackageError, match="'../x' is not allowed: it contains '..'"):
            w.add_file("../x", b"", role="aux")
        with pytest.raises(PackageError, match="reserved"):
            w.add_file("blocks.bin", b"", role="aux")
        w.add_file("model.onnx", b"g", role="graph")
        with pytest.raises(PackageError, match="differ only in case"):
            w.add_file("MODEL.onnx", b"g", role="aux")
        with pytest.raises(PackageError, match="already has a graph file"):
            w.add_file("other.onnx", b"g", role="graph")
        bad = [("conv", 1)] + [p for p in ORDER if p != ("conv", 1)]
        with pytest.raises(PackageError, match=r"add_blocks: order\[0\]: expected block 0 of "
                                               "layer 'conv'"):
            w.add_blocks(bad, stacks)
        with pytest.raises(PackageError, match="missing blocks"):
            w.add_blocks(ORDER[:-1], stacks)
        with pytest.raises(PackageError, match="not a LayerGraph"):
            w.add_blocks(ORDER, stacks, graphs={"head": {"node": "x"}})
        w.add_blocks(ORDER, stacks)
        with pytest.raises(PackageError, match="expected a list of 1 to 1024 record counts"):
            w.set_tiers([{"enc.q": 1, "conv": 2, "head": 1}, 9])
        with pytest.raises(PackageError, match=r"set_tiers: tiers\[0\]: the first 2 records "
                                               r"hold no block of layers \['head'\]"):
            w.set_tiers([2, 9])
        with pytest.raises(PackageError, match="last tier must hold every block"):
            w.set_tiers([3, 5])
        with pytest.raises(PackageError, match=r"tiers\[1\]: expected a record count in "
                                               r"\[6, 9\].*found 5"):
            w.set_tiers([5, 5, 9])
        w.set_tiers(TIERS)
        w.finish()


def test_overwrite_rules(tmp_path: Path):
    out = write_package(tmp_path / "pkg")
    with pytest.raises(PackageError, match="already exists; pass overwrite=True"):
        write_package(out)
    write_package(out, stacks=make_stacks(seed=1), overwrite=True)
    with Package.open(out) as pkg:
        pkg.verify()
        assert np.array_equal(layer_views(pkg, "head")[0].u, make_stacks(seed=1)["head"].u[0])
    assert siblings(out) == ["pkg"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(PackageError, match="neither a package .* nor empty; refusing"):
        write_package(precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert sorted(siblings(precious)) == ["pkg", "precious"]


# ---- reader checks ---------------------------------------------------------------------------


def test_one_changed_byte_is_named_by_verify(pkg_dir: Path):
    path = pkg_dir / "blocks.bin"
    data = bytearray(path.read_bytes())
    expected = hashlib.sha256(data).hexdigest()
    data[300] ^= 0x01
    path.write_bytes(data)
    # sizes still match: open succeeds, verify does not
    with Package.open(pkg_dir) as pkg, pytest.raises(PackageError) as exc:
        pkg.verify()
    msg = str(exc.value)
    assert "file 'blocks.bin' is damaged" in msg
    assert f"sha256 expected {expected}, found {hashlib.sha256(data).hexdigest()}" in msg
    assert "re-copy the package" in msg


def test_truncated_block_file_is_named_with_sizes(pkg_dir: Path):
    path = pkg_dir / "blocks.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PackageError) as exc:
        Package.open(pkg_dir)
    assert str(exc.value) == (
        f"{pkg_dir}: file 'blocks.bin' is truncated (an interrupted copy or download?): "
        "expected 1944 bytes (manifest), found 1000; re-copy the package from its source, or "
        "repack the model"
    )


def test_missing_file_and_symlinked_file(pkg_dir: Path, tmp_path: Path):
    (pkg_dir / "weights" / "extra.data").unlink()
    with pytest.raises(PackageError, match="'weights/extra.data' .* listed in manifest.json but"):
        Package.open(pkg_dir)
    outside = tmp_path / "outside.data"
    outside.write_bytes(bytes(range(100)))
    os.symlink(outside, pkg_dir / "weights" / "extra.data")
    with pytest.raises(PackageError, match="'weights/extra.data' is a symlink"):
        Package.open(pkg_dir)


def edit_manifest(pkg_dir: Path, edit) -> None:
    path = pkg_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_older_and_newer_schema_versions_are_refused_with_the_fix(pkg_dir: Path):
    edit_manifest(pkg_dir, lambda m: m.update(schema_version=1))
    with pytest.raises(PackageError) as exc:
        Package.open(pkg_dir)
    assert str(exc.value) == (
        f"{pkg_dir}: package schema_version 1 (int) is older than what edgestack 0.1.0 "
        f"reads (schema_version 2): repack it with `edgestack pack test --out {pkg_dir}` "
        "(edgestack >= 0.1.0)"
    )
    edit_manifest(pkg_dir, lambda m: m.update(schema_version=3))
    with pytest.raises(PackageError) as exc:
        Package.open(pkg_dir)
    assert str(exc.value) == (
        f"{pkg_dir}: package schema_version 3 (int) is not supported: edgestack 0.1.0 reads "
        "schema_version 2. Upgrade edgestack to read packages written by a newer version, or "
        "repack the model with this version of edgestack"
    )


def test_a_schema_1_manifest_is_refused(tmp_path: Path):
    """A real version-1 manifest (derived values stored, free-form attrs): refused, naming
    its source in the repack command."""
    v1 = {"format": "edgestack-package", "schema_version": 1, "edgestack_version": "0.1.0",
          "created": CREATED, "model": {"name": "m", "source": "hf:minilm", "method": ""},
          "target": "ort-cpu", "metadata": {}, "block_align": 64,
          "files": {"model.onnx": {"size": 1, "sha256": "0" * 64, "role": "graph"}},
          "layers": {}, "block_index": [],
          "tiers": [{"index": 0, "blocks": {}, "bytes": 0, "total_bytes": 1}], "golden": None}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(v1))
    (tmp_path / "old" / "model.onnx").write_bytes(b"g")
    with pytest.raises(PackageError, match=r"repack it with `edgestack pack hf:minilm --out "
                                           r".*old` \(edgestack >= 0.1.0\)"):
        Package.open(tmp_path / "old")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("tiers"), "missing required key 'tiers'"),
        (
            lambda m: m["files"]["model.onnx"].update(size="21"),
            r"files\['model.onnx'\].size: expected an integer",
        ),
        (lambda m: m.update(tiers=[3, 5, 5, 9]), r"tiers\[2\]: expected a record count in \[6, 9"),
        (lambda m: m.update(tiers=[2, 9]), r"tiers\[0\]: the first 2 records hold no block"),
        (lambda m: m.update(tiers=[3, 8]), r"tiers\[1\]: the last tier must hold every block"),
        (lambda m: m["tiers"].reverse(), r"tiers\[1\]: expected a record count in \[10, 9\]"),
        (lambda m: m["order"].pop(), r"order: every block of every layer must be stored once"),
        (lambda m: m["order"].append("conv"), r"order\[9\]: layer 'conv' has 4 blocks"),
        (lambda m: m["order"].insert(0, "nope"), r"order\[0\]: unknown layer 'nope'"),
        (lambda m: m["order"].reverse(), r"files\['blocks.bin'\].size: expected 1940"),
        (lambda m: m["files"].update({"../evil": m["files"]["model.onnx"]}), r"contains '\.\.'"),
        (lambda m: m["files"].update({"/etc/passwd": m["files"]["model.onnx"]}), "it is absolute"),
        (lambda m: m["layers"]["conv"].update(shape=[3, 12, 1]), None),  # same matrix: still valid
        (lambda m: m["layers"]["conv"].update(rank=2), r"\['blocks.bin'\].size: expected 1968"),
        (lambda m: m["layers"]["conv"].update(shape=[3]), r"layers\['conv'\].shape: expected 2 to"),
        (lambda m: m["layers"]["head"]["graph"].pop("u"),
         r"layers\['head'\].graph: missing required key 'u'"),
        (lambda m: m["layers"]["head"]["graph"].update(site={"kind": "dense", "prefix": "es.0"}),
         r"layers\['head'\].graph.site.kind: expected one of 'matmul', 'gemm', 'generic'"),
        (
            lambda m: m["golden"].update(inputs="model.onnx"),
            r"golden.inputs: expected a file with role 'golden', found 'model.onnx'",
        ),
        (lambda m: m["golden"].update(tier=5), r"golden.tier: expected a tier in \[0, 4\]"),
        (lambda m: m["runtime"].update(weights_file="model.onnx"),
         r"runtime.weights_file: expected a file with role 'weights'"),
        (lambda m: m["runtime"].update(weights_file="weights/extra.data", tables={
            "emb": {"offset": 90, "shape": [3, 2], "dtype": "<f4"}}),
         r"runtime.tables\['emb'\]: expected a table inside the weights file .* found bytes "
         r"\[90, 114\)"),
        (lambda m: m["runtime"].update(weights_file="weights/extra.data", gathered={
            "emb": {"offset": 0, "shape": [3], "dtype": "object"}}),
         r"runtime.gathered\['emb'\].dtype: expected a numpy dtype of numbers"),
        (lambda m: m.update(format="something-else"), "not an edgestack package manifest"),
    ],
)
def test_manifest_checks(pkg_dir: Path, edit, match):
    edit_manifest(pkg_dir, edit)
    if match is None:
        Package.open(pkg_dir).close()
        return
    with pytest.raises(PackageError, match=match):
        Package.open(pkg_dir)


def test_manifest_syntax_checks(pkg_dir: Path):
    path = pkg_dir / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"target": "ort-cpu",', '"target": "ort-cpu", "target": "x",'))
    with pytest.raises(PackageError, match="duplicate key 'target'"):
        Package.open(pkg_dir)
    path.write_text(text.replace('"rtol": 0.001', '"rtol": NaN'))
    with pytest.raises(PackageError, match="expected finite numbers, found NaN"):
        Package.open(pkg_dir)
    path.write_bytes(b"\xff" + text.encode())
    with pytest.raises(PackageError, match="expected UTF-8"):
        Package.open(pkg_dir)
    path.write_bytes(b" " * (16 * 2**20 + 1))
    with pytest.raises(PackageError, match="more than the 16777216 allowed"):
        Package.open(pkg_dir)
    path.unlink()
    with pytest.raises(PackageError, match="no manifest.json in this directory"):
        Package.open(pkg_dir)


def test_open_errors_are_package_errors(tmp_path: Path):
    assert issubclass(PackageError, EdgestackError)
    with pytest.raises(PackageError, match="no such file or directory"):
        Package.open(tmp_path / "nope")
    gz = tmp_path / "p.tar.gz"
    gz.write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(PackageError, match="this is a gzip file; package archives are uncompr"):
        Package.open(gz)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello")
    with pytest.raises(PackageError, match="not a tar archive"):
        Package.open(junk)


# ---- archives --------------------------------------------------------------------------------


def test_archive_round_trip(pkg_dir: Path, tmp_path: Path):
    tar = write_archive(pkg_dir, tmp_path / "pkg.tar")
    with Package.open(tar) as pkg, Package.open(pkg_dir) as ref:
        assert pkg.is_archive and not ref.is_archive
        pkg.verify()
        assert pkg.manifest == ref.manifest
        for t in range(len(pkg.tiers)):
            end = pkg.tiers[t].bytes
            assert pkg.read_prefix(0, end).tobytes() == ref.read_prefix(0, end).tobytes()
        for a, b in zip(tier_views(pkg, 4), tier_views(ref, 4), strict=True):
            assert np.array_equal(a.u, b.u) and np.array_equal(a.v, b.v)
        assert pkg.golden()[0]["x"].shape == (2, 3)
        with pytest.raises(PackageError, match="extract it with"):
            pkg.file_path("model.onnx")
    out = extract_archive(tar, tmp_path / "extracted")
    names = ["manifest.json", "model.onnx", "blocks.bin", "weights/extra.data", "golden/inputs.npz"]
    for name in names:
        assert (out / name).read_bytes() == (pkg_dir / name).read_bytes()
    with pytest.raises(PackageError, match="already exists"):
        extract_archive(tar, out)
    extract_archive(tar, out, overwrite=True)
    assert sorted(siblings(out)) == ["extracted", "pkg", "pkg.tar"]
    with pytest.raises(PackageError, match="already exists"):
        write_archive(pkg_dir, tar)
    # a damaged file is caught while archiving, and nothing is left behind
    path = pkg_dir / "model.onnx"
    path.write_bytes(path.read_bytes().upper())
    with pytest.raises(PackageError, match="'model.onnx' is damaged"):
        write_archive(pkg_dir, tmp_path / "other.tar")
    assert sorted(siblings(out)) == ["extracted", "pkg", "pkg.tar"]


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def evil_archive(path: Path, pkg_dir: Path, evil) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in sorted(pkg_dir.rglob("*")):
            if file.is_file():
                add_member(tar, file.relative_to(pkg_dir).as_posix(), file.read_bytes())
        evil(tar)
    return path


@pytest.mark.parametrize(
    "evil, match",
    [
        (lambda t: add_member(t, "../evil", b"pwned"), "'../evil' is not allowed: it contains"),
        (lambda t: add_member(t, "weights/../../evil", b"pwned"), "contains '..'"),
        (lambda t: add_member(t, "/tmp/evil", b"pwned"), "it is absolute"),
        (
            lambda t: add_member(t, "evil", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
            "'evil' is a symlink",
        ),
        (
            lambda t: add_member(t, "evil", type=tarfile.LNKTYPE, linkname="model.onnx"),
            "'evil' is a hard link",
        ),
        (lambda t: add_member(t, "evil", type=tarfile.CHRTYPE), "'evil' is a device file"),
        (lambda t: add_member(t, "evil", type=tarfile.FIFOTYPE), "'evil' is a FIFO"),
        (lambda t: add_member(t, "evil.txt", b"extra"), "'evil.txt' are not listed in manifest"),
        (lambda t: add_member(t, "model.onnx", b"second copy"), "'model.onnx' appears twice"),
    ],
)
def test_unsafe_archive_members_are_refused(pkg_dir: Path, tmp_path: Path, evil, match):
    work = tmp_path / "work"
    work.mkdir()
    tar = evil_archive(work / "evil.tar", pkg_dir, evil)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(PackageError, match=match):
        extract_archive(tar, work / "out")
    with pytest.raises(PackageError, match=match):
        Package.open(tar)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_archive_made_by_tar_with_dot_prefix_is_accepted(pkg_dir: Path, tmp_path: Path):
    with tarfile.open(tmp_path / "dot.tar", "w") as tar:
        tar.add(pkg_dir, arcname=".")
    with Package.open(tmp_path / "dot.tar") as pkg:
        pkg.verify()
        assert len(tier_views(pkg, 4)) == 9


def test_truncated_archive_names_the_member(pkg_dir: Path, tmp_path: Path):
    tar = write_archive(pkg_dir, tmp_path / "pkg.tar")
    with tarfile.open(tar) as t:
        info = t.getmember("blocks.bin")
    tar.write_bytes(tar.read_bytes()[: info.offset_data + 1000])
    with pytest.raises(PackageError, match="member 'blocks.bin' is truncated: expected 1944 bytes"):
        Package.open(tar)
    with pytest.raises(PackageError):
        extract_archive(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_huge_pax_header_is_refused_before_allocation(tmp_path: Path):
    info = tarfile.TarInfo("PaxHeaders/x")
    info.type = tarfile.XHDTYPE
    info.size = 8 * 2**30 - 1  # tarfile would read (allocate) this much for a pax header
    path = tmp_path / "pax.tar"
    path.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024))
    with pytest.raises(PackageError, match="claims 8589934592 bytes of metadata"):
        Package.open(path)


def test_importing_the_package_layer_needs_no_torch_or_onnx():
    import subprocess
    import sys

    code = (
        "import sys, edgestack.package\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnx', 'onnxruntime', 'openvino', 'tensorrt', 'transformers')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_writer_refuses_what_the_reader_would_refuse(tmp_path: Path):
    with PackageWriter(tmp_path / "pkg") as w:
        nested: dict = {}
        for _ in range(70):
            nested = {"x": nested}
        with pytest.raises(PackageError, match="begin\\(metadata\\): nested deeper than 61"):
            w.begin(name="m", target="ort-cpu", metadata=nested)
        with pytest.raises(PackageError, match="JSON-serialisable"):
            w.begin(name="m", target="ort-cpu", metadata={"x": float("nan")})
        w.begin(name="m", target="ort-cpu", metadata={"calibration": [1, 2, 3]})
        w.add_file("golden", b"not a directory", role="aux")
        w.add_file("model.onnx", b"g", role="graph")
        with pytest.raises(PackageError, match="'golden' is a file but also a directory"):
            w.add_golden({"x": np.zeros(1)}, {"y": np.zeros(1)})
        w.finish()
    with Package.open(tmp_path / "pkg") as pkg:
        assert dict(pkg.manifest.metadata) == {"calibration": [1, 2, 3]}
    with PackageWriter(tmp_path / "pkg2") as w:
        w.begin(name="m", target="ort-cpu")
        w.add_file("model.onnx", b"g", role="graph")
        with pytest.raises(PackageError, match="dtype object; golden arrays must be numeric"):
            w.add_golden({"x": np.array([None])}, {"y": np.zeros(1)})
        w.add_golden({"x": np.zeros(1, np.int64)}, {"y": np.zeros((1, 2), np.float16)})
        w.finish()
    with Package.open(tmp_path / "pkg2") as pkg:
        assert pkg.golden()[1]["y"].dtype == np.float16
