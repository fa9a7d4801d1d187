"""``python -m kvmmap ...``: the ``kvmmap`` console script (:mod:`kvmmap.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":      # importing this module (e.g. to collect doctests) runs nothing
    sys.exit(main())
