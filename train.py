"""
Train a RePo language model (or its RoPE / NoPE baselines): one script from a 2-core laptop to 8 GPUs.

    python train.py                                        # tiny RePo model on Python's own docs, CPU, ~3 min
    python train.py config/repo_124m.py --pos_mode=rope    # a preset, then overrides (later ones win)
    torchrun --standalone --nproc_per_node=8 train.py config/olmo2_1b_repo.py --init_from=/ckpt/OLMo-2-0425-1B
    python train.py --init_from=resume --out_dir=out       # continue out_dir's run exactly where it stopped
    python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=8   # memory per GPU, nothing allocated

Follow a token: data/tokens.py cuts it into a batch (the g-th sample of the run, whatever the number
of processes), model.py turns the batch into a loss, AdamW takes a step; evaluation, checkpoints and
the export to out_dir/hf/ come every few steps (TrainConfig below lists every key). Behind the loop,
infra/ refuses a busy or non-empty out_dir, verifies checkpoints byte for byte, writes every file
atomically, and turns SIGTERM, SIGUSR1 or Ctrl-C into a checkpoint (at the next micro-step), the
resume command and exit 128 + signal.

Out_dir after a run (eval.py relies on it; docs/scale.md has every field): train_config.json (the
resolved config), log.jsonl (a record per logged step and per evaluation), ckpt.pt (or ckpt_fsdp/ with
--fsdp), hf/ (a Hugging Face model directory with the tokenizer, docs/interop.md), train.lock while it runs.
"""
import dataclasses
import datetime
import gc
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import cli
from data.splits import dataset_folder, open_splits
from data.tokenizer import has_tokenizer, load_tokenizer, save_tokenizer
from data.tokens import TokenDataset
from infra import checkpoint, checks, hf, memory
from infra.checkpoint import StopRequested, TrainError, checkpoint_path, stop_signal
from infra.parallel import full_model, parallelize
from infra.progress import eta
from infra.sharding import check_hsdp
from model import GPT, POS_FIELDS, POS_MODES, GPTConfig
from repo_kernels import triton_rope
from rope_kernel import BACKENDS


@dataclass
class RunConfig:
    # ----- I/O
    out_dir: str = "out"
    init_from: str = "scratch"       # 'scratch', 'resume' (out_dir's checkpoint), an HF OLMo-2 checkpoint dir, or
                                     # 'auto' ('auto:<HF dir>'): resume if out_dir has a checkpoint, else start
    overwrite: bool = False          # start anew in a non-empty out_dir, deleting its run files (never with resume)
    eval_interval: int = 50          # val loss every this many steps, and at the end
    eval_iters: int = 8              # val batches per evaluation (fixed windows, the same every time)
    log_interval: int = 10           # one log line every this many steps
    ckpt_interval: int = 0           # checkpoint every this many steps (and at the end); 0 = eval_interval
    keep_ckpts: int = 1              # also keep the N latest as ckpt-<iter>.pt / ckpt_fsdp-<iter>/ (hard links)
    sample_tokens: int = 200         # tokens sampled from the final model (0 = no sample)
    sample_prompt: str = ""          # prompt for that sample; '' starts a new document
    # ----- data (block_size, the tokens per sequence, is a model key below)
    dataset: str = "stdlib"          # folder under data/ (or a path) with train.bin, val.bin and tokenizer.json
    batch_size: int = 16             # sequences per micro-step and process
    gradient_accumulation_steps: int = 0  # micro-steps per optimizer step, counted over ALL processes; 0 = 1 per process
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
    fsdp: bool = False               # shard parameters, gradients and optimizer state with FSDP2 (fully_shard)
    hsdp_shard: int = 0              # with fsdp: shard within groups of this many processes (e.g. GPUs per node)
                                     # and replicate across groups (HSDP); 0 = shard over all (infra/sharding.py)
    dist_timeout: int = 1800         # seconds a process waits in a collective before the run fails (NCCL: 600)
    activation_checkpointing: bool = False  # recompute each block in backward: saved activations ~1/n_layer
    activation_checkpointing_layers: int = 0  # with it: only the first N blocks (0 = all); --dry_run finds the least N
    seed: int = 1337
    # ----- memory plan (no training): python train.py <preset> --dry_run --dry_run_world=8
    dry_run: bool = False            # print the per-GPU memory plan (model on the meta device) and exit
    dry_run_world: int = 0           # processes (GPUs) for the plan; 0 = this run's (WORLD_SIZE or 1)
    dry_run_gpu: str = "H100"        # the GPU to fit, a name from infra/memory.py's GPUS (e.g. "H200", "A100 40GB")


