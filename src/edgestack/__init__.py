"""edgestack: compressed neural networks on edge devices.

Layers (each imports only the ones to its left; docs/architecture.md, checked by
``make lint``)::

    errors <- core <- formats <- profiles <- compress <- zoo <- sources <- exporter
    <- targets <- package <- runtime <- profiler <- pipeline <- demo <- cli

Importing ``edgestack`` imports neither torch nor any backend.
"""

from edgestack.errors import (
    BudgetError,
    CheckpointError,
    CompressError,
    EdgestackError,
    ExportError,
    FormatError,
    InternalError,
    PackageError,
    ProfileError,
    TargetError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "EdgestackError",
    "FormatError",
    "CompressError",
    "CheckpointError",
    "ExportError",
    "TargetError",
    "BudgetError",
    "ProfileError",
    "PackageError",
    "InternalError",
]
