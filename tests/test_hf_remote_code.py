"""The remote code exports carry (hf_interop/remote/): transformers' AutoModelForCausalLM with
trust_remote_code=True runs RePo, NoPE and mixed models exactly as model.GPT does (logits, greedy
generation with transformers' own cache, eager and sdpa attention); without it, stock transformers
refuses them; pure RoPE exports stay plain OLMo-2."""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hf_interop import remote_code
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")  # requirements-test.txt; never skipped in CI
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {"rope": dict(pos_mode="rope"), "nope": dict(pos_mode="nope"), "repo": dict(pos_mode="repo", repo_start_layer=1),
         "R2N1": dict(layer_pattern="rope,rope,nope"), "repo_gqa": dict(pos_mode="repo", repo_start_layer=1, n_kv_head=2)}
V = 97


def tiny(case, seed=0):
    """A 3-layer model with random weights whose RePo positions are spread to |z| ~ 50 (a fresh
    positioner gives |z| << 1, where a wrong rotation would hardly show)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=3, n_head=4, n_embd=64, block_size=64, **CASES[case])).eval()
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            if block.self_attn.positioner is not None:
                _, _, pos = model(idx, return_positions=True)
                block.self_attn.positioner.final_map.weight.mul_(50 / pos[i].abs().max())
        _, _, pos = model(idx, return_positions=True)
    repo = [i for i, m in enumerate(model.config.layer_modes()) if m == "repo"]
    if repo:
        assert 40 < float(pos[repo].abs().max()) <= 50.001
    return model, idx


def auto(path, **kw):
    if "dtype" in kw and int(transformers.__version__.split(".")[0]) < 5:
        kw["torch_dtype"] = kw.pop("dtype")  # the argument's name before transformers 5
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def rel(a, b):
    """Relative error ||a - b|| / ||b||. (The largest single difference is at float32's noise floor
    here: with |z| ~ 50, model.GPT's own float32 logits differ from its float64 ones by 1.5e-5 of
    the largest logit, and eager attention's by as much.)"""
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=list(CASES))
def export(request, tmp_path_factory):
    case = request.param
    model, idx = tiny(case)
    path = tmp_path_factory.mktemp(case)
    model.save_pretrained(str(path))
    return case, model, idx, path


def test_exports_name_remote_code_exactly_when_needed(export):
    case, model, _, path = export
    cfg = json.loads((path / "config.json").read_text())
    if case == "rope":  # plain OLMo-2: no remote code
        assert cfg["model_type"] == "olmo2" and "auto_map" not in cfg
        assert not any(os.path.exists(path / f) for f in remote_code.FILES)
    else:
        assert (cfg["model_type"], cfg["architectures"]) == ("repo_olmo2", ["RePoOlmo2ForCausalLM"])
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_repo_olmo2.RePoOlmo2ForCausalLM"
        for f in remote_code.FILES:  # self-contained: nothing of this project is imported
            tree = ast.parse((path / f).read_text())
            imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                      {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            assert {m.split(".")[0] for m in imports} <= {"torch", "transformers"}, imports
    assert json.loads((path / "generation_config.json").read_text())["_from_model_config"] is True
    # our own reader still loads it, to the same model
    back = GPT.from_pretrained(str(path))
    assert back.config.layer_modes() == model.config.layer_modes()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_trust_remote_code_logits_equal_ours(export, impl, tmp_path):
    case, model, idx, path = export
    if case == "rope":  # stock Olmo2ForCausalLM runs the plain export; the remote code runs the same weights too
        stock = auto(path, attn_implementation=impl)
        assert type(stock).__name__ == "Olmo2ForCausalLM"
        with torch.no_grad():
            assert rel(stock(idx).logits, model(idx)[0]) <= 1e-5
        shutil.copytree(path, tmp_path / "rope")
        path = tmp_path / "rope"
        remote_code.write_remote_files(str(path))
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(remote_code.remote_config(cfg)))
    with torch.no_grad():
        ours32 = model(idx)[0]
        hf32 = auto(path, trust_remote_code=True, attn_implementation=impl)
        assert type(hf32).__name__ == "RePoOlmo2ForCausalLM" and hf32.config._attn_implementation == impl
        assert rel(hf32(idx).logits, ours32) <= 1e-5
        ours64 = GPT.from_pretrained(str(path)).double().eval()(idx)[0]
        hf64 = auto(path, trust_remote_code=True, attn_implementation=impl, dtype=torch.float64)
        assert rel(hf64(idx).logits, ours64) <= 1e-12  # float64: the same math, rounding only


