"""
Train a RePo language model (or its RoPE / NoPE baselines): one script from a 2-core laptop to 8 GPUs.

    python train.py                                        # tiny RePo model on Python's own docs, CPU, ~3 min
    python train.py config/repo_124m.py --pos_mode=rope    # a preset, then overrides (later ones win)
    torchrun --standalone --nproc_per_node=8 train.py config/olmo2_1b_repo.py --init_from=/ckpt/OLMo-2-0425-1B
    python train.py --init_from=resume --out_dir=out       # continue out_dir's run exactly where it stopped

Follow a token: data/tokens.py cuts it out of a token file into a batch (the g-th sample of the run,
the same whatever the number of processes), model.py turns the batch into logits and a
cross-entropy loss, AdamW takes a step. Every eval_interval steps the run measures the val loss,
every ckpt_interval steps it writes out_dir/ckpt.pt, and at the end it exports out_dir/hf/.

Configuration: TrainConfig lists every key with its default, which is the tiny CPU run. A preset
(config/*.py) is a file of plain assignments; --key=value overrides are parsed and type-checked
against the field; unknown keys are refused. The resolved config is printed and saved.

Out_dir after a run (eval.py relies on it):
    train_config.json   the resolved TrainConfig
    log.jsonl           {"iter", "loss", "lr", "grad_norm", "ms", "tokens_per_s", "mfu", "mem_gib", "tokens"}
                        per logged step; {"iter", "val_loss"} per evaluation
    ckpt.pt             model, optimizer, schedule step, data position, RNG state, configs (with --fsdp:
                        ckpt_fsdp/, a torch.distributed.checkpoint directory + trainer_state.pt)
    hf/                 model.save_pretrained(...) + the tokenizer (data/tokenizer.py: save_tokenizer)
"""
import dataclasses
import difflib
import inspect
import json
import math
import os
import resource
import runpy
import shutil
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import stdlib_text
from data.files import atomic_open, replace_dir
from data.tokenizer import DATA_DIR, get_tokenizer, load_tokenizer, save_tokenizer
from data.tokens import TokenDataset
from model import GPT, POS_FIELDS, POS_MODES, GPTConfig
from rope_kernel import BACKENDS


@dataclass
class TrainConfig:
    # ----- I/O
    out_dir: str = "out"
    init_from: str = "scratch"       # 'scratch', 'resume' (out_dir's checkpoint) or an HF OLMo-2 checkpoint dir
    eval_interval: int = 50          # val loss every this many steps, and at the end
    eval_iters: int = 8              # val batches per evaluation (fixed windows, the same every time)
    log_interval: int = 10           # one log line every this many steps
    ckpt_interval: int = 0           # checkpoint every this many steps (and at the end); 0 = eval_interval
    sample_tokens: int = 200         # tokens sampled from the final model (0 = no sample)
    sample_prompt: str = ""          # prompt for that sample; '' starts a new document
    # ----- data
    dataset: str = "stdlib"          # folder under data/ (or a path) with train.bin, val.bin and tokenizer.json
    batch_size: int = 16             # sequences per micro-step and process
    block_size: int = 256            # tokens per sequence
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, counted over ALL processes
    # ----- model (GPTConfig in model.py; with init_from=<HF dir> the architecture comes from there)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0               # 0 = n_head
    n_embd: int = 128
    intermediate_size: int = 0       # 0 = 4 * n_embd
    vocab_size: int = 0              # 0 = the data's tokenizer n_vocab rounded up to a multiple of 128
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    pos_mode: str = "repo"           # 'repo', 'rope' or 'nope'
    repo_start_layer: int = -1       # first RePo layer; -1 = floor(n_layer / 3)
    layer_pattern: str = ""          # per-layer modes, tiled, e.g. "rope,rope,nope"; overrides pos_mode
    # ----- optimizer: AdamW
    learning_rate: float = 3e-3
    max_iters: int = 250             # optimizer steps
    weight_decay: float = 0.1        # on matrices (>= 2-D); see decay_embeddings / decay_norms
    decay_embeddings: bool = True    # OLMo-2 stage 2: False (its decay_embeddings)
    decay_norms: bool = False        # OLMo-2 stage 2: True (its decay_norm_and_bias)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0           # max global grad norm; 0 = no clipping
    z_loss: float = 0.0              # coefficient of mean(logsumexp(logits)^2); OLMo-2 uses 1e-5
    # ----- learning-rate schedule
    lr_schedule: str = "cosine"      # after warmup: 'cosine', 'linear' or 'constant'
    warmup_iters: int = 20
    lr_decay_iters: int = 0          # steps until min_lr; 0 = max_iters
    min_lr: float = 3e-4
    # ----- system
    device: str = "auto"             # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = "auto"              # 'auto' = bfloat16 autocast on CUDA, float32 on CPU; or 'float32', 'bfloat16'
    compile: bool = False            # torch.compile the model
    attn_backend: str = "auto"       # rope_kernel.repo_attention backend: 'auto', 'torch', 'triton', ...
    fsdp: bool = False               # shard parameters, gradients and optimizer state with FSDP2 (fully_shard)
    seed: int = 1337


FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# the architecture keys TrainConfig shares with GPTConfig (block_size and attn_backend are run settings)
MODEL_KEYS = tuple(k for k in GPTConfig.field_names() if k in FIELDS and k not in ("block_size", "attn_backend"))
FIXED_ON_RESUME = MODEL_KEYS + ("dataset", "seed", "fsdp")
CHOICES = dict(lr_schedule=("cosine", "linear", "constant"), dtype=("auto", "float32", "bfloat16"),
               pos_mode=POS_MODES, attn_backend=BACKENDS)


class TrainError(Exception):
    """A problem with the run's input (config, data, out_dir, checkpoint): reported without a traceback."""


# ----- configuration ---------------------------------------------------------------------------

def parse_args(argv) -> dict:
    """Preset files (plain assignments) and --key=value overrides, applied in order (later ones win)
    -> {key: value} for the keys given, each checked against TrainConfig's key names and types."""
    given = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise TrainError(f"expected --key=value, got {arg!r} (python train.py --help lists the keys)")
            items, source = {key: _parsed(key, value)}, "the command line"
        elif arg.endswith(".py") and os.path.isfile(arg):
            items = {k: v for k, v in runpy.run_path(arg).items()
                     if not k.startswith("_") and not callable(v) and not isinstance(v, types.ModuleType)}
            source = arg
        else:
            raise TrainError(f"{arg!r} is neither --key=value nor a preset file (config/*.py)")
        for key, value in items.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(key, FIELDS, n=1)
                raise TrainError(f"unknown config key {key!r} in {source}" + (f" (did you mean {close[0]!r}?)"
                                 if close else "") + f"; valid keys: {', '.join(FIELDS)}")
            want = FIELDS[key]
            value = float(value) if want is float and type(value) is int else value  # lr = 1 means 1.0
            if type(value) is not want:
                raise TrainError(f"{key} must be {want.__name__}, got {type(value).__name__} {value!r} in {source}")
            given[key] = value
    return given


def _parsed(key, text):
    """A command-line value as its key's type (unknown keys stay strings: parse_args names them)."""
    want = FIELDS.get(key, str)
    if want is str:
        return text
    try:
        return {"true": True, "1": True, "false": False, "0": False}[text.strip().lower()] if want is bool \
            else want(text.strip())
    except (KeyError, ValueError):
        raise TrainError(f"{key} must be {want.__name__}, got {text!r} on the command line") from None


def check_config(c: TrainConfig):
    positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "block_size",
                "gradient_accumulation_steps", "n_layer", "n_head", "n_embd")
    non_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens", "vocab_size",
                    "n_kv_head", "intermediate_size", "learning_rate", "min_lr", "weight_decay", "grad_clip", "z_loss")
    bad = [f"{k}={getattr(c, k)}" for k in positive if not getattr(c, k) >= 1] + \
          [f"{k}={getattr(c, k)}" for k in non_negative if not getattr(c, k) >= 0]  # `not >=` catches NaN
    if bad:
        raise TrainError(f"out of range: {', '.join(bad)}")
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise TrainError(f"{key}={getattr(c, key)!r}; choose one of {allowed}")
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        raise TrainError(f"beta1 and beta2 must lie in [0, 1), got {c.beta1}, {c.beta2}")
    if c.min_lr > c.learning_rate:
        raise TrainError(f"min_lr={c.min_lr} is above learning_rate={c.learning_rate}: the schedule would rise; "
                         "set min_lr <= learning_rate")


