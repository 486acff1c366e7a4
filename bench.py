"""
Benchmarks: RePo against its baselines, measured in the same run on the same machine.

    python bench.py                     # model: forward+backward step time and peak memory of
                                        # RoPE, NoPE and RePo models of one shape, with ratios
    python bench.py --device=cuda --n_layer=12 --n_embd=768 --n_head=12 --seq_len=1024 --batch_size=8
    python bench.py --what=attention --device=cuda      # repo_attention's backends against rotate-then-SDPA
                                                        # baselines (bf16, causal), checked against float64 first
    python bench.py --what=attention                    # CPU smoke run of the same code (interpreter)
    python bench.py --what=train [--device=cuda]        # train.py's own step: RePo vs RoPE vs RoPE on SDPA
                                                        # (tokens/s, MFU, peak memory): the default run and,
                                                        # on a GPU, config/repo_124m.py
    python bench.py --what=olmo2                        # CPU: our GPT against transformers' Olmo2ForCausalLM,
                                                        # same shape and weights, forward+backward+AdamW
    python bench.py --what=gpu [--out=gpu_check]        # every GPU check in one command
                                                        # (bench_gpu.py); --smoke runs it tiny on the CPU
    python bench.py --help                              # every option and its default

Speed and memory targets live here, never in tests. CPU peak memory is the high-water mark of
PyTorch's CPU allocator during one step (torch.profiler memory events); CUDA uses
torch.cuda.max_memory_allocated.
"""
import contextlib
import os
import sys
import tempfile
import time

import torch

import cli

if not torch.cuda.is_available():  # the attention smoke run needs Triton's CPU interpreter, which is
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when model.py first imports rope_kernel

DEFAULTS = dict(what="model", device="cpu", vocab_size=512, n_layer=6, n_head=8, n_embd=256, seq_len=256, batch_size=8,
                warmup=3, iters=10, threads=0, attn_dims="", attn_seqs="", attn_backend="auto", out="gpu_check",
                smoke=False, stage="")
HELP = dict(what="model, attention, train, olmo2 or gpu", device="cpu, cuda, cuda:1, ...",
            vocab_size="--what=model: vocabulary", n_layer="--what=model: layers", n_head="--what=model: heads",
            n_embd="--what=model: width", seq_len="--what=model: tokens per sequence",
            batch_size="--what=model: sequences per step", warmup="untimed steps first", iters="timed steps (median)",
            threads="torch.set_num_threads (0 = PyTorch's default)",
            attn_dims="--what=attention: head dims, comma separated ('' = the device's default list)",
            attn_seqs="--what=attention: sequence lengths, comma separated", attn_backend="--what=train: "
            "repo_attention backend of the RePo and RoPE arms", out="--what=gpu: folder for the stage logs",
            smoke="--what=gpu: tiny shapes on the CPU (interpreter), to show every stage runs",
            stage="--what=gpu: run only this stage, in this process ('' = all, each in its own)")
WHATS = ("model", "attention", "train", "olmo2", "gpu")


def usage() -> str:
    return cli.usage("usage: python bench.py [--key=value ...]", {k: (v, HELP[k]) for k, v in DEFAULTS.items()},
                     show=repr)


def fail(message):
    raise cli.UsageError(message)


def options(argv) -> dict:
    """Every option's value (cli.py), checked."""
    args = {**DEFAULTS, **cli.parse(argv, DEFAULTS, kinds=cli.TYPE_NAMES)}
    if args["what"] not in WHATS:
        fail(f"--what must be one of {', '.join(WHATS)}, got {args['what']!r}")
    if args["iters"] < 1 or args["warmup"] < 0 or args["threads"] < 0:
        fail("--iters must be >= 1, --warmup and --threads >= 0")
    try:
        device = torch.device(args["device"])
    except RuntimeError:
        fail(f"--device {args['device']!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device={args['device']}: no CUDA device here")
    return check_args(args)


