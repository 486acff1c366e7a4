"""
Benchmarks: RePo against its baselines, measured in the same run on the same machine.

    python bench.py                     # model: forward+backward step time and peak memory of
                                        # RoPE, NoPE and RePo models of one shape, with ratios
    python bench.py --device=cuda --n_layer=12 --n_embd=768 --n_head=12 --seq_len=1024 --batch_size=8
    python bench.py --what=attention --device=cuda      # rope_kernel's fused Triton attention against
                                                        # rotate-then-SDPA baselines (bf16, causal)
    python bench.py --what=attention                    # CPU smoke run of the same code (interpreter)
    python bench.py --what=train [--device=cuda]        # training throughput (tokens/s, MFU) of RePo vs
                                                        # RoPE with train.py's own step: the default run
                                                        # and, on a GPU, config/repo_124m.py

Speed and memory targets live here, never in tests. CPU peak memory is the high-water mark of
PyTorch's CPU allocator during one step (torch.profiler memory events); CUDA uses
torch.cuda.max_memory_allocated.
"""
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # the attention smoke run needs Triton's CPU interpreter, which is
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when model.py imports rope_kernel below

from model import GPT, GPTConfig


def parse_args(defaults: dict, argv) -> dict:
    args = dict(defaults)
    for a in argv:
        key, _, val = a.removeprefix("--").partition("=")
        if key not in args:
            sys.exit(f"unknown option --{key}; options: {', '.join('--' + k for k in args)}")
        args[key] = type(args[key])(val) if not isinstance(args[key], bool) else val.lower() in ("1", "true", "yes")
    return args


