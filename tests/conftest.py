"""Test setup shared by every file: the tests import their helpers (manifests, checkpoints) by name."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# Two threads suit CI's 2 cores; on a busy shared machine DRP_TEST_THREADS=1 is much faster. Without
# DRP_TEST_THREADS, OMP_NUM_THREADS counts, so `OMP_NUM_THREADS=1 python -m pytest` really tests one thread
# (the numbers must hold with either: the thread count changes the order of sums).
THREADS = os.environ.get("DRP_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or "2"
torch.set_num_threads(int(THREADS))
