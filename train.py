"""
Train a RePo language model (or its RoPE / NoPE baselines): one script from a 2-core laptop to 8 GPUs.

    python train.py                                        # tiny RePo model on Python's own docs, CPU, ~3 min
    python train.py config/repo_124m.py --pos_mode=rope    # a preset, then overrides (later ones win)
    torchrun --standalone --nproc_per_node=8 train.py config/olmo2_1b_repo.py --init_from=/ckpt/OLMo-2-0425-1B
    python train.py --init_from=resume --out_dir=out       # continue out_dir's run exactly where it stopped
    python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=8   # memory per GPU, nothing allocated

Follow a token: data/tokens.py cuts it out of a token file into a batch (the g-th sample of the run,
the same whatever the number of processes), model.py turns the batch into a cross-entropy
loss (from the final hidden states, chunk by chunk: infra/loss.py), AdamW takes a step. Every eval_interval steps the run measures the val loss,
every ckpt_interval steps it writes out_dir/ckpt.pt, and at the end it exports out_dir/hf/.

Configuration: TrainConfig lists every key with its default, which is the tiny CPU run. A preset
(config/*.py) is a file of plain assignments; --key=value overrides are parsed and type-checked
against the field; unknown keys are refused. The resolved config is printed and saved.

Nothing is lost and nothing fails silently: a new run refuses a non-empty out_dir (resume it, or
--overwrite=true), a second run into an out_dir in use is refused (out_dir/train.lock, held while a
run lives), checkpoints are verified byte for byte when read, every file is written atomically
(infra/files.py: a full or read-only disk is a clear error and the previous file stays), and SIGTERM,
SIGUSR1 or Ctrl-C stop at the next micro-step (abandoning a step cut short), write a checkpoint,
print the resume command and exit 128 + signal.

Out_dir after a run (eval.py relies on it):
    train_config.json   the resolved TrainConfig
    log.jsonl           {"iter", "loss", "lr", "grad_norm", "ms", "tokens_per_s", "mfu", "mem_gib", "tokens"}
                        per logged step; {"iter", "val_loss"} per evaluation
    ckpt.pt             model, optimizer, schedule step, data position, RNG state, configs (with --fsdp:
                        ckpt_fsdp/, a torch.distributed.checkpoint directory + trainer_state.pt)
    hf/                 model.save_pretrained(...) + the tokenizer (data/tokenizer.py: save_tokenizer), a
                        Hugging Face model directory (docs/interop.md)
    train.lock          only while a run lives (out_dir_lock)
"""
import dataclasses
import datetime
import difflib
import inspect
import json
import math
import os
import runpy
import shlex
import signal
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import stdlib_text
from infra.files import append_line, atomic_write, remove, replace_dir, writing
from data.tokenizer import DATA_DIR, get_tokenizer, has_tokenizer, load_tokenizer, save_tokenizer
from data.tokens import TokenDataset
from infra import hf
from infra.checkpoint import (RUN_FILES, StopRequested, Stopped, TrainError, auto_init_from, check_out_dir,  # noqa: F401
                              check_resume, checkpoint_path, out_dir_lock, read_checkpoint, read_log, run_files,
                              save_checkpoint, stop_requests, stop_signal)
from infra.memory import GPUS, check_memory, compute_dtype, gib, gpu_spec, memory_gib, memory_plan, peak_flops  # noqa: F401
from model import GPT, POS_FIELDS, POS_MODES, GPTConfig
from infra.progress import eta
from rope_kernel import BACKENDS
from infra.sharding import check_hsdp, shard_model


