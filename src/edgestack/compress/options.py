"""Every compression method's options, their defaults and their checks, without torch.

:func:`check_options` is what :func:`edgestack.compress.compress` runs first, and what the
CLI runs before it loads a model, so that a bad argument fails in well under 2 s (importing
torch alone takes longer). The passes (``shift``, ``bitstack``, ``lowrank``, ``prune``) take
their ``OPTIONS`` and ``check_options`` from here.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from edgestack.errors import CompressError
from edgestack.formats.shift import MAX_BITS, MIN_BITS

METHODS = ("none", "prune", "shift", "lowrank", "bitstack")

COMMON_OPTIONS: dict[str, Any] = {"skip": (), "layers": None}
#: options of every method but "none" (see :func:`edgestack.compress.compress`)
CALIB_OPTIONS: dict[str, Any] = {"extra_texts": 0}


# --------------------------------------------------------------------------- value checks
def check_int(name: str, value: Any, lo: int, hi: int | None = None, hint: str = "") -> None:
    """Refuse ``value`` unless it is an int in ``[lo, hi]`` (``hi`` None: unbounded)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and lo <= value and (hi is None or value <= hi)
    if not ok:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise CompressError(
            f"option {name}: expected an integer {rng}, found {value!r}"
            + (f"; {hint}" if hint else "")
        )


def check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False,
                hint: str = "", hi_open: bool = False) -> None:
    """Refuse ``value`` unless it is a real number in ``[lo, hi]`` (``(lo`` if ``lo_open``,
    ``hi)`` if ``hi_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (lo < value if lo_open else lo <= value)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise CompressError(
            f"option {name}: expected a number in {rng}, found {value!r}"
            + (f"; {hint}" if hint else "")
        )


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
        raise CompressError(
            f"option {name}: expected one of {', '.join(repr(c) for c in choices)}, "
            f"found {value!r}"
        )


def check_skip(skip: Any) -> tuple[str, ...]:
    """``skip`` (module-name prefixes) as a tuple without trailing dots."""
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (tuple, list)) or not all(isinstance(s, str) for s in skip):
        raise CompressError(
            f"option skip: expected a tuple of module-name prefixes (str), found {skip!r}; "
            "pass e.g. skip=('pooler', 'encoder.layer.0')"
        )
    return tuple(s.rstrip(".") for s in skip)


def check_layers(layers: Any) -> tuple[str, ...] | None:
    """``layers`` (None: every supported layer; else the exact module names a pass may touch)
    as a sorted tuple without duplicates. Whether each name is a supported layer of the
    model is :func:`edgestack.compress.compress`'s check (it needs the model)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, (tuple, list, set, frozenset)) or not all(
            isinstance(s, str) and s for s in layers):
        raise CompressError(
            f"option layers: expected None or a collection of module names (non-empty str), "
            f"found {layers!r}; pass e.g. layers={{'encoder.layer.0.attention.self.query'}}"
        )
    if not layers:
        raise CompressError("option layers: the collection of module names is empty; pass "
                            "layers=None to compress every supported layer")
    return tuple(sorted(set(layers)))


# --------------------------------------------------------------------------- fine-tune
FINETUNE_PARAMS = ("all", "scales", "all+norms")
"""What the shift fine-tune trains (``finetune_params``)."""


def check_finetune_options(opts: dict[str, Any]) -> None:
    """Refuse out-of-range ``finetune_steps``, ``finetune_lr``, ``max_seconds`` and ``seed``
    (the fine-tune options shared by the shift and bitstack passes)."""
    check_int("finetune_steps", opts["finetune_steps"], 0, None)
    check_float("finetune_lr", opts["finetune_lr"], 0.0, 1.0, lo_open=True)
    if opts["max_seconds"] is not None:
        check_float("max_seconds", opts["max_seconds"], 0.0, 1e9, lo_open=True)
    check_int("seed", opts["seed"], 0, None)


