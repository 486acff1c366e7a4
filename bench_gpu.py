"""
Everything a GPU should check, in one command that fits a 15-minute window on one H100/H200:

    python bench.py --what=gpu [--out=gpu_check]    # on the GPU; worst case 410 s (the stage limits)
    python bench.py --what=gpu --smoke              # every stage at tiny sizes on the CPU (interpreter)

Every run writes to a new folder OUT/<date>-<time>/ (a rerun never reads or overwrites an earlier
run), seven files:
    summary.txt    the stage table, the machine and versions, the attention winners per shape;
                   rewritten after every stage, so a run cut short still has one
    results.json   every stage's details: per-case errors, timings, the dispatch table rows measured
    <stage>.log    each stage's output, streamed while it runs (tests: its pytest processes, prefixed)

Stages, each a process group with its own time limit; correctness comes before any timing:
    phase 1, sharing the GPU, nothing timed:
      tests        tests/test_rope_kernel.py, test_compile.py and test_auto_table.py split over parallel pytest
                   processes (each JIT-compiles only its slice's kernel variants)
      correctness  training shapes, every backend against float64 and against "torch": output and the
                   five gradients per case, kept per case; bitwise determinism of the backward
      train        60 bf16 steps of train.py with compile, once per backend: the loss falls, no NaN
    phase 2, alone:
      speed        bench.py --what=attention: fused, rotary + each SDPA backend the GPU offers, and
                   SDPA without rotation; the winner per (dtype, D, T) for "auto"'s table
    phase 3, alone:
      throughput   train-step throughput and MFU of config/repo_124m.py, RePo against RoPE on SDPA

    python bench.py --what=gpu --stage=STAGE --out=DIR [--smoke]   # one stage (what run_all starts)

bench.py runs this file's stages and hands them its own module (speed and throughput are its
benchmarks): this file imports nothing from bench.py.
"""
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (stage, phase, time limit in seconds on a GPU). The phases run one after another, a phase's stages
# at once, so the worst case of the whole command is the sum over phases of their longest limit.
# The limits are estimates for one H100/H200 with 16 CPU cores (JIT compiles dominate phase 1), with
# 1.2-2x headroom over the estimated durations; summary.txt reports each stage's seconds against its
# limit, which is the headroom measured.
STAGES = [("tests", 1, 170), ("correctness", 1, 170), ("train", 1, 170), ("speed", 2, 100), ("throughput", 3, 140)]
TEST_FILES = ["tests/test_rope_kernel.py", "tests/test_compile.py", "tests/test_auto_table.py"]
SHARDS = 6  # pytest processes of the tests stage on a GPU (phase 1 also runs correctness and 4 trainings)
SMOKE_LIMIT = 300  # seconds per stage on the CPU (the interpreter is slow, the machine may be busy)
OUT_FILES = ["summary.txt", "results.json"] + [f"{s}.log" for s, _, _ in STAGES]


def worst_case(smoke=False):
    """Seconds the whole command may take: the sum over phases of the longest limit in each."""
    return sum(max(SMOKE_LIMIT if smoke else lim for _, p, lim in STAGES if p == phase)
               for phase in sorted({p for _, p, _ in STAGES}))


def preflight(smoke):
    """The single error that stops the command before any stage starts, or None."""
    import importlib.util

    import torch
    if not smoke and not torch.cuda.is_available():
        return ("--what=gpu needs a CUDA GPU and torch.cuda.is_available() is False here; "
                "add --smoke to run every stage tiny on the CPU")
    missing = [m for m in ("triton", "pytest", "tiktoken") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (the stages need them); "
                f"pip install {' '.join(missing)}, or from a folder of wheels: pip install --no-index --find-links=DIR")
    if smoke:
        from repo_kernels.ops import interpreter_problem
        return interpreter_problem()
    return None


