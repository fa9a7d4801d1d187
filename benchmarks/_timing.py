"""The timing convention of every benchmark script (imported from the scripts' own folder).

One statistic everywhere: the **median** of ``repeat`` timed calls, after one untimed
warm-up call (which pages in outputs, spins up threads and builds kernels) unless the
first call is what is measured (``warmup=False``, e.g. opening a file cold). Times are
``time.perf_counter`` seconds. Scripts print their figures as a table, or with ``--json``
as one JSON object (:func:`add_json_option`, :func:`emit_json`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

STATISTIC = "median of repeat calls after one warm-up call"


def median_time(fn, repeat: int, warmup: bool = True) -> float:
    """Median seconds of ``repeat`` calls of ``fn``, after one warm-up call unless ``warmup`` is False."""
    if warmup:
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def add_json_option(parser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one JSON object instead of a table")


def emit_json(benchmark: str, args, baseline: dict, rows: list[dict]) -> None:
    """Print ``{"benchmark", "statistic", "arguments", "baseline", "rows"}`` on stdout."""
    json.dump({"benchmark": benchmark, "statistic": STATISTIC, "arguments": vars(args), "baseline": baseline,
               "rows": rows}, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
