"""What ``edgestack diff``'s two MODEL arguments and its inputs are, checked before anything
runs: no weights are loaded, no model is run, and neither torch nor onnx-ir is imported, so a
bad argument is refused in well under two seconds.

A MODEL is an ONNX file (its external data files must exist next to it), a folder holding
``model.onnx`` (a compile output, a device package), or a torch model source
(:func:`edgestack.sources.load_source`: a model folder, ``module:factory``, a built-in name,
a Hub id). Inputs are an ``.npz`` or deterministic example inputs generated from the input
signature (:func:`edgestack.targets.feeds.example_feeds`, what ``compile --golden`` and
``pack`` feed); either is checked against every ONNX side's inputs (name, dtype, rank,
static dimensions).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgestack.errors import TargetError
from edgestack.sources import HUB_ID
from edgestack.targets.feeds import example_feeds, input_specs, load_feeds
from edgestack.zoo import MODELS

GRAPH_FILE = "model.onnx"
"""The graph file in a compile output folder or a device package."""


@dataclass(frozen=True)
class ModelRef:
    """A diff argument, resolved.

    Attributes:
        spec: the argument as given.
        kind: ``"onnx"`` (``path`` is the graph file) or ``"torch"`` (``spec`` is a model
            source for :func:`edgestack.sources.load_source`).
        path: the ONNX file, or None.
    """

    spec: str
    kind: str
    path: Path | None = None

    @property
    def label(self) -> str:
        """How reports name it."""
        return str(self.path) if self.path is not None else self.spec


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} [{dims}]"


def resolve_model(spec: str, which: str) -> ModelRef:
    """What the diff argument ``spec`` is, checked without loading weights.

    In this order: an existing file is an ONNX model (its external data files must exist);
    a folder holding ``model.onnx`` (a compile output, a device package) is that graph; any
    other existing folder, ``module:factory``, a built-in name or a Hub id is a torch model
    source.

    Raises:
        TargetError: the path does not exist, is not an ONNX file, or misses external data;
            the message names the argument (``which``: ``A`` or ``B``) and the fix.
    """
    path = Path(spec)
    expected = ("expected an .onnx file, a folder with model.onnx (a compile output or a "
                "device package), or a model source (a model folder, module:factory, a "
                f"built-in model: {', '.join(MODELS)})")
    if path.is_file():
        _check_onnx_file(path, which, expected)
        return ModelRef(spec, "onnx", path)
    if path.is_dir():
        if (path / GRAPH_FILE).is_file():
            _check_onnx_file(path / GRAPH_FILE, which, expected)
            return ModelRef(spec, "onnx", path / GRAPH_FILE)
        if (path / "config.json").is_file():
            return ModelRef(spec, "torch")
        raise TargetError(f"{which}: folder {spec!r} holds neither {GRAPH_FILE} nor a model's "
                          f"config.json; {expected}")
    if path.suffix.lower() in (".onnx", ".npz", ".pt", ".bin") or spec.endswith(os.sep):
        raise TargetError(f"{which}: {spec!r} does not exist; {expected}")
    if ":" in spec or spec in MODELS or HUB_ID.fullmatch(spec):
        return ModelRef(spec, "torch")
    raise TargetError(f"{which}: {spec!r} does not exist and is not a model source; {expected}")


def _check_onnx_file(path: Path, which: str, expected: str) -> None:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own types
        head = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TargetError(f"{which}: {path} is not an ONNX model ({head}); {expected}"
                          ) from None
    if not proto.graph.node:
        raise TargetError(f"{which}: {path} is not an ONNX model (it parses, but holds no "
                          f"graph node); {expected}")
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if not (path.parent / loc).is_file():
                raise TargetError(f"{which}: {path} keeps initializer {t.name!r} in {loc!r}, "
                                  f"which is missing next to it; copy the external data file "
                                  f"into {path.parent}")


def graph_inputs(path: Path) -> list[InputSpec]:
    """The inputs a graph must be fed (initializers listed as inputs left out)."""
    proto = onnx.load(str(path), load_external_data=False)
    return [InputSpec(*spec) for spec in input_specs(proto.graph)]


def check_feeds(feeds: Mapping[str, np.ndarray], specs: list[InputSpec], which: str,
                source: str) -> None:
    """Refuse feeds that do not match a graph's inputs (name, dtype, rank, static dims).

    Raises:
        TargetError: one line: the input, what the graph expects and what was found, and
            how to fix it.
    """
    fix = ("write the arrays with the graph's input names, dtypes and shapes (numpy.savez; "
           "`edgestack inspect MODEL.onnx` lists them)")
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise TargetError(f"{which}: input(s) {missing} are not in {source} (it holds "
                          f"{sorted(feeds)}); {which} takes "
                          + ", ".join(f"{s.name} {s.describe()}" for s in specs) + f"; {fix}")
    for s in specs:
        a = np.asarray(feeds[s.name])
        ok = a.dtype == s.dtype and a.ndim == len(s.shape) and all(
            d is None or d == n for d, n in zip(s.shape, a.shape, strict=False))
        if not ok:
            raise TargetError(f"{which}: input {s.name!r} expected {s.describe()}, found "
                              f"{a.dtype} {list(a.shape)} in {source}; {fix}")


def make_feeds(refs: list[ModelRef], inputs: str | None, seed: int
               ) -> tuple[dict[str, np.ndarray], str]:
    """The feeds of a diff and where they came from, checked against every ONNX side.

    ``inputs`` (an ``.npz``) wins; else deterministic example inputs generated from the first
    ONNX side's input signature (:func:`edgestack.targets.feeds.example_feeds`, what
    ``compile --golden`` and ``pack`` use) with ``seed``; with two torch sides, empty (the
    first model's own example inputs are used).

    Raises:
        TargetError: the file cannot be read, the feeds do not fit a graph's inputs, an
            input of one side is missing from them, or (generated inputs) the two graphs
            take different inputs.
    """
    onnx_refs = [r for r in refs if r.kind == "onnx"]
    if inputs is not None:
        feeds, source = load_feeds(inputs), f"--inputs {inputs}"
    elif onnx_refs:
        first = onnx_refs[0]
        feeds = example_feeds(first.path, seed=seed)
        source = f"example inputs of {first.label} (seed {seed})"
    else:
        return {}, "the example inputs of A's model source"
    names = {}
    for ref, which in zip(refs, ("A", "B"), strict=False):
        if ref.kind == "onnx":
            specs = graph_inputs(ref.path)
            check_feeds(feeds, specs, which, source)
            names[which] = {s.name for s in specs}
    if inputs is None and len(names) == 2 and names["A"] != names["B"]:
        extra = sorted(names["A"] ^ names["B"])
        raise TargetError(f"A and B take different inputs ({extra} only on one side, e.g. a "
                          "device package graph's BitStack blocks); generated example inputs "
                          "would feed those random values: give --inputs FILE.npz with every "
                          "input of both graphs")
    return feeds, source


__all__ = ["GRAPH_FILE", "InputSpec", "ModelRef", "check_feeds", "graph_inputs", "make_feeds",
           "resolve_model"]
