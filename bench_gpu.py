"""
Everything a lent GPU should check, in one command with one summary table (issue 11):

    python bench.py --what=gpu [--out=gpu_check]    # on one H100: under 8 minutes
    python bench.py --what=gpu --smoke              # every stage at tiny sizes on the CPU (interpreter)

Stages, each a subprocess with its own time limit and log (OUT/<stage>.log, results in OUT/<stage>.json):
    tests        the kernel tests on the GPU (tests/test_rope_kernel.py, tests/test_compile.py)
    correctness  training shapes, every backend against float64 and against "torch": output and the
                 five gradients; bitwise determinism of the backward
    train        60 bf16 steps of train.py with compile, once per backend: the loss falls, no NaN
    speed        forward and forward+backward TFLOP/s and training peak memory (bench.py --what=attention)
    throughput   train-step throughput and MFU, RePo against RoPE on SDPA (bench.py --what=train)
tests, correctness and train measure no time and share the GPU; speed and throughput run alone.

    python bench_gpu.py STAGE --out=DIR [--smoke]   # one stage (what run_all starts)
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (stage, phase, time limit in seconds on a GPU): the phases run one after another, a phase's stages
# together; the limits add up to 470 s, the worst case of the whole command
STAGES = [("tests", 0, 150), ("correctness", 0, 150), ("train", 0, 150), ("speed", 1, 120), ("throughput", 2, 200)]
SMOKE_LIMIT = 300  # seconds per stage on the CPU (the interpreter is slow, the machine may be busy)


def run_all(smoke=False, out="gpu_check"):
    """Run every stage, print the summary table; True if every stage passed."""
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:  # the CPU, even where a GPU is present
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    rows = []
    for phase in sorted({p for _, p, _ in STAGES}):
        running = []
        for name, p, limit in STAGES:
            if p != phase:
                continue
            limit = SMOKE_LIMIT if smoke else limit
            log = open(os.path.join(out, f"{name}.log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), name, f"--out={out}"] + (["--smoke"] if smoke else [])
            print(f"[{time.strftime('%H:%M:%S')}] {name}: started (limit {limit} s, log {log.name})", flush=True)
            proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running.append((name, limit, proc, log, time.perf_counter()))
        for name, limit, proc, log, t0 in running:
            try:
                rc = proc.wait(timeout=max(1.0, limit - (time.perf_counter() - t0)))
                status = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started
                proc.wait()
                rc, status = None, "TIMEOUT"
            log.close()
            seconds = time.perf_counter() - t0
            result = _read(os.path.join(out, f"{name}.json"))
            if status is None:
                status = "pass" if rc == 0 and result.get("ok") else "FAIL"
            rows.append((name, status, seconds, limit, result.get("summary", f"exit status {rc}, see the log")))
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} in {seconds:.0f} s", flush=True)
    print(f"\n{'stage':12s} {'status':8s} {'seconds':>8s} {'limit':>6s}  summary (details: {out}/<stage>.log)")
    for name, status, seconds, limit, summary in rows:
        print(f"{name:12s} {status:8s} {seconds:8.0f} {limit:6d}  {summary}")
    print(f"total {sum(r[2] for r in rows):.0f} s" + ("  (SMOKE RUN on the CPU: the numbers say nothing about a GPU)"
                                                    if smoke else ""))
    return all(r[1] == "pass" for r in rows)


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# The stages. Each returns (ok, one-line summary, details) and runs in its own process.
# ------------------------------------------------------------------------------------------------


def stage_tests(smoke):
    files = ["tests/test_rope_kernel.py"] + ([] if smoke else ["tests/test_compile.py"])
    selection = ["-k", "bad_input"] if smoke else ["-k", "not offline"]  # offline: CPU-only, in CI already
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *selection],
                          cwd=HERE, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return proc.returncode == 0, last.strip("= "), {}


def _cases(smoke):
    """(label, B, H, Tq, Tk, D, dtype, causal, position scale, position offset) of the correctness stage."""
    import torch
    bf16, f32 = torch.bfloat16, torch.float32
    if smoke:
        return [("bf16 D=64 T=48", 1, 1, 48, 48, 64, bf16, True, 4, 5e3),
                ("bf16 D=32 T=64 |pos|~1e5", 1, 1, 64, 64, 32, bf16, True, 40, 1e5),
                ("bf16 Tq=7 vs Tk=40", 1, 1, 7, 40, 32, bf16, True, 4, 5e3),
                ("bf16 Tq=1 vs Tk=40", 1, 1, 1, 40, 32, bf16, True, 4, 5e3),
                ("bf16 non-causal T=32", 1, 1, 32, 32, 32, bf16, False, 4, 5e3),
                ("fp32 D=32 T=32", 1, 1, 32, 32, 32, f32, True, 4, 5e3)]
    return [("bf16 D=128 T=4096", 1, 4, 4096, 4096, 128, bf16, True, 4, 5e3),
            ("bf16 D=64 T=16384 |pos|~1e5", 1, 2, 16384, 16384, 64, bf16, True, 40, 1e5),
            ("bf16 D=128 Tq=77 vs Tk=4096", 2, 4, 77, 4096, 128, bf16, True, 4, 5e3),
            ("bf16 D=128 Tq=1 vs Tk=4096", 2, 4, 1, 4096, 128, bf16, True, 4, 5e3),
            ("bf16 D=128 non-causal T=2048", 1, 4, 2048, 2048, 128, bf16, False, 4, 5e3),
            ("fp32 D=128 T=2048", 1, 4, 2048, 2048, 128, f32, True, 4, 5e3)]


def stage_correctness(smoke):
    import torch

    import rope_kernel
    device = torch.device("cpu" if smoke else "cuda")
    names = ("out", "dq", "dk", "dv", "dpos_q", "dpos_k")
    details, ok = [], True
    print(f"{'case':30s} {'backend':7s} " + " ".join(f"{n:>8s}" for n in names) + "  max vs torch  deterministic")
    for label, B, H, Tq, Tk, D, dtype, causal, scale, offset in _cases(smoke):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, Tq, D, device=device, generator=gen).to(dtype)
        k, v = (torch.randn(B, H, Tk, D, device=device, generator=gen).to(dtype) for _ in range(2))
        g = torch.randn(B, H, Tq, D, device=device, generator=gen).to(dtype)
        pk = (torch.randn(B, H, Tk, device=device, generator=gen) * scale).cumsum(-1) + offset
        pq = pk[..., Tk - Tq:].contiguous()  # the queries are the last Tq tokens
        inv = rope_kernel.rope_inv_freq(D, 500000.0, device=device)

        def run(backend, x64=False):
            leaves = [t.double() if x64 else t.clone() for t in (q, k, v, pq, pk)]
            for t in leaves:
                t.requires_grad_()
            out = rope_kernel.repo_attention(*leaves, causal=causal, backend=backend, inv_freq=inv)
            out.backward(g.double() if x64 else g)
            return [out.detach()] + [t.grad for t in leaves]

        truth = run("torch", x64=True)
        torch_run = None
        for backend in ("torch", "triton", "rotary", "auto"):
            error = rope_kernel._unsupported(backend, q, k, v, pq, pk, inv) if backend in ("triton", "rotary") else None
            if error is not None:
                print(f"{label:30s} {backend:7s} not run: {error}")
                continue
            got = run(backend)
            torch_run = got if backend == "torch" else torch_run
            rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
            errors = [rel(a, b) for a, b in zip(got, truth)]
            vs_torch = max(rel(a, b) for a, b in zip(got, torch_run))
            deterministic = all(torch.equal(a, b) for a, b in zip(got, run(backend)))
            limits = [1e-4] * 6 if dtype == torch.float32 else [1e-2, 2e-2, 2e-2, 2e-2, 5e-2, 5e-2]
            # our fused kernels have no atomics: their backward must be bitwise reproducible; the
            # others depend on the vendor's SDPA backward, reported only
            good = all(e < lim for e, lim in zip(errors, limits)) and (deterministic or backend != "triton")
            ok &= good
            details.append(dict(case=label, backend=backend, errors=dict(zip(names, errors)), vs_torch=vs_torch,
                                deterministic=deterministic, ok=good))
            print(f"{label:30s} {backend:7s} " + " ".join(f"{e:8.1e}" for e in errors) +
                  f"  {vs_torch:12.1e}  {deterministic}" + ("" if good else "  <-- FAIL"), flush=True)
            del got
        del truth, torch_run
    worst = max((max(d["errors"].values()) for d in details if d["backend"] != "torch"), default=float("nan"))
    nondet = sorted({d["backend"] for d in details if d["deterministic"] is False})
    summary = (f"{sum(d['ok'] for d in details)}/{len(details)} (case, backend) within limits; worst error of "
               f"triton/rotary/auto vs float64 {worst:.1e}; nondeterministic backward: {nondet or 'none'} "
               "(required deterministic: triton)")
    return ok, summary, details


def stage_train(smoke):
    """60 steps of train.py per backend (4 runs at once: they measure nothing, they must only train).
    The smoke run trains 2 steps through the two Triton backends only (on the CPU "auto" is "torch")."""
    from data import stdlib_text
    import rope_kernel
    folder = os.path.join(HERE, "data", "stdlib")
    if not stdlib_text.is_prepared(folder):  # once, before the runs start (they would race)
        stdlib_text.prepare(folder, verbose=False)
    out = os.path.join(OUT, "train")
    common = ["--eval_interval=1000", "--sample_tokens=0", "--log_interval=1", "--ckpt_interval=1000"]
    if smoke:
        common += ["--max_iters=2", "--device=cpu", "--n_layer=2", "--batch_size=2", "--block_size=16",
                   "--warmup_iters=1", "--eval_iters=1", "--compile=False"]
    else:
        common += ["--max_iters=60", "--device=cuda", "--dtype=bfloat16", "--compile=True"]
    procs = {}
    for backend in ("triton", "rotary") if smoke else rope_kernel.BACKENDS:
        cmd = [sys.executable, "train.py", f"--out_dir={out}/{backend}", f"--attn_backend={backend}", *common]
        procs[backend] = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    details, ok = {}, True
    for backend, proc in procs.items():
        text = proc.communicate()[0]
        print(f"--- {backend}\n{text[-3000:]}")
        losses = []
        try:
            with open(os.path.join(out, backend, "log.jsonl")) as f:
                losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        except OSError:
            pass
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        falls = finite and (smoke or sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5)
        details[backend] = dict(rc=proc.returncode, steps=len(losses), first=losses[:1], last=losses[-1:],
                                ok=proc.returncode == 0 and finite and falls)
        ok &= details[backend]["ok"]
    summary = "; ".join(f"{b} " + (f"{d['first'][0]:.2f} -> {d['last'][0]:.2f}" if d["steps"] else f"rc {d['rc']}")
                        + ("" if d["ok"] else " FAIL") for b, d in details.items())
    return ok, f"loss over {'2 (smoke: finite only)' if smoke else 60} steps: {summary}", details


def stage_speed(smoke):
    import bench
    a = dict(bench.DEFAULTS, device="cpu" if smoke else "cuda", iters=1)
    if smoke:
        a.update(attn_dims="32", attn_seqs="32")
    rows, errors = {}, {}
    for dims, seqs in ((("32",), ("32",)),) if smoke else ((("128",), ("1024,4096,16384",)), (("64",), ("4096",))):
        r, e = bench.bench_attention(dict(a, attn_dims=dims[0], attn_seqs=seqs[0]))
        rows.update({f"D={d} T={t}": v for (d, t), v in r.items()})
        errors.update(e)
    key = "D=32 T=32" if smoke else "D=128 T=4096"
    row = rows.get(key, {})
    ceiling = row.get("(c) SDPA, no rotation", {}).get("fwd_bwd_ms")
    best = min(((row[n]["fwd_bwd_ms"], n) for n in ("triton (fused)", "rotary (+SDPA)") if n in row), default=None)
    ok = bool(row) and all(e < 2e-2 for e in errors.values())
    if best and ceiling:
        summary = (f"{key}: fastest RePo backend {best[1]} at {ceiling / best[0]:.2f}x SDPA without rotation "
                   f"(target >= 0.9); " + ", ".join(f"{n} {v['fwd_bwd_tflops']:.0f}" for n, v in row.items())
                   + " TFLOP/s fwd+bwd")
    else:
        summary = f"{key}: no timings (wrong results?)"
    return ok, summary, {k: v for k, v in rows.items()}


def stage_throughput(smoke):
    import bench
    a = dict(bench.DEFAULTS, device="cpu" if smoke else "cuda", warmup=0 if smoke else 3, iters=1 if smoke else 10)
    presets = [("tiny (smoke)", ["--n_layer=2", "--batch_size=2", "--block_size=32"], 1024)] if smoke else None
    results = bench.bench_train(a, presets)
    parts = []
    for label in dict.fromkeys(lbl for lbl, _ in results):
        repo, sdpa = results[(label, "repo")], results[(label, "rope_sdpa")]
        mfu = f", MFU {100 * repo['mfu']:.1f}%" if repo["mfu"] else ""
        parts.append(f"{label}: RePo / RoPE-on-SDPA step time {repo['ms'] / sdpa['ms']:.3f} (target <= 1.05){mfu}")
    return True, "; ".join(parts), {f"{k[0]} {k[1]}": v for k, v in results.items()}


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage not in {s for s, _, _ in STAGES}:
        print(f"error: the stage must be one of {', '.join(s for s, _, _ in STAGES)} (or run python bench.py "
              "--what=gpu for all of them)", file=sys.stderr)
        sys.exit(2)
    smoke = "--smoke" in sys.argv
    OUT = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")), "gpu_check")
    sys.path.insert(0, HERE)
    t0 = time.perf_counter()
    try:
        ok, summary, details = globals()[f"stage_{stage}"](smoke)
    except Exception as e:  # the summary table shows it; the log has the traceback
        import traceback
        traceback.print_exc()
        ok, summary, details = False, f"{type(e).__name__}: {str(e)[:200]}", {}
    with open(os.path.join(OUT, f"{stage}.json"), "w") as f:
        json.dump(dict(ok=ok, summary=summary, seconds=time.perf_counter() - t0, details=details), f, indent=1,
                  default=str)
    print(summary)
    sys.exit(0 if ok else 1)