def fresh_dir(base):
    """A new folder base/<date>-<time>[-n] (never one that exists: reruns keep every earlier run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = os.path.join(base, stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh folder under {base}")


def _atomic_write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _pump(proc, sink, lock, prefix=""):
    """Copy proc's output into sink line by line while it runs (a thread), so that a stage killed at its
    limit still leaves everything it printed."""
    def run():
        for line in iter(proc.stdout.readline, b""):
            with lock:
                sink.write(prefix + line.decode(errors="replace"))
                sink.flush()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start(cmd, log, env, lock):
    """Start cmd in its own process group, its output streamed into the open file log."""
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log, _pump(proc, log, lock), time.perf_counter()


def finish(started, limit, label=""):
    """Wait for a start()ed command until limit seconds after its start, then kill its whole process
    group (the stage and every process it started); close its log with one line saying how it ended.
    Returns (exit status, killed, seconds)."""
    proc, log, pump, t0 = started
    try:
        rc, killed = proc.wait(timeout=max(0.1, limit - (time.perf_counter() - t0))), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, killed = proc.wait(), True
    pump.join(timeout=10)
    seconds = time.perf_counter() - t0
    log.write(f"\n[{label}{'KILLED at the limit' if killed else f'exit status {rc}'}, {seconds:.0f} s of {limit} s]\n")
    log.close()
    return rc, killed, seconds


def machine():
    """GPU, versions and date of this run (one dict, in results.json and summary.txt)."""
    import numpy
    import torch
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(), torch=torch.__version__,
                numpy=numpy.__version__, cpus=os.cpu_count())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = None
    return info


def run_all(smoke=False, out="gpu_check"):
    """Run every stage into a fresh folder under out, write summary.txt and results.json there, print the
    summary; True if every stage passed. Exits with status 2 and one error line if it cannot start."""
    error = preflight(smoke)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = fresh_dir(out)
    scratch = tempfile.mkdtemp(prefix="nanorepo-gpu-")  # stage JSONs and train.py's run folders (checkpoints)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")  # phase 1 compiles in ~10 processes at once
    if smoke:  # the CPU, even where a GPU is present
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    info = machine()
    results = dict(machine=info, smoke=smoke, worst_case_s=worst_case(smoke), stages={})
    head = _header(info, smoke)
    print(head + f"\nresults: {run_dir}/ ({', '.join(OUT_FILES)})", flush=True)
    lock = threading.Lock()
    try:
        for phase in sorted({p for _, p, _ in STAGES}):
            running = []
            for name, p, limit in STAGES:
                if p != phase:
                    continue
                limit = SMOKE_LIMIT if smoke else limit
                log = open(os.path.join(run_dir, f"{name}.log"), "w")
                cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--what=gpu", f"--stage={name}", f"--out={scratch}"] + \
                    (["--smoke"] if smoke else [])
                print(f"[{time.strftime('%H:%M:%S')}] {name}: started (limit {limit} s)", flush=True)
                running.append((name, limit, start(cmd, log, env, lock)))
            for name, limit, started in running:
                rc, killed, seconds = finish(started, limit, f"{name}: ")
                status = "TIMEOUT" if killed else None
                stage = _read(os.path.join(scratch, f"{name}.json"))  # what the stage wrote, even if cut short
                if status is None:
                    status = "pass" if rc == 0 and stage.get("ok") else "FAIL"
                summary = stage.get("summary") or f"exit status {rc}, see {name}.log"
                if status == "TIMEOUT":
                    summary = f"killed at the limit; so far: {summary}"
                results["stages"][name] = dict(status=status, seconds=round(seconds, 1), limit=limit, summary=summary,
                                               details=stage.get("details"))
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} in {seconds:.0f} s", flush=True)
                _atomic_write(os.path.join(run_dir, "results.json"), json.dumps(results, indent=1, default=str))
                _atomic_write(os.path.join(run_dir, "summary.txt"), head + "\n" + _table(results))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + _table(results) + f"\n(details: {run_dir}/)")
    return all(s["status"] == "pass" for s in results["stages"].values())


def _header(info, smoke):
    gpu = (f"{info['gpu']} ({info['capability']}, {info['sms']} SMs, {info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, "
           f"cuDNN {info['cudnn']}" if info.get("gpu") else "no GPU")
    phases = sorted({p for _, p, _ in STAGES})
    limit = lambda ph: max(SMOKE_LIMIT if smoke else lim for _, p, lim in STAGES if p == ph)
    limits = "; ".join(" + ".join(n for n, p, _ in STAGES if p == ph) + f" {limit(ph)} s" for ph in phases)
    return (f"nanoRePo GPU check, {info['date']}{'  (SMOKE RUN on the CPU: the numbers say nothing about a GPU)' if smoke else ''}\n"
            f"{gpu}; torch {info['torch']}, triton {info['triton']}, numpy {info['numpy']}, python {info['python']}, "
            f"{info['cpus']} CPUs\n"
            f"stage limits by phase: {limits}; worst case {worst_case(smoke)} s ({worst_case(smoke) / 60:.1f} min)")


def _table(results):
    rows = results["stages"]
    lines = [f"{'stage':12s} {'status':8s} {'seconds':>8s} {'limit':>6s}  summary"]
    lines += [f"{n:12s} {r['status']:8s} {r['seconds']:8.0f} {r['limit']:6d}  {r['summary']}" for n, r in rows.items()]
    phase = {n: p for n, p, _ in STAGES}
    total = sum(max((r["seconds"] for n, r in rows.items() if phase[n] == ph), default=0) for ph in set(phase.values()))
    lines.append(f"total {total:.0f} s of a worst case {results['worst_case_s']} s")
    winners = ((rows.get("speed") or {}).get("details") or {}).get("dispatch")
    if winners:
        lines.append("\nfastest RePo attention per shape, forward+backward (rows for \"auto\"'s table: python -m "
                     "repo_kernels.auto_table results.json):")
        lines += [f"  {w['arch']} {w['dtype']} D={w['D']} T={w['T']}: {w['choice']} "
                  f"({w['vs_sdpa']:.2f}x the fastest SDPA without rotation; runner-up {w['runner_up']})" for w in winners]
    return "\n".join(lines) + "\n"


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# The stages. Each runs in its own process (run_stage) and returns (ok, one-line summary, details);
# on the way it calls report(...) whenever it has something worth keeping, so that a stage killed at
# its limit still leaves what it had measured (OUT/<stage>.json, the last write wins).
# ------------------------------------------------------------------------------------------------
_RUNNING = {}  # out and stage of the stage this process runs


def report(ok, summary, details):
    path = os.path.join(_RUNNING["out"], f"{_RUNNING['stage']}.json")
    _atomic_write(path, json.dumps(dict(ok=ok, summary=summary, details=details), indent=1, default=str))


def stage_tests(smoke, bench):
    """The kernel tests in parallel pytest processes, each on a contiguous slice (tests/conftest.py
    --shard), their output streamed with a [tests i/n] prefix."""
    shards = 2 if smoke else SHARDS
    selection = ["-k", "bad_input or int32"] if smoke else ["-k", "not offline"]  # offline: CPU-only, run by CI
    files = TEST_FILES[:1] if smoke else TEST_FILES
    lock, procs = threading.Lock(), []
    for i in range(1, shards + 1):
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--durations=5",
               f"--shard={i}/{shards}", *files, *selection]
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append((proc, _pump_capture(proc, lock, f"[tests {i}/{shards}] ")))
    details = []
    for i, (proc, (thread, lines)) in enumerate(procs, 1):
        proc.wait()
        thread.join(timeout=10)
        last = next((ln.strip("= \n") for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln
                                                                                    or "error" in ln)), "no result")
        failed = [ln.split()[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        details.append(dict(shard=f"{i}/{shards}", rc=proc.returncode, result=last, failed=failed))
        report(False, f"{i} of {shards} processes done", details)  # partial, until all are in
    ok = all(d["rc"] == 0 for d in details)
    counts = {}
    for d in details:
        for part in d["result"].split(" in ")[0].split(", "):
            n, _, what = part.partition(" ")
            if n.isdigit():
                counts[what] = counts.get(what, 0) + int(n)
    summary = f"{shards} processes: " + ", ".join(f"{n} {w}" for w, n in counts.items())
    failed = [f for d in details for f in d["failed"]]
    return ok, summary + (f"; failed: {', '.join(failed[:5])}" if failed else ""), details


def _pump_capture(proc, lock, prefix):
    """_pump into this process's stdout, keeping the lines for the summary."""
    lines = []

    def run():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            lines.append(line)
            with lock:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines


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


