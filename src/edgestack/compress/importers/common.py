"""What every importer shares: reading checkpoints, building the model, matching key prefixes,
loading the tensors that stay dense, and the :class:`ImportReport`.

Checkpoints are read without running pickled code: ``.safetensors`` files with
``safetensors.torch.load_file`` and torch files (``.pt``, ``.pth``, ``.bin``, ``.tar``,
``.ckpt``) with torch's weights-only unpickler, pickled objects stood in for
(:mod:`edgestack.compress.importers.pickled`). A torch file may hold the state dict itself,
a dict wrapping it under ``state_dict``, ``model``, ``model_state_dict`` or ``module`` (the
training scripts of DeepShift save ``{"epoch", "arch", "state_dict", "best_acc1",
"optimizer", "lr_scheduler"}``, the scheduler a pickled object), or a whole pickled
``nn.Module`` (DeepShift's ``model.pth``). Every entry that is not model weights is named in
:attr:`ImportReport.skipped` with what it holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgestack.compress.hf import model_from_config
from edgestack.compress.importers import pickled
from edgestack.compress.walk import LayerInfo, iter_layers
from edgestack.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".ckpt")
# Files in a checkpoint folder that are never model weights (HF Trainer, WeLore, DeepShift).
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_SHOW = 5


@dataclass
class ImportReport:
    """What an importer did.

    Attributes:
        kind: the importer (``deepshift``, ``welore``, ``flap``, ``bitstack``).
        source: the checkpoint path (or ``"<state dict>"``).
        converted: layer name -> what it became (compressed or resized).
        dense: layer name -> why it was left dense.
        stripped_prefix: key prefix removed from the checkpoint keys (``""``: none).
        added_prefix: key prefix put before the checkpoint keys (``""``: none).
        unused_keys: checkpoint keys that were not loaded into the model.
        skipped: checkpoint entries that are not model weights -> what they hold (epoch,
            optimizer state, pickled objects that were not constructed, ...).
        unwrapped: key segments removed because the model lacks them (DataParallel's
            ``module.`` inside a key, e.g. ``features.module.``).
        details: importer-specific facts (bitstack: ``importance_order``, where the block
            order came from).
        warnings: everything the user should know (dropped tensors, clamped values, ...).
    """

    kind: str
    source: str
    converted: dict[str, str] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    stripped_prefix: str = ""
    added_prefix: str = ""
    unused_keys: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unwrapped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able plain data."""
        return asdict(self)


@dataclass
class Checkpoint:
    """A checkpoint read into memory: its tensors, the folder it came from (if any), the
    entries that are not model weights (``{entry: what it holds}``) and notes for the
    report's warnings."""

    state: dict[str, torch.Tensor]
    source: str
    folder: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def where(self) -> Path | None:
        """The folder holding the checkpoint (its own folder, or a weight file's folder);
        None for an in-memory state dict."""
        if self.folder is not None:
            return self.folder
        path = Path(self.source)
        return path.parent if path.is_file() else None


