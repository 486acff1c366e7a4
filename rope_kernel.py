"""
Continuous-RoPE attention: softmax attention where q and k are rotated by RoPE angles
a = pos * theta^(-2i/D), with pos a real number per (batch, head, token).

RePo predicts pos per token and head, so cos/sin cannot come from an integer-indexed table and
training needs dL/dpos as well as dq, dk, dv. One entry point serves every layer of model.py:

    repo_attention(q, k, v, pos_q, pos_k, theta=500000.0, causal=True, sm_scale=None, backend="auto")

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]; pos_q: [B, H, Tq]; pos_k: [B, H, Tk] (float32).
    RoPE layers pass integer-valued positions, RePo layers their learned ones; None means "no
    rotation" (NoPE layers, or keys that were rotated before they went into a KV cache).
    With causal=True and Tq < Tk the queries are the last Tq positions (bottom-right alignment).

backend="torch" is the reference: rotate in float32 (half-split / NeoX pairing, the OLMo-2 and
GPT-NeoX convention), cast back, then F.scaled_dot_product_attention. backend="triton" runs the
fused flash-attention kernels of the second half of this file (rotation inside, position
gradients included): head dims 32, 64, 128, float32 / float16 / bfloat16, float32 positions, on
CUDA or, with TRITON_INTERPRET=1 set before triton is imported, on the CPU. "auto" uses them for
CUDA tensors they support and the reference otherwise.

Because q and k carry their own angles, <R(a_t) q, R(a_s) k> = <q, R(a_s - a_t) k>: attention
only sees position differences, so adding a constant to all positions changes nothing.

    python rope_kernel.py                     # checks the reference against a float64 computation
    TRITON_INTERPRET=1 python rope_kernel.py  # ... and the Triton path (on a GPU no variable needed)
"""
import math
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:  # e.g. on macOS: the reference path still works, the kernel definitions stay inert
    _HAVE_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)

BACKENDS = ("auto", "torch", "triton")
LOG2E = math.log2(math.e)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """f_i = theta^(-2i/D) for i < D/2, in float64 (each consumer rounds once, to its math dtype)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    return 1.0 / theta ** (i / head_dim)


class _Rotate(torch.autograd.Function):
    """Half-split rotation y = R(pos * f) x with float32 math, differentiable in x and pos.

    Saves only x and pos and recomputes cos/sin in backward: autograd on the plain formula would
    keep two float32 cos/sin tensors of shape [B, H, T, D/2] alive per layer."""

    @staticmethod
    def forward(ctx, x, pos, inv_freq):
        ctx.save_for_backward(x, pos, inv_freq)
        return _rotate(x, pos, inv_freq, sign=1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, pos, inv_freq = ctx.saved_tensors
        # the inverse rotation carries the gradient back to x: dx = R(-a) g
        dx = _rotate(g, pos, inv_freq, sign=-1.0)
        dpos = None
        if ctx.needs_input_grad[1]:
            # y1 = x1 cos a - x2 sin a, y2 = x2 cos a + x1 sin a  =>  dL/da_i = g2 y1 - g1 y2;
            # the 2-D cross product is rotation invariant, so in x's frame: x1 dx2 - x2 dx1.
            x1, x2 = x.to(dx.dtype).chunk(2, dim=-1)
            dx1, dx2 = dx.chunk(2, dim=-1)
            dpos = ((x1 * dx2 - x2 * dx1) * inv_freq.to(dx.dtype)).sum(-1).to(pos.dtype)
        return dx.to(x.dtype), dpos, None


def _rotate(x, pos, inv_freq, sign):
    ct = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), torch.float32)  # >= float32
    angle = pos.to(ct)[..., None] * inv_freq.to(ct)
    cos, sin = angle.cos(), sign * angle.sin()
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by angles pos [..., T] * inv_freq [D/2]; math in float32 (float64 if
    x or pos is float64), result in x.dtype."""
    return _Rotate.apply(x, pos, inv_freq)


