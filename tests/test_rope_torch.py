"""rope_kernel.py, PyTorch path: rotation and attention against float64 references built from the
definition, standard integer RoPE (transformers' implementation), the one-table rotation of
broadcast positions, invariances, bad input.

    python -m pytest -q tests/test_rope_torch.py
"""
import math

import pytest
import torch

from rope_kernel import apply_rope, repo_attention, rope_inv_freq


def ref_attention(q, k, v, pos_q, pos_k, theta, causal, scale=None):
    """Float64 attention, rotating the pairs (x_j, x_{j+D/2}) as complex numbers by exp(i pos f_j)."""
    D = q.shape[-1]
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rot(x, p):
        c = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * torch.exp(1j * p.double()[..., None] * f)
        return torch.cat((c.real, c.imag), -1)

    s = rot(q, pos_q) @ rot(k, pos_k).transpose(-1, -2) * (scale or 1 / math.sqrt(D))
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:  # query i is token Tk - Tq + i
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq).logical_not(), float("-inf"))
    return s.softmax(-1) @ v.double()


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("D,Tq,Tk,causal", [(64, 37, 37, True), (32, 37, 37, False), (64, 5, 37, True),
                                            (128, 1, 20, True), (64, 9, 30, False)])
def test_attention_matches_float64_reference(D, Tq, Tk, causal):
    B, H = 2, 3
    q, k, v = rand(B, H, Tq, D, seed=1), rand(B, H, Tk, D, seed=2), rand(B, H, Tk, D, seed=3)
    pq, pk = rand(B, H, Tq, seed=4) * 300, rand(B, H, Tk, seed=5) * 300
    out = repo_attention(q, k, v, pq, pk, theta=10000.0, causal=causal, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (B, H, Tq, D)
    assert (out.double() - ref_attention(q, k, v, pq, pk, 10000.0, causal)).abs().max() < 1e-4
    out = repo_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pq, pk, theta=10000.0, causal=causal,
                         sm_scale=0.3, backend="torch")
    ref = ref_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pq, pk, 10000.0, causal, scale=0.3)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() < 3e-2


def test_integer_positions_equal_standard_rope():
    """pos = 0..T-1 reproduces the standard table-based RoPE of transformers' OLMo-2."""
    olmo2 = pytest.importorskip("transformers.models.olmo2.modeling_olmo2")
    B, H, T, D, theta = 2, 4, 50, 64, 500000.0
    q, k, v = rand(B, H, T, D, seed=1), rand(B, H, T, D, seed=2), rand(B, H, T, D, seed=3)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * rope_inv_freq(D, theta).float()
    emb = torch.cat((freqs, freqs), -1)[None]
    q_std, k_std = olmo2.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    pos = torch.arange(T, dtype=torch.float32).expand(B, H, T)
    inv = rope_inv_freq(D, theta)
    assert torch.allclose(apply_rope(q, pos, inv), q_std, atol=1e-6)
    assert torch.allclose(apply_rope(k, pos, inv), k_std, atol=1e-6)
    expected = torch.nn.functional.scaled_dot_product_attention(q_std, k_std, v, is_causal=True)
    assert torch.allclose(repo_attention(q, k, v, pos, pos, theta=theta, backend="torch"), expected, atol=1e-5)


def test_rotation_gradients_float64():
    x = rand(2, 3, 7, 16, dtype=torch.float64).requires_grad_()
    pos = (rand(2, 3, 7, dtype=torch.float64, seed=1) * 50).requires_grad_()
    inv = rope_inv_freq(16, 100.0)
    assert torch.autograd.gradcheck(lambda x, p: apply_rope(x, p, inv), (x, pos))
    # dL/dz = sum_i f_i (g2 y1 - g1 y2), written out by hand
    g = rand(2, 3, 7, 16, dtype=torch.float64, seed=2)
    y = apply_rope(x, pos, inv)
    (y * g).sum().backward()
    y1, y2, g1, g2 = y[..., :8], y[..., 8:], g[..., :8], g[..., 8:]
    assert torch.allclose(pos.grad, ((g2 * y1 - g1 * y2) * inv).sum(-1))


