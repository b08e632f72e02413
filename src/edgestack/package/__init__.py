"""Device packages: a verifiable directory (or ``.tar``) holding a model graph, weights,
BitStack blocks stored so that every memory tier is a prefix of one file, and golden data.

The format is specified in :mod:`edgestack.package.format` (its docstring is the spec).
Imports numpy and the standard library only, so the on-device runtime can use it.

- :class:`PackageWriter`: ``begin -> add_file/add_blocks -> set_tiers -> add_golden -> finish``.
- :class:`Package`: ``Package.open(path)`` checks before trusting bytes; ``verify()`` hashes;
  ``read_into`` / ``read_prefix`` read counted bytes, ``views_of`` slices them into blocks.
- :func:`write_archive` / :func:`extract_archive`: the one-file form, atomic and safe.

Writing a package from an ONNX model is the host-side :mod:`edgestack.packer` (onnx-ir and
ONNX Runtime); this layer is the container both sides share and imports neither.

What is inside an ONNX file or a package (``edgestack inspect``) is a report of the profiler
layer: :func:`edgestack.profiler.inspect.inspect_path`.
"""

from edgestack.package.archive import extract_archive, write_archive
from edgestack.package.format import (
    BLOCK_ALIGN,
    BLOCK_FILE,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    BlockRecord,
    DecoderInfo,
    FileEntry,
    Golden,
    LayerGraph,
    LayerInfo,
    Manifest,
    ModelInfo,
    RuntimeInfo,
    Site,
    Table,
    Tier,
)
from edgestack.package.reader import BlockView, ByteCounter, Package
from edgestack.package.writer import PackageWriter

__all__ = ["PackageWriter", "Package", "ByteCounter", "BlockView", "write_archive",
           "extract_archive", "Manifest", "FileEntry", "LayerInfo", "LayerGraph", "Site",
           "RuntimeInfo", "DecoderInfo", "Table", "BlockRecord", "Tier", "Golden", "ModelInfo",
           "BLOCK_ALIGN", "BLOCK_FILE", "MANIFEST_NAME", "SCHEMA_VERSION",
           "SUPPORTED_SCHEMA_VERSIONS"]
