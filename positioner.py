"""
f_phi, the RePo positioner: a tiny SwiGLU that reads the residual stream and predicts one
real-valued position per token and per head.

    r = silu(x W_g) * (x W_c)        W_g, W_c: d -> d/8   (shared by all heads of the layer)
    z = r W_z                        W_z:      d/8 -> n_head (one linear map per head)

z replaces the integer index i inside RoPE for that token's query and key in that head
(paper: arXiv 2512.14391, Sec. 3). Nothing else changes: no offset, clamp, sort or extra loss,
the token order and causal mask stay as they are. Because z_t depends only on token t's own
hidden state, a key's rotation never changes after it is computed, so the KV cache works as usual.

Parameter names follow the authors' checkpoints (gate_map / content_map / final_map), so their
released weights load without renaming. Try it:

    python positioner.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Positioner(nn.Module):
    def __init__(self, n_embd: int, n_head: int, init_std: float = 0.02):
        super().__init__()
        if n_embd % 8:
            raise ValueError(f"the positioner needs n_embd divisible by 8 (d/8 bottleneck), got {n_embd}")
        hidden = n_embd // 8
        self.gate_map = nn.Linear(n_embd, hidden, bias=False)     # W_g
        self.content_map = nn.Linear(n_embd, hidden, bias=False)  # W_c
        self.final_map = nn.Linear(hidden, n_head, bias=False)    # W_z, one column per head
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self):
        # OLMo's init for new weights: N(0, std^2) truncated at 3 sigma. With std 0.02 the first
        # positions are tiny and nearly token-independent: a RePo layer starts out close to NoPE
        # and has to learn to spread its tokens apart.
        for lin in (self.gate_map, self.content_map, self.final_map):
            nn.init.trunc_normal_(lin.weight, std=self.init_std, a=-3 * self.init_std, b=3 * self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] residual stream entering the block -> positions z: float32 [B, n_head, T]."""
        # Positions feed sin/cos of angles up to |z| radians: bf16 (8 mantissa bits) would put
        # errors of several radians on z ~ 1e3. The module is ~1% of the layer's FLOPs, so it
        # always runs in float32, outside autocast.
        ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for a float64 model
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(ct)
            r = F.silu(F.linear(x, self.gate_map.weight.to(ct))) * F.linear(x, self.content_map.weight.to(ct))
            z = F.linear(r, self.final_map.weight.to(ct))
        return z.transpose(1, 2)


if __name__ == "__main__":
    torch.manual_seed(0)
    f = Positioner(n_embd=64, n_head=4)
    x = torch.randn(1, 10, 64)
    z = f(x)
    print(f"{sum(p.numel() for p in f.parameters())} parameters; positions z[0, :, :5] at init:\n{z[0, :, :5]}")
