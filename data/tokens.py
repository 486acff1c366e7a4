"""
Token files: a flat array of token ids behind a 256-byte header, read through np.memmap.

    offset  size  field
    0       8     magic b"nanoRePo"
    8       4     version (1), uint32 little-endian
    12      4     bytes per token: 2 (uint16) or 4 (uint32)
    16      8     token count, uint64
    24      8     tokenizer vocabulary size (n_vocab), uint64
    32      8     end-of-text id, int64 (-1: none)
    40      64    tokenizer name, utf-8, zero padded
    104     4     1 if the writer checked every id against n_vocab (write_tokens does), else 0
    108     8     the largest id, int64 (-1: no tokens), valid when the field before is 1
    116     4     CRC-32 (zlib.crc32) of the token bytes, uint32
    120     4     1 if the field before is valid (write_tokens writes it), else 0
    124     132   zeros (room for later fields); the tokens start at byte 256

read_tokens checks magic, version, dtype and that the file size equals 256 + count * itemsize, so
a truncated or foreign file fails loudly instead of training on garbage. TokenDataset also makes
sure every id lies in [0, n_vocab) before the first step, at bounded cost (data/token_check.py):
the first time a machine opens a version of a file, one vectorised pass checks the range of its ids
(naming the file and the offset of the first bad one) and the CRC-32 recorded by the writer; the
verdict is remembered per file version (inode, size, mtime, ctime), so later starts cost a stat.
Every batch is range-checked again as it is cut (a file written into during a run).

TokenDataset cuts a split (one or more files: train.bin or train_000.bin, train_001.bin, ...) into
non-overlapping windows of block_size + 1 tokens and deals them out in a fresh random order each
epoch. Sample g of the run (g = 0, 1, 2, ... over the whole run) is window perm_e[g mod n] of epoch
e = g div n, where perm_e depends only on (seed, e): which rank or micro-step reads a sample does
not change what the sample is, so 1 and 8 processes see the same global batches, and a run resumes
exactly from the number of samples it has consumed.

    python -m data.tokens data/stdlib/train.bin      # prints the header of a token file
"""
import os
import struct
import sys
import zlib
from collections import OrderedDict

import numpy as np
import torch

from infra.files import atomic_open
from data.token_check import verify_ids

MAGIC, VERSION, HEADER = b"nanoRePo", 1, 256
_FMT = "<8sIIQQq64sIqII"  # 124 bytes, padded to HEADER


def write_tokens(path: str, tokens, tokenizer_name: str, n_vocab: int, eot: int = -1):
    """Write ids (any integer array, memmaps included) as uint16 if the vocabulary fits, else uint32.
    Streams in chunks, so shards larger than memory work; atomic (temp file, then rename)."""
    dtype = np.uint16 if n_vocab <= 2 ** 16 else np.uint32
    name = tokenizer_name.encode("utf-8")
    if len(name) > 64:
        raise ValueError(f"tokenizer name {tokenizer_name!r} is longer than 64 bytes")

    def head(checked, top, crc):
        return struct.pack(_FMT, MAGIC, VERSION, np.dtype(dtype).itemsize, len(tokens), n_vocab, eot, name,
                           checked, top, crc, checked).ljust(HEADER, b"\0")

    top, crc = -1, 0
    with atomic_open(path) as f:
        f.write(head(0, top, crc))
        for i in range(0, len(tokens), 1 << 24):
            part = np.asarray(tokens[i:i + (1 << 24)])
            if part.min() < 0 or part.max() >= n_vocab:
                bad = i + int(np.argmax((part < 0) | (part >= n_vocab)))
                raise ValueError(f"token ids must lie in [0, {n_vocab}) for tokenizer {tokenizer_name}, "
                                 f"got [{part.min()}, {part.max()}] (the first outside: {int(tokens[bad])} at "
                                 f"token {bad})")
            top = max(top, int(part.max()))
            data = part.astype(dtype).tobytes()
            crc = zlib.crc32(data, crc)
            f.write(data)
        f.seek(0)
        f.write(head(1, top, crc))  # every id was checked; readers verify the ids against the CRC once


def read_header(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"token file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER)
    if len(raw) < HEADER or raw[:8] != MAGIC:
        raise ValueError(f"{path} is not a nanoRePo token file (no {MAGIC!r} header); prepare it with "
                         "data/prepare.py or data/stdlib_text.py")
    magic, version, itemsize, count, n_vocab, eot, name, checked, top, crc, has_crc = struct.unpack_from(_FMT, raw)
    if version != VERSION:
        raise ValueError(f"{path} has token file version {version}; this code reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ValueError(f"{path} stores {itemsize}-byte tokens; only 2 (uint16) and 4 (uint32) are valid")
    if size != HEADER + count * itemsize:
        raise ValueError(f"{path} is {size} bytes but its header promises {count} tokens of {itemsize} bytes "
                         f"({HEADER + count * itemsize} bytes): the file is truncated or was overwritten; "
                         "prepare it again")
    if checked and top >= n_vocab:
        raise ValueError(f"{path}: its header records ids up to {top}, outside the tokenizer's vocabulary "
                         f"[0, {n_vocab}); the file is corrupt: prepare it again")
    return dict(path=path, count=count, itemsize=itemsize, n_vocab=n_vocab, eot=eot,
                tokenizer=name.rstrip(b"\0").decode("utf-8"), max_id=top if checked == 1 else None,
                crc32=crc if has_crc == 1 else None)


def read_tokens(path: str) -> np.ndarray:
    """The ids as a read-only np.memmap (uint16 or uint32), after checking the header (read_header)."""
    h = read_header(path)
    dtype = np.uint16 if h["itemsize"] == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER, shape=(h["count"],))


def split_files(folder: str, split: str) -> list:
    single = os.path.join(folder, f"{split}.bin")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    shards = sorted(os.path.join(folder, f) for f in names if f.startswith(f"{split}_") and f.endswith(".bin"))
    files = ([single] if os.path.exists(single) else []) + shards
    if not files:
        raise FileNotFoundError(f"no {split}.bin (or {split}_*.bin shards) in {folder}; prepare the data first "
                                "(python -m data.prepare --help)")
    return files


class OpenShards:
    """The token files of a split as memmaps, opened when first read and at most `limit` open at once
    (least recently used closed first): each memmap holds a file descriptor, and a corpus of a few
    thousand shards would otherwise run into the open-file limit (ulimit -n, often 1024)."""

    def __init__(self, paths, limit=64):
        self.paths, self.limit, self.open = paths, limit, OrderedDict()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, f: int) -> np.ndarray:
        if f in self.open:
            self.open.move_to_end(f)
        else:
            if len(self.open) >= self.limit:
                self.open.popitem(last=False)  # its descriptor closes with the last view of it
            self.open[f] = read_tokens(self.paths[f])
        return self.open[f]


