"""Base class and registry of the compressed-weight formats."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from edgestack.errors import FormatError

_REGISTRY: dict[str, type[WeightFormat]] = {}


class WeightFormat:
    """A compressed representation of one weight tensor.

    Subclasses register with ``class X(WeightFormat, name="x")`` and implement
    :meth:`decode`, :meth:`arrays`, :meth:`attrs` and :meth:`from_arrays`.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not name:
            return
        if name in _REGISTRY:
            raise FormatError(
                f"weight format {name!r} is registered twice ({_REGISTRY[name].__qualname__} "
                f"and {cls.__qualname__}); give the new format another name"
            )
        cls.name = name
        _REGISTRY[name] = cls

    def decode(self) -> np.ndarray:
        """Return the dense float32 weight this container stands for."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the stored arrays by name (what goes into a file)."""
        raise NotImplementedError

    def attrs(self) -> dict[str, Any]:
        """Return the JSON-able attributes needed with :meth:`arrays` to rebuild this."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> WeightFormat:
        """Rebuild a container from :meth:`arrays` and :meth:`attrs`."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Stored size in bytes: the sum of the arrays' sizes."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def numel(self) -> int:
        """Number of weights the container stands for."""
        return int(np.prod(self.attrs()["shape"]))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per represented weight."""
        return 8.0 * self.nbytes / self.numel


def get_format(name: str) -> type[WeightFormat]:
    """Return the format class registered under ``name``.

    Raises:
        FormatError: no such format; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FormatError(
            f"unknown weight format {name!r}; registered formats are "
            f"{', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_formats() -> dict[str, type[WeightFormat]]:
    """Return a copy of the registry, name -> class."""
    return dict(_REGISTRY)


def check_array(name: str, arr: Any, dtype: Any, ndim: int | None = None) -> np.ndarray:
    """Check that ``arr`` is an ndarray of ``dtype`` (and ``ndim``), or raise FormatError."""
    if not isinstance(arr, np.ndarray):
        raise FormatError(f"{name}: expected a numpy array, found {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise FormatError(
            f"{name}: expected dtype {np.dtype(dtype)}, found {arr.dtype}; "
            f"convert with .astype(np.{np.dtype(dtype)})"
        )
    if ndim is not None and arr.ndim != ndim:
        raise FormatError(f"{name}: expected {ndim} dimensions, found shape {arr.shape}")
    return arr


def check_finite(name: str, arr: np.ndarray) -> None:
    """Refuse weights holding NaN or Inf, naming where they are."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i[0]) for i in np.nonzero(bad))
        raise FormatError(
            f"{name}: weight holds {int(bad.sum())} NaN/Inf value(s), first at index {where}; "
            "fix or retrain the layer before compressing it"
        )
