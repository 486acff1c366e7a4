"""
Triton kernels behind rope_kernel.py's backends "triton" (fused flash attention with the rotation
inside) and "rotary" (one rotation kernel in front of F.scaled_dot_product_attention), their host
launchers and the per-architecture launch configs that "auto" may use. rope_kernel.py wraps the
launchers in torch.library custom ops; nothing here is autograd-aware.

Layout: q, k, v, o, dq, ... are [B, H, T, D] with any (batch, head, token) strides and a contiguous
head dim; positions [B, H, T] float32 with any strides (RoPE layers pass stride-0 broadcasts);
frequencies float64 [D/2]; log-sum-exp, Delta and position gradients contiguous [B, H, T] float32.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported); tests/offline_compile.py compiles them for GPUs on a CPU-only machine.
Written for Triton 3.6 to 3.9: plain pointer arithmetic, no block pointers.
"""
import contextlib
import math
import types

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # e.g. on macOS: the reference path still works, the kernel definitions stay inert
    HAVE_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, n - 1).bit_length())
    tl = types.SimpleNamespace(constexpr=None)

LOG2E = math.log2(math.e)
INT32_MAX = 2**31 - 1

# ------------------------------------------------------------------------------------------------
# Launch configs. (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per fused kernel, for the
# 16-bit dtypes at D = 64 and 128, per architecture. tests/offline_compile.py compiles exactly these
# (python tests/offline_compile.py sm_80 sm_86 sm_89 sm_90) and fails on a register spill or on more
# shared memory than SHARED_LIMIT allows one block; README shows its table. They are sized offline,
# not tuned by measurement. float16 and bfloat16 share them (same tile bytes).
# ------------------------------------------------------------------------------------------------
SHARED_LIMIT = {  # bytes of shared memory one block may opt in to (CUDA programming guide, table of
    (8, 0): 166912,  # compute capabilities: 163 KiB on sm_80 (A100), 99 KiB on sm_86 (RTX 30xx,
    (8, 6): 101376,  # A10, A40) and sm_89 (L4, L40S, RTX 40xx), 227 KiB on sm_90 (H100, H200)
    (8, 9): 101376,
    (9, 0): 232448,
}
_ARCH_BLOCKS = {
    (8, 0): {64: dict(fwd=(128, 64, 8, 3), dkdv=(64, 32, 4, 3), dq=(64, 32, 4, 3)),
             128: dict(fwd=(128, 64, 8, 3), dkdv=(64, 64, 8, 2), dq=(64, 64, 8, 2))},
    (8, 6): {64: dict(fwd=(128, 64, 8, 3), dkdv=(64, 32, 4, 2), dq=(64, 32, 4, 2)),
             128: dict(fwd=(128, 64, 8, 2), dkdv=(64, 32, 4, 2), dq=(64, 32, 4, 2))},
    (9, 0): {64: dict(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
             128: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 64, 8, 3))},
}
_ARCH_BLOCKS[(8, 9)] = _ARCH_BLOCKS[(8, 6)]  # same per-block shared memory and register file
ARCHS = {f"sm_{a}{b}": (a, b) for a, b in SHARED_LIMIT}
FUSED_DTYPES = (torch.float16, torch.bfloat16)
# the fused kernels accept more than "auto" uses: float32 (exact IEEE dots, small tiles: a correctness
# path), D = 32, and any architecture Triton compiles for (with the sm_80 configs)
FUSED_HEAD_DIMS = (32, 64, 128)
_BLOCKS_FP32 = dict(fwd=(64, 32, 8, 2), dkdv=(16, 16, 4, 2), dq=(32, 16, 4, 2))
# Under the interpreter small blocks make small test shapes span many blocks, diagonals and ragged
# tails, and every tile is float32 (its bfloat16 arithmetic is broken).
INTERPRET_BLOCKS = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
ROW_BLOCK = 32  # tokens per program of the row-wise kernels (rotation, Delta)
# Triton 3.10 turns FMA contraction off by default: pin it, so numerics and speed do not change silently
_PIN = dict(enable_fp_fusion=True)


def arch_blocks(capability, dtype, D):
    """The verified fused-kernel configs for (capability, dtype, D), or None."""
    if capability is None or dtype not in FUSED_DTYPES:
        return None
    return _ARCH_BLOCKS.get(tuple(capability), {}).get(D)


def fit(block, T):
    """Shrink a block to the sequence (decoding has Tq = 1): powers of two, at least 16 for tl.dot."""
    return min(block, max(16, triton.next_power_of_2(T)))


