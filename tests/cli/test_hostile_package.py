"""The standing attack suite of served packages (issue 14, part B: what is served is what was
verified), beside ``test_hostile.py`` (whose helpers it uses).

Every case is generated from a class of attacks and asserts the exception or the exit code,
one line (no traceback), and that every output served equals what the clean package serves at
the same tier with the same settings (0 wrong outputs):

1. in-place block tampering while a runtime serves: the record (one loaded at open, the first
   one a re-tier reads, a middle one, the last one) x the bytes (signs, u, v, the padding
   before the record, the padding inside it) x how the runtime serves (every layer on the fly,
   grown from tier 0, or shrunk to tier 0 and grown again; the dense fp32 graph; the dense
   int8 graph, shrunk and grown; the mixed graph) x whether the tamperer also rewrote the
   manifest's hashes on disk: a re-tier that reads a changed byte is refused as a whole;
2. the same bytes changed before ``verify`` or ``run`` opens the package, with the block
   file's hash in the manifest recomputed or not: exit 2 naming the file and the record;
3. manifest values that disagree with the graph (the runtime's forms, ``verify``, ``run``);
4. names and paths holding ANSI escapes, newlines, control characters and bidi overrides,
   printed by ``inspect``, ``verify``, ``plan`` and ``run``: escaped, no forged lines.

The package is tiny (a 20-12-6 MLP: two BitStack layers, 3 blocks of rank 2) and its parts
are not multiples of 64 bytes, so every record but the first has padding before it and
inside it. Runtimes are opened once per way of serving and reused: each case restores the
bytes it changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from test_hostile import cli, refused

from edgestack.core.text import printable
from edgestack.errors import EdgestackError, PackageError
from edgestack.package import Package
from edgestack.packer.pack import pack
from edgestack.runtime import Runtime

from runtime_helpers import CREATED, synthetic_onnx


# ---- the package ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with ``pkg`` (the tiny package) and ``in.npz`` (its golden inputs)."""
    root = tmp_path_factory.mktemp("hostile_pkg")
    synthetic_onnx(root / "m.onnx", dims=(20, 12, 6), n_blocks=3, k=2)
    pack(root / "m.onnx", root / "pkg", created=CREATED)
    (root / "m.onnx").unlink()
    with Package.open(root / "pkg") as pkg:
        np.savez(root / "in.npz", **pkg.golden()[0])
        assert len(pkg.tiers) >= 3 and pkg.tiers[0].n_records == 2
        assert all(r.offset > r.span_start for r in pkg.block_index[1:])   # padding before
    return root


@pytest.fixture
def ws(tiny, tmp_path, monkeypatch) -> Path:
    """A fresh copy of :func:`tiny` as the current folder."""
    work = tmp_path / "ws"
    shutil.copytree(tiny, work)
    monkeypatch.chdir(work)
    return work


