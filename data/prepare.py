"""
Prepare any text for train.py: tokenize a folder of .txt / .jsonl files into token files.

    python -m data.prepare --input=~/corpus --name=mytext --tokenizer=olmo2
    python train.py --dataset=mytext ...

writes data/mytext/train_000.bin, train_001.bin, ... (shards of --shard_tokens), val.bin and the
tokenizer (tokenizer.json [+ tokenizer.tiktoken]). Documents: each .txt file is one document; each
line of a .jsonl file is one, its --text_field ("text"); .gz versions of both are read too. Every
document ends with <|endoftext|>, and every --val_every-th document goes to val.bin (so a corpus
needs at least that many documents). --input may
be given several times and may name files or folders (searched recursively, sorted).

Pre-tokenized OLMo data (the paper's stage-2 Dolmino mix as OLMo's configs list it: flat uint32
dolma2 ids, ".npy" files without a numpy header) needs no tokenizing, only our header:

    python -m data.prepare --raw_tokens=~/dolmino --name=dolmino --tokenizer=olmo2 --dtype=uint32

Each input file becomes one train shard; the last --val_tokens tokens of the last file become val.bin.
(The default dataset, Python's own documentation, is built by data/stdlib_text.py.)
"""
import glob
import gzip
import json
import os
import sys

import numpy as np

from data.tokenizer import DATA_DIR, get_tokenizer, save_tokenizer
from data.tokens import read_header, write_tokens

DEFAULTS = dict(input=[], raw_tokens="", name="", out="", tokenizer="olmo2", text_field="text", val_every=1000,
                shard_tokens=500_000_000, workers=8, dtype="uint32", val_tokens=1_000_000)


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


def documents(files, text_field):
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
                for n, line in enumerate(f):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError) as e:
                            raise ValueError(f"{path}:{n + 1}: not a JSON object with a {text_field!r} "
                                             f"field ({e})") from None
            else:
                yield f.read()


def prepare_text(a, out, enc):
    files = input_files(a["input"], (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz"))
    train, val, shard, n_docs = [], [], 0, 0

    def flush(final=False):
        nonlocal train, shard
        if train and (final or len(train) >= a["shard_tokens"]):
            write_tokens(os.path.join(out, f"train_{shard:03d}.bin"), np.array(train, dtype=np.int64), enc.name,
                         enc.n_vocab, enc.eot_token)
            print(f"  train_{shard:03d}.bin: {len(train):,} tokens")
            train, shard = [], shard + 1

    batch = []
    for doc in documents(files, a["text_field"]):
        batch.append(doc)
        if len(batch) == 1024:
            n_docs = _encode(batch, n_docs, enc, a, train, val)
            batch = []
            flush()
    n_docs = _encode(batch, n_docs, enc, a, train, val)
    flush(final=True)
    write_tokens(os.path.join(out, "val.bin"), np.array(val, dtype=np.int64), enc.name, enc.n_vocab, enc.eot_token)
    print(f"{n_docs:,} documents from {len(files)} files; val.bin: {len(val):,} tokens")
    if not val:
        print(f"warning: val.bin is empty: fewer than --val_every={a['val_every']} documents")


def _encode(batch, n_docs, enc, a, train, val):
    for ids in enc.encode_ordinary_batch(batch, num_threads=a["workers"]):
        (val if n_docs % a["val_every"] == a["val_every"] - 1 else train).extend(ids + [enc.eot_token])
        n_docs += 1
    return n_docs


def prepare_raw(a, out, enc):
    files = input_files([a["raw_tokens"]], (".npy", ".bin"))
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            has_header = f.read(6) == b"\x93NUMPY"
        arr = np.load(path, mmap_mode="r") if has_header else np.memmap(path, dtype=a["dtype"], mode="r")
        if i == len(files) - 1:
            k = min(a["val_tokens"], len(arr) // 2)
            write_tokens(os.path.join(out, "val.bin"), arr[len(arr) - k:], enc.name, enc.n_vocab, enc.eot_token)
            arr = arr[:len(arr) - k]
        write_tokens(os.path.join(out, f"train_{i:03d}.bin"), arr, enc.name, enc.n_vocab, enc.eot_token)
        print(f"  {path} -> train_{i:03d}.bin: {len(arr):,} tokens")


def main(argv):
    a = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if key not in a or not eq:
            sys.exit(f"unknown or malformed option {arg!r}; options: {', '.join('--' + k for k in a)}\n{__doc__}")
        if isinstance(a[key], list):
            a[key].append(val)
        else:
            a[key] = type(a[key])(val)
    if bool(a["input"]) == bool(a["raw_tokens"]) or not (a["name"] or a["out"]):
        sys.exit(f"give --name (or --out) and exactly one of --input or --raw_tokens\n{__doc__}")
    out = a["out"] or os.path.join(DATA_DIR, a["name"])
    os.makedirs(out, exist_ok=True)
    enc = get_tokenizer(a["tokenizer"])
    save_tokenizer(enc, out)  # the data and its tokenizer always travel together
    (prepare_raw if a["raw_tokens"] else prepare_text)(a, out, enc)
    print(f"wrote {out}: {', '.join(sorted(f for f in os.listdir(out) if not f.endswith('.tmp')))}")
    for f in sorted(glob.glob(os.path.join(out, "*.bin"))):
        read_header(f)  # re-check what was written


if __name__ == "__main__":
    main(sys.argv[1:])