# --------------------------------------------------------------------------- shift
SHIFT_OPTIONS: dict[str, Any] = {
    "bits": 4, "zero": False, "scale": "mse", "rounding": "auto", "bits_per_layer": None,
    "finetune_steps": 0, "finetune_lr": 1e-3, "max_seconds": None, "seed": 0,
    "sequential": False, "finetune_params": "all", "finetune_val": 0.1,
    "finetune_act_quant": False,
}
SCALES = ("mse", "maxabs")
ROUNDINGS = ("auto", "nearest", "gptq")


def check_shift(opts: dict[str, Any]) -> None:
    """Refuse out-of-range shift options."""
    check_int("bits", opts["bits"], MIN_BITS, MAX_BITS, "shift codes are 2..5 bits wide")
    check_choice("zero", opts["zero"], (False, True))
    check_choice("scale", opts["scale"], SCALES)
    check_choice("rounding", opts["rounding"], ROUNDINGS)
    bpl = opts["bits_per_layer"]
    if bpl is not None:
        if not isinstance(bpl, dict) or not all(isinstance(k, str) for k in bpl):
            raise CompressError(
                f"option bits_per_layer: expected a dict of module-name prefix -> bits, "
                f"found {bpl!r}; e.g. {{'encoder.layer.0': 5}}"
            )
        for name, b in bpl.items():
            check_int(f"bits_per_layer[{name!r}]", b, MIN_BITS, MAX_BITS)
    check_finetune_options(opts)
    check_choice("sequential", opts["sequential"], (False, True))
    check_choice("finetune_params", opts["finetune_params"], FINETUNE_PARAMS)
    check_float("finetune_val", opts["finetune_val"], 0.0, 0.5)
    check_choice("finetune_act_quant", opts["finetune_act_quant"], (False, True))


# --------------------------------------------------------------------------- bitstack
BITSTACK_OPTIONS: dict[str, Any] = {
    "n_blocks": 4, "k": None, "factor_bits": 0.25, "act_aware": True, "svd": "randomized",
    "device": "cpu", "signs": "auto", "refit": 0, "finetune_steps": 0, "finetune_lr": 5e-4,
    "max_seconds": None, "seed": 0,
}
SIGNS = ("auto", "gptq", "plain")
MAX_REFIT = 20
MAX_BLOCKS = 64


def check_bitstack(opts: dict[str, Any]) -> None:
    """Refuse out-of-range bitstack options (whether CUDA is there for ``device="cuda"`` is
    the pass's own check: it needs torch)."""
    check_int("n_blocks", opts["n_blocks"], 1, MAX_BLOCKS)
    if opts["k"] is not None:
        check_int("k", opts["k"], 1, None, "or k=None to choose it by shape")
    check_float("factor_bits", opts["factor_bits"], 0.0, 16.0, lo_open=True)
    check_choice("act_aware", opts["act_aware"], (True, False))
    check_choice("svd", opts["svd"], ("randomized", "exact"))
    check_choice("device", opts["device"], ("cpu", "cuda"))
    check_choice("signs", opts["signs"], SIGNS)
    check_int("refit", opts["refit"], 0, MAX_REFIT)
    check_finetune_options(opts)


# --------------------------------------------------------------------------- ratio
RATIO_MEANING = "the fraction of each layer's parameters removed"
"""What ``ratio`` means for every method that takes it (``lowrank``, ``prune``)."""


# --------------------------------------------------------------------------- lowrank
LOWRANK_OPTIONS: dict[str, Any] = {"rank": None, "ratio": None, "energy": None,
                                   "max_keep": 0.8, "structure": "lowrank",
                                   "monarch_blocks": 4, "act_aware": True}
DEFAULT_RATIO = 0.5
"""``ratio`` of ``lowrank`` when neither ``rank`` nor ``energy`` is given: half of each
layer's parameters removed. ``ratio`` used to be the fraction *kept* for ``lowrank`` (also
0.5 by default); the rank ``floor((1 - ratio) * m*n / (m+n))`` is the same, so the default
low-rank model is unchanged."""