def edit_manifest(pkg: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    man = json.loads((pkg / "manifest.json").read_text())
    change(man)
    (pkg / "manifest.json").write_text(json.dumps(man))


def rehash(pkg: Path, blocks: bool = True) -> None:
    """A tamperer's fix-up: the block file's sha256 in the manifest, and (``blocks``) every
    record's ``block_sha256``, recomputed from the bytes now on disk."""
    data = (pkg / "blocks.bin").read_bytes()
    with Package.open(pkg) as p:
        spans = [hashlib.sha256(data[r.span_start:r.end]).hexdigest() for r in p.block_index]

    def change(man: dict[str, Any]) -> None:
        man["files"]["blocks.bin"]["sha256"] = hashlib.sha256(data).hexdigest()
        if blocks:
            man["block_sha256"] = spans
    edit_manifest(pkg, change)


# where in the block file: a record, and bytes of it
POSITIONS = {"in-tier0": 1, "first-read": 2, "middle": 3, "last": 5, "first": 0}
PARTS = ("signs", "u", "v", "pad-before", "pad-inside")


def spot(pkg: Package, index: int, part: str) -> tuple[int, int]:
    """``(offset, length)``: up to 16 bytes of ``part`` of record ``index``."""
    rec = pkg.block_index[index]
    info = pkg.layers[rec.layer]
    start, end = {"signs": (rec.signs, rec.signs + info.signs_bytes),
                  "u": (rec.u, rec.u + info.u_bytes),
                  "v": (rec.v, rec.v + info.v_bytes),
                  "pad-before": (rec.span_start, rec.offset),
                  "pad-inside": (rec.signs + info.signs_bytes, rec.u)}[part]
    size = min(16, end - start)
    return (end - size if part == "v" else start), size   # v: the record's last bytes


def overwrite(path: Path, offset: int, size: int) -> None:
    """Change ``size`` bytes at ``offset`` in place (same file, same inode)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(size)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def same(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{name}: a wrong output")


# ---- 1. in-place tampering while serving ---------------------------------------------------
SERVE: dict[str, tuple[dict[str, Any], bool]] = {   # Runtime settings, shrink before growing
    "otf-grow": ({"materialize": 0}, False),
    "otf-shrink-grow": ({"materialize": 0}, True),
    "fp32-grow": ({"form": "fp32"}, False),
    "int8-shrink-grow": ({"form": "int8"}, True),
    "mixed-grow": ({"graph": "mixed", "materialize": 1}, False),
}


@pytest.fixture(scope="module")
def serving(tiny, tmp_path_factory):
    """``serving(name) -> (runtime at tier 0 on its own copy, copy, {tier: clean outputs},
    inputs)``; made once per way of serving (clean outputs from a runtime on the untouched
    package with the same settings)."""
    made: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in made:
            kw = SERVE[name][0]
            folder = tmp_path_factory.mktemp(name) / "pkg"
            shutil.copytree(tiny / "pkg", folder)
            with Runtime(tiny / "pkg", tier=0, calibrate=False, **kw) as clean:
                x = clean.package.golden()[0]
                top = len(clean.package.tiers) - 1
                ref = {0: clean.infer(x)}
                clean.retier(tier=top)
                ref[top] = clean.infer(x)
            made[name] = (Runtime(folder, tier=0, calibrate=False, **kw), folder, ref, x)
        return made[name]

    yield get
    for rt, *_ in made.values():
        rt.close()


@pytest.mark.parametrize("rewrite", ["hashes-kept", "hashes-rewritten"])
@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("where", [w for w in POSITIONS if w != "first"])
@pytest.mark.parametrize("serve", SERVE)
def test_bytes_changed_while_serving_are_never_served(serving, serve, where, part, rewrite):
    rt, folder, ref, x = serving(serve)
    pkg = rt.package
    top = len(pkg.tiers) - 1
    if SERVE[serve][1]:                         # shrink first: the rows go, then come back
        rt.retier(tier=top)
        rt.retier(tier=0)
    assert rt.tier == 0
    index = POSITIONS[where]
    rec = pkg.block_index[index]
    # a re-tier reads the record: it is beyond tier 0, or its layer is decoded from the file
    read = index >= pkg.tiers[0].n_records or rt.plan_for(None, tier=top).modes[
        rec.layer] != "on-the-fly"
    blocks, manifest = folder / "blocks.bin", folder / "manifest.json"
    original, original_manifest = blocks.read_bytes(), manifest.read_bytes()
    try:
        overwrite(blocks, *spot(pkg, index, part))
        if rewrite == "hashes-rewritten":
            rehash(folder)
        try:
            rt.retier(tier=top)
        except PackageError as exc:
            msg = one_line(exc)
            assert read, msg
            assert f"file 'blocks.bin' changed on disk: block record {index} (layer " \
                   f"{rec.layer!r}, block {rec.block}, bytes [{rec.span_start}, {rec.end}))" in msg
            assert f"the re-tier to tier {top} was refused and tier 0 is still served" in msg
            assert rt.tier == 0
            for lp in rt.plan.layers:   # the rows read for the refused tier were given back
                assert rt._stores[lp.name].loaded == (lp.blocks if lp.mode == "on-the-fly"
                                                      else 0)
        else:
            assert not read, "a re-tier used a changed record"
            assert rt.tier == top
        same(rt.infer(x), ref[rt.tier])
    finally:
        blocks.write_bytes(original)
        manifest.write_bytes(original_manifest)
        if rt.tier != 0:
            rt.retier(tier=0)
    rt.retier(tier=top)           # the restored file serves again
    same(rt.infer(x), ref[top])
    rt.retier(tier=0)


def test_a_rewrite_that_keeps_size_and_mtime_is_refused(tiny, tmp_path):
    """Why the check hashes what it reads: a same-size in-place rewrite whose mtime is put
    back (as a same-tick write, or ``cp -p``/``rsync -t``, leave it) passes a size + mtime +
    inode check; the record hash refuses it."""
    import os

    shutil.copytree(tiny / "pkg", tmp_path / "pkg")
    path = tmp_path / "pkg" / "blocks.bin"
    before = os.stat(path)
    with Runtime(tmp_path / "pkg", tier=0, calibrate=False, materialize=0) as rt:
        overwrite(path, *spot(rt.package, 3, "u"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size, before.st_mtime_ns, before.st_ino)
        with pytest.raises(PackageError, match="block record 3 "):
            rt.retier(tier=len(rt.package.tiers) - 1)
        assert rt.tier == 0


# ---- 2. changed before a command opens the package -----------------------------------------
CLI_TAMPER = [pytest.param(w, p, f, c, id=f"{w}-{p}-{f}-{c}")
              for w in POSITIONS for p in PARTS for f in ("hash-kept", "file-hash-fixed")
              for c in ("verify", "run") if not (w == "first" and p == "pad-before")]


@pytest.mark.parametrize("where,part,fixup,cmd", CLI_TAMPER)
def test_changed_block_bytes_refused_by_the_cli(capsys, ws, where, part, fixup, cmd):
    with Package.open(ws / "pkg") as pkg:
        offset, size = spot(pkg, POSITIONS[where], part)
    overwrite(ws / "pkg" / "blocks.bin", offset, size)
    if fixup == "file-hash-fixed":   # the whole file's hash agrees again; its records do not
        rehash(ws / "pkg", blocks=False)
    refused(capsys, ws, [cmd, "pkg"], "pkg", "'blocks.bin'",
            f"block record {POSITIONS[where]} (", seconds=5)


# ---- 3. manifest values that disagree with the graph ---------------------------------------
def _layer(name: str, *keys: str, value: Any = None, swap: str | None = None) -> Any:
    """Set ``layers[name][keys...]`` to ``value``, or swap it with layer ``swap``'s."""
    def change(man: dict[str, Any]) -> None:
        first = man["layers"][name]
        second = man["layers"][swap] if swap else None
        for k in keys[:-1]:
            first = first[k]
            second = second[k] if second is not None else None
        if second is not None:
            first[keys[-1]], second[keys[-1]] = second[keys[-1]], first[keys[-1]]
        else:
            first[keys[-1]] = value(first[keys[-1]]) if callable(value) else value
    return change


def _move_fp32(man: dict[str, Any]) -> None:
    man["layers"]["fc0"]["graph"]["site"]["files"]["fp32"]["w"][0] += 4096


DISAGREE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # edit, what verify names
    "graphs-swapped": (_layer("fc0", "graph", swap="fc1"), "layer 'fc0'"),
    "signs-is-u": (_layer("fc0", "graph", "signs", value=lambda _v: "fc0.weight_module.u"),
                   "layer 'fc0'"),
    "signs-unknown": (_layer("fc0", "graph", "signs", value="nope"), "layer 'fc0'"),
    "v-of-other-layer": (_layer("fc0", "graph", "v", value="fc1.weight_module.v"),
                         "layer 'fc0'"),
    "node-renamed": (_layer("fc0", "graph", "node", value="node_gemm_0"), "node_gemm_0"),
    "output-renamed": (_layer("fc0", "graph", "output", value="w_fc1"), "layer 'fc0'"),
    "shape-refactored": (_layer("fc0", "shape", value=[12, 4, 5]), "has shape [12, 20]"),
    "site-swapped": (_layer("fc0", "graph", "site", "prefix", swap="fc1"), "site 'es."),
    "dense-layouts-swapped": (_layer("fc0", "graph", "site", "files", swap="fc1"), "fc"),
    "fp32-offset-moved": (_move_fp32, "fp32"),
    "block-hash-changed": (lambda m: m["block_sha256"].__setitem__(3, "0" * 64),
                           "block record 3 ("),
    "block-hashes-missing": (lambda m: m.pop("block_sha256"), "block_sha256"),
    "block-hashes-short": (lambda m: m["block_sha256"].pop(), "block_sha256"),
    "rank-changed": (_layer("fc0", "rank", value=3), "blocks.bin"),
}
MUST_REFUSE = {"graphs-swapped", "block-hash-changed",
               "block-hashes-missing", "block-hashes-short", "rank-changed"}
