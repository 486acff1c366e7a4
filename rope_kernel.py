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
GPT-NeoX convention), cast back, then F.scaled_dot_product_attention. "auto" uses the Triton
kernels on CUDA and this reference elsewhere.

Because q and k carry their own angles, <R(a_t) q, R(a_s) k> = <q, R(a_s - a_t) k>: attention
only sees position differences, so adding a constant to all positions changes nothing.

    python rope_kernel.py      # checks the reference against a float64 computation
"""
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


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
        backend = "triton" if q.is_cuda and triton_available() else "torch"
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


def triton_available() -> bool:
    return False


def _triton_attention(q, k, v, pos_q, pos_k, inv_freq, causal, sm_scale):
    raise RuntimeError("backend='triton': the Triton continuous-RoPE kernels are not part of this build yet "
                       "(use backend='torch')")


if __name__ == "__main__":
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 50, 64
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pos = torch.randn(B, H, T) * 100
    out = repo_attention(q, k, v, pos, pos, theta=10000.0, backend="torch")
    # float64 reference straight from the definition: rotate pairs (x_i, x_{i+D/2}) by pos * f_i
    f = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    a = pos.double()[..., None] * f
    rot = lambda x: torch.cat((x[..., :D // 2] * a.cos() - x[..., D // 2:] * a.sin(),
                               x[..., D // 2:] * a.cos() + x[..., :D // 2] * a.sin()), -1)
    s = rot(q.double()) @ rot(k.double()).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = s.softmax(-1) @ v.double()
    print(f"max |torch path - float64 reference| = {(out.double() - ref).abs().max():.2e}")
