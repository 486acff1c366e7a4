"""
Prepare any text for train.py: tokenize a folder of .txt / .jsonl files into token files.

    python -m data.prepare --input=~/corpus --name=mytext --tokenizer=olmo2
    python train.py --dataset=mytext ...

writes data/mytext/train_000.bin, train_001.bin, ... (shards of --shard_tokens), val.bin and the
tokenizer (tiktoken.json [+ tokenizer.tiktoken] and HF's tokenizer.json). Documents: each .txt file is one document; each
line of a .jsonl file is one, its --text_field ("text"); .gz versions of both are read too. Every
document ends with <|endoftext|>, and every --val_every-th document goes to val.bin; a corpus with
fewer documents is refused with the --val_every that would work. --input may be given several
times and may name files or folders (searched recursively, sorted).

Pre-tokenized OLMo data (the paper's stage-2 Dolmino mix as OLMo's configs list it: flat uint32
dolma2 ids, ".npy" files without a numpy header) needs no tokenizing, only our header:

    python -m data.prepare --raw_tokens=~/dolmino --name=dolmino --tokenizer=olmo2 --dtype=uint32

Each input file becomes one train shard; the last --val_tokens tokens of the last file become val.bin.
(The default dataset, Python's own documentation, is built by data/stdlib_text.py.)

Memory: token ids go straight into one preallocated numpy buffer per split (--shard_tokens ids,
2 or 4 bytes each), written out as a shard whenever it is full, so the peak is about one shard
buffer per split plus one batch of documents, whatever the corpus size. The folder is built as
<out>.tmp and renamed into place when complete: a re-run replaces every shard of the earlier
one, and an interrupted run leaves the earlier folder as it was. An existing --out is replaced only
if it is a dataset this project wrote (token files with our header, the tokenizer's files and
meta.json, the list of what data.prepare wrote); a folder holding anything else (a train.py
out_dir, someone's notes) is refused with the names of what it holds, and nothing is deleted.
Progress (share of the input read, documents, tokens, rate, time left) is one line rewritten on a
terminal, a plain line every 30 s in a log (infra/progress.py).

    python -m data.prepare --help        # the options and their defaults
"""
import glob
import gzip
import json
import os
import re
import zlib

import numpy as np

import cli
from data.tokenizer import DATA_DIR, get_tokenizer, save_tokenizer
from data.tokens import MAGIC, read_header, write_tokens
from infra.files import atomic_write, make_dirs, read_json, remove, replace_dir
from infra.progress import Progress

DEFAULTS = dict(input=[], raw_tokens="", name="", out="", tokenizer="olmo2", text_field="text", val_every=1000,
                shard_tokens=500_000_000, workers=8, dtype="uint32", val_tokens=1_000_000)
HELP = dict(input="a .txt/.jsonl(.gz) file or a folder of them; repeat for more",
            raw_tokens="a folder (or file) of pre-tokenized .npy/.bin token arrays, instead of --input",
            name="the dataset: written to data/<name>/", out="or the folder to write, instead of --name",
            tokenizer="olmo2, byte, stdlib, gpt2, ... (data/tokenizer.py)", text_field="the text field of .jsonl lines",
            val_every="every this many-th document goes to val.bin", shard_tokens="tokens per train shard",
            workers="tokenizer threads", dtype="--raw_tokens without a numpy header: uint16 or uint32",
            val_tokens="--raw_tokens: the last this many tokens of the last file become val.bin")
BATCH_CHARS = 1 << 20  # documents are tokenized in batches of about this many characters (~36 B/token as lists)


class UsageError(cli.UsageError):
    """A bad command line: `python -m data.prepare` prints it as one `error: ...` line, exit code 2."""


def input_files(paths, suffixes):
    files = []
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if f.endswith(suffixes))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {paths}")
    return files