def check_lowrank(opts: dict[str, Any]) -> None:
    """Refuse bad low-rank options; fill in the default ``ratio`` when no rank is given."""
    if opts["rank"] is not None and opts["ratio"] is not None:
        raise CompressError(
            f"lowrank: give rank or ratio, not both (found rank={opts['rank']!r}, "
            f"ratio={opts['ratio']!r})"
        )
    if opts["energy"] is not None:
        if opts["rank"] is not None or opts["ratio"] is not None:
            raise CompressError("lowrank: give energy alone, not with rank or ratio")
        check_float("energy", opts["energy"], 0.0, 1.0, lo_open=True)
        if opts["structure"] != "lowrank":
            raise CompressError("lowrank: energy= chooses low-rank ranks; use ratio= or "
                                "rank= with structure='monarch'")
    check_float("max_keep", opts["max_keep"], 0.0, 1.0, lo_open=True)
    check_choice("structure", opts["structure"], ("lowrank", "monarch"))
    check_int("monarch_blocks", opts["monarch_blocks"], 1, None)
    if opts["energy"] is None:  # energy= picks ranks itself; else rank= or ratio=
        if opts["rank"] is not None:
            check_int("rank", opts["rank"], 1, None, "or pass ratio= instead")
        else:
            if opts["ratio"] is None:
                opts["ratio"] = DEFAULT_RATIO
            check_float("ratio", opts["ratio"], 0.0, 1.0, hi_open=True,
                        hint=f"{RATIO_MEANING} (0.25 keeps about 75%)")
    check_choice("act_aware", opts["act_aware"], (True, False))


# --------------------------------------------------------------------------- prune
PRUNE_OPTIONS: dict[str, Any] = {"ratio": 0.25, "metric": "auto", "bias_compensation": True,
                                 "adaptive": False}
MAX_RATIO = 0.9
IMPORTANCE_METRICS = ("weight", "activation", "fluctuation")
"""Importance metric names (``metric``; the pass holds their torch code)."""


def check_prune(opts: dict[str, Any]) -> None:
    """Refuse out-of-range prune options."""
    check_float("ratio", opts["ratio"], 0.0, MAX_RATIO,
                hint=f"{RATIO_MEANING}: heads/channels removed per block")
    check_choice("metric", opts["metric"], ("auto", *IMPORTANCE_METRICS))
    check_choice("bias_compensation", opts["bias_compensation"], (True, False))
    check_choice("adaptive", opts["adaptive"], (False, True))


# --------------------------------------------------------------------------- methods
PASS_OPTIONS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = {
    "prune": (PRUNE_OPTIONS, check_prune),
    "shift": (SHIFT_OPTIONS, check_shift),
    "lowrank": (LOWRANK_OPTIONS, check_lowrank),
    "bitstack": (BITSTACK_OPTIONS, check_bitstack),
}
"""Each pass's ``(defaults, check)``."""


def check_method(method: Any) -> None:
    """Refuse an unknown method, naming the valid ones (and the closest)."""
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        raise CompressError(
            f"unknown compression method {method!r}; valid methods are {', '.join(METHODS)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


def method_options(method: str) -> dict[str, Any]:
    """The options ``method`` takes, with their defaults (``skip`` and ``layers`` included).

    Raises:
        CompressError: unknown method.
    """
    check_method(method)
    if method == "none":
        return dict(COMMON_OPTIONS)
    return {**PASS_OPTIONS[method][0], **CALIB_OPTIONS, **COMMON_OPTIONS}


def check_options(method: str, **options: Any) -> dict[str, Any]:
    """Check ``method`` and its ``options`` (names, types, ranges) without a model, so that a
    bad argument fails before any slow work; returns the options with their defaults.

    Raises:
        CompressError: unknown method or option, or an option out of range.
    """
    valid = method_options(method)
    unknown = [name for name in options if name not in valid]
    if unknown:
        name = unknown[0]
        owners = [m for m in METHODS[1:] if m != method and name in method_options(m)]
        hint = difflib.get_close_matches(name, list(valid), n=1)
        raise CompressError(
            f"method {method!r} has no option {name!r}; its options are "
            f"{', '.join(sorted(valid))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + (f"; {name!r} is an option of {', '.join(owners)}" if owners else "")
        )
    opts = {**valid, **options}
    opts["skip"] = check_skip(opts["skip"])
    opts["layers"] = check_layers(opts["layers"])
    if method != "none":
        check_int("extra_texts", opts["extra_texts"], 0, None)
        PASS_OPTIONS[method][1](opts)
    return opts
