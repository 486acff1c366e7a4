"""
RePo on OLMo-2 ("Language Models with Context Re-Positioning", arXiv 2512.14391) for transformers'
AutoModelForCausalLM with trust_remote_code=True. Self-contained: torch and transformers only.

The model is OLMo-2 (reordered-norm blocks, QK-norm over the whole projections, SwiGLU, untied
head) where each layer has a position mode (configuration_repo_olmo2.py):
    rope  token t is rotated by its index t (standard RoPE)
    nope  no rotation
    repo  a SwiGLU f_phi reads the residual stream x entering the block and predicts one real
          position per token and key/value head, z = W_z(silu(W_g x) * (W_c x)), computed in
          float32; z replaces t in RoPE for the token's key and for the queries of that head
Keys are rotated before they enter the cache: z_t depends only on token t, so a cached key never
changes and transformers' own caches (DynamicCache, ...) work as they are. Attention runs through
transformers' attention interface (config._attn_implementation: "eager", "sdpa", flash-attention).
The numbers follow nanoRePo's model.py exactly: angles in float32 (float64 for a float64 model)
from theta^(-2i/D) computed in float64, RMSNorm in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # transformers < 4.45: PreTrainedModel is the generation mixin
    GenerationMixin = object
try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:
    ALL_ATTENTION_FUNCTIONS = {}

from .configuration_repo_olmo2 import RePoOlmo2Config

_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def _output(cls, cache, **fields):
    """A model output whose cache field has this transformers version's name ("cache" from 5.x on,
    "past_key_values" before)."""
    names = getattr(cls, "__dataclass_fields__", {})
    fields["cache" if "cache" in names else "past_key_values"] = cache
    return cls(**fields)


class RePoOlmo2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        ct = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(ct), (x.shape[-1],), self.weight.to(ct), self.eps).to(x.dtype)


def rotate(x, pos, inv_freq):
    """Half-split (NeoX) rotation of x [B, H, T, D] by angles pos [B, H, T] * inv_freq [D/2], math in
    float32 at least, result in x's dtype."""
    ct = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), torch.float32)
    angle = pos.to(ct)[..., None] * inv_freq.to(device=x.device, dtype=ct)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    rep = module.num_key_value_groups
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class RePoOlmo2Attention(nn.Module):
    def __init__(self, config, layer_idx, mode):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.config, self.layer_idx, self.mode = config, layer_idx, mode
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.num_key_value_groups = self.n_head // self.n_kv_head
        self.scaling = hd ** -0.5
        self.is_causal = True
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.q_norm = RePoOlmo2RMSNorm(self.n_head * hd, config.rms_norm_eps)
        self.k_norm = RePoOlmo2RMSNorm(self.n_kv_head * hd, config.rms_norm_eps)
        if mode == "repo":  # f_phi; one output per key/value head (= per head without GQA)
            self.gate_map = nn.Linear(d, d // 8, bias=False)
            self.content_map = nn.Linear(d, d // 8, bias=False)
            self.final_map = nn.Linear(d // 8, self.n_kv_head, bias=False)

    def positions(self, x):
        """f_phi: x [B, T, d] -> z [B, n_kv_head, T], always in float32 (float64 for a float64 model):
        half-precision positions of size ~1e2..1e3 would be off by whole radians."""
        ct = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(ct)
            r = F.silu(F.linear(x, self.gate_map.weight.to(ct))) * F.linear(x, self.content_map.weight.to(ct))
            return F.linear(r, self.final_map.weight.to(ct)).transpose(1, 2)

    def forward(self, x, position_ids, inv_freq, attention_mask, cache=None, **kwargs):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.mode != "nope":
            if self.mode == "repo":
                pos = self.positions(x)
            else:
                pos = position_ids.to(torch.float32)[:, None, :].expand(B, self.n_kv_head, T)
            # a query head uses the position of the key/value head it reads (repeat_kv's grouping)
            q = rotate(q, pos.repeat_interleave(self.num_key_value_groups, dim=1), inv_freq)
            k = rotate(k, pos, inv_freq)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        attend = eager_attention_forward
        if impl != "eager":
            get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
            attend = get(impl, eager_attention_forward) if get else ALL_ATTENTION_FUNCTIONS[impl]
        y, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                            dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim)), weights


class RePoOlmo2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RePoOlmo2DecoderLayer(nn.Module):
    """OLMo-2's reordered-norm block: h = x + norm(attn(x)); out = h + norm(mlp(h))."""

    def __init__(self, config, layer_idx, mode):
        super().__init__()
        self.self_attn = RePoOlmo2Attention(config, layer_idx, mode)
        self.mlp = RePoOlmo2MLP(config)
        self.post_attention_layernorm = RePoOlmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RePoOlmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, position_ids, inv_freq, attention_mask, cache=None, **kwargs):
        a, weights = self.self_attn(x, position_ids, inv_freq, attention_mask, cache, **kwargs)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(h)), weights


