"""
The RePo model: an OLMo-2 transformer whose upper layers rotate q and k by learned positions.

Follow one token: embed_tokens -> n_layer blocks -> final RMSNorm -> untied lm_head. Each block
is OLMo-2's "reordered norm" block (RMSNorm on the *output* of each sublayer, none before it):

    h   = x + RMSNorm(Attn(x))          Attn: q = QKNorm(x Wq), k = QKNorm(x Wk), v = x Wv,
    out = h + RMSNorm(MLP(h))                 rotate q, k by their positions, causal softmax
                                        MLP:  down(silu(gate(h)) * up(h))

Every layer has a position mode (see GPTConfig.layer_modes):
    'rope'  token t gets position t (standard RoPE)
    'nope'  no rotation at all
    'repo'  position z = f_phi(x) from positioner.py: one real number per token and head, computed
            from the same residual stream x that feeds the q/k/v projections (paper, Sec. 3)
All three go through rope_kernel.repo_attention, so baselines are one flag away on one code path.

Parameter names equal Hugging Face's Olmo2ForCausalLM (model.layers.{i}.self_attn.q_proj, ...), so
checkpoint interop (infra/hf.py) is a plain key map. `python model.py` builds and runs a tiny one.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from positioner import Positioner
from rope_kernel import BACKENDS, apply_rope, repo_attention, rope_inv_freq

POS_MODES = ("repo", "rope", "nope")
POS_FIELDS = ("pos_mode", "repo_start_layer", "layer_pattern")  # the GPTConfig fields that set layer modes


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0              # key/value heads; 0 = n_head (MHA, as OLMo-2 1B/7B); fewer = GQA
    n_embd: int = 768
    intermediate_size: int = 0      # SwiGLU hidden width; 0 = 4 * n_embd (OLMo-2 1B: 2048 -> 8192)
    block_size: int = 1024          # training context; saved as max_position_embeddings, not enforced
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    # Three ways to write the per-layer position modes, resolved once into layer_modes():
    pos_mode: str = "repo"          # 'repo', 'rope' or 'nope' for the whole model ...
    repo_start_layer: int = -1      # ... 'repo' from this layer up; -1 = n_layer // 3 (the authors' 5 of 16)
    layer_pattern: str = ""         # per-layer modes, tiled, overriding pos_mode: "rope,rope,nope" = R2N1
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    attn_backend: str = "auto"      # rope_kernel.repo_attention's backend: a runtime choice, not saved

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.repo_start_layer == -1:
            self.repo_start_layer = min(self.n_layer // 3, self.n_layer - 1)
        if min(self.n_layer, self.n_head, self.n_embd, self.vocab_size) < 1:
            raise ValueError(f"n_layer, n_head, n_embd, vocab_size must be positive: {self}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for key, value, allowed in (("attn_backend", self.attn_backend, BACKENDS), ("pos_mode", self.pos_mode, POS_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {key} {value!r}; choose one of {allowed}")
        if not 0 <= self.repo_start_layer < self.n_layer:
            raise ValueError(f"repo_start_layer={self.repo_start_layer} is out of range: the model has "
                             f"layers 0..{self.n_layer - 1} (use -1 for the default floor(n_layer/3))")
        pattern = [m.strip() for m in self.layer_pattern.split(",")] if self.layer_pattern else []
        if bad := [m for m in pattern if m not in POS_MODES]:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has unknown modes {bad}; "
                             f"use a comma-separated list of {POS_MODES}")
        if len(pattern) > self.n_layer:
            raise ValueError(f"layer_pattern has {len(pattern)} entries but the model has {self.n_layer} layers")
        if pattern:
            modes = [pattern[i % len(pattern)] for i in range(self.n_layer)]
        elif self.pos_mode == "repo":
            modes = ["rope" if i < self.repo_start_layer else "repo" for i in range(self.n_layer)]
        else:
            modes = [self.pos_mode] * self.n_layer
        if "repo" in modes and self.n_embd % 8:
            raise ValueError(f"RePo layers need n_embd divisible by 8 (the positioner is d -> d/8), got {self.n_embd}")
        self._modes = tuple(modes)  # not a field: asdict() keeps only the three ways of writing it

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_modes(self) -> list:
        """The position mode of each layer, e.g. ['rope'] * 5 + ['repo'] * 11 for OLMo-2 1B + RePo."""
        return list(self._modes)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in (at least) float32, as OLMo-2 and HF do; return in the input dtype
        ct = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(ct), (x.shape[-1],), self.weight.to(ct), self.eps).to(x.dtype)


# ----- YaRN: RoPE's frequencies stretched for contexts longer than training -----------------

def yarn(config, factor, original_max, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023) frequencies and logit scale for a context `factor` times longer.
    Frequency pairs that turn many times within original_max keep their frequency, slow ones are
    divided by factor, a linear ramp in between; attention logits grow by (0.1 ln s + 1)^2."""
    hd, theta = config.head_dim, config.rope_theta
    dim_of = lambda rotations: hd * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), hd - 1)
    i = torch.arange(hd // 2, dtype=torch.float64)
    inv_freq = theta ** (-2 * i / hd)
    ramp = ((i - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0 keeps the frequency, 1 divides it
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp, (0.1 * math.log(factor) + 1) ** 2 / math.sqrt(hd)


@contextmanager
def scaled_rope(model, factor):
    """Inside the block the model uses YaRN's frequencies and logit scale for `factor` (1 = RoPE's)."""
    saved = model.inv_freq, model.sm_scale
    if factor > 1:
        model.inv_freq, model.sm_scale = yarn(model.config, factor, model.config.block_size)
    try:
        yield
    finally:
        model.inv_freq, model.sm_scale = saved


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, mode: str):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.mode = config.n_head, config.n_kv_head, hd, mode
        self.backend = config.attn_backend
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=False)
        # QK-norm over the whole projection (all heads at once), before the rotation
        self.q_norm = RMSNorm(config.n_head * hd, config.norm_eps)
        self.k_norm = RMSNorm(config.n_kv_head * hd, config.norm_eps)
        # one position per token and *key* head: with GQA a query head uses its key head's position
        self.positioner = Positioner(d, config.n_kv_head, config.init_std) if mode == "repo" else None

    def project(self, x, start=0):
        """x [B, T, d] -> q [B, n_head, T, hd], k, v [B, n_kv_head, T, hd] (QK-normed, unrotated), positions
        float32 [B, n_kv_head, T] of tokens start.. (None for NoPE)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.mode == "repo":
            pos = self.positioner(x)
        elif self.mode == "rope":
            pos = torch.arange(start, start + T, device=x.device, dtype=torch.float32).expand(B, self.n_kv_head, T)
        else:
            pos = None
        return q, k, v, pos

    def forward(self, x, inv_freq, sm_scale=None, cache=None, layer=0):
        """x: [B, T, d] -> (y [B, T, d], positions float32 [B, n_kv_head, T] or None for NoPE)."""
        B, T, _ = x.shape
        q, k, v, pos = self.project(x, cache.length if cache is not None else 0)
        pos_q, pos_k = self._per_query_head(pos), pos
        if cache is not None:
            # keys are rotated once, before they are stored (z_t depends only on token t, so a key's
            # rotation is final); without a cache repo_attention rotates (inside the Triton kernels)
            if pos is not None:
                q, k = apply_rope(q, pos_q, inv_freq), apply_rope(k, pos_k, inv_freq)
            k, v = cache.update(layer, k, v)
            pos_q = pos_k = None
        if self.n_head > self.n_kv_head:  # grouped-query attention: each key/value head serves `rep` query heads
            rep = self.n_head // self.n_kv_head
            k, v, pos_k = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), self._per_query_head(pos_k)
        y = repo_attention(q, k, v, pos_q, pos_k, causal=True, sm_scale=sm_scale, inv_freq=inv_freq,
                           backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y), pos

    def _per_query_head(self, pos):
        """Positions of the key/value heads [B, n_kv_head, T] -> of the query heads [B, n_head, T]."""
        if pos is None or self.n_head == self.n_kv_head:
            return pos
        B, _, T = pos.shape
        if pos.stride(1) == 0:  # RoPE's arange, broadcast over heads: stays a view
            return pos[:, :1].expand(B, self.n_head, T)
        return pos.repeat_interleave(self.n_head // self.n_kv_head, dim=1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, mode: str):
        super().__init__()
        self.self_attn = Attention(config, mode)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, inv_freq, sm_scale=None, cache=None, layer=0, checkpointing=False):
        if checkpointing and cache is None and torch.is_grad_enabled():
            # activation checkpointing (torchtitan's per-block "full" AC): keep only the block's input and
            # run it again in backward; inside forward, so FSDP2's hooks stay outside the recomputed region
            return checkpoint(self._forward, x, inv_freq, sm_scale, None, layer, use_reentrant=False)
        return self._forward(x, inv_freq, sm_scale, cache, layer)

    def _forward(self, x, inv_freq, sm_scale, cache, layer):
        a, pos = self.self_attn(x, inv_freq, sm_scale, cache, layer)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(h)), pos


class KVCache:
    """Rotated keys and values of every layer, [n_layer, B, n_kv_head, T_max, hd], in attention's dtype."""

    def __init__(self, config: GPTConfig, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = self.v = None
        self.length = 0  # tokens already stored; advanced by the model after all layers ran

    def update(self, layer, k, v):
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        T = k.shape[2]
        if self.length + T > self.shape[3]:
            raise ValueError(f"KV cache holds {self.shape[3]} tokens; cannot add {T} to {self.length}")
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # reset_parameters' seed: one draw from torch's global generator (torch.manual_seed(s) then
        # GPT(config) is reproducible), on the CPU even under `with torch.device("meta")`
        self.init_seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, mode) for mode in config.layer_modes()),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # RoPE's frequencies theta^(-2i/D) and the softmax scale (None = 1/sqrt(head_dim)), swapped by
        # scaled_rope for YaRN. Plain float64 attributes, not buffers: model.to(bfloat16) cannot round them
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, device="cpu")
        self.sm_scale = None
        self.activation_checkpointing = False  # recompute in backward, not save: True = every block, n = the first n
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self):
        """tie_word_embeddings: the LM head is the input embedding (again after Module.to_empty() unties it)."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self):
        """OLMo-2's init: matrices N(0, 0.02^2) truncated at 3 sigma, norm weights 1, the same numbers for a
        whole model and for FSDP2 shards filled after a meta-device build (infra/fsdp.py)."""
        from infra.fsdp import init_weights
        init_weights(self, self.init_seed, self.config.init_std)

    def forward(self, idx, targets=None, return_positions=False, z_loss=0.0):
        """idx [B, T] int -> (logits, loss or None[, positions float32 [n_layer, B, n_head, T]]).

        Without targets: logits [B, T, vocab]. With targets [B, T] (-1 = ignored): the mean cross-entropy
        (infra/loss.py: chunk by chunk, never a [B, T, vocab] tensor; z_loss adds OLMo's z-loss to the
        gradient, not the value) and the last position's logits [B, 1, vocab]. positions: each token's
        position per layer and head (t in 'rope' layers, the learned z in 'repo' layers, 0 in 'nope')."""
        self._check_idx(idx)
        if targets is not None:
            self._check_idx(targets, name="targets", shape=idx.shape, low=-1)
        x, positions = self._trunk(idx, cache=None, want_positions=return_positions)
        if targets is None:
            logits, loss = self.lm_head(x), None
        else:
            with torch.no_grad():  # for display only: saving its input for backward would keep a copy of the head
                logits = self.lm_head(x[:, -1:].detach())  # (called as a module: FSDP2 counts on its forward hooks)
            from infra.loss import lm_loss  # chunked: no [B * T, vocab] logits are ever stored
            loss = lm_loss(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), z_loss)
        return (logits, loss, positions) if return_positions else (logits, loss)

    def _trunk(self, idx, cache, want_positions=False):
        x = self.model.embed_tokens(idx)
        (B, T), inv_freq, positions = idx.shape, self.inv_freq.to(x.device), []
        ac = self.activation_checkpointing  # saved activations: ~1/n_layer with every block recomputed
        for i, block in enumerate(self.model.layers):
            x, pos = block(x, inv_freq, self.sm_scale, cache, i, ac is True or i < ac)
            if want_positions:
                pos = torch.zeros(B, self.config.n_kv_head, T, device=x.device) if pos is None else pos.detach()
                positions.append(block.self_attn._per_query_head(pos))
        if cache is not None:
            cache.length += T
        return self.model.norm(x), (torch.stack(positions) if want_positions else None)

    def _check_idx(self, idx, check_range=None, name="idx", shape=None, low=0):
        """Token ids as nn.Embedding takes them (targets: idx's shape, -1 = ignored); their range only where
        that costs no device sync (CPU, not compiling) or check_range: GPU data are checked in data/tokens.py."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor of token ids, int64 or int32 (what nn.Embedding "
                            f"takes), got {getattr(idx, 'dtype', type(idx))}")
        if idx.dim() != 2 or (shape is not None and idx.shape != shape):
            raise ValueError(f"{name} must be [batch, time]{' like idx ' + str(tuple(shape)) if shape else ''}, "
                             f"got shape {tuple(idx.shape)}")
        if not idx.numel():
            raise ValueError(f"{name} has no tokens (shape {tuple(idx.shape)}): give at least one token")
        if check_range or check_range is None and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(idx)
            if lo < low or hi >= self.config.vocab_size:
                raise ValueError(f"{name}: token ids must be in [{low}, {self.config.vocab_size}), got min {int(lo)}, "
                                 f"max {int(hi)}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx [B, T] using a KV cache; top_k=1 (or temperature=0) is greedy."""
        self._check_idx(idx, check_range=True)  # once per call, not once per token
        B, T = idx.shape
        cache = KVCache(self.config, B, T + max_new_tokens)
        x, _ = self._trunk(idx, cache)
        for step in range(max_new_tokens):
            logits = self.lm_head(x[:, -1]).float()
            if temperature == 0 or top_k == 1:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
            if step + 1 < max_new_tokens:
                x, _ = self._trunk(nxt, cache)
        return idx

    def num_params(self, non_embedding=True) -> int:
        """Parameter count; non_embedding leaves out the input embedding (the LM head is a matmul
        and stays in, as the paper's 0.9% overhead figure counts it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def num_positioner_params(self) -> int:
        return sum(p.numel() for b in self.model.layers if b.self_attn.positioner is not None
                   for p in b.self_attn.positioner.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at context seq_len: 6 per matmul weight (projections, MLP, positioner,
        LM head) + attention's QK^T and AV, 12 L H hd T (PaLM appendix B; causal mask not discounted)."""
        c = self.config
        matmul = self.num_params(non_embedding=True) - sum(
            m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))
        return 6 * matmul + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    @classmethod
    def from_pretrained(cls, path, allow_non_finite=False, **overrides):
        """An HF-layout directory (OLMo-2 or RePo; infra/hf.py). overrides change GPTConfig fields: pos_mode=
        "repo", repo_start_layer=5 adds fresh positioners to a RoPE checkpoint. NaN/inf refused unless allowed."""
        from infra import hf
        kw, ckpt_modes = hf.read_config(path, **overrides)  # refuses overrides that are no GPTConfig field
        model = cls(GPTConfig(**kw))
        hf.load_weights(model, path, ckpt_modes, allow_non_finite)
        return model

    def save_pretrained(self, path, **config_extras):
        """config.json (+ config_extras) and model.safetensors: read by from_pretrained, by transformers'
        Olmo2ForCausalLM (RoPE) and by the RePo authors' stack (unless infra.hf.authors_format_problem)."""
        from infra import hf
        hf.save(self, path, **config_extras)


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, n_layer=6, n_head=4, n_embd=64, block_size=64)
    model = GPT(cfg)
    print(f"layers {cfg.layer_modes()}: {model.num_params() / 1e6:.3f}M non-embedding parameters, "
          f"{model.num_positioner_params()} in positioners, {model.flops_per_token(64):.3g} FLOPs/token")
    idx = torch.randint(0, 256, (1, 8))
    logits, loss, pos = model(idx, targets=idx, return_positions=True)
    print(f"logits {tuple(logits.shape)}, loss {loss.item():.3f} (ln 256 = {math.log(256):.3f}), "
          f"positions {tuple(pos.shape)}")
    print("greedy continuation:", model.generate(idx, 8, top_k=1)[0, 8:].tolist())
