"""`python -m studio.cli ...` (what `torchrun -m studio.cli` and `accelerate launch -m studio.cli` run)."""

import sys

from studio.cli import main

sys.exit(main())