def check_args(args):
    """Every value checked before anything is built or timed: one `error:` line, not a traceback
    after minutes of another stage (what --what uses of args is checked whatever --what is)."""
    bad = [f"--{k}={args[k]}" for k in ("vocab_size", "n_layer", "n_head", "n_embd", "seq_len", "batch_size")
           if args[k] < 1]
    if bad:
        fail(f"{', '.join(bad)}: must be at least 1")
    from model import GPTConfig
    try:
        GPTConfig(vocab_size=args["vocab_size"], n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                  block_size=args["seq_len"], attn_backend=args["attn_backend"])
    except ValueError as e:
        fail(f"{str(e).split(': GPTConfig(')[0]} (--vocab_size, --n_layer, --n_head, --n_embd, --attn_backend)")
    for key in ("attn_dims", "attn_seqs"):
        try:
            values = [int(x) for x in args[key].split(",")] if args[key] else []
        except ValueError:
            fail(f"--{key}={args[key]!r}: give whole numbers separated by commas, e.g. --{key}=64,128")
        if any(v < 1 or (key == "attn_dims" and v % 2) for v in values):
            fail(f"--{key}={args[key]}: " + ("head dims must be even (RoPE rotates pairs of dimensions) and positive"
                                             if key == "attn_dims" else "sequence lengths must be positive"))
    return args


@contextlib.contextmanager
def _without_profiler_chatter():
    """The profiler's C++ side writes 'USDT:... profiler_start/stop' lines to file descriptor 2: keep
    everything else it writes there, drop those."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sys.stderr.write("".join(line for line in tmp.read().decode(errors="replace").splitlines(True)
                                     if not line.startswith("USDT:")))


def peak_cpu_bytes(fn) -> int:
    """High-water mark of bytes held by PyTorch's CPU allocator while fn() runs (beyond what was live before)."""
    from torch.profiler import ProfilerActivity, profile
    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are charged to the innermost op (self memory; parents would count them again),
    # frees appear as negative "[memory]" events
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device) -> int:
    """Peak memory of fn() beyond what was allocated before it, on CUDA or PyTorch's CPU allocator."""
    if device.type != "cuda":
        return peak_cpu_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def alternate(steps: dict, warmup: int, iters: int) -> dict:
    """Median seconds per call of each step; the steps alternate so that drifts of the machine (load,
    clocks) hit them alike. Each step must finish its device work before it returns."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench_model(a):
    """Forward+backward step time and peak memory of RoPE, NoPE and RePo models of one shape."""
    from model import GPT, GPTConfig
    device = torch.device(a["device"])
    ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    models, steps = {}, {}
    for name in ("rope", "nope", "repo"):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=a["vocab_size"], n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                        block_size=a["seq_len"], pos_mode=name)
        model = models[name] = GPT(cfg).to(device).train()
        idx = torch.randint(0, cfg.vocab_size, (a["batch_size"], a["seq_len"]), device=device)

        def step(model=model, idx=idx):
            with ctx:
                _, loss = model(idx, targets=idx)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        steps[name] = step
    times = alternate(steps, a["warmup"], a["iters"])
    results = {}
    for name, step in steps.items():
        peak = peak_bytes(step, device)
        results[name] = (1000 * times[name], peak, models[name].num_params(), models[name].flops_per_token(a["seq_len"]))
        print(f"{name:5s} {results[name][0]:9.1f} ms/step  peak {peak / 2**20:8.1f} MiB  "
              f"{results[name][2] / 1e6:.2f}M params  {results[name][3] / 1e6:.1f} MFLOP/token")
    r = results
    print(f"\nRePo / RoPE: step time {r['repo'][0] / r['rope'][0]:.3f} (target <= 1.15), "
          f"peak memory {r['repo'][1] / r['rope'][1]:.3f} (target <= 1.10), FLOPs {r['repo'][3] / r['rope'][3]:.4f}")
    print(f"NoPE / RoPE: step time {r['nope'][0] / r['rope'][0]:.3f}, peak memory {r['nope'][1] / r['rope'][1]:.3f}")
    return results


SDPA_BACKENDS = ("flash", "cudnn", "efficient")  # torch.nn.attention.SDPBackend's fused kernels, by short name


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                efficient=SDPBackend.EFFICIENT_ATTENTION)[name]


def sdpa_offered(device, D, dtype=torch.bfloat16):
    """The SDPA backends that run a causal forward+backward of this head dim and dtype on device."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    offered = []
    for name in SDPA_BACKENDS:
        q = torch.randn(1, 2, 64, D, device=device, dtype=dtype, requires_grad=True)
        try:
            with sdpa_kernel(sdpa_backend(name)):  # only this backend: an error if it cannot run
                F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            offered.append(name)
        except RuntimeError:
            pass
    return offered