def usage() -> str:
    """--help: every key with its default (the tiny CPU run) and its comment in TrainConfig."""
    lines, comments = [], {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if name in FIELDS and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    for key, default in asdict(TrainConfig()).items():
        lines.append(f"  --{key}={default}".ljust(40) + comments.get(key, ""))
    return (__doc__.strip().split("\n\n")[1] + "\n\nkeys (--key=value; a preset config/*.py sets them too):\n"
            + "\n".join(lines))


def ceil_div(a, b):
    return -(-a // b)


def get_lr(it: int, c: TrainConfig) -> float:
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    end = c.lr_decay_iters or c.max_iters
    if c.lr_schedule == "constant" or end <= c.warmup_iters:
        return c.learning_rate
    ratio = min(1.0, (it - c.warmup_iters) / (end - c.warmup_iters))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if c.lr_schedule == "cosine" else 1.0 - ratio
    return c.min_lr + coeff * (c.learning_rate - c.min_lr)


# ----- model, optimizer, one optimizer step -----------------------------------------------------

def model_config(c: TrainConfig, n_vocab: int) -> GPTConfig:
    kw = {k: getattr(c, k) for k in MODEL_KEYS}
    kw["vocab_size"] = c.vocab_size or ceil_div(n_vocab, 128) * 128  # padded: faster matmuls, as OLMo-2 (100352)
    return GPTConfig(block_size=c.block_size, attn_backend=c.attn_backend, **kw)


def configure_optimizer(model, c: TrainConfig, device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.endswith("embed_tokens.weight")
        wd = c.decay_norms if p.dim() < 2 else (c.decay_embeddings or not is_embedding)
        (decay if wd else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.adam_eps,
                             fused=device.type == "cuda" and not c.fsdp)  # FSDP: foreach, the tested path


def autocast(device, c: TrainConfig):
    dtype = c.dtype if c.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    # float32: no autocast at all. RoPE angles and the positioner run in float32 either way (model.py)
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def train_step(model, optimizer, micro_batches, lr, c: TrainConfig, ctx, sync=None):
    """Forward/backward over this process's micro-batches, clip, AdamW. Returns (mean loss over all
    processes, grad norm) as floats; raises FloatingPointError before the update if either is NaN/inf."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for m, (x, y) in enumerate(micro_batches):
        if sync is not None:
            sync(m == n - 1)  # all-reduce gradients only after the last micro-step
        with ctx:
            logits, loss = model(x, y)
        objective = loss
        if c.z_loss:
            objective = loss + c.z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        (objective / n).backward()
        loss_sum += loss.detach().float()
    if dist.is_initialized():  # everyone must see the same number, and stop together if it is NaN
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
        gnorm = gnorm.full_tensor()
    loss, gnorm = torch.stack([loss_sum / n, gnorm.float()]).tolist()
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss {loss}, grad norm {gnorm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, gnorm


@torch.no_grad()
def evaluate(model, val: TokenDataset, c: TrainConfig, ctx, device, rank, world) -> float:
    windows = val.eval_windows(c.eval_iters * c.batch_size)
    mine = windows[rank::world]
    calls = ceil_div(ceil_div(len(windows), world), c.batch_size)  # equal on all ranks, as FSDP needs
    total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of token losses, token count
    for k in range(calls):
        part, weight = mine[k * c.batch_size:(k + 1) * c.batch_size], 1.0
        if not part:  # this rank ran out: a dummy forward that counts for nothing
            part, weight = windows[:1], 0.0
        x, y = val.windows_batch(part, device)
        with ctx:
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel() * weight
        total[1] += y.numel() * weight
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ----- MFU, memory -----------------------------------------------------------------------------

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); the first matching name wins
PEAK_BF16 = (("B200", 2.25e15), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
             ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("RTX 4090", 165e12),
             ("L4", 121e12))


def peak_flops(device, c: TrainConfig):
    """Per-device peak FLOP/s for this run's precision, or None (CPU, fp32, unknown GPU: MFU n/a)."""
    if device.type != "cuda" or (c.dtype == "float32"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), None)


def memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


# ----- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(c, raw, optimizer, meta, rank):
    if c.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        final = os.path.join(c.out_dir, "ckpt_fsdp")
        tmp = final + ".tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        msd, osd = get_state_dict(raw, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
        if rank == 0:
            torch.save(meta, os.path.join(tmp, "trainer_state.pt"))
            replace_dir(tmp, final)
        dist.barrier()
        return final
    final = os.path.join(c.out_dir, "ckpt.pt")
    if rank == 0:
        with atomic_open(final) as f:  # a crash mid-write leaves the previous checkpoint intact
            torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "meta": meta}, f)
    return final


