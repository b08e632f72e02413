"""Read what a serialized ONNX graph says about its external data without onnx (the device
runtime imports no onnx): a minimal protobuf wire-format walk over ``ModelProto.graph``
(field 7) -> ``GraphProto.initializer`` (field 5) -> ``TensorProto`` (``name`` 8,
``external_data`` 13 as ``StringStringEntryProto`` key 1 / value 2, ``data_location`` 14).

:func:`external_ranges` lets the runtime check that a dense graph reads its data file exactly
where the manifest says the runtime must write each layer (``graph.site.files``): a manifest
that disagrees with its graph is refused instead of serving weights from the wrong bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

from edgestack.errors import PackageError


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise PackageError("the graph is not a valid protobuf (a truncated varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """``(field number, wire type, value)`` of one message: a memoryview for a
    length-delimited field, an int otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise PackageError("the graph is not a valid protobuf (a field runs past "
                                   "its message)")
            yield number, wire, buf[pos:pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield number, wire, 0
        else:
            raise PackageError(f"the graph is not a valid protobuf (wire type {wire})")


def external_ranges(model: bytes) -> dict[str, tuple[str, int, int]]:
    """``{initializer name: (location, offset, length)}`` of the main graph's initializers
    stored as external data (``offset`` 0 and ``length`` -1 when not given).

    Raises:
        PackageError: the bytes are not a protobuf, or an offset/length is not an integer.
    """
    out: dict[str, tuple[str, int, int]] = {}
    for number, wire, graph in _fields(memoryview(model)):
        if number != 7 or wire != 2:
            continue
        for gnum, gwire, tensor in _fields(graph):  # type: ignore[arg-type]
            if gnum != 5 or gwire != 2:
                continue
            name, info, external = "", {}, False
            for tnum, twire, value in _fields(tensor):  # type: ignore[arg-type]
                if tnum == 8 and twire == 2:
                    name = bytes(value).decode("utf-8", "replace")
                elif tnum == 14 and twire == 0:
                    external = value == 1
                elif tnum == 13 and twire == 2:
                    entry = {k: bytes(v).decode("utf-8", "replace")
                             for k, w, v in _fields(value) if w == 2}  # type: ignore[arg-type]
                    info[entry.get(1, "")] = entry.get(2, "")
            if external:
                try:
                    out[name] = (info.get("location", ""), int(info.get("offset", "0")),
                                 int(info.get("length", "-1")))
                except ValueError:
                    raise PackageError(f"initializer {name!r}: external data offset/length "
                                       "is not an integer") from None
    return out


__all__ = ["external_ranges"]