# ----- model: every GPTConfig field is a key too; the default run's model is this tiny one
# (vocab_size 0 = the data's tokenizer, rounded up to a multiple of 128), the rest GPTConfig's defaults
TINY = dict(vocab_size=0, n_layer=4, n_head=4, n_embd=128, block_size=256, rope_theta=10000.0)
TrainConfig = dataclasses.make_dataclass("TrainConfig", [
    (f.name, f.type, dataclasses.field(default=TINY.get(f.name, f.default))) for f in dataclasses.fields(GPTConfig)],
    bases=(RunConfig,))
DEFAULTS = asdict(TrainConfig())
FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("block_size", "attn_backend"))
FIXED_ON_RESUME = MODEL_KEYS + ("dataset", "seed", "fsdp", "block_size", "batch_size", "gradient_accumulation_steps")
CHOICES = dict(lr_schedule=("cosine", "linear", "constant"), dtype=("auto", "float32", "bfloat16"),
               pos_mode=POS_MODES, attn_backend=BACKENDS)


def parse_args(argv) -> dict:
    return cli.parse(argv, DEFAULTS, presets=True, unknown="unknown config key", kinds=cli.TYPE_NAMES,
                     error=TrainError, finite=False)  # checks.check_config names a nan or inf with the other keys


def usage() -> str:
    comments = {**cli.comments(GPTConfig), **cli.comments(RunConfig)}
    return cli.usage(__doc__.split("\n\n")[1], {k: (v, comments.get(k, "")) for k, v in DEFAULTS.items()},
                     presets=True)


def with_accumulation(c, world: int):
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


def get_lr(it: int, c) -> float:
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    end = c.lr_decay_iters or c.max_iters
    if c.lr_schedule == "constant" or end <= c.warmup_iters:
        return c.learning_rate
    ratio = min(1.0, (it - c.warmup_iters) / (end - c.warmup_iters))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if c.lr_schedule == "cosine" else 1.0 - ratio
    return c.min_lr + coeff * (c.learning_rate - c.min_lr)


# ----- model, optimizer, one optimizer step -----------------------------------------------------

def model_config(c, n_vocab: int) -> GPTConfig:
    kw = {f.name: getattr(c, f.name) for f in dataclasses.fields(GPTConfig)}
    kw["vocab_size"] = c.vocab_size or ceil_div(n_vocab, 128) * 128  # padded: faster matmuls, as OLMo-2 (100352)
    return GPTConfig(**kw)


def configure_optimizer(model, c, device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.endswith("embed_tokens.weight")
        wd = c.decay_norms if p.dim() < 2 else (c.decay_embeddings or not is_embedding)
        (decay if wd else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.adam_eps,
                             fused=device.type == "cuda")  # one kernel, no foreach temporaries (FSDP2 too)


def autocast(device, c):
    # float32: no autocast at all (RoPE angles and the positioner run in float32 either way). With
    # activation checkpointing no cache of bf16 weight copies: it would keep every copy alive until the end
    if memory.compute_dtype(device.type, c) != "bfloat16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not c.activation_checkpointing)


def train_step(model, optimizer, micro_batches, lr, c, ctx, sync=None, stop=None):
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
def evaluate(model, val: TokenDataset, c, ctx, device, rank, world) -> float:
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


# ----- setup: data, model, export ----------------------------------------------------------------

def build_model(c, given, n_vocab, state=None):
    """(model on the meta device, config, weights): fresh, shaped like an HF checkpoint (whose architecture
    then replaces the config's) or like our checkpoint; weights: None or (HF dir, its layer modes) to load."""
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
    raw.activation_checkpointing = memory.checkpointed_blocks(c)
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


def export(c, raw, enc, ctx, master):
    """out_dir/hf = save_pretrained + the tokenizer (replaced as a whole), then a sample on rank 0 (not
    with FSDP: the gathered copy is on the CPU; python sample.py --ckpt=<out_dir> samples from the export)."""
    model = full_model(raw, c.fsdp, master, GPT)  # FSDP2: gathered onto rank 0's CPU
    if not master:
        return
    hf.export(model, os.path.join(c.out_dir, "hf"), lambda d: save_tokenizer(enc, d, model_max_length=raw.config.block_size),
              eos_token_id=enc.eot_token, pad_token_id=enc._special_tokens.get("<|pad|>"))
    print(f"exported {os.path.join(c.out_dir, 'hf')} (GPT.from_pretrained or transformers' AutoModelForCausalLM; "
          "tokenizer: data.tokenizer.load_tokenizer or AutoTokenizer)")
    if c.sample_tokens and c.fsdp:
        print(f"no sample under FSDP; python sample.py --ckpt={c.out_dir} samples from the export")
    elif c.sample_tokens:
        prompt = enc.encode_ordinary(c.sample_prompt) if c.sample_prompt else [enc.eot_token]
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        with torch.no_grad(), (ctx if model is raw else nullcontext()):
            out = model.generate(idx, c.sample_tokens, temperature=0.8, top_k=50)
        text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])  # padded ids are never trained
        print(f"----- sample ({c.sample_tokens} tokens, temperature 0.8, top-k 50) -----\n{text}\n-----")