def test_eager_and_sdpa_agree_and_padding_is_masked(export):
    case, _, idx, path = export
    if case == "rope":
        return  # stock OLMo-2's own attention: tested by transformers
    eager, sdpa = (auto(path, trust_remote_code=True, attn_implementation=i, dtype=torch.float64) for i in ("eager", "sdpa"))
    with torch.no_grad():
        full = eager(idx).logits
        assert rel(sdpa(idx).logits, full) <= 1e-12
        # the second sequence left-padded by 5 tokens: its real tokens see the same logits
        pad = torch.cat([torch.zeros(2, 5, dtype=idx.dtype), idx], 1)
        mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones_like(idx)], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        for m in (eager, sdpa):
            out = m(pad, attention_mask=mask, position_ids=positions).logits[:, 5:]
            assert rel(out, full) <= 1e-12


def test_loss_hidden_states_and_attentions(export):
    """labels give GPT's next-token loss; output_hidden_states and (eager) output_attentions are
    returned, not ignored: the last hidden state is the final norm's output, the weights sum to 1
    over the causal past."""
    case, model, idx, path = export
    if case == "rope":
        return
    hf = auto(path, trust_remote_code=True, attn_implementation="eager")
    with torch.no_grad():
        out = hf(idx, labels=idx, output_hidden_states=True, output_attentions=True)
        assert float(out.loss) == pytest.approx(float(model(idx[:, :-1], targets=idx[:, 1:])[1]), rel=1e-5)
        assert len(out.hidden_states) == 4 and rel(hf.lm_head(out.hidden_states[-1]), out.logits) < 1e-6
        a = out.attentions[0]
        assert len(out.attentions) == 3 and a.shape == (2, 4, 24, 24)
        assert torch.allclose(a.sum(-1), torch.ones(())) and float(a.triu(1).abs().max()) == 0.0
    with pytest.raises(ValueError, match="output_attentions needs attn_implementation='eager'"):
        auto(path, trust_remote_code=True, attn_implementation="sdpa")(idx, output_attentions=True)


def test_generate_with_transformers_cache_equals_ours(export):
    case, model, idx, path = export
    hf = auto(path, trust_remote_code=True)
    prompt = idx[:1, :8]
    with torch.no_grad():
        ours = model.generate(prompt, 20, top_k=1)
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs.shape == (1, 28) and torch.equal(theirs, ours)


def test_stock_transformers_refuses_without_trust_remote_code(export):
    case, model, idx, path = export
    if case == "rope":  # runs, and correctly (test_trust_remote_code_logits_equal_ours)
        return
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False)


def test_one_command_adds_remote_code_to_the_authors_layout(tmp_path, capsys):
    """The authors' release is model_type olmo2 + pe_config: stock transformers runs it as RoPE
    everywhere. One command makes it run as RePo (trust_remote_code) and keeps the old config."""
    model, idx = tiny("repo")
    path = tmp_path / "authors"
    model.save_pretrained(str(path))
    cfg = json.loads((path / "config.json").read_text())
    for key in ("auto_map", "layer_pattern"):
        cfg.pop(key, None)
        cfg["pe_config"].pop(key, None)
    cfg.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"])
    authors = json.dumps(cfg, indent=2)
    (path / "config.json").write_text(authors)
    for f in remote_code.FILES:
        os.remove(path / f)
    with torch.no_grad():
        wrong = auto(path)(idx).logits  # stock OLMo-2, the positioners dropped: RoPE logits
        assert rel(wrong, model(idx)[0]) > 1e-2
    cmd = [sys.executable, "-m", "hf_interop.remote_code", str(path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (path / "config.json.orig").read_text() == authors
    with torch.no_grad():
        assert rel(auto(path, trust_remote_code=True)(idx).logits, model(idx)[0]) <= 1e-5
    assert remote_code.main([str(path)]) == 0  # again: the original config stays the authors'
    assert (path / "config.json.orig").read_text() == authors
    rope, _ = tiny("rope")
    rope.save_pretrained(str(tmp_path / "rope"))
    before = (tmp_path / "rope" / "config.json").read_text()
    assert remote_code.main([str(tmp_path / "rope")]) == 0 and "nothing changed" in capsys.readouterr().out
    assert (tmp_path / "rope" / "config.json").read_text() == before and not (tmp_path / "rope" / "config.json.orig").exists()
    run = subprocess.run([sys.executable, "-m", "hf_interop.remote_code", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "missing" in run.stderr
