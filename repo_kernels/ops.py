"""
What stands between repo_attention (rope_kernel.py) and the Triton launchers: the input checks,
the reasons a Triton backend cannot run some inputs, the backend "auto" picks for a device, the
rotation kernel wrapped as a torch.library custom op (so torch.compile traces through it) and the
"rotary" backend built from it: rotate q and k in one launch, then F.scaled_dot_product_attention.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from repo_kernels import auto_table, triton_rope
from repo_kernels.triton_rope import HAVE_TRITON, INT32_MAX, SHARED_LIMIT, arch_blocks, fit

BACKENDS = ("auto", "torch", "triton", "rotary")
ROTARY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROTARY_HEAD_DIMS = (16, 32, 64, 128, 256)  # D/2 a power of two (tl.arange)


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
    dims = ROTARY_HEAD_DIMS if backend == "rotary" else triton_rope.FUSED_HEAD_DIMS
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
        big = max(triton_rope.max_offset(t) for t in (q, k, v))
        if big > INT32_MAX:
            return ValueError(f"backend='triton': a (batch, head) of q, k or v spans {big + 1:,} elements "
                              f"(token * stride), beyond the kernels' int32 offsets (2^31); use "
                              f"backend='rotary', a contiguous [B, H, T, D] layout or shorter sequences")
        if q.shape[2] > 65535 * 16 or k.shape[2] > 65535 * 16:  # token blocks are the second grid axis
            return ValueError("backend='triton': more than 1,048,560 tokens; use backend='rotary'")
    if not (q.is_cuda or triton_rope.interpreting()):
        return RuntimeError(f"backend={backend!r}: tensors are on {q.device}; the kernels need CUDA tensors, or "
                            "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU")
    if not q.is_cuda and interpreter_problem():
        return RuntimeError(f"backend={backend!r}: {interpreter_problem()}")
    return None


def interpreter_problem(triton_version=None, numpy_version=None):
    """Why Triton's CPU interpreter cannot run the kernels with these versions (default: the installed
    ones), or None: before Triton 3.7 it calls int() on one-element arrays, an error since numpy 2.4."""
    import numpy
    triton_version = triton_version or triton_rope.triton.__version__
    numpy_version = numpy_version or numpy.__version__
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails with numpy {numpy_version} (int() of a one-element "
                "array, an error since numpy 2.4): pip install 'numpy<2.4' for CPU runs (a GPU does not need it)")
    return None


def auto_choice(capability, shared_limit, dtype, D, Tq, Tk, fits_int32=True):
    """(backend, SDPA backend "rotary" tries first or None, where the choice comes from) that "auto" runs
    on a CUDA device of this compute capability and per-block shared memory (capability None: not a
    CUDA device), for inputs the Triton backends accept. The choice is the table of winners a GPU
    measured, else the estimate (repo_kernels/auto_table.py: rotary + the fastest SDPA backend).
    "triton" only where a GPU measured it fastest and a launch config that tests/offline_compile.py
    compiled for this architecture runs the shape unshrunk: 16-bit inputs, D 64 or 128, int32 offsets,
    sequences long enough (not decoding). Compute capability below 8.0: "torch"."""
    if capability is None:
        return "torch", None, "not a CUDA device"
    capability = tuple(capability)
    if not (capability >= (8, 0) and dtype in ROTARY_DTYPES and D in ROTARY_HEAD_DIMS):
        return "torch", None, "no Triton backend for this device, dtype or head dim"
    choice, source = auto_table.choose(capability, dtype, D, Tk)
    if choice == "triton":
        blocks = arch_blocks(capability, dtype, D)  # None for float32: its tiles spill, never "auto"'s
        if (blocks and shared_limit >= SHARED_LIMIT[capability] and fits_int32
                and all(fit(bm, Tq) == bm and fit(bn, Tk) == bn for bm, bn, _, _ in blocks.values())):
            return "triton", None, source
        choice, source = auto_table.estimate(capability), "estimated (the fused kernels' configs do not fit)"
    return "rotary", choice.partition("+")[2], source


def auto_backend(capability, shared_limit, dtype, D, Tq, Tk, fits_int32=True):
    """The backend "auto" runs: auto_choice's first element."""
    return auto_choice(capability, shared_limit, dtype, D, Tq, Tk, fits_int32)[0]


