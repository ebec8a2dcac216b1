#!/usr/bin/env python
"""Data pipeline throughput: images/s at 512 crops from 1914x1052 PNGs (see
mfuser_jax/data/benchmark.py; results go into BENCHMARKS.md "Data pipeline")."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mfuser_jax.data.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
