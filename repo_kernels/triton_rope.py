"""
The Triton side shared by rope_kernel.py's backends "triton" (fused flash attention with the
rotation inside, whose kernels live in rope_kernel.py) and "rotary" (one rotation kernel in front of
F.scaled_dot_product_attention, repo_kernels/ops.py): the rotation kernel and its launcher, the in-kernel
angle and load/store helpers, the buffers the kernels write, and the per-architecture launch configs
that "auto" may use. Nothing here is autograd-aware.

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
    return HAVE_TRITON and type(_rotary_kernel).__name__ == "InterpretedFunction"


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