@torch.compiler.assume_constant_result  # torch.compile bakes it in instead of tracing the device query
def _device_arch(device):
    """(major, minor, shared memory per block) of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor, props.shared_memory_per_block_optin


def _auto_choice(q, k, v, pos_q, pos_k, inv_freq):
    """(backend, SDPA preference) of "auto" for these inputs."""
    arch = _device_arch(q.device)
    if arch is None or _unsupported("rotary", q, k, v, pos_q, pos_k, inv_freq) is not None:
        return "torch", None
    fused_ok = _unsupported("triton", q, k, v, pos_q, pos_k, inv_freq) is None
    backend, sdpa, _ = auto_choice(arch[:2], arch[2], q.dtype, q.shape[-1], q.shape[2], k.shape[2], fused_ok)
    return backend, sdpa


def _auto(q, k, v, pos_q, pos_k, inv_freq):
    return _auto_choice(q, k, v, pos_q, pos_k, inv_freq)[0]


_SDPA_BACKENDS = dict(flash="FLASH_ATTENTION", cudnn="CUDNN_ATTENTION", efficient="EFFICIENT_ATTENTION")


@torch.compiler.assume_constant_result  # a constant of the compiled graph, like the device
def _enabled_sdpa():
    """Names of the SDPA backends enabled now, in their priority order."""
    return tuple(b.name for b in torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True))


def _sdpa(q, k, v, causal, sm_scale, prefer=None):
    """F.scaled_dot_product_attention; prefer ("flash", "cudnn", "efficient" or None) moves that backend
    to the front of SDPA's priority list while the other enabled ones stay behind it, for the shapes
    it cannot run. A backend the user disabled stays disabled."""
    first = _SDPA_BACKENDS.get(prefer)
    enabled = _enabled_sdpa() if first else ()
    if first in enabled and enabled[0] != first:
        order = [getattr(SDPBackend, n) for n in (first,) + tuple(n for n in enabled if n != first)]
        with sdpa_kernel(order, set_priority=True):
            return _sdpa(q, k, v, causal, sm_scale)
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
        return triton_rope.rotary([x], [pos], freq)[0], x.new_empty(_EMPTY)
    y, y2 = triton_rope.rotary([x, x2], [pos, pos2], freq)
    return y, y2


@_rotary_fwd.register_fake
def _(x, pos, x2, pos2, freq):
    return triton_rope._out_like(x), triton_rope._out_like(x2) if x2 is not None else x.new_empty(_EMPTY)


@torch.library.custom_op("nanorepo::rotary_bwd", mutates_args=())
def _rotary_bwd(g: Tensor, y: Tensor, pos: Tensor, g2: Optional[Tensor], y2: Optional[Tensor],
                pos2: Optional[Tensor], freq: Tensor, need_dpos: bool,
                need_dpos2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R(-pos f) g, dpos, R(-pos2 f) g2, dpos2) from the rotated outputs y, y2 of the forward."""
    two = g2 is not None
    out = triton_rope.rotary([g, g2] if two else [g], [pos, pos2] if two else [pos], freq, ys=[y, y2] if two else [y],
                             needs=[need_dpos, need_dpos2] if two else [need_dpos])
    empty = lambda t: t if t is not None else g.new_empty(_EMPTY, dtype=torch.float32)
    (dx, dpos), (dx2, dpos2) = out[0], out[1] if two else (g.new_empty(_EMPTY), None)
    return dx, empty(dpos), dx2, empty(dpos2)


@_rotary_bwd.register_fake
def _(g, y, pos, g2, y2, pos2, freq, need_dpos, need_dpos2):
    dpos = lambda p, need: torch.empty(p.shape if need else _EMPTY, dtype=torch.float32, device=g.device)
    return (triton_rope._out_like(g), dpos(pos, need_dpos),
            triton_rope._out_like(g2) if g2 is not None else g.new_empty(_EMPTY), dpos(pos2, need_dpos2 and g2 is not None))


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


def rotary_attention(q, k, v, pos_q, pos_k, freq, causal, sm_scale, sdpa=None):
    """Backend "rotary": q and k rotated by one kernel launch (either side may be None: not rotated),
    then the vendor's attention (sdpa: the SDPA backend to try first, see _sdpa)."""
    if pos_q is not None and pos_k is not None:
        q, k = _rotary_fwd(q, pos_q, k, pos_k, freq)
    elif pos_q is not None or pos_k is not None:
        rotated = _rotary_fwd(q if pos_q is not None else k, pos_q if pos_q is not None else pos_k, None, None, freq)[0]
        q, k = (rotated, k) if pos_q is not None else (q, rotated)
    return _sdpa(q, k, v, causal, sm_scale, sdpa)