def peak_cpu_bytes(fn) -> int:
    """High-water mark of bytes held by PyTorch's CPU allocator while fn() runs (beyond what was live before)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are charged to the innermost op (self memory; parents would count them again),
    # frees appear as negative "[memory]" events
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def bench_model(a):
    device = torch.device(a["device"])
    results = {}
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
        for _ in range(a["warmup"]):
            step()
    times = {name: [] for name in steps}
    for _ in range(a["iters"]):  # alternate the three, so drifts of the machine hit them alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_cpu_bytes(step)
        ms = 1000 * sorted(times[name])[len(times[name]) // 2]
        results[name] = (ms, peak, models[name].num_params(), models[name].flops_per_token(a["seq_len"]))
        print(f"{name:5s} {ms:9.1f} ms/step  peak {peak / 2**20:8.1f} MiB  "
              f"{results[name][2] / 1e6:.2f}M params  {results[name][3] / 1e6:.1f} MFLOP/token")
    r = results
    print(f"\nRePo / RoPE: step time {r['repo'][0] / r['rope'][0]:.3f} (target <= 1.15), "
          f"peak memory {r['repo'][1] / r['rope'][1]:.3f} (target <= 1.10), FLOPs {r['repo'][3] / r['rope'][3]:.4f}")
    print(f"NoPE / RoPE: step time {r['nope'][0] / r['rope'][0]:.3f}, peak memory {r['nope'][1] / r['rope'][1]:.3f}")
    return results


def bench_attention(a):
    """Continuous-RoPE attention alone, bf16, causal, positions = one learned-looking z per token and head
    shared by q and k. Forward (as in training: inputs require grad) and forward+backward time of the
    fused Triton kernels against (a) eager float32 rotation + SDPA (repo_attention backend="torch"),
    (b) the same rotation under torch.compile + SDPA, (c) SDPA without rotation (the ceiling), plus our
    kernels without rotation (the RoPE overhead inside them). Shapes follow the FlashAttention-3 paper:
    batch * T = 16k tokens, heads * D = 2048, which fills an H100."""
    import torch.nn.functional as F

    import rope_kernel
    device = torch.device(a["device"])
    gpu = device.type == "cuda"
    if gpu:
        from triton.testing import do_bench
        dims, seqs, tokens, width = (64, 128), (1024, 4096, 16384), 16384, 2048
        print(f"{torch.cuda.get_device_name()}, triton {__import__('triton').__version__}")
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
        call()
        times = []
        for _ in range(a["iters"]):
            t0 = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - t0))
        return sorted(times)[len(times) // 2]

    def peak_bytes(fn):
        if not gpu:
            return peak_cpu_bytes(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    results = {}
    for D in dims:
        inv = rope_kernel.rope_inv_freq(D, 500000.0, device=device)
        rotate = lambda x, pos: rope_kernel._rotate(x, pos, inv, 1.0).to(x.dtype)  # the reference's math
        rotate_compiled = torch.compile(rotate)
        methods = {
            "fused Triton": lambda q, k, v, z: rope_kernel.repo_attention(q, k, v, z, z, inv_freq=inv,
                                                                           backend="triton"),
            "fused, no RoPE": lambda q, k, v, z: rope_kernel.repo_attention(q, k, v, None, None, backend="triton"),
            "(a) eager rot+SDPA": lambda q, k, v, z: rope_kernel.repo_attention(q, k, v, z, z, inv_freq=inv,
                                                                                 backend="torch"),
            "(b) compiled rot+SDPA": lambda q, k, v, z: F.scaled_dot_product_attention(
                rotate_compiled(q, z), rotate_compiled(k, z), v, is_causal=True),
            "(c) SDPA, no rotation": lambda q, k, v, z: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
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
            print(f"{'method':24s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'peak MiB':>9s}")
            row = {}
            for name, f in methods.items():
                fwd = timed(lambda: f(q, k, v, z), leaves)
                step = lambda: f(q, k, v, z).backward(do)
                both = timed(step, leaves)
                for t in leaves:
                    t.grad = None
                peak = peak_bytes(step)
                row[name] = (fwd, both, peak)
                print(f"{name:24s} {fwd:9.3f} {flops / fwd / 1e9:8.1f} {both:11.3f} {3.5 * flops / both / 1e9:8.1f} "
                      f"{peak / 2**20:9.1f}")
            results[(D, T)] = row
            ours = row["fused Triton"]
            speedup = lambda base, i: row[base][i] / ours[i]
            print(f"speed-up of the fused kernels (baseline time / ours), forward | forward+backward:\n"
                  f"  vs (a) eager:    {speedup('(a) eager rot+SDPA', 0):.2f} | {speedup('(a) eager rot+SDPA', 1):.2f}"
                  f"   (target >= 1.15)\n"
                  f"  vs (b) compiled: {speedup('(b) compiled rot+SDPA', 0):.2f} | "
                  f"{speedup('(b) compiled rot+SDPA', 1):.2f}   (target >= 0.9)\n"
                  f"  vs (c) ceiling:  {speedup('(c) SDPA, no rotation', 0):.2f} | "
                  f"{speedup('(c) SDPA, no rotation', 1):.2f}   (target at T=4096: forward >= 0.9)\n"
                  f"  RoPE overhead inside our kernels: {ours[0] / row['fused, no RoPE'][0]:.2f} | "
                  f"{ours[1] / row['fused, no RoPE'][1]:.2f}\n"
                  f"  training peak memory, ours / (a): {ours[2] / row['(a) eager rot+SDPA'][2]:.2f}   (target <= 1)")
    return results


def bench_train(a):
    """Optimizer steps per second of train.py's train_step (forward, backward, clip, AdamW) for RoPE
    and RePo versions of the same config, on random tokens (throughput does not depend on the data).
    One micro-step per optimizer step; MFU from train.py's per-device peak table (n/a on CPU)."""
    import dataclasses

    import train
    device = torch.device(a["device"])
    presets = [("default run (python train.py)", [], 1024)]  # the stdlib tokenizer's 1024 tokens
    if device.type == "cuda":
        preset = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "repo_124m.py")
        presets.append(("config/repo_124m.py", [preset], 50257))  # GPT-2's vocabulary
    else:
        print("config/repo_124m.py: skipped, needs --device=cuda")
    results = {}
    for label, argv, n_vocab in presets:
        base = train.TrainConfig(**train.parse_args(argv))
        base = dataclasses.replace(base, device=a["device"], gradient_accumulation_steps=1)
        print(f"\n{label}: {base.n_layer} layers, d={base.n_embd}, {base.batch_size} x {base.block_size} tokens "
              f"per step, compile={base.compile}, dtype={base.dtype}")
        steps, models = {}, {}
        for pos in ("rope", "repo"):
            c = dataclasses.replace(base, pos_mode=pos)
            torch.manual_seed(0)
            model = models[pos] = GPT(train.model_config(c, n_vocab)).to(device)
            optimizer = train.configure_optimizer(model, c, device)
            run = torch.compile(model) if c.compile else model
            x = torch.randint(0, n_vocab, (c.batch_size, c.block_size + 1), device=device)
            steps[pos] = (lambda run=run, opt=optimizer, batch=[(x[:, :-1], x[:, 1:])], c=c:
                          train.train_step(run, opt, batch, c.learning_rate, c, train.autocast(device, c)))
            for _ in range(a["warmup"]):
                steps[pos]()
        times = {pos: [] for pos in steps}
        for _ in range(a["iters"]):  # alternate, so both see the same machine (load, clocks)
            for pos, step in steps.items():
                t0 = time.perf_counter()
                step()  # returns floats: the step has finished on the device
                times[pos].append(time.perf_counter() - t0)
        for pos in steps:
            dt = sorted(times[pos])[len(times[pos]) // 2]
            tokens = base.batch_size * base.block_size
            flops = models[pos].flops_per_token(base.block_size) * tokens / dt
            peak = train.peak_flops(device, base)
            results[(label, pos)] = dt
            print(f"  {pos:5s} {1000 * dt:9.1f} ms/step {tokens / dt:12,.0f} tokens/s {flops / 1e12:8.3f} TFLOP/s  "
                  f"MFU {f'{100 * flops / peak:.1f}%' if peak else 'n/a'}")
        ratio = results[(label, "repo")] / results[(label, "rope")]
        print(f"  RePo / RoPE step time {ratio:.3f} (target <= {1.03 if device.type == 'cuda' else 1.15})")
    return results


if __name__ == "__main__":
    defaults = dict(device="cpu", vocab_size=512, n_layer=6, n_head=8, n_embd=256, seq_len=256, batch_size=8,
                    warmup=3, iters=10, threads=0, what="model", attn_dims="", attn_seqs="")
    args = parse_args(defaults, sys.argv[1:])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    print(f"torch {torch.__version__}, device {args['device']}, {torch.get_num_threads()} CPU threads; {args}")
    if args["what"] not in ("model", "attention", "train"):
        sys.exit(f"--what must be model, attention or train, got {args['what']!r}")
    dict(model=bench_model, attention=bench_attention, train=bench_train)[args["what"]](args)
