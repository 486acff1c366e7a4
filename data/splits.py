"""
The train and val splits of a dataset folder with their tokenizer, checked against each other, as
train.py opens them; the embedded default dataset (stdlib) is built on first use.
"""
import os

import torch.distributed as dist

from data.tokenizer import DATA_DIR, get_tokenizer, load_tokenizer
from data.tokens import TokenDataset
from infra.checkpoint import TrainError


def dataset_folder(dataset) -> str:
    """A folder path as given, else the folder of that name under data/."""
    return dataset if os.path.isdir(dataset) else os.path.join(DATA_DIR, dataset)


def open_splits(dataset, block_size, seed, master=True):
    """(train, val, tokenizer, folder). Rank 0 (master) builds the stdlib dataset if it is missing;
    under torch.distributed every process waits for it."""
    folder = dataset_folder(dataset)
    from data import stdlib_text  # the embedded corpus's builder: needed by the default dataset only
    if dataset == "stdlib" and master and not stdlib_text.is_prepared(folder):
        print(f"preparing the embedded stdlib dataset in {folder} (first use only) ...")
        stdlib_text.prepare(folder, verbose=True)
    if dist.is_initialized():
        dist.barrier()
    train = TokenDataset(folder, "train", block_size, seed)
    try:
        val = TokenDataset(folder, "val", block_size, seed)
    except ValueError as e:  # too short for one window: the split, not the model, is what to change
        raise ValueError(f"{e}; or, for a corpus prepared with data/prepare.py, prepare it again with a smaller "
                         "--val_every (more documents go to val.bin)") from None
    enc = load_tokenizer(folder) if os.path.exists(os.path.join(folder, "tokenizer.json")) \
        else get_tokenizer(train.tokenizer)
    for d in (train, val):
        if (d.tokenizer, d.n_vocab) != (enc.name, enc.n_vocab):
            raise TrainError(f"{folder}: token files were made with {d.tokenizer} (n_vocab {d.n_vocab}) but the "
                             f"folder's tokenizer is {enc.name} (n_vocab {enc.n_vocab}); prepare the data again")
    return train, val, enc, folder
