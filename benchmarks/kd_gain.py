"""KD gain on the embedded dataset: `python benchmarks/kd_gain.py --help` (same as `kddetr bench kd`)."""
import sys

from kddetr.bench.kd_gain import main

if __name__ == "__main__":
    sys.exit(main())
