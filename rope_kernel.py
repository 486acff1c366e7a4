"""
Continuous-RoPE attention: softmax attention where q and k are rotated by RoPE angles
a = pos * theta^(-2i/D), with pos a real number per (batch, head, token).

RePo predicts pos per token and head, so cos/sin cannot come from an integer-indexed table and
training needs dL/dpos as well as dq, dk, dv. One entry point serves every layer of model.py:

    repo_attention(q, k, v, pos_q, pos_k, theta=500000.0, causal=True, sm_scale=None, backend="auto",
                   inv_freq=None)

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]; pos_q: [B, H, Tq]; pos_k: [B, H, Tk] (float32).
    RoPE layers pass integer-valued positions, RePo layers their learned ones; None means "no
    rotation" (NoPE layers, or keys that were rotated before they went into a KV cache).
    With causal=True and Tq < Tk the queries are the last Tq positions (bottom-right alignment).

Backends (all exact up to rounding; half-split / NeoX pairing, the OLMo-2 and GPT-NeoX convention):
    "torch"   the reference: rotate in float32 with PyTorch ops, then F.scaled_dot_product_attention.
    "rotary"  one Triton kernel rotates q and k, then F.scaled_dot_product_attention (the vendor's
              FlashAttention / cuDNN kernels); its backward turns dq_r, dk_r into dq, dk, dpos in one
              kernel, from the rotated tensors SDPA keeps anyway.
    "triton"  fused flash-attention kernels with the rotation inside (below, in this file).
    "auto"    on CUDA what a GPU measured fastest for the architecture, dtype, head dim and length
              (repo_kernels/auto_table.py), else the estimate: "rotary" with SDPA's fastest backend
              first (cuDNN on Hopper); "torch" elsewhere.
The Triton backends are torch.library custom ops: torch.compile(fullgraph=True) traces through them.
They run on CUDA, or on the CPU with TRITON_INTERPRET=1 set before triton is imported.

This file: the PyTorch rotation (the reference every kernel is checked against), repo_attention and
its dispatch, then the fused attention kernels and their custom ops. Behind it, repo_kernels/: the
rotation kernel, launch configs per GPU architecture (triton_rope.py), input checks, the choice of
"auto" and the "rotary" backend (ops.py).

Because q and k carry their own angles, <R(a_t) q, R(a_s) k> = <q, R(a_s - a_t) k>: attention
only sees position differences, so adding a constant to all positions changes nothing.

    python rope_kernel.py                     # checks every backend it can run against float64
    TRITON_INTERPRET=1 python rope_kernel.py  # ... the Triton ones on the CPU too
"""
import math
from typing import Optional

import torch

from repo_kernels import ops
from repo_kernels import triton_rope as tr
from repo_kernels.ops import BACKENDS  # noqa: F401 - the backends' names, for model.py and train.py
from repo_kernels.triton_rope import (LOG2E, ROW_BLOCK, _PIN, _cos_sin, _load_halves, _shift, _st, _store_halves,
                                 _unit_stride, bwd_allocs, device_guard, fit, fwd_allocs, launch_config, rotary,
                                 tl, triton)


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
        return _rotate(x, pos, inv_freq, sign=1.0, dtype=x.dtype)

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


