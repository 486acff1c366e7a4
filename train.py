"""
Train a RePo language model (or its RoPE / NoPE baselines): one script from a 2-core laptop to 8 GPUs.

    python train.py                                        # tiny RePo model on Python's own docs, CPU, ~3 min
    python train.py config/repo_124m.py --pos_mode=rope    # a preset, then overrides (later ones win)
    torchrun --standalone --nproc_per_node=8 train.py config/olmo2_1b_repo.py --init_from=/ckpt/OLMo-2-0425-1B
    python train.py --init_from=resume --out_dir=out       # continue out_dir's run exactly where it stopped
    python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=8   # memory per GPU, nothing allocated

Follow a token: data/tokens.py cuts it out of a token file into a batch (the g-th sample of the run,
the same whatever the number of processes), model.py turns the batch into a cross-entropy
loss (from the final hidden states, chunk by chunk: model.lm_loss), AdamW takes a step. Every eval_interval steps the run measures the val loss,
every ckpt_interval steps it writes out_dir/ckpt.pt, and at the end it exports out_dir/hf/.

Configuration: TrainConfig lists every key with its default, which is the tiny CPU run. A preset
(config/*.py) is a file of plain assignments; --key=value overrides are parsed and type-checked
against the field; unknown keys are refused. The resolved config is printed and saved.

Nothing is lost and nothing fails silently: a new run refuses a non-empty out_dir (resume it, or
--overwrite=true), a second run into an out_dir in use is refused (out_dir/train.lock, held while a
run lives), checkpoints are verified byte for byte when read, every file is written atomically
(data/files.py: a full or read-only disk is a clear error and the previous file stays), and SIGTERM
or Ctrl-C finish the current step, write a checkpoint, print the resume command and exit 128 + signal.

Out_dir after a run (eval.py relies on it):
    train_config.json   the resolved TrainConfig
    log.jsonl           {"iter", "loss", "lr", "grad_norm", "ms", "tokens_per_s", "mfu", "mem_gib", "tokens"}
                        per logged step; {"iter", "val_loss"} per evaluation
    ckpt.pt             model, optimizer, schedule step, data position, RNG state, configs (with --fsdp:
                        ckpt_fsdp/, a torch.distributed.checkpoint directory + trainer_state.pt)
    hf/                 model.save_pretrained(...) + the tokenizer (data/tokenizer.py: save_tokenizer)
    train.lock          only while a run lives (out_dir_lock)
"""
import dataclasses
import difflib
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import resource
import runpy
import shlex
import signal
import socket
import sys
import threading
import time
import types
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import stdlib_text
from data.files import append_line, atomic_open, atomic_write, make_dirs, remove, replace_dir, writing
from data.tokenizer import DATA_DIR, get_tokenizer, load_tokenizer, save_tokenizer
from data.tokens import TokenDataset
import hf_checkpoint
from model import GPT, LOSS_CHUNK_LOGITS, POS_FIELDS, POS_MODES, GPTConfig
from rope_kernel import BACKENDS


@dataclass
class TrainConfig:
    # ----- I/O
    out_dir: str = "out"
    init_from: str = "scratch"       # 'scratch', 'resume' (out_dir's checkpoint) or an HF OLMo-2 checkpoint dir
    overwrite: bool = False          # start anew in a non-empty out_dir, deleting its run files (never with resume)
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
    gradient_accumulation_steps: int = 0  # micro-steps per optimizer step, counted over ALL processes; 0 = 1 per process
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
    activation_checkpointing: bool = False  # recompute each block in backward: saved activations ~1/n_layer
    seed: int = 1337
    # ----- memory plan (no training): python train.py <preset> --dry_run --dry_run_world=8
    dry_run: bool = False            # print the per-GPU memory plan (model on the meta device) and exit
    dry_run_world: int = 0           # processes (GPUs) for the plan; 0 = this run's (WORLD_SIZE or 1)
    dry_run_gpu: str = "H100"        # the GPU to fit, a name from GPUS in train.py (e.g. "H200", "A100 40GB")


FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# the architecture keys TrainConfig shares with GPTConfig (block_size and attn_backend are run settings)
MODEL_KEYS = tuple(k for k in GPTConfig.field_names() if k in FIELDS and k not in ("block_size", "attn_backend"))
FIXED_ON_RESUME = MODEL_KEYS + ("dataset", "seed", "fsdp")
CHOICES = dict(lr_schedule=("cosine", "linear", "constant"), dtype=("auto", "float32", "bfloat16"),
               pos_mode=POS_MODES, attn_backend=BACKENDS)


class TrainError(Exception):
    """A problem with the run's input (config, data, out_dir, checkpoint): reported without a traceback."""


class Stopped(TrainError):
    """SIGTERM or SIGINT stopped the run after a checkpoint; code is the exit status (128 + signal)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ----- configuration ---------------------------------------------------------------------------

def parse_args(argv) -> dict:
    """Preset files (plain assignments) and --key=value overrides, applied in order (later ones win)
    -> {key: value} for the keys given, each checked against TrainConfig's key names and types."""
    given = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq and FIELDS.get(key) is bool:  # a bare --dry_run means --dry_run=true
                eq, value = "=", "true"
            if not eq:
                raise TrainError(f"expected --key=value, got {arg!r} (python train.py --help lists the keys)")
            items, source = {key: _parsed(key, value)}, "the command line"
        elif arg.endswith(".py") and os.path.isfile(arg):
            try:
                ran = runpy.run_path(arg)
            except Exception as e:  # noqa: BLE001 - a preset is user code: say which file failed and how
                raise TrainError(f"preset {arg} does not run: {type(e).__name__}: {e}") from None
            items = {k: v for k, v in ran.items()
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
    positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "n_layer", "n_head", "n_embd")
    non_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens", "vocab_size",
                    "n_kv_head", "intermediate_size", "learning_rate", "min_lr", "weight_decay", "grad_clip", "z_loss",
                    "gradient_accumulation_steps", "dry_run_world")
    bad = [f"{k}={getattr(c, k)}" for k in positive if not getattr(c, k) >= 1] + \
          [f"{k}={getattr(c, k)}" for k in non_negative if not getattr(c, k) >= 0]  # `not >=` catches NaN
    bad += [f"{k}={v}" for k, v in asdict(c).items() if isinstance(v, float) and not math.isfinite(v)]
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
    if not c.out_dir or not c.dataset:
        raise TrainError("out_dir and dataset must not be empty")
    if c.overwrite and c.init_from == "resume":
        raise TrainError("overwrite=True starts a new run in out_dir; it cannot be combined with init_from=resume")
    if c.device != "auto":
        try:
            device = torch.device(c.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise TrainError(f"device={c.device!r} is not a device train.py runs on; use auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"device={c.device!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device=cpu (or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise TrainError(f"device={c.device!r} but there are only {torch.cuda.device_count()} CUDA devices")


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


def with_accumulation(c: TrainConfig, world: int) -> TrainConfig:
    """c with gradient_accumulation_steps resolved for `world` processes: 0 (the default) is one
    micro-step per process, so the defaults work on any process count; other values must divide."""
    if c.gradient_accumulation_steps == 0:
        return dataclasses.replace(c, gradient_accumulation_steps=world)
    if c.gradient_accumulation_steps % world:
        raise TrainError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} counts micro-steps over all "
                         f"{world} processes and must be a multiple of {world}: use --gradient_accumulation_steps="
                         f"{ceil_div(c.gradient_accumulation_steps, world) * world}, or 0 for one per process")
    return c


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


def compute_dtype(device_type, c: TrainConfig) -> str:
    return c.dtype if c.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")


def autocast(device, c: TrainConfig):
    # float32: no autocast at all. RoPE angles and the positioner run in float32 either way (model.py).
    # With activation checkpointing, autocast's cache of bf16 weight copies would keep a copy of
    # every weight alive until the forward ends; without it each block casts its own, again when recomputed
    if compute_dtype(device.type, c) != "bfloat16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not c.activation_checkpointing)


def train_step(model, optimizer, micro_batches, lr, c: TrainConfig, ctx, sync=None):
    """Forward/backward over this process's micro-batches, clip, AdamW. Returns (mean cross-entropy
    over all processes, grad norm) as floats; raises FloatingPointError before the update if either is
    NaN/inf. The z-loss (c.z_loss) is in the gradient, not in the returned loss (model.lm_loss)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for m, (x, y) in enumerate(micro_batches):
        if sync is not None:
            sync(m == n - 1)  # all-reduce gradients only after the last micro-step
        with ctx:
            _, loss = model(x, y, z_loss=c.z_loss)
        (loss / n).backward()
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

# name -> (dense bf16 tensor-core peak FLOP/s, memory GiB), from the vendors' datasheets. A device
# name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB") matches a key when the two have the same
# words once the vendor's brand and the memory words (80GB, HBM3, SXM4) are left out: L4, L40 and
# L40S are three GPUs, and an "RTX 4090 D" is none of these.
GPUS = {"B200": (2.25e15, 180), "H200": (989e12, 141), "H100": (989e12, 80), "H100 PCIe": (756e12, 80),
        "H100 NVL": (835e12, 94), "H800": (989e12, 80), "A100": (312e12, 80), "A100 PCIe": (312e12, 80),
        "A100 40GB": (312e12, 40), "A800": (312e12, 80), "L40S": (362e12, 48), "L40": (181e12, 48),
        "L4": (121e12, 24), "RTX 4090": (165e12, 24)}


def _gpu_words(name):
    words = name.upper().replace("-", " ").split()
    return [w for w in words if w not in ("NVIDIA", "GEFORCE", "TESLA") and not re.fullmatch(r"\d+GB|HBM\w*|SXM\d*", w)]


def gpu_spec(name: str):
    """(peak FLOP/s, memory GiB) of the GPUS key `name`, or of the key that names the same GPU, or None."""
    if name in GPUS:
        return GPUS[name]
    words = _gpu_words(name)
    return next((spec for key, spec in GPUS.items() if _gpu_words(key) == words), None)


def peak_flops(device, c: TrainConfig):
    """Per-device peak FLOP/s for this run's precision, or None (CPU, fp32, unknown GPU: MFU n/a)."""
    if device.type != "cuda" or (c.dtype == "float32"):
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec[0] if spec else None


def memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


# ----- memory plan: what one training step keeps per process, before anything is allocated ------

def block_activation_bytes(config: GPTConfig, mode: str, e: int, fused: bool) -> int:
    """Bytes one block saves for backward per token, counted tensor by tensor from model.py (checked
    against autograd's saved tensors in tests/test_scale.py). e: bytes of the matmul dtype (2 under
    bf16 autocast, 4 in float32); fused: the Triton attention kernels (else the PyTorch reference)."""
    d, I, H = config.n_embd, config.intermediate_size, config.n_head
    dq, dkv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    mixed = e != 4
    n = 3 * e * d if mixed else 4 * d          # inputs of q/k/v_proj: one bf16 cast each, or x itself
    n += 8 * dq + 4 + 8 * dkv + 4              # QK-norm: float32 input and normalised copy, 1/rms
    n += 2 * (8 * d + 4)                       # the two post-sublayer norms, likewise
    kv = dq if dkv != dq else dkv              # grouped-query attention repeats k and v to n_head heads
    n += e * (dq + 2 * kv + dq) + 4 * H        # attention keeps q, k, v, output and the log-sum-exp ...
    if not fused and mode != "nope":
        n += e * (dq + kv)                     # ... the reference path also the rotated q and k
    if fused or mode != "nope":                # input of o_proj, a copy unless SDPA already wrote the
        n += e * d                             # output as [B, T, H*D] (reference path, unrotated q)
    n += 2 * e * d if mixed else 4 * d         # inputs of gate/up_proj
    n += 4 * e * I                             # gate, up, silu(gate), their product (input of down_proj)
    if mode == "repo":                         # positioner in float32: x, gate, silu, content, r; positions
        n += (4 * d if mixed else 0) + 4 * 4 * (d // 8) + 4 * config.n_kv_head
    return n


def memory_plan(raw, c: TrainConfig, world: int, device_type: str) -> list:
    """[(what, bytes per process)] for one optimizer step of `raw` (built on the meta device: only
    shapes are read) with c's micro-batch, precision, DDP or FSDP2 and activation checkpointing.
    Counted, not measured: parameters, gradients and AdamW state exactly; activations from
    block_activation_bytes; the peaks of forward, backward and the optimizer step are simply added."""
    cfg = raw.config
    blocks = raw.model.layers
    P = sum(p.numel() for p in raw.parameters())
    P_blk = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    P_root = P - sum(p.numel() for b in blocks for p in b.parameters())  # embeddings, final norm, LM head
    mm_blk = max(sum(m.weight.numel() for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                     b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)) for b in blocks)
    mixed = compute_dtype(device_type, c) == "bfloat16"
    e = 2 if mixed else 4
    N = c.batch_size * c.block_size  # tokens per micro-step and process
    fused = device_type == "cuda" and cfg.attn_backend != "torch" and cfg.head_dim in (32, 64, 128)
    per_block = [block_activation_bytes(cfg, mode, e, fused) for mode in cfg.layer_modes()]
    d, V = cfg.n_embd, cfg.vocab_size
    top = 8 * d + 4 + e * d + 4 + 16  # final norm; the loss's h, logsumexp, targets and input ids
    kept = len(blocks) * 4 * d if c.activation_checkpointing else sum(per_block)  # AC: block inputs only
    chunk = max(1, LOSS_CHUNK_LOGITS // V)
    plan = []
    if c.fsdp:
        plan += [("parameters, float32 shard", 4 * P / world), ("gradients, float32 shard", 4 * P / world),
                 ("AdamW moments + step temporaries, shard", 12 * P / world),
                 ("all-gathered parameters (root + 3 blocks)", 4 * (P_root + 3 * P_blk)),
                 ("unsharded gradients (root + 2 blocks)", 4 * (P_root + 2 * P_blk))]
    else:
        fused_adam = device_type == "cuda"  # configure_optimizer: fused on CUDA, foreach temporaries else
        plan += [("parameters, float32", 4 * P), ("gradients, float32", 4 * P),
                 ("AdamW moments" + ("" if fused_adam else " + step temporaries"), (8 if fused_adam else 12) * P)]
    if mixed:  # autocast's bf16 copies of the block matmul weights, saved for backward (AC: one block's)
        plan.append(("bf16 weight copies (autocast)",
                     2 * mm_blk * (1 if c.activation_checkpointing else len(blocks))))
    plan += [(f"activations saved for backward ({c.batch_size} x {c.block_size} tokens)", N * (kept + top)),
             ("backward working set (one block)", N * max(per_block)),
             (f"LM loss: {chunk} tokens x {V} logits at a time", chunk * V * (2 * e + 8) + (e * V * d if mixed else 0))]
    return plan


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory(device, processes: int):
    """(bytes this process may use, where): free memory of its GPU, or its share of the RAM that
    /proc/meminfo calls available (MemAvailable), split between the processes of this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], torch.cuda.get_device_name(device)
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None, "this machine"  # not Linux: no check
    return kib * 1024 // processes, "this machine's RAM" + (f" / {processes} processes" if processes > 1 else "")


def check_memory(raw, c: TrainConfig, device, world):
    """Refuse, before anything is allocated, a step whose memory plan exceeds what the device has."""
    plan = memory_plan(raw, c, world, device.type)
    need = sum(b for _, b in plan)
    have, where = available_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if have is None or need <= have:
        return
    big = ", ".join(f"{what} {gib(b)}" for what, b in sorted(plan, key=lambda x: -x[1])[:3])
    act = dict(plan)[f"activations saved for backward ({c.batch_size} x {c.block_size} tokens)"]
    raise TrainError(f"one training step needs about {gib(need)} per process ({big}) but {where} has "
                     f"{gib(have)} available; lower batch_size (now {c.batch_size}, {act / c.batch_size / 2**20:.1f} MiB "
                     f"of activations per sequence) or block_size (now {c.block_size})"
                     + ("" if c.activation_checkpointing else ", or set activation_checkpointing=True")
                     + (", or use fsdp=True" if world > 1 and not c.fsdp else "")
                     + "; python train.py ... --dry_run prints the whole plan")


def dry_run(given: dict):
    """--dry_run: the memory plan of the configured run on dry_run_world x dry_run_gpu, from a
    model built on the meta device (nothing is allocated, no data or checkpoint weights are read)."""
    c = TrainConfig(**given)
    check_config(c)
    world = c.dry_run_world or int(os.environ.get("WORLD_SIZE", 1))
    spec = gpu_spec(c.dry_run_gpu)
    if spec is None:
        raise TrainError(f"dry_run_gpu={c.dry_run_gpu!r} is not a GPU this script knows; choose one of {list(GPUS)}")
    c = with_accumulation(c, world)
    n_vocab = c.vocab_size
    if not n_vocab and not os.path.isdir(c.init_from):
        folder = c.dataset if os.path.isdir(c.dataset) else os.path.join(DATA_DIR, c.dataset)
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
            raise TrainError(f"vocab_size=0 takes the data's tokenizer, and {folder} has none; give --vocab_size")
        n_vocab = load_tokenizer(folder).n_vocab
    if c.init_from != "scratch" and not os.path.isdir(c.init_from):
        c = dataclasses.replace(c, init_from="scratch")  # the preset's checkpoint is not here: its keys say the shape
    torch.manual_seed(c.seed)
    raw, c, _ = build_model(c, given, n_vocab)
    plan = memory_plan(raw, c, world, "cuda")
    total, usable = sum(b for _, b in plan), 0.9 * spec[1] * 2**30
    print(f"memory plan per GPU: {raw.num_params(non_embedding=False) / 1e9:.3f}B parameters, "
          f"{'FSDP2' if c.fsdp else 'DDP'} on {world} x {c.dry_run_gpu} ({spec[1]} GiB), micro-batch "
          f"{c.batch_size} x {c.block_size} tokens, {compute_dtype('cuda', c)}, activation checkpointing "
          f"{'on' if c.activation_checkpointing else 'off'}")
    for what, b in plan:
        print(f"  {what:52s} {gib(b):>11s}")
    print(f"  {'total':52s} {gib(total):>11s}  of {gib(usable)} usable (90%: the rest for the CUDA context, "
          f"NCCL and fragmentation): {'fits' if total <= usable else 'does NOT fit'}")
    return total <= usable


# ----- checkpoints and the out_dir -------------------------------------------------------------

RUN_FILES = ("ckpt.pt", "ckpt_fsdp", "ckpt_fsdp.old", "log.jsonl", "train_config.json", "hf", "hf.old")
LOCK = "train.lock"  # held by the run that uses out_dir (see out_dir_lock)


def save_checkpoint(c, raw, optimizer, meta, rank):
    if c.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        final = os.path.join(c.out_dir, "ckpt_fsdp")
        tmp = final + ".tmp"
        if rank == 0:
            remove(tmp)
        dist.barrier()
        msd, osd = get_state_dict(raw, optimizer)
        with writing(final, cleanup=tmp if rank == 0 else None):
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
            if rank == 0:  # the shards' digests go into trainer_state.pt, which its zip CRCs protect
                meta = dict(meta, sha256={name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))})
                with atomic_open(os.path.join(tmp, "trainer_state.pt")) as f:
                    torch.save(meta, f)
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


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_zip(path):
    """torch.save writes a zip whose every record (tensor data, the pickled meta) carries a CRC-32,
    which torch.load never checks: flipped bytes would load silently."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"its record {bad} fails its CRC-32 check: bytes were flipped or overwritten")


META_KEYS = ("config", "model_config", "iter_num", "samples_seen", "best_val_loss", "tokenizer", "rng")


def check_meta(meta):
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise ValueError(f"its trainer state lacks {missing}: not a train.py checkpoint")


def read_checkpoint(path, verify=True) -> dict:
    """{"meta": ...} (+ "model", "optimizer" for ckpt.pt); tensors only, so weights_only loading works.
    verify: check every byte first (ckpt.pt: the zip's CRC-32s; ckpt_fsdp/: the sha256 of each shard)."""
    try:
        if os.path.isdir(path):
            state_file = os.path.join(path, "trainer_state.pt")
            if verify:
                check_zip(state_file)
            meta = torch.load(state_file, map_location="cpu", weights_only=True)
            if verify:  # checkpoints written before the digests were recorded have none to check
                for name, digest in meta.get("sha256", {}).items():
                    file = os.path.join(path, name)
                    if not os.path.exists(file):
                        raise ValueError(f"its file {name} is missing")
                    if sha256(file) != digest:
                        raise ValueError(f"{file} does not match the sha256 recorded when it was written")
            check_meta(meta)
            return {"meta": meta}
        if verify:
            check_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
        if not {"model", "optimizer", "meta"} <= set(state):
            raise ValueError(f"keys {sorted(state)} instead of model/optimizer/meta")
        check_meta(state["meta"])
        return state
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing here
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}). It was not "
                         "modified; restore a copy, or start a new run with another out_dir") from None


