"""
Configuration of RePo on OLMo-2 ("Language Models with Context Re-Positioning", arXiv 2512.14391),
for transformers' trust_remote_code. Self-contained: torch and transformers only.

config.json is an OLMo-2 config plus "pe_config", the per-layer position modes in the RePo
authors' format:
    {"dynamic_pe_mode": "swigluex_multihead" (RePo) | "nope" | "none" (RoPE),
     "dynmaic_pe_start_layer": 5,          (their stack reads this spelling; "dynamic_..." is the fallback)
     "dynmaic_pe_layer_ids": "5,6,...",    (optional subset of the layers)
     "layer_pattern": "rope,rope,nope,..."}  (optional: every layer's mode, read first)
Its model_type, "repo_olmo2", is one stock transformers does not know: without trust_remote_code it
refuses the directory instead of running it as plain OLMo-2 (RoPE in every layer).
"""
from transformers import PretrainedConfig

MODES = {"none": "rope", "nope": "nope", "swigluex_multihead": "repo"}  # the authors' names -> ours


class RePoOlmo2Config(PretrainedConfig):
    model_type = "repo_olmo2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096,
                 initializer_range=0.02, use_cache=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings=False, rope_theta=None, rope_scaling=None, rope_parameters=None,
                 attention_bias=False, attention_dropout=0.0, rms_norm_eps=1e-6, head_dim=None, pe_config=None,
                 **kwargs):
        for scaling in (rope_scaling, rope_parameters):  # positions are plain RoPE angles (z * theta^(-2i/D))
            kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if kind != "default":
                raise ValueError(f"RoPE scaling {scaling} is not supported by this model's code")
        if rope_theta is None:
            rope_theta = (rope_parameters or {}).get("rope_theta", 500000.0)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.rope_theta = float(rope_theta)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.pe_config = dict(pe_config or {})
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.layer_modes()  # a config that does not say every layer's mode fails here, by name

    def layer_modes(self):
        """The position mode of every layer: 'rope', 'nope' or 'repo'."""
        n, pe = self.num_hidden_layers, self.pe_config
        if pe.get("layer_pattern"):
            modes = [m.strip() for m in str(pe["layer_pattern"]).split(",")]
            if len(modes) != n or set(modes) - set(MODES.values()):
                raise ValueError(f"pe_config.layer_pattern={pe['layer_pattern']!r} must give one of "
                                 f"{sorted(MODES.values())} for each of the {n} layers")
            return modes
        mode = pe.get("dynamic_pe_mode", "none")
        if mode not in MODES:
            raise ValueError(f"pe_config.dynamic_pe_mode={mode!r} is not supported; known modes: {sorted(MODES)}")
        start = pe.get("dynmaic_pe_start_layer", pe.get("dynamic_pe_start_layer", 0))
        ids = pe.get("dynmaic_pe_layer_ids", pe.get("dynamic_pe_layer_ids")) or ""
        ids = ids if isinstance(ids, list) else [i for i in str(ids).split(",") if i.strip()]
        chosen = {int(i) for i in ids} if ids else set(range(n))
        return [MODES[mode] if (i >= int(start) and i in chosen) else "rope" for i in range(n)]
