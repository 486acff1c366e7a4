"""model.py: OLMo-2 parity with transformers, RePo against an independent float64 implementation,
causality, cached generation, invariances, gradients, parameter/FLOP accounting, bad input."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache

safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")


def tiny(**kw):
    cfg = dict(vocab_size=61, n_layer=4, n_head=4, n_embd=32, intermediate_size=48, block_size=64, rope_theta=1000.0)
    cfg.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # spread the learned positions far beyond their tiny initial values
        for block in model.model.layers:
            if block.self_attn.positioner is not None:
                block.self_attn.positioner.gate_map.weight.mul_(10.0)
                block.self_attn.positioner.content_map.weight.mul_(10.0)
                block.self_attn.positioner.final_map.weight.mul_(100.0)
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def hf_olmo2(tmp_path, n_kv=4, theta=1234.0, **kw):
    cfg = transformers.Olmo2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128,
                                   rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.Olmo2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing or misplaced norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, **kw)
    return hf


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----- parity with transformers' Olmo2ForCausalLM ---------------------------------------------

@pytest.mark.parametrize("n_kv", [4, 2])
def test_matches_transformers_olmo2(tmp_path, n_kv):
    hf = hf_olmo2(tmp_path, n_kv=n_kv)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.rope_theta == 1234.0 and model.config.layer_modes() == ["rope"] * 3
    idx = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        assert rel_err(model(idx)[0], hf(idx).logits) <= 1e-4


def test_sharded_checkpoint(tmp_path):
    hf = hf_olmo2(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(GPT.from_pretrained(tmp_path)(idx)[0], hf(idx).logits) <= 1e-4


def test_published_olmo2_layout(tmp_path):
    """config.json with exactly the keys allenai/OLMo-2-0425-1B publishes (top-level rope_theta,
    rope_scaling null, ...), at toy sizes, and weights under Hugging Face's names."""
    published = {"architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
                 "intermediate_size": 128, "max_position_embeddings": 4096, "model_type": "olmo2",
                 "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 100277,
                 "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False,
                 "torch_dtype": "float32", "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 100352}
    (tmp_path / "config.json").write_text(json.dumps(published))
    hf = transformers.Olmo2ForCausalLM(transformers.Olmo2Config.from_pretrained(tmp_path)).eval()
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    model = GPT.from_pretrained(tmp_path).eval()
    assert (model.config.rope_theta, model.config.norm_eps, model.config.vocab_size) == (500000.0, 1e-6, 100352)
    idx = torch.tensor([[100257, 5, 99999, 42, 7, 100000]])
    with torch.no_grad():
        assert rel_err(model(idx)[0], hf(idx).logits) <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    model = tiny(pos_mode="rope")
    model.save_pretrained(tmp_path, eos_token_id=3)
    hf = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.eos_token_id == 3 and "pe_config" not in json.loads((tmp_path / "config.json").read_text())
    idx = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, model(idx)[0]) <= 1e-5


# ----- RePo in the authors' layout against an independent float64 implementation --------------