def _check_inputs(q, k, v, pos_q, pos_k, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(need q [B, H, Tq, D], k and v [B, H, Tk, D])")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D % 2:
        raise ValueError(f"head dim must be even for half-split RoPE, got {D}")
    for name, p, T in (("pos_q", pos_q, Tq), ("pos_k", pos_k, k.shape[2])):
        if p is None:
            continue
        if p.shape != (B, H, T):
            raise ValueError(f"{name} must have shape {(B, H, T)}, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (float32), got {p.dtype}")
        if p.device != q.device:
            raise ValueError(f"{name} is on {p.device} but q is on {q.device}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def repo_attention(q, k, v, pos_q, pos_k, theta=500000.0, causal=True, sm_scale=None, backend="auto",
                   inv_freq=None):
    """Attention with q rotated by pos_q and k by pos_k; see the module docstring.

    inv_freq ([D/2], optional) replaces theta^(-2i/D), e.g. for YaRN-style frequency scaling."""
    _check_inputs(q, k, v, pos_q, pos_k, backend)
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and Tq > Tk:
        raise ValueError(f"causal attention with more queries ({Tq}) than keys ({Tk})")
    if inv_freq is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, device=q.device)
    if backend == "auto":
        use_triton = q.is_cuda and _triton_unsupported(q, k, pos_q, pos_k, inv_freq) is None
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        return _triton_attention(q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale)
    return _torch_attention(q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale)


def _torch_attention(q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale):
    if pos_q is not None:
        q = apply_rope(q, pos_q, inv_freq)
    if pos_k is not None:
        k = apply_rope(k, pos_k, inv_freq)
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == 1:  # a single query attends to every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale)
    # queries are the last Tq tokens: query i sees keys j <= i + (Tk - Tq)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)


