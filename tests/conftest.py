"""pytest setup: import the top-level modules from the repository root, run Triton kernels in the
CPU interpreter when no GPU is present, and keep CPU runs deterministic and quick."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.use_deterministic_algorithms(True, warn_only=True)
# token files verified by the tests are remembered in a cache of the test session, not the user's
if "NANOREPO_CACHE" not in os.environ:
    os.environ["NANOREPO_CACHE"] = tempfile.mkdtemp(prefix="nanorepo-cache-")
    atexit.register(shutil.rmtree, os.environ["NANOREPO_CACHE"], True)


@pytest.fixture(scope="module")
def one_thread():
    """torch's intra-op threads set to 1 for a module's tests, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N contiguous slices of the collected tests (I from 1); "
                          "bench.py --what=gpu runs N of them at once")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: slices of what runs
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    try:
        i, n = map(int, shard.split("/"))
        assert 1 <= i <= n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard must be I/N with 1 <= I <= N, got {shard!r}")
    # contiguous slices, not every N-th test: the parametrizations of one test share kernel variants,
    # which a GPU compiles once per process
    lo, hi = len(items) * (i - 1) // n, len(items) * i // n
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]
