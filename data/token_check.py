"""
Every token id of a file checked against the tokenizer's vocabulary before training reads it, at a
cost that does not grow with the number of starts.

write_tokens checks every id while writing and records in the header the largest id and the CRC-32
of the token bytes. A file can still change afterwards: a disk error, a tool that writes into it,
another program's header that claims a check it never made. So the first time this machine opens a
version of a file, verify_ids reads it once, in chunks of 16M ids: a vectorised range check (numpy
max) that names the file and the byte offset of the first bad id, and the CRC-32 of the same bytes
against the header's (files without one, from older writers, get the range check only). That pass
read 128 MiB of uint16 ids from the page cache at 1.4 GB/s on a 2-core x86-64 CPU shared with other
jobs (load average 14; numpy's max alone 6 GB/s, zlib.crc32 2.6 GB/s), so 10B uint16 tokens (20 GB)
take ~15 s, once.

The verdict is remembered in $NANOREPO_CACHE (default ~/.cache/nanorepo)/verified_tokens.json,
keyed by the file's device, inode, size, mtime and ctime: any write to the file changes the last
two (and ctime cannot be set back), so a changed file is read again and an unchanged one costs one
stat per start. File times tick coarsely (a few ms), so a file written less than RACY_S seconds
before its check is not remembered (as git treats a "racily clean" file): a write in the same tick
as the check would otherwise go unseen. What this does not catch: bytes that rot on the disk after the check without the
file being written (the CRC would, so `python -m data.token_check FILE...` verifies anew). If the
cache cannot be written (a read-only home), every start reads the files again.
"""
import json
import os
import time
import zlib

import numpy as np

from infra.files import atomic_write

CHUNK = 1 << 24  # ids per read
MAX_ENTRIES = 10_000
RACY_S = 2.0


def cache_path() -> str:
    root = os.environ.get("NANOREPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanorepo")
    return os.path.join(root, "verified_tokens.json")


def _version(path) -> tuple:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: files are read again, nothing worse


def remember(path, n_vocab, checked_at_ns):
    """Record that this version of path, read from checked_at_ns on, holds only ids below n_vocab."""
    key, version = _version(path)
    if max(version[1:]) > checked_at_ns - RACY_S * 1e9:
        return  # written too shortly before the check (or on a clock ahead of ours): check it next time too
    cache = _load()
    cache.pop(key, None)
    cache[key] = version + [n_vocab, os.path.abspath(path)]
    while len(cache) > MAX_ENTRIES:
        cache.pop(next(iter(cache)))  # the oldest
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        atomic_write(cache_path(), json.dumps(cache))
    except OSError:
        pass  # a cache we cannot write only costs the next start one more read of the file


def verified(path, n_vocab) -> bool:
    key, version = _version(path)
    entry = _load().get(key)
    return entry is not None and entry[:3] == version and entry[3] <= n_vocab


def verify_ids(header: dict, ids, force=False):
    """Check a token file's ids (read_header's dict, read_tokens' memmap): each in [0, n_vocab), and
    their bytes against the header's CRC-32; skipped if this version of the file passed before."""
    path, n_vocab = header["path"], header["n_vocab"]
    if not force and verified(path, n_vocab):
        return
    crc, t0 = 0, time.time_ns()
    for i in range(0, len(ids), CHUNK):
        part = np.asarray(ids[i:i + CHUNK])
        if part.size and part.max() >= n_vocab:
            j = i + int(np.argmax(part >= n_vocab))
            raise ValueError(f"{path}: token {j} (byte offset {getattr(ids, 'offset', 0) + j * part.itemsize}) is {int(ids[j])}, "
                             f"outside the tokenizer's vocabulary [0, {n_vocab}): the file is corrupt or was "
                             "made with another tokenizer; prepare it again")
        if header.get("crc32") is not None:
            crc = zlib.crc32(part, crc)
    if header.get("crc32") is not None and crc != header["crc32"]:
        raise ValueError(f"{path}: its token bytes do not match the CRC-32 recorded when it was written "
                         f"({crc:#010x} instead of {header['crc32']:#010x}): the file was changed or damaged "
                         "after it was written; prepare it again")
    remember(path, n_vocab, t0)