# ------------------------------------------------------------------------------------------------
# Triton path: flash attention with the rotation fused in, forward and backward.
#
# forward : a small memory-bound kernel rotates K once into a temporary k_r; the attention kernel
#           rotates its own Q tile on load (once per program) and streams k_r and v with an online
#           softmax. Saved for backward: q, k, v, o, the log-sum-exp and the positions (no cos/sin
#           tables, no rotated copies).
# backward: q_r and k_r are recomputed by the same rotation kernel; one kernel owns a block of keys
#           and accumulates dv and dk_r over the queries that see it, another owns a block of queries
#           and accumulates dq_r over the keys it sees (no atomics). Their epilogues rotate dk_r and
#           dq_r back and compute dpos from the float32 accumulators.
# Why K is not rotated inside the loop: every K tile is visited by Tq / BLOCK_M programs, and its
# sin/cos would cost as much as the softmax exponentials that already bound the kernel.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _load_halves(P, idx, stride, ok, D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The two halves of the rotation pairs of rows idx: [len(idx), D/2] each, or [D/2, len(idx)]
    transposed (the operand layout of s = q1 k1^T + q2 k2^T); masked rows read as zero."""
    d2 = tl.arange(0, D // 2)
    if TRANSPOSED:
        ptrs, mask = P + idx[None, :] * stride + d2[:, None], ok[None, :]
    else:
        ptrs, mask = P + idx[:, None] * stride + d2[None, :], ok[:, None]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + D // 2, mask=mask, other=0.0)


@triton.jit
def _store_halves(P, idx, stride, ok, y1, y2, D: tl.constexpr):
    ptrs = P + idx[:, None] * stride + tl.arange(0, D // 2)[None, :]
    tl.store(ptrs, y1.to(P.dtype.element_ty), mask=ok[:, None])
    tl.store(ptrs + D // 2, y2.to(P.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _cos_sin(pos, Freq, HALF: tl.constexpr):
    """cos and sin of the angles pos[:, None] * f[None, :] as float32 [BLOCK, HALF].

    The angle is formed and reduced in float64, a = n pi/2 + r with |r| <= pi/4: at |pos| ~ 1e5 a float32
    product alone is off by ~5e-3 rad. sin r and cos r are then short Taylor polynomials in float32
    (truncation < 2e-9, rounding ~1e-7) instead of tl.sin/tl.cos, whose libdevice code carries a
    large-argument slow path (a stack frame, branches) that the reduced angles never need."""
    f = tl.load(Freq + tl.arange(0, HALF))  # float64
    a = pos.to(tl.float64)[:, None] * f[None, :]
    n = tl.floor(a * 0.6366197723675814 + 0.5)  # nearest multiple of pi/2
    r = (a - n * 1.5707963267948966).to(tl.float32)
    r2 = r * r
    sin = r + r * r2 * (-1 / 6 + r2 * (1 / 120 + r2 * (-1 / 5040 + r2 * (1 / 362880))))
    cos = 1 + r2 * (-1 / 2 + r2 * (1 / 24 + r2 * (-1 / 720 + r2 * (1 / 40320 + r2 * (-1 / 3628800)))))
    # rotate by the quadrant n mod 4: (cos, sin) -> (-sin, cos) -> (-cos, -sin) -> (sin, -cos)
    quadrant = (n - 4 * tl.floor(n * 0.25)).to(tl.int32)
    odd = (quadrant & 1) == 1
    cos, sin = tl.where(odd, sin, cos), tl.where(odd, cos, sin)
    cos = tl.where((quadrant == 1) | (quadrant == 2), -cos, cos)
    sin = tl.where(quadrant >= 2, -sin, sin)
    return cos, sin


@triton.jit
def _rotate_kernel(X, Pos, Freq, Y, sxb, sxh, sxt, spb, sph, spt, syb, syh, syt, H, T,
                   D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Y = R(pos * f) X for BLOCK_T tokens of one (batch, head), rotation in float32."""
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)  # int64: large tensors
    X += b * sxb + h * sxh
    Y += b * syb + h * syh
    Pos += b * spb + h * sph
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    x1, x2 = _load_halves(X, rows, sxt, ok, D, False)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    c, s = _cos_sin(tl.load(Pos + rows * spt, mask=ok, other=0.0), Freq, D // 2)
    _store_halves(Y, rows, syt, ok, x1 * c - x2 * s, x2 * c + x1 * s, D)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q1, q2, Kr, V, skt, svt, rows, lo, hi, Tk, shift, qk_scale,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) in base 2 (qk_scale = sm_scale * log2(e)); q1, q2
    are the rotated halves of the Q tile. MASKED=False is the fast path for blocks that lie fully inside
    the keys and fully below the causal diagonal for every row of the tile."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        # halves of k_r, loaded transposed: s = q1 k1^T + q2 k2^T, no reshuffling of the head dim
        k1t, k2t = _load_halves(Kr, cols, skt, col_ok, D, True)
        s = tl.dot(q1, k1t.to(DOT_DTYPE), input_precision=PRECISION)
        s = tl.dot(q2, k2t.to(DOT_DTYPE), s, input_precision=PRECISION) * qk_scale
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(ok, s, float("-inf"))
        # every row sees key 0 in the first block it processes, so m_new is finite from there on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svt + d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, Kr, V, PosQ, Freq, Out, Lse,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, spb, sph, spt, sob, soh, sot, slb, slh, slt,
                     H, Tq, Tk, qk_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against all the keys they see."""
    pid_m = tl.program_id(0)
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    Q += b * sqb + h * sqh
    Kr += b * skb + h * skh
    V += b * svb + h * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    q1, q2 = _load_halves(Q, rows, sqt, row_ok, D, False)
    q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    if ROTATE:  # the Q tile is loaded once per program, so rotating it here is nearly free
        pos = tl.load(PosQ + b * spb + h * sph + rows * spt, mask=row_ok, other=0.0)
        c, s = _cos_sin(pos, Freq, D // 2)
        q1, q2 = q1 * c - q2 * s, q2 * c + q1 * s
    # the same rounding as the backward's q_r, so both passes see the same scores
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    shift = Tk - Tq  # bottom-right alignment: query row i is token i + shift and sees keys j <= i + shift
    if CAUSAL:
        hi = tl.minimum(Tk, pid_m * BLOCK_M + BLOCK_M + shift)
        full = tl.minimum(pid_m * BLOCK_M + shift + 1, Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q1, q2, Kr, V, skt, svt, rows, 0, full, Tk, shift, qk_scale,
                                    D, BLOCK_N, False, CAUSAL, DOT_DTYPE, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q1, q2, Kr, V, skt, svt, rows, full, hi, Tk, shift, qk_scale,
                                    D, BLOCK_N, True, CAUSAL, DOT_DTYPE, PRECISION)
    Out += b * sob + h * soh
    tl.store(Out + rows[:, None] * sot + tl.arange(0, D)[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + b * slb + h * slh + rows * slt, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, dO, Delta, sob, soh, sot, sdb, sdh, sdt, seb, seh, stt, H, T,
                           D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Delta_i = sum_d o_id do_id (float32), the row term of the softmax gradient dS = P (dP - Delta)."""
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    d = tl.arange(0, D)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + rows[:, None] * sdt + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(Delta + b * seb + h * seh + rows * stt, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _rotate_back_store(g1, g2, X, PosX, Freq, dX, dPos, rows, row_ok, sxt, spt, sdxt, sdpt,
                       D: tl.constexpr, ROTATE: tl.constexpr):
    """Epilogue of both backward kernels. g1, g2: float32 halves of dL/d(rotated x) for a block of
    tokens. Stores dx = R(-a) g and dL/dpos = sum_i f_i (x1 dx2 - x2 dx1), the cross product of the
    pair (x1, x2) with its gradient, which is the same in the rotated and the unrotated frame."""
    if ROTATE:
        c, s = _cos_sin(tl.load(PosX + rows * spt, mask=row_ok, other=0.0), Freq, D // 2)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        x1, x2 = _load_halves(X, rows, sxt, row_ok, D, False)
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        f = tl.load(Freq + tl.arange(0, D // 2)).to(tl.float32)
        tl.store(dPos + rows * sdpt, tl.sum((x1 * g2 - x2 * g1) * f[None, :], 1), mask=row_ok)
    _store_halves(dX, rows, sdxt, row_ok, g1, g2, D)


@triton.jit
def _attn_bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Qr, dO, Lse, Delta, sqt, sdot, slt, cols, lo, hi, Tq, shift,
                         qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                         CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dv += P^T dO and dk_r += dS^T q_r over the query blocks [lo, hi), working on
    transposed scores [BLOCK_N, BLOCK_M] so that no tile of the resident key block needs transposing."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        q1t, q2t = _load_halves(Qr, rows, sqt, row_ok, D, True)
        q1t, q2t = q1t.to(DOT_DTYPE), q2t.to(DOT_DTYPE)
        lse = tl.load(Lse + rows * slt, mask=row_ok, other=0.0)
        st = tl.dot(k1, q1t, input_precision=PRECISION)
        st = tl.dot(k2, q2t, st, input_precision=PRECISION)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        if MASKED:
            ok = row_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[:, None] <= rows[None, :] + shift)
            pt = tl.where(ok, pt, 0.0)
        do = tl.load(dO + rows[:, None] * sdot + d[None, :], mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        dv = tl.dot(pt.to(DOT_DTYPE), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        delta = tl.load(Delta + rows * slt, mask=row_ok, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(DOT_DTYPE)
        dk1 = tl.dot(dst, tl.trans(q1t), dk1, input_precision=PRECISION)
        dk2 = tl.dot(dst, tl.trans(q2t), dk2, input_precision=PRECISION)
    return dk1, dk2, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Qr, Kr, V, K, PosK, Freq, dO, Lse, Delta, dK, dV, dPosK,
                          sqb, sqh, sqt, srb, srh, srt, svb, svh, svt, skb, skh, skt, spb, sph, spt,
                          sdob, sdoh, sdot, slb, slh, slt, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sdpb, sdph, sdpt,
                          H, Tq, Tk, qk_scale, sm_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                          ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head); dk, dv and dpos_k of those keys.
    Lse and Delta share strides."""
    pid_n = tl.program_id(0)
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    Qr += b * sqb + h * sqh
    dO += b * sdob + h * sdoh
    Lse += b * slb + h * slh
    Delta += b * slb + h * slh
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    k1, k2 = _load_halves(Kr + b * srb + h * srh, cols, srt, col_ok, D, False)
    k1, k2 = k1.to(DOT_DTYPE), k2.to(DOT_DTYPE)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + tl.arange(0, D)[None, :], mask=col_ok[:, None],
                other=0.0).to(DOT_DTYPE)
    dk1 = tl.zeros([BLOCK_N, D // 2], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, D // 2], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # query row i sees key j iff j <= i + shift; rows >= diag see the whole block (keys beyond Tk
    # only feed rows of dk, dv that are never stored, so they need no mask here)
    shift = Tk - Tq
    full = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
        diag = lo + tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - shift - lo, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        diag = 0
    dk1, dk2, dv = _attn_bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Qr, dO, Lse, Delta, sqt, sdot, slt, cols,
                                        lo, tl.minimum(diag, tl.cdiv(Tq, BLOCK_M) * BLOCK_M), Tq, shift, qk_scale,
                                        D, BLOCK_M, True, CAUSAL, DOT_DTYPE, PRECISION)
    dk1, dk2, dv = _attn_bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Qr, dO, Lse, Delta, sqt, sdot, slt, cols,
                                        diag, full, Tq, shift, qk_scale,
                                        D, BLOCK_M, False, CAUSAL, DOT_DTYPE, PRECISION)
    dk1, dk2, dv = _attn_bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Qr, dO, Lse, Delta, sqt, sdot, slt, cols,
                                        tl.maximum(diag, full), Tq, Tq, shift, qk_scale,
                                        D, BLOCK_M, True, CAUSAL, DOT_DTYPE, PRECISION)
    tl.store(dV + b * sdvb + h * sdvh + cols[:, None] * sdvt + tl.arange(0, D)[None, :],
             dv.to(dV.dtype.element_ty), mask=col_ok[:, None])
    # P was computed from sm_scale * q.k, so dL/d(q.k) carries one more sm_scale
    _rotate_back_store(dk1 * sm_scale, dk2 * sm_scale, K + b * skb + h * skh, PosK + b * spb + h * sph, Freq,
                       dK + b * sdkb + h * sdkh, dPosK + b * sdpb + h * sdph, cols, col_ok, skt, spt, sdkt, sdpt,
                       D, ROTATE)


@triton.jit
def _attn_bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, Kr, V, skt, svt, rows, lo, hi, Tk, shift, qk_scale,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dq_r += dS k_r over the key blocks [lo, hi)."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        k1t, k2t = _load_halves(Kr, cols, skt, col_ok, D, True)
        k1t, k2t = k1t.to(DOT_DTYPE), k2t.to(DOT_DTYPE)
        vt = tl.load(V + cols[None, :] * svt + d[:, None], mask=col_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q1, k1t, input_precision=PRECISION)
        s = tl.dot(q2, k2t, s, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + shift)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(DOT_DTYPE)
        dq1 = tl.dot(ds, tl.trans(k1t), dq1, input_precision=PRECISION)
        dq2 = tl.dot(ds, tl.trans(k2t), dq2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def _attn_bwd_dq_kernel(Qr, Kr, V, Q, PosQ, Freq, dO, Lse, Delta, dQ, dPosQ,
                        srb, srh, srt, skb, skh, skt, svb, svh, svt, sqb, sqh, sqt, spb, sph, spt,
                        sdob, sdoh, sdot, slb, slh, slt, sdqb, sdqh, sdqt, sdpb, sdph, sdpt,
                        H, Tq, Tk, qk_scale, sm_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); dq and dpos_q of those queries.
    Lse and Delta share strides."""
    pid_m = tl.program_id(0)
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    q1, q2 = _load_halves(Qr + b * srb + h * srh, rows, srt, row_ok, D, False)
    q1, q2 = q1.to(DOT_DTYPE), q2.to(DOT_DTYPE)
    do = tl.load(dO + b * sdob + h * sdoh + rows[:, None] * sdot + tl.arange(0, D)[None, :], mask=row_ok[:, None],
                 other=0.0).to(DOT_DTYPE)
    lse = tl.load(Lse + b * slb + h * slh + rows * slt, mask=row_ok, other=0.0)
    delta = tl.load(Delta + b * slb + h * slh + rows * slt, mask=row_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, D // 2], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, D // 2], dtype=tl.float32)
    Kr += b * skb + h * skh
    V += b * svb + h * svh
    shift = Tk - Tq
    if CAUSAL:
        hi = tl.minimum(Tk, pid_m * BLOCK_M + BLOCK_M + shift)
        full = tl.minimum(pid_m * BLOCK_M + shift + 1, Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    dq1, dq2 = _attn_bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, Kr, V, skt, svt, rows, 0, full, Tk, shift,
                                  qk_scale, D, BLOCK_N, False, CAUSAL, DOT_DTYPE, PRECISION)
    dq1, dq2 = _attn_bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, Kr, V, skt, svt, rows, full, hi, Tk, shift,
                                  qk_scale, D, BLOCK_N, True, CAUSAL, DOT_DTYPE, PRECISION)
    _rotate_back_store(dq1 * sm_scale, dq2 * sm_scale, Q + b * sqb + h * sqh, PosQ + b * spb + h * sph, Freq,
                       dQ + b * sdqb + h * sdqh, dPosQ + b * sdpb + h * sdph, rows, row_ok, sqt, spt, sdqt, sdpt,
                       D, ROTATE)


# Block sizes (BLOCK_M queries x BLOCK_N keys), num_warps, num_stages per kernel and (bits of the
# input dtype, D). The GPU values are an H100 starting point, chosen so that the offline sm_90 compile
# in tests/test_rope_kernel.py shows no register spills; they are not tuned by measurement yet. The
# key-block kernel keeps k, v, dk and dv on chip, so at D = 128 it streams fewer queries per step.
# float32 inputs use exact IEEE float32 dots on the FMA units (TF32 tensor cores if
# torch.backends.cuda.matmul.allow_tf32): a correctness path, with small tiles; both compile spill-free.
_BLOCKS_16BIT = dict(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 2), dq=(128, 64, 8, 2))
_BLOCKS_FP32 = dict(fwd=(64, 32, 8, 2), dkdv=(16, 16, 4, 2), dq=(32, 16, 4, 2))
GPU_BLOCKS = {(16, 32): _BLOCKS_16BIT, (16, 64): _BLOCKS_16BIT,
              (16, 128): dict(_BLOCKS_16BIT, dkdv=(32, 128, 8, 2)),
              (32, 32): _BLOCKS_FP32, (32, 64): _BLOCKS_FP32, (32, 128): _BLOCKS_FP32}
# Under the interpreter small blocks make small test shapes span many blocks, diagonals and ragged
# tails, and every tile is float32 (its bfloat16 arithmetic is broken).
INTERPRET_BLOCKS = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
ROW_BLOCK = 32  # tokens per program of the row-wise kernels (rotation, Delta)
# Triton 3.10 turns FMA contraction off by default: pin it, so numerics and speed do not change silently
_PIN = dict(enable_fp_fusion=True)
TRITON_HEAD_DIMS = (32, 64, 128)
_DOT_DTYPES = ({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
               if _HAVE_TRITON else {})


def triton_available() -> bool:
    """Triton is installed; it runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
    before triton was imported."""
    return _HAVE_TRITON


def _interpreting() -> bool:
    # @triton.jit reads TRITON_INTERPRET when the kernels are defined, i.e. when this module is imported
    return _HAVE_TRITON and type(_attn_fwd_kernel).__name__ == "InterpretedFunction"


def _triton_unsupported(q, k, pos_q, pos_k, inv_freq):
    """The error the Triton path would raise for these inputs, or None; "auto" then uses the reference."""
    if not _HAVE_TRITON:
        return RuntimeError("backend='triton': Triton is not installed (use backend='torch')")
    if not (q.is_cuda or _interpreting()):
        return RuntimeError(f"backend='triton': tensors are on {q.device}; the kernels need CUDA tensors, or "
                            "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU")
    if q.dtype not in _DOT_DTYPES:
        return TypeError(f"backend='triton': q, k, v must be float32, float16 or bfloat16, got {q.dtype}")
    D = q.shape[-1]
    if D not in TRITON_HEAD_DIMS:
        return ValueError(f"backend='triton': head dim {D} is not supported (supported: "
                          f"{', '.join(map(str, TRITON_HEAD_DIMS))}; use backend='torch')")
    for name, p in (("pos_q", pos_q), ("pos_k", pos_k)):
        if p is not None and p.dtype != torch.float32:
            return TypeError(f"backend='triton': {name} must be float32, got {p.dtype}")
    if inv_freq.shape != (D // 2,):
        return ValueError(f"inv_freq must have shape ({D // 2},), got {tuple(inv_freq.shape)}")
    if q.numel() == 0 or k.shape[2] == 0:
        return ValueError("backend='triton': empty input")
    if q.shape[0] * q.shape[1] > 65535:  # batch * heads is the second grid axis
        return ValueError(f"backend='triton': batch * heads = {q.shape[0] * q.shape[1]} exceeds 65535")
    return None


def _empty(shape, dtype, device, like=None):
    """Every buffer the kernels write comes from here (the tests swap in NaN-guarded buffers). `like`
    keeps the layout of q for o and dq: model.py's transposed views then reshape without a copy."""
    if like is not None:
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _st(t):
    """Strides of the (batch, head, token) dims; kernels assume the head dim is contiguous."""
    return t.stride()[:3]


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_config(q):
    if _interpreting():
        blocks, dot_dtype, precision = INTERPRET_BLOCKS, tl.float32, "ieee"
    else:
        blocks = GPU_BLOCKS[(8 * q.element_size(), q.shape[-1])]
        dot_dtype = _DOT_DTYPES[q.dtype]
        # float32 inputs follow PyTorch's matmul convention: exact float32 unless TF32 is allowed
        precision = "tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return blocks, dict(DOT_DTYPE=dot_dtype, PRECISION=precision)


def _fit(block, T):
    """Shrink a block to the sequence (decoding has Tq = 1): powers of two, at least 16 for tl.dot."""
    return min(block, max(16, triton.next_power_of_2(T)))


def _rotate_triton(x, pos, freq):
    """R(pos * f) x as a new tensor of x's dtype: k_r for the forward, q_r and k_r for the backward."""
    y = _empty(x.shape, x.dtype, x.device)
    B, H, T, D = x.shape
    _rotate_kernel[(triton.cdiv(T, ROW_BLOCK), B * H)](
        x, pos, freq, y, *_st(x), *_st(pos), *_st(y), H, T, D=D, BLOCK_T=ROW_BLOCK, **_PIN)
    return y


def _no_pos(x):
    """Stand-in pointer for a missing position tensor (never read: ROTATE is False)."""
    return x.new_zeros(1, 1, 1, dtype=torch.float32)


def _attn_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    blocks, opts = _launch_config(q)
    kr = _rotate_triton(k, pos_k, freq) if pos_k is not None else k
    o = _empty(q.shape, q.dtype, q.device, like=q)
    lse = _empty((B, H, Tq), torch.float32, q.device)
    pq = pos_q if pos_q is not None else _no_pos(q)
    bm, bn, warps, stages = blocks["fwd"]
    bm, bn = _fit(bm, Tq), _fit(bn, Tk)
    _attn_fwd_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, kr, v, pq, freq, o, lse, *_st(q), *_st(kr), *_st(v), *_st(pq), *_st(o), *_st(lse),
        H, Tq, Tk, sm_scale * LOG2E, D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, ROTATE=pos_q is not None,
        num_warps=warps, num_stages=stages, **_PIN, **opts)
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    blocks, opts = _launch_config(q)
    do = _unit_stride(do)
    qr = _rotate_triton(q, pos_q, freq) if pos_q is not None else q
    kr = _rotate_triton(k, pos_k, freq) if pos_k is not None else k
    delta = _empty((B, H, Tq), torch.float32, q.device)
    assert _st(delta) == _st(lse), "the backward kernels index Lse and Delta with one set of strides"
    _attn_bwd_delta_kernel[(triton.cdiv(Tq, ROW_BLOCK), B * H)](
        o, do, delta, *_st(o), *_st(do), *_st(delta), H, Tq, D=D, BLOCK_T=ROW_BLOCK, **_PIN)
    dq = _empty(q.shape, q.dtype, q.device, like=q)
    dk = _empty(k.shape, k.dtype, k.device, like=k)
    dv = _empty(v.shape, v.dtype, v.device, like=v)
    pq = pos_q if pos_q is not None else _no_pos(q)
    pk = pos_k if pos_k is not None else _no_pos(q)
    dpq = _empty((B, H, Tq), torch.float32, q.device) if pos_q is not None else pq
    dpk = _empty((B, H, Tk), torch.float32, q.device) if pos_k is not None else pk
    qk_scale = sm_scale * LOG2E

    bm, bn, warps, stages = blocks["dkdv"]
    bm, bn = _fit(bm, Tq), _fit(bn, Tk)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * H)](
        qr, kr, v, k, pk, freq, do, lse, delta, dk, dv, dpk,
        *_st(qr), *_st(kr), *_st(v), *_st(k), *_st(pk), *_st(do), *_st(lse), *_st(dk), *_st(dv), *_st(dpk),
        H, Tq, Tk, qk_scale, sm_scale, D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, ROTATE=pos_k is not None,
        num_warps=warps, num_stages=stages, **_PIN, **opts)
    bm, bn, warps, stages = blocks["dq"]
    bm, bn = _fit(bm, Tq), _fit(bn, Tk)
    _attn_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
        qr, kr, v, q, pq, freq, do, lse, delta, dq, dpq,
        *_st(qr), *_st(kr), *_st(v), *_st(q), *_st(pq), *_st(do), *_st(lse), *_st(dq), *_st(dpq),
        H, Tq, Tk, qk_scale, sm_scale, D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, ROTATE=pos_q is not None,
        num_warps=warps, num_stages=stages, **_PIN, **opts)
    return dq, dk, dv, (dpq if pos_q is not None else None), (dpk if pos_k is not None else None)


class _TritonAttention(torch.autograd.Function):
    """Saves q, k, v, o, the log-sum-exp and the positions; the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        freq = inv_freq.to(device=q.device, dtype=torch.float64).contiguous()
        o, lse = _attn_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, pos_q, pos_k, freq)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pos_q, pos_k, freq = ctx.saved_tensors
        dq, dk, dv, dpq, dpk = _attn_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, ctx.causal, ctx.sm_scale)
        needs = ctx.needs_input_grad
        return dq, dk, dv, dpq if needs[3] else None, dpk if needs[4] else None, None, None, None


@torch.compiler.disable  # torch.compile(model) calls the kernels as they are, with a graph break
def _triton_attention(q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale):
    error = _triton_unsupported(q, k, pos_q, pos_k, inv_freq)
    if error is not None:
        raise error
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _TritonAttention.apply(q, k, v, pos_q, pos_k, inv_freq, bool(causal), sm_scale)


if __name__ == "__main__":
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 50, 64
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pos = torch.randn(B, H, T) * 100
    # float64 reference straight from the definition: rotate pairs (x_i, x_{i+D/2}) by pos * f_i
    f = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    a = pos.double()[..., None] * f
    rot = lambda x: torch.cat((x[..., :D // 2] * a.cos() - x[..., D // 2:] * a.sin(),
                               x[..., D // 2:] * a.cos() + x[..., :D // 2] * a.sin()), -1)
    s = rot(q.double()) @ rot(k.double()).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = s.softmax(-1) @ v.double()
    out = repo_attention(q, k, v, pos, pos, theta=10000.0, backend="torch")
    print(f"max |torch path - float64 reference| = {(out.double() - ref).abs().max():.2e}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _triton_unsupported(q.to(device), k, pos, pos, f) is None:
        out = repo_attention(*(x.to(device) for x in (q, k, v, pos, pos)), theta=10000.0, backend="triton")
        print(f"max |triton path ({device}) - float64 reference| = {(out.double().cpu() - ref).abs().max():.2e}")
    else:
        print(f"triton path not run: {_triton_unsupported(q.to(device), k, pos, pos, f)}")
