"""
Every CPU figure README.md quotes, measured in one run on this machine, with the machine and the
versions that produced them. Run it on an otherwise idle machine whenever the code changes a figure,
then copy the numbers from its report into README.

    python experiments/readme_figures.py                 # ~15 minutes on 2 cores
    python experiments/readme_figures.py --skip=tests    # without the test-suite timing

Writes experiments/results/readme_figures.md (each command, its wall time, its peak memory and
the lines of its output the README quotes) and prints it. What it runs, in a clean clone of the committed tree in a
temporary folder (the stdlib dataset is prepared there from nothing, as on a new machine):
    train     python train.py (the Quick start's first command): wall time, data preparation, peak
              memory, the loss curve
    eval      python eval.py --ckpt=<that run> (the Evaluation section's first command)
    bench     python bench.py, --what=train, --what=olmo2 (Benchmarks, Training throughput)
    dry_run   the memory plans of the 1B and 7B presets on 8 x H100 (Memory plan)
    prepare   python -m data.prepare on ~300 MB of generated JSON lines, olmo2 tokenizer (Data)
    compile   python tests/offline_compile.py sm_80 sm_86 sm_89 sm_90 (Triton kernel)
    tests     python -m pytest -q tests (Tests)
"""
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
from infra.files import atomic_write  # noqa: E402

STEPS = ("train", "eval", "bench", "dry_run", "prepare", "compile", "tests")


def run(cmd, cwd=ROOT, env=None, keep=None):
    """(wall seconds, peak RSS of the command in MiB, its output lines that match `keep`, or all)."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (Linux: KiB)
        proc.returncode, wall = os.waitstatus_to_exitcode(status), time.time() - t0
        log.seek(0)
        out = log.read().splitlines()
    if proc.returncode:
        print("\n".join(out[-30:]), file=sys.stderr)
        print(f"error: {' '.join(cmd)} failed with exit status {proc.returncode} (its output above)", file=sys.stderr)
        sys.exit(2)
    return wall, usage.ru_maxrss / 1024, [line for line in out if keep is None or re.search(keep, line)]


def machine() -> str:
    import numpy
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}; "
            f"load average {load:.2f} at the start")


def jsonl_corpus(path, megabytes):
    """Deterministic English-like JSON lines of about `megabytes` MB (words from Python's own docs)."""
    import pydoc_data.topics
    words = " ".join(pydoc_data.topics.topics.values()).split()
    rng = random.Random(0)
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 2**20:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 800)))}) + "\n"
            f.write(line)
            written += len(line)


def main(argv):
    given = cli.parse(argv, {"skip": ""})
    skip = {s for s in given.get("skip", "").split(",") if s}
    if skip - set(STEPS):
        raise cli.UsageError(f"unknown step(s) {sorted(skip - set(STEPS))}; --skip takes some of {','.join(STEPS)}")
    py = sys.executable
    report = [f"# README figures\n\nMeasured by `python experiments/readme_figures.py` on {machine()}.\n"]

    def section(title, cmd, wall, rss, lines):
        report.append(f"## {title}\n\n`{' '.join(cmd)}`: {wall:.0f} s wall, peak RSS {rss:.0f} MiB\n\n```\n"
                      + "\n".join(lines) + "\n```\n")
        print(report[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "repo")  # a clean clone of what is committed: data/stdlib is prepared from nothing
        subprocess.run(["git", "clone", "-q", ROOT, work], check=True)
        if "train" not in skip:
            cmd = [py, "train.py"]
            wall, rss, lines = run(cmd, cwd=work, keep=r"val loss|^iter (1|250):|prepared|took|error")
            section("python train.py (Quick start)", cmd, wall, rss, lines)
            if "eval" not in skip:
                cmd = [py, "eval.py", "--ckpt=out"]
                wall, rss, lines = run(cmd, cwd=work, keep=r"held-out|average|^\|")
                section("python eval.py --ckpt=out (Evaluation)", cmd, wall, rss, lines[-40:])
        if "bench" not in skip:
            for extra in ([], ["--what=train"], ["--what=olmo2"]):
                cmd = [py, "bench.py", *extra]
                section(" ".join(["bench.py", *extra]), cmd, *run(cmd, cwd=work))
        if "dry_run" not in skip:
            for preset, extra in (("olmo2_1b_repo.py", []), ("olmo2_1b_repo.py", ["--fsdp=true"]),
                                  ("olmo2_7b_repo.py", []), ("olmo2_7b_repo.py", ["--activation_checkpointing=false"])):
                cmd = [py, "train.py", f"config/{preset}", "--dry_run", "--dry_run_world=8", *extra]
                section(" ".join(cmd[1:]), cmd, *run(cmd, cwd=work))
        if "prepare" not in skip:
            src = os.path.join(tmp, "corpus")
            os.makedirs(src)
            jsonl_corpus(os.path.join(src, "docs.jsonl"), 300)
            cmd = [py, "-m", "data.prepare", f"--input={src}", f"--out={os.path.join(tmp, 'prepared')}",
                   "--tokenizer=olmo2"]
            wall, rss, lines = run(cmd, cwd=work)
            tokens = sum(int(m.group(1).replace(",", "")) for line in lines for m in [re.search(r"([\d,]+) tokens", line)] if m)
            lines.append(f"=> {tokens / wall / 1e6:.2f}M tokens/s over {tokens:,} tokens (300 MiB of JSON lines)")
            section("data.prepare, 300 MiB of JSON lines, olmo2 tokenizer (Data)", cmd, wall, rss, lines)
        if "compile" not in skip:
            cmd = [py, "tests/offline_compile.py", "sm_80", "sm_86", "sm_89", "sm_90"]
            section("offline compile (Triton kernel)", cmd, *run(cmd, cwd=work, env={"TRITON_INTERPRET": "0"}))
        if "tests" not in skip:
            cmd = [py, "-m", "pytest", "-q", "tests"]
            section("test suite (Tests)", cmd, *run(cmd, cwd=work, keep=r"passed|failed"))
    path = os.path.join(ROOT, "experiments", "results", "readme_figures.md")
    atomic_write(path, "\n".join(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main, __doc__.strip())