@dataclass
class TrainConfig:
    # ----- I/O
    out_dir: str = "out"
    init_from: str = "scratch"       # 'scratch', 'resume' (out_dir's checkpoint) or an HF OLMo-2 checkpoint dir;
                                     # 'auto' (or 'auto:<HF dir>'): resume if out_dir has a checkpoint, else start
    overwrite: bool = False          # start anew in a non-empty out_dir, deleting its run files (never with resume)
    eval_interval: int = 50          # val loss every this many steps, and at the end
    eval_iters: int = 8              # val batches per evaluation (fixed windows, the same every time)
    log_interval: int = 10           # one log line every this many steps
    ckpt_interval: int = 0           # checkpoint every this many steps (and at the end); 0 = eval_interval
    keep_ckpts: int = 1              # also keep the N latest as ckpt-<iter>.pt / ckpt_fsdp-<iter>/ (hard links)
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
    hsdp_shard: int = 0              # with fsdp: shard within groups of this many processes (e.g. GPUs per node)
                                     # and replicate across groups (HSDP); 0 = shard over all (infra/sharding.py)
    dist_timeout: int = 1800         # seconds a process waits in a collective before the run fails (NCCL: 600)
    activation_checkpointing: bool = False  # recompute each block in backward: saved activations ~1/n_layer
    seed: int = 1337
    # ----- memory plan (no training): python train.py <preset> --dry_run --dry_run_world=8
    dry_run: bool = False            # print the per-GPU memory plan (model on the meta device) and exit
    dry_run_world: int = 0           # processes (GPUs) for the plan; 0 = this run's (WORLD_SIZE or 1)
    dry_run_gpu: str = "H100"        # the GPU to fit, a name from GPUS in train.py (e.g. "H200", "A100 40GB")


FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# the architecture keys TrainConfig shares with GPTConfig (block_size and attn_backend are run settings)
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name in FIELDS and f.name not in ("block_size", "attn_backend"))
FIXED_ON_RESUME = MODEL_KEYS + ("dataset", "seed", "fsdp", "block_size", "batch_size", "gradient_accumulation_steps")
CHOICES = dict(lr_schedule=("cosine", "linear", "constant"), dtype=("auto", "float32", "bfloat16"),
               pos_mode=POS_MODES, attn_backend=BACKENDS)


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
    positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "n_layer", "n_head", "n_embd",
                "dist_timeout", "keep_ckpts")
    non_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens", "vocab_size",
                    "hsdp_shard", "n_kv_head", "intermediate_size", "learning_rate", "min_lr", "weight_decay", "grad_clip", "z_loss",
                    "gradient_accumulation_steps", "dry_run_world", "init_std", "adam_eps")
    rules = {**{k: (lambda v: v >= 1, ">= 1") for k in positive}, **{k: (lambda v: v >= 0, ">= 0") for k in non_negative},
             "rope_theta": (lambda v: v > 0, "> 0"), "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)")}
    bad = {k: need for k, (ok, need) in rules.items() if not ok(getattr(c, k))}  # `not ok` catches NaN
    bad.update({k: "finite" for k, v in asdict(c).items() if isinstance(v, float) and not math.isfinite(v)})
    if bad:  # each key once, with what it must be
        raise TrainError("out of range: " + ", ".join(f"{k}={getattr(c, k)} (must be {need})" for k, need in bad.items()))
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
    check_model_keys(c)
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


def check_model_keys(c: TrainConfig):
    """The model's keys as GPTConfig checks them, and a backend the device can run, before any data is
    read or file written (with init_from=<HF dir> that checkpoint's config decides and is checked)."""
    if c.init_from in ("scratch", "resume"):
        try:
            model_config(c, n_vocab=c.vocab_size or 1)
        except ValueError as e:
            raise TrainError(str(e).split(": GPTConfig(")[0]) from None
    on_gpu = c.device.startswith("cuda") or (c.device == "auto" and torch.cuda.is_available())
    if c.attn_backend in ("triton", "rotary") and not on_gpu and not interpreting_triton():
        raise TrainError(f"attn_backend={c.attn_backend!r} runs Triton kernels, which need a CUDA GPU (this run is on "
                         "the CPU); use --attn_backend=auto or torch (or set TRITON_INTERPRET=1 to run the kernels "
                         "in Triton's slow interpreter)")


def interpreting_triton() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from repo_kernels import triton_rope
    return triton_rope.interpreting()


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
        g = c.gradient_accumulation_steps
        raise TrainError(f"gradient_accumulation_steps={g} counts micro-steps over all {world} processes and must be "
                         f"a multiple of {world}: use --gradient_accumulation_steps={ceil_div(g, world) * world}, or 0 "
                         f"for one per process (both change the global batch of {g} x batch_size sequences per step; "
                         f"to keep it, run on a number of processes that divides {g}: "
                         f"{', '.join(str(n) for n in range(1, g + 1) if g % n == 0)})")
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
                             fused=device.type == "cuda")  # one kernel, no foreach temporaries (FSDP2 too)


