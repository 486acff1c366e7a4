"""bench.py as a user runs it: --help, one-line errors with exit status 2, output without profiler
chatter, the transformers comparison, and `--what=gpu --smoke` (every stage of the lent-GPU
command, tiny, on the CPU) end to end. Nothing here is timed: the numbers are not checked.

    python -m pytest -q tests/test_bench.py
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_option_with_its_default():
    import bench as bench_module
    proc = bench("--help")
    assert proc.returncode == 0
    for key, value in bench_module.DEFAULTS.items():
        assert f"--{key}={value!r}" in proc.stdout


@pytest.mark.parametrize("args,message", [(["--bogus=1"], "unknown option '--bogus=1'"),
                                          (["--iters=ten"], "--iters must be int, got 'ten'"),
                                          (["--what=speed"], "--what must be one of"),
                                          (["--device=gpu"], "is not a device")])
def test_bad_options_give_one_error_line(args, message):
    proc = bench(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert message in proc.stderr


def test_model_bench_output_has_no_profiler_lines():
    proc = bench("--n_layer=1", "--n_embd=32", "--n_head=2", "--seq_len=16", "--batch_size=2", "--iters=1", "--warmup=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RePo / RoPE: step time" in proc.stdout
    assert "USDT" not in proc.stdout + proc.stderr


def test_olmo2_comparison_runs():
    pytest.importorskip("transformers")
    proc = bench("--what=olmo2", "--iters=1", "--warmup=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ours / transformers:" in proc.stdout


def test_gpu_command_smoke_run(tmp_path):
    """Every stage of `python bench.py --what=gpu` runs on the CPU and passes (its own checks: kernel
    tests, correctness against float64, losses finite, benchmarks checked before timing)."""
    proc = bench("--what=gpu", "--smoke", f"--out={tmp_path}", timeout=900)
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("\nstage "):]
    for stage in ("tests", "correctness", "train", "speed", "throughput"):
        assert f"\n{stage}" in table and (tmp_path / f"{stage}.log").exists()
    assert table.count(" pass ") == 5
