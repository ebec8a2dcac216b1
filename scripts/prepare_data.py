#!/usr/bin/env python
"""Convert dataset labels to Cityscapes trainIds and write rare-class statistics.

  python scripts/prepare_data.py {gta,synthia,cityscapes,mapillary} --root DATA_ROOT
      [--nproc N] [--force]
  python scripts/prepare_data.py folder --root DATASET_DIR [--classes classes.txt]

Thin CLI over mfuser_jax.data.prepare (see its docstring for the layouts it reads and
the files it writes). Resumable; verifies counts at the end; exits 2 with one message
on bad input.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mfuser_jax.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