def checkpoint_path(out_dir):
    for name in ("ckpt.pt", "ckpt_fsdp", "ckpt_fsdp.old"):  # .old: a crash between the two renames
        if os.path.exists(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    return None


def read_checkpoint(path) -> dict:
    """{"meta": ...} (+ "model", "optimizer" for ckpt.pt); tensors only, so weights_only loading works."""
    try:
        if os.path.isdir(path):
            return {"meta": torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
        if not {"model", "optimizer", "meta"} <= set(state):
            raise ValueError(f"keys {sorted(state)} instead of model/optimizer/meta")
        return state
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing here
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}). It was not "
                         "modified; restore a copy, or start a new run with another out_dir") from None


# ----- the run ---------------------------------------------------------------------------------

def main(argv):
    given = parse_args(argv)
    init_from = given.get("init_from", TrainConfig.init_from)
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    ckpt = checkpoint_path(out_dir)
    resume = init_from == "resume"
    if resume and ckpt is None:
        raise TrainError(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt_fsdp/)")
    if not resume and ckpt is not None:
        raise TrainError(f"{out_dir} already holds a run's checkpoint ({ckpt}); continue it with --init_from=resume "
                         "or choose another --out_dir (nothing was overwritten)")
    state = read_checkpoint(ckpt) if resume else None
    base = {k: v for k, v in state["meta"]["config"].items() if k in FIELDS} if resume else {}
    if resume:
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != base[k]]
        if changed:
            raise TrainError(f"cannot change {changed} when resuming (the checkpoint has "
                             f"{ {k: base[k] for k in changed} }); start a new run instead")
    c = TrainConfig(**{**base, **given})
    check_config(c)

    # processes and devices: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if c.fsdp and not distributed:
        raise TrainError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=8 train.py ... --fsdp=True)")
    if c.gradient_accumulation_steps % world:
        raise TrainError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} counts micro-steps over all "
                         f"{world} processes and must be a multiple of {world}")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run(c, given, state, rank, world, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def load_data(c: TrainConfig, master):
    """(train, val, tokenizer, folder); the embedded default dataset is built on first use, by rank 0."""
    folder = c.dataset if os.path.isdir(c.dataset) else os.path.join(DATA_DIR, c.dataset)
    if c.dataset == "stdlib" and master and not stdlib_text.is_prepared(folder):
        print(f"preparing the embedded stdlib dataset in {folder} (first use only) ...")
        stdlib_text.prepare(folder, verbose=True)
    if dist.is_initialized():
        dist.barrier()
    train_data = TokenDataset(folder, "train", c.block_size, c.seed)
    val_data = TokenDataset(folder, "val", c.block_size, c.seed)
    enc = load_tokenizer(folder) if os.path.exists(os.path.join(folder, "tokenizer.json")) \
        else get_tokenizer(train_data.tokenizer)
    for d in (train_data, val_data):
        if (d.tokenizer, d.n_vocab) != (enc.name, enc.n_vocab):
            raise TrainError(f"{folder}: token files were made with {d.tokenizer} (n_vocab {d.n_vocab}) but the "
                             f"folder's tokenizer is {enc.name} (n_vocab {enc.n_vocab}); prepare the data again")
    return train_data, val_data, enc, folder


def build_model(c: TrainConfig, given, state, enc):
    """(model on the CPU, config): fresh, from an HF checkpoint (continual pre-training; the config's
    architecture keys are replaced by the checkpoint's), or shaped like our checkpoint."""
    if state is not None:
        raw = GPT(GPTConfig(**{**state["meta"]["model_config"], "attn_backend": c.attn_backend}))
    elif c.init_from != "scratch":
        over = {k: getattr(c, k) for k in POS_FIELDS if k in given}  # else keep the checkpoint's own modes
        try:
            raw = GPT.from_pretrained(c.init_from, block_size=c.block_size, attn_backend=c.attn_backend, **over)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(f"cannot start from {c.init_from!r}: {e}") from None
        ours = {k: getattr(raw.config, k) for k in MODEL_KEYS}
        clash = {k: (given[k], v) for k, v in ours.items() if k in given and given[k] != v and k not in POS_FIELDS}
        if clash:
            raise TrainError(f"{clash} (given, checkpoint): the architecture of {c.init_from} is fixed")
        c = dataclasses.replace(c, **ours)  # record what was actually loaded
    else:
        raw = GPT(model_config(c, enc.n_vocab))
    V = raw.config.vocab_size
    if not enc.n_vocab <= V <= ceil_div(enc.n_vocab, 1024) * 1024:
        raise TrainError(f"the model's vocabulary ({V}) does not fit the data's tokenizer {enc.name} "
                         f"(n_vocab {enc.n_vocab}): the data was tokenized for another model; prepare it with "
                         "the model's tokenizer (python -m data.prepare --tokenizer=...)")
    trained_on = state["meta"]["tokenizer"] if state is not None else None
    if c.init_from not in ("scratch", "resume") and os.path.exists(os.path.join(c.init_from, "tokenizer.json")):
        trained_on = load_tokenizer(c.init_from).name  # one of our own exports
    if trained_on not in (None, enc.name):
        raise TrainError(f"the model was trained with tokenizer {trained_on!r} but the data is {enc.name!r}")
    return raw, c


def parallelize(raw, c: TrainConfig, device):
    """(module to call, sync): FSDP2 shards every block and then the rest; DDP replicates; compile
    goes inside DDP. sync(last) tells the wrapper whether this micro-step should reduce gradients."""
    model, sync = raw, None
    if c.fsdp:
        import warnings
        from torch.distributed.fsdp import fully_shard
        # blocks return (hidden, positions); the positions are views that are never modified in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for block in raw.model.layers:
            fully_shard(block)
        fully_shard(raw)
        sync = raw.set_requires_gradient_sync
    if c.compile:
        model = torch.compile(model)
    if dist.is_initialized() and not c.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        sync = lambda last: setattr(model, "require_backward_grad_sync", last)  # noqa: E731
    return model, sync


def restore(c: TrainConfig, raw, optimizer, state, device):
    if c.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(raw, optimizer)
        try:
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=checkpoint_path(c.out_dir))
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"checkpoint {checkpoint_path(c.out_dir)} is corrupt or unreadable ({e})") from None
        set_state_dict(raw, optimizer, model_state_dict=msd, optim_state_dict=osd)
    else:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    rng = state["meta"]["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def export(c: TrainConfig, raw, enc, ctx, master):
    """out_dir/hf = save_pretrained + the tokenizer (replaced as a whole), then a sample on rank 0."""
    model = raw
    if c.fsdp:  # gather the full weights onto rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            model = GPT(raw.config)
            model.load_state_dict(full)
    if not master:
        return
    hf_dir = os.path.join(c.out_dir, "hf")
    shutil.rmtree(hf_dir + ".tmp", ignore_errors=True)
    model.save_pretrained(hf_dir + ".tmp", eos_token_id=enc.eot_token, pad_token_id=enc._special_tokens.get("<|pad|>"))
    save_tokenizer(enc, hf_dir + ".tmp")
    replace_dir(hf_dir + ".tmp", hf_dir)
    print(f"exported {hf_dir} (GPT.from_pretrained; tokenizer: data.tokenizer.load_tokenizer)")
    if c.sample_tokens:
        prompt = enc.encode_ordinary(c.sample_prompt) if c.sample_prompt else [enc.eot_token]
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        with torch.no_grad(), (ctx if model is raw else nullcontext()):
            out = model.generate(idx, c.sample_tokens, temperature=0.8, top_k=50)
        text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])  # padded ids are never trained
        print(f"----- sample ({c.sample_tokens} tokens, temperature 0.8, top-k 50) -----\n{text}\n-----")


