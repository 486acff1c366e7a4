"""torch.compile through every attention backend, the custom ops' contracts, what "auto" dispatches
to, and the offline GPU compile of the kernels for sm_80, sm_86, sm_89 and sm_90.

    python -m pytest -q tests/test_compile.py

On the CPU the Triton kernels run in Triton's interpreter (tests/conftest.py); dynamo, AOT autograd
and the custom ops' fake functions are the same code as on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as model_module
import rope_kernel
from repo_kernels import auto_table, ops, triton_rope
from infra.loss import lm_loss
from rope_kernel import BACKENDS, repo_attention, rope_inv_freq

if not (torch.cuda.is_available() or triton_rope.interpreting()):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() and not triton_rope.interpreting() else "cpu"
H100 = ((9, 0), 232448)


def tiny_gpt(backend):
    """RoPE, RePo and NoPE layers with grouped-query attention: every path of Attention.forward."""
    cfg = model_module.GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=64,
                                 block_size=32, layer_pattern="rope,repo,nope", attn_backend=backend)
    torch.manual_seed(0)
    model = model_module.GPT(cfg).to(DEV)
    with torch.no_grad():  # learned positions far from their tiny initial values
        model.model.layers[1].self_attn.positioner.final_map.weight.mul_(1000.0)
    return model


def step(model, idx, run=None):
    """Loss and every parameter gradient of one forward+backward of run (default: the model itself)."""
    model.zero_grad(set_to_none=True)
    _, loss = (run if run is not None else model)(idx, targets=idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def as_h100(monkeypatch):
    """Make "auto" see an H100 for the tensors of this machine (the interpreter runs its configs' kernels)."""
    monkeypatch.setattr(ops, "_device_arch", lambda device: (*H100[0], H100[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_model_compiles_without_graph_breaks(backend, request):
    """One graph for a GPT forward (dynamo's explain), and torch.compile(fullgraph=True) with AOT
    autograd gives the loss and every parameter gradient of eager mode. "auto" runs twice: as on this
    machine (the reference path) and as on an H100 (the rotation kernel, cuDNN first in SDPA's order)."""
    if backend == "auto":
        request.getfixturevalue("as_h100")
    model = tiny_gpt(backend)
    idx = torch.randint(0, 64, (2, 32), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    explanation = torch._dynamo.explain(model)(idx, targets=idx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    loss, grads = step(model, idx)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = step(model, idx, compiled)
    assert torch.allclose(loss_c, loss, rtol=1e-6, atol=0)
    assert grads_c.keys() == grads.keys() and any("final_map" in n for n in grads)
    for n in grads:
        assert torch.allclose(grads_c[n], grads[n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("chunk", [None, 5])
def test_every_autograd_function_keeps_its_gradients_compiled(chunk):
    """The project's own autograd.Functions (the chunked LM loss, with one chunk and with several, and
    the reference rotation, in float32 where its cast is a no-op, and in bfloat16) give eager's
    gradients under torch.compile. torch 2.11's dynamo silently zeroes the gradient of a Function
    whose output was filled in place or aliases another tensor."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 16, generator=g), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (12,), generator=g)
    targets[3] = -1
    x, pos = torch.randn(2, 3, 12, 16, generator=g), torch.randn(2, 3, 12, generator=g) * 30
    inv_freq = rope_inv_freq(16, 10000.0)

    def f(h, w, x, pos):
        rotated = model_module.apply_rope(x, pos, inv_freq)
        rotated16 = model_module.apply_rope(x.bfloat16(), pos, inv_freq)
        loss = lm_loss(h, w, targets, z_loss=1e-2, chunk=chunk)
        return loss + (rotated * x.flip(-1)).sum() + (rotated16.float() * x).sum()

    leaves = [t.clone().requires_grad_() for t in (h, w, x, pos)]
    f(*leaves).backward()
    torch._dynamo.reset()
    compiled = [t.clone().requires_grad_() for t in (h, w, x, pos)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for name, a, b in zip("h w x pos".split(), leaves, compiled):
        assert b.grad is not None and b.grad.abs().sum() > 0, name
        assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-5), name


def test_auto_on_this_machine_compiles_to_the_reference():
    """Without the H100 stand-in, "auto" under torch.compile reads the device once (a constant) and
    takes the reference path on the CPU: still one graph."""
    model = tiny_gpt("auto")
    idx = torch.randint(0, 64, (2, 16), device=DEV)
    explanation = torch._dynamo.explain(model)(idx, targets=idx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_inductor_through_the_custom_ops():
    """Inductor (C++ code for the CPU ops around them) compiles the fused and the rotary backend's ops
    into one graph and gives eager's output and gradients."""
    q, k, v = (torch.randn(1, 2, 24, 32, device=DEV, generator=torch.Generator(DEV).manual_seed(s)) for s in (1, 2, 3))
    pos = torch.randn(1, 2, 24, device=DEV) * 50

    def f(q, k, v, pos):  # both backends in one graph: one inductor compile
        fused = repo_attention(q * 2, k, v, pos, pos + 1, backend="triton")
        rotary = repo_attention(q, k * 2, v, pos + 1, pos, backend="rotary")
        return (fused ** 2).sum() + (rotary.sin()).sum()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, pos)]
    out = torch.compile(f, fullgraph=True)(*leaves)
    out.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, pos)]
    ref = f(*ref_leaves)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) functions against the real ones (shapes, strides,
    dtypes), the autograd registration, and AOT dispatch, for every custom op; with and without the
    optional inputs, in model.py's transposed layout and with stride-0 positions."""
    g = torch.Generator(DEV).manual_seed(0)
    B, H, T, D = 1, 2, 20, 32
    rand = lambda *s: torch.randn(*s, device=DEV, generator=g)
    q = rand(B, T, H, D).transpose(1, 2)
    k, v, do = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    pos, ramp = rand(B, H, T) * 30, torch.arange(T, dtype=torch.float32, device=DEV).expand(B, H, T)
    freq = rope_inv_freq(D, 1e4, device=DEV)
    grad = lambda *xs: [x.clone().requires_grad_() if x is not None else None for x in xs]
    cases = [(ops._rotary_fwd, grad(q, pos, k, pos) + [freq]),
             (ops._rotary_fwd, grad(q, ramp) + [None, None, freq]),
             (rope_kernel._flash_fwd, grad(q, k, v, pos, pos) + [freq, True, D ** -0.5]),
             (rope_kernel._flash_fwd, grad(q, k, v) + [None, ramp, freq, False, 0.3])]
    o, lse = rope_kernel._flash_fwd(q, k, v, pos, None, freq, True, 0.2)
    y, y2 = ops._rotary_fwd(q, pos, k, ramp, freq)
    cases += [(rope_kernel._flash_bwd, [do, q, k, v, o, lse, pos, None, freq, True, 0.2]),
              (ops._rotary_bwd, [do, y, pos, do, y2, ramp, freq, True, False])]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_auto_dispatch_follows_the_choice(monkeypatch, as_h100):
    """repo_attention(backend="auto") runs what auto_choice chose, and the result is the reference's:
    on an H100 stand-in, the estimate (rotary) where nothing was measured, and the fused kernels where
    a GPU measured them fastest, but not for decoding, whose blocks would shrink. (What auto_choice
    picks per architecture, dtype and shape: tests/test_auto_table.py.)"""
    chosen = []
    choice = ops.auto_choice
    monkeypatch.setattr(ops, "auto_choice", lambda *a, **kw: chosen.append(choice(*a, **kw)[0]) or choice(*a, **kw))
    monkeypatch.setattr(triton_rope, "INTERPRET_BLOCKS", dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1)))
    measured_fused = {("sm_90", "bfloat16", 128, auto_table.bucket(130)): dict(choice="triton", measured="test")}
    for table, Tq, expected in (({}, 130, "rotary"), (measured_fused, 130, "triton"), (measured_fused, 1, "rotary")):
        monkeypatch.setattr(auto_table, "_MEASURED", table)
        g = torch.Generator(DEV).manual_seed(Tq)
        q = torch.randn(1, 2, Tq, 128, device=DEV, generator=g).bfloat16()
        k, v = (torch.randn(1, 2, 130, 128, device=DEV, generator=g).bfloat16() for _ in range(2))
        pq, pk = torch.randn(1, 2, Tq, device=DEV, generator=g) * 9, torch.randn(1, 2, 130, device=DEV, generator=g) * 9
        out = repo_attention(q, k, v, pq, pk)
        assert chosen[-1] == expected
        ref = repo_attention(q.double(), k.double(), v.double(), pq.double(), pk.double(), backend="torch")
        assert ((out.double() - ref).norm() / ref.norm()) < 2e-2  # bf16 inputs and output
    # float64 positions or inputs: the reference path, without asking auto_choice
    n = len(chosen)
    repo_attention(q.double(), k.double(), v.double(), pq, pk)
    assert len(chosen) == n


def test_offline_compile_for_four_architectures():
    """tests/offline_compile.py for sm_80, sm_86, sm_89 and sm_90: every kernel that "auto" may launch
    there compiles with the configs auto_choice checks before it runs them, without register spills, within the
    architecture's shared memory per block, with tensor-core instructions in the attention kernels
    (wgmma on sm_90, mma.sync before). A subprocess: the kernels must be JIT functions there, not the
    interpreter's. The tables go to the captured output (pytest -s shows them)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline_compile.py")
    archs = ["sm_80", "sm_86", "sm_89", "sm_90"]
    proc = subprocess.run([sys.executable, script, *archs, "--json"], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    print(proc.stdout)
    results = json.loads(proc.stdout.strip().splitlines()[-3])
    for arch in archs:
        capability = triton_rope.ARCHS[arch]
        for case in ("D=64 bf16", "D=128 bf16", "D=64 fp16", "D=128 fp16"):
            rows = {r["kernel"]: r for r in results if r["arch"] == arch and r["case"] == case}
            assert set(rows) == {"_rotary_kernel fwd", "_rotary_kernel bwd", "_rotary_kernel bwd dpos",
                                 "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                                 "_attn_bwd_dq_kernel"}, (arch, case)
            blocks = triton_rope.arch_blocks(capability, torch.bfloat16, int(case[2:].split()[0]))
            for name, kernel in (("fwd", "_attn_fwd_kernel"), ("dkdv", "_attn_bwd_dkdv_kernel"),
                                 ("dq", "_attn_bwd_dq_kernel")):
                r = rows[kernel]
                assert (r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]) == blocks[name]
                assert (r["wgmma"] > 0) if capability >= (9, 0) else (r["mma"] > 0 and r["wgmma"] == 0), r
    for r in results:
        assert r["stack"] == r["local"] == r["spill_ops"] == 0, f"register spills: {r}"
        assert r["shared"] <= triton_rope.SHARED_LIMIT[triton_rope.ARCHS[r["arch"]]], r
    assert proc.returncode == 0, proc.stderr[-3000:]
