"""Run Python and ONNX Runtime on aarch64 from an x86 machine, under qemu user-mode emulation.

The environment is built once by ``scripts/setup-arm-env.sh`` (``make arm-env``) into
``<repo>/.cache/arm64`` (or ``$EDGESTACK_ARM_ENV``)::

    READY           pins and versions, written only after the setup's smoke test passed
    sysroot/        an arm64 Debian CPython unpacked with dpkg -x; qemu's -L prefix
    site-packages/  aarch64 numpy and onnxruntime wheels, unzipped; the PYTHONPATH inside

This module only finds and uses that environment: it never installs anything. Each call
starts one emulated interpreter (about 5 s: importing numpy and onnxruntime is emulated too),
so batch work into few calls. Arrays cross the boundary as ``.npz`` files in a temporary
folder; :mod:`edgestack.targets._arm_runner` is the script run inside.

Emulated kernels are slow (a 256x256x256 fp32 MatMul takes about 0.3 s), so keep parity inputs
small. Emulated timings say nothing about a real ARM device's speed: use this for correctness
(aarch64 kernels against x86) only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgestack.core import atomic
from edgestack.core.ort import LEVELS
from edgestack.errors import TargetError

ENV_VAR = "EDGESTACK_ARM_ENV"
"""Environment variable naming the environment folder; overrides the search."""

BUILD_COMMAND = "make arm-env"
"""The command that builds the environment (it runs ``scripts/setup-arm-env.sh``)."""

QEMU = "qemu-aarch64-static"
OPTIMIZATION_LEVELS = tuple(LEVELS)
_RUNNER = Path(__file__).with_name("_arm_runner.py")
_DEFAULT_CPU = "cortex-a76"
_TAIL_LINES = 20


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = text.strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept) if kept else "    (empty)"


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class AArch64Emulator:
    """An aarch64 CPython with numpy and onnxruntime, run by ``qemu-aarch64-static``.

    Get one with :meth:`find`; construct directly only to point at a checked folder.

    Args:
        root: The environment folder (the one holding ``READY``).
        qemu: Path of the ``qemu-aarch64-static`` binary.
        python: Path of the aarch64 interpreter inside ``root/sysroot``.
        cpu: The qemu CPU model to emulate (the environment's ``/proc/cpuinfo`` matches it).
    """

    def __init__(self, root: Path, *, qemu: str, python: Path, cpu: str = _DEFAULT_CPU) -> None:
        self.root = Path(root)
        self.qemu = qemu
        self.python = Path(python)
        self.cpu = cpu
        self.sysroot = self.root / "sysroot"
        self.site_packages = self.root / "site-packages"
        self._versions: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"AArch64Emulator(root={str(self.root)!r}, cpu={self.cpu!r})"

    # ---- discovery ---------------------------------------------------------------------

    @classmethod
    def find(cls, root: str | os.PathLike[str] | None = None) -> AArch64Emulator:
        """Locate a built environment and check that it is usable.

        Looks at, in order: ``root`` when given; else ``$EDGESTACK_ARM_ENV`` when set; else
        ``.cache/arm64`` in the current directory or the nearest parent that has one; else
        ``.cache/arm64`` in the source checkout this module was imported from.

        Args:
            root: The environment folder itself (the one that holds ``READY``).

        Returns:
            An emulator bound to that folder.

        Raises:
            TargetError: The environment is missing, incomplete, or qemu is not installed;
                the message names the folder and says to run ``make arm-env``.
        """
        if root is not None:
            folder, origin = Path(root), "the root argument"
        elif os.environ.get(ENV_VAR):
            folder, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
        else:
            folder, origin = cls._search(), "the search from the current directory"
        return cls._open(folder, origin)

    @classmethod
    def available(cls) -> bool:
        """Whether :meth:`find` would succeed. Never raises, never runs the emulator."""
        try:
            cls.find()
        except TargetError:
            return False
        return True

    @staticmethod
    def _search() -> Path:
        cwd = Path.cwd()
        for folder in (cwd, *cwd.parents):
            if (folder / ".cache" / "arm64").is_dir():
                return folder / ".cache" / "arm64"
        # src/edgestack/targets/emulate.py -> the checkout root, for editable installs.
        checkout = Path(__file__).resolve().parents[3]
        if (checkout / "pyproject.toml").is_file():
            return checkout / ".cache" / "arm64"
        return cwd / ".cache" / "arm64"

    @classmethod
    def _open(cls, folder: Path, origin: str) -> AArch64Emulator:
        fix = f"build it with `{BUILD_COMMAND}` from the repository root"
        if ENV_VAR not in os.environ:
            fix += f" (or set ${ENV_VAR} to a folder built by scripts/setup-arm-env.sh)"
        ready = folder / "READY"
        if not ready.is_file():
            found = "no such folder" if not folder.exists() else "no READY file in it"
            raise TargetError(
                f"The aarch64 test environment is missing: expected a folder built by "
                f"scripts/setup-arm-env.sh at {folder} (from {origin}), found {found}. "
                f"To fix: {fix}."
            )
        info = cls._read_ready(ready)
        pythons = sorted((folder / "sysroot" / "usr" / "bin").glob("python3.[0-9]*"))
        site = folder / "site-packages"
        if not pythons or not (site / "onnxruntime").is_dir():
            raise TargetError(
                f"The aarch64 test environment at {folder} is incomplete: expected "
                f"sysroot/usr/bin/python3.* and site-packages/onnxruntime, found "
                f"{'no interpreter' if not pythons else 'no onnxruntime'}. "
                f"To fix: delete {folder} and run `{BUILD_COMMAND}`."
            )
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise TargetError(
                f"{QEMU} is not on PATH: the aarch64 environment at {folder} needs it to run. "
                f"To fix: run `{BUILD_COMMAND}` (it installs Debian's qemu-user-static), or "
                f"`apt-get install qemu-user-static`."
            )
        return cls(folder, qemu=qemu, python=pythons[0], cpu=info.get("qemu_cpu", _DEFAULT_CPU))

    @staticmethod
    def _read_ready(path: Path) -> dict[str, str]:
        info: dict[str, str] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key and not key.startswith("pins"):
                info[key.strip()] = value.strip()
        return info

    # ---- running -----------------------------------------------------------------------

    def command(self, *python_args: str) -> list[str]:
        """The argv that runs the emulated interpreter with ``python_args``.

        ``-S`` keeps the host's site-packages folders out of ``sys.path`` (qemu's ``-L``
        would otherwise let the aarch64 interpreter see paths that exist only on the host).
        """
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.sysroot), str(self.python), "-S",
                *python_args]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment variables of an emulated run: a clean set, not the caller's.

        The caller's ``PYTHON*`` variables belong to the host interpreter (for example
        ``PYTHONDONTWRITEBYTECODE``, which would make every start recompile the stdlib).
        """
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.site_packages),
            "PYTHONNOUSERSITE": "1",
        }
        if "TMPDIR" in os.environ:
            env["TMPDIR"] = os.environ["TMPDIR"]
        env.update(extra or {})
        return env

    def run_python(
        self,
        code_or_script: str | os.PathLike[str],
        args: Sequence[str] = (),
        timeout: float = 300.0,
        *,
        check: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run Python code or a script on the emulated aarch64 interpreter.

        Args:
            code_or_script: Python source (a ``str``), or a script file (a path object:
                ``pathlib.Path``); host paths are visible inside unchanged.
            args: Arguments after the code or script (``sys.argv[1:]``).
            timeout: Seconds before the run is killed.
            check: Raise :class:`TargetError` when the exit status is not 0.
            env: Extra environment variables for the run.

        Returns:
            The finished process, with ``stdout`` and ``stderr`` captured as text.

        Raises:
            TargetError: The run timed out, qemu could not start, or (with ``check``) the
                process failed; the message ends with the tail of its stderr.
        """
        if isinstance(code_or_script, os.PathLike):
            what = f"script {os.fspath(code_or_script)}"
            argv = self.command(os.fspath(code_or_script), *args)
        else:
            what = "Python code"
            argv = self.command("-c", code_or_script, *args)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout,
                env=self.environment(env), stdin=subprocess.DEVNULL, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (
                exc.stderr or "")
            raise TargetError(
                f"Running {what} under aarch64 emulation timed out: expected it to finish "
                f"within {timeout:g} s, it was still running and was killed. Emulation is "
                f"roughly 10-50x slower than native and each start takes seconds. To fix: "
                f"pass a larger timeout, or a smaller model or input. Its stderr so far:\n"
                f"{_tail(stderr)}"
            ) from exc
        except OSError as exc:
            raise TargetError(
                f"Could not start {self.qemu}: {exc}. To fix: run `{BUILD_COMMAND}`."
            ) from exc
        if check and proc.returncode != 0:
            raise TargetError(
                f"Running {what} under aarch64 emulation failed: expected exit status 0, "
                f"found {_describe_status(proc.returncode)}. Its stderr ends with:\n"
                f"{_tail(proc.stderr)}"
            )
        return proc

    def versions(self) -> dict[str, str]:
        """Report what runs inside: ``python``, ``numpy``, ``onnxruntime``, ``machine``.

        Also ``cpu`` (the emulated qemu CPU model). Runs the emulator once, then caches.

        Raises:
            TargetError: The emulated interpreter could not import numpy or onnxruntime.
        """
        if self._versions is None:
            code = (
                "import json, platform, numpy, onnxruntime\n"
                "print(json.dumps({'python': platform.python_version(),"
                " 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__,"
                " 'machine': platform.machine()}))\n"
            )
            proc = self.run_python(code, timeout=300.0, check=True)
            found = json.loads(proc.stdout.strip().splitlines()[-1])
            found["cpu"] = self.cpu
            self._versions = found
        return dict(self._versions)

    def run_onnx(
        self,
        model_path: str | os.PathLike[str],
        feeds: Mapping[str, np.ndarray],
        *,
        threads: int = 1,
        optimization: str = "all",
        timeout: float = 600.0,
    ) -> dict[str, np.ndarray]:
        """Run an ONNX (``.onnx``) or ORT-format (``.ort``) model with aarch64 ONNX Runtime.

        Args:
            model_path: The model file; a ``.ort`` suffix loads it as an ORT format model.
                External data files must sit next to it, as for native ONNX Runtime.
            feeds: Input name to array. Arrays must have a numeric, bool or fixed-width
                string dtype (they travel through ``.npz`` without pickling).
            threads: ``intra_op_num_threads`` of the session.
            optimization: Graph optimization level: ``disable``, ``basic``, ``extended``
                or ``all``.
            timeout: Seconds before the run is killed.

        Returns:
            Output name to array, for every graph output, in graph order.

        Raises:
            TargetError: Bad arguments, the model failed to load or run inside (the message
                has ONNX Runtime's error), the emulated process crashed (with the tail of its
                stderr), or it timed out.
        """
        (result,) = self.run_many([(model_path, feeds)], threads=threads,
                                  optimization=optimization, timeout=timeout)
        if isinstance(result, TargetError):
            raise result
        return result

    def run_many(
        self,
        jobs: Sequence[tuple[str | os.PathLike[str], Mapping[str, np.ndarray]]],
        *,
        threads: int = 1,
        optimization: str = "all",
        timeout: float = 900.0,
    ) -> list[dict[str, np.ndarray] | TargetError]:
        """Run several ``(model, feeds)`` jobs in ONE emulated process (one ~5 s start).

        Args:
            jobs: ``(model path, feeds)`` pairs; the same model may appear several times.
            threads, optimization: as for :meth:`run_onnx`, for every job.
            timeout: Seconds for the whole batch.

        Returns:
            Per job, in order: the outputs (name -> array), or the :class:`TargetError` that
            job raised (a load or run failure inside); a crash of the process raises.

        Raises:
            TargetError: bad arguments, a missing model file, a crash, or the timeout.
        """
        if optimization not in OPTIMIZATION_LEVELS:
            raise TargetError(
                f"Unknown optimization level {optimization!r}: expected one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}."
            )
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise TargetError(f"threads must be a positive int, found {threads!r}.")
        with atomic.scratch("arm") as folder:
            models, specs = [], []
            for i, (model_path, feeds) in enumerate(jobs):
                model = Path(model_path)
                if not model.is_file():
                    raise TargetError(
                        f"Cannot run {model} under aarch64 emulation: expected an ONNX or ORT "
                        f"model file, found {'a folder' if model.exists() else 'no such file'}."
                    )
                names = list(feeds)
                arrays = [np.asarray(feeds[name]) for name in names]
                for name, array in zip(names, arrays, strict=True):
                    if array.dtype.hasobject:
                        raise TargetError(
                            f"Feed {name!r} has dtype object, which cannot cross to the "
                            f"emulated process without pickling: expected a numeric, bool or "
                            f"fixed-width string array. To fix: convert it, e.g. "
                            f"np.asarray(x, dtype=str)."
                        )
                np.savez(folder / f"feeds{i}.npz",
                         **{f"arr_{k}": a for k, a in enumerate(arrays)})
                (folder / f"meta{i}.json").write_text(json.dumps({"feeds": names}),
                                                      encoding="utf-8")
                models.append(model)
                specs.append({"model": str(model.resolve()), "feeds": str(folder / f"feeds{i}.npz"),
                              "out": str(folder / f"out{i}.npz"),
                              "meta": str(folder / f"meta{i}.json"), "threads": threads,
                              "optimization": LEVELS[optimization]})
            (folder / "jobs.json").write_text(json.dumps(specs), encoding="utf-8")
            proc = self.run_python(_RUNNER, ["--jobs", str(folder / "jobs.json")],
                                   timeout=timeout)
            results: list[dict[str, np.ndarray] | TargetError] = []
            for i, (model, spec) in enumerate(zip(models, specs, strict=True)):
                meta = json.loads(Path(spec["meta"]).read_text(encoding="utf-8"))
                if "error" in meta:
                    err = meta["error"]
                    results.append(TargetError(
                        f"ONNX Runtime {self._ready_version()} on aarch64 failed at stage "
                        f"{err['stage']!r} for {model}: {err['type']}: {err['message']}"
                    ))
                    continue
                if "outputs" not in meta:
                    job = f" (job {i + 1} of {len(specs)})" if len(specs) > 1 else ""
                    raise TargetError(
                        f"The emulated aarch64 ONNX Runtime process crashed on {model}{job}: "
                        f"expected exit status 0 with outputs, found "
                        f"{_describe_status(proc.returncode)}. Its stderr ends with:\n"
                        f"{_tail(proc.stderr)}\nTo fix: rerun with optimization='disable' or "
                        f"threads=1 to narrow it down; if every model crashes, rebuild the "
                        f"environment with `{BUILD_COMMAND}`."
                    )
                with np.load(spec["out"], allow_pickle=False) as npz:
                    results.append({name: npz[f"arr_{k}"]
                                    for k, name in enumerate(meta["outputs"])})
            return results

    def _ready_version(self) -> str:
        try:
            return self._read_ready(self.root / "READY").get("onnxruntime", "")
        except OSError:
            return ""
