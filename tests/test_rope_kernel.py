"""rope_kernel.py, Triton backends: the fused kernels (backend="triton") and the rotation kernel in
front of SDPA (backend="rotary"), each with forward and all five gradients against float64
references: decode shapes, ragged lengths, large positions, stride-0 positions, invariances, guard
bands, model.py (GQA) through the kernels, bad input.

    python -m pytest -q tests/test_rope_kernel.py

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
small shapes, and the triton_rope.INTERPRET_BLOCKS of 16-32 rows make them span several blocks.
The interpreter stores float32 -> bfloat16 by truncation (the GPU rounds to nearest), so bfloat16
tolerances allow about one bfloat16 ulp more than the GPU needs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rope_kernel
from repo_kernels import ops, triton_rope
from rope_kernel import repo_attention, rope_inv_freq

triton = pytest.importorskip("triton")
if not (torch.cuda.is_available() or triton_rope.interpreting()):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() and not triton_rope.interpreting() else "cpu"
TRITON_BACKENDS = ("triton", "rotary")


def ref_attention(q, k, v, pos_q, pos_k, inv_freq, causal, scale=None):
    """Float64 attention from the definition: the pairs (x_j, x_{j+D/2}) rotated as complex numbers
    by exp(i pos f_j), explicit scores, bottom-right causal mask, softmax. None = no rotation."""
    D = q.shape[-1]
    f = inv_freq.double().cpu()

    def rot(x, p):
        x = x.double().cpu()
        if p is None:
            return x
        c = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.exp(1j * p.double().cpu()[..., None] * f)
        return torch.cat((c.real, c.imag), -1)

    s = rot(q, pos_q) @ rot(k, pos_k).transpose(-1, -2) * (scale or D ** -0.5)
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:  # query i is token Tk - Tq + i
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq).logical_not(), float("-inf"))
    return s.softmax(-1) @ v.double().cpu()


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEV)


def rel(a, b):
    """Relative L2 error of a against the float64 truth b."""
    return ((a.detach().double().cpu() - b.detach().double().cpu()).norm() / b.detach().double().cpu().norm()).item()


def run_both(q, k, v, pos_q, pos_k, inv_freq, causal=True, scale=None, seed=9, backend="triton"):
    """Output and gradients (q, k, v, pos_q, pos_k) of a Triton backend and of the float64 reference
    for the loss <o, g> with a random g."""
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, pos_q, pos_k)]
    out = repo_attention(*leaves, causal=causal, sm_scale=scale, backend=backend, inv_freq=inv_freq)
    g = rand(*out.shape, seed=seed, dtype=torch.float64)
    (out.double() * g).sum().backward()
    ref_leaves = [x.detach().double().cpu().requires_grad_() if x is not None else None
                  for x in (q, k, v, pos_q, pos_k)]
    ref = ref_attention(*ref_leaves, inv_freq, causal, scale)
    (ref * g.cpu()).sum().backward()
    grads = [x.grad if x is not None else None for x in leaves]
    ref_grads = [x.grad if x is not None else None for x in ref_leaves]
    return (out, *grads), (ref, *ref_grads)


# (D, Tq, Tk, causal, dtype): ragged lengths, decode (Tq < Tk, Tq = 1), non-causal, three dtypes
CASES = [(64, 37, 37, True, torch.float32), (32, 37, 37, False, torch.float32), (128, 50, 50, True, torch.float32),
         (64, 5, 40, True, torch.float32), (64, 1, 23, True, torch.float32), (64, 9, 30, False, torch.float32),
         (64, 50, 50, True, torch.bfloat16), (128, 3, 33, True, torch.bfloat16), (32, 40, 40, False, torch.bfloat16),
         (64, 33, 33, True, torch.float16)]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("D,Tq,Tk,causal,dtype", CASES)
def test_output_and_gradients_match_float64_reference(D, Tq, Tk, causal, dtype, backend):
    B, H = 2, 2
    q = rand(B, H, Tq, D, dtype=dtype, seed=1)
    k, v = rand(B, H, Tk, D, dtype=dtype, seed=2), rand(B, H, Tk, D, dtype=dtype, seed=3)
    pq, pk = rand(B, H, Tq, seed=4, scale=300), rand(B, H, Tk, seed=5, scale=300)
    got, ref = run_both(q, k, v, pq, pk, rope_inv_freq(D, 10000.0), causal, scale=0.7 / math.sqrt(D),
                        backend=backend)
    assert got[0].dtype == dtype and got[0].shape == (B, H, Tq, D)
    assert [g.dtype for g in got[1:]] == [dtype] * 3 + [torch.float32] * 2
    # float32: the float64 truth up to float32 rounding; 16-bit: rounding of inputs to the dots and of
    # the stored outputs (the reference path's own error here is 3e-3 to 5e-3 in bfloat16). "rotary"
    # rounds q_r, k_r and dq_r, dk_r to the input dtype between its kernels and SDPA, as FlashAttention
    # users' rotate-then-attend code does, so its 16-bit position gradients get more room.
    tol_out, tol_grad = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 2e-2)}[dtype]
    if backend == "rotary" and dtype != torch.float32:
        tol_out, tol_grad = 1.5 * tol_out, 2 * tol_grad
    errors = [rel(a, b) for a, b in zip(got, ref)]
    assert errors[0] < tol_out and max(errors[1:]) < tol_grad, errors


@pytest.mark.parametrize("blocks", [dict(fwd=(16, 32, 4, 1), dkdv=(32, 16, 4, 1), dq=(16, 32, 4, 1)),
                                    dict(fwd=(64, 16, 4, 1), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1))])
def test_other_block_shapes(monkeypatch, blocks):
    """Blocks taller than wide and the reverse move the causal diagonal and the ragged tail into
    other places of the block loops."""
    monkeypatch.setattr(triton_rope, "INTERPRET_BLOCKS", blocks)
    monkeypatch.setattr(triton_rope, "_BLOCKS_FP32", blocks)  # the same on a GPU (float32)
    for Tq, Tk in ((45, 45), (13, 45)):
        q, k, v = rand(1, 2, Tq, 32, seed=1), rand(1, 2, Tk, 32, seed=2), rand(1, 2, Tk, 32, seed=3)
        pq, pk = rand(1, 2, Tq, seed=4, scale=50), rand(1, 2, Tk, seed=5, scale=50)
        got, ref = run_both(q, k, v, pq, pk, rope_inv_freq(32, 10000.0))
        assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-5


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_causal_alignment_sweep(backend):
    """Bottom-right causal alignment for many offsets Tk - Tq: the diagonal crosses the 16/32-row
    interpreter blocks at many phases, which decide the blocks that need the causal mask (an
    off-by-one there passes the fixed shapes above but not this sweep)."""
    D, Tk = 32, 64
    k, v, pk = rand(1, 1, Tk, D, seed=2), rand(1, 1, Tk, D, seed=3), rand(1, 1, Tk, seed=5, scale=50)
    for Tq in (64, 63, 51, 50, 49, 34, 17, 1):
        q, pq = rand(1, 1, Tq, D, seed=1), rand(1, 1, Tq, seed=4, scale=50)
        got, ref = run_both(q, k, v, pq, pk, rope_inv_freq(D, 10000.0), backend=backend)
        assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-5, Tq


def test_angles_stay_accurate_for_large_positions():
    """Rotating x = (1, 0) gives (cos a, sin a): compare with float64 up to |pos| = 1e6, with the
    frequencies the model uses (theta = 500000, f_0 = 1). cos/sin of a float32 angle pos * f are off
    by up to 5e-2 there."""
    D, T = 64, 256
    pos = torch.cat((torch.linspace(-1e6, 1e6, T // 2), rand(T // 2, seed=1).cpu() * 3e4 + 7e4)).to(DEV)
    pos = pos.expand(1, 1, T).contiguous()
    x = torch.cat((torch.ones(1, 1, T, D // 2), torch.zeros(1, 1, T, D // 2)), -1).to(DEV)
    freq = rope_inv_freq(D, 500000.0, device=DEV)
    y = triton_rope.rotary([x], [pos], freq)[0].double().cpu()
    a = pos.double().cpu()[..., None] * freq.cpu()
    assert (y[..., :D // 2] - a.cos()).abs().max() < 3e-7
    assert (y[..., D // 2:] - a.sin()).abs().max() < 3e-7


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("center", [6e4, -3e5, 1e6])
def test_large_positions_against_float64(backend, center):
    """Learned positions of magnitude 1e4 - 1e6: output and gradients still match the float64 truth
    to float32 accuracy (the reference path's float32 angles give ~1e-3 here). Positions are float32
    values, so they are exact inputs for both sides."""
    B, H, T, D = 1, 2, 40, 64
    q, k, v = (rand(B, H, T, D, seed=s) for s in (1, 2, 3))
    pos = rand(B, H, T, seed=4, scale=3e4) + center
    got, ref = run_both(q, k, v, pos, pos, rope_inv_freq(D, 500000.0), backend=backend)
    errors = [rel(a, b) for a, b in zip(got, ref)]
    assert max(errors) < 2e-5, errors


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_shift_invariance_and_zero_sum_position_gradient(backend):
    """Attention sees only position differences: o(z + c) = o(z), and the position gradients of a
    (batch, head) sum to zero when q and k share the positions."""
    B, H, T, D = 2, 2, 45, 32
    q, k, v = (rand(B, H, T, D, seed=s) for s in (1, 2, 3))
    pos = torch.round(rand(B, H, T, seed=4, scale=200) * 64) / 64  # a grid that stays exact after the shift
    inv = rope_inv_freq(D, 500000.0)
    out = repo_attention(q, k, v, pos, pos, backend=backend, inv_freq=inv)
    for c in (1e4 + 0.25, -5e4, 1e5 + 0.5):
        assert ((pos + c) - c - pos).abs().max() == 0
        shifted = repo_attention(q, k, v, pos + c, pos + c, backend=backend, inv_freq=inv)
        assert (shifted - out).abs().max() < 2e-6
    pos = (pos + 7e4).requires_grad_()
    out = repo_attention(q, k, v, pos, pos, backend=backend, inv_freq=inv)
    (out * rand(B, H, T, D, seed=5)).sum().backward()
    total, size = pos.grad.sum(-1).abs(), pos.grad.abs().sum(-1)
    assert (size > 1e-2).all() and (total / size).max() < 1e-5


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_missing_positions_mean_no_rotation(backend):
    """pos None (NoPE layers; keys rotated before they went into a KV cache) on either side."""
    B, H, D = 1, 2, 64
    inv = rope_inv_freq(D, 10000.0)
    for Tq, Tk in ((30, 30), (1, 30)):
        q, k, v = rand(B, H, Tq, D, seed=1), rand(B, H, Tk, D, seed=2), rand(B, H, Tk, D, seed=3)
        pq, pk = rand(B, H, Tq, seed=4, scale=100), rand(B, H, Tk, seed=5, scale=100)
        for use_q, use_k in ((False, False), (True, False), (False, True)):
            got, ref = run_both(q, k, v, pq if use_q else None, pk if use_k else None, inv, backend=backend)
            assert (got[4] is None) == (not use_q) and (got[5] is None) == (not use_k)
            assert max(rel(a, b) for a, b in zip(got, ref) if b is not None) < 1e-5
    # no rotation at all is plain causal attention
    q, k, v = (rand(B, H, 30, D, seed=s) for s in (1, 2, 3))
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (repo_attention(q, k, v, None, None, backend=backend) - plain).abs().max() < 1e-5


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_broadcast_positions(backend):
    """RoPE layers pass 0..T-1 as arange(T).expand(B, H, T) (stride 0 over batch and heads); GQA
    layers expand one head's positions over its group. The kernels read them through their strides:
    output and gradients (the position gradient summed by expand's backward) against float64, and
    the output bitwise equal to that of the same positions materialised."""
    B, H, T, D = 2, 2, 40, 64
    q, k, v = (rand(B, H, T, D, seed=s) for s in (1, 2, 3))
    inv = rope_inv_freq(D, 500000.0)
    g = rand(B, H, T, D, seed=9, dtype=torch.float64)
    for base in (torch.arange(T, dtype=torch.float32, device=DEV).view(1, 1, T), rand(B, 1, T, seed=4, scale=100)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, base)]
        pos = leaves[3].expand(B, H, T)
        assert pos.stride(1) == 0
        out = repo_attention(*leaves[:3], pos, pos, backend=backend, inv_freq=inv)
        (out.double() * g).sum().backward()
        ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, base)]
        ref_pos = ref_leaves[3].expand(B, H, T)
        ref = ref_attention(*ref_leaves[:3], ref_pos, ref_pos, inv, True)
        (ref * g.cpu()).sum().backward()
        errors = [rel(out, ref)] + [rel(x.grad, r.grad) for x, r in zip(leaves, ref_leaves)]
        assert max(errors) < 1e-5, errors
        dense = pos.detach().contiguous()
        assert torch.equal(out, repo_attention(q, k, v, dense, dense, backend=backend, inv_freq=inv))
    # integer positions: the reference path, whose RoPE is checked against transformers in test_rope_torch.py
    pos = torch.arange(T, dtype=torch.float32, device=DEV).expand(B, H, T)
    expected = repo_attention(q, k, v, pos, pos, backend="torch", inv_freq=inv)
    assert (repo_attention(q, k, v, pos, pos, backend=backend, inv_freq=inv) - expected).abs().max() < 1e-5


def guarded(shape, dtype, margin=3, transposed=False):
    """A NaN-filled buffer with `margin` extra tokens on both sides of every (batch, head); returns
    (buffer, view). transposed: the buffer is [B, T, H, D] and the view its transpose, as in model.py."""
    B, H, T = shape[:3]
    if transposed:
        buf = torch.full((B, T + 2 * margin, H, *shape[3:]), float("nan"), dtype=dtype, device=DEV)
        return buf, buf[:, margin:margin + T].transpose(1, 2)
    buf = torch.full((B, H, T + 2 * margin, *shape[3:]), float("nan"), dtype=dtype, device=DEV)
    return buf, buf[:, :, margin:margin + T]


def untouched_guard(buf, view):
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset()).fill_(False)
    return buf[mask].isnan().all().item()


@pytest.mark.parametrize("backend,buffers", [("triton", 11), ("rotary", 6)])
@pytest.mark.parametrize("Tq,Tk,causal", [(37, 37, True), (7, 37, True), (37, 37, False)])
def test_guard_bands(monkeypatch, Tq, Tk, causal, backend, buffers):
    """Inputs sit between NaN margins (an unmasked read beyond a sequence turns results into NaN) in
    different layouts (a mixed-up stride shows), every buffer the kernels write is NaN-poisoned and
    guarded (all of it must be written, nothing beyond it)."""
    outputs = []

    def guarded_empty(shape, dtype, device):
        if len(shape) == 4:
            buf, view = guarded(tuple(shape), dtype)
        else:  # log-sum-exp, Delta, dpos: the kernels index them as contiguous [B, H, T]
            buf = torch.full((math.prod(shape) + 6,), float("nan"), dtype=dtype, device=DEV)
            view = buf[3:-3].view(shape)
        outputs.append((buf, view))
        return view

    monkeypatch.setattr(triton_rope, "_empty", guarded_empty)
    monkeypatch.setattr(triton_rope, "_out_like", lambda x: guarded_empty(x.shape, x.dtype, x.device))
    B, H, D = 2, 2, 32
    inputs = []
    for i, shape in enumerate(((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D), (B, H, Tq), (B, H, Tk))):
        _, view = guarded(shape, torch.float32, transposed=i in (0, 2))  # q, v transposed; k not
        view.copy_(rand(*shape, seed=i, scale=1.0 if len(shape) == 4 else 100))
        inputs.append(view)
    got, ref = run_both(*inputs, rope_inv_freq(D, 10000.0), causal, backend=backend)
    # triton forward: k_r, o, lse; backward: q_r, k_r, delta, dq, dk, dv, dpos_q, dpos_k
    # rotary forward: q_r, k_r; backward: dq, dk, dpos_q, dpos_k (SDPA allocates the rest)
    assert len(outputs) == buffers
    assert all(untouched_guard(buf, view) for buf, view in outputs)
    assert all(not view.isnan().any() for _, view in outputs)
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-5


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_model_through_the_kernels(monkeypatch, backend):
    """model.py with RoPE, RePo and NoPE layers and grouped-query attention, its transposed q/k/v views
    and expanded positions: logits, every parameter gradient and cached greedy generation (Tq = 1
    against a cache of rotated keys, pos None) agree between a Triton backend and the reference path."""
    import model as model_module

    cfg = model_module.GPTConfig(vocab_size=50, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=64,
                                 block_size=32, rope_theta=1000.0, layer_pattern="rope,repo,nope")
    torch.manual_seed(0)
    model = model_module.GPT(cfg).to(DEV)
    with torch.no_grad():  # learned positions far from their tiny initial values
        model.model.layers[1].self_attn.positioner.final_map.weight.mul_(1000.0)
    idx = torch.randint(0, 50, (2, 21), device=DEV)
    calls = []

    def run(backend):
        def forced(*args, **kw):
            calls.append(backend)
            return repo_attention(*args, **{**kw, "backend": backend})
        monkeypatch.setattr(model_module, "repo_attention", forced)
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            text = model.generate(idx[:, :9], 4, top_k=1)
        return logits, grads, text

    logits_t, grads_t, text_t = run(backend)
    logits_r, grads_r, text_r = run("torch")
    assert calls.count(backend) == calls.count("torch") > 3
    assert rel(logits_t, logits_r) < 1e-5
    assert grads_t.keys() == grads_r.keys() and any("final_map" in n for n in grads_t)
    assert max(rel(grads_t[n], grads_r[n]) for n in grads_t) < 1e-4
    assert torch.equal(text_t, text_r)


def test_bad_input(monkeypatch):
    q, k, v = rand(1, 2, 8, 32), rand(1, 2, 8, 32), rand(1, 2, 8, 32)
    pos = torch.zeros(1, 2, 8, device=DEV)
    for backend in TRITON_BACKENDS:
        with pytest.raises(ValueError, match="head dim 48 is not supported"):
            repo_attention(rand(1, 2, 8, 48), rand(1, 2, 8, 48), rand(1, 2, 8, 48), pos, pos, backend=backend)
        with pytest.raises(TypeError, match="pos_k must be float32, got torch.float64"):
            repo_attention(q, k, v, pos, pos.double(), backend=backend)
        with pytest.raises(TypeError, match="must be float32, float16 or bfloat16"):
            repo_attention(q.double(), k.double(), v.double(), pos, pos, backend=backend)
        with pytest.raises(ValueError, match=r"inv_freq must have shape \(16,\)"):
            repo_attention(q, k, v, pos, pos, backend=backend, inv_freq=rope_inv_freq(64, 100.0))
        with pytest.raises(ValueError, match="shape mismatch"):
            repo_attention(q, k[:, :1], v[:, :1], pos, pos[:, :1], backend=backend)
        with pytest.raises(ValueError, match="more queries"):
            repo_attention(q, k[:, :, :4], v[:, :, :4], pos, pos[..., :4], backend=backend)
    with pytest.raises(ValueError, match="head dim 256 is not supported"):
        repo_attention(rand(1, 2, 8, 256), rand(1, 2, 8, 256), rand(1, 2, 8, 256), pos, pos, backend="triton")
    if DEV == "cpu":
        # auto never picks Triton for CPU tensors, and the Triton backends say why they cannot run
        monkeypatch.setattr(rope_kernel, "_flash_fwd", None)
        monkeypatch.setattr(ops, "_rotary_fwd", None)
        assert torch.equal(repo_attention(q, k, v, pos, pos), repo_attention(q, k, v, pos, pos, backend="torch"))
        monkeypatch.setattr(triton_rope, "interpreting", lambda: False)
        for backend in TRITON_BACKENDS:
            with pytest.raises(RuntimeError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
                repo_attention(q, k, v, pos, pos, backend=backend)
    monkeypatch.setattr(ops, "HAVE_TRITON", False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        repo_attention(q, k, v, pos, pos, backend="rotary")


def test_int32_offset_limit():
    """The fused kernels form token offsets in int32: a (batch, head) spanning 2^31 elements or more
    (here 2^20 + 1 tokens of model.py's [B, T, H, D] layout with H * D = 2048, as meta tensors: no memory)
    is refused with a clear error, and "auto" sends such inputs to the rotation kernel (int64 offsets)."""
    B, T, H, D = 1, 2**20 + 1, 16, 128
    q = torch.empty(B, T, H, D, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    pos = torch.empty(B, H, T, device="meta")
    assert triton_rope.max_offset(q) == (T - 1) * H * D + D - 1 >= 2**31
    with pytest.raises(ValueError, match="beyond the kernels' int32 offsets"):
        repo_attention(q, q, q, pos, pos, backend="triton")
    assert ops._unsupported("triton", q, q, q, pos, pos, rope_inv_freq(D, 1e4)) is not None
    assert ops.auto_backend((9, 0), 232448, torch.bfloat16, D, T, T, fits_int32=False) == "rotary"
    half = q[:, :, : T // 2]  # 2^19 tokens fit
    assert triton_rope.max_offset(half) < 2**31
    error = ops._unsupported("triton", half, half, half, pos[..., : T // 2], pos[..., : T // 2],
                                     rope_inv_freq(D, 1e4))
    assert error is None or "int32" not in str(error)
