"""Resolving a MODEL argument to ``(model, example_inputs)``.

A model source is one of, in this order:

1. an existing folder: a Hugging Face model folder (config.json + weights);
2. ``module:factory`` (or ``module.py:factory``): a callable returning ``(model, inputs)``;
3. a built-in model name from :mod:`edgestack.zoo` (``minilm``, ``gpt2-tiny``, ...);
4. a Hugging Face Hub id (``org/name``): its snapshot in the local Hugging Face cache, else
   downloaded when the network allows (``HF_HUB_OFFLINE=1``: the cache only), with a clear
   error when neither works.

With ``from_`` set, the source is an upstream compressed checkpoint (a folder or a weights
file) read by :mod:`edgestack.compress.importers`; ``base`` (any source of the kinds above)
then gives the architecture and example inputs when the checkpoint has no config.json (a
folder by its config.json alone: it may hold no weights).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgestack import zoo
from edgestack.errors import CheckpointError, EdgestackError


@dataclass
class ModelSource:
    """A loaded model with the example inputs used to trace and check it.

    Attributes:
        model: the torch model, eval mode.
        inputs: keyword inputs, ``model(**inputs)``.
        description: what was loaded, for reports.
        details: anything the loader wants to report (e.g. an importer's report).
    """

    model: Any
    inputs: dict[str, Any]
    description: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def text_folder(self) -> Path | None:
        """The folder holding the model's ``tokenizer.json`` (a Hugging Face text model
        loaded from a folder, or the built-in ``minilm``), else None."""
        from edgestack.compress.calib import tokenizer_folder  # lazy: numpy at import

        return tokenizer_folder(self.model)

    def calibration(self, n: int | None = None, seq: int = 64, file: str | None = None
                    ) -> tuple[list[dict], str]:
        """Calibration batches for :func:`~edgestack.compress.compress` and what they are.

        A text model with a tokenizer (:attr:`text_folder`) gets the first ``n`` sentences
        (default: all 836) of edgestack's shipped corpus
        (:func:`edgestack.compress.calib.text_calib`, ``seq`` tokens at most, batches of 8):
        real text, where the random example tokens would give the passes meaningless
        activation statistics (BitStack 4 blocks on MiniLM: cosine 0.921 on the example
        inputs, 0.952 on 128 corpus sentences). Any other model, or ``n == 0``, gets its
        example inputs. A ``file`` (:func:`edgestack.compress.calib.read_calib_file`: text
        lines, JSONL, or an ``.npz`` of model inputs) replaces both: its texts are tokenized
        like the corpus (``n``: the first ``n``), its arrays fed in batches of 8.

        Returns:
            ``(batches, description)``.

        Raises:
            CompressError: ``n`` is negative (or not an integer).
        """
        if n is not None:
            from edgestack.compress.options import check_int  # lazy: numpy at import

            check_int("n (calibration sentences)", n, 0, None,
                      "0 uses the example inputs")
        folder = self.text_folder
        if file is not None:
            return self._file_calibration(file, n, seq, folder)
        if folder is None or n == 0:
            return [self.inputs], "the example inputs"
        from edgestack.compress.calib import text_calib  # lazy: numpy at import

        batches = self._like_inputs(text_calib(folder, n=n, seq=seq, batch=8))
        count = sum(int(b["input_ids"].shape[0]) for b in batches)
        return batches, f"{count} sentences of the shipped corpus"

    def _like_inputs(self, batches: list[dict]) -> list[dict]:
        """Token batches with only the inputs the model's example inputs have: the tokenizer
        also gives ``token_type_ids``, which a GPT-2 would add to its embeddings (its example
        inputs, the exported graph's, have none; a BERT takes zeros either way)."""
        keep = set(self.inputs)
        return [{k: v for k, v in b.items() if k in keep} for b in batches]

    def _file_calibration(self, file: str, n: int | None, seq: int, folder: Path | None
                          ) -> tuple[list[dict], str]:
        import torch

        from edgestack.compress.calib import read_calib_file, text_calib  # lazy: numpy at import

        kind, data = read_calib_file(file)
        if kind == "texts":
            if folder is None:
                raise EdgestackError(
                    f"calibration file {file!r} holds text, but {self.description} has no "
                    "tokenizer.json to tokenize it; give an .npz of its inputs "
                    f"({', '.join(self.inputs)}) instead")
            batches = self._like_inputs(text_calib(folder, data, n=n or None, seq=seq,
                                                   batch=8))
            count = sum(int(b["input_ids"].shape[0]) for b in batches)
            return batches, f"{count} texts from {file}"
        missing = sorted(set(self.inputs) - set(data))
        extra = sorted(set(data) - set(self.inputs))
        if missing or extra:
            raise EdgestackError(f"calibration file {file!r}: expected arrays named like the "
                                 f"model's inputs {sorted(self.inputs)}; missing {missing}, "
                                 f"unknown {extra}")
        total = len(next(iter(data.values())))
        batches = [{k: torch.from_numpy(v[i:i + 8]) for k, v in data.items()}
                   for i in range(0, total, 8)]
        return batches, f"{total} examples from {file}"


DEFAULT_SEQ = 128
"""Example sequence length of a token model whose positions allow it."""


def example_inputs(model: Any, batch: int, seq: int | None) -> dict[str, Any]:
    """Example inputs that follow a Hugging Face model's config: ``pixel_values``
    ``[batch, channels, size, size]`` for an image model; else
    :func:`edgestack.zoo.token_inputs`, ``seq`` long (default: 128, or the model's
    position count when smaller: ``max_position_embeddings`` / ``n_positions``)."""
    import torch

    cfg = getattr(model, "config", None)
    size, channels = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
    if getattr(cfg, "vocab_size", None) is None and size and channels:
        side = size if isinstance(size, int) else int(size[0])
        return {"pixel_values": torch.randn(batch, int(channels), side, side,
                                             generator=torch.Generator().manual_seed(0))}
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise EdgestackError(
            f"cannot make example inputs for {type(model).__name__}: its config has no "
            "vocab_size (nor image_size and num_channels); pass a module:factory that "
            "returns (model, inputs) instead"
        )
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions",
                                                                         None)
    if seq is None:
        seq = min(DEFAULT_SEQ, int(positions)) if positions else DEFAULT_SEQ
    elif positions and seq > int(positions):
        raise EdgestackError(f"--seq {seq} is longer than the model's {positions} positions; "
                             f"pass --seq {positions} or less (or leave it out)")

    return zoo.token_inputs(int(vocab), batch, seq)