def attention_methods(inv, compile_mode=True, sdpa=SDPA_BACKENDS):
    """What --what=attention times, each f(q, k, v, z) -> o: repo_attention's fused kernels (with and
    without rotation), the rotation kernel in front of each SDPA backend in sdpa, "auto" as this machine
    dispatches it, and the baselines a user could write: (a) eager float32 rotation + SDPA (backend
    "torch"), (b) the same rotation compiled + SDPA, and SDPA without rotation per backend (the ceiling)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import rope_kernel
    rotate = lambda x, pos: rope_kernel.apply_rope(x, pos, inv)
    rotate_compiled = torch.compile(rotate) if compile_mode else rotate
    attn = lambda backend, rope=True: (lambda q, k, v, z: rope_kernel.repo_attention(
        q, k, v, z if rope else None, z if rope else None, inv_freq=inv, backend=backend))

    def on(name, f):  # f with only this SDPA backend enabled
        def run(q, k, v, z):
            with sdpa_kernel(sdpa_backend(name)):
                return f(q, k, v, z)
        return run
    methods = {"triton (fused)": attn("triton"), "fused, no RoPE": attn("triton", False)}
    methods.update({f"rotary + {n}": on(n, attn("rotary")) for n in sdpa})
    methods.update({"auto": attn("auto"), "(a) eager rot+SDPA": attn("torch"),
                    "(b) compiled rot+SDPA": lambda q, k, v, z: F.scaled_dot_product_attention(
                        rotate_compiled(q, z), rotate_compiled(k, z), v, is_causal=True)})
    sdpa_only = lambda q, k, v, z: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    methods.update({f"SDPA {n}, no rotation": on(n, sdpa_only) for n in sdpa})
    return methods


def fastest(row):
    """From one shape's timings (name -> {"fwd_bwd_ms", ...}): the fastest RePo attention (fused, or
    rotary + an SDPA backend) as "auto"'s table names it, against the fastest SDPA without rotation."""
    repo = sorted((v["fwd_bwd_ms"], n) for n, v in row.items() if n == "triton (fused)" or n.startswith("rotary + "))
    ceiling = sorted((v["fwd_bwd_ms"], n) for n, v in row.items() if n.startswith("SDPA "))
    if not repo or not ceiling:
        return None
    label = lambda n: "triton" if n == "triton (fused)" else "rotary+" + n.split(" + ")[1]
    return dict(choice=label(repo[0][1]), ms=repo[0][0], vs_sdpa=ceiling[0][0] / repo[0][0],
                sdpa_best=ceiling[0][1].split()[1].rstrip(","), runner_up=label(repo[1][1]) if len(repo) > 1 else None,
                all={label(n): ms for ms, n in repo})


def check_methods(methods, device, D, dtype=torch.bfloat16):
    """Relative L2 error of each method's output and input gradients against float64 on a small causal
    shape (positions of magnitude 5e3): {name: error}. A method above 2e-2 is wrong, not slow."""
    import rope_kernel
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v, g = (torch.randn(1, 2, 80, D, device=device, generator=gen).to(dtype) for _ in range(4))
    z = (torch.randn(1, 2, 80, device=device, generator=gen) * 4).cumsum(-1) + 5e3
    errors = {}
    for name, f in methods.items():
        rope = "no RoPE" not in name and "no rotation" not in name
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        out = f(*leaves, z)
        out.backward(g)
        ref = rope_kernel.repo_attention(*ref_leaves, z.double() if rope else None, z.double() if rope else None,
                                         backend="torch", inv_freq=rope_kernel.rope_inv_freq(D, 500000.0, device))
        ref.backward(g.double())
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        errors[name] = max([rel(out, ref)] + [rel(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)])
    return errors