class TokenDataset:
    """Non-overlapping (block_size + 1)-token windows of one split, in a per-epoch shuffled order."""

    def __init__(self, folder: str, split: str, block_size: int, seed: int):
        self.block_size, self.seed = block_size, seed
        self.headers = []
        for path in split_files(folder, split):
            h = read_header(path)
            self.headers.append(h)
            verify_ids(h, read_tokens(path))  # before the first step; once per version of the file
        self.files = OpenShards([h["path"] for h in self.headers])
        first = self.headers[0]
        for h in self.headers[1:]:
            if (h["tokenizer"], h["n_vocab"]) != (first["tokenizer"], first["n_vocab"]):
                raise ValueError(f"{h['path']} was tokenized with {h['tokenizer']} (n_vocab {h['n_vocab']}) but "
                                 f"{first['path']} with {first['tokenizer']} (n_vocab {first['n_vocab']})")
        self.tokenizer, self.n_vocab, self.eot = first["tokenizer"], first["n_vocab"], first["eot"]
        # window w of file f starts at token w * block_size and ends at token (w + 1) * block_size
        per_file = [max(0, (h["count"] - 1) // block_size) for h in self.headers]
        self.n_windows = sum(per_file)
        if self.n_windows == 0:
            total = sum(h["count"] for h in self.headers)
            raise ValueError(f"block_size={block_size} needs at least {block_size + 1} tokens in one {split} file "
                             f"of {folder}, which holds {total} tokens; use a smaller block_size or more data")
        self._starts = np.cumsum([0] + per_file)
        self._perm_epoch, self._perm = None, None

    def window(self, w: int) -> np.ndarray:
        f = int(np.searchsorted(self._starts, w, side="right")) - 1
        i = (w - int(self._starts[f])) * self.block_size
        return self.files[f][i:i + self.block_size + 1]

    def window_of(self, g: int) -> int:
        """The window that is the g-th training sample of the run."""
        epoch, i = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def sample(self, g: int) -> np.ndarray:
        """The g-th training sample of the run (block_size + 1 tokens)."""
        return self.window(self.window_of(g))

    def locate(self, w: int, j: int) -> str:
        """Where token j of window w is: its file and byte offset."""
        f = int(np.searchsorted(self._starts, w, side="right")) - 1
        i = (w - int(self._starts[f])) * self.block_size + j
        return f"{self.headers[f]['path']}: token {i} (byte offset {HEADER + i * self.headers[f]['itemsize']})"

    def rows(self, windows) -> np.ndarray:
        """The windows as int64 rows, range-checked: a file changed since it was opened (its memmap
        shows the new bytes) must not feed the model an id outside the vocabulary either."""
        rows = np.stack([self.window(w).astype(np.int64) for w in windows])
        if rows.size and rows.max() >= self.n_vocab:
            r, j = np.unravel_index(int(np.argmax(rows >= self.n_vocab)), rows.shape)
            raise ValueError(f"{self.locate(windows[r], int(j))} is {int(rows[r, j])}, outside the tokenizer's "
                             f"vocabulary [0, {self.n_vocab}): the file changed while it was in use; prepare it "
                             "again")
        return rows

    def batch(self, samples, device):
        """x, y int64 [len(samples), block_size] for the given global sample numbers."""
        xy = torch.from_numpy(self.rows([self.window_of(g) for g in samples]))
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def eval_windows(self, n: int) -> list:
        """n windows spread evenly over the split (all of them if it has fewer): the same every evaluation."""
        n = min(n, self.n_windows)
        return [int(w) for w in np.linspace(0, self.n_windows - 1, n).round().astype(np.int64)]

    def windows_batch(self, windows, device):
        rows = torch.from_numpy(self.rows(windows)).to(device)
        return rows[:, :-1], rows[:, 1:]


if __name__ == "__main__":  # python -m data.tokens FILE...: each header, and its ids verified anew
    for p in sys.argv[1:] or ["data/stdlib/train.bin"]:
        try:
            print(read_header(p))
            verify_ids(read_header(p), read_tokens(p), force=True)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"{p}: every id below {read_header(p)['n_vocab']}, CRC-32 as written")