def interpreting() -> bool:
    # @triton.jit reads TRITON_INTERPRET when the kernels are defined, i.e. when this module is imported
    return HAVE_TRITON and type(_attn_fwd_kernel).__name__ == "InterpretedFunction"


def launch_config(x):
    """(blocks, dot options) for the fused kernels on x's device."""
    if interpreting():
        return INTERPRET_BLOCKS, dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x.dtype]
    # float32 inputs follow PyTorch's matmul convention: exact float32 unless TF32 is allowed
    precision = "tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if x.dtype == torch.float32:
        return _BLOCKS_FP32, dict(DOT_DTYPE=dot, PRECISION=precision)
    blocks = arch_blocks(_capability(x), x.dtype, x.shape[-1]) or _ARCH_BLOCKS[(8, 0)][max(64, x.shape[-1])]
    return blocks, dict(DOT_DTYPE=dot, PRECISION=precision)


def _capability(x):
    """x's compute capability (tests/offline_compile.py replaces this for its meta tensors)."""
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


def device_guard(x):
    """Launch on x's GPU, not the current one (a process with --device=cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def max_offset(x):
    """The largest element offset a kernel forms inside one (batch, head) of x: token * stride + d."""
    return (x.shape[2] - 1) * x.stride(2) + x.shape[3] - 1 if x.shape[2] else 0


# ------------------------------------------------------------------------------------------------
# Angles and rotation helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _cos_sin(pos, f):
    """cos and sin of the angles pos[:, None] * f[None, :] as float32 (f: float64 frequencies).

    The angle is formed and reduced in float64, a = n pi/2 + r with |r| <= pi/4: at |pos| ~ 1e5 a float32
    product alone is off by ~5e-3 rad. sin r and cos r are then short Taylor polynomials in float32
    (truncation < 2e-9, rounding ~1e-7) instead of tl.sin/tl.cos, whose libdevice code carries a
    large-argument slow path (a stack frame, branches) that the reduced angles never need."""
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
def _load_halves(P, idx, stride, ok, D: tl.constexpr):
    """The two halves [len(idx), D/2] of the rotation pairs of rows idx; masked rows read as zero."""
    ptrs = P + idx[:, None] * stride + tl.arange(0, D // 2)[None, :]
    return tl.load(ptrs, mask=ok[:, None], other=0.0), tl.load(ptrs + D // 2, mask=ok[:, None], other=0.0)


@triton.jit
def _store_halves(P, idx, stride, ok, y1, y2, D: tl.constexpr):
    ptrs = P + idx[:, None] * stride + tl.arange(0, D // 2)[None, :]
    tl.store(ptrs, y1.to(P.dtype.element_ty), mask=ok[:, None])
    tl.store(ptrs + D // 2, y2.to(P.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _rotary_rows(S, ssb, ssh, sst, O, sob, soh, sot, X, sxb, sxh, sxt, Pos, spb, sph, spt, dPos, Freq,
                 b, h, H, T, blk, D: tl.constexpr, BLOCK_T: tl.constexpr, BACKWARD: tl.constexpr,
                 NEED_DPOS: tl.constexpr):
    """BLOCK_T tokens of one (batch, head). Forward: O = R(a) S. Backward (S = dL/dy, X = y, the rotated
    tensor the forward returned): O = R(-a) S and dPos = sum_i f_i (s2 y1 - s1 y2), dL/da_i summed
    over the frequencies (y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, so dy1/da = -y2, dy2/da = y1)."""
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    r64 = rows.to(tl.int64)  # token * stride can pass 2^31 on long sequences
    s1, s2 = _load_halves(S + b * ssb + h * ssh, r64, sst, ok, D)
    s1, s2 = s1.to(tl.float32), s2.to(tl.float32)
    f = tl.load(Freq + tl.arange(0, D // 2))
    c, s = _cos_sin(tl.load(Pos + b * spb + h * sph + r64 * spt, mask=ok, other=0.0), f)
    if BACKWARD:
        s = -s
    _store_halves(O + b * sob + h * soh, r64, sot, ok, s1 * c - s2 * s, s2 * c + s1 * s, D)
    if NEED_DPOS:
        y1, y2 = _load_halves(X + b * sxb + h * sxh, r64, sxt, ok, D)
        dpos = tl.sum((s2 * y1.to(tl.float32) - s1 * y2.to(tl.float32)) * f.to(tl.float32)[None, :], 1)
        tl.store(dPos + (b * H + h) * T + r64, dpos, mask=ok)


@triton.jit
def _rotary_kernel(S1, ss1b, ss1h, ss1t, O1, so1b, so1h, so1t, X1, sx1b, sx1h, sx1t, P1, sp1b, sp1h, sp1t, dP1, T1,
                   S2, ss2b, ss2h, ss2t, O2, so2b, so2h, so2t, X2, sx2b, sx2h, sx2t, P2, sp2b, sp2h, sp2t, dP2, T2,
                   Freq, H, n1, n2, D: tl.constexpr, BLOCK_T: tl.constexpr, BACKWARD: tl.constexpr,
                   NEED1: tl.constexpr, NEED2: tl.constexpr):
    """q and k (or their gradients) in one launch: a flat grid of (batch * head) x (n1 + n2) token
    blocks, the first n1 of each (batch, head) for tensor 1, the other n2 for tensor 2."""
    pid = tl.program_id(0)
    bh, blk = pid // (n1 + n2), pid % (n1 + n2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    if blk < n1:
        _rotary_rows(S1, ss1b, ss1h, ss1t, O1, so1b, so1h, so1t, X1, sx1b, sx1h, sx1t, P1, sp1b, sp1h, sp1t, dP1,
                     Freq, b, h, H, T1, blk, D, BLOCK_T, BACKWARD, NEED1)
    else:
        _rotary_rows(S2, ss2b, ss2h, ss2t, O2, so2b, so2h, so2t, X2, sx2b, sx2h, sx2t, P2, sp2b, sp2h, sp2t, dP2,
                     Freq, b, h, H, T2, blk - n1, D, BLOCK_T, BACKWARD, NEED2)


def _empty(shape, dtype, device):
    """Every buffer the kernels write comes from here or _out_like (the tests swap in NaN-guarded ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _out_like(x):
    """A fresh tensor with x's layout where the kernels allow it (model.py's transposed views then
    reshape without a copy), contiguous otherwise. The custom ops' fake functions use it too."""
    return torch.empty_like(x) if x.stride(-1) == 1 else _empty(x.shape, x.dtype, x.device)


def rotary(srcs, poss, freq, ys=None, needs=None):
    """Rotate one or two tensors [B, H, T_i, D] in one launch. Forward (ys None): returns R(pos f) src
    per tensor. Backward (srcs = gradients of the rotated tensors ys): returns (R(-pos f) src, dpos
    or None) per tensor, dpos where needs[i]."""
    backward = ys is not None
    srcs = [s if s.stride(-1) == 1 else s.contiguous() for s in srcs]
    B, H, _, D = srcs[0].shape
    outs = [_out_like(s) for s in srcs]
    needs = list(needs) if backward else [False] * len(srcs)
    dposs = [_empty(s.shape[:3], torch.float32, s.device) if n else None
             for s, n in zip(srcs, needs)]
    args, blocks = [], []
    for i in range(2):
        j = min(i, len(srcs) - 1)  # a single tensor: side 2 repeats side 1 with no blocks
        s, o, p = srcs[j], outs[j], poss[j]
        x = ys[j] if backward and needs[j] else s
        args += [s, *s.stride()[:3], o, *o.stride()[:3], x, *x.stride()[:3], p, *p.stride(), dposs[j] if needs[j]
                 else p, s.shape[2]]
        blocks.append(triton.cdiv(s.shape[2], ROW_BLOCK) if i < len(srcs) else 0)
    with device_guard(srcs[0]):
        _rotary_kernel[(B * H * (blocks[0] + blocks[1]),)](
            *args, freq, H, *blocks, D=D, BLOCK_T=ROW_BLOCK, BACKWARD=backward, NEED1=needs[0],
            NEED2=needs[-1] if len(srcs) == 2 else False, **_PIN)
    return list(zip(outs, dposs)) if backward else outs


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


def _st(t):
    """Strides of the (batch, head, token) dims; kernels assume the head dim is contiguous."""
    return t.stride()[:3]


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _shift(causal, Tq, Tk):
    """Query i sees key j iff j <= i + shift: bottom-right causal alignment, or every key."""
    return Tk - Tq if causal else Tk + 256


def fwd_allocs(q):
    """o and the log-sum-exp of the fused forward (shared with the custom op's fake function)."""
    return _out_like(q), _empty(q.shape[:3], torch.float32, q.device)


def bwd_allocs(q, k, v, pos_q, pos_k):
    """dq, dk, dv, dpos_q, dpos_k of the fused backward, dpos empty where the positions are None."""
    dpos = lambda p: _empty(p.shape if p is not None else (0,), torch.float32, q.device)
    return _out_like(q), _out_like(k), _out_like(v), dpos(pos_q), dpos(pos_k)


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
    delta = _empty((B, H, Tq), torch.float32, q.device)
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
