"""train.py on the CPU: the loss falls; resuming after an interruption reproduces the uninterrupted
run bit for bit; 2-process DDP and FSDP2 (torchrun, gloo) match one process; continual
pre-training from a transformers OLMo-2 checkpoint starts at that model's own loss; config errors
and every bad input of the issue fail clearly without touching earlier work.

    python -m pytest -q tests/test_train.py
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from data import prepare
from data.tokenizer import get_tokenizer, load_tokenizer, save_tokenizer
from data.tokens import read_tokens, write_tokens
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 layers (layer 0 RoPE, layer 1 RePo), byte-level data, 2 micro-steps of 4 x 32 tokens per step
TINY = ["--device=cpu", "--n_layer=2", "--repo_start_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--learning_rate=1e-2", "--warmup_iters=2", "--min_lr=1e-3",
        "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--sample_tokens=0", "--max_iters=8"]
EXACT = ("iter", "loss", "lr", "grad_norm", "tokens", "val_loss")  # everything but timings and memory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, and on a busy 2-core
    machine a descheduled OpenMP thread turns 15 ms steps into seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(byte_data, tmp_path_factory):
    """The uninterrupted single-process run the other runs are compared with."""
    out = str(tmp_path_factory.mktemp("ref"))
    train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])
    return out


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: r[k] for k in EXACT if k in r} for r in map(json.loads, f)]


def losses(out_dir):
    return [r["loss"] for r in records(out_dir) if "loss" in r]


def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    res = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def weights(path):
    return GPT.from_pretrained(os.path.join(path, "hf")).state_dict()


# ----- training works ------------------------------------------------------------------------

def test_loss_falls_and_outputs(byte_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20",
                       "--sample_tokens=20", "--sample_prompt=The "])
    log = records(out)
    steps = [r for r in log if "loss" in r]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 41))  # steps done, as the val loss and checkpoint count
    assert abs(steps[0]["loss"] - math.log(384)) < 0.3  # uniform over the padded vocabulary at init
    assert np.mean([r["loss"] for r in steps[-5:]]) < steps[0]["loss"] - 2.0
    assert len(vals) == 3 and vals[-1] < vals[0] - 2.0
    printed = capsys.readouterr().out
    assert "sample (20 tokens" in printed and "iter 40: loss" in printed and "MFU n/a" in printed
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert cfg["max_iters"] == 40 and cfg["vocab_size"] == 0 and cfg["pos_mode"] == "repo"
    assert set(cfg) == set(train.FIELDS)
    # the export reloads as the trained model, with the data's tokenizer next to it
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["meta"]["iter_num"] == 40 and state["meta"]["samples_seen"] == 40 * 8
    model = GPT.from_pretrained(os.path.join(out, "hf"))
    assert model.config.layer_modes() == ["rope", "repo"] and model.config.vocab_size == 384
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert load_tokenizer(os.path.join(out, "hf")).name == "byte"
    assert json.load(open(os.path.join(out, "hf", "config.json")))["eos_token_id"] == 256


def test_resume_after_interruption_is_bit_identical(byte_data, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = train.get_lr

    def crash_at_6(it, c):
        if it == 6:
            raise KeyboardInterrupt  # killed mid-run, after the checkpoint at iteration 4
        return real(it, c)

    monkeypatch.setattr(train, "get_lr", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["meta"]["iter_num"] == 4
    assert len(losses(out)) == 6
    monkeypatch.setattr(train, "get_lr", real)
    train.main([f"--out_dir={out}", "--init_from=resume"])  # the config comes from the checkpoint
    assert records(out) == records(reference)  # exact floats, no duplicated lines
    ref = weights(reference)
    for k, v in weights(out).items():
        assert torch.equal(v, ref[k]), k


def test_torchrun_ddp_matches_single_process(byte_data, reference, tmp_path):
    out = str(tmp_path / "ddp")
    printed = torchrun(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])
    assert "2 process(es)" in printed
    assert len(re.findall(r"^iter 8: loss .* \| 0:00:00 left$", printed, re.M)) == 1  # rank 0 only
    got, want = records(out), records(reference)
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    for g, w in zip(got, want):
        for k in ("loss", "val_loss", "grad_norm"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-5), (k, g, w)  # only the summation order differs
        assert g.get("tokens") == w.get("tokens") and g.get("lr") == w.get("lr")


def test_torchrun_fsdp2_checkpoint_and_resume(byte_data, reference, tmp_path):
    out = str(tmp_path / "fsdp")
    torchrun(TINY + [f"--dataset={byte_data}", f"--out_dir={out}", "--fsdp=True", "--max_iters=4",
                     "--lr_decay_iters=8"])
    assert os.path.exists(os.path.join(out, "ckpt_fsdp", "trainer_state.pt"))
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    # resumed on ONE process: torch.distributed.checkpoint reshards, the data order does not care
    torchrun([f"--out_dir={out}", "--init_from=resume", "--max_iters=8"], nproc=1)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    ref = weights(reference)
    for k, v in weights(out).items():  # gathered onto rank 0 and exported
        assert torch.allclose(v, ref[k], atol=1e-5, rtol=0), k


# ----- continual pre-training from OLMo-2 -----------------------------------------------------

@pytest.fixture
def olmo2_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Olmo2Config(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, rope_theta=10000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=None,
                                   eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.Olmo2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced one would show in the loss
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    path = str(tmp_path / "olmo2")
    hf.save_pretrained(path)
    return hf, path


def exact_windows_data(byte_data, folder, n_train, n_val, T):
    """A dataset of exactly n_train (n_val) windows, so the first global batch is all of them."""
    os.makedirs(folder)
    toks = read_tokens(os.path.join(byte_data, "train_000.bin"))
    write_tokens(os.path.join(folder, "train.bin"), toks[:n_train * T + 1], "byte", 257, 256)
    write_tokens(os.path.join(folder, "val.bin"), toks[10_000:10_000 + n_val * T + 1], "byte", 257, 256)
    with open(os.path.join(byte_data, "tokenizer.json")) as src:
        with open(os.path.join(folder, "tokenizer.json"), "w") as dst:
            dst.write(src.read())
    return folder


def hf_loss(hf, tokens, T):
    rows = torch.from_numpy(np.asarray(tokens[:len(tokens) - 1]).astype(np.int64)).view(-1, T)
    targets = torch.from_numpy(np.asarray(tokens[1:]).astype(np.int64)).view(-1, T)
    with torch.no_grad():
        logits = hf(rows).logits.double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item()


def test_continual_pretraining_starts_at_the_checkpoints_loss(byte_data, olmo2_dir, tmp_path):
    hf, path = olmo2_dir
    T = 32
    data = exact_windows_data(byte_data, str(tmp_path / "d"), n_train=4, n_val=3, T=T)
    out = str(tmp_path / "run")
    train.main(["--device=cpu", f"--init_from={path}", "--pos_mode=rope", f"--dataset={data}", f"--out_dir={out}",
                f"--block_size={T}", "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=1",
                "--eval_interval=1", "--log_interval=1", "--sample_tokens=0"])
    log = records(out)
    # transformers' loss on the same tokens: the train batch is all 4 windows, val all 3
    assert log[0]["val_loss"] == pytest.approx(hf_loss(hf, read_tokens(os.path.join(data, "val.bin")), T), abs=2e-5)
    assert log[1]["loss"] == pytest.approx(hf_loss(hf, read_tokens(os.path.join(data, "train.bin")), T), abs=2e-5)
    cfg = json.load(open(os.path.join(out, "train_config.json")))
    assert (cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]) == (2, 64, 384)  # recorded from the checkpoint


def test_continual_pretraining_adds_fresh_positioners(byte_data, olmo2_dir, tmp_path):
    hf, path = olmo2_dir
    out = str(tmp_path / "run")
    train.main(["--device=cpu", f"--init_from={path}", "--pos_mode=repo", "--repo_start_layer=1",
                f"--dataset={byte_data}", f"--out_dir={out}", "--block_size=32", "--batch_size=2", "--max_iters=0",
                "--eval_iters=1", "--sample_tokens=0"])
    model = GPT.from_pretrained(os.path.join(out, "hf"))  # max_iters=0: the loaded model, exported
    assert model.config.layer_modes() == ["rope", "repo"]
    hf_state = hf.state_dict()
    for k, v in model.state_dict().items():
        if ".positioner." in k:
            assert k.startswith("model.layers.1.") and 0.005 < v.std() < 0.03  # fresh N(0, 0.02)
        else:
            assert torch.equal(v, hf_state[k]), k
    with pytest.raises(train.TrainError, match="architecture"):
        train.main([f"--init_from={path}", "--n_layer=3", f"--dataset={byte_data}", f"--out_dir={tmp_path / 'x'}"])


# ----- configuration --------------------------------------------------------------------------

def test_config_parsing_and_errors(tmp_path, monkeypatch):
    preset = tmp_path / "p.py"
    preset.write_text("import math\nmax_iters = 3\nlearning_rate = 1\nlayer_pattern = 'rope,nope'\n_private = 5\n")
    assert train.parse_args([str(preset), "--max_iters=2"]) == dict(max_iters=2, learning_rate=1.0,
                                                                    layer_pattern="rope,nope")
    assert train.parse_args(["--max_iters=2", str(preset)])["max_iters"] == 3  # later wins
    assert train.parse_args(["--compile=true", "--rope_theta=5e5", "--dataset=x=y"]) == \
        dict(compile=True, rope_theta=500000.0, dataset="x=y")
    bad = {"--max_iter=5": r"unknown config key 'max_iter'.*did you mean 'max_iters'.*valid keys: out_dir, init_from",
           "--max_iters=abc": "max_iters must be int", "--compile=maybe": "compile must be bool",
           "--max_iters": "expected --key=value", "notes.txt": "neither --key=value nor a preset"}
    for arg, msg in bad.items():
        with pytest.raises(train.TrainError, match=msg):
            train.main([arg])
    preset.write_text("max_iters = '10'\n")
    with pytest.raises(train.TrainError, match=r"max_iters must be int, got str '10' in .*p\.py"):
        train.main([str(preset)])
    preset.write_text("n_layers = 10\n")
    with pytest.raises(train.TrainError, match=r"unknown config key 'n_layers' in .*p\.py"):
        train.main([str(preset)])
    for arg, msg in {"--batch_size=0": "out of range: batch_size=0", "--lr_schedule=step": "choose one of",
                     "--beta2=1.5": "beta1 and beta2", "--fsdp=True": "needs torchrun"}.items():
        with pytest.raises(train.TrainError, match=msg):
            train.main([arg, f"--out_dir={tmp_path / 'none'}"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.TrainError, match="must be a multiple of 2"):
        train.main(["--gradient_accumulation_steps=3", f"--out_dir={tmp_path / 'none'}"])
    assert not os.path.exists(tmp_path / "none")


def test_lr_schedules():
    c = train.TrainConfig(**train.parse_args([os.path.join(ROOT, "config", "olmo2_1b_repo.py")]))
    peak = 7.4487e-5  # the paper's peak; 200 warmup steps (fresh AdamW moments), linear to 0 at 23,842, 10 at 0
    assert [train.get_lr(i, c) for i in (0, 199, 200, 12021, 23842, 23851)] == \
        pytest.approx([peak / 201, peak * 200 / 201, peak, peak / 2, 0, 0])
    c = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=9, max_iters=109)
    assert train.get_lr(0, c) == pytest.approx(0.1) and train.get_lr(8, c) == pytest.approx(0.9)
    assert train.get_lr(59, c) == pytest.approx(0.55) and train.get_lr(109, c) == pytest.approx(0.1)
    rope = train.parse_args([os.path.join(ROOT, "config", "olmo2_1b_rope.py")])
    repo = train.parse_args([os.path.join(ROOT, "config", "olmo2_1b_repo.py")])
    assert {k for k in repo if rope[k] != repo[k]} == {"pos_mode", "out_dir"}


# ----- bad input: a clear error, nothing lost -------------------------------------------------

def test_bad_data(byte_data, tmp_path):
    run = [*TINY, f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(FileNotFoundError, match="no train.bin"):
        train.main(run + [f"--dataset={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="block_size=100000 needs at least 100001 tokens"):
        train.main(run + [f"--dataset={byte_data}", "--block_size=100000"])
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in ("tokenizer.json", "val.bin", "train_000.bin"):
        with open(os.path.join(byte_data, f), "rb") as src:
            (bad / f).write_bytes(src.read())
    with open(bad / "train_000.bin", "r+b") as f:
        f.truncate(os.path.getsize(bad / "train_000.bin") - 3)
    with pytest.raises(ValueError, match="truncated"):
        train.main(run + [f"--dataset={bad}"])
    with open(os.path.join(byte_data, "train_000.bin"), "rb") as src:
        (bad / "train_000.bin").write_bytes(src.read())
    save_tokenizer(get_tokenizer("olmo2"), str(bad))  # byte-level token files, an OLMo-2 tokenizer beside them
    with pytest.raises(train.TrainError, match=r"token files were made with byte \(n_vocab 257\) but the folder's "
                                                r"tokenizer is olmo2"):
        train.main(run + [f"--dataset={bad}"])
    assert not os.path.exists(tmp_path / "out")


def test_vocabulary_mismatch(byte_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Olmo2Config(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    transformers.Olmo2ForCausalLM(cfg).save_pretrained(tmp_path / "big")
    with pytest.raises(train.TrainError, match=r"vocabulary \(2048\) does not fit the data's tokenizer byte"):
        train.main([f"--init_from={tmp_path / 'big'}", f"--dataset={byte_data}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(train.TrainError, match=r"vocabulary \(100\) does not fit"):
        train.main(TINY + ["--vocab_size=100", f"--dataset={byte_data}", f"--out_dir={tmp_path / 'o'}"])


def test_out_dir_and_checkpoint_protection(byte_data, reference, tmp_path):
    ckpt = os.path.join(reference, "ckpt.pt")
    before = open(ckpt, "rb").read()
    with pytest.raises(train.TrainError, match="already holds a run's checkpoint"):
        train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={reference}"])
    with pytest.raises(train.TrainError, match=r"cannot change \['n_layer'\]"):
        train.main([f"--out_dir={reference}", "--init_from=resume", "--n_layer=3"])
    assert open(ckpt, "rb").read() == before
    with pytest.raises(train.TrainError, match="holds no checkpoint"):
        train.main([f"--out_dir={tmp_path / 'empty'}", "--init_from=resume"])
    for name, blob in (("garbage", b"not a checkpoint"), ("truncated", before[:len(before) // 2])):
        out = tmp_path / name
        out.mkdir()
        (out / "ckpt.pt").write_bytes(blob)
        with pytest.raises(train.TrainError, match="corrupt or unreadable"):
            train.main([f"--out_dir={out}", "--init_from=resume"])
        assert (out / "ckpt.pt").read_bytes() == blob


def test_nan_loss_stops_and_keeps_last_good_checkpoint(byte_data, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = train.get_lr
    monkeypatch.setattr(train, "get_lr", lambda it, c: float("nan") if it == 5 else real(it, c))
    with pytest.raises(train.TrainError, match=r"non-finite values at iteration 6 \(loss nan.*"
                                                r"last good checkpoint is .*ckpt.pt \(iteration 4\)"):
        train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["meta"]["iter_num"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.setattr(train, "get_lr", real)
    train.main([f"--out_dir={out}", "--init_from=resume"])  # the kept checkpoint carries on normally
    assert records(out) == records(reference)
