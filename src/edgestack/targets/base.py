"""The small interface every target implements: :class:`Target`, :class:`Runner`, :class:`Artifact`.

A target compiles an exported ONNX model into what its backend runs best
(:meth:`Target.lower`) and runs that artifact (:meth:`Target.runner`). The base classes own
what every backend shares (argument checks, input checks, timing, the ``artifact.json``
description); a backend writes only ``lower_impl`` and the runner's ``*_impl`` methods, and
imports its heavy package (openvino, tensorrt) lazily inside those.

``artifact.json`` (written next to the files; :data:`ARTIFACT_VERSION`)::

    {"version": 1, "target": "ort-cpu", "arch": "x86_64", "precision": "fp32",
     "files": {"model": "model.onnx", ...}, "inputs": {name: {"shape", "dtype"}},
     "outputs": [name, ...], "options": {...}, "report": {...}}
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core.runner import Runner as CoreRunner
from edgestack.errors import BackendUnavailable, TargetError

ARTIFACT_VERSION = 1
ARTIFACT_FILE = "artifact.json"


@dataclass
class Artifact:
    """A compiled model in a folder, described by ``artifact.json``.

    Attributes:
        folder: The artifact folder.
        target: Target name (``ort-cpu``, ...).
        arch: CPU architecture the artifact runs on (``x86_64``, ``aarch64``; ``any``).
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8`` (drives parity tolerances).
        files: Role -> file name inside ``folder`` (``model`` is what the runner loads).
        inputs: Input name -> ``{"shape": [...], "dtype": "float32"}`` (symbolic dims as str).
        outputs: Output names in graph order.
        options: The lowering options used.
        report: What the lowering did (rewrites per pass, fallbacks, rejected nodes).
    """

    folder: Path
    target: str
    arch: str
    precision: str
    files: dict[str, str]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def path(self, role: str = "model") -> Path:
        """The file with ``role`` (default: the model the runner loads)."""
        if role not in self.files:
            raise TargetError(f"artifact {self.folder} has no {role!r} file: it has "
                              f"{', '.join(sorted(self.files)) or 'none'}")
        return self.folder / self.files[role]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("folder")
        return {"version": ARTIFACT_VERSION, **data}

    def save(self) -> Path:
        """Write ``artifact.json``; returns its path."""
        out = self.folder / ARTIFACT_FILE
        out.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n",
                       encoding="utf-8")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        """Read an artifact folder (or its ``artifact.json``).

        Raises:
            TargetError: no artifact.json, unreadable, wrong version, or a listed file missing.
        """
        folder = Path(folder)
        if folder.name == ARTIFACT_FILE:
            folder = folder.parent
        meta = folder / ARTIFACT_FILE
        if not meta.is_file():
            raise TargetError(f"{folder} is not a compiled artifact: expected {meta}, found "
                              f"{'no such folder' if not folder.exists() else 'no such file'}. "
                              f"To fix: run `edgestack compile MODEL --target T --out {folder}`.")
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TargetError(f"{meta} is not valid JSON: {exc}") from exc
        if data.get("version") != ARTIFACT_VERSION:
            raise TargetError(f"{meta}: expected artifact version {ARTIFACT_VERSION}, found "
                              f"{data.get('version')!r}; recompile with this edgestack")
        art = cls(folder=folder, target=data["target"], arch=data["arch"],
                  precision=data["precision"], files=dict(data["files"]),
                  inputs=data.get("inputs", {}), outputs=list(data.get("outputs", [])),
                  options=data.get("options", {}), report=data.get("report", {}))
        for role, name in art.files.items():
            if not (folder / name).exists():
                raise TargetError(f"artifact {folder}: its {role} file {name} is missing")
        return art

def host_arch() -> str:
    """This machine's CPU architecture as edgestack names it (``x86_64``/``aarch64``)."""
    import platform

    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


class Runner(CoreRunner):
    """Runs one artifact (:class:`edgestack.core.runner.Runner`, as the device runtime). Use
    as a context manager or call :meth:`activate` / :meth:`release`.

    Subclasses implement :meth:`activate_impl`, :meth:`infer_impl` and :meth:`release_impl`;
    this class checks the feeds against the artifact's inputs and times each call
    (:attr:`last_ms`).
    """

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.active = False
        self.last_ms: float | None = None

    # ---- public -----------------------------------------------------------------------
    def activate(self) -> Runner:
        """Load the artifact (sessions, compiled models). Idempotent."""
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. Returns output name -> array, in the artifact's output order.

        Raises:
            TargetError: not activated, or the feeds do not match the inputs.
        """
        if not self.active:
            raise TargetError(f"{type(self).__name__}: call activate() before infer()")
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        self._check_feeds(feeds)
        t0 = time.perf_counter()
        out = self.infer_impl(feeds)
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return out

    def release(self) -> None:
        """Free what :meth:`activate` loaded."""
        if self.active:
            self.release_impl()
            self.active = False

    # ---- checks -----------------------------------------------------------------------
    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """``feeds`` (arrays) against the artifact's inputs: names, dtypes, fixed dims."""
        want = self.artifact.inputs
        if not want:
            return
        missing = [n for n in want if n not in feeds]
        extra = [n for n in feeds if n not in want]
        if missing or extra:
            raise TargetError(f"feeds do not match the model's inputs: expected "
                              f"{', '.join(want)}, missing {missing or 'none'}, "
                              f"unexpected {extra or 'none'}")
        for name, spec in want.items():
            arr = feeds[name]
            if _dtype_name(arr.dtype) != spec["dtype"]:
                raise TargetError(f"input {name!r}: expected dtype {spec['dtype']}, found "
                                  f"{arr.dtype.name}")
            shape = spec["shape"]
            if len(shape) != arr.ndim or any(isinstance(d, int) and d != s
                                             for d, s in zip(shape, arr.shape, strict=True)):
                raise TargetError(f"input {name!r}: expected shape {shape}, found "
                                  f"{list(arr.shape)}")

    def _check_arch(self, arch: str) -> None:
        if self.artifact.arch not in ("any", arch):
            raise TargetError(
                f"{type(self).__name__} runs {arch} artifacts, but {self.artifact.folder} was "
                f"compiled for {self.artifact.arch} (target {self.artifact.target}). To fix: "
                f"run it with the {self.artifact.target} runner"
                + (" (`edgestack verify ARTIFACT --emulate aarch64` on x86)"
                   if self.artifact.arch == "aarch64" else "")
                + ", or recompile for this target.")

    # ---- for subclasses ---------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def release_impl(self) -> None:
        pass