def stage_correctness(smoke, bench):
    import torch

    import rope_kernel
    from repo_kernels import ops
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
            error = ops._unsupported(backend, q, k, v, pq, pk, inv) if backend in ("triton", "rotary") else None
            if error is not None:
                print(f"{label:30s} {backend:7s} not run: {error}")
                continue
            got = run(backend)
            torch_run = got if backend == "torch" else torch_run
            rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
            errors = [rel(a, b) for a, b in zip(got, truth)]
            vs_torch = max(rel(a, b) for a, b in zip(got, torch_run))
            # our fused kernels have no atomics: their backward must be bitwise reproducible (the only
            # backend run twice; the others' backward is the vendor's SDPA)
            deterministic = all(torch.equal(a, b) for a, b in zip(got, run(backend))) if backend == "triton" else None
            limits = [1e-4] * 6 if dtype == torch.float32 else [1e-2, 2e-2, 2e-2, 2e-2, 5e-2, 5e-2]
            good = all(e < lim for e, lim in zip(errors, limits)) and deterministic is not False
            ok &= good
            chosen = "+".join(filter(None, ops._auto_choice(q, k, v, pq, pk, inv))) if backend == "auto" else backend
            details.append(dict(case=label, backend=backend, runs=chosen, errors=dict(zip(names, errors)),
                                limits=dict(zip(names, limits)), vs_torch=vs_torch, deterministic=deterministic, ok=good))
            print(f"{label:30s} {backend:7s} " + " ".join(f"{e:8.1e}" for e in errors) +
                  f"  {vs_torch:12.1e}  {'-' if deterministic is None else deterministic}" + (f"  (auto ran {chosen})" if backend == "auto" else "")
                  + ("" if good else "  <-- FAIL"), flush=True)
            report(ok, _correctness_summary(details, done=False), details)  # every case kept as it finishes
            del got
        del truth, torch_run
    return ok, _correctness_summary(details, done=True), details


