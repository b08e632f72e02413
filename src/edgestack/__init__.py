"""edgestack: compressed neural networks on edge devices.

Layers (each imports only the ones below it)::

    formats (numpy) <- compress (torch) <- exporter <- targets <- package <- runtime

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
    ParityError,
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
    "ParityError",
    "TargetError",
    "BudgetError",
    "ProfileError",
    "PackageError",
    "InternalError",
]