def _rotate(x, pos, inv_freq, sign, dtype=None):
    """R(sign * pos * f) x, computed in float32 at least and returned in dtype (default: that math
    dtype). The halves are cast before the concatenation so that the result is always a new tensor,
    never a no-op cast's alias: torch 2.11's dynamo drops the gradient of an autograd.Function output
    that aliases an intermediate."""
    ct = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), torch.float32)  # >= float32
    # positions broadcast over batch or heads (RoPE layers pass arange(T).expand(B, H, T)): one
    # [T, D/2] cos/sin table, broadcast, instead of B * H copies of the same angles
    pos = pos[tuple(slice(0, 1) if st == 0 else slice(None) for st in pos.stride())]
    angle = pos.to(ct)[..., None] * inv_freq.to(ct)
    cos, sin = angle.cos(), sign * angle.sin()
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    dtype = dtype or ct
    return torch.cat(((x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)), dim=-1)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by angles pos [..., T] * inv_freq [D/2]; math in float32 (float64 if
    x or pos is float64), result in x.dtype."""
    return _Rotate.apply(x, pos, inv_freq)


def repo_attention(q, k, v, pos_q, pos_k, theta=500000.0, causal=True, sm_scale=None, backend="auto",
                   inv_freq=None):
    """Attention with q rotated by pos_q and k by pos_k; see the module docstring.

    inv_freq ([D/2], optional) replaces theta^(-2i/D), e.g. for YaRN-style frequency scaling."""
    ops._check_inputs(q, k, v, pos_q, pos_k, backend)
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and Tq > Tk:
        raise ValueError(f"causal attention with more queries ({Tq}) than keys ({Tk})")
    if inv_freq is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, device=q.device)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    causal = bool(causal)
    sdpa = None  # "auto" may name the SDPA backend for "rotary" to try first
    if backend == "auto":
        backend, sdpa = ops._auto_choice(q, k, v, pos_q, pos_k, inv_freq)
    if backend == "torch":
        q = apply_rope(q, pos_q, inv_freq) if pos_q is not None else q
        k = apply_rope(k, pos_k, inv_freq) if pos_k is not None else k
        return ops._sdpa(q, k, v, causal, sm_scale)
    error = ops._unsupported(backend, q, k, v, pos_q, pos_k, inv_freq)
    if error is not None:
        raise error
    freq = inv_freq.to(device=q.device, dtype=torch.float64).contiguous()
    if backend == "triton":
        return _flash_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale)[0]
    return ops.rotary_attention(q, k, v, pos_q, pos_k, freq, causal, sm_scale, sdpa)


# ------------------------------------------------------------------------------------------------
# Fused flash attention with the rotation inside, forward and backward.
#
# forward : the rotation kernel turns K into a temporary k_r; the attention kernel rotates its own Q
#           tile on load (once per program) and streams k_r and v with an online softmax. Saved for
#           backward: q, k, v, o, the log-sum-exp and the positions (no cos/sin, no rotated copies).
# backward: q_r and k_r are recomputed by one launch of the rotation kernel; one kernel owns a block
#           of keys and accumulates dv and dk_r over the queries that see it, another owns a block of
#           queries and accumulates dq_r over the keys it sees (no atomics). Their epilogues rotate
#           dk_r and dq_r back and compute dpos from the float32 accumulators.
# Why K is not rotated inside the loop: every K tile is visited by Tq / BLOCK_M programs, and its
# sin/cos would cost as much as the softmax exponentials that already bound the kernel.
# Inner loops run full-width dots over the head dim (one wgmma/mma chain per product); the rotation
# halves appear only in the prologue (the Q tile, rotated, then joined) and the epilogues (split).
# Causality is a runtime shift (query i sees key j iff j <= i + shift): non-causal attention passes a
# shift beyond every key, so one binary serves both. The grid is (batch * head, query or key blocks)
# with the heavy causal blocks first.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _split_halves(x, BLOCK: tl.constexpr, D: tl.constexpr):
    """[BLOCK, D] -> its two halves [BLOCK, D/2] (a register shuffle, once per program)."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK, 2, D // 2)), (0, 2, 1)))


