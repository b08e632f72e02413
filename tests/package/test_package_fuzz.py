"""Fuzzed package reader: malformed manifests and archives raise PackageError and nothing else."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgestack.errors import PackageError
from edgestack.formats import BitStackStack, pack_bits
from edgestack.package import Package, PackageWriter, extract_archive, write_archive

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _stack(rng: np.random.Generator, shape: tuple[int, ...], k: int, nb: int) -> BitStackStack:
    m, n = shape[0], int(np.prod(shape[1:]))
    signs = np.stack([pack_bits(rng.integers(0, 2, m * n)) for _ in range(nb)])
    return BitStackStack(
        signs,
        rng.standard_normal((nb, m, k)).astype(np.float16),
        rng.standard_normal((nb, k, n)).astype(np.float16),
        shape,
    )


@pytest.fixture(scope="module")
def workdir():
    """A small real package and its archive, built once for the module."""
    root = Path(tempfile.mkdtemp(prefix="edgestack-fuzz-"))
    rng = np.random.default_rng(3)
    stacks = {"a": _stack(rng, (5, 3), 1, 2), "b": _stack(rng, (2, 3, 2), 2, 2)}
    with PackageWriter(root / "pkg") as w:
        w.begin(name="fuzz", target="ort-cpu", created="2026-01-01T00:00:00Z")
        w.add_file("model.onnx", b"graph", role="graph")
        w.add_blocks([("a", 0), ("b", 0), ("a", 1), ("b", 1)], stacks)
        w.set_tiers([2, 3, 4])
        w.add_golden({"x": np.ones(2, np.float32)}, {"y": np.zeros(2, np.float32)})
        w.finish()
    write_archive(root / "pkg", root / "pkg.tar")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def use(path: Path) -> None:
    """Open and use a package fully (every tier's blocks, every file, golden data)."""
    with Package.open(path) as pkg:
        pkg.verify()
        for t in range(len(pkg.tiers)):
            start = pkg.tiers[t - 1].bytes if t else 0
            views = pkg.views_of(pkg.read_prefix(start, pkg.tiers[t].bytes), start)
            assert len(views) == pkg.tiers[t].n_records - (pkg.tiers[t - 1].n_records if t
                                                           else 0)
        pkg.read_file(pkg.graph_file)
        if pkg.golden_info is not None:
            pkg.golden()


def exercise(path: Path) -> bool:
    """:func:`use` the package; whether it was accepted (only PackageError may escape)."""
    try:
        use(path)
    except PackageError:
        return False
    return True


def test_the_valid_package_and_archive_are_accepted(workdir):
    assert exercise(workdir / "pkg") and exercise(workdir / "pkg.tar")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def with_manifest(workdir: Path, data: bytes) -> bool:
    """Whether the package with manifest ``data`` is accepted."""
    manifest = workdir / "pkg" / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(data)
    try:
        return exercise(workdir / "pkg")
    finally:
        manifest.write_bytes(original)


@FUZZ
@given(value=json_values)
def test_random_json_manifest(workdir, value):
    assert not with_manifest(workdir, json.dumps(value).encode())


@FUZZ
@given(data=st.data())
def test_mutated_manifest_bytes(workdir, data):
    raw = bytearray((workdir / "pkg" / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        elif op == "insert":
            junk = [b"0", b"-1", b"9" * 30, b"[", b"{", b'"', b",", b"\x00", b"\xff"]
            raw[pos:pos] = data.draw(st.sampled_from(junk))
        else:
            del raw[pos:]
        if not raw:
            break
    with_manifest(workdir, bytes(raw))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@FUZZ
@given(data=st.data())
def test_mutated_manifest_values(workdir, data):
    manifest = json.loads((workdir / "pkg" / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(manifest) if p]
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "nudge"]))
        value = parent[path[-1]]
        if action == "delete":
            del parent[path[-1]]
        elif action == "nudge" and isinstance(value, int) and not isinstance(value, bool):
            parent[path[-1]] += data.draw(st.sampled_from([-64, -1, 1, 64, 2**53, -(2**40)]))
        else:
            parent[path[-1]] = data.draw(json_values)
    with_manifest(workdir, json.dumps(manifest).encode())


@FUZZ
@given(data=st.data())
def test_structural_mutations_are_refused(workdir, data):
    """What the block layout and the bytes read follow from (the storage order, the tiers'
    record counts, block counts, file sizes and hashes) cannot change unnoticed."""
    manifest = json.loads((workdir / "pkg" / "manifest.json").read_text())
    order, tiers, files = manifest["order"], manifest["tiers"], manifest["files"]
    name = data.draw(st.sampled_from(sorted(files)))
    what = data.draw(st.sampled_from(["order-swap", "order-drop", "order-add", "tiers-last",
                                      "tiers-drop-last", "n_blocks", "size", "sha256"]))
    if what == "order-swap":
        i = data.draw(st.integers(0, len(order) - 1))
        order[i] = {"a": "b", "b": "a"}[order[i]]
    elif what == "order-drop":
        del order[data.draw(st.integers(0, len(order) - 1))]
    elif what == "order-add":
        order.insert(data.draw(st.integers(0, len(order))), data.draw(st.sampled_from("ab")))
    elif what == "tiers-last":
        tiers[-1] += data.draw(st.sampled_from([-1, 1, 64]))
    elif what == "tiers-drop-last":
        tiers.pop()
    elif what == "n_blocks":
        manifest["layers"][data.draw(st.sampled_from("ab"))]["n_blocks"] += data.draw(
            st.sampled_from([-1, 1, 2]))
    elif what == "size":
        files[name]["size"] += data.draw(st.sampled_from([-1, 1, 64]))
    else:
        digest = files[name]["sha256"]
        files[name]["sha256"] = data.draw(st.text("0123456789abcdef", min_size=64, max_size=64)
                                          .filter(lambda d, old=digest: d != old))
    assert not with_manifest(workdir, json.dumps(manifest).encode())


@FUZZ
@given(data=st.data())
def test_mutated_archive(workdir, data):
    raw = bytearray((workdir / "pkg.tar").read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        if not raw:
            break
        op = data.draw(st.sampled_from(["header", "flip", "truncate", "zero"]))
        if op == "header":  # header blocks: the first 512 bytes of the archive and of members
            pos = data.draw(st.sampled_from([0, 512 * 3, 512 * 5])) + data.draw(st.integers(0, 511))
            if pos < len(raw):
                raw[pos] = data.draw(st.integers(0, 255))
        elif op == "flip":
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "zero":
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos : pos + 512] = bytes(len(raw[pos : pos + 512]))
        else:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    fuzz_dir = workdir / "archive-fuzz"
    fuzz_dir.mkdir(exist_ok=True)
    tar = fuzz_dir / "mutated.tar"
    tar.write_bytes(bytes(raw))
    exercise(tar)
    dest = fuzz_dir / "out"
    try:
        extract_archive(tar, dest)
    except PackageError:
        assert not dest.exists()
    assert sorted(p.name for p in fuzz_dir.iterdir() if p.name != "out") == ["mutated.tar"]
    assert sorted(p.name for p in workdir.iterdir()) == ["archive-fuzz", "pkg", "pkg.tar"]
    shutil.rmtree(dest, ignore_errors=True)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(min_size=0, max_size=2048))
def test_random_bytes_as_archive(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.tar"
        # give half the inputs a ustar magic so tarfile parses headers
        if len(raw) >= 512 and raw[0] % 2:
            raw = raw[:257] + b"ustar\x0000" + raw[265:]
        path.write_bytes(raw)
        exercise(path)