def dry_run(given: dict):
    """--dry_run: the memory plan on dry_run_world x dry_run_gpu of a meta-device build (nothing allocated)."""
    c = TrainConfig(**given)
    checks.check_config(c, CHOICES, model_config, triton_rope.interpreting())
    world = c.dry_run_world or int(os.environ.get("WORLD_SIZE", 1))
    c, n_vocab, folder = with_accumulation(c, world), c.vocab_size, dataset_folder(c.dataset)
    if not n_vocab and not os.path.isdir(c.init_from):
        if not has_tokenizer(folder):
            raise TrainError(f"vocab_size=0 takes the data's tokenizer, and {folder} has none; give --vocab_size")
        n_vocab = load_tokenizer(folder).n_vocab
    c = dataclasses.replace(c, init_from=checkpoint.auto_init_from(c.init_from, c.out_dir)[0])
    if c.init_from != "scratch" and not os.path.isdir(c.init_from):
        c = dataclasses.replace(c, init_from="scratch")  # the preset's checkpoint is not here: its keys say the shape
    torch.manual_seed(c.seed)
    raw, c, _ = build_model(c, given, n_vocab)
    return memory.print_plan(raw, c, world, c.dry_run_gpu)


# ----- the run ---------------------------------------------------------------------------------

def main(argv):
    given = parse_args(argv)
    if given.get("dry_run"):
        return dry_run(given)
    out_dir = given.get("out_dir", RunConfig.out_dir)
    init_from, auto = checkpoint.auto_init_from(given.get("init_from", RunConfig.init_from), out_dir)
    given["init_from"] = init_from
    if auto and int(os.environ.get("RANK", 0)) == 0:
        print(f"init_from=auto: {'resuming the run in' if init_from == 'resume' else 'no checkpoint in'} {out_dir}"
              + ("" if init_from == "resume" else f"; starting from {init_from}"), flush=True)
    # processes and devices: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    resume = init_from == "resume"
    state, base = checkpoint.resumed_config(out_dir, rank) if resume else (None, {})
    c = TrainConfig(**{**{k: v for k, v in base.items() if k in FIELDS}, **given})
    checks.check_config(c, CHOICES, model_config, triton_rope.interpreting())
    if resume:  # the run's shape first: on another process count its accumulation must still divide
        checkpoint.check_resume(base, {**asdict(c), "gradient_accumulation_steps": c.gradient_accumulation_steps or world},
                                FIXED_ON_RESUME, world)
    c = with_accumulation(c, world)
    device = torch.device(c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if c.fsdp and not distributed:
        raise TrainError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=8 train.py ... --fsdp=True)")
    check_hsdp(c, world)
    with checkpoint.guard(c, rank, distributed, resume, restart=auto) as signals:
        if distributed:
            # explicit: a checkpoint write or the export at 7B outlasts NCCL's 10-minute default
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=c.dist_timeout))
        try:
            run(c, given, state, rank, world, device, signals)
        finally:
            if distributed:
                gc.collect()  # the sharded model's last references, whose meshes hold the process group:
                dist.destroy_process_group()  # freed here, not at exit (gloo aborts there on torch 2.11)


