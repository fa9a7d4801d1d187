#!/usr/bin/env python3
"""`kvmmap convert` as a script: python tools/convert.py --help."""

import os
import sys

# This folder would shadow the standard library (tools/inspect.py is `inspect`): drop it.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from kvmmap.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
