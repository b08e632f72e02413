"""Cold load time and peak memory of one bench subject, measured in a fresh process.

``python -m edgestack.profiler.probe SPEC.json`` loads the subject described by the JSON
file (see :func:`edgestack.profiler.bench.Subject.spec`), runs the feeds stored next to it
``calls`` times and prints one JSON object::

    {"import_rss": bytes, "load_s": seconds, "peak_rss": bytes, "increase": bytes}

``import_rss`` is the peak resident set size after importing the backend (before loading);
``peak_rss`` is the process's peak after loading and running; ``increase`` is their
difference: what the model itself costs in memory. Peak RSS is the kernel's high-water mark
(``VmHWM`` on Linux, ``ru_maxrss`` elsewhere).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) * (1 if sys.platform == "darwin" else 1024)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    import numpy as np

    from edgestack.profiler.bench import open_subject, preload  # lazy: numpy at import

    preload(spec)
    before = peak_rss()
    t0 = time.perf_counter()
    handle = open_subject(spec)
    load_s = time.perf_counter() - t0
    with np.load(spec["feeds"], allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    for _ in range(int(spec.get("calls", 3))):
        handle.infer(feeds)
    peak = peak_rss()
    handle.release()
    print(json.dumps({"import_rss": before, "load_s": load_s, "peak_rss": peak,
                      "increase": peak - before}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
