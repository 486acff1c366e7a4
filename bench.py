"""
Benchmarks: RePo against its baselines, measured in the same run on the same machine.

    python bench.py                     # model: forward+backward step time and peak memory of
                                        # RoPE, NoPE and RePo models of one shape, with ratios
    python bench.py --device=cuda --n_layer=12 --n_embd=768 --n_head=12 --seq_len=1024 --batch_size=8

Speed and memory targets live here, never in tests. CPU peak memory is the high-water mark of
PyTorch's CPU allocator during one step (torch.profiler memory events); CUDA uses
torch.cuda.max_memory_allocated.
"""
import sys
import time

import torch

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
    for name, kw in (("rope", dict(pos_mode="rope")), ("nope", dict(pos_mode="nope")), ("repo", dict(pos_mode="repo"))):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=a["vocab_size"], n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                        block_size=a["seq_len"], **kw)
        model = GPT(cfg).to(device).train()
        idx = torch.randint(0, cfg.vocab_size, (a["batch_size"], a["seq_len"]), device=device)
        ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def step():
            with ctx:
                _, loss = model(idx, targets=idx)
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(a["warmup"]):
            step()
        times = []
        for _ in range(a["iters"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_cpu_bytes(step)
        ms = 1000 * sorted(times)[len(times) // 2]
        results[name] = (ms, peak, model.num_params(), model.flops_per_token(a["seq_len"]))
        print(f"{name:5s} {ms:9.1f} ms/step  peak {peak / 2**20:8.1f} MiB  "
              f"{results[name][2] / 1e6:.2f}M params  {results[name][3] / 1e6:.1f} MFLOP/token")
    r = results
    print(f"\nRePo / RoPE: step time {r['repo'][0] / r['rope'][0]:.3f} (target <= 1.15), "
          f"peak memory {r['repo'][1] / r['rope'][1]:.3f} (target <= 1.10), FLOPs {r['repo'][3] / r['rope'][3]:.4f}")
    print(f"NoPE / RoPE: step time {r['nope'][0] / r['rope'][0]:.3f}, peak memory {r['nope'][1] / r['rope'][1]:.3f}")
    return results


if __name__ == "__main__":
    defaults = dict(device="cpu", vocab_size=512, n_layer=6, n_head=8, n_embd=256, seq_len=256, batch_size=8,
                    warmup=3, iters=10, threads=0)
    args = parse_args(defaults, sys.argv[1:])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    print(f"torch {torch.__version__}, device {args['device']}, {torch.get_num_threads()} CPU threads; {args}")
    bench_model(args)