@contextmanager
def out_dir_lock(out_dir, take=True):
    """Hold an exclusive lock on out_dir/train.lock while the run lives (rank 0 takes it), so a second
    run into the same out_dir is refused instead of interleaving logs and overwriting files. The
    kernel releases the lock when the process ends, kill -9 included; a normal exit also removes the
    file, and the out_dir itself if this run created it and wrote nothing into it."""
    if not take:
        yield
        return
    created = not os.path.exists(out_dir)
    make_dirs(out_dir)
    path = os.path.join(out_dir, LOCK)
    while True:
        with writing(path, kept="nothing was written"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is still starting"
            os.close(fd)
            raise TrainError(f"{out_dir} is in use by another train.py run ({holder}; lock file {path}): wait for "
                             "it to finish or stop it, or choose another --out_dir") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file while we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield
    finally:
        remove(path)
        os.close(fd)
        if created:
            try:
                os.rmdir(out_dir)  # only if empty: a run refused before it wrote anything leaves nothing
            except OSError:
                pass


def check_out_dir(c: TrainConfig):
    """A new run may only start in an empty (or missing) out_dir, unless overwrite=True."""
    entries = sorted(set(os.listdir(c.out_dir)) - {LOCK}) if os.path.isdir(c.out_dir) else []
    if entries and not c.overwrite:
        ckpt = checkpoint_path(c.out_dir)
        what = f"a run's checkpoint ({ckpt}); continue it with --init_from=resume" if ckpt else \
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''} but no checkpoint to resume from"
        raise TrainError(f"{c.out_dir} already holds {what}, or choose another --out_dir, or pass --overwrite=true "
                         f"to delete its run files ({', '.join(RUN_FILES)}) and start anew; nothing was changed")


