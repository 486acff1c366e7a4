"""What "auto" runs on a GPU: measured winners from repo_kernels/auto_table.json, the estimate where
nothing was measured, the fused kernels only where their configs fit, the SDPA backend it prefers
(eager and under torch.compile), and `python -m repo_kernels.auto_table` reading the results.json
that `python bench.py --what=gpu` writes.

    python -m pytest -q tests/test_auto_table.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from repo_kernels import auto_table, ops, triton_rope
from rope_kernel import repo_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100, A100, L4 = ((9, 0), 232448), ((8, 0), 166912), ((8, 9), 101376)
# the device the Triton backends run on here: a GPU, else the CPU under Triton's interpreter (conftest.py)
DEV = "cuda" if torch.cuda.is_available() and not triton_rope.interpreting() else "cpu"


def fused_everywhere(monkeypatch):
    """A table in which a GPU measured the fused kernels fastest for every key (in memory only)."""
    class Every(dict):
        def get(self, key, default=None):
            return dict(choice="triton", measured="test GPU")
    monkeypatch.setattr(auto_table, "_MEASURED", Every())


def test_the_shipped_table_loads_and_names_known_choices():
    table = auto_table.load()
    for (arch, dtype, D, T), row in table.items():
        assert row["choice"] in auto_table.CHOICES and arch.startswith("sm_") and row["measured"]
        assert T in {auto_table.bucket(t) for t in (1, 4096, 10**6)}


@pytest.mark.parametrize("arch,dtype,D,Tq,Tk,expected", [
    (H100, torch.bfloat16, 128, 4096, 4096, ("rotary", "cudnn")),    # Hopper: cuDNN first
    (H100, torch.float16, 64, 16384, 16384, ("rotary", "cudnn")),
    (H100, torch.float32, 128, 4096, 4096, ("rotary", "cudnn")),
    (A100, torch.bfloat16, 128, 2048, 2048, ("rotary", "flash")),    # elsewhere FlashAttention first
    (L4, torch.bfloat16, 64, 1, 4096, ("rotary", "flash")),
    (((12, 0), 101376), torch.bfloat16, 128, 4096, 4096, ("rotary", "flash")),
    (H100, torch.bfloat16, 96, 4096, 4096, ("torch", None)),          # D / 2 not a power of two
    (H100, torch.float64, 128, 4096, 4096, ("torch", None)),
    (((7, 5), 65536), torch.float16, 64, 4096, 4096, ("torch", None)),  # below sm_80
    ((None, 0), torch.bfloat16, 128, 4096, 4096, ("torch", None)),      # not a CUDA device
])
def test_unmeasured_keys_get_the_estimate(monkeypatch, arch, dtype, D, Tq, Tk, expected):
    monkeypatch.setattr(auto_table, "_MEASURED", {})
    backend, sdpa, source = ops.auto_choice(arch[0], arch[1], dtype, D, Tq, Tk)
    assert (backend, sdpa) == expected
    assert ops.auto_backend(arch[0], arch[1], dtype, D, Tq, Tk) == backend
    if backend == "rotary":
        assert source == "estimated"


@pytest.mark.parametrize("arch,dtype,D,Tq,Tk,expected", [
    (H100, torch.bfloat16, 128, 4096, 4096, "triton"),   # training shapes
    (H100, torch.float16, 64, 16384, 16384, "triton"),
    (A100, torch.bfloat16, 128, 2048, 2048, "triton"),
    (((8, 6), 101376), torch.bfloat16, 64, 1024, 1024, "triton"),
    (H100, torch.bfloat16, 128, 77, 4096, "triton"),     # 77 queries still fill 128-row blocks
    (H100, torch.bfloat16, 128, 1, 4096, "rotary"),      # decoding: the blocks would shrink
    (H100, torch.bfloat16, 128, 40, 40, "rotary"),       # short: a block size never compiled
    (L4, torch.bfloat16, 128, 4096, 48, "triton"),       # 48 keys fill 64-key blocks
    (L4, torch.bfloat16, 128, 4096, 20, "rotary"),       # 20 would not
    (H100, torch.float32, 128, 4096, 4096, "rotary"),    # float32 never runs the fused kernels
    (H100, torch.bfloat16, 32, 4096, 4096, "rotary"),    # D = 32 has no compiled config
    (H100, torch.bfloat16, 256, 4096, 4096, "rotary"),
    (((8, 6), 65536), torch.bfloat16, 128, 4096, 4096, "rotary"),   # less shared memory than sm_86 has
    (((10, 0), 232448), torch.bfloat16, 128, 4096, 4096, "rotary"),  # nothing compiled for sm_100
])
def test_measured_fused_kernels_run_only_where_their_configs_fit(monkeypatch, arch, dtype, D, Tq, Tk, expected):
    fused_everywhere(monkeypatch)
    backend, sdpa, source = ops.auto_choice(arch[0], arch[1], dtype, D, Tq, Tk)
    assert backend == expected
    if backend == "rotary":  # the estimate takes over, with its SDPA preference
        assert sdpa == auto_table.estimate(arch[0]).partition("+")[2] and source.startswith("estimated")
    assert ops.auto_choice(*arch, dtype, D, Tq, Tk, fits_int32=False)[0] != "triton"


def test_buckets():
    assert [auto_table.bucket(t) for t in (1, 2048, 2049, 8192, 8193, 10**6)] == \
        ["<=2048", "<=2048", "<=8192", "<=8192", ">8192", ">8192"]


def gpu_results(tmp_path, rows, machine=None):
    """A results.json as `python bench.py --what=gpu` writes it."""
    path = tmp_path / "results.json"
    machine = machine or dict(gpu="NVIDIA H200", torch="2.11.0+cu130", triton="3.6.0", date="2026-12-05 10:00:00 UTC")
    path.write_text(json.dumps(dict(machine=machine, stages=dict(speed=dict(status="pass", details=dict(
        rows={}, errors={}, dispatch=rows))))))
    return path


def test_merge_then_choose(tmp_path):
    """The dispatch rows a GPU run wrote become table rows (bucketed, stamped with the GPU and versions),
    and choose() follows them; a later run replaces rows of the same key."""
    table = tmp_path / "auto_table.json"
    row = lambda T, choice, D=128: dict(arch="sm_90", dtype="bfloat16", D=D, T=T, choice=choice, ms=1.0, vs_sdpa=0.95,
                                        sdpa_best="cudnn", runner_up="triton", all={})
    cpu_row = dict(row(32, "rotary+flash"), arch="cpu")
    added = auto_table.merge(str(gpu_results(tmp_path, [row(1024, "rotary+cudnn"), row(4096, "triton"),
                                                        row(16384, "rotary+flash"), cpu_row])), str(table))
    assert len(added) == 3  # the CPU smoke row is not a measurement
    measured = auto_table.load(str(table))
    assert set(measured) == {("sm_90", "bfloat16", 128, b) for b in ("<=2048", "<=8192", ">8192")}
    assert measured[("sm_90", "bfloat16", 128, "<=8192")]["measured"] == \
        "NVIDIA H200, 2.11.0+cu130, 3.6.0, 2026-12-05 10:00:00 UTC"
    choose = lambda T, D=128, dtype=torch.bfloat16, cap=(9, 0): auto_table.choose(cap, dtype, D, T, measured)[0]
    assert [choose(1000), choose(4096), choose(50000)] == ["rotary+cudnn", "triton", "rotary+flash"]
    # other keys (head dim, dtype, architecture): the estimate
    assert choose(4096, D=64) == choose(4096, dtype=torch.float16) == "rotary+cudnn"
    assert choose(4096, cap=(8, 0)) == "rotary+flash"
    auto_table.merge(str(gpu_results(tmp_path, [row(3000, "rotary+efficient")])), str(table))
    again = auto_table.load(str(table))
    assert len(again) == 3 and again[("sm_90", "bfloat16", 128, "<=8192")]["choice"] == "rotary+efficient"


def test_merge_command_errors(tmp_path):
    table_before = open(auto_table.TABLE).read()
    cmd = lambda *a: subprocess.run([sys.executable, "-m", "repo_kernels.auto_table", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    for args, message in (([], "usage:"), ([str(tmp_path / "missing.json")], "error: "),
                          ([str(gpu_results(tmp_path, []))], "holds no dispatch rows")):
        proc = cmd(*args)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert open(auto_table.TABLE).read() == table_before


def test_auto_puts_its_sdpa_backend_first_and_restores_the_order(monkeypatch):
    """On an H100 stand-in, repo_attention(backend="auto") runs the rotation kernel and SDPA with cuDNN
    first in SDPA's priority list, the other backends still enabled behind it; the user's order is
    back afterwards. Eager and under torch.compile(fullgraph=True): one graph, same result."""
    monkeypatch.setattr(auto_table, "_MEASURED", {})
    monkeypatch.setattr(ops, "_device_arch", lambda device: (*H100[0], H100[1]))
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append([SDPBackend(i).name for i in torch._C._get_sdp_priority_order()][:4])
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", spy)
    before = torch._C._get_sdp_priority_order()
    g = torch.Generator(DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 32, generator=g, device=DEV) for _ in range(3))
    pos = torch.randn(1, 2, 24, generator=g, device=DEV) * 30
    out = repo_attention(q, k, v, pos, pos)
    assert seen[-1][0] == "CUDNN_ATTENTION" and "FLASH_ATTENTION" in seen[-1] and "MATH" in seen[-1]
    assert torch._C._get_sdp_priority_order() == before
    ref = repo_attention(q, k, v, pos, pos, backend="torch")
    assert torch.allclose(out, ref, atol=1e-5)
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", sdpa)  # the spy is not traceable
    f = lambda q, k, v, pos: repo_attention(q, k, v, pos, pos)
    explanation = torch._dynamo.explain(f)(q, k, v, pos)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, pos)
    assert torch.allclose(compiled, out, atol=1e-6) and torch._C._get_sdp_priority_order() == before


def test_a_backend_the_user_disabled_stays_disabled(monkeypatch):
    monkeypatch.setattr(auto_table, "_MEASURED", {})
    monkeypatch.setattr(ops, "_device_arch", lambda device: (*H100[0], H100[1]))
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **kw))
    q, z = torch.randn(1, 1, 16, 32, device=DEV), torch.zeros(1, 1, 16, device=DEV)
    with torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        repo_attention(q, q, q, z, z)
    assert seen == [False]


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.5.2", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.9.0", "2.5.2", False),
    ("3.10.1", "2.4.6", False), ("3.5.1+git", "2.4.0rc1", True)])
def test_the_interpreter_numpy_combination_that_fails(triton_version, numpy_version, broken):
    problem = ops.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and numpy_version in problem


def test_the_triton_backends_name_it_instead_of_failing_inside_the_interpreter(monkeypatch):
    import numpy
    if not triton_rope.interpreting():
        pytest.skip("needs Triton's CPU interpreter")
    monkeypatch.setattr(triton_rope.triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    q = torch.randn(1, 1, 16, 32)
    for backend in ("triton", "rotary"):
        with pytest.raises(RuntimeError, match=r"numpy<2.4"):
            repo_attention(q, q, q, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), backend=backend)
    assert repo_attention(q, q, q, None, None).shape == q.shape  # "auto" on the CPU: the reference path
