"""
A training mix for small-scale RePo experiments: the stdlib text (data/stdlib_text.py) mixed with
documents from the task generators (data/tasks.py), drawn from their "train" seed stream, which is
disjoint from the "eval" stream that eval.py scores.

Small models learn in-context retrieval only if they see it, so the mix carries the task families
eval.py tests (needles among distractors, variable tracking, word counts, tables, graphs) next to
natural text; drill_docs adds data/tasks.py's training-only niah_drill documents (three keyed
records in natural text, then a question about each key, every answer supervised). Every document is
exactly block_size tokens long and data/tokens.py cuts token files into windows of block_size tokens
(plus the next token, the last target), so every training window holds one whole document: a task
document is prompt + answer + <|endoftext|>, padded with <|endoftext|>; the natural text is the
stdlib train stream cut into pieces of block_size tokens. Windows are shuffled once here and again
every epoch by the sampler. val.bin is the stdlib val split unchanged, so the held-out loss measures
natural text.

    python -m data.task_mix --block_size=256 --docs_per_task=1000 --drill_docs=11000   # data/task_mix_256/
    python train.py --dataset=task_mix_256 --block_size=256 ...
"""
import json
import os
import time

import numpy as np

import cli
from data import stdlib_text
from infra.files import atomic_write, copy_file, make_dirs, read_json
from data.tasks import TASKS, generate
from data.tokenizer import DATA_DIR, load_tokenizer, save_tokenizer
from data.tokens import read_tokens, split_files, write_tokens


def task_document(ex, enc, length):
    ids = enc.encode_ordinary(ex.prompt + ex.target) + [enc.eot_token]
    if len(ids) > length:
        raise ValueError(f"a {ex.task} document has {len(ids)} tokens, more than the window of {length}")
    return ids + [enc.eot_token] * (length - len(ids))


def prepare(block_size=256, docs_per_task=800, drill_docs=0, seed=0, folder=None, text_dir=None, verbose=False) -> str:
    """Build the mix in folder (default data/task_mix_<block_size>) unless it is already there. The
    text and its tokenizer come from text_dir (default: the stdlib dataset, built if needed)."""
    folder = folder or os.path.join(DATA_DIR, f"task_mix_{block_size}")
    meta_path = os.path.join(folder, "meta.json")
    want = dict(block_size=block_size, docs_per_task=docs_per_task, drill_docs=drill_docs, seed=seed, tasks=list(TASKS))
    if os.path.exists(meta_path) and {k: v for k, v in read_json(meta_path).items() if k in want} == want:
        return folder
    t0 = time.time()
    text_dir = text_dir or stdlib_text.prepare()
    enc = load_tokenizer(text_dir)
    make_dirs(folder)
    W = block_size
    text = np.concatenate([np.asarray(read_tokens(p), dtype=np.int64) for p in split_files(text_dir, "train")])
    windows = list(text[:len(text) // W * W].reshape(-1, W))
    n_text = len(windows)
    counts = {**{task: docs_per_task for task in TASKS}, "niah_drill": drill_docs}
    for task, n in counts.items():  # one window per document; answers are in the text: the loss teaches them
        windows += [np.array(task_document(ex, enc, W)) for ex in generate(task, enc, W, n, seed=seed, split="train")]
    order = np.random.default_rng(seed).permutation(len(windows))
    # one more token, so the last document has the next-token target its window needs
    stream = np.concatenate([windows[i] for i in order] + [np.array([enc.eot_token])])
    write_tokens(os.path.join(folder, "train.bin"), stream, enc.name, enc.n_vocab, enc.eot_token)
    copy_file(os.path.join(text_dir, "val.bin"), os.path.join(folder, "val.bin"))
    save_tokenizer(enc, folder)
    meta = dict(want, tokenizer=enc.name, text_windows=n_text, task_windows=len(windows) - n_text,
                seconds=round(time.time() - t0, 1))
    atomic_write(meta_path, json.dumps(meta, indent=1))  # written last: the folder is complete
    if verbose:
        print(f"prepared {folder}: {meta}")
    return folder


OPTIONS = dict(block_size=(256, "tokens per window, one document each"), docs_per_task=(800, "documents per task family"),
               drill_docs=(0, "niah_drill documents"), seed=(0, "the task documents' seed"))  # prepare()'s defaults


def main(argv):
    prepare(verbose=True, **cli.parse(argv, {k: v for k, (v, _) in OPTIONS.items()}))


if __name__ == "__main__":
    cli.run(main, cli.usage(__doc__, OPTIONS))