def reference_repo_forward(sd, hf_cfg, idx, start):
    """The paper's equations in float64, written independently of model.py: RMSNorm by hand,
    rotation as complex multiplication of the pairs (x_j, x_{j+D/2}) by exp(i z f_j)."""
    W = {k: v.double() for k, v in sd.items()}
    d, H, L = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"], hf_cfg["num_hidden_layers"]
    hd, eps, B, T = d // H, hf_cfg["rms_norm_eps"], *idx.shape
    f = hf_cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rotate(x, z):  # x [B, H, T, hd], z [B, H, T]
        c = torch.complex(x[..., :hd // 2], x[..., hd // 2:]) * torch.exp(1j * z[..., None] * f)
        return torch.cat((c.real, c.imag), -1)

    x, all_z = W["model.embed_tokens.weight"][idx], []
    for i in range(L):
        p = f"model.layers.{i}."
        heads = lambda t: t.view(B, T, H, hd).transpose(1, 2)
        q = heads(rms(x @ W[p + "self_attn.q_proj.weight"].T, W[p + "self_attn.q_norm.weight"]))
        k = heads(rms(x @ W[p + "self_attn.k_proj.weight"].T, W[p + "self_attn.k_norm.weight"]))
        v = heads(x @ W[p + "self_attn.v_proj.weight"].T)
        if i >= start:
            r = F.silu(x @ W[p + "self_attn.gate_map.weight"].T) * (x @ W[p + "self_attn.content_map.weight"].T)
            z = (r @ W[p + "self_attn.final_map.weight"].T).transpose(1, 2)
        else:
            z = torch.arange(T, dtype=torch.float64).expand(B, H, T)
        all_z.append(z)
        s = rotate(q, z) @ rotate(k, z).transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d) @ W[p + "self_attn.o_proj.weight"].T
        h = x + rms(a, W[p + "post_attention_layernorm.weight"])
        m = (F.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        x = h + rms(m, W[p + "post_feedforward_layernorm.weight"])
    return rms(x, W["model.norm.weight"]) @ W["lm_head.weight"].T, torch.stack(all_z)


def write_reference_repo_checkpoint(path, pe_config, start):
    """A RePo checkpoint as the authors' converter lays it out: HF Olmo2 tensors plus
    self_attn.{gate_map,content_map,final_map} in layers >= start, pe_config in config.json."""
    cfg = {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": 53, "hidden_size": 64,
           "intermediate_size": 80, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 500000, "tie_word_embeddings": False,
           "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "pe_config": pe_config}
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std
    sd = {"model.embed_tokens.weight": rnd(53, 64, std=1.0), "model.norm.weight": 1 + rnd(64), "lm_head.weight": rnd(53, 64)}
    for i in range(4):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = rnd(64, 64, std=0.2)
        for n in ("self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "post_feedforward_layernorm"):
            sd[p + n + ".weight"] = 1 + rnd(64, std=0.3)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = rnd(80, 64), rnd(80, 64)
        sd[p + "mlp.down_proj.weight"] = rnd(64, 80)
        if i >= start:  # positions of magnitude ~100, well beyond the context length of 40
            sd[p + "self_attn.gate_map.weight"], sd[p + "self_attn.content_map.weight"] = rnd(8, 64, std=0.5), rnd(8, 64, std=0.5)
            sd[p + "self_attn.final_map.weight"] = rnd(4, 8, std=0.1)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return sd, cfg


@pytest.mark.parametrize("pe_config,start", [
    ({"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": 2, "dynamic_pe_start_layer": 0}, 2),
    ({"dynamic_pe_mode": "swigluex_multihead", "dynamic_pe_start_layer": 1}, 1),  # only the correct spelling
    ({"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": 0}, 0),  # every layer RePo
])
def test_repo_checkpoint_matches_float64_reference(tmp_path, pe_config, start):
    sd, cfg = write_reference_repo_checkpoint(tmp_path / "ckpt", pe_config, start)
    model = GPT.from_pretrained(tmp_path / "ckpt").eval()
    assert model.config.layer_modes() == ["rope"] * start + ["repo"] * (4 - start)
    idx = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_z = reference_repo_forward(sd, cfg, idx, start)
    assert ref_z[start:].abs().max() > 10  # the test exercises real-valued positions, not tiny ones
    with torch.no_grad():
        logits, _, pos = model(idx, return_positions=True)
        assert pos.dtype == torch.float32 and pos.shape == (4, 2, 4, 40)
        assert rel_err(pos, ref_z) <= 1e-4
        assert rel_err(logits, ref_logits) <= 1e-4
        logits64, _, pos64 = model.double()(idx, return_positions=True)  # every op at float64
        assert rel_err(logits64, ref_logits) <= 1e-10 and rel_err(pos64, ref_z) <= 1e-12


def test_repo_save_load_roundtrip_and_config_keys(tmp_path):
    for kw in (dict(pos_mode="repo", repo_start_layer=1), dict(layer_pattern="rope,rope,nope"),
               dict(layer_pattern="nope,repo"), dict(pos_mode="nope")):
        model = tiny(**kw)
        model.save_pretrained(tmp_path / "m")
        again = GPT.from_pretrained(tmp_path / "m").eval()
        assert again.config.layer_modes() == model.config.layer_modes()
        idx = torch.randint(0, 61, (1, 21))
        with torch.no_grad():
            assert torch.equal(again(idx)[0], model(idx)[0])
    cfg = json.loads((tmp_path / "m").joinpath("config.json").read_text())  # last one: all NoPE
    assert cfg["pe_config"]["dynamic_pe_mode"] == "nope"
    tiny(pos_mode="repo", repo_start_layer=1).save_pretrained(tmp_path / "r")
    pe = json.loads((tmp_path / "r" / "config.json").read_text())["pe_config"]
    assert pe["dynamic_pe_mode"] == "swigluex_multihead"
    assert pe["dynmaic_pe_start_layer"] == pe["dynamic_pe_start_layer"] == 1
    names = set(safetensors_torch.load_file(tmp_path / "r" / "model.safetensors"))
    assert {"model.layers.1.self_attn.gate_map.weight", "model.layers.3.self_attn.final_map.weight"} <= names
    assert "model.layers.0.self_attn.gate_map.weight" not in names
    tiny(pos_mode="repo", repo_start_layer=0).save_pretrained(tmp_path / "r0")  # every layer RePo
    pe = json.loads((tmp_path / "r0" / "config.json").read_text())["pe_config"]
    assert pe["dynmaic_pe_start_layer"] == 0 and pe["dynmaic_pe_layer_ids"] == "0,1,2,3"
    assert GPT.from_pretrained(tmp_path / "r0").config.layer_modes() == ["repo"] * 4


@pytest.mark.parametrize("kw", [dict(layer_pattern="rope,nope,repo,repo"), dict(pos_mode="repo", n_kv_head=2)])
def test_models_the_authors_format_cannot_describe(tmp_path, kw):
    """Their pe_config has one mode for all non-RoPE layers and MHA positioners: such models are saved
    under a mode name their stack refuses (DynamicPeMode.verify), never under one it would misread."""
    model = tiny(**kw)
    model.save_pretrained(tmp_path)
    pe = json.loads((tmp_path / "config.json").read_text())["pe_config"]
    assert pe == {"dynamic_pe_mode": "nanorepo_layer_pattern", "layer_pattern": ",".join(model.config.layer_modes())}
    again = GPT.from_pretrained(tmp_path).eval()
    assert again.config.layer_modes() == model.config.layer_modes()
    idx = torch.randint(0, 61, (1, 13))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])


def test_overrides_turn_rope_checkpoint_into_repo(tmp_path):
    hf = hf_olmo2(tmp_path)
    model = GPT.from_pretrained(tmp_path, pos_mode="repo", repo_start_layer=1)
    assert model.config.layer_modes() == ["rope", "repo", "repo"]
    hf_sd = hf.state_dict()
    for name, p in model.named_parameters():
        if ".positioner." in name:  # fresh init N(0, 0.02) truncated at 3 sigma
            assert p.abs().max() <= 0.06 + 1e-7 and 0.01 < p.std() < 0.03
        else:
            assert torch.equal(p, hf_sd[name]), name
    # layer 0 keeps integer RoPE, so its output equals the plain checkpoint's first layer
    plain = GPT.from_pretrained(tmp_path)
    x = model.model.embed_tokens(torch.randint(0, 97, (1, 12)))
    with torch.no_grad():
        assert torch.equal(model.model.layers[0](x, model.inv_freq)[0], plain.model.layers[0](x, plain.inv_freq)[0])
        assert not torch.allclose(model.model.layers[1](x, model.inv_freq)[0], plain.model.layers[1](x, plain.inv_freq)[0])


# ----- behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(pos_mode="repo", repo_start_layer=1), dict(layer_pattern="repo,nope,rope")])
def test_causality(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 61, (2, 30))
    changed = idx.clone()
    changed[:, 17:] = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        a, _, pa = model(idx, return_positions=True)
        b, _, pb = model(changed, return_positions=True)
    assert torch.equal(a[:, :17], b[:, :17]) and torch.equal(pa[..., :17], pb[..., :17])
    assert not torch.allclose(a[:, 17:], b[:, 17:])


@pytest.mark.parametrize("kw", [dict(pos_mode="rope"), dict(pos_mode="repo", repo_start_layer=1),
                                dict(pos_mode="repo", n_kv_head=2), dict(layer_pattern="nope,repo,rope")])
def test_cached_generation_equals_full_recompute(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 61, (2, 5))
    out = model.generate(idx, max_new_tokens=12, top_k=1)
    with torch.no_grad():
        for t in range(5, 17):
            assert torch.equal(model(out[:, :t])[0][:, -1].argmax(-1), out[:, t])
        # the cached hidden states themselves match, also for multi-token chunks (bottom-right causal)
        cache = KVCache(model.config, 2, 17)
        chunks = [model._trunk(out[:, a:b], cache)[0] for a, b in ((0, 7), (7, 8), (8, 17))]
        full = model._trunk(out, None)[0]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_generation_under_bf16_autocast():
    """Under autocast the cache takes the dtype attention runs in (train.py samples this way on GPUs)."""
    model = tiny(pos_mode="repo", repo_start_layer=1)
    idx = torch.randint(0, 61, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(idx, max_new_tokens=5, top_k=1)
        with torch.no_grad():
            first = model(idx)[0][:, -1].argmax(-1)
    assert out.shape == (2, 11) and torch.equal(out[:, 6], first)


def test_sampling_respects_top_k():
    model = tiny()
    torch.manual_seed(3)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), max_new_tokens=6, temperature=1.5, top_k=3)
    with torch.no_grad():
        for t in range(1, 7):
            top3 = model(out[:, :t])[0][:, -1].topk(3).indices
            assert (top3 == out[:, t:t + 1]).any(-1).all()


def test_shifting_a_layers_positions_changes_nothing():
    model = tiny(pos_mode="repo", repo_start_layer=1).double()
    idx = torch.randint(0, 61, (2, 25))
    with torch.no_grad():
        base = model(idx)[0]
        hook = model.model.layers[2].self_attn.positioner.register_forward_hook(lambda m, i, out: out + 12345.0)
        shifted = model(idx)[0]
        hook.remove()
        model.model.layers[2].self_attn.positioner.final_map.weight[0].mul_(2)  # a real change must show
        changed = model(idx)[0]
    assert rel_err(shifted, base) <= 1e-9
    assert rel_err(changed, base) > 1e-4


def test_gradients_reach_the_positioner():
    model = tiny(pos_mode="repo", repo_start_layer=1).double().train()
    idx = torch.randint(0, 61, (2, 20))
    _, loss = model(idx, targets=torch.roll(idx, -1, 1))
    loss.backward()
    pos = model.model.layers[3].self_attn.positioner
    for w in (pos.gate_map.weight, pos.content_map.weight, pos.final_map.weight):
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().max() > 0
    # autograd's dL/dW_z matches a central finite difference (the dL/dz path through RoPE)
    eps, w = 1e-6, pos.final_map.weight
    with torch.no_grad():
        w[1, 2] += eps
        up = model(idx, targets=torch.roll(idx, -1, 1))[1]
        w[1, 2] -= 2 * eps
        down = model(idx, targets=torch.roll(idx, -1, 1))[1]
        w[1, 2] += eps
    assert abs((up - down).item() / (2 * eps) - w.grad[1, 2].item()) <= 1e-6 * max(1.0, abs(w.grad[1, 2].item()))


# ----- accounting ----------------------------------------------------------------------------

def test_olmo2_1b_parameter_counts():
    shape = dict(vocab_size=100352, n_layer=16, n_head=16, n_embd=2048, intermediate_size=8192, block_size=4096)
    with torch.device("meta"):
        rope = GPT(GPTConfig(pos_mode="rope", **shape))
        repo = GPT(GPTConfig(pos_mode="repo", repo_start_layer=5, **shape))
    assert rope.num_params(non_embedding=False) == 1_484_916_736  # OLMo-2-0425-1B as published
    assert repo.num_positioner_params() == 11_579_392  # 11 layers x (2 * 2048 * 256 + 256 * 16)
    assert repo.num_params(non_embedding=False) - rope.num_params(non_embedding=False) == 11_579_392
    assert round(100 * repo.num_positioner_params() / rope.num_params(), 1) == 0.9  # the paper's 0.9%
    # the default start layer is the authors' floor(L/3): 5 of 16 (1B), 10 of 32 (7B); at least one RePo layer
    assert [GPTConfig(n_layer=n).repo_start_layer for n in (16, 32, 12, 4, 3, 2, 1)] == [5, 10, 4, 1, 1, 0, 0]
    assert GPTConfig(n_layer=16).layer_modes() == ["rope"] * 5 + ["repo"] * 11
    assert GPTConfig(n_layer=1, pos_mode="rope").layer_modes() == ["rope"]
    assert GPTConfig(n_layer=1).layer_modes() == ["repo"]


@pytest.mark.parametrize("chunks", [1, 4])
def test_flops_per_token_matches_pytorch_flop_counter(chunks, monkeypatch):
    import infra.loss as loss_module
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(pos_mode="repo", repo_start_layer=1).train()
    B, T = 2, 48
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_LOGITS", -(-B * T // chunks) * model.config.vocab_size)
    idx = torch.randint(0, 61, (B, T))
    # the math backend spells attention as two batched matmuls, which the counter sees in full
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, targets=idx)[1].backward()
    # not model FLOPs: with several chunks the loss recomputes the LM head in backward (2 V d per
    # token; one chunk keeps its logits), and with targets the last position's logits are returned
    # too (2 V d per sequence)
    head = 2 * model.lm_head.weight.numel()
    extra = head * ((B * T if chunks > 1 else 0) + B)
    assert counter.get_total_flops() - extra == pytest.approx(model.flops_per_token(T) * B * T, rel=0.01)