def _decode(raw: bytes, path, offset):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "of the decompressed stream" if path.endswith(".gz") else ""
        raise ValueError(f"{path}: not UTF-8 text at byte {offset + e.start} {where}({e.reason}: "
                         f"{raw[e.start:e.start + 4]!r}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                         ) from None


def documents(files, text_field, where=None):
    """Every document's text; .txt = one document per file, .jsonl = one per line (its text_field).
    where (a dict), if given, follows the reading: "done" = bytes of the finished files, "file" = the
    open file (its tell() is how far into it)."""
    where = {} if where is None else where
    where["done"] = 0
    for path in files:
        try:
            yield from _documents(path, text_field, where)
            where["done"] += os.path.getsize(path)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, not gzip, damaged
            raise ValueError(f"{path}: the gzip stream is damaged or cut short ({type(e).__name__}: {e}); "
                             "download or compress it again") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _documents(path, text_field, where):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        where["file"] = getattr(f, "fileobj", f)  # gzip: the compressed file, whose size was counted
        if not path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            yield _decode(f.read(), path, 0)
            return
        offset = 0
        for n, raw in enumerate(f):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n + 1}: not a JSON object with a {text_field!r} field ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n + 1}: its {text_field!r} is {json.dumps(text)[:40]} ("
                                 f"{type(text).__name__}), not a string; fix that line or use another --text_field")
            yield text


class ShardWriter:
    """Token ids of one split into a preallocated buffer of `capacity` ids; every full buffer is
    written as <split>_NNN.bin (a val split that fits one buffer as val.bin)."""

    def __init__(self, folder, split, capacity, enc):
        self.folder, self.split, self.enc = folder, split, enc
        self.buf = np.empty(capacity, dtype=np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32)
        self.n, self.shards, self.total = 0, [], 0

    def add(self, ids):
        ids = np.asarray(ids, dtype=self.buf.dtype)
        while len(ids):
            k = min(len(ids), len(self.buf) - self.n)
            self.buf[self.n:self.n + k] = ids[:k]
            self.n, self.total, ids = self.n + k, self.total + k, ids[k:]
            if self.n == len(self.buf):
                self.flush()

    def flush(self):
        if self.n:
            path = os.path.join(self.folder, f"{self.split}_{len(self.shards):03d}.bin")
            write_tokens(path, self.buf[:self.n], self.enc.name, self.enc.n_vocab, self.enc.eot_token)
            self.shards.append((path, self.n))
            self.n = 0

    def close(self):
        self.flush()
        if self.split == "val" and len(self.shards) == 1:  # the usual val.bin (train is always sharded)
            path = os.path.join(self.folder, f"{self.split}.bin")
            os.replace(self.shards[0][0], path)
            self.shards[0] = (path, self.shards[0][1])
        for path, n in self.shards:  # the names they have in the finished folder
            print(f"  {os.path.basename(path)}: {n:,} tokens")


