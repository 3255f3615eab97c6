"""`python -m nvlm ...` (also what `torchrun -m nvlm ...` runs)."""

import sys

from .cli import main

sys.exit(main())