@triton.jit
def _join_halves(x1, x2, BLOCK: tl.constexpr, D: tl.constexpr):
    """Two halves [BLOCK, D/2] -> [BLOCK, D] = [x1, x2]."""
    return tl.reshape(tl.permute(tl.join(x1, x2), (0, 2, 1)), (BLOCK, D))


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, Kr, V, skt, svt, rows, lo, hi, Tk, shift, qk_scale,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) in base 2 (qk_scale = sm_scale * log2(e)). MASKED=False
    is the fast path for blocks inside the keys and below the causal diagonal for every row of the tile."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        kt = tl.load(Kr + cols[None, :] * skt + d[:, None], mask=col_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(col_ok[None, :] & (cols[None, :] <= rows[:, None] + shift), s, float("-inf"))
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
def _attn_fwd_kernel(Q, Kr, V, PosQ, Freq, Out, Lse, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, spb, sph, spt,
                     sob, soh, sot, H, Tq, Tk, shift, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against all the keys they see."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the last query blocks see the most keys: first
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    d = tl.arange(0, D)
    Q += b * sqb + h * sqh
    if ROTATE:  # the Q tile is loaded once per program, so rotating it here is nearly free
        q1, q2 = _load_halves(Q, rows, sqt, row_ok, D)
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
        pos = tl.load(PosQ + b * spb + h * sph + rows * spt, mask=row_ok, other=0.0)
        c, s = _cos_sin(pos, tl.load(Freq + tl.arange(0, D // 2)))
        q = _join_halves(q1 * c - q2 * s, q2 * c + q1 * s, BLOCK_M, D)  # full width for the inner loop
    else:
        q = tl.load(Q + rows[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(DOT_DTYPE)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    Kr += b * skb + h * skh
    V += b * svb + h * svh
    # blocks [0, full) lie below the diagonal for every row (no mask); [full, hi) need the mask
    hi = tl.minimum(Tk, pid_m * BLOCK_M + BLOCK_M + shift)
    full = tl.minimum(pid_m * BLOCK_M + shift + 1, Tk) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kr, V, skt, svt, rows, 0, full, Tk, shift, qk_scale,
                                    D, BLOCK_N, False, DOT_DTYPE, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kr, V, skt, svt, rows, full, hi, Tk, shift, qk_scale,
                                    D, BLOCK_N, True, DOT_DTYPE, PRECISION)
    Out += b * sob + h * soh
    tl.store(Out + rows[:, None] * sot + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + bh * Tq + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, dO, Delta, sob, soh, sot, sdb, sdh, sdt, H, T, n_blocks,
                           D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Delta_i = sum_d o_id do_id (float32), the row term of the softmax gradient dS = P (dP - Delta)."""
    pid = tl.program_id(0)
    bh, blk = pid // n_blocks, pid % n_blocks
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    d = tl.arange(0, D)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + rows[:, None] * sdt + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(Delta + bh * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _rotate_back_store(g, X, PosX, Freq, dX, dPos, rows, row_ok, sxt, spt, sdxt,
                       BLOCK: tl.constexpr, D: tl.constexpr, ROTATE: tl.constexpr):
    """Epilogue of both backward kernels. g: float32 dL/d(rotated x) [BLOCK, D] for a block of tokens.
    Stores dx = R(-a) g and dL/dpos = sum_i f_i (x1 dx2 - x2 dx1) into dPos (already offset to the
    (batch, head)); the cross product of the pair (x1, x2) with its gradient is the same in the
    rotated and the unrotated frame, so x comes unrotated from memory."""
    g1, g2 = _split_halves(g, BLOCK, D)
    if ROTATE:
        f = tl.load(Freq + tl.arange(0, D // 2))
        c, s = _cos_sin(tl.load(PosX + rows * spt, mask=row_ok, other=0.0), f)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        x1, x2 = _load_halves(X, rows, sxt, row_ok, D)
        dpos = tl.sum((x1.to(tl.float32) * g2 - x2.to(tl.float32) * g1) * f.to(tl.float32)[None, :], 1)
        tl.store(dPos + rows, dpos, mask=row_ok)
    _store_halves(dX, rows, sdxt, row_ok, g1, g2, D)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Qr, dO, Lse, Delta, sqt, sdot, cols, lo, hi, Tq, shift, qk_scale,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dv += P^T dO and dk_r += dS^T q_r over the query blocks [lo, hi), working on
    transposed scores [BLOCK_N, BLOCK_M] so that no tile of the resident key block needs transposing."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        qt = tl.load(Qr + rows[None, :] * sqt + d[:, None], mask=row_ok[None, :], other=0.0).to(DOT_DTYPE)
        lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
        pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where(row_ok[None, :] & (cols[:, None] <= rows[None, :] + shift), pt, 0.0)
        do = tl.load(dO + rows[:, None] * sdot + d[None, :], mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        dv = tl.dot(pt.to(DOT_DTYPE), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(DOT_DTYPE)
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Qr, Kr, V, K, PosK, Freq, dO, Lse, Delta, dK, dV, dPosK,
                          sqb, sqh, sqt, srb, srh, srt, svb, svh, svt, skb, skh, skt, spb, sph, spt,
                          sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                          H, Tq, Tk, shift, qk_scale, sm_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head); dk, dv and dpos_k of those keys. The first key
    blocks are seen by the most queries and come first already."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    pid_n = tl.program_id(1)
    Qr += b * sqb + h * sqh
    dO += b * sdob + h * sdoh
    Lse += bh * Tq
    Delta += bh * Tq
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    d = tl.arange(0, D)
    k = tl.load(Kr + b * srb + h * srh + cols[:, None] * srt + d[None, :], mask=col_ok[:, None],
                other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :], mask=col_ok[:, None],
                other=0.0).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # query row i sees key j iff j <= i + shift; rows >= diag see the whole block (keys beyond Tk
    # only feed rows of dk, dv that are never stored, so they need no mask here)
    full = Tq // BLOCK_M * BLOCK_M
    lo = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
    diag = lo + tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - shift - lo, 0), BLOCK_M) * BLOCK_M
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qr, dO, Lse, Delta, sqt, sdot, cols,
                                  lo, tl.minimum(diag, tl.cdiv(Tq, BLOCK_M) * BLOCK_M), Tq, shift, qk_scale,
                                  D, BLOCK_M, True, DOT_DTYPE, PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qr, dO, Lse, Delta, sqt, sdot, cols, diag, full, Tq, shift,
                                  qk_scale, D, BLOCK_M, False, DOT_DTYPE, PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qr, dO, Lse, Delta, sqt, sdot, cols, tl.maximum(diag, full), Tq,
                                  Tq, shift, qk_scale, D, BLOCK_M, True, DOT_DTYPE, PRECISION)
    tl.store(dV + b * sdvb + h * sdvh + cols[:, None] * sdvt + d[None, :], dv.to(dV.dtype.element_ty),
             mask=col_ok[:, None])
    # P was computed from sm_scale * q.k, so dL/d(q.k) carries one more sm_scale
    _rotate_back_store(dk * sm_scale, K + b * skb + h * skh, PosK + b * spb + h * sph, Freq,
                       dK + b * sdkb + h * sdkh, dPosK + bh * Tk, cols, col_ok, skt, spt, sdkt, BLOCK_N, D, ROTATE)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, Kr, V, skt, svt, rows, lo, hi, Tk, shift, qk_scale,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dq_r += dS k_r over the key blocks [lo, hi)."""
    d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        kt = tl.load(Kr + cols[None, :] * skt + d[:, None], mask=col_ok[None, :], other=0.0).to(DOT_DTYPE)
        vt = tl.load(V + cols[None, :] * svt + d[:, None], mask=col_ok[None, :], other=0.0).to(DOT_DTYPE)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(col_ok[None, :] & (cols[None, :] <= rows[:, None] + shift), p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(DOT_DTYPE)
        dq = tl.dot(ds, tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Qr, Kr, V, Q, PosQ, Freq, dO, Lse, Delta, dQ, dPosQ,
                        srb, srh, srt, skb, skh, skt, svb, svh, svt, sqb, sqh, sqt, spb, sph, spt,
                        sdob, sdoh, sdot, sdqb, sdqh, sdqt, H, Tq, Tk, shift, qk_scale, sm_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        ROTATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); dq and dpos_q of those queries."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy causal blocks first
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    d = tl.arange(0, D)
    q = tl.load(Qr + b * srb + h * srh + rows[:, None] * srt + d[None, :], mask=row_ok[:, None],
                other=0.0).to(DOT_DTYPE)
    do = tl.load(dO + b * sdob + h * sdoh + rows[:, None] * sdot + d[None, :], mask=row_ok[:, None],
                 other=0.0).to(DOT_DTYPE)
    lse = tl.load(Lse + bh * Tq + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * Tq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    Kr += b * skb + h * skh
    V += b * svb + h * svh
    hi = tl.minimum(Tk, pid_m * BLOCK_M + BLOCK_M + shift)
    full = tl.minimum(pid_m * BLOCK_M + shift + 1, Tk) // BLOCK_N * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, Kr, V, skt, svt, rows, 0, full, Tk, shift, qk_scale,
                            D, BLOCK_N, False, DOT_DTYPE, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, Kr, V, skt, svt, rows, full, hi, Tk, shift, qk_scale,
                            D, BLOCK_N, True, DOT_DTYPE, PRECISION)
    _rotate_back_store(dq * sm_scale, Q + b * sqb + h * sqh, PosQ + b * spb + h * sph, Freq, dQ + b * sdqb + h * sdqh,
                       dPosQ + bh * Tq, rows, row_ok, sqt, spt, sdqt, BLOCK_M, D, ROTATE)


def attn_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale):
    """Fused forward: (o, lse). q, k, v with unit-stride head dims."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    blocks, opts = launch_config(q)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    o, lse = fwd_allocs(q)
    pq = pos_q if pos_q is not None else lse  # a stand-in pointer, never read when ROTATE is False
    bm, bn, warps, stages = blocks["fwd"]
    bm, bn = fit(bm, Tq), fit(bn, Tk)
    with device_guard(q):
        kr = rotary([k], [pos_k], freq)[0] if pos_k is not None else k
        _attn_fwd_kernel[(B * H, triton.cdiv(Tq, bm))](
            q, kr, v, pq, freq, o, lse, *_st(q), *_st(kr), *_st(v), *_st(pq), *_st(o), H, Tq, Tk, _shift(causal, Tq, Tk), sm_scale * LOG2E, D=D,
            BLOCK_M=bm, BLOCK_N=bn, ROTATE=pos_q is not None, num_warps=warps, num_stages=stages, **_PIN, **opts)
    return o, lse


def attn_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale):
    """Fused backward: (dq, dk, dv, dpos_q, dpos_k), dpos empty where the positions are None."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    blocks, opts = launch_config(q)
    do, q, k, v = _unit_stride(do), _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dq, dk, dv, dpos_q, dpos_k = bwd_allocs(q, k, v, pos_q, pos_k)
    shift, qk_scale = _shift(causal, Tq, Tk), sm_scale * LOG2E
    delta = tr._empty((B, H, Tq), torch.float32, q.device)
    # stand-in pointers where positions are None (never read or written: ROTATE is False)
    pq, dpq = (pos_q, dpos_q) if pos_q is not None else (delta, delta)
    pk, dpk = (pos_k, dpos_k) if pos_k is not None else (delta, delta)
    with device_guard(q):
        rotate = [(x, p) for x, p in ((q, pos_q), (k, pos_k)) if p is not None]
        rotated = iter(rotary([x for x, _ in rotate], [p for _, p in rotate], freq) if rotate else [])
        qr = next(rotated) if pos_q is not None else q
        kr = next(rotated) if pos_k is not None else k
        n = triton.cdiv(Tq, ROW_BLOCK)
        _attn_bwd_delta_kernel[(B * H * n,)](o, do, delta, *_st(o), *_st(do), H, Tq, n, D=D, BLOCK_T=ROW_BLOCK, **_PIN)
        bm, bn, warps, stages = blocks["dkdv"]
        bm, bn = fit(bm, Tq), fit(bn, Tk)
        _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(Tk, bn))](
            qr, kr, v, k, pk, freq, do, lse, delta, dk, dv, dpk,
            *_st(qr), *_st(kr), *_st(v), *_st(k), *_st(pk), *_st(do), *_st(dk), *_st(dv),
            H, Tq, Tk, shift, qk_scale, sm_scale, D=D, BLOCK_M=bm, BLOCK_N=bn, ROTATE=pos_k is not None,
            num_warps=warps, num_stages=stages, **_PIN, **opts)
        bm, bn, warps, stages = blocks["dq"]
        bm, bn = fit(bm, Tq), fit(bn, Tk)
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(Tq, bm))](
            qr, kr, v, q, pq, freq, do, lse, delta, dq, dpq,
            *_st(qr), *_st(kr), *_st(v), *_st(q), *_st(pq), *_st(do), *_st(dq),
            H, Tq, Tk, shift, qk_scale, sm_scale, D=D, BLOCK_M=bm, BLOCK_N=bn, ROTATE=pos_q is not None,
            num_warps=warps, num_stages=stages, **_PIN, **opts)
    return dq, dk, dv, dpos_q, dpos_k


# ----- the fused kernels as custom ops (see repo_kernels/ops.py for the rotation kernel's) -----
Tensor = torch.Tensor


@torch.library.custom_op("nanorepo::flash_fwd", mutates_args=())
def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, pos_q: Optional[Tensor], pos_k: Optional[Tensor], freq: Tensor,
               causal: bool, sm_scale: float) -> tuple[Tensor, Tensor]:
    """Fused attention forward: (o, log-sum-exp in base 2, float32 [B, H, Tq])."""
    return attn_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale)