def resume_command(c: TrainConfig, world: int) -> str:
    script = os.path.relpath(os.path.abspath(__file__))
    if world == 1:
        launcher = "python"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        launcher = f"torchrun --standalone --nproc_per_node={world}"
    else:
        launcher = "torchrun <this run's launcher options>"
    return f"{launcher} {shlex.quote(script)} --init_from=resume --out_dir={shlex.quote(c.out_dir)}"


def read_log(path, start) -> list:
    """The lines of log.jsonl that belong to the run up to its checkpoint at iteration `start`. A last
    line cut short (a kill during the write) is dropped; any other line that is not a log record is
    an error naming it, rather than a resume that silently loses or keeps the wrong records."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("iter"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok and n == len(lines):
            print(f"note: {path} ends in an incomplete line (the run was killed while writing it); dropped it")
        elif not ok:
            raise TrainError(f"{path}, line {n}, is not a log record ({line[:80]!r}); delete that line and resume again")
        elif logged_before(record, start):
            keep.append(line + "\n")
    return keep


@contextmanager
def stop_requests(master, launched):
    """While training, SIGTERM (what a cluster scheduler sends before preemption) and SIGINT (Ctrl-C)
    only ask the loop to stop; it finishes the step, writes a checkpoint and exits. Yields the list
    the handler appends the signal number to. A second signal stops at once (KeyboardInterrupt),
    except under torchrun (launched): its agent passes every signal it gets on to the workers, so
    one Ctrl-C arrives twice; it sends SIGKILL after --shutdown_timeout seconds (default 30)."""
    got = []

    def handler(signum, frame):
        if got and not launched:
            raise KeyboardInterrupt
        if not got and master:
            print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint"
                  + ("" if launched else " (send it again to stop at once, without one)"), file=sys.stderr, flush=True)
        got.append(signum)

    sigs = [] if threading.current_thread() is not threading.main_thread() else \
        [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_signal(got, device) -> int:
    """The signal that asked the run to stop, 0 if none; agreed by all processes (they receive it at
    slightly different times), so that all stop after the same step."""
    sig = got[0] if got else 0
    if dist.is_initialized():
        t = torch.tensor([sig], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sig = int(t.item())
    return sig


# ----- the run ---------------------------------------------------------------------------------

def main(argv):
    given = parse_args(argv)
    if given.get("dry_run"):
        return dry_run(given)
    init_from = given.get("init_from", TrainConfig.init_from)
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    resume = init_from == "resume"
    # processes and devices: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ckpt = checkpoint_path(out_dir)
    if resume and ckpt is None:
        raise TrainError(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt_fsdp/)")
    state = read_checkpoint(ckpt, verify=rank == 0) if resume else None  # rank 0 checks every byte
    base = {k: v for k, v in state["meta"]["config"].items() if k in FIELDS and k != "overwrite"} if resume else {}
    if resume:
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != base[k]]
        if changed:
            raise TrainError(f"cannot change {changed} when resuming (the checkpoint has "
                             f"{ {k: base[k] for k in changed} }); start a new run instead")
    c = TrainConfig(**{**base, **given})
    check_config(c)
    c = with_accumulation(c, world)
    device = torch.device(c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if c.fsdp and not distributed:
        raise TrainError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=8 train.py ... --fsdp=True)")
    with out_dir_lock(c.out_dir, take=rank == 0), stop_requests(rank == 0, distributed) as signals:
        if not resume:
            check_out_dir(c)
        if distributed:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            run(c, given, state, rank, world, device, signals)
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
    try:
        val_data = TokenDataset(folder, "val", c.block_size, c.seed)
    except ValueError as e:  # too short for one window: the split, not the model, is what to change
        raise ValueError(f"{e}; or, for a corpus prepared with data/prepare.py, prepare it again with a smaller "
                         "--val_every (more documents go to val.bin)") from None
    enc = load_tokenizer(folder) if os.path.exists(os.path.join(folder, "tokenizer.json")) \
        else get_tokenizer(train_data.tokenizer)
    for d in (train_data, val_data):
        if (d.tokenizer, d.n_vocab) != (enc.name, enc.n_vocab):
            raise TrainError(f"{folder}: token files were made with {d.tokenizer} (n_vocab {d.n_vocab}) but the "
                             f"folder's tokenizer is {enc.name} (n_vocab {enc.n_vocab}); prepare the data again")
    return train_data, val_data, enc, folder


def build_model(c: TrainConfig, given, n_vocab, state=None):
    """(model on the meta device, config, weights): shaped fresh, like an HF checkpoint (continual
    pre-training; the config's architecture keys are replaced by the checkpoint's), or like our
    checkpoint. No memory is allocated; parallelize() materialises each process's part and fills it
    (weights: None = fresh init, else (HF dir, its layer modes) to load)."""
    weights = None
    if state is not None:
        config = GPTConfig(**{**state["meta"]["model_config"], "attn_backend": c.attn_backend})
    elif c.init_from != "scratch":
        over = {k: getattr(c, k) for k in POS_FIELDS if k in given}  # else keep the checkpoint's own modes
        try:
            config, modes = GPT.config_from_pretrained(c.init_from, block_size=c.block_size,
                                                       attn_backend=c.attn_backend, **over)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(f"cannot start from {c.init_from!r}: {e}") from None
        ours = {k: getattr(config, k) for k in MODEL_KEYS}
        clash = {k: (given[k], v) for k, v in ours.items() if k in given and given[k] != v and k not in POS_FIELDS}
        if clash:
            raise TrainError(f"{clash} (given, checkpoint): the architecture of {c.init_from} is fixed")
        c = dataclasses.replace(c, **ours)  # record what was actually loaded
        weights = (c.init_from, modes)
    else:
        config = model_config(c, n_vocab)
    with torch.device("meta"):
        raw = GPT(config)  # draws its init seed from torch's generator, like an eager build
    raw.activation_checkpointing = c.activation_checkpointing
    return raw, c, weights


def check_tokenizer(raw, c, state, enc):
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


def parallelize(raw, c: TrainConfig, device, weights=None):
    """(module to call, sync) for a model built on the meta device. FSDP2 shards every block and
    then the rest while nothing is allocated; then each process materialises only its part on
    `device` and initialises it (reset_parameters gives every row the value it has in a whole-model
    build) or reads its rows of the HF checkpoint. DDP replicates (after materialising); compile
    goes inside DDP. sync(last) tells DDP whether this micro-step should all-reduce gradients;
    FSDP2 reduce-scatters after every micro-step, so only sharded gradients are ever accumulated
    (torchtitan's choice: one reduce-scatter per micro-step instead of a full unsharded gradient)."""
    model, sync = raw, None
    if c.fsdp:
        import warnings
        from torch.distributed.fsdp import fully_shard
        # blocks return (hidden, positions); the positions are views that are never modified in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for block in raw.model.layers:
            fully_shard(block)
        fully_shard(raw)
    raw.to_empty(device=device)
    raw.reset_parameters()
    if weights is not None:
        try:
            hf_checkpoint.load_weights(raw, *weights)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(f"cannot start from {weights[0]!r}: {e}") from None
    if c.compile:
        model = torch.compile(model)
    if dist.is_initialized() and not c.fsdp:
        # gradients as views into DDP's all-reduce buckets: one copy of them, not two
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
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
    tmp = hf_dir + ".tmp"
    remove(tmp)
    with writing(hf_dir, cleanup=tmp):  # a failed export leaves the previous hf/ and no hf.tmp/
        model.save_pretrained(tmp, eos_token_id=enc.eot_token, pad_token_id=enc._special_tokens.get("<|pad|>"))
        save_tokenizer(enc, tmp)
        replace_dir(tmp, hf_dir)
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


def run(c: TrainConfig, given: dict, state, rank, world, device, signals=()):
    """The run in out_dir; signals: where stop_requests records SIGTERM/SIGINT (checked after each step)."""
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data, val_data, enc, folder = load_data(c, master)
    torch.manual_seed(c.seed)  # the same initial weights on every rank
    raw, c, weights = build_model(c, given, enc.n_vocab, state)
    check_tokenizer(raw, c, state, enc)
    check_memory(raw, c, device, world)
    model, sync = parallelize(raw, c, device, weights)
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
        if c.overwrite:  # asked for: the earlier run's files go (others in out_dir stay)
            for name in RUN_FILES:
                remove(os.path.join(c.out_dir, name))
        atomic_write(os.path.join(c.out_dir, "train_config.json"), json.dumps(asdict(c), indent=1))
        # drop what an interrupted run logged after its checkpoint
        atomic_write(log_path, "".join(read_log(log_path, start) if start else []))
    say("config: " + ", ".join(f"{k}={v!r}" for k, v in asdict(c).items()))
    say(f"{world} process(es) on {device}, {raw.num_params() / 1e6:.2f}M parameters (non-embedding), layers "
        f"{','.join(raw.config.layer_modes())}; {tokens_per_step:,} tokens per step; data {folder}: "
        f"{sum(h['count'] for h in train_data.headers):,} train tokens, tokenizer {enc.name} (n_vocab {enc.n_vocab})")

    def log(record):
        if master:
            append_line(log_path, json.dumps(record))

    def save(it):
        meta = dict(config=asdict(c), model_config=asdict(raw.config), iter_num=it, samples_seen=samples,
                    best_val_loss=best_val, tokenizer=enc.name, world_size=world,
                    rng=dict(torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        return save_checkpoint(c, raw, optimizer, meta, rank)

    def stopped(sig):
        path = last_ckpt[1] if last_ckpt and last_ckpt[0] == it else save(it)
        msg = (f"stopped by {signal.Signals(sig).name} after iteration {it}; checkpoint {path}. "
               f"Resume with:\n    {resume_command(c, world)}")
        say(msg, flush=True)
        return Stopped(msg, 128 + sig)

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
        sig = stop_signal(signals, device)
        if sig:
            raise stopped(sig)
    sig = stop_signal(signals, device)  # one that came during the final evaluation or checkpoint
    if sig:
        raise stopped(sig)
    export(c, raw, enc, ctx, master)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except Stopped as stop:  # the message, with the resume command, is already printed
        sys.exit(stop.code)
    except (TrainError, ValueError, OSError) as err:  # OSError: files.WriteError and friends name the file
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written since the last one)", file=sys.stderr)
        sys.exit(130)
