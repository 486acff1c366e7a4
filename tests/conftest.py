"""pytest setup: import the top-level modules from the repository root, run Triton kernels in the
CPU interpreter when no GPU is present, and keep CPU runs deterministic and quick."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.use_deterministic_algorithms(True, warn_only=True)
