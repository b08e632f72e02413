"""The edgestack exception tree.

Every error a user can cause derives from :class:`EdgestackError` and says what went wrong,
what was expected versus what was found, and how to fix it. Broken internal invariants raise
:class:`InternalError` instead, so that a bug is never mistaken for bad input.
"""

from __future__ import annotations


class EdgestackError(Exception):
    """Base class of every error caused by bad input or an unusable environment."""


class FormatError(EdgestackError):
    """A compressed-weight container or file does not match its format."""


class CompressError(EdgestackError):
    """A compression pass cannot run with the given model or options."""


class CheckpointError(EdgestackError):
    """An upstream checkpoint does not fit the layout or the model it is loaded into."""


class ExportError(EdgestackError):
    """The model cannot be exported to ONNX, or the exported file fails its checks."""


class TargetError(EdgestackError):
    """A target is unknown, unavailable, or cannot run the given model."""


class BackendUnavailable(TargetError):
    """A backend a command needs (TensorRT, a GPU, OpenVINO) is not on this machine: the
    command line exits 4 (skipped), not 2, since the input itself is fine."""


class BudgetError(EdgestackError):
    """A memory budget cannot be met."""


class ProfileError(EdgestackError):
    """A device profile, or a size such as a memory budget, is unknown or invalid."""


class PackageError(EdgestackError):
    """A device package or package archive is malformed, damaged, or used out of order."""


class InternalError(Exception):
    """An internal invariant is broken: a bug in edgestack, not bad input."""


__all__ = [
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
