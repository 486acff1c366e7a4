"""
The embedded default dataset "stdlib": English prose and code that ships with Python itself,
tokenized with a 1024-token BPE trained on it. No network, no extra package; `python train.py`
prepares it on first use (about 10 seconds).

Documents: the sections of pydoc_data.topics (the language reference that `help("if")` shows,
~0.5M characters) and the docstrings of the standard library's modules, classes and functions
(~1.6M characters; test suites and idlelib left out), each followed by <|endoftext|>. Every 20th
document goes to val. The text depends on the Python version, so the numbers of a run do too;
meta.json records the version and a hash of the text.

    python -m data.stdlib_text        # writes data/stdlib/{train,val}.bin, the tokenizer (tiktoken.json,
                                      # tokenizer.tiktoken, HF's tokenizer.json), meta.json
"""
import ast
import hashlib
import json
import os
import sys
import sysconfig
import time

import numpy as np

from infra.files import atomic_write, make_dirs
from data.tokenizer import DATA_DIR, load_tokenizer, save_tokenizer, train_bpe
from data.tokens import read_header, write_tokens

VOCAB_SIZE = 1024
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def documents() -> list:
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are templates or in other encodings
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:  # skip one-liners like "Return self."
                        docs.append(doc)
    return docs


def is_prepared(folder: str) -> bool:
    try:
        for split in ("train", "val"):
            read_header(os.path.join(folder, f"{split}.bin"))
        return os.path.exists(os.path.join(folder, "meta.json")) and \
            os.path.exists(os.path.join(folder, "tokenizer.json"))
    except (OSError, ValueError):
        return False


def prepare(folder: str = os.path.join(DATA_DIR, "stdlib"), verbose=False) -> str:
    """Build the dataset in folder unless it is already there; returns folder."""
    if is_prepared(folder):
        return folder
    t0 = time.time()
    make_dirs(folder)
    docs = documents()
    val = docs[::20]
    train = [d for i, d in enumerate(docs) if i % 20]
    text = "\n\n".join(train)
    enc = train_bpe(text, VOCAB_SIZE, "stdlib")  # the tokenizer sees train text only
    save_tokenizer(enc, folder)
    enc = load_tokenizer(folder)  # encode with exactly what was saved
    counts = {}
    for split, split_docs in (("train", train), ("val", val)):
        ids = []
        for doc_ids in enc.encode_ordinary_batch(split_docs, num_threads=2):
            ids.extend(doc_ids)
            ids.append(enc.eot_token)
        write_tokens(os.path.join(folder, f"{split}.bin"), np.array(ids, dtype=np.int64), enc.name, enc.n_vocab,
                     enc.eot_token)
        counts[split] = len(ids)
    meta = dict(dataset="stdlib", python=sys.version.split()[0], documents=len(docs),
                characters=sum(map(len, docs)), tokens=counts,
                text_sha256=hashlib.sha256("\0".join(docs).encode()).hexdigest(),
                tokenizer=enc.name, n_vocab=enc.n_vocab, seconds=round(time.time() - t0, 1))
    atomic_write(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1))  # written last: "done"
    if verbose:
        print(f"prepared {folder}: {meta}")
    return folder


if __name__ == "__main__":
    prepare(verbose=True)
