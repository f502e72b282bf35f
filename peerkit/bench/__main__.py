"""Entry point: ``python -m peerkit.bench [--quick] [--cases a,b] [--runs N] [--out DIR]``."""

import sys

from .run import main

sys.exit(main())