def bench_attention(a, on_row=None):
    """Continuous-RoPE attention alone, bf16, causal, positions = one learned-looking z per token and head
    shared by q and k. Forward (as in training: inputs require grad) and forward+backward time and
    training peak memory of every method of attention_methods, each first checked against float64 (per
    head dim; a wrong method is not timed). Shapes follow the FlashAttention-3 paper: batch * T = 16k
    tokens, heads * D = 2048. on_row(D, T, row, errors of D) is called after every shape; returns
    ({(D, T): row}, {(D, method): error})."""
    import rope_kernel
    device = torch.device(a["device"])
    gpu = device.type == "cuda"
    if gpu:
        from triton.testing import do_bench
        dims, seqs, tokens, width = (64, 128), (1024, 4096, 16384), 16384, 2048
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    else:
        dims, seqs, tokens, width = (64,), (64,), 128, 128
        print("CPU SMOKE RUN: tiny shapes, the Triton kernels run in Triton's interpreter. These numbers say "
              "nothing about speed; they only show that the benchmark runs. Use --device=cuda.")
    dims = [int(x) for x in a["attn_dims"].split(",")] if a["attn_dims"] else dims
    seqs = [int(x) for x in a["attn_seqs"].split(",")] if a["attn_seqs"] else seqs

    def timed(fn, grads):
        """Median milliseconds of fn(); grads are reset to None before every call."""
        def call():
            for t in grads:
                t.grad = None
            fn()
        if gpu:
            return do_bench(call, warmup=25, rep=100, return_mode="median")
        return 1000 * alternate({"f": call}, 1, a["iters"])["f"]

    results, all_errors = {}, {}
    for D in dims:
        inv = rope_kernel.rope_inv_freq(D, 500000.0, device=device)
        offered = sdpa_offered(device, D)
        methods = attention_methods(inv, compile_mode=gpu, sdpa=offered)
        errors = check_methods(methods, device, D)
        all_errors.update({(D, n): e for n, e in errors.items()})  # per head dim: one D never hides another's
        print(f"\nD={D}: SDPA backends offered: {', '.join(offered) or 'none'}; relative error against float64 "
              "(output and dq, dk, dv; small causal shape, bf16): " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
        wrong = [n for n, e in errors.items() if not e < 2e-2]
        if wrong:
            print(f"  NOT TIMED, wrong results: {wrong}")
        for T in seqs:
            B, H = max(1, tokens // T), width // D
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, T, D, device=device, generator=gen, dtype=torch.bfloat16)
                           for _ in range(4))
            # positions like a learned layer's: real-valued, drifting, of magnitude ~5e3 (float32)
            z = (torch.randn(B, H, T, device=device, generator=gen) * 4).cumsum(-1) + 5e3
            leaves = [t.requires_grad_() for t in (q, k, v, z)]
            flops = 2 * B * H * T * T * D  # causal forward: 4 B H T^2 D / 2; backward = 2.5x forward
            print(f"\nD={D} T={T} B={B} H={H} bf16 causal")
            print(f"{'method':26s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'peak MiB':>9s}")
            row = {}
            for name, f in methods.items():
                if name in wrong:
                    continue
                fwd = timed(lambda: f(q, k, v, z), leaves)
                step = lambda: f(q, k, v, z).backward(do)
                both = timed(step, leaves)
                for t in leaves:
                    t.grad = None
                peak = peak_bytes(step, device)
                row[name] = dict(fwd_ms=fwd, fwd_bwd_ms=both, peak=peak, fwd_tflops=flops / fwd / 1e9,
                                 fwd_bwd_tflops=3.5 * flops / both / 1e9)
                print(f"{name:26s} {fwd:9.3f} {flops / fwd / 1e9:8.1f} {both:11.3f} {3.5 * flops / both / 1e9:8.1f} "
                      f"{peak / 2**20:9.1f}")
            results[(D, T)] = row
            pick = fastest(row)
            if pick:
                print(f"  fastest RePo attention: {pick['choice']}, forward+backward {pick['vs_sdpa']:.2f}x the fastest "
                      f"SDPA without rotation ({pick['sdpa_best']}; target >= 0.9 at T=4096, D=128); runner-up "
                      f"{pick['runner_up']}")
            if on_row is not None:
                on_row(D, T, row, errors)
    return results, all_errors


