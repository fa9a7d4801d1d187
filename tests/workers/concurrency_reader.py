"""A reader of tests/test_concurrency.py: ``python concurrency_reader.py PATH``.

Opens PATH read-only again and again and reads all of "log"; every read must equal the
numpy model of the step it opened (the clock's length), or be refused with "reopen".
Prints "ready" after its first read, a JSON line {"torn": ...} and exit 1 on torn data,
and once stdin is closed, after one last look, a JSON summary (reads, distinct steps,
refusals, last step).
"""

from __future__ import annotations

import json
import select
import sys

import kvmmap as km
from concurrency_log import model


def reader(path: str) -> None:
    models, seen, refused, last = {}, [], 0, -1
    while True:
        stop = bool(select.select([sys.stdin], [], [], 0)[0])     # stdin closed: one last look
        try:
            with km.PagedKVCache.open(path, mode="r") as c:
                step = c.seq_len(c.find_sequence("clock"), 0) - 1
                log = c.find_sequence("log")
                got = [c.read(log, layer) for layer in range(2)]
        except km.CacheFileError as e:
            if "reopen" not in str(e):
                raise
            refused += 1
            continue
        assert step >= last, f"went back from step {last} to {step}"
        last = step
        if step not in models:
            models[step] = model(step)
        for layer in range(2):
            for side in (0, 1):
                if got[layer][side].tobytes() != models[step][layer][side].tobytes():
                    print(json.dumps({"torn": step, "layer": layer, "side": side}), flush=True)
                    sys.exit(1)
        seen.append(step)
        if len(seen) == 1:
            print("ready", flush=True)
        if stop:
            break
    print(json.dumps({"reads": len(seen), "distinct": len(set(seen)), "refused": refused, "last": last}))


if __name__ == "__main__":
    reader(sys.argv[1])
