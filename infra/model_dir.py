"""
A model directory as eval.py and sample.py open it, checked before any weight is loaded: a train.py
out_dir (its hf/ export and train_config.json) or a Hugging Face checkpoint directory, with its
tokenizer and validation data; and the device and memory checks both scripts make.
"""
import os

import torch

from data.tokenizer import DATA_DIR, get_tokenizer, has_tokenizer, load_tokenizer
from data.tokens import TokenDataset
from infra import hf
from infra.files import read_json


class EvalError(Exception):
    """Bad input, found before any evaluation runs: one `error:` line, exit code 2."""


def inspect_ckpt(path, val_data=""):
    """What eval needs to know about a --ckpt before loading its weights: {"hf_dir", "config"
    (GPTConfig keyword arguments), "enc", "val" (validation data folder or None), "val_note" (why
    there is none)}. Raises for anything that would fail later."""
    hf_dir = path if os.path.exists(os.path.join(path, "config.json")) else os.path.join(path, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        unfinished = any(os.path.exists(os.path.join(path, n)) for n in ("ckpt.pt", "ckpt_fsdp"))
        raise FileNotFoundError(f"--ckpt={path} holds no model: expected config.json there or in {path}/hf "
                                "(a train.py out_dir writes hf/ at the end of a run" + (
                                    f"; this one has a checkpoint but no export yet: finish it with python train.py "
                                    f"--init_from=resume --out_dir={path}" if unfinished else "") + ")")
    kw, _ = hf.read_config(hf_dir)
    if has_tokenizer(hf_dir):
        enc = load_tokenizer(hf_dir)
    elif kw["vocab_size"] >= 100278:  # an OLMo-2 checkpoint: the dolma2 tokenizer
        enc = get_tokenizer("olmo2")
    else:
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json and its vocabulary ({kw['vocab_size']}) "
                                "is not OLMo-2's; cannot render tasks for it")
    if enc.n_vocab > kw["vocab_size"]:
        raise ValueError(f"tokenizer {enc.name!r} has {enc.n_vocab} tokens but the model only {kw['vocab_size']}")
    val, note = None, None  # the validation data: --val_data, or the training run's dataset folder
    cfg_path = os.path.join(path, "train_config.json")
    if val_data == "none":
        note = "skipped (--val_data=none)"
    elif val_data:
        val = val_data
    elif os.path.exists(cfg_path):
        dataset = str(read_json(cfg_path).get("dataset"))
        val = dataset if os.path.isdir(dataset) else os.path.join(DATA_DIR, dataset)
        if not os.path.isdir(val):
            raise EvalError(f"{cfg_path} names the dataset {dataset!r}, but {val} does not exist, so the held-out "
                            "loss (the general dimension) cannot be measured: pass --val_data=<data folder> "
                            "(or --val_data=none to skip it)")
    else:
        note = "not measured: no validation data is known for this checkpoint (pass --val_data=<data folder>)"
    if val is not None:
        data = TokenDataset(val, "val", kw["block_size"], seed=0)
        if (data.tokenizer, data.n_vocab) != (enc.name, enc.n_vocab):
            raise EvalError(f"{val} was tokenized with {data.tokenizer} (n_vocab {data.n_vocab}) but {path} uses "
                            f"{enc.name} (n_vocab {enc.n_vocab}): pass the model's own data with --val_data")
    return dict(hf_dir=hf_dir, config=kw, enc=enc, val=val, val_note=note)


def check_length_fits(model, length, device, fix="pass smaller --lengths"):
    """Refuse lengths whose KV cache and activations would not fit in memory."""
    c = model.config
    per_token = 4 * (2 * c.n_layer * c.n_kv_head * c.head_dim + 8 * c.n_embd + 3 * c.intermediate_size + c.n_head * 4)
    need = per_token * length + sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        raise MemoryError(f"length {length} needs about {need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB "
                          f"available on {device}; {fix}")


def check_device(name) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device={name!r} is not a device; use cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device={name}: only cpu and cuda devices are supported")
    if device.type == "cuda" and (device.index or 0) >= count:
        raise EvalError(f"--device={name} but this torch ({torch.__version__}) sees {count or 'no'} CUDA device(s); "
                        "use --device=cpu")
    return device
