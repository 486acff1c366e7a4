"""The synthetic tasks' vocabulary (one for all tasks, each uses a part) and the polynomial split hash:
shared by synthetic.py (numpy, one sequence at a time) and gpu_data.py (torch, a batch on the device)."""
import numpy as np
import torch

QUIET, QUERY = 0, 1                  # the filler without noise; the query marker
COLS = range(2, 5)                   # table column names
NOISE = range(8, 24)                 # the noise filler of induction, recall, distract and table
KEYS = range(24, 40)                 # keys, row names; induction segments use KEYS and VALUES
VALUES = range(40, 56)
CONTENT = np.arange(KEYS.start, VALUES.stop)  # the needles' own vocabulary: multikey's haystack
VOCAB = 64

_P = 2 ** 31 - 1
_MULT = (np.arange(1, 65, dtype=np.int64) * 2654435761) % _P  # per-place multipliers of the polynomial hash


def poly_hash(content):
    """sum_i content_i * M_i mod (2^31 - 1): the split hash a GPU computes for a whole batch at once."""
    c = np.asarray(content, dtype=np.int64)
    return int((c * _MULT[:len(c)]).sum() % _P)


def poly_hash_torch(content, live):
    """poly_hash of every row of content [B, K] over its live entries (live: bool [B, K])."""
    mult = torch.as_tensor(_MULT[:content.shape[1]], device=content.device)
    return (content.long() * mult * live).sum(1) % _P