def _few(items: list[str] | Any, n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "none"


def _unwrap(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict inside a loaded object, and ``{entry: what it holds}`` for every
    entry beside it that is not model weights (epoch, optimizer, pickled objects, ...)."""
    skipped: dict[str, str] = {}
    path = ""
    for _ in range(3):
        if pickled.is_module(obj):  # torch.save(model): a whole pickled nn.Module
            tensors = pickled.module_tensors(obj)
            if tensors:
                skipped[path or "<model>"] = (
                    f"pickled {obj.global_name} module: its {len(tensors)} parameters and "
                    "buffers were read, the object was not constructed")
                return tensors, skipped
            break
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}, skipped
        key = next((k for k in _WRAPPER_KEYS if k in obj and (
            isinstance(obj[k], Mapping) or pickled.is_module(obj[k]))), None)
        if key is None:
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                skipped.update({path + str(k): pickled.describe(v) for k, v in obj.items()
                                if not isinstance(v, torch.Tensor)})
                return tensors, skipped
            break
        skipped.update({path + str(k): pickled.describe(v) for k, v in obj.items()
                        if k != key})
        path += f"{key}."
        obj = obj[key]
    keys = list(obj.keys()) if isinstance(obj, Mapping) else []
    found = (f"a pickled {obj.global_name} object" if isinstance(obj, pickled.Skipped)
             else f"{type(obj).__name__} with keys {_few(keys)}")
    raise CheckpointError(
        f"{where}: expected a state dict (a dict of tensors), a dict holding one under "
        f"{'/'.join(_WRAPPER_KEYS)}, or a pickled nn.Module, found {found}; save the "
        "model's state_dict() with torch.save or safetensors"
    )


def _skip_notes(where: str, skipped: dict[str, str], globals_: list[str]) -> list[str]:
    """The warning naming what a checkpoint held beside the weights (none: nothing)."""
    if not skipped and not globals_:
        return []
    note = f"{where}: entries that are not model weights were not loaded: {_few(skipped, 6)}"
    if globals_:
        note += (f"; read without running pickled code, {len(globals_)} pickled global(s) "
                 f"stood in for ({_few(globals_, 4)})")
    return [note + " (see the report's skipped)"]


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """``(state, skipped entries, notes)`` of one weights file."""
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}, []
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}: {exc}); "
                "expected a file written by safetensors.torch.save_file; check that it is "
                "complete (not a Git LFS pointer or a partial download)"
            ) from None
    if name.endswith(TORCH_SUFFIXES):
        obj, globals_ = pickled.load_torch(path)
        state, skipped = _unwrap(obj, str(path))
        return state, skipped, _skip_notes(path.name, skipped, globals_)
    raise CheckpointError(
        f"unsupported checkpoint file type {path.suffix or path.name!r} ({str(path)!r}); "
        f"expected one of {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} or a folder "
        "holding such files"
    )


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    usable = [p for p in files if not p.name.lower().startswith(_NOT_WEIGHTS)]
    for suffixes in (SAFETENSORS_SUFFIXES, (".bin",), TORCH_SUFFIXES):
        found = [p for p in usable if p.name.lower().endswith(suffixes)]
        if found:
            return found
    raise CheckpointError(
        f"checkpoint folder {str(folder)!r} holds no weight file; expected *.safetensors, "
        f"pytorch_model*.bin or a *.pt/*.pth file, found {_few([p.name for p in files], 10)}"
    )


def read_checkpoint(checkpoint: Any) -> Checkpoint:
    """Read a checkpoint folder, weight file, or in-memory state dict.

    Raises:
        CheckpointError: the path does not exist, a file type is not supported, a file
            cannot be read, or it holds no state dict.
    """
    if isinstance(checkpoint, Mapping):
        state, skipped = _unwrap(checkpoint, "checkpoint")
        return Checkpoint(state, "<state dict>", None, skipped,
                          _skip_notes("checkpoint", skipped, []))
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint: expected a path (str or Path) or a state dict, found "
            f"{type(checkpoint).__name__}"
        )
    path = Path(checkpoint)
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        near = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else []
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass a checkpoint folder (config.json + "
            f"*.safetensors or pytorch_model.bin) or a weights file"
            + (f"; {str(parent)!r} holds {_few(near, 10)}" if near else "")
        )
    if path.is_dir():
        state: dict[str, torch.Tensor] = {}
        skipped: dict[str, str] = {}
        notes: list[str] = []
        files = _weight_files(path)
        for f in files:
            part, skip, note = _load_file(f)
            clash = sorted(set(part) & set(state))
            if clash:
                raise CheckpointError(
                    f"checkpoint folder {str(path)!r}: {f.name} repeats keys already read from "
                    f"another file ({_few(clash)}); keep one copy of the weights in the folder"
                )
            state.update(part)
            skipped.update({(f"{f.name}:{k}" if len(files) > 1 else k): v
                            for k, v in skip.items()})
            notes += note
        return Checkpoint(state, str(path), path, skipped, notes)
    state, skipped, notes = _load_file(path)
    return Checkpoint(state, str(path), None, skipped, notes)


def build_model(base: Any, ckpt: Checkpoint) -> tuple[nn.Module, list[str]]:
    """The model to import into: ``base``, or a model built from the folder's config.json.

    A model built from a config (:func:`edgestack.compress.hf.model_from_config`) has the
    class it was saved as (``config.architectures``: ``LlamaForCausalLM`` keeps its
    ``lm_head``; none given: the bare ``AutoModel``), fp32, eager attention, eval mode, built
    offline; its weights are random until the import loads them.

    Returns:
        ``(model, notes)``; notes go to the report's warnings.
    """
    notes: list[str] = []
    if isinstance(base, tuple) and base and isinstance(base[0], nn.Module):
        base = base[0]  # a zoo factory's (model, example_inputs)
    if base is not None:
        if not isinstance(base, nn.Module):
            raise CheckpointError(
                f"base: expected a torch nn.Module (e.g. from module:factory), found "
                f"{type(base).__name__}"
            )
        if ckpt.folder is not None and (ckpt.folder / "config.json").is_file():
            notes.append("config.json in the checkpoint folder was not used: base was given")
        return base, notes
    folder = ckpt.folder
    if folder is None or not (folder / "config.json").is_file():
        where = ckpt.source if folder is None else str(folder)
        raise CheckpointError(
            f"no model architecture for {where!r}: base is None and there is no config.json "
            "next to the weights; expected a Hugging Face checkpoint folder with config.json, "
            "or pass base (an nn.Module of the architecture, e.g. from module:factory)"
        )
    return model_from_config(folder), notes


# --- key prefixes -----------------------------------------------------------------------


def _prefixes(keys: list[str], depth: int = 2) -> set[str]:
    out: set[str] = set()
    for k in keys:
        parts = k.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            if not parts[d - 1].isdigit():
                out.add(".".join(parts[:d]) + ".")
    return out


def _score(keys: list[str], model_keys: set[str], modules: set[str], layers: set[str]) -> int:
    n = 0
    for k in keys:
        parent = k.rpartition(".")[0]
        grand = parent.rpartition(".")[0]
        if k in model_keys or parent in modules or grand in layers:
            n += 1
    return n


def _unwrap_inner(key: str) -> tuple[str, str | None]:
    """``key`` without the ``module`` path segments after its first one, and the key prefix
    up to the first one removed (``features.module.0.weight`` -> ``features.0.weight``,
    ``features.module.``)."""
    parts = key.split(".")
    inner = [i for i in range(1, len(parts) - 1) if parts[i] == "module"]
    if not inner:
        return key, None
    where = ".".join(parts[:inner[0] + 1]) + "."
    return ".".join(p for i, p in enumerate(parts) if i not in inner), where


def align_keys(state: dict[str, torch.Tensor], model: nn.Module,
               report: ImportReport) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's names: strip or add a leading prefix, and drop
    DataParallel's ``module`` segments inside keys.

    A key matches when it names a model tensor, its module is a module of the model, or its
    module's parent is a layer of the model (``q_proj`` for ``q_proj.U.weight``). The prefix
    that makes the most keys match wins (``module.`` from DataParallel, ``model.`` from a
    causal-LM wrapper, ``bert.``, ...); keys without the prefix are kept as they are. When the
    model has no module named ``module``, ``module`` segments after a key's first one are
    dropped if that makes more keys match: DeepShift's ImageNet script wraps only
    ``model.features`` of AlexNet and VGG in ``DataParallel`` (``features.module.0.weight``).
    The segments dropped are listed in ``report.unwrapped``.

    Raises:
        CheckpointError: no key matches the model whatever the prefix.
    """
    model_keys = set(model.state_dict().keys())
    modules = {n for n, _ in model.named_modules() if n}
    layers = {info.name for info in iter_layers(model)}
    candidates = [(dict(state), [])]
    if not any("module" in n.split(".") for n in modules):
        renamed: dict[str, torch.Tensor] = {}
        wrappers: list[str] = []
        for k, v in state.items():
            new, where = _unwrap_inner(k)
            if where is not None and where not in wrappers:
                wrappers.append(where)
            if new in renamed or (new != k and new in state):
                wrappers = []  # both forms present: not a DataParallel wrapper
                break
            renamed[new] = v
        if wrappers:
            candidates.append((renamed, wrappers))
    best = None
    for cand, wrappers in candidates:
        keys = list(cand)
        found = (_score(keys, model_keys, modules, layers), 0, "", "")
        for p in _prefixes(keys):
            stripped = [k[len(p):] if k.startswith(p) else k for k in keys]
            found = max(found, (_score(stripped, model_keys, modules, layers), -len(p), p, ""))
        for a in _prefixes(list(model_keys)):
            added = [a + k for k in keys]
            found = max(found, (_score(added, model_keys, modules, layers), -len(a), "", a))
        if best is None or found[0] > best[0][0]:
            best = (found, cand, wrappers)
    (score, _, strip, add), state, wrappers = best
    keys = list(state)
    if score == 0:
        raise CheckpointError(
            "no tensor in the checkpoint matches a layer of the model, even after stripping "
            f"or adding a key prefix; checkpoint keys: {_few(keys)}; model keys: "
            f"{_few(sorted(model_keys))}; check that base (or config.json) is the "
            "architecture the checkpoint was made from"
        )
    report.stripped_prefix, report.added_prefix = strip, add
    report.unwrapped = list(wrappers)
    if not strip and not add:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        new = add + (k[len(strip):] if strip and k.startswith(strip) else k)
        if new in out:
            raise CheckpointError(
                f"checkpoint keys {k!r} and another key both become {new!r} once the prefix "
                f"{strip!r} is stripped; remove the duplicate from the checkpoint"
            )
        out[new] = v
    return out


def group_by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """Module path -> {leaf name -> full key} for every checkpoint key."""
    groups: dict[str, dict[str, str]] = {}
    for k in state:
        parent, _, leaf = k.rpartition(".")
        groups.setdefault(parent, {})[leaf] = k
    return groups


# --- layers ------------------------------------------------------------------------------


def layer_shape(layer: LayerInfo) -> tuple[int, ...]:
    """The layer's weight shape in edgestack's orientation ``[out, in, *kernel]``."""
    shape = tuple(int(d) for d in layer.module.weight.shape)
    return (shape[1], shape[0]) if layer.transposed else shape


def check_shape(layer: str, what: str, tensor: torch.Tensor, expected: tuple[int, ...],
                hint: str = "") -> None:
    """Raise CheckpointError unless ``tensor`` has shape ``expected``."""
    found = tuple(int(d) for d in tensor.shape)
    if found != tuple(expected):
        raise CheckpointError(
            f"layer {layer!r}: checkpoint tensor {what} has shape {list(found)}, expected "
            f"{list(expected)} for the model's layer"
            + (f" ({hint})" if hint else "")
            + "; check that base (or config.json) is the architecture the checkpoint was "
            "made from"
        )


def float_tensor(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy (exact for fp16/bf16 sources)."""
    return t.detach().to(torch.float32).clone()


def bias_parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    """A frozen fp32 bias parameter, or None."""
    return None if t is None else nn.Parameter(float_tensor(t), requires_grad=False)


# --- dense loading -----------------------------------------------------------------------


def load_dense(model: nn.Module, state: dict[str, torch.Tensor], consumed: set[str],
               replaced: list[str], report: ImportReport, strict: bool = True) -> None:
    """Load every model tensor outside the ``replaced`` layers from ``state``.

    Shapes must match; dtypes are cast to the model's. Parameters tied to one that was
    loaded (e.g. an LM head tied to the embeddings) may be absent. Keys neither consumed by
    the importer nor loaded are listed in ``report.unused_keys`` and warned about.

    Raises:
        CheckpointError: a shape differs, or (``strict``) a model tensor is missing.
    """
    target = model.state_dict()
    skip = tuple(r + "." for r in replaced)
    wanted = [k for k in target if not k.startswith(skip)]
    load: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for k in wanted:
        if k not in state:
            missing.append(k)
            continue
        exp, got = tuple(target[k].shape), tuple(state[k].shape)
        if exp != got:
            owner = k.rpartition(".")[0]
            raise CheckpointError(
                f"layer {owner!r}: checkpoint tensor {k!r} has shape {list(got)}, expected "
                f"{list(exp)}; check that base (or config.json) is the architecture the "
                "checkpoint was made from"
            )
        load[k] = state[k]
    if missing:
        aliases: dict[int, list[str]] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            aliases.setdefault(id(t), []).append(name)
        names_of = {n: ns for ns in aliases.values() for n in ns}
        missing = [m for m in missing if not any(a in load for a in names_of.get(m, [m]))]
    if missing:
        msg = (f"the checkpoint lacks {len(missing)} tensor(s) of the model: {_few(missing)}")
        if strict:
            raise CheckpointError(
                msg + "; check that base (or config.json) is the checkpoint's architecture, "
                "or pass strict=False to keep the model's own values for them"
            )
        report.warnings.append(msg + "; kept the model's own values (strict=False)")
    with torch.no_grad():
        result = model.load_state_dict(load, strict=False)
    if result.unexpected_keys:  # cannot happen: keys come from the model
        raise CheckpointError(f"unexpected keys while loading: {_few(result.unexpected_keys)}")
    unused = sorted(k for k in state if k not in consumed and k not in load)
    report.unused_keys = unused
    if unused:
        report.warnings.append(
            f"{len(unused)} checkpoint tensor(s) were not used (no such tensor in the model): "
            f"{_few(unused)}"
        )
