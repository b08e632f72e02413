"""BitStack's own block importance -> the imported model's BitStack order.

Upstream: github.com/xinghaow99/BitStack, ``bitstack/main.py`` (``--score_importance``,
``--generate_compression_configs``), ``bitstack/utils/model_utils.py``
(``sort_layers_and_bits_average``, ``generate_configs``, ``retrieve_compression_config``),
``bitstack/utils/decompose.py`` (layer names). Both files sit beside the decomposed model
(``save_pretrained`` folder; the Hugging Face checkpoints ship ``compression_config.json``).

Layer names: ``layer.<i>.<name>`` for linear ``<name>`` of decoder block ``i``
(``layer.0.self_attn.q_proj``); matched to the one BitStack layer of the model whose name ends
with ``.<i>.<name>`` (``model.layers.0.self_attn.q_proj``).

- ``reduced_ppl_average.json``: ``{"original_ppl": float, "reduced_ppl": [{"bit": b,
  "ppls": [{"layer": name, "ppl": float}, ...]}, ...]}`` for ``b = 1 .. niter-1``: with every
  layer at ``b`` blocks, the calibration perplexity when only ``layer`` gets block ``b``
  (0-based) too; ``NaN`` where it diverged. ``sort_layers_and_bits_average`` orders each level
  by perplexity, lowest first (a NaN takes the next level's value plus the level's largest),
  levels in turn: the order in which blocks are added beyond the first.
- ``compression_config.json``: ``[{"memory": bytes, "layers": {name: blocks}}, ...]``: the
  first config has every layer at 1 block, each next one adds one block to one layer in that
  order (``generate_configs``); upstream's loader takes the largest config within
  ``--max_memory_MB``. It is used when present (it is what upstream loads); the perplexity file
  otherwise.

Either gives the global order: every layer's block 0 (model order), then the added blocks in
upstream's order. That is level-major, as edgestack's own order
(:func:`edgestack.compress.bitstack.check_order`), so it becomes the model's
``edgestack_bitstack_order``: the exporter writes it as ONNX metadata and the packer stores the
blocks in it, every runtime tier a prefix (upstream's memory-ordered stack).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from edgestack.compress.bitstack import check_order
from edgestack.compress.importers.common import ImportReport
from edgestack.compress.layers import BitStackWeight, CompressedLayer
from edgestack.errors import CheckpointError, CompressError, InternalError

CONFIG_FILE = "compression_config.json"
PPL_FILE = "reduced_ppl_average.json"
IMPORTANCE_FILES = (CONFIG_FILE, PPL_FILE)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read BitStack importance file {str(path)!r} ({type(exc).__name__}: "
            f"{exc}); expected the JSON BitStack's main.py writes; remove or fix it"
        ) from None


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} ({str(path)!r}): {what}; expected the file BitStack writes "
        f"(--generate_compression_configs / --score_importance); remove it to import "
        "without BitStack's order, or fix it"
    )


def read_order(path: Path) -> list[tuple[str, int]]:
    """The block order (upstream layer names) of a ``compression_config.json`` (a list) or a
    ``reduced_ppl_average.json`` (a dict), whatever the file is called."""
    data = _read_json(path)
    return order_from_ppls(data, path) if isinstance(data, dict) else \
        order_from_configs(data, path)


def order_from_configs(configs: Any, path: Path) -> list[tuple[str, int]]:
    """The block order (upstream names) that ``compression_config.json`` adds blocks in."""
    if not (isinstance(configs, list) and configs and all(
            isinstance(c, dict) and isinstance(c.get("layers"), dict)
            and isinstance(c.get("memory"), (int, float)) for c in configs)):
        raise _bad(path, "expected a non-empty list of {\"memory\": bytes, \"layers\": "
                         "{layer: blocks}}")
    configs = sorted(configs, key=lambda c: c["memory"])
    first = configs[0]["layers"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
               for n in first.values()):
        raise _bad(path, "block counts must be integers >= 1")
    order = [(str(layer), b) for b in range(max(first.values(), default=0))
             for layer, n in first.items() if b < n]
    prev = dict(first)
    for i, cfg in enumerate(configs[1:], 1):
        cur = cfg["layers"]
        grown = [k for k in cur if cur[k] != prev.get(k)]
        if set(cur) != set(prev) or len(grown) != 1 or cur[grown[0]] != prev[grown[0]] + 1:
            raise _bad(path, f"config #{i} (by memory) differs from the one before in "
                             f"{grown[:3] or 'its layers'}: expected one layer with one block "
                             "more (as generate_configs writes)")
        order.append((str(grown[0]), int(prev[grown[0]])))
        prev = dict(cur)
    return order


def _isnan(x: Any) -> bool:
    return str(x).lower() == "nan"


def order_from_ppls(data: Any, path: Path) -> list[tuple[str, int]]:
    """The block order (upstream names) of ``reduced_ppl_average.json``, sorted as
    ``sort_layers_and_bits_average`` sorts it, after every layer's block 0."""
    bits = data.get("reduced_ppl") if isinstance(data, dict) else None
    if not (isinstance(bits, list) and bits and all(
            isinstance(b, dict) and isinstance(b.get("ppls"), list) and b["ppls"] and all(
                isinstance(e, dict) and "layer" in e and isinstance(e.get("ppl"), (int, float))
                and not isinstance(e["ppl"], bool) for e in b["ppls"])
            for b in bits)):
        raise _bad(path, "expected {\"reduced_ppl\": [{\"bit\": b, \"ppls\": [{\"layer\": "
                         "name, \"ppl\": float}, ...]}, ...]}")
    first = [str(e["layer"]) for e in bits[0]["ppls"]]
    for b, level in enumerate(bits):
        if "bit" in level and level["bit"] != b + 1:
            raise _bad(path, f"entry #{b} is for bit {level['bit']!r}, expected {b + 1}")
        if [str(e["layer"]) for e in level["ppls"]] != first:
            raise _bad(path, f"bit {b + 1} lists other layers than bit 1")
    ppl = [[e["ppl"] for e in level["ppls"]] for level in bits]
    # sort_layers_and_bits_average: a NaN takes the next bit's perplexity plus the largest
    # of its own bit (0 when that is NaN), from the last bit down
    for b in reversed(range(len(bits))):
        top = max(ppl[b])  # upstream: max(bit_ppls, key=ppl), NaN comparisons and all
        if _isnan(top):
            top = 0
        for i, value in enumerate(ppl[b]):
            if _isnan(value):
                if b == len(bits) - 1:
                    raise _bad(path, f"layer {first[i]!r} has perplexity NaN at the last bit "
                                     "(BitStack refuses that too: 'Last bit is nan')")
                ppl[b][i] = ppl[b + 1][i] + top
    order = [(name, 0) for name in first]
    for b in range(len(bits)):
        ranked = sorted(range(len(first)), key=lambda i: ppl[b][i])  # stable, as upstream
        order += [(first[i], b + 1) for i in ranked]
    return order


