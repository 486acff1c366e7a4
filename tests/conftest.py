"""pytest setup: import the top-level modules from the repository root, run Triton kernels in the
CPU interpreter when no GPU is present, and keep CPU runs deterministic and quick."""
import os
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.use_deterministic_algorithms(True, warn_only=True)
# token files verified by the tests are remembered in a cache of the test session, not the user's
os.environ.setdefault("NANOREPO_CACHE", tempfile.mkdtemp(prefix="nanorepo-cache-"))


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """Python's language reference (pydoc_data), byte-tokenized: ~0.5M tokens, no network."""
    import pydoc_data.topics

    from data import prepare
    src = tmp_path_factory.mktemp("src")
    for name, text in pydoc_data.topics.topics.items():
        (src / f"{name}.txt").write_text(text)
    out = str(tmp_path_factory.mktemp("data") / "bytes")
    prepare.main([f"--input={src}", f"--out={out}", "--tokenizer=byte", "--val_every=10"])
    return out
