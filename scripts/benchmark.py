#!/usr/bin/env python
"""Benchmarks for mfuser-jax (the sections, their flags and what each times: see
mfuser_jax/benchmark.py or --help; results go into BENCHMARKS.md).

    python scripts/benchmark.py                    # every section at full size (meant for a GPU)
    python scripts/benchmark.py --smoke            # tiny shapes, a CPU sanity run
    python scripts/benchmark.py --sections scan --out results/
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mfuser_jax.run.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
