"""Reading torch checkpoints that hold pickled Python objects, without running pickled code.

Training scripts save more than tensors: DeepShift's ``checkpoint.pth.tar`` is
``{"epoch", "arch", "state_dict", "best_acc1", "optimizer", "lr_scheduler"}`` where
``lr_scheduler`` is a pickled ``torch.optim.lr_scheduler`` object (which pickles its
optimizer with it) and, in ``cifar10.py``, ``best_acc1`` a numpy scalar; its ``model.pth`` is a
whole pickled ``nn.Module``. ``torch.load(weights_only=True)`` refuses every such file.

:func:`load_torch` keeps torch's weights-only unpickler (its opcode and type checks all stay
on) and allowlists each global the file names with a **stand-in** (:class:`Skipped`): a class
that records the name and the arguments the pickle gives it and does nothing else, so no
pickled class or function is imported or called. The globals are found by torch's static
scan (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`, zip files) and, for
legacy (pre-1.6, non-zip) files, from the unpickler's "Unsupported global" refusals, one
load per new name. ``collections.defaultdict`` (an optimizer's ``state``) becomes a plain
dict, and ``dict``/``list``/``set``/``frozenset`` the built-in types themselves, because the
weights-only unpickler only fills those types; nothing else is constructed.

:func:`module_tensors` reads a stand-in for a pickled ``nn.Module`` (its ``_parameters``,
``_buffers`` and ``_modules``) as a state dict. :func:`describe` says what an entry that is
not model weights holds, for the import report.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edgestack.errors import CheckpointError

MAX_GLOBALS = 256
"""Most distinct pickled globals one checkpoint may name (each legacy-format one costs a
load)."""

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


class Skipped:
    """Stand-in for a pickled object whose class or function was not loaded.

    Attributes:
        global_name: the pickled global (``module.qualname``) it stands for (class level).
        args: the arguments the pickle passed to the global (never used).
        state: the state the pickle set on the object (never used, except by
            :func:`module_tensors` for a pickled ``nn.Module``).
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Skipped:
        # the unpickler calls only __new__ for NEWOBJ, __new__ and __init__ for REDUCE
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<skipped {self.global_name}>"


def _stand_in(name: str) -> Any:
    if name in _AS_IS:
        return _AS_IS[name]
    return type("Skipped", (Skipped,), {"global_name": name})


def _plain_dict(*args: Any) -> dict:
    """``collections.defaultdict(factory)`` read as a plain dict (its items follow)."""
    return {}


# read as these plain containers (the weights-only unpickler fills only exact dicts and lists)
_AS_IS: dict[str, Any] = {"builtins.dict": dict, "builtins.list": list, "builtins.set": set,
                          "builtins.frozenset": frozenset,
                          "collections.defaultdict": _plain_dict}


def _scan(path: Path) -> set[str]:
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a legacy (non-zip) file: found one by one below
        return set()


def load_torch(path: Path) -> tuple[Any, list[str]]:
    """``torch.load`` a file with torch's weights-only unpickler, standing in for globals.

    The stand-ins are allowlisted with :class:`torch.serialization.safe_globals`, which is
    process-wide while the file loads: another thread's ``torch.load`` in that moment would
    get stand-ins for those names too (never the real objects).

    Returns:
        ``(object, names)``: the loaded object (pickled objects replaced by :class:`Skipped`
        instances) and the globals that were stood in for, sorted.

    Raises:
        CheckpointError: the file is not a complete torch checkpoint, or the weights-only
            unpickler refuses it for another reason than a global (a blocked module, an
            operation on a stood-in object); the message says what.
    """
    names = _scan(path)
    for _ in range(MAX_GLOBALS + 1):
        allowed = [(_stand_in(n), n) for n in sorted(names)]
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            return obj, sorted(n for n in names if n not in _AS_IS)
        except pickle.UnpicklingError as exc:
            found = _UNSUPPORTED.search(str(exc))
            name = found.group(1) if found else None
            if name is not None and "." not in name:
                name = "builtins." + name  # torch prints builtins without their module
            if name is None or name in names or len(names) >= MAX_GLOBALS:
                raise _refused(path, exc) from None
            names.add(name)
        except Exception as exc:  # RuntimeError (zip), EOFError, ...
            raise _refused(path, exc) from None
    raise _refused(path, RuntimeError(f"more than {MAX_GLOBALS} pickled globals"))


def _refused(path: Path, exc: BaseException) -> CheckpointError:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "GLOBAL" in ln or "Can only" in ln
                 or "blocked" in ln), lines[0] if lines else "")
    return CheckpointError(
        f"cannot read {str(path)!r} as a torch checkpoint ({type(exc).__name__}: "
        f"{line.strip()[:300]}); expected a complete file written by torch.save; pickled "
        "Python objects are skipped without running their code, but this one cannot be read "
        "that way: load it with torch.load yourself if you trust it and pass its state dict "
        "(a dict of tensors) as the checkpoint"
    )


def is_module(obj: Any) -> bool:
    """Whether ``obj`` stands for a pickled ``nn.Module`` (it has ``_parameters`` and
    ``_modules`` state)."""
    state = obj.state if isinstance(obj, Skipped) else None
    return isinstance(state, Mapping) and "_parameters" in state and "_modules" in state


def module_tensors(obj: Skipped, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a pickled ``nn.Module`` read from its stand-in: every parameter and
    persistent buffer of it and its sub-modules, named as ``state_dict()`` names them."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    transient = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, torch.Tensor) and not (group == "_buffers" and name in transient):
                out[prefix + str(name)] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if is_module(child):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def stood_in(obj: Any, depth: int = 0) -> list[str]:
    """The globals of the stand-ins inside ``obj`` (dicts, lists, tuples; depth-limited)."""
    if isinstance(obj, Skipped):
        return [obj.global_name]
    found: list[str] = []
    if depth < 6:
        items = obj.values() if isinstance(obj, Mapping) else (
            obj if isinstance(obj, (list, tuple)) else ())
        for v in items:
            for n in stood_in(v, depth + 1):
                if n not in found:
                    found.append(n)
    return found


def describe(value: Any) -> str:
    """What a checkpoint entry that is not the model's state dict holds, in a few words."""
    if isinstance(value, Skipped):
        name = value.global_name
        if name.endswith(("multiarray._reconstruct", "multiarray.scalar")):
            name = f"numpy array ({name})"
        return (f"pickled {name} object: not constructed (only tensors are read; no "
                "pickled code runs)")
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} outside the state dict (training metadata)"
    if isinstance(value, Mapping):
        inner = stood_in(value)
        if "state" in value and "param_groups" in value:
            what = "optimizer state_dict"
        else:
            what = f"dict of {len(value)} entries"
        return what + (f" holding pickled {', '.join(inner[:3])}" if inner else "") + \
            ": not model weights"
    if value is None or isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {repr(value)[:40]}: training metadata"
    return f"{type(value).__name__}: not model weights"