def _correctness_summary(details, done):
    worst = max((max(d["errors"].values()) for d in details if d["backend"] != "torch"), default=float("nan"))
    failed = [f"{d['case']} {d['backend']}" for d in details if not d["ok"]]
    nondet = sorted({d["case"] for d in details if d["deterministic"] is False})
    return (f"{sum(d['ok'] for d in details)}/{len(details)} (case, backend) within limits"
            + ("" if done else " (cases so far)") + f"; worst error of triton/rotary/auto vs float64 {worst:.1e}; "
            f"triton's backward bitwise reproducible: {'yes' if not nondet else 'NO in ' + ', '.join(nondet)}"
            + (f"; FAILED: {', '.join(failed[:4])}" if failed else ""))


def stage_train(smoke, bench):
    """60 steps of train.py per backend, all at once (they measure nothing, they must only train).
    The smoke run trains 2 steps through the two Triton backends only (on the CPU "auto" is "torch")."""
    from data import stdlib_text
    import rope_kernel
    folder = os.path.join(HERE, "data", "stdlib")
    if not stdlib_text.is_prepared(folder):  # once, before the runs start (they would race)
        stdlib_text.prepare(folder, verbose=False)
    out = os.path.join(_RUNNING["out"], "train")  # checkpoints stay in the scratch folder, not among the results
    common = ["--eval_interval=1000", "--sample_tokens=0", "--log_interval=1", "--ckpt_interval=1000"]
    if smoke:
        common += ["--max_iters=2", "--device=cpu", "--n_layer=2", "--batch_size=2", "--block_size=16",
                   "--warmup_iters=1", "--eval_iters=1", "--compile=False"]
    else:
        common += ["--max_iters=60", "--device=cuda", "--dtype=bfloat16", "--compile=True"]
    lock, procs = threading.Lock(), {}
    for backend in ("triton", "rotary") if smoke else rope_kernel.BACKENDS:
        cmd = [sys.executable, "train.py", f"--out_dir={out}/{backend}", f"--attn_backend={backend}", *common]
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs[backend] = (proc, _pump_capture(proc, lock, f"[train {backend}] ")[0])
    details, ok = {}, True
    for backend, (proc, thread) in procs.items():
        proc.wait()
        thread.join(timeout=10)
        losses, norms = [], []
        try:
            with open(os.path.join(out, backend, "log.jsonl")) as f:
                for r in map(json.loads, f):
                    if "loss" in r:
                        losses.append(r["loss"])
                        norms.append(r.get("grad_norm"))
        except OSError:
            pass
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        # a step whose gradients vanished (a compiled graph that dropped its backward) trains nothing
        learns = finite and all(n is None or n > 0 for n in norms)
        falls = learns and (smoke or sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5)
        details[backend] = dict(rc=proc.returncode, steps=len(losses), first=losses[:1], last=losses[-1:],
                                grad_norm_min=min((n for n in norms if n is not None), default=None),
                                ok=proc.returncode == 0 and finite and falls)
        ok &= details[backend]["ok"]
        report(False, f"{backend} done", details)
    summary = "; ".join(f"{b} " + (f"{d['first'][0]:.2f} -> {d['last'][0]:.2f}" if d["steps"] else f"rc {d['rc']}")
                        + ("" if d["ok"] else " FAIL") for b, d in details.items())
    return ok, f"loss over {'2 (smoke: finite only)' if smoke else 60} steps: {summary}", details


