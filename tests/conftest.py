"""Test-wide settings: tiny models run fastest on one thread on a shared 2-core machine."""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers
