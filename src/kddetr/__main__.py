"""`python -m kddetr` (also what `torchrun -m kddetr` runs)."""
import sys

from kddetr.cli import main

sys.exit(main())