def run(c, given: dict, state, rank, world, device, signals=()):
    """The run in out_dir; signals: where SIGTERM/SIGINT are recorded (checked after each step)."""
    master, say = rank == 0, (print if rank == 0 else (lambda *a, **k: None))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data, val_data, enc, folder = open_splits(c.dataset, c.block_size, c.seed, master)
    torch.manual_seed(c.seed)  # the same initial weights on every rank
    raw, c, weights = build_model(c, given, enc.n_vocab, state)
    check_tokenizer(raw, c, state, enc)
    memory.check_memory(raw, c, device, world)  # refuses, before allocating, a step that cannot fit
    model, sync = parallelize(raw, c, device, weights, init=state is None)  # DDP or FSDP2 (+ compile), filled
    optimizer = configure_optimizer(raw, c, device)
    ctx = autocast(device, c)
    start, samples, best_val = 0, 0, float("inf")  # samples: global sequences consumed = the data position
    if state is not None:
        checkpoint.restore(c, raw, optimizer, state, device)
        start, samples, best_val = (state["meta"][k] for k in ("iter_num", "samples_seen", "best_val_loss"))
        say(f"resuming from iteration {start} ({samples} samples seen) of {checkpoint_path(c.out_dir)}")
        state = None  # free the CPU copy
    if master:
        checkpoint.start_files(c, start, asdict(c))  # train_config.json; log.jsonl up to `start`
    tokens_per_step = c.gradient_accumulation_steps * c.batch_size * c.block_size
    flops_per_step, peak = raw.flops_per_token(c.block_size) * tokens_per_step, memory.peak_flops(device, c)
    say("config: " + ", ".join(f"{k}={v!r}" for k, v in asdict(c).items()))
    say(f"{world} process(es) on {device}, {raw.num_params() / 1e6:.2f}M parameters (non-embedding), layers "
        f"{','.join(raw.config.layer_modes())}; {tokens_per_step:,} tokens per step; data {folder}: "
        f"{sum(h['count'] for h in train_data.headers):,} train tokens, tokenizer {enc.name} (n_vocab {enc.n_vocab})")
    save = lambda it: checkpoint.save(c, raw, optimizer, rank, device, iter_num=it, samples_seen=samples,  # noqa: E731
                                      best_val_loss=best_val, tokenizer=enc.name, world_size=world)

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
            if master:
                checkpoint.log(c, {"iter": it, "val_loss": val_loss})
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
        except StopRequested as s:  # the step is abandoned: the checkpoint holds the state before it
            say(f"step {it + 1} abandoned after {s.done} of {s.of} micro-steps", flush=True)
            break
        except FloatingPointError as e:  # nothing was updated: name the checkpoint to go back to
            raise checkpoint.diverged(it, e, last_ckpt, start, c.out_dir) from None
        samples += per_step
        it += 1
        elapsed, timed = elapsed + time.perf_counter() - t0, timed + 1
        if it % c.log_interval == 0 or it == start + 1 or it == c.max_iters:
            dt = elapsed / timed  # mean over the steps since the last log line
            mfu = flops_per_step / dt / (peak * world) if peak else None
            rec = dict(iter=it, loss=loss, lr=lr, grad_norm=gnorm, ms=1000 * dt, tokens_per_s=tokens_per_step / dt,
                       mfu=mfu, mem_gib=memory.memory_gib(device), tokens=samples * c.block_size)
            if master:
                checkpoint.log(c, rec)
            say(f"iter {it}: loss {loss:.4f} | lr {lr:.2e} | grad {gnorm:.3f} | {rec['ms']:.0f} ms | "
                f"{rec['tokens_per_s']:,.0f} tok/s | MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'} | "
                f"mem {rec['mem_gib']:.2f} GiB | {eta(time.time() - t_loop, it - start, c.max_iters - start)} left")
            elapsed, timed = 0.0, 0
        if stop_signal(signals, device):
            break
    sig = stop_signal(signals, device)  # SIGTERM / Ctrl-C, also one during the final evaluation or checkpoint
    if sig:
        path = last_ckpt[1] if last_ckpt and last_ckpt[0] == it else save(it)
        raise checkpoint.stopped(sig, it, path, checkpoint.resume_command(c.out_dir, world, __file__), master)
    export(c, raw, enc, ctx, master)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    cli.run(main, usage(), errors=(TrainError, ValueError, OSError),
            interrupted="interrupted (no checkpoint written since the last one)")
