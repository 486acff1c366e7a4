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
    "triton"  fused flash-attention kernels with the rotation inside (rope_triton.py).
    "auto"    "triton" where its launch configs were verified for the device (auto_backend), else
              "rotary" on CUDA, "torch" elsewhere.
The Triton backends are torch.library custom ops: torch.compile(fullgraph=True) traces through them.
They run on CUDA, or on the CPU with TRITON_INTERPRET=1 set before triton is imported.

Because q and k carry their own angles, <R(a_t) q, R(a_s) k> = <q, R(a_s - a_t) k>: attention
only sees position differences, so adding a constant to all positions changes nothing.

    python rope_kernel.py                     # checks every backend it can run against float64
    TRITON_INTERPRET=1 python rope_kernel.py  # ... the Triton ones on the CPU too
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

import rope_triton
from rope_triton import HAVE_TRITON, INT32_MAX, SHARED_LIMIT, arch_blocks, fit

BACKENDS = ("auto", "torch", "triton", "rotary")
ROTARY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROTARY_HEAD_DIMS = (16, 32, 64, 128, 256)  # D/2 a power of two (tl.arange)


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


def _unsupported(backend, q, k, v, pos_q, pos_k, inv_freq):
    """The error backend "triton" or "rotary" would raise for these inputs, or None."""
    D = q.shape[-1]
    dims = ROTARY_HEAD_DIMS if backend == "rotary" else rope_triton.FUSED_HEAD_DIMS
    if not HAVE_TRITON:
        return RuntimeError(f"backend={backend!r}: Triton is not installed (use backend='torch')")
    if q.dtype not in ROTARY_DTYPES:  # the fused kernels take the same three
        return TypeError(f"backend={backend!r}: q, k, v must be float32, float16 or bfloat16, got {q.dtype}")
    if D not in dims:
        return ValueError(f"backend={backend!r}: head dim {D} is not supported (supported: "
                          f"{', '.join(map(str, dims))}; use backend='torch')")
    for name, p in (("pos_q", pos_q), ("pos_k", pos_k)):
        if p is not None and p.dtype != torch.float32:
            return TypeError(f"backend={backend!r}: {name} must be float32, got {p.dtype}")
    if inv_freq.shape != (D // 2,):
        return ValueError(f"inv_freq must have shape ({D // 2},), got {tuple(inv_freq.shape)}")
    if q.numel() == 0 or k.shape[2] == 0:
        return ValueError(f"backend={backend!r}: empty input")
    if backend == "triton":
        # the fused kernels form token offsets in int32 (64-bit addresses in their inner loops would
        # cost registers); the rotation kernel uses int64
        big = max(rope_triton.max_offset(t) for t in (q, k, v))
        if big > INT32_MAX:
            return ValueError(f"backend='triton': a (batch, head) of q, k or v spans {big + 1:,} elements "
                              f"(token * stride), beyond the kernels' int32 offsets (2^31); use "
                              f"backend='rotary', a contiguous [B, H, T, D] layout or shorter sequences")
        if q.shape[2] > 65535 * 16 or k.shape[2] > 65535 * 16:  # token blocks are the second grid axis
            return ValueError("backend='triton': more than 1,048,560 tokens; use backend='rotary'")
    if not (q.is_cuda or rope_triton.interpreting()):
        return RuntimeError(f"backend={backend!r}: tensors are on {q.device}; the kernels need CUDA tensors, or "
                            "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU")
    return None


def auto_backend(capability, shared_limit, dtype, D, Tq, Tk, fits_int32=True):
    """The backend "auto" runs on a CUDA device of this compute capability and per-block shared memory
    (capability None: not a CUDA device) for inputs the Triton backends accept. "triton" only with a
    launch config that tests/offline_compile.py compiled for this architecture: no shrunken blocks
    (short or decoding sequences), 16-bit inputs, D 64 or 128, int32 offsets. Other CUDA devices of
    compute capability >= 8.0 get "rotary" (one elementwise kernel, then the vendor's attention)."""
    if capability is None:
        return "torch"
    capability = tuple(capability)
    blocks = arch_blocks(capability, dtype, D)
    if (blocks and shared_limit >= SHARED_LIMIT[capability] and fits_int32
            and all(fit(bm, Tq) == bm and fit(bn, Tk) == bn for bm, bn, _, _ in blocks.values())):
        return "triton"
    return "rotary" if capability >= (8, 0) and dtype in ROTARY_DTYPES and D in ROTARY_HEAD_DIMS else "torch"


@torch.compiler.assume_constant_result  # torch.compile bakes it in instead of tracing the device query
def _device_arch(device):
    """(major, minor, shared memory per block) of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor, props.shared_memory_per_block_optin


def _auto(q, k, v, pos_q, pos_k, inv_freq):
    arch = _device_arch(q.device)
    if arch is None or _unsupported("rotary", q, k, v, pos_q, pos_k, inv_freq) is not None:
        return "torch"
    fused_ok = _unsupported("triton", q, k, v, pos_q, pos_k, inv_freq) is None
    return auto_backend(arch[:2], arch[2], q.dtype, q.shape[-1], q.shape[2], k.shape[2], fused_ok)


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
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    causal = bool(causal)
    if backend == "auto":
        backend = _auto(q, k, v, pos_q, pos_k, inv_freq)
    if backend == "torch":
        q = apply_rope(q, pos_q, inv_freq) if pos_q is not None else q
        k = apply_rope(k, pos_k, inv_freq) if pos_k is not None else k
        return _sdpa(q, k, v, causal, sm_scale)
    error = _unsupported(backend, q, k, v, pos_q, pos_k, inv_freq)
    if error is not None:
        raise error
    freq = inv_freq.to(device=q.device, dtype=torch.float64).contiguous()
    if backend == "triton":
        return _flash_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale)[0]
    if pos_q is not None and pos_k is not None:
        q, k = _rotary_fwd(q, pos_q, k, pos_k, freq)
    elif pos_q is not None or pos_k is not None:
        rotated = _rotary_fwd(q if pos_q is not None else k, pos_q if pos_q is not None else pos_k, None, None, freq)[0]
        q, k = (rotated, k) if pos_q is not None else (q, rotated)
    return _sdpa(q, k, v, causal, sm_scale)


def _sdpa(q, k, v, causal, sm_scale):
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == 1:  # a single query attends to every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale)
    # queries are the last Tq tokens: query i sees keys j <= i + (Tk - Tq)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)


# ------------------------------------------------------------------------------------------------
# Custom ops. torch.compile sees each Triton launcher as one opaque node with a fake (shape-only)
# implementation and an autograd formula, so a model compiles into one graph whatever the backend.
# Absent optional outputs (no positions on a side) are empty tensors: an op cannot return None or
# an input.
# ------------------------------------------------------------------------------------------------
Tensor = torch.Tensor
_EMPTY = (0,)


@torch.library.custom_op("nanorepo::rotary_fwd", mutates_args=())
def _rotary_fwd(x: Tensor, pos: Tensor, x2: Optional[Tensor], pos2: Optional[Tensor],
                freq: Tensor) -> tuple[Tensor, Tensor]:
    """R(pos f) x and R(pos2 f) x2 in one launch (x2 None: the second output is empty)."""
    if x2 is None:
        return rope_triton.rotary([x], [pos], freq)[0], x.new_empty(_EMPTY)
    y, y2 = rope_triton.rotary([x, x2], [pos, pos2], freq)
    return y, y2


@_rotary_fwd.register_fake
def _(x, pos, x2, pos2, freq):
    return rope_triton._out_like(x), rope_triton._out_like(x2) if x2 is not None else x.new_empty(_EMPTY)


@torch.library.custom_op("nanorepo::rotary_bwd", mutates_args=())
def _rotary_bwd(g: Tensor, y: Tensor, pos: Tensor, g2: Optional[Tensor], y2: Optional[Tensor],
                pos2: Optional[Tensor], freq: Tensor, need_dpos: bool,
                need_dpos2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R(-pos f) g, dpos, R(-pos2 f) g2, dpos2) from the rotated outputs y, y2 of the forward."""
    two = g2 is not None
    out = rope_triton.rotary([g, g2] if two else [g], [pos, pos2] if two else [pos], freq, ys=[y, y2] if two else [y],
                             needs=[need_dpos, need_dpos2] if two else [need_dpos])
    empty = lambda t: t if t is not None else g.new_empty(_EMPTY, dtype=torch.float32)
    (dx, dpos), (dx2, dpos2) = out[0], out[1] if two else (g.new_empty(_EMPTY), None)
    return dx, empty(dpos), dx2, empty(dpos2)


@_rotary_bwd.register_fake
def _(g, y, pos, g2, y2, pos2, freq, need_dpos, need_dpos2):
    dpos = lambda p, need: torch.empty(p.shape if need else _EMPTY, dtype=torch.float32, device=g.device)
    return (rope_triton._out_like(g), dpos(pos, need_dpos),
            rope_triton._out_like(g2) if g2 is not None else g.new_empty(_EMPTY), dpos(pos2, need_dpos2 and g2 is not None))


def _rotary_setup(ctx, inputs, output):
    x, pos, x2, pos2, freq = inputs
    # the rotated outputs are what SDPA keeps for its own backward: saving them costs no memory
    ctx.save_for_backward(output[0], pos, output[1] if x2 is not None else None, pos2, freq)


def _rotary_backward(ctx, gy, gy2):
    y, pos, y2, pos2, freq = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dpos, dx2, dpos2 = _rotary_bwd(gy, y, pos, gy2 if y2 is not None else None, y2, pos2, freq, needs[1],
                                       needs[3] and y2 is not None)
    return (dx, dpos if needs[1] else None, dx2 if y2 is not None else None, dpos2 if needs[3] else None, None)


_rotary_fwd.register_autograd(_rotary_backward, setup_context=_rotary_setup)


@torch.library.custom_op("nanorepo::flash_fwd", mutates_args=())
def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, pos_q: Optional[Tensor], pos_k: Optional[Tensor], freq: Tensor,
               causal: bool, sm_scale: float) -> tuple[Tensor, Tensor]:
    """Fused attention forward: (o, log-sum-exp in base 2, float32 [B, H, Tq])."""
    return rope_triton.attn_fwd(q, k, v, pos_q, pos_k, freq, causal, sm_scale)


@_flash_fwd.register_fake
def _(q, k, v, pos_q, pos_k, freq, causal, sm_scale):
    return rope_triton.fwd_allocs(rope_triton._unit_stride(q))


@torch.library.custom_op("nanorepo::flash_bwd", mutates_args=())
def _flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pos_q: Optional[Tensor],
               pos_k: Optional[Tensor], freq: Tensor, causal: bool,
               sm_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dpos_q, dpos_k); dpos empty where the positions are None."""
    return rope_triton.attn_bwd(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale)


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, pos_q, pos_k, freq, causal, sm_scale):
    return rope_triton.bwd_allocs(*(rope_triton._unit_stride(x) for x in (q, k, v)), pos_q, pos_k)


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
        error = _unsupported(backend, *inputs, f) if backend != "torch" else None
        if error is not None:
            print(f"{backend:6s} not run: {error}")
            continue
        out = repo_attention(*inputs, theta=10000.0, backend=backend)
        print(f"{backend:6s} ({device}): max |out - float64 reference| = {(out.double().cpu() - ref).abs().max():.2e}")