def _model_names(upstream: list[str], layers: list[str], path: Path) -> dict[str, str]:
    """Upstream layer name -> the model's BitStack layer it names."""
    out: dict[str, str] = {}
    for name in upstream:
        rest = name[len("layer."):] if name.startswith("layer.") else name
        found = [n for n in layers if n == rest or n.endswith("." + rest)]
        if len(found) != 1:
            raise CheckpointError(
                f"{path.name}: BitStack layer {name!r} names "
                + (f"{len(found)} layers of the model ({', '.join(found[:3])})" if found else
                   "no BitStack layer of the model")
                + f"; expected one layer named like '*.{rest}' among "
                f"{', '.join(repr(n) for n in layers[:4])}{', ...' if len(layers) > 4 else ''}; "
                "check that the file belongs to this checkpoint"
            )
        out[name] = found[0]
    return out


def find_files(where: Path | None, importance: Any) -> list[Path]:
    """The importance files to read: ``importance`` (a file or a folder), else those beside
    the checkpoint (``where``); the configs first."""
    if importance is not None:
        path = Path(importance)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(
                f"bitstack: importance {str(path)!r} does not exist; pass BitStack's "
                f"{CONFIG_FILE} or {PPL_FILE}, or the folder holding them")
        where = path
    if where is None:
        return []
    return [where / f for f in IMPORTANCE_FILES if (where / f).is_file()]


def apply_importance(model: nn.Module, where: Path | None, report: ImportReport,
                     importance: Any = None) -> None:
    """Set ``model.edgestack_bitstack_order`` from BitStack's importance files.

    Args:
        model: the imported model (its BitStack layers already replaced).
        where: the folder the checkpoint came from (None: an in-memory state dict).
        report: gets ``details["importance_order"]`` and warnings.
        importance: a file or folder given by the caller (default: beside the checkpoint).

    Raises:
        CheckpointError: a file is malformed, names layers the model does not have, or does
            not cover every block the checkpoint holds.
    """
    counts = {name: m.weight_module.n_blocks for name, m in model.named_modules()
              if isinstance(m, CompressedLayer) and isinstance(m.weight_module, BitStackWeight)}
    if not counts:
        return
    files = find_files(where, importance)
    if not files:
        report.warnings.append(
            f"bitstack: no {CONFIG_FILE} or {PPL_FILE} beside the checkpoint, so no BitStack "
            "importance order: a device package stores the blocks level-major in graph order; "
            "copy BitStack's files next to the weights (or pass importance=...)")
        return
    path = files[0]
    upstream = read_order(path)
    names = _model_names(list(dict.fromkeys(n for n, _ in upstream)), list(counts), path)
    listed = {(names[n], b) for n, b in upstream}
    missing = sorted((n, b) for n, k in counts.items() for b in range(k) if (n, b) not in listed)
    if missing:
        raise CheckpointError(
            f"{path.name}: BitStack's order does not cover {len(missing)} block(s) the "
            f"checkpoint holds, e.g. {missing[:3]}; expected the file written for this "
            f"checkpoint (every layer, up to its {max(counts.values())} blocks)")
    order = [(names[n], b) for n, b in upstream if b < counts[names[n]]]
    beyond = len(upstream) - len(order)
    try:
        check_order(order, counts)
    except CompressError as exc:
        raise InternalError(f"bitstack: upstream order is not a valid tier order: {exc}") from None
    model.edgestack_bitstack_order = order
    report.details["importance_order"] = {
        "source": str(path), "blocks": len(order),
        "first_added": [list(x) for x in order[len(counts):len(counts) + 5]],
    }
    if beyond:
        report.warnings.append(
            f"bitstack: {path.name} lists {beyond} block(s) beyond those the checkpoint holds; "
            "they were left out of the order")
    if len(files) > 1:
        other = read_order(files[1])
        if [(names.get(n, n), b) for n, b in other
                if n in names and b < counts[names[n]]] != order:
            report.warnings.append(
                f"bitstack: {files[1].name} ranks the blocks differently from {path.name}; "
                f"used {path.name} (what BitStack's loader reads)")