def test_shift_invariance_and_zero_sum_position_gradient():
    B, H, T, D = 1, 2, 24, 32
    q, k, v = (rand(B, H, T, D, dtype=torch.float64, seed=s) for s in (1, 2, 3))
    pos = (rand(B, H, T, dtype=torch.float64, seed=4) * 40).requires_grad_()
    out = repo_attention(q, k, v, pos, pos, theta=100.0, backend="torch")
    shifted = repo_attention(q, k, v, pos + 1e4, pos + 1e4, theta=100.0, backend="torch")
    assert (out - shifted).abs().max() < 1e-9
    (out * rand(B, H, T, D, dtype=torch.float64, seed=5)).sum().backward()
    assert pos.grad.abs().max() > 1e-3
    assert pos.grad.sum(-1).abs().max() < 1e-10  # only differences of positions matter
    # float32 inputs, positions of magnitude 1e3: still shift invariant to float32 accuracy
    q32, k32, v32, p32 = q.float(), k.float(), v.float(), pos.detach().float()
    a = repo_attention(q32, k32, v32, p32, p32, theta=100.0, backend="torch")
    b = repo_attention(q32, k32, v32, p32 + 1000, p32 + 1000, theta=100.0, backend="torch")
    assert (a - b).abs().max() < 2e-3


def test_no_positions_means_no_rotation():
    q, k, v = (rand(1, 2, 9, 16, seed=s) for s in (1, 2, 3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(repo_attention(q, k, v, None, None, backend="torch"), expected)
    assert torch.allclose(repo_attention(q, k, v, torch.zeros(1, 2, 9), torch.zeros(1, 2, 9), backend="torch"), expected)


def test_bad_input():
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    pos = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        repo_attention(q, k[:, :1], v[:, :1], pos, pos[:, :1], backend="torch")
    with pytest.raises(ValueError, match=r"pos_k must have shape \(1, 2, 8\)"):
        repo_attention(q, k, v, pos, pos[..., :5], backend="torch")
    with pytest.raises(TypeError, match="pos_q must be a float tensor"):
        repo_attention(q, k, v, torch.zeros(1, 2, 8, dtype=torch.long), pos, backend="torch")
    with pytest.raises(ValueError, match="pos_q is on meta but q is on cpu"):
        repo_attention(q, k, v, pos.to("meta"), pos, backend="torch")
    with pytest.raises(ValueError, match="head dim must be even"):
        repo_attention(q[..., :15], k[..., :15], v[..., :15], pos, pos, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        repo_attention(q, k, v, pos, pos, backend="cuda")
    with pytest.raises(ValueError, match="more queries"):
        repo_attention(q, k[:, :, :4], v[:, :, :4], pos, pos[..., :4], backend="torch")


def test_broadcast_positions_use_one_table():
    """RoPE layers pass arange(T).expand(B, H, T): the rotation computes one [T, D/2] cos/sin table
    for all batches and heads. Its values and the gradient of x are bitwise those of the same positions
    materialised; the position gradient (summed over the broadcast by expand's backward) agrees to rounding."""
    B, H, T, D = 2, 3, 17, 16
    inv = rope_inv_freq(D, 500000.0)
    for base in (torch.arange(T, dtype=torch.float32).view(1, 1, T), rand(B, 1, T, seed=4) * 50):
        x = rand(B, H, T, D, seed=1).requires_grad_()
        p = base.clone().requires_grad_()
        y = apply_rope(x, p.expand(B, H, T), inv)
        x2 = x.detach().clone().requires_grad_()
        dense = p.detach().expand(B, H, T).contiguous().requires_grad_()
        y2 = apply_rope(x2, dense, inv)
        assert torch.equal(y, y2)
        g = rand(B, H, T, D, seed=2)
        (y * g).sum().backward()
        (y2 * g).sum().backward()
        assert torch.equal(x.grad, x2.grad)
        assert torch.allclose(p.grad, dense.grad.sum(dim=tuple(i for i in range(3) if base.shape[i] == 1),
                                                     keepdim=True), rtol=1e-6, atol=1e-6)