def autocast(device, c: TrainConfig):
    # float32: no autocast at all. RoPE angles and the positioner run in float32 either way (model.py).
    # With activation checkpointing, autocast's cache of bf16 weight copies would keep a copy of
    # every weight alive until the forward ends; without it each block casts its own, again when recomputed
    if compute_dtype(device.type, c) != "bfloat16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not c.activation_checkpointing)


def train_step(model, optimizer, micro_batches, lr, c: TrainConfig, ctx, sync=None, stop=None):
    """Forward/backward over this process's micro-batches, clip, AdamW. Returns (mean cross-entropy
    over all processes, grad norm) as floats; raises FloatingPointError before the update if either is
    NaN/inf. The z-loss (c.z_loss) is in the gradient, not in the returned loss (infra/loss.py).
    stop() (the agreed stop signal, 0 = none) is asked between micro-steps: a preemption need not
    wait for the rest of a long step; the step is abandoned (StopRequested), nothing is updated."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for m, (x, y) in enumerate(micro_batches):
        sig = stop() if stop is not None and m > 0 else 0
        if sig:
            optimizer.zero_grad(set_to_none=True)
            raise StopRequested(sig, m, n)
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


# ----- the memory plan's dry run (memory.py) ---------------------------------------------------


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
        if not has_tokenizer(folder):
            raise TrainError(f"vocab_size=0 takes the data's tokenizer, and {folder} has none; give --vocab_size")
        n_vocab = load_tokenizer(folder).n_vocab
    c = dataclasses.replace(c, init_from=auto_init_from(c.init_from, c.out_dir)[0])
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


def resume_command(c: TrainConfig, world: int) -> str:
    script = os.path.relpath(os.path.abspath(__file__))
    if world == 1:
        launcher = "python"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        launcher = f"torchrun --standalone --nproc_per_node={world}"
    else:
        launcher = "torchrun <this run's launcher options>"
    return f"{launcher} {shlex.quote(script)} --init_from=resume --out_dir={shlex.quote(c.out_dir)}"


# ----- the run ---------------------------------------------------------------------------------

def main(argv):
    given = parse_args(argv)
    if given.get("dry_run"):
        return dry_run(given)
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    init_from, auto = auto_init_from(given.get("init_from", TrainConfig.init_from), out_dir)
    if auto:
        given["init_from"] = init_from
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"init_from=auto: {'resuming the run in' if init_from == 'resume' else 'no checkpoint in'} "
                  f"{out_dir}" + ("" if init_from == "resume" else f"; starting from {init_from}"), flush=True)
    resume = init_from == "resume"
    # processes and devices: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ckpt = checkpoint_path(out_dir)
    if resume and ckpt is None:
        raise TrainError(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt_fsdp/)")
    state = read_checkpoint(ckpt, verify=rank == 0) if resume else None  # rank 0 checks every byte
    base = {k: v for k, v in state["meta"]["config"].items() if k in FIELDS and k != "overwrite"} if resume else {}
    c = TrainConfig(**{**base, **given})
    check_config(c)
    if resume:  # the run's shape first: on another process count its accumulation must still divide
        check_resume(base, {**asdict(c), "gradient_accumulation_steps": c.gradient_accumulation_steps or world},
                     FIXED_ON_RESUME, world)
    c = with_accumulation(c, world)
    device = torch.device(c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if c.fsdp and not distributed:
        raise TrainError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=8 train.py ... --fsdp=True)")
    if check_hsdp(c, world):
        raise TrainError(check_hsdp(c, world))
    with out_dir_lock(c.out_dir, take=rank == 0), stop_requests(rank == 0, distributed) as signals:
        if not resume:
            check_out_dir(c, restart=auto)
        if distributed:
            # explicit: a checkpoint write or the export at 7B outlasts NCCL's 10-minute default
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=c.dist_timeout))
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
    enc = load_tokenizer(folder) if has_tokenizer(folder) \
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
            kw, modes = hf.read_config(c.init_from, block_size=c.block_size, attn_backend=c.attn_backend, **over)
            config = GPTConfig(**kw)
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
    if c.init_from not in ("scratch", "resume") and has_tokenizer(c.init_from):
        trained_on = load_tokenizer(c.init_from).name  # one of our own exports
    if trained_on not in (None, enc.name):
        raise TrainError(f"the model was trained with tokenizer {trained_on!r} but the data is {enc.name!r}")


def parallelize(raw, c: TrainConfig, device, weights=None, init=True):
    """(module to call, sync) for a model built on the meta device. FSDP2 shards every block and
    then the rest while nothing is allocated; then each process materialises only its part on
    `device` and initialises it (reset_parameters gives every row the value it has in a whole-model
    build) or reads its rows of the HF checkpoint. DDP replicates (after materialising); compile
    goes inside DDP. sync(last) tells DDP whether this micro-step should all-reduce gradients;
    FSDP2 reduce-scatters after every micro-step, so only sharded gradients are ever accumulated
    (torchtitan's choice: one reduce-scatter per micro-step instead of a full unsharded gradient)."""
    model, sync = raw, None
    if c.fsdp:
        shard_model(raw, c, device, bf16=compute_dtype(device.type, c) == "bfloat16")
    raw.to_empty(device=device)
    raw.tie_weights()  # to_empty gives each module its own tensor (FSDP2 keeps one: it shards it once)
    if init:  # not when a checkpoint overwrites every tensor next (minutes per rank at 1B)
        raw.reset_parameters()
    if weights is not None:
        try:
            hf.load_weights(raw, *weights)
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
    """out_dir/hf = save_pretrained + the tokenizer (replaced as a whole), then a sample on rank 0
    (not with FSDP: the gathered copy is on the CPU, where a 7B model takes minutes per token while
    the other ranks wait; python sample.py --ckpt=<out_dir> samples from the export)."""
    model = raw
    if c.fsdp:  # gather the full weights onto rank 0's CPU, into a model built on meta (no init)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            with torch.device("meta"):
                model = GPT(raw.config)
            model.load_state_dict(full, assign=True)
            model.tie_weights()  # assign sets each name's tensor: re-tie
    if not master:
        return
    hf_dir = os.path.join(c.out_dir, "hf")
    tmp = hf_dir + ".tmp"
    remove(tmp)
    with writing(hf_dir, cleanup=tmp):  # a failed export leaves the previous hf/ and no hf.tmp/
        model.save_pretrained(tmp, eos_token_id=enc.eot_token, pad_token_id=enc._special_tokens.get("<|pad|>"))
        save_tokenizer(enc, tmp, model_max_length=raw.config.block_size)
        replace_dir(tmp, hf_dir)
    print(f"exported {hf_dir} (GPT.from_pretrained or transformers' AutoModelForCausalLM; tokenizer: "
          "data.tokenizer.load_tokenizer or AutoTokenizer)")
    if c.sample_tokens and c.fsdp:
        print(f"no sample under FSDP; python sample.py --ckpt={c.out_dir} samples from the export")
    elif c.sample_tokens:
        prompt = enc.encode_ordinary(c.sample_prompt) if c.sample_prompt else [enc.eot_token]
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        with torch.no_grad(), (ctx if model is raw else nullcontext()):
            out = model.generate(idx, c.sample_tokens, temperature=0.8, top_k=50)
        text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])  # padded ids are never trained
        print(f"----- sample ({c.sample_tokens} tokens, temperature 0.8, top-k 50) -----\n{text}\n-----")


def run(c: TrainConfig, given: dict, state, rank, world, device, signals=()):
    """The run in out_dir; signals: where stop_requests records a stop signal (checked between micro-steps)."""
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data, val_data, enc, folder = load_data(c, master)
    torch.manual_seed(c.seed)  # the same initial weights on every rank
    raw, c, weights = build_model(c, given, enc.n_vocab, state)
    check_tokenizer(raw, c, state, enc)
    check_memory(raw, c, device, world)
    model, sync = parallelize(raw, c, device, weights, init=state is None)
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
            for name in run_files(c.out_dir):
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

    def stopped(sig, abandoned=None):
        if abandoned is not None:
            say(f"step {it + 1} abandoned after {abandoned.done} of {abandoned.of} micro-steps", flush=True)
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
    last_ckpt, it, elapsed, timed, t_loop = None, start, 0.0, 0, time.time()
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
            loss, gnorm = train_step(model, optimizer, micro, lr, c, ctx, sync, lambda: stop_signal(signals, device))
        except StopRequested as s:
            raise stopped(s.signum, s) from None
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
                f"mem {rec['mem_gib']:.2f} GiB | {eta(time.time() - t_loop, it - start, c.max_iters - start)} left")
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