class Target:
    """A compile target. Subclasses set :attr:`name`, :attr:`arch`, :attr:`extra` and
    implement :meth:`available`, :meth:`lower_impl` and :meth:`runner_class`."""

    name: str = ""
    arch: str = "any"
    extra: str | None = None        # the pip extra that installs the backend
    precisions: tuple[str, ...] = ("fp32",)

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when this machine can run artifacts of this target, else
        ``(False, reason)``. Never raises."""
        try:
            self.import_backend()
        except TargetError as exc:
            return False, str(exc)
        return True, ""

    def import_backend(self) -> Any:
        """Import the backend package (lazily; see :func:`import_package`); ``None`` for a
        target without one.

        Raises:
            TargetError: the package cannot be imported (the message says how to install it).
        """
        return None

    def default_options(self, profile: Any | None) -> dict[str, Any]:
        return {}

    def lower(self, model_path: str | Path, out_dir: str | Path, profile: Any | None = None,
              **options: Any) -> Artifact:
        """Compile ``model_path`` into ``out_dir``.

        Args:
            model_path: An exported ONNX model (edgestack ops allowed).
            out_dir: Output folder (created; files inside are replaced).
            profile: A :class:`edgestack.profiles.Profile` or name; ``None``: defaults.
            **options: Target options (see each target's docstring); unknown ones raise.

        Returns:
            The :class:`Artifact` (``artifact.json`` written).
        """
        from edgestack.profiles import Profile, load_profile  # lazy: keeps CLI start light

        if isinstance(profile, str):
            profile = load_profile(profile)
        if profile is not None and not isinstance(profile, Profile):
            raise TargetError(f"profile must be a Profile or a name, found "
                              f"{type(profile).__name__}")
        if profile is not None and self.precisions and profile.precision not in self.precisions:
            raise TargetError(f"target {self.name} cannot run precision {profile.precision} "
                              f"(profile {profile.name}): it runs {', '.join(self.precisions)}")
        model_path = Path(model_path)
        if not model_path.is_file():
            raise TargetError(f"cannot compile {model_path}: expected an ONNX file, found "
                              f"{'a folder' if model_path.exists() else 'no such file'}")
        opts = self.default_options(profile)
        unknown = sorted(set(options) - set(opts))
        if unknown:
            raise TargetError(f"target {self.name}: unknown option(s) {', '.join(unknown)}; "
                              f"it takes {', '.join(sorted(opts)) or 'none'}")
        opts.update({k: v for k, v in options.items() if v is not None})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        art = self.lower_impl(model_path, out, profile, opts)
        # a lowered graph may still read tensors it did not rewrite from the source's external
        # data (onnx-ir saves them as references): that data goes beside it
        from edgestack.exporter.output import external_files  # lazy: onnx at import

        for name in external_files(model_path):  # by the names the graph gives them
            data = model_path.parent / name
            if Path(name).name == name and data.is_file() and not (out / name).exists():
                shutil.copyfile(data, out / name)
        art.save()
        return art

    def lower_impl(self, model_path: Path, out_dir: Path, profile: Any | None,
                   options: dict[str, Any]) -> Artifact:
        raise NotImplementedError

    def runner_class(self) -> type[Runner]:
        raise NotImplementedError

    def runner(self, artifact: Artifact | str | Path, **kwargs: Any) -> Runner:
        """A runner for ``artifact`` (not activated yet).

        Raises:
            TargetError: the artifact belongs to another target.
        """
        if not isinstance(artifact, Artifact):
            artifact = Artifact.load(artifact)
        if artifact.target != self.name:
            raise TargetError(f"artifact {artifact.folder} was compiled for {artifact.target}, "
                              f"not {self.name}: use get_target({artifact.target!r}).runner()")
        return self.runner_class()(artifact, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def import_package(module: str, target: str, extra: str, where: str = "") -> Any:
    """Import ``module``, the backend package of ``target``.

    Raises:
        BackendUnavailable: it cannot be imported; the message names ``pip install
            'edgestack[extra]'`` (``where``: a note appended to that advice).
    """
    try:
        return __import__(module)     # a top-level package name: the module itself
    except ImportError as exc:
        raise BackendUnavailable(f"target {target} needs the {module} package, which cannot be "
                          f"imported ({exc}). To fix: pip install 'edgestack[{extra}]'{where}."
                          ) from exc


def io_spec(model: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Inputs (name -> shape/dtype) and output names of an onnx-ir model."""
    inputs = {}
    for v in model.graph.inputs:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        inputs[v.name] = {"shape": dims, "dtype": np.dtype(v.dtype.numpy()).name}
    return inputs, [v.name for v in model.graph.outputs]


__all__ = ["Artifact", "Runner", "Target", "host_arch", "import_package", "io_spec",
           "ARTIFACT_FILE", "ARTIFACT_VERSION"]
