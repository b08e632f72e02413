"""Look inside an ONNX model or a device package without loading its weights (host side).

:func:`inspect_path` tells the two apart and returns a JSON-ready report; :func:`render_text`
turns a report into the readable form that ``edgestack inspect`` prints.

- An **ONNX file** (one written by :func:`edgestack.exporter.export`, or any other): read with
  ``onnx.load(..., load_external_data=False)``, so external data files are never read (only
  their sizes are looked up); weights stored inside the ``.onnx`` file are read with it, as
  protobuf has no lazy parse. The report has the opset imports, producer, inputs and outputs
  (dtype, shape), node counts by ``(domain, op_type)`` (subgraphs included), the local
  functions, initializer bytes in all and by dtype, the external data files, the
  ``metadata_props`` (``edgestack.*`` values that hold JSON are parsed) and the compressed
  layers: one row per ``edgestack`` node (``ShiftWeight``, ``BitStackWeight``; its stored
  bytes are its initializer inputs), then the compression report's other layers
  (``edgestack.compression``: low-rank, pruned).
- A **device package** (a folder with ``manifest.json``, or a ``.tar``), opened with
  :meth:`edgestack.package.Package.open` (which checks the manifest and the file sizes; no
  hashing: ``edgestack verify`` does that): model, target, files with roles and sizes, tiers,
  BitStack layers, graph variants, golden data, the runtime metadata, and a summary of the
  packed graph (its file is read, not its weights or blocks).

Imports numpy, onnx (lazily) and the package reader; never torch.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgestack.core.text import printable
from edgestack.errors import EdgestackError
from edgestack.exporter.export import META_COMPRESSION as _COMPRESSION
from edgestack.exporter.export import META_LAYERS as _LAYERS
from edgestack.exporter.export import META_LOWRANK as _LOWRANK
from edgestack.exporter.ops import DOMAIN as EDGESTACK_DOMAIN
from edgestack.formats.bitstack import NODE_LAYER_KEY as _NODE_LAYER
from edgestack.package.format import (
    ARCHIVE_SUFFIX,
    DENSE_FILES,
    MANIFEST_NAME,
    VARIANT_FILE,
)
from edgestack.package.reader import Package

_META_PREFIX = "edgestack."
_METHOD = "edgestack.method"
_PASS_THROUGH = ("Identity", "Cast")
_DTYPE_NAMES = {"FLOAT": "float32", "DOUBLE": "float64"}
_FOUR_BIT = ("INT4", "UINT4", "FLOAT4E2M1")
_EXPECTED = ("expected an ONNX file (from `edgestack export`, or any other) or a device "
             "package (a folder with manifest.json, or a .tar from `edgestack pack`)")
_FIX = "pass the .onnx file that `edgestack export` wrote, or the package `edgestack pack` wrote"

FORM_FILES = {"mixed": VARIANT_FILE, **DENSE_FILES}
"""Graph variant name -> the file the packer writes it to (role ``variant``)."""


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def inspect_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What is inside ``path``: an ONNX file or a device package.

    Returns:
        :func:`inspect_onnx`'s report (``"kind": "onnx"``) or :func:`inspect_package`'s
        (``"kind": "package"``).

    Raises:
        EdgestackError: the path is missing, or is neither an ONNX model nor a package.
        PackageError: a package whose manifest or files are damaged.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise EdgestackError(f"{str(p)!r} not found: {_EXPECTED}, found no file or folder "
                             "at that path; check the path") from None
    except OSError as exc:
        raise EdgestackError(f"cannot access {str(p)!r} ({exc.strerror or exc}); "
                             f"{_EXPECTED}") from None
    if stat.S_ISDIR(st.st_mode):
        if not (p / MANIFEST_NAME).is_file():
            raise EdgestackError(
                f"{str(p)!r} is not a device package: {_EXPECTED}, found a folder without "
                f"{MANIFEST_NAME}; {_FIX}")
        return inspect_package(p)
    if not stat.S_ISREG(st.st_mode):
        raise EdgestackError(f"{str(p)!r} is neither an ONNX model nor a device package: "
                             f"{_EXPECTED}, found neither a file nor a folder; {_FIX}")
    if p.suffix.lower() != ".onnx" and (p.suffix.lower() == ARCHIVE_SUFFIX or _is_tar(p)):
        return inspect_package(p)
    model = _load_onnx(p, st.st_size)
    return _onnx_report(model, str(p), p.parent, st.st_size)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _load_onnx(path: Path, size: int) -> Any:
    import onnx

    why = ""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or anything else a parser raises
        model, why = None, f" ({type(exc).__name__})"
    if model is None or model.ir_version <= 0 or not model.HasField("graph"):
        raise EdgestackError(
            f"{str(path)!r} is neither an ONNX model nor a device package: {_EXPECTED}, found "
            f"a {size}-byte file that is not an ONNX ModelProto{why} nor a tar archive; {_FIX}")
    return model


# ------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------


def inspect_onnx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The report of an ONNX file (see the module doc); external data is not read.

    Raises:
        EdgestackError: the file is missing or is not an ONNX model.
    """
    p = Path(path)
    if not p.is_file():
        raise EdgestackError(f"{str(p)!r} is not a file: expected an ONNX file, found "
                             f"{'a folder' if p.is_dir() else 'nothing'}; check the path")
    size = p.stat().st_size
    return _onnx_report(_load_onnx(p, size), str(p), p.parent, size)