FORMS = {"otf": {"materialize": 0}, "mixed": {"graph": "mixed", "materialize": 1},
         "fp32": {"form": "fp32"}, "int8": {"form": "int8"}}
KNOWN_GAPS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def clean_outputs(tiny) -> Callable[[str], dict[str, np.ndarray]]:
    made: dict[str, Any] = {}

    def get(form: str) -> dict[str, np.ndarray]:
        if form not in made:
            with Runtime(tiny / "pkg", calibrate=False, **FORMS[form]) as rt:
                made[form] = rt.infer(rt.package.golden()[0])
        return made[form]
    return get


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("edit", DISAGREE)
def test_manifest_disagreeing_with_the_graph_is_not_served(request, tiny, tmp_path,
                                                           clean_outputs, edit, form):
    if (edit, form) in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[(edit, form)]))
    shutil.copytree(tiny / "pkg", tmp_path / "pkg")
    edit_manifest(tmp_path / "pkg", DISAGREE[edit][0])
    try:
        with Runtime(tmp_path / "pkg", calibrate=False, **FORMS[form]) as rt:
            out = rt.infer(rt.package.golden()[0])
    except EdgestackError as exc:      # refused at load, or ONNX Runtime refused the feeds
        one_line(exc)
        return
    assert edit not in MUST_REFUSE, "served a package whose manifest disagrees"
    same(out, clean_outputs(form))


