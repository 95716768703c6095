"""Test setup shared by every file: the tests import their helpers (manifests, checkpoints) by name."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# Two threads suit CI's 2 cores; on a busy shared machine DRP_TEST_THREADS=1 is much faster.
torch.set_num_threads(int(os.environ.get("DRP_TEST_THREADS", "2")))
