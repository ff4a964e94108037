"""KD step cost vs its parts: `python benchmarks/speed.py --help` (same as `kddetr bench speed`)."""
import sys

from kddetr.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