def prepare_text(a, out, enc):
    files = input_files(a["input"], (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz"))
    train = ShardWriter(out, "train", a["shard_tokens"], enc)
    val = ShardWriter(out, "val", a["shard_tokens"], enc)
    n_docs, batch, chars, last = 0, [], 0, None
    where, progress = {}, Progress("prepare", total=sum(os.path.getsize(f) for f in files), unit="B")

    def encode():
        nonlocal n_docs, last
        for ids in enc.encode_ordinary_batch(batch, num_threads=a["workers"]):
            ids.append(enc.eot_token)
            to_val = n_docs % a["val_every"] == a["val_every"] - 1
            (val if to_val else train).add(ids)
            last = None if to_val else ids
            n_docs += 1
        batch.clear()
        read = where["done"] + (where["file"].tell() if not where["file"].closed else 0)
        progress.update(read, f"{n_docs:,} documents, {train.total + val.total:,} tokens")

    try:
        for doc in documents(files, a["text_field"], where):
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS:
                encode()
                chars = 0
        encode()
    finally:
        progress.close()
    if not val.total and not a["val_every_given"] and n_docs >= 2 and last is not None and train.n >= len(last):
        # a corpus smaller than the default --val_every: its last document (still in the train buffer)
        # becomes val.bin, so the README's command works as written on a small folder
        train.n, train.total = train.n - len(last), train.total - len(last)
        val.add(last)
        print(f"  {n_docs} documents, fewer than --val_every={a['val_every']}: the last one goes to val.bin")
    if not val.total:
        fix = (f"a corpus of one document cannot be split; add documents" if n_docs < 2 else
               f"rerun with --val_every={max(2, n_docs // 10)} (or any value up to {n_docs})")
        raise ValueError(f"val.bin would be empty: {n_docs} documents, and every --val_every={a['val_every']}th "
                         f"goes to val; {fix}")
    if not train.total:
        raise ValueError(f"train would be empty: --val_every={a['val_every']} sends all {n_docs} documents to "
                         f"val.bin; use --val_every=2 or more")
    train.close()
    val.close()
    print(f"{n_docs:,} documents from {len(files)} files: {train.total:,} train tokens, {val.total:,} val tokens")
    return dict(documents=n_docs, tokens=dict(train=train.total, val=val.total))


def raw_array(path, dtype, n_vocab):
    """The ids of one --raw_tokens file as an integer array (a memmap), after the cheap signs that it
    is not what --dtype says: a byte count that is not a multiple of the id size, every other uint16
    id 0 (uint32 ids read as uint16), ids beyond the vocabulary (uint16 ids read as uint32)."""
    with open(path, "rb") as f:
        start = f.read(8)
    try:
        if start == MAGIC:  # one of our own token files: its header says the dtype
            from data.tokens import read_tokens
            return read_tokens(path)
        if start[:6] == b"\x93NUMPY":
            arr = np.load(path, mmap_mode="r")
            if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
                raise ValueError(f"{path} holds a {arr.ndim}-D {arr.dtype} array; token ids are a flat integer "
                                 "array")
            return arr
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from None
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size == 0 or size % itemsize:
        raise ValueError(f"{path} is {size:,} bytes, {'empty' if not size else f'not a multiple of {itemsize}'}: "
                         f"not a flat array of {dtype} ids" + ("" if not size or dtype == "uint16" else
                                                               " (uint16 ids? use --dtype=uint16)"))
    arr = np.memmap(path, dtype=dtype, mode="r")
    head = np.asarray(arr[:1 << 20])  # a sample from the start is enough for the signs
    if dtype == "uint16" and len(head) >= 64:
        zeros = [float(np.mean(head[p::2] == 0)) for p in (0, 1)]
        if max(zeros) >= 0.8 and sum(zeros) / 2 >= 0.4:
            raise ValueError(f"{path}: {100 * max(zeros):.0f}% of the ids at {('even', 'odd')[zeros.index(max(zeros))]} "
                             "positions are 0 (about half of all ids): these look like uint32 ids read as uint16; "
                             "use --dtype=uint32")
    if len(head) and head.max() >= n_vocab:
        hint = " (uint16 ids read as uint32? use --dtype=uint16)" if dtype == "uint32" else ""
        raise ValueError(f"{path}: id {int(head.max())} is outside the tokenizer's vocabulary [0, {n_vocab}): the "
                         f"file was made with another tokenizer or is not {dtype}{hint}")
    return arr


def prepare_raw(a, out, enc):
    files = input_files([a["raw_tokens"]], (".npy", ".bin"))
    counts, read = dict(train=0, val=0), 0
    progress = Progress("prepare", total=sum(os.path.getsize(f) for f in files), unit="B")
    for i, path in enumerate(files):
        progress.update(read, f"{i} of {len(files)} files, {counts['train'] + counts['val']:,} tokens")
        read += os.path.getsize(path)
        arr = raw_array(path, a["dtype"], enc.n_vocab)
        try:
            if i == len(files) - 1:
                k = min(a["val_tokens"], len(arr) // 2)
                write_tokens(os.path.join(out, "val.bin"), arr[len(arr) - k:], enc.name, enc.n_vocab, enc.eot_token)
                counts["val"] = k
                arr = arr[:len(arr) - k]
            write_tokens(os.path.join(out, f"train_{i:03d}.bin"), arr, enc.name, enc.n_vocab, enc.eot_token)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        progress.close()
        print(f"  {path} -> train_{i:03d}.bin: {len(arr):,} tokens")
        counts["train"] += len(arr)
    return dict(tokens=counts)


def usage() -> str:
    return cli.usage(__doc__, {k: (v, HELP[k]) for k, v in DEFAULTS.items()})


def options(argv) -> dict:
    a = {**DEFAULTS, **cli.parse(argv, DEFAULTS, unknown="unknown or malformed option", error=UsageError)}
    if bool(a["input"]) == bool(a["raw_tokens"]) or not (a["name"] or a["out"]):
        raise UsageError("give --name (or --out) and exactly one of --input or --raw_tokens "
                         "(python -m data.prepare --help)")
    bad = [f"--{k}={a[k]}" for k in ("val_every", "shard_tokens", "workers", "val_tokens") if a[k] < 1]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be at least 1")
    if a["dtype"] not in ("uint16", "uint32"):
        raise UsageError(f"--dtype={a['dtype']}: choose uint16 or uint32")
    a["val_every_given"] = any(arg.startswith("--val_every=") for arg in argv)
    return a


# ----- what may be replaced: only what this project wrote -----------------------------------------

OWN_TOKEN_FILE = re.compile(r"(train|val)(_\d{3,})?\.bin")
# besides the token files: what save_tokenizer writes (ours, then Hugging Face's) and meta.json
OWN_FILES = ("tiktoken.json", "tokenizer.tiktoken", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "meta.json")
PARTIAL = "meta.json"  # written first into <out>.tmp, marking the folder as a build in progress


def _is_token_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def foreign_entries(folder, partial=False) -> list:
    """The entries of folder that a dataset written by this project (data.prepare, data/stdlib_text.py,
    data/task_mix.py) would not hold: anything but token files with our header, the tokenizer's files
    and meta.json; with meta.json's list of written files, anything not on it. partial: a build in
    progress, whose files may still carry their .tmp suffix. [] means the folder may be replaced."""
    try:
        listed = set(read_json(os.path.join(folder, "meta.json")).get("files") or ())
    except (OSError, ValueError):
        listed = set()
    foreign = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        base = name[:-4] if partial and name.endswith(".tmp") else name
        if os.path.islink(path) or not os.path.isfile(path):
            foreign.append(name + ("/" if os.path.isdir(path) else ""))
        elif OWN_TOKEN_FILE.fullmatch(base):
            if not (base != name or _is_token_file(path)):  # a .tmp shard may be cut before its header
                foreign.append(name)
        elif base not in OWN_FILES and base not in listed:
            foreign.append(name)
    return foreign


def check_replaceable(path, what, partial=False):
    """Refuse to go on if path exists and is not a folder this project wrote: nothing is deleted
    that data.prepare did not create, whatever --out says."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise UsageError(f"{what} {path} exists and is not a folder; choose another --out (or --name)")
    foreign = foreign_entries(path, partial)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 6 else "")
        raise UsageError(f"{what} {path} holds {shown}, which data.prepare did not write: it replaces only a "
                         "dataset folder it wrote itself. Choose another --out (or --name), or move those "
                         "files away; nothing was changed")


def main(argv):
    a = options(argv)
    out = os.path.normpath(os.path.expanduser(a["out"] or os.path.join(DATA_DIR, a["name"])))
    tmp, old = out + ".tmp", out + ".old"  # the build and, while it is swapped in, the earlier folder
    check_replaceable(out, "--out")
    check_replaceable(old, "the previous-version folder", partial=True)
    check_replaceable(tmp, "the build folder", partial=True)
    enc = get_tokenizer(a["tokenizer"])
    remove(tmp)  # what an interrupted run left (checked above: only its own files)
    remove(old)
    make_dirs(tmp)
    try:
        atomic_write(os.path.join(tmp, PARTIAL), json.dumps({"written_by": "data.prepare", "complete": False}))
        stats = (prepare_raw if a["raw_tokens"] else prepare_text)(a, tmp, enc)
        save_tokenizer(enc, tmp)  # the data and its tokenizer always travel together (after: bad input fails fast)
        for f in sorted(glob.glob(os.path.join(tmp, "*.bin"))):
            read_header(f)  # re-check what was written
        files = sorted(os.listdir(tmp))
        atomic_write(os.path.join(tmp, "meta.json"), json.dumps(dict(
            written_by="data.prepare", complete=True, files=files, tokenizer=enc.name, n_vocab=enc.n_vocab,
            **(stats or {})), indent=1))
        check_replaceable(out, "--out")  # again: something may have been put there while this ran
    except BaseException:
        remove(tmp)
        raise
    replace_dir(tmp, out)  # the earlier run's folder, stale shards and all, goes only now
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    cli.run(main, usage(), errors=(ValueError, OSError))  # OSError: infra.files.WriteError and friends name the file
