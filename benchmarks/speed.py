"""Speed tables (KD overhead, vs HF transformers, inference, memory, scaling): `python benchmarks/speed.py --help`.

The same as `kddetr bench speed`; with no options it uses configs/embedded_student.yaml, assets/teacher and
data/embedded and prints every table.
"""
import sys

from kddetr.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
