"""The timing convention of every benchmark script (imported from the scripts' own folder).

One statistic everywhere: the **median** of ``repeat`` timed calls, after one untimed
warm-up call (which pages in outputs, spins up threads and builds kernels) unless the
first call is what is measured (``warmup=False``). Times are ``time.perf_counter``
seconds. A measurement that cannot be repeated (a read after dropping the page cache)
is one timed call, and the script says so in its docstring, its table and its JSON
(``"timing": ONE_SHOT`` on the row). Scripts print their figures as a table, or with
``--json`` as one JSON object (:func:`add_json_option`, :func:`emit_json`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

STATISTIC = "median of repeat calls after one warm-up call"
ONE_SHOT = "one timed call (not repeatable)"


def median_time(fn, repeat: int, warmup: bool = True, setup=None, teardown=None) -> float:
    """Median seconds of ``repeat`` calls of ``fn``, after one warm-up call unless ``warmup`` is False.

    With ``setup``, every call (the warm-up too) gets fresh state: ``state = setup()``
    untimed, then ``fn(state)`` timed, then ``teardown(state)`` untimed if given (e.g. a
    new empty file to append to, closed and deleted afterwards).
    """
    def once() -> float:
        state = (setup(),) if setup else ()
        t0 = time.perf_counter()
        fn(*state)
        t = time.perf_counter() - t0
        if teardown:
            teardown(*state)
        return t

    if warmup:
        once()
    return statistics.median([once() for _ in range(repeat)])


def add_json_option(parser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one JSON object instead of a table")


def emit_json(benchmark: str, args, baseline: dict, rows: list[dict], configuration: dict | None = None) -> None:
    """Print ``{"benchmark", "statistic", "arguments", "configuration", "baseline", "rows"}`` on stdout.

    ``configuration``: what the run found or derived beyond its arguments (threads, sizes,
    versions); a row whose figure is not the median carries its own ``"timing"``.
    """
    json.dump({"benchmark": benchmark, "statistic": STATISTIC, "arguments": vars(args),
               "configuration": configuration or {}, "baseline": baseline, "rows": rows},
              sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
