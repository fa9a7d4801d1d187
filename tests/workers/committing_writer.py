"""A writer that keeps committing and reusing pages, for the tools beside it
(tests/test_cli_faults.py): ``python committing_writer.py PATH SECONDS``.

Opens PATH for writing, prints "ready", then for SECONDS frees its oldest sequence,
commits, appends a new one (which reuses the freed pages) and commits again; prints the
number of commits at the end.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import kvmmap as km


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    rng = np.random.default_rng(1)
    c = km.PagedKVCache.open(path, "r+")
    print("ready", flush=True)
    end, commits = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        seqs = sorted(c.sequences())
        c.free(seqs[0])                     # its pages become reusable after this commit
        c.flush()
        s = c.new_sequence()                # reuses them
        for layer in range(c.num_layers):
            c.append(s, layer, *rng.standard_normal((2, 64, c.num_kv_heads, c.head_dim)).astype(np.float32))
        c.flush()
        commits += 2
    c.close()
    print(commits, flush=True)


if __name__ == "__main__":
    main()
