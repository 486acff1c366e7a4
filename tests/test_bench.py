"""bench.py as a user runs it: --help, one-line errors with exit status 2, output without profiler
chatter, the transformers comparison, and `--what=gpu --smoke` (every stage of the GPU
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
    tests in two pytest processes, correctness against float64, losses finite, benchmarks checked
    before timing), into a fresh folder of at most 8 files: one summary, the details of every case
    and head dim kept side by side, a log per stage written as it ran."""
    import json
    (tmp_path / "20000101-000000").mkdir()  # an earlier run's folder: left alone
    proc = bench("--what=gpu", "--smoke", f"--out={tmp_path}", timeout=900)
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.rindex("\nstage "):]
    stages = ("tests", "correctness", "train", "speed", "throughput")
    assert table.count(" pass ") == 5 and all(f"\n{stage}" in table for stage in stages)
    runs = sorted(p for p in tmp_path.iterdir() if p.name != "20000101-000000")
    assert len(runs) == 1 and not any((tmp_path / "20000101-000000").iterdir())
    files = sorted(p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*"))
    assert files == sorted(["summary.txt", "results.json"] + [f"{s}.log" for s in stages])
    summary = (runs[0] / "summary.txt").read_text()
    assert "worst case" in summary and all(f"\n{stage}" in summary for stage in stages)
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["machine"]["torch"] and set(results["stages"]) == set(stages)
    correctness = results["stages"]["correctness"]["details"]
    cases = {(d["case"], d["backend"]) for d in correctness}
    assert len(cases) == len(correctness) >= 6 * 3 and all(len(d["errors"]) == 6 for d in correctness)
    speed = results["stages"]["speed"]["details"]
    assert {k.split()[0] for k in speed["errors"]} == {"D=32", "D=64"}  # one head dim never hides another's
    assert {(d["D"], d["T"]) for d in speed["dispatch"]} == {(32, 32), (64, 32)}
    tests_log = (runs[0] / "tests.log").read_text()
    assert "[tests 1/2]" in tests_log and "[tests 2/2]" in tests_log and " PASSED" in tests_log


def test_gpu_command_without_a_gpu_is_one_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = bench("--what=gpu", f"--out={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --what=gpu") and "CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_gpu_command_reruns_get_fresh_folders(tmp_path):
    import bench_gpu
    first = bench_gpu.fresh_dir(str(tmp_path))
    open(os.path.join(first, "summary.txt"), "w").write("first run")
    second = bench_gpu.fresh_dir(str(tmp_path))  # within the same second: a suffix
    assert second != first and os.listdir(second) == []
    assert open(os.path.join(first, "summary.txt")).read() == "first run"
    assert bench_gpu.worst_case() <= 7 * 60  # the GPU command's stage limits add up to at most 7 minutes


def test_shards_are_contiguous_disjoint_slices_of_the_selected_tests():
    """pytest --shard=I/N (tests/conftest.py), which the GPU command's tests stage runs N of at once:
    together the slices run every selected test exactly once, in order; bad values are a usage error."""
    import types

    import conftest
    selected = [f"test_{i}" for i in range(11)]
    slices = []
    for i in range(1, 5):
        deselected, items = [], list(selected)
        config = types.SimpleNamespace(getoption=lambda name, i=i: f"{i}/4",
                                       hook=types.SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
        conftest.pytest_collection_modifyitems(config, items)
        assert sorted(items + deselected) == sorted(selected) and items
        slices.append(items)
    assert sum(slices, []) == selected
    for bad in ("0/4", "5/4", "x", "1/0"):
        config = types.SimpleNamespace(getoption=lambda name, bad=bad: bad, hook=None)
        with pytest.raises(pytest.UsageError, match="--shard must be I/N"):
            conftest.pytest_collection_modifyitems(config, list(selected))


def test_a_command_killed_at_its_limit_leaves_its_log(tmp_path):
    """How the GPU command runs a stage: output streamed into the log while it runs, the whole process
    group (here a grandchild that would outlive a plain kill) killed at the limit, the log closed
    with a line saying so."""
    import threading
    import time

    import bench_gpu
    script = ("import subprocess, sys, time; print('started', flush=True); "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('grandchild', p.pid, flush=True); time.sleep(60)")
    log_path = tmp_path / "stage.log"
    started = bench_gpu.start([sys.executable, "-c", script], open(log_path, "w"), dict(os.environ), threading.Lock())
    rc, killed, seconds = bench_gpu.finish(started, limit=3, label="stage: ")
    text = log_path.read_text()
    assert killed and rc != 0 and 3 <= seconds < 20
    assert text.startswith("started\n") and "KILLED at the limit" in text.splitlines()[-1]
    grandchild = int(text.split("grandchild ")[1].split()[0])
    for _ in range(50):  # killed with its group: gone (or a zombie) within moments
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage's child outlived the kill")
    done = bench_gpu.start([sys.executable, "-c", "print('ok')"], open(tmp_path / "b.log", "w"), dict(os.environ),
                           threading.Lock())
    assert bench_gpu.finish(done, limit=60)[:2] == (0, False) and (tmp_path / "b.log").read_text().startswith("ok\n")