def _factory(spec: str) -> Any:
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise EdgestackError(f"factory file {mod_name!r} does not exist")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[path.stem] = module
        try:
            mspec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(path.stem, None)
            raise _user_code_error(f"factory file {mod_name!r} failed to load", exc,
                                   f"python {mod_name}") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise EdgestackError(
                f"cannot import module {mod_name!r} for factory {spec!r}: {exc}; check the "
                "module is on PYTHONPATH (or pass path/to/file.py:factory)"
            ) from None
        except (Exception, SystemExit) as exc:
            raise _user_code_error(f"module {mod_name!r} of factory {spec!r} failed to load",
                                   exc, f"python -c 'import {mod_name}'") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise EdgestackError(
            f"module {mod_name!r} has no callable {fn_name!r}; expected module:factory "
            "returning (model, example_inputs)"
        )
    return fn


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face Hub model id, ``org/name``."""


def hub_folder(repo_id: str) -> Path:
    """The local folder of Hugging Face Hub model ``repo_id``: its snapshot in the local
    cache (``HF_HOME`` / ``HF_HUB_CACHE``), else downloaded (config, weights, tokenizer)
    unless ``HF_HUB_OFFLINE`` is set.

    Raises:
        CheckpointError: not in the cache and it cannot be downloaded (offline, no network,
            no such model); the message says which and how to fix it.
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=patterns))
    except Exception:  # not in the cache (huggingface_hub raises its own types)
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        why = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}: {why}); "
            "download it where there is a network (`huggingface-cli download "
            f"{repo_id}`) and copy the cache, or pass the model folder"
        ) from None


def _user_code_error(what: str, exc: BaseException, rerun: str) -> EdgestackError:
    """An error raised by the user's own code (a factory), reported as such: one line naming
    the exception, and how to see its traceback."""
    why = " ".join(str(exc).split())[:300]
    return EdgestackError(f"{what}: {type(exc).__name__}{': ' + why if why else ''}; this is "
                          f"an error in that code, not in edgestack: fix it (`{rerun}` shows "
                          "the traceback)")