def _dtype_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        name = TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type{elem_type}"
    return _DTYPE_NAMES.get(name, name.lower())


def _dim(d: Any) -> int | str | None:
    kind = d.WhichOneof("value")
    if kind == "dim_value":
        return int(d.dim_value)
    if kind == "dim_param":
        return str(d.dim_param)
    return None


def _value_info(v: Any) -> dict[str, Any]:
    kind = v.type.WhichOneof("value")
    if kind == "tensor_type":
        t = v.type.tensor_type
        shape = [_dim(d) for d in t.shape.dim] if t.HasField("shape") else None
        return {"name": v.name, "dtype": _dtype_name(t.elem_type), "shape": shape}
    return {"name": v.name, "dtype": kind or "unknown", "shape": None}


def _itemsize_bits(elem_type: int) -> int:
    from onnx import TensorProto, helper

    name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
        else ""
    if name in _FOUR_BIT:
        return 4
    try:
        return 8 * int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except Exception:  # unknown or STRING: counted from its data
        return 0


def _tensor_bytes(t: Any) -> int:
    """Stored bytes of a TensorProto without decoding it (external data: its ``length``)."""
    from onnx import TensorProto

    numel = math.prod(int(d) for d in t.dims)
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if info.get("length", "").isdigit():
            return int(info["length"])
        return (numel * _itemsize_bits(t.data_type) + 7) // 8
    if t.raw_data:
        return len(t.raw_data)
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return (numel * _itemsize_bits(t.data_type) + 7) // 8


def _subgraphs(node: Any) -> Iterator[Any]:
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs (``If``/``Loop`` bodies), in order."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _all_initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_initializers(sub)


def _parse_meta(key: str, value: str) -> Any:
    if key.startswith(_META_PREFIX):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _attr(node: Any, name: str) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _bits_per_weight(nbytes: int | None, numel: int | None) -> float | None:
    if nbytes is None or not numel:
        return None
    return round(8.0 * nbytes / numel, 4)