@_flash_fwd.register_fake
def _(q, k, v, pos_q, pos_k, freq, causal, sm_scale):
    return tr.fwd_allocs(tr._unit_stride(q))


@torch.library.custom_op("nanorepo::flash_bwd", mutates_args=())
def _flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pos_q: Optional[Tensor],
               pos_k: Optional[Tensor], freq: Tensor, causal: bool,
               sm_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dpos_q, dpos_k); dpos empty where the positions are None."""
    return attn_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale)


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale):
    return tr.bwd_allocs(*(tr._unit_stride(x) for x in (q, k, v)), pos_q, pos_k)


def _flash_setup(ctx, inputs, output):
    q, k, v, pos_q, pos_k, freq, causal, sm_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], pos_q, pos_k, freq)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _flash_backward(ctx, do, _dlse):
    q, k, v, o, lse, pos_q, pos_k, freq = ctx.saved_tensors
    dq, dk, dv, dpq, dpk = _flash_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, ctx.causal, ctx.sm_scale)
    needs = ctx.needs_input_grad
    return dq, dk, dv, dpq if needs[3] else None, dpk if needs[4] else None, None, None, None


_flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [x.to(device) for x in (q, k, v, pos, pos)]
    for backend in BACKENDS[1:]:
        error = ops._unsupported(backend, *inputs, f) if backend != "torch" else None
        if error is not None:
            print(f"{backend:6s} not run: {error}")
            continue
        out = repo_attention(*inputs, theta=10000.0, backend=backend)
        print(f"{backend:6s} ({device}): max |out - float64 reference| = {(out.double().cpu() - ref).abs().max():.2e}")