@pytest.mark.parametrize("edit", DISAGREE)
def test_verify_finds_every_disagreement(capsys, ws, edit):
    edit_manifest(ws / "pkg", DISAGREE[edit][0])
    refused(capsys, ws, ["verify", "pkg"], "pkg", DISAGREE[edit][1], seconds=5)


@pytest.fixture(scope="module")
def clean_run(tiny, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("clean_run") / "out.npz"
    from edgestack.cli import main

    assert main(["-q", "run", str(tiny / "pkg"), "--output", str(out)]) == 0
    return dict(np.load(out))


@pytest.mark.parametrize("edit", DISAGREE)
def test_run_refuses_or_serves_the_clean_outputs(capsys, ws, clean_run, edit):
    edit_manifest(ws / "pkg", DISAGREE[edit][0])
    code, err, _ = cli(capsys, ["run", "pkg", "--output", "out.npz"])
    assert "Traceback" not in err, err
    if code == 0:
        assert edit not in MUST_REFUSE
        same(dict(np.load(ws / "out.npz")), clean_run)
    else:
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("edgestack run: error: "), err
        assert not (ws / "out.npz").exists()


# ---- 4. names and paths with escapes -------------------------------------------------------
PAYLOADS = {
    "ansi": "x\x1b[2J\x1b[31mred\x1b]0;title\x07",
    "newline": "x\nedgestack verify: PASS\r",
    "bidi-c1-nul": "x\u202ecba\x9b1m\x00\x7f",
}


def _rename_layer(payload: str) -> Callable[[dict[str, Any]], None]:
    def change(man: dict[str, Any]) -> None:
        name = "fc0" + payload
        man["layers"] = {(name if k == "fc0" else k): v for k, v in man["layers"].items()}
        man["order"] = [name if k == "fc0" else k for k in man["order"]]
    return change


FIELDS: dict[str, Callable[[str], Callable[[dict[str, Any]], Any]]] = {
    "model-name": lambda p: lambda m: m["model"].update(name="m" + p),
    "model-source": lambda p: lambda m: m["model"].update(source="s" + p),
    "model-method": lambda p: lambda m: m["model"].update(method="bitstack" + p),
    "created": lambda p: lambda m: m.update(created=CREATED + p),
    "layer-name": _rename_layer,
    "profile": lambda p: lambda m: m["metadata"].update(profile="rpi" + p),
    "order-source": lambda p: lambda m: m["runtime"].update(order_source="model" + p),
}
COMMANDS = {"inspect": ["inspect"], "inspect-json": ["inspect", "--json"],
            "verify": ["verify"], "plan": ["plan"], "run": ["run"]}


def strings(value: Any) -> Any:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def terminal_safe(text: str) -> None:
    bad = sorted({repr(c) for c in text if c != "\n" and not c.isprintable()})
    assert not bad, f"raw control characters on the terminal: {bad}"


@pytest.fixture(scope="module")
def clean_lines(tiny) -> Callable[[str], int]:
    made: dict[str, int] = {}

    def get(cmd: str) -> int:
        if cmd not in made:
            import contextlib
            import io

            from edgestack.cli import main

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["-q", *COMMANDS[cmd], str(tiny / "pkg")]) == 0
            made[cmd] = len(buf.getvalue().splitlines())
        return made[cmd]
    return get


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("field", FIELDS)
def test_names_from_a_package_are_printed_escaped(capsys, ws, clean_lines, field, payload,
                                                  cmd):
    text = PAYLOADS[payload]
    edit_manifest(ws / "pkg", FIELDS[field](text))
    capsys.readouterr()
    from edgestack.cli import main

    code = main(["-q", *COMMANDS[cmd], "pkg"])
    out, err = capsys.readouterr()
    assert code == 0, err
    terminal_safe(out + err)
    assert len(out.splitlines()) == clean_lines(cmd), "a name forged or hid a line"
    if cmd == "inspect-json":   # JSON escapes it, and gives it back whole
        assert any(text in s for s in strings(json.loads(out)))
    elif cmd == "inspect":
        assert printable(text) in out


@pytest.mark.parametrize("cmd", ["inspect", "verify", "plan", "run"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_package_paths_are_printed_escaped(capsys, ws, clean_lines, payload, cmd):
    name = "p" + PAYLOADS[payload].replace("\x00", "").replace("/", "")
    (ws / "pkg").rename(ws / name)
    code, err, _ = cli(capsys, [cmd, name])
    assert code == 0, err
    capsys.readouterr()
    from edgestack.cli import main

    assert main(["-q", cmd, name]) == 0
    out, err = capsys.readouterr()
    terminal_safe(out + err)
    assert len(out.splitlines()) == clean_lines(cmd)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_error_lines_are_escaped(capsys, ws, payload):
    name = "p" + PAYLOADS[payload].replace("\x00", "").replace("/", "")
    (ws / "pkg").rename(ws / name)
    with Package.open(ws / name) as pkg:
        overwrite(ws / name / "blocks.bin", *spot(pkg, 2, "u"))
    line = refused(capsys, ws, ["run", name], "block record 2 (")
    terminal_safe(line)
    assert printable(" ".join(name.split())) in line   # line breaks became spaces