def _compressed_layers(model: Any, metadata: dict[str, Any],
                       initializers: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per compressed layer: the ``edgestack`` nodes, then the compression report's
    layers that no node holds (low-rank, pruned)."""
    report = metadata.get(_COMPRESSION)
    report = report if isinstance(report, dict) else {}
    by_name = {e["name"]: e for e in report.get("layers", [])
               if isinstance(e, dict) and isinstance(e.get("name"), str)}
    node_layers = metadata.get(_LAYERS)
    node_layers = node_layers if isinstance(node_layers, dict) else {}
    lowrank = metadata.get(_LOWRANK)
    lowrank = set(lowrank) if isinstance(lowrank, list) else set()
    method = report.get("method") or metadata.get(_METHOD) or ""
    producers = {o: n for n in model.graph.node for o in n.output}

    def source_init(name: str) -> Any:
        for _ in range(8):  # through Identity/Cast, as edgestack.exporter.sizes does
            if name in initializers:
                return initializers[name]
            node = producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH or node.domain not in ("",
                                                                                         "ai.onnx"):
                return None
            name = node.input[0]
        return None

    rows: list[dict[str, Any]] = []
    for node in _all_nodes(model.graph):
        if node.domain != EDGESTACK_DOMAIN:
            continue
        tags = {p.key: p.value for p in node.metadata_props}
        layer = tags.get(_NODE_LAYER) or node_layers.get(node.name) or node.name
        shape = [int(d) for d in (_attr(node, "shape") or [])]
        numel = math.prod(shape) if shape else None
        inits = [source_init(i) for i in node.input if i]
        stored = sum(_tensor_bytes(t) for t in inits if t is not None) \
            if any(t is not None for t in inits) else None
        entry = by_name.get(layer, {})
        details: dict[str, Any] = {}
        if node.op_type == "ShiftWeight":
            details = {"bits": _attr(node, "bits"), "zero": bool(_attr(node, "zero") or 0)}
        elif node.op_type == "BitStackWeight" and len(inits) > 1 and inits[1] is not None \
                and len(inits[1].dims) == 3:
            nb, _m, k = (int(d) for d in inits[1].dims)
            details = {"blocks": nb, "k": k}
        elif node.op_type == "BitStackWeight":  # blocks fed at run time (a packed graph)
            edict = entry.get("details") if isinstance(entry.get("details"), dict) else {}
            details = {out: edict[k] for k, out in (("n_blocks", "blocks"), ("k", "k"))
                       if k in edict}
        compressed = stored if stored is not None else entry.get("compressed_bytes")
        dense = entry.get("dense_bytes", 4 * numel if numel else None)
        rows.append({
            "name": layer, "op": node.op_type, "kind": entry.get("kind"),
            "shape": shape or entry.get("shape"), "dense_bytes": dense,
            "compressed_bytes": compressed,
            "bits_per_weight": _bits_per_weight(compressed, numel),
            "node": node.name, "source": "graph" if stored is not None else "report",
            "details": details,
        })
    seen = {r["name"] for r in rows}
    for name, entry in by_name.items():
        if name in seen:
            continue
        op = "low-rank" if name in lowrank or method == "lowrank" else \
            "pruned" if method == "prune" else (method or "compressed")
        shape = entry.get("shape") if isinstance(entry.get("shape"), list) else None
        details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
        keep = ("rank", "max_rank", "params_kept", "ratio", "kept_shape")
        rows.append({
            "name": name, "op": op, "kind": entry.get("kind"), "shape": shape,
            "dense_bytes": entry.get("dense_bytes"),
            "compressed_bytes": entry.get("compressed_bytes"),
            "bits_per_weight": entry.get("bits_per_weight"),
            "node": None, "source": "report",
            "details": {k: details[k] for k in keep if k in details},
        })
        seen.add(name)
    for name in sorted(lowrank - seen):  # low-rank layers without a report entry
        rows.append({"name": name, "op": "low-rank", "kind": None, "shape": None,
                     "dense_bytes": None, "compressed_bytes": None, "bits_per_weight": None,
                     "node": None, "source": "metadata", "details": {}})
    return rows


def _external_files(tensors: list[Any], base: Path | None) -> list[dict[str, Any]]:
    from onnx import TensorProto

    files: dict[str, dict[str, Any]] = {}
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        row = files.setdefault(loc, {"file": loc, "tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += _tensor_bytes(t)
    for row in files.values():
        if base is not None:
            target = base / row["file"]
            row["exists"] = target.is_file()
            row["size"] = target.stat().st_size if row["exists"] else None
    return list(files.values())


def _onnx_report(model: Any, path: str, base: Path | None, file_bytes: int) -> dict[str, Any]:
    """The report of a loaded ModelProto; ``base`` is the folder its external data is
    relative to (None: do not look the files up)."""
    metadata = {p.key: _parse_meta(p.key, p.value) for p in model.metadata_props}
    counts = Counter((n.domain or "ai.onnx", n.op_type) for n in _all_nodes(model.graph))
    tensors = list(_all_initializers(model.graph))
    by_dtype: dict[str, dict[str, int]] = {}
    for t in tensors:
        row = by_dtype.setdefault(_dtype_name(t.data_type), {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += _tensor_bytes(t)
    main_inits = {t.name: t for t in model.graph.initializer}
    init_names = set(main_inits)
    layers = _compressed_layers(model, metadata, main_inits)
    report = metadata.get(_COMPRESSION)
    compression = None
    if isinstance(report, dict):
        compression = {k: report.get(k) for k in ("method", "dense_bytes", "compressed_bytes",
                                                  "bits_per_weight")}
        compression["method"] = compression["method"] or metadata.get(_METHOD)
        compression["layers"] = len(report.get("layers", []) or [])
    return {
        "kind": "onnx",
        "path": path,
        "file_bytes": file_bytes,
        "ir_version": int(model.ir_version),
        "producer": {"name": model.producer_name, "version": model.producer_version},
        "opset_imports": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in model.graph.output],
        "nodes": sum(counts.values()),
        "op_counts": [{"domain": d, "op_type": op, "count": c}
                      for (d, op), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))],
        "functions": [f"{f.domain}.{f.name}" for f in model.functions],
        "initializers": {
            "count": len(tensors),
            "bytes": sum(r["bytes"] for r in by_dtype.values()),
            "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        },
        "external_data": _external_files(tensors, base),
        "metadata": metadata,
        "compression": compression,
        "compressed_layers": layers,
    }


# ------------------------------------------------------------------------------------------
# Packages
# ------------------------------------------------------------------------------------------


def inspect_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The report of a device package (see the module doc); blocks and weights are not read.

    Raises:
        PackageError: the package's manifest or files are damaged (from ``Package.open``).
    """
    with Package.open(path) as pkg:
        man = pkg.manifest
        files = [{"name": n, "role": e.role, "size": e.size} for n, e in pkg.files.items()]
        layers = []
        for name, info in pkg.layers.items():
            block = sum(info.part_bytes)
            numel = math.prod(info.shape)
            layers.append({
                "name": name, "shape": list(info.shape), "n_blocks": info.n_blocks,
                "rank": info.rank, "dtype": info.dtype, "block_bytes": block,
                "bytes": block * info.n_blocks,
                "bits_per_weight": _bits_per_weight(block * info.n_blocks, numel),
                "torch_layer": info.graph.torch_layer if info.graph else None,
                "site": info.graph.site.kind if info.graph and info.graph.site else None,
            })
        tiers = [{"index": t.index, "blocks_loaded": t.n_records, "blocks": dict(t.blocks),
                  "bytes": t.bytes, "total_bytes": t.total_bytes} for t in pkg.tiers]
        names = {v: k for k, v in FORM_FILES.items()}
        variants = {names.get(f["name"], f["name"]): f["name"] for f in files
                    if f["role"] == "variant"}
        golden = pkg.golden_info.to_dict() if pkg.golden_info is not None else None
        if golden is not None:
            golden["bytes"] = sum(pkg.files[golden[k]].size for k in ("inputs", "outputs"))
        graph_name = pkg.graph_file
        import onnx

        try:
            graph_model = onnx.load_model_from_string(pkg.read_file(graph_name, verify=False))
            graph: dict[str, Any] | None = _onnx_report(graph_model, graph_name, None,
                                                        pkg.files[graph_name].size)
            graph.pop("kind")
            graph.pop("path")
            fed = {name for info in pkg.layers.values() if info.graph
                   for name in (info.graph.signs, info.graph.u, info.graph.v)}
            graph["block_inputs"] = sum(v["name"] in fed for v in graph["inputs"])
            graph["inputs"] = [v for v in graph["inputs"] if v["name"] not in fed]
            for ext in graph["external_data"]:  # a package's weights files are its own
                ext["exists"] = ext["file"] in pkg.files
                ext["size"] = pkg.files[ext["file"]].size if ext["exists"] else None
            graph = {"file": graph_name, **graph}
        except Exception as exc:  # a damaged graph: still show the manifest
            graph = {"file": graph_name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        return {
            "kind": "package",
            "path": str(pkg.path),
            "archive": pkg.is_archive,
            "schema_version": man.schema_version,
            "edgestack_version": man.edgestack_version,
            "created": man.created,
            "model": man.model.to_dict(),
            "target": man.target,
            "profile": man.metadata.get("profile"),
            "files": files,
            "total_bytes": sum(f["size"] for f in files),
            "tiers": tiers,
            "layers": layers,
            "blocks": len(pkg.block_index),
            "block_file_bytes": pkg.block_file_size,
            "variants": variants,
            "golden": golden,
            "runtime": {k: v for k, v in man.runtime.to_dict().items()
                        if k not in ("tables", "gathered", "rows_per_call")},
            "graph": graph,
        }


# ------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------


def _human(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _bytes(n: int) -> str:
    """``"49629 B (48.5 KiB)"``, or ``"1000 B"`` below a KiB."""
    return f"{n} B" if n < 1024 else f"{n} B ({_human(n)})"


def _shape(shape: Any) -> str:
    if shape is None:
        return "-"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _table(rows: list[tuple[str, ...]], indent: str = "    ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _short(value: Any, width: int = 90) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _n(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


def _producer(prod: dict[str, str]) -> str:
    return f"{prod['name']} {prod['version']}".strip() or "-"


def _details(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "-"


def _graph_lines(r: dict[str, Any]) -> list[str]:
    """Opsets, inputs/outputs, op counts and initializers of an ONNX report."""
    out = ["  opsets: " + ", ".join(f"{d} {v}" for d, v in r["opset_imports"].items())]
    for what in ("inputs", "outputs"):
        out.append(f"  {what}: {len(r[what])}")
        out += _table([(v["name"], v["dtype"], _shape(v["shape"])) for v in r[what]]
                      ) if r[what] else ["    none"]
    out.append(f"  nodes: {r['nodes']}")
    if r["op_counts"]:
        out += _table([("domain", "op", "count")] + [(c["domain"], c["op_type"], str(c["count"]))
                                                      for c in r["op_counts"]])
    if r["functions"]:
        out.append("  functions: " + ", ".join(r["functions"]))
    init = r["initializers"]
    out.append(f"  initializers: {_n(init['count'], 'tensor')}, {_bytes(init['bytes'])}")
    if init["by_dtype"]:
        out += _table([(d, _n(v["count"], "tensor"), f"{v['bytes']} B")
                       for d, v in init["by_dtype"].items()])
    if r["external_data"]:
        out.append("  external data:")
        out += _table([(e["file"], _n(e["tensors"], "tensor"), f"{e['bytes']} B",
                        "" if "exists" not in e else
                        f"file {e['size']} B" if e["exists"] else "MISSING")
                       for e in r["external_data"]])
    else:
        out.append("  external data: none")
    return out


def _onnx_text(r: dict[str, Any]) -> list[str]:
    prod = r["producer"]
    out = [f"{r['path']}: ONNX model, {_bytes(r['file_bytes'])}, "
           f"ir_version {r['ir_version']}, producer {_producer(prod)}"]
    out += _graph_lines(r)
    if r["metadata"]:
        out.append("  metadata:")
        rows = []
        for key, value in r["metadata"].items():
            if key == _COMPRESSION and r["compression"]:
                c = r["compression"]
                value = (f"method {c['method']}, {c['layers']} layers, dense "
                         f"{c['dense_bytes']} B -> {c['compressed_bytes']} B, "
                         f"{c['bits_per_weight']} bits/weight")
            elif key == _LAYERS and isinstance(value, dict):
                value = f"{len(value)} edgestack nodes -> torch layers"
            rows.append((key, _short(value)))
        out += _table(rows)
    layers = r["compressed_layers"]
    out.append(f"  compressed layers: {len(layers) or 'none'}")
    if layers:
        rows = [("layer", "op", "kind", "shape", "dense B", "compressed B", "bits/w",
                 "details")]
        for row in layers:
            bpw = row["bits_per_weight"]
            rows.append((row["name"], row["op"], row["kind"] or "-", _shape(row["shape"]),
                         str(row["dense_bytes"] if row["dense_bytes"] is not None else "-"),
                         str(row["compressed_bytes"] if row["compressed_bytes"] is not None
                             else "-"),
                         f"{bpw:.2f}" if isinstance(bpw, (int, float)) else "-",
                         _details(row["details"])))
        out += _table(rows)
    return out


def _package_text(r: dict[str, Any]) -> list[str]:
    m = r["model"]
    out = [f"{r['path']}: device package ({'.tar archive' if r['archive'] else 'folder'}), "
           f"schema {r['schema_version']}, edgestack {r['edgestack_version']}, "
           f"created {r['created']}",
           f"  model: {m['name']} (method {m['method'] or '-'}, source {m['source'] or '-'})",
           f"  target: {r['target']}" + (f", profile {r['profile']}" if r["profile"] else "")]
    out.append(f"  files: {len(r['files'])}, {_bytes(r['total_bytes'])}")
    out += _table([(f["name"], f["role"], f"{f['size']} B") for f in r["files"]])
    tiers = r["tiers"]
    out.append(f"  tiers: {len(tiers)}")
    out += _table([("tier", "blocks loaded", "block bytes", "total bytes")] + [
        (str(t["index"]), f"{t['blocks_loaded']}/{r['blocks']}", str(t["bytes"]),
         _bytes(t["total_bytes"])) for t in tiers])
    layers = r["layers"]
    if layers:
        out.append(f"  BitStack layers: {len(layers)}, {r['blocks']} blocks, blocks.bin "
                   f"{_bytes(r['block_file_bytes'])}")
        out += _table([("layer", "shape", "n_blocks", "rank", "block B", "bytes", "bits/w",
                        "site")] + [
            (x["name"], _shape(x["shape"]), str(x["n_blocks"]), str(x["rank"]),
             str(x["block_bytes"]), str(x["bytes"]),
             f"{x['bits_per_weight']:.2f}" if x["bits_per_weight"] is not None else "-",
             x["site"] or "-") for x in layers])
    else:
        out.append("  BitStack layers: none")
    variants = r["variants"]
    out.append("  graph variants: " + (", ".join(f"{k} ({v})" for k, v in variants.items())
                                       if variants else "none (the plain graph only)"))
    g = r["golden"]
    out.append(f"  golden: {g['inputs']}, {g['outputs']} ({g['bytes']} B), tier {g['tier']}, "
               f"rtol {g['rtol']:g}, atol {g['atol']:g}" if g else "  golden: none")
    rt = r["runtime"]
    if rt:
        out.append("  runtime: " + ", ".join(f"{k} {_short(v, 60)}" for k, v in rt.items()))
    graph = r["graph"]
    if "error" in graph:
        out.append(f"  graph {graph['file']}: unreadable ({graph['error']})")
    else:
        out.append(f"  graph {graph['file']}: ir_version {graph['ir_version']}, producer "
                   f"{_producer(graph['producer'])}")
        lines = _graph_lines(graph)
        if graph["block_inputs"]:
            at = next(i for i, line in enumerate(lines) if line.startswith("  outputs"))
            lines.insert(at, f"    + {graph['block_inputs']} BitStack block inputs "
                             "(signs, u, v of each layer: fed from blocks.bin)")
        out += ["  " + line for line in lines]
        others = [x for x in graph["compressed_layers"] if x["op"] != "BitStackWeight"]
        if others:
            out.append(f"    compressed layers in the graph: {len(others)}")
            out += _table([(x["name"], x["op"], _shape(x["shape"]),
                            f"{x['compressed_bytes']} B", _details(x["details"]))
                           for x in others], indent="      ")
    return out


def render_text(report: dict[str, Any]) -> str:
    """The readable form of an :func:`inspect_path` report."""
    lines = _package_text(report) if report["kind"] == "package" else _onnx_text(report)
    # names, metadata and paths come from the file: each line escaped (a name could hold an
    # ANSI escape or a newline)
    return "\n".join(printable(line) for line in lines)


__all__ = ["inspect_path", "inspect_onnx", "inspect_package", "render_text", "FORM_FILES",
           "EDGESTACK_DOMAIN"]
