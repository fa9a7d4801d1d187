"""The seeded plan of the crash campaign (tests/test_crash.py), shared by the writer
(tests/workers/crash_writer.py) and the test that replays it in RAM."""

from __future__ import annotations

import numpy as np

GEOMETRY = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4)
CONFIGS = {"exact": ("fp32", "fp16"), "quant": ("int8", "int4")}
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


def apply_op(c, op, ids: dict, model: dict | None = None) -> None:
    """Run one planned operation on cache ``c``; mirror it on the numpy ``model`` if given.

    ``ids`` maps sequence names to ids; ``model`` maps names to per-layer [k, v] arrays.
    """
    L, H, D = GEOMETRY["num_layers"], GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    kind, name = op[0], op[1]
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