class RePoOlmo2PreTrainedModel(PreTrainedModel):
    config_class = RePoOlmo2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["RePoOlmo2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = _supports_flash_attn_2 = True
    _supports_attention_backend = True
    _supports_cache_class = True

    def _keep_positioners_in_fp32(self, config):
        """f_phi's weights stay float32 when the model is loaded in half precision. Set per model,
        before post_init: transformers refuses names that are not modules of the model (NoPE)."""
        keep = ["gate_map", "content_map", "final_map"] if "repo" in config.layer_modes() else None
        self._keep_in_fp32_modules = self._keep_in_fp32_modules_strict = keep


class RePoOlmo2Model(RePoOlmo2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RePoOlmo2DecoderLayer(config, i, mode) for i, mode in enumerate(config.layer_modes()))
        self.norm = RePoOlmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._keep_positioners_in_fp32(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _mask(self, attention_mask, x, past):
        """The attention mask for the attention function: None where plain causal attention is
        enough (no padding, and no earlier tokens or a single query), the 2-D padding mask for
        flash-attention, else an additive [B, 1, T, past + T] float mask (causal + padding)."""
        B, T = x.shape[:2]
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # already built by the caller
        padded = attention_mask is not None and not bool(attention_mask.all())
        if "flash" in impl:
            return attention_mask if padded else None
        if impl != "eager" and not padded and (past == 0 or T == 1):
            return None
        keys = torch.arange(past + T, device=x.device)
        allowed = keys[None, :] <= (past + torch.arange(T, device=x.device))[:, None]  # [T, past + T]
        allowed = allowed[None, None].expand(B, 1, T, past + T)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, : past + T].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        return mask.masked_fill(~allowed, torch.finfo(x.dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, output_attentions=None, output_hidden_states=None,
                **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        kwargs.pop("cache_position", None)
        kwargs.pop("return_dict", None)  # the output is always a ModelOutput
        want_attn = self.config.output_attentions if output_attentions is None else output_attentions
        want_hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if want_attn and impl != "eager":
            raise ValueError(f"output_attentions needs attn_implementation='eager' ({impl} does not return the weights)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config) if _MAJOR >= 5 else DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(x.shape[1], device=x.device))[None].expand(x.shape[0], -1)
        mask = self._mask(attention_mask, x, past)
        # RoPE's frequencies theta^(-2i/D) in float64, rounded once to the angle's dtype (a buffer
        # would be rounded to the model's dtype by .to(bfloat16))
        hd = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=x.device) / hd)
        hidden, attentions = [], []
        for layer in self.layers:
            hidden.append(x)
            x, weights = layer(x, position_ids, inv_freq, mask, cache, **kwargs)
            attentions.append(weights)
        x = self.norm(x)
        return _output(BaseModelOutputWithPast, cache if use_cache else None, last_hidden_state=x,
                       hidden_states=tuple(hidden + [x]) if want_hidden else None,
                       attentions=tuple(attentions) if want_attn else None)


class RePoOlmo2ForCausalLM(RePoOlmo2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = RePoOlmo2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._keep_positioners_in_fp32(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache=cache, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        cache = getattr(out, "cache", None) if "cache" in getattr(type(out), "__dataclass_fields__", {}) \
            else getattr(out, "past_key_values", None)
        return _output(CausalLMOutputWithPast, cache, loss=loss, logits=logits, hidden_states=out.hidden_states,
                       attentions=out.attentions)


__all__ = ["RePoOlmo2ForCausalLM", "RePoOlmo2Model", "RePoOlmo2PreTrainedModel"]
