"""Benchmark deca_ds against full Adam and BAdam: memory and throughput, each method in a fresh process.

    python recipes/benchmark.py --out runs/benchmark --compare       # same as: deca-ds bench --out ... --compare

Writes OUT/benchmark.json, OUT/benchmark.md and OUT/benchmark.png; see docs/benchmark.md. All logic lives in
deca_ds.bench.benchmark.
"""

import sys

from deca_ds.bench.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