# ----- bad input -----------------------------------------------------------------------------

def test_bad_configs():
    with pytest.raises(ValueError, match="unknown pos_mode 'alibi'"):
        GPTConfig(pos_mode="alibi")
    with pytest.raises(ValueError, match="layer_pattern .* unknown modes \\['rpoe'\\]"):
        GPTConfig(n_layer=4, layer_pattern="rope,rpoe")
    with pytest.raises(ValueError, match="layer_pattern has 5 entries but the model has 4 layers"):
        GPTConfig(n_layer=4, layer_pattern="rope,rope,rope,rope,nope")
    for start in (4, 9, -2):
        with pytest.raises(ValueError, match=f"repo_start_layer={start} is out of range"):
            GPTConfig(n_layer=4, repo_start_layer=start)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=4, n_embd=32, n_kv_head=3)


def test_bad_token_ids():
    model = tiny()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\), got min 0, max 61"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="got min -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[0.0, 1.0]]))
    for dtype in (torch.int16, torch.uint8):  # nn.Embedding takes int32 and int64 only
        with pytest.raises(TypeError, match="int64 or int32"):
            model(torch.tensor([[0, 1]], dtype=dtype))
    assert torch.equal(model(torch.tensor([[0, 60]], dtype=torch.int32))[0], model(torch.tensor([[0, 60]]))[0])
    with pytest.raises(ValueError, match=r"got min 0, max 99"):
        model.generate(torch.tensor([[0, 99]]), 2)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(torch.tensor([1, 2, 3]))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        GPT.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    hf_olmo2(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        GPT.from_pretrained(no_weights)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT.from_pretrained(llama)
    sd = safetensors_torch.load_file(tmp_path / "ok" / "model.safetensors")
    for name, edit, msg in (("missing", lambda d: d.pop("model.layers.1.mlp.up_proj.weight"),
                             r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"),
                            ("shape", lambda d: d.__setitem__("model.layers.2.self_attn.k_norm.weight", torch.ones(7)),
                             r"model.layers.2.self_attn.k_norm.weight: checkpoint \(7,\) vs model \(64,\)"),
                            ("extra", lambda d: d.__setitem__("model.layers.0.self_attn.gate_map.weight", torch.ones(8, 64)),
                             "unexpected tensors.*model.layers.0.self_attn.gate_map.weight")):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps(cfg))
        d = dict(sd)
        edit(d)
        safetensors_torch.save_file(d, bad / "model.safetensors")
        with pytest.raises(ValueError, match=msg):
            GPT.from_pretrained(bad)
    with pytest.raises(ValueError, match="unknown override"):
        GPT.from_pretrained(tmp_path / "ok", pos_moed="repo")
    with pytest.raises(ValueError, match="repo_start_layer=3 is out of range"):
        GPT.from_pretrained(tmp_path / "ok", pos_mode="repo", repo_start_layer=3)
    # a RePo checkpoint that lost a positioner tensor is refused, not silently re-initialised
    sd_r, _ = write_reference_repo_checkpoint(tmp_path / "repo", {"dynamic_pe_mode": "swigluex_multihead",
                                                                  "dynmaic_pe_start_layer": 2}, 2)
    del sd_r["model.layers.3.self_attn.final_map.weight"]
    safetensors_torch.save_file(sd_r, tmp_path / "repo" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.3.self_attn.final_map.weight'\]"):
        GPT.from_pretrained(tmp_path / "repo")


def test_forward_with_targets_runs_the_lm_head_module():
    """FSDP2 gathers the final norm and the LM head as one unit, triggered by their forward hooks:
    the loss reads the head's weight directly, so forward must also call the module (for the last
    position's logits), or the next all-gather of the pair is skipped (torch 2.11)."""
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    idx = torch.randint(0, 64, (2, 8))
    logits, loss = model(idx, idx)
    assert calls == [(2, 1, 64)] and not logits.requires_grad and loss.requires_grad
    with torch.no_grad():
        model(idx, idx)
    assert len(calls) == 2