def logged_before(record, start) -> bool:
    """Whether a log record belongs to the run up to its checkpoint at iteration `start`: steps 1..start
    were done before it; the val loss at `start` is measured again when the run resumes."""
    return record["iter"] < start or (record["iter"] == start and "loss" in record)


def run(c: TrainConfig, given: dict, state, rank, world, device):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data, val_data, enc, folder = load_data(c, master)
    torch.manual_seed(c.seed)  # the same initial weights on every rank
    raw, c = build_model(c, given, state, enc)
    raw.to(device)
    model, sync = parallelize(raw, c, device)
    optimizer = configure_optimizer(raw, c, device)
    ctx = autocast(device, c)
    start, samples, best_val = 0, 0, float("inf")  # samples: global sequences consumed = the data position
    if state is not None:
        restore(c, raw, optimizer, state, device)
        start, samples, best_val = (state["meta"][k] for k in ("iter_num", "samples_seen", "best_val_loss"))
        say(f"resuming from iteration {start} ({samples} samples seen) of {checkpoint_path(c.out_dir)}")
        state = None  # free the CPU copy

    tokens_per_step = c.gradient_accumulation_steps * c.batch_size * c.block_size
    flops_per_step = raw.flops_per_token(c.block_size) * tokens_per_step
    peak = peak_flops(device, c)
    log_path = os.path.join(c.out_dir, "log.jsonl")
    if master:
        os.makedirs(c.out_dir, exist_ok=True)
        with open(os.path.join(c.out_dir, "train_config.json"), "w") as f:
            json.dump(asdict(c), f, indent=1)
        keep = []
        if start and os.path.exists(log_path):  # drop what the interrupted run logged after its checkpoint
            with open(log_path) as f:
                keep = [line for line in f if line.strip() and logged_before(json.loads(line), start)]
        with open(log_path, "w") as f:
            f.writelines(keep)
    say("config: " + ", ".join(f"{k}={v!r}" for k, v in asdict(c).items()))
    say(f"{world} process(es) on {device}, {raw.num_params() / 1e6:.2f}M parameters (non-embedding), layers "
        f"{','.join(raw.config.layer_modes())}; {tokens_per_step:,} tokens per step; data {folder}: "
        f"{sum(h['count'] for h in train_data.headers):,} train tokens, tokenizer {enc.name} (n_vocab {enc.n_vocab})")

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(it):
        meta = dict(config=asdict(c), model_config=asdict(raw.config), iter_num=it, samples_seen=samples,
                    best_val_loss=best_val, tokenizer=enc.name, world_size=world,
                    rng=dict(torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        return save_checkpoint(c, raw, optimizer, meta, rank)

    # the loop: evaluate/checkpoint at the top, so the checkpoint of iteration `it` holds the state
    # after `it` steps, and resuming from it runs step `it` next
    local = c.gradient_accumulation_steps // world
    per_step = c.gradient_accumulation_steps * c.batch_size  # sequences per optimizer step, all processes
    every = c.ckpt_interval or c.eval_interval
    last_ckpt, it, elapsed, timed = None, start, 0.0, 0
    while True:
        final = it >= c.max_iters
        if it % c.eval_interval == 0 or final:
            val_loss = evaluate(model, val_data, c, ctx, device, rank, world)
            best_val = min(best_val, val_loss)
            say(f"iter {it}: val loss {val_loss:.4f}")
            log({"iter": it, "val_loss": val_loss})
        if it > start and (it % every == 0 or final):
            last_ckpt = (it, save(it))
        if final:
            break
        lr = get_lr(it, c)
        t0 = time.perf_counter()  # step time: data, forward, backward, update (not evaluation)
        first = samples + rank * local * c.batch_size  # this process's slice of the global batch
        micro = [train_data.batch(range(first + m * c.batch_size, first + (m + 1) * c.batch_size), device)
                 for m in range(local)]
        try:
            loss, gnorm = train_step(model, optimizer, micro, lr, c, ctx, sync)
        except FloatingPointError as e:
            kept = f"the last good checkpoint is {last_ckpt[1]} (iteration {last_ckpt[0]})" if last_ckpt else \
                (f"the checkpoint this run resumed from, {checkpoint_path(c.out_dir)}, is untouched"
                 if start else "no checkpoint had been written yet")
            raise TrainError(f"non-finite values at iteration {it} ({e}); stopped before the update; {kept}. "
                             "Lower learning_rate or raise warmup_iters, then --init_from=resume") from None
        samples += per_step
        it += 1
        elapsed, timed = elapsed + time.perf_counter() - t0, timed + 1
        if it % c.log_interval == 0 or it == start + 1 or it == c.max_iters:
            dt = elapsed / timed  # mean over the steps since the last log line
            mfu = flops_per_step / dt / (peak * world) if peak else None
            rec = dict(iter=it, loss=loss, lr=lr, grad_norm=gnorm, ms=1000 * dt, tokens_per_s=tokens_per_step / dt,
                       mfu=mfu, mem_gib=memory_gib(device), tokens=samples * c.block_size)
            log(rec)
            say(f"iter {it}: loss {loss:.4f} | lr {lr:.2e} | grad {gnorm:.3f} | {rec['ms']:.0f} ms | "
                f"{rec['tokens_per_s']:,.0f} tok/s | MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'} | "
                f"mem {rec['mem_gib']:.2f} GiB")
            elapsed, timed = 0.0, 0
    export(c, raw, enc, ctx, master)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except (TrainError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