def bench_train(a, presets=None):
    """Optimizer steps per second of train.py's train_step (forward, backward, clip, AdamW) for three
    arms of one config: RePo and RoPE through repo_attention(backend=--attn_backend), and RoPE on SDPA
    (backend "torch": PyTorch rotation, compiled where the config compiles, + SDPA: the best RoPE a
    user could run without our kernels). Random tokens (throughput does not depend on the data); one
    micro-step per optimizer step; MFU from train.py's per-device peak table (n/a on CPU)."""
    import dataclasses

    import train
    from infra.memory import peak_flops
    from model import GPT
    device = torch.device(a["device"])
    if presets is None:
        presets = [("default run (python train.py)", [], 1024)]  # the stdlib tokenizer's 1024 tokens
        if device.type == "cuda":
            preset = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "repo_124m.py")
            presets.append(("config/repo_124m.py", [preset], 50257))  # GPT-2's vocabulary
        else:
            print("config/repo_124m.py: skipped, needs --device=cuda")
    arms = dict(repo=("repo", a["attn_backend"]), rope=("rope", a["attn_backend"]), rope_sdpa=("rope", "torch"))
    results = {}
    for label, argv, n_vocab in presets:
        base = train.TrainConfig(**train.parse_args(argv))
        base = dataclasses.replace(base, device=a["device"], gradient_accumulation_steps=1)
        print(f"\n{label}: {base.n_layer} layers, d={base.n_embd}, {base.batch_size} x {base.block_size} tokens "
              f"per step, compile={base.compile}, dtype={base.dtype}; RePo and RoPE through "
              f"attn_backend={a['attn_backend']}, RoPE on SDPA through attn_backend=torch")
        steps, models = {}, {}
        for arm, (pos, backend) in arms.items():
            c = dataclasses.replace(base, pos_mode=pos, attn_backend=backend)
            torch.manual_seed(0)
            model = models[arm] = GPT(train.model_config(c, n_vocab)).to(device)
            optimizer = train.configure_optimizer(model, c, device)
            run = torch.compile(model) if c.compile else model
            x = torch.randint(0, n_vocab, (c.batch_size, c.block_size + 1), device=device)
            steps[arm] = (lambda run=run, opt=optimizer, batch=[(x[:, :-1], x[:, 1:])], c=c:
                          train.train_step(run, opt, batch, c.learning_rate, c, train.autocast(device, c)))
        times = alternate(steps, a["warmup"], a["iters"])  # train_step returns floats: the step has finished
        tokens = base.batch_size * base.block_size
        peak = peak_flops(device, base)
        for arm, dt in times.items():
            flops = models[arm].flops_per_token(base.block_size) * tokens / dt
            memory = peak_bytes(steps[arm], device)
            results[(label, arm)] = dict(ms=1000 * dt, tokens_per_s=tokens / dt, tflops=flops / 1e12,
                                         mfu=flops / peak if peak else None, peak=memory)
            print(f"  {arm:9s} {1000 * dt:9.1f} ms/step {tokens / dt:12,.0f} tokens/s {flops / 1e12:8.3f} TFLOP/s  "
                  f"MFU {f'{100 * flops / peak:.1f}%' if peak else 'n/a'}  peak {memory / 2**20:9.1f} MiB")
        target = 1.05 if device.type == "cuda" else 1.15
        print(f"  RePo / RoPE step time {times['repo'] / times['rope']:.3f}; RePo / RoPE on SDPA "
              f"{times['repo'] / times['rope_sdpa']:.3f} (target <= {target})")
    return results


def bench_olmo2(a):
    """CPU, one thread, float32: forward + backward + AdamW step of our GPT (RoPE, train.py's default
    shape: 4 layers, d=128, 4 heads, T=256, batch 16, vocab 1024) against transformers'
    Olmo2ForCausalLM with the same weights (exported by save_pretrained, loaded by transformers),
    alternating, median of --iters. The logits are checked to agree first."""
    import transformers
    from transformers import Olmo2ForCausalLM  # a test dependency, only needed here

    from model import GPT, GPTConfig
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=128, block_size=256, pos_mode="rope",
                    rope_theta=10000.0)
    torch.manual_seed(0)
    ours = GPT(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = Olmo2ForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", torch_dtype=torch.float32)
    idx = torch.randint(0, cfg.vocab_size, (16, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a_logits, b_logits = ours(idx)[0], theirs(idx).logits
    diff = ((a_logits - b_logits).norm() / b_logits.norm()).item()
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, 1 thread, float32; "
          f"logits agree to {diff:.1e} (relative)")
    assert diff < 1e-4, "the two models differ: the timing would compare different computations"
    steps = {}
    for name, model in (("ours", ours), ("transformers", theirs)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = (lambda m=model: m(idx, targets=idx)[1]) if name == "ours" else \
            (lambda m=model: m(input_ids=idx, labels=idx).loss)

        def step(forward=forward, opt=opt, model=model):
            forward().backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        steps[name] = step
    times = alternate(steps, a["warmup"], a["iters"])
    for name, dt in times.items():
        print(f"  {name:13s} {1000 * dt:8.1f} ms/step (median of {a['iters']})")
    print(f"  ours / transformers: {times['ours'] / times['transformers']:.3f}")
    return times


def main(argv):
    args = options(argv)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    print(f"torch {torch.__version__}, device {args['device']}, {torch.get_num_threads()} CPU threads; {args}")
    if args["what"] == "gpu":
        import bench_gpu
        if not args["stage"]:
            return 0 if bench_gpu.run_all(smoke=args["smoke"], out=args["out"]) else 1
        if args["stage"] not in bench_gpu.STAGE_FNS:
            fail(f"--stage must be one of {', '.join(bench_gpu.STAGE_FNS)}, got {args['stage']!r}")
        return 0 if bench_gpu.run_stage(args["stage"], args["smoke"], args["out"], sys.modules[__name__]) else 1
    dict(model=bench_model, attention=bench_attention, train=bench_train, olmo2=bench_olmo2)[args["what"]](args)


if __name__ == "__main__":
    cli.run(main, usage())
