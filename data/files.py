"""
Writing files without losing what was there. Every file of a run, a dataset or a checkpoint is
written next to its final name (name + ".tmp"), flushed to disk, and renamed into place only when
complete: a crash, a kill or a full disk leaves the old file or the new one, never a torn one, and
no temporary file behind.

    with atomic_open("out/ckpt.pt") as f:       # any writer that takes a file object
        torch.save(state, f)
    atomic_write("data/x/meta.json", text)      # str or bytes
    replace_dir("out/hf.tmp", "out/hf")         # a directory built beside its final name
"""
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_open(path, mode="wb"):
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def replace_dir(tmp, final):
    """Move the finished directory tmp to final. The old final is renamed to final + ".old" first and
    deleted last, so at every moment one complete copy exists under one of the two names."""
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