def stage_speed(smoke, bench):
    """bench.py --what=attention on the training shapes, then the dispatch rows: per (dtype, D, T), the
    fastest RePo method and how it compares with the fastest SDPA backend without rotation."""
    import torch

    a = dict(bench.DEFAULTS, device="cpu" if smoke else "cuda", iters=1)
    arch = "cpu" if smoke else "sm_%d%d" % torch.cuda.get_device_capability()
    details = dict(rows={}, errors={}, dispatch=[])
    shapes = ((("32,64", "32"),) if smoke else (("128", "1024,4096,16384"), ("64", "4096")))

    def keep(D, T, row, errors):
        details["rows"][f"D={D} T={T}"] = row
        details["errors"].update({f"D={D} {n}": e for n, e in errors.items()})
        pick = bench.fastest(row)
        if pick:
            details["dispatch"].append(dict(arch=arch, dtype="bfloat16", D=D, T=T, **pick))
        report(False, f"{len(details['rows'])} shapes timed", details)

    for dims, seqs in shapes:
        bench.bench_attention(dict(a, attn_dims=dims, attn_seqs=seqs), on_row=keep)
    key = "D=32 T=32" if smoke else "D=128 T=4096"
    wrong = {n: e for n, e in details["errors"].items() if not e < 2e-2}
    ok = key in details["rows"] and not wrong
    pick = next((d for d in details["dispatch"] if f"D={d['D']} T={d['T']}" == key), None)
    if pick:
        summary = (f"{key}: fastest RePo attention {pick['choice']} at {pick['vs_sdpa']:.2f}x the fastest SDPA "
                   f"without rotation ({pick['sdpa_best']}; target >= 0.9), runner-up {pick['runner_up']}")
    else:
        summary = f"{key}: no timings"
    return ok, summary + (f"; wrong results, not timed: {', '.join(wrong)}" if wrong else ""), details


def stage_throughput(smoke, bench):
    a = dict(bench.DEFAULTS, device="cpu" if smoke else "cuda", warmup=0 if smoke else 3, iters=1 if smoke else 10)
    # on a GPU only the preset the MFU target is about: train.py's default model is too small to time there
    presets = ([("tiny (smoke)", ["--n_layer=2", "--batch_size=2", "--block_size=32"], 1024)] if smoke else
               [("config/repo_124m.py", [os.path.join(HERE, "config", "repo_124m.py")], 50257)])
    results = bench.bench_train(a, presets)
    parts = []
    for label in dict.fromkeys(lbl for lbl, _ in results):
        repo, sdpa = results[(label, "repo")], results[(label, "rope_sdpa")]
        mfu = f", MFU {100 * repo['mfu']:.1f}% (target >= 40)" if repo["mfu"] else ""
        parts.append(f"{label}: RePo / RoPE-on-SDPA step time {repo['ms'] / sdpa['ms']:.3f} (target <= 1.05){mfu}")
    return True, "; ".join(parts), {f"{k[0]} {k[1]}": v for k, v in results.items()}


STAGE_FNS = dict(tests=stage_tests, correctness=stage_correctness, train=stage_train, speed=stage_speed,
                 throughput=stage_throughput)
assert list(STAGE_FNS) == [s for s, _, _ in STAGES]


def run_stage(stage, smoke, out, bench):
    """One stage in this process (python bench.py --what=gpu --stage=...): its summary line, and
    OUT/<stage>.json with ok, summary and details. bench: the bench.py module. True if it passed."""
    os.makedirs(out, exist_ok=True)
    _RUNNING.update(out=out, stage=stage)
    try:
        ok, summary, details = STAGE_FNS[stage](smoke, bench)
    except Exception as e:  # the summary table shows it; the log has the traceback
        import traceback
        traceback.print_exc()
        previous = _read(os.path.join(out, f"{stage}.json"))
        ok, summary = False, f"{type(e).__name__}: {str(e)[:200]}" + (f" (after: {previous['summary']})" if previous else "")
        details = previous.get("details")
    report(ok, summary, details)
    print(summary)
    return ok