def _call_factory(fn: Any, spec: str, batch: int | None, seq: int | None,
                  user: bool = True, task: str | None = None) -> ModelSource:
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if task is not None and "task" in params:
        kwargs["task"] = task
    if batch is not None and "batch" in params:
        kwargs["batch"] = batch
    if seq is not None and "seq" in params:
        kwargs["seq"] = seq
    if user:
        try:
            result = fn(**kwargs)
        except EdgestackError:
            raise
        except (Exception, SystemExit) as exc:
            mod, _, name = spec.rpartition(":")
            rerun = (f"python -c 'import runpy; runpy.run_path(\"{mod}\")[\"{name}\"]()'"
                     if mod.endswith(".py") else f"python -c 'import {mod}; {mod}.{name}()'")
            raise _user_code_error(f"factory {spec!r} raised", exc, rerun) from None
    else:
        result = fn(**kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EdgestackError(
            f"factory {spec!r} must return (model, example_inputs), found "
            f"{type(result).__name__}"
        )
    model, inputs = result
    if not (callable(getattr(model, "eval", None)) and callable(getattr(model, "forward", None))):
        raise EdgestackError(
            f"factory {spec!r} must return (model, example_inputs) with a torch.nn.Module "
            f"model, found {type(model).__name__}"
        )
    if isinstance(inputs, (tuple, list)):
        names = list(inspect.signature(model.forward).parameters)
        inputs = dict(zip(names, inputs, strict=False))
    if not isinstance(inputs, dict):
        raise EdgestackError(
            f"factory {spec!r}: example_inputs must be a dict of tensors or a tuple, found "
            f"{type(inputs).__name__}"
        )
    return ModelSource(model.eval(), inputs, spec)


def load_source(
    spec: str,
    *,
    from_: str | None = None,
    base: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    task: str | None = None,
    import_options: Mapping[str, Any] | None = None,
) -> ModelSource:
    """Load a model source (see the module docstring).

    Args:
        spec: folder, ``module:factory``, or built-in name; with ``from_``, the checkpoint.
        from_: upstream checkpoint kind (``deepshift``, ``welore``, ``flap``, ``bitstack``).
        base: architecture source for a checkpoint without config.json.
        batch, seq: example-input sizes for token models (defaults 1, and 128 or the
            model's position count if smaller) and for factories that take them.
        task: a Hugging Face folder's task (:data:`edgestack.compress.hf.TASKS`; default:
            from the class it was saved as, so its head comes with it); also passed to a
            factory (built-in or ``module:factory``) that takes a ``task`` parameter.
        import_options: with ``from_``, the importer's own options
            (:func:`edgestack.compress.importers.load_checkpoint`: deepshift ``weight_bits``,
            ``clamp``; bitstack ``importance``).

    Raises:
        EdgestackError: the source cannot be found or loaded; the message says why.
    """
    if from_ is not None:
        return _load_checkpoint(spec, from_, base, batch, seq, task, import_options)

    path = Path(spec)
    if path.is_dir():
        from edgestack.compress.hf import load_hf_model  # lazy: numpy at import

        model = load_hf_model(path, task=task)
        return ModelSource(model, example_inputs(model, batch or 1, seq), str(path))
    if ":" in spec and not path.exists():
        return _call_factory(_factory(spec), spec, batch, seq, task=task)
    if spec in zoo.MODELS:
        return _call_factory(zoo.MODELS[spec], spec, batch, seq, user=False, task=task)
    if path.exists():
        raise CheckpointError(
            f"{spec!r} is a file, not a model folder; a single weights file needs "
            "--from {deepshift,welore,flap,bitstack} (and --base for the architecture)"
        )
    if HUB_ID.fullmatch(spec):
        from edgestack.compress.hf import load_hf_model  # lazy: numpy at import

        folder = hub_folder(spec)
        model = load_hf_model(folder, task=task)
        return ModelSource(model, example_inputs(model, batch or 1, seq), spec)
    raise CheckpointError(
        f"model {spec!r} not found: expected an existing Hugging Face model folder, "
        f"module:factory, a built-in model ({', '.join(zoo.MODELS)}), or a Hugging Face "
        "Hub id (org/name)"
    )


def _load_checkpoint(spec: str, kind: str, base: str | None, batch: int | None,
                     seq: int | None, task: str | None = None,
                     options: Mapping[str, Any] | None = None) -> ModelSource:
    """An upstream checkpoint read by its importer into ``base``'s architecture. A ``base``
    folder gives the architecture by its config.json alone (no weights are read from it, and
    it may hold none: the checkpoint has them all); any other base is loaded as a source."""
    from edgestack.compress.importers import load_checkpoint  # lazy: torch at import

    if base is not None and Path(base).is_dir():
        from edgestack.compress.hf import model_from_config  # lazy: numpy at import

        arch = model_from_config(base, task=task)
        base_src = ModelSource(arch, example_inputs(arch, batch or 1, seq),
                               f"architecture of {base}")
    else:
        base_src = load_source(base, batch=batch, seq=seq) if base is not None else None
    model, report = load_checkpoint(kind, spec, base=base_src.model if base_src else None,
                                    **dict(options or {}))
    inputs = (base_src.inputs if base_src is not None
              else example_inputs(model, batch or 1, seq))
    return ModelSource(model.eval(), inputs, f"{kind} checkpoint {spec}",
                       {"import": report.to_dict()})
