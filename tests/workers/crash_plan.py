"""The plans of the crash campaign (tests/test_crash.py), shared by the writer
(tests/workers/crash_writer.py) and the test that replays them.

A plan is a list of steps, each a list of operations, committed by ``flush()`` after each
step: a seeded random plan (:func:`plan`), or one of the short :data:`SCENARIOS` that
lead a format-2 writer into one chosen situation (a page growing in place after a commit,
copy-on-write of a shared partly filled page, ...) in its last step.
"""

from __future__ import annotations

import numpy as np

GEOMETRY = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4)
CONFIGS = {"exact": ("fp32", "fp16"), "quant": ("int8", "int4"), "k4": ("int4", "fp16")}
NSTEPS = 60


def plan(seed: int, nsteps: int = NSTEPS) -> list[list[tuple]]:
    """Steps of operations on sequences named s0, s1, ...; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    live, counter = ["s0"], 1
    steps = [[("new", "s0"), ("append", "s0", 9, 0)]]
    for _ in range(1, nsteps):
        ops = []
        for _ in range(int(rng.integers(1, 4))):
            r = rng.random()
            name = live[int(rng.integers(len(live)))]
            if r < 0.08:
                ops.append(("append", name, int(rng.integers(40, 90)), int(rng.integers(1 << 30))))
            elif r < 0.45:
                ops.append(("append", name, int(rng.integers(1, 24)), int(rng.integers(1 << 30))))
            elif r < 0.57:
                new, counter = f"s{counter}", counter + 1
                ops.append(("fork", name, new))
                live.append(new)
            elif r < 0.69:
                ops.append(("truncate", name, int(rng.integers(0, 40))))
            elif r < 0.81:
                ops.append(("shift_left", name, int(rng.integers(0, 14))))
            elif r < 0.90 or len(live) == 1:
                new, counter = f"s{counter}", counter + 1
                ops.append(("new", new))
                live.append(new)
            else:
                ops.append(("free", name))
                live.remove(name)
        steps.append(ops)
    return steps


# P = 4 in GEOMETRY. Each scenario's last step is the one the writer is killed in.
SCENARIOS = {
    # rows 2, 3 of a committed page with 2 rows are written in place, then a new page
    "grow_in_place": [[("new", "s0"), ("append", "s0", 6, 1)], [("append", "s0", 1, 2)],
                      [("append", "s0", 3, 3)]],
    # s1 shares s0's partly filled last page: each must copy it before writing row 2
    "fork_append": [[("new", "s0"), ("append", "s0", 6, 1)], [("fork", "s0", "s1")],
                    [("append", "s1", 1, 2), ("append", "s0", 2, 3)], [("append", "s1", 2, 4)]],
    # rows 1, 2 of the last page are committed: appending after the truncate must copy it
    "truncate_append": [[("new", "s0"), ("append", "s0", 6, 1)], [("append", "s0", 1, 2)],
                        [("truncate", "s0", 5), ("append", "s0", 2, 3)]],
    # the last page was full when committed (int4 keys: quantized over the page, reopened)
    "truncate_full_append": [[("new", "s0"), ("append", "s0", 8, 1)], [("append", "s0", 4, 2)],
                             [("truncate", "s0", 6), ("append", "s0", 1, 3)]],
    "shift_append": [[("new", "s0"), ("append", "s0", 10, 1)], [("append", "s0", 1, 2)],
                     [("shift_left", "s0", 5), ("append", "s0", 3, 3)]],
    "free_reuse": [[("new", "s0"), ("append", "s0", 9, 1), ("new", "s1"), ("append", "s1", 9, 2)],
                   [("free", "s0")], [("append", "s1", 1, 3)], [("new", "s2"), ("append", "s2", 13, 4)]],
    # compact alone in its step: every commit inside it holds the previous step's contents
    "compact": [[("new", "s0"), ("append", "s0", 9, 1), ("new", "s1"), ("append", "s1", 30, 2)],
                [("free", "s1")], [("append", "s0", 1, 3)], [("compact",)]],
}


def steps_for(name: str) -> list[list[tuple]]:
    """A scenario's steps, or the seeded plan of ``name`` (an integer)."""
    return SCENARIOS[name] if name in SCENARIOS else plan(int(name))


def apply_op(c, op, ids: dict, model: dict | None = None) -> None:
    """Run one planned operation on cache ``c``; mirror it on the numpy ``model`` if given.

    ``ids`` maps sequence names to ids; ``model`` maps names to per-layer [k, v] arrays.
    """
    L, H, D = GEOMETRY["num_layers"], GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    kind = op[0]
    if kind == "compact":
        c.compact()
        return
    name = op[1]
    if kind == "new":
        ids[name] = c.new_sequence(name)
        if model is not None:
            model[name] = [[np.zeros((0, H, D), np.float32)] * 2 for _ in range(L)]
    elif kind == "append":
        n, seed = op[2], op[3]
        x = np.random.default_rng(seed).standard_normal((L, 2, n, H, D), dtype=np.float32)
        for layer in range(L):
            c.append(ids[name], layer, x[layer, 0], x[layer, 1])
            if model is not None:
                model[name][layer] = [np.concatenate([model[name][layer][i], x[layer, i]]) for i in (0, 1)]
    elif kind == "fork":
        ids[op[2]] = c.fork(ids[name], name=op[2])
        if model is not None:
            model[op[2]] = [list(kv) for kv in model[name]]
    elif kind == "truncate":
        c.truncate(ids[name], op[2])
        if model is not None:
            model[name] = [[a[:op[2]] for a in kv] for kv in model[name]]
    elif kind == "shift_left":
        c.shift_left(ids[name], op[2])
        if model is not None:
            model[name] = [[a[op[2]:] for a in kv] for kv in model[name]]
    elif kind == "free":
        c.free(ids.pop(name))
        if model is not None:
            del model[name]
