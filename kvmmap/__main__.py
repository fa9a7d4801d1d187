"""``python -m kvmmap ...``: the ``kvmmap`` console script (:mod:`kvmmap.cli`)."""

import sys

from .cli import main

sys.exit(main())
