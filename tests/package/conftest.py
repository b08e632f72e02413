"""Fixtures shared with the runtime tests: tests/runtime goes on sys.path for
``runtime_helpers`` (its synthetic BitStack model and package, packed once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_helpers import small_model, small_pkg  # noqa: F401 - fixtures
