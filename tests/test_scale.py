"""Memory at the paper's scale, checked on the CPU: the chunked LM loss against the plain
cross-entropy + z-loss; a train step at OLMo-2's vocabulary and 4096 tokens in bounded memory;
meta-device construction (whole and FSDP2-sharded) against the eager build and from_pretrained;
FSDP2 keeps only sharded gradients between micro-steps and matches one process; activation
checkpointing changes no gradient; the memory plan against hand-computed bytes and autograd's
saved tensors; the refusal of a step that cannot fit; the GPU-name lookup; streaming data
preparation (peak memory, atomic rebuild, bad input).

    python -m pytest -q tests/test_scale.py
"""
import gzip
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infra import memory
import train
from data import prepare
from data.tokens import read_tokens
from infra.loss import lm_loss
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=2", "--repo_start_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=2", "--gradient_accumulation_steps=4", "--learning_rate=1e-2", "--warmup_iters=2",
        "--min_lr=1e-3", "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--sample_tokens=0",
        "--max_iters=4", "--z_loss=1e-3"]


# one intra-op thread per process: the tests' several processes share 2 cores without oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


def run_py(code, *args, nproc=0):
    """Run `code` in a fresh interpreter (under torchrun with nproc processes if nproc) from the repo root."""
    path = os.path.join(ROOT, f".test_scale_{os.getpid()}.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(code))
    try:
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                  if nproc else []) + [path, *map(str, args)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    finally:
        os.remove(path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def tiny_config(**kw):
    return GPTConfig(**{**dict(vocab_size=131, n_layer=2, n_head=2, n_embd=24, intermediate_size=40,
                               repo_start_layer=1, block_size=16), **kw})


# ----- the chunked LM loss -------------------------------------------------------------------

def plain_loss(logits, targets, z_loss):
    """The unchunked reference: F.cross_entropy on full logits plus OLMo's z-loss on the same tokens."""
    ce = F.cross_entropy(logits, targets, ignore_index=-1)
    return ce, ce + z_loss * torch.logsumexp(logits, -1)[targets != -1].pow(2).mean()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_loss_equals_cross_entropy_plus_z_loss(dtype, tol):
    g = torch.Generator().manual_seed(0)
    N, d, V = 53, 16, 97
    h = (3 * torch.randn(N, d, generator=g, dtype=dtype)).requires_grad_()
    w = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 7, 52]] = -1  # ignored positions
    for z_loss in (0.0, 1e-2):
        ce_ref, objective = plain_loss((h.double() @ w.double().t()), t, z_loss)  # float64 math
        gh, gw = (g.double() for g in torch.autograd.grad(objective, (h, w)))
        for chunk in (1, 8, 53, 1000):  # one row, ragged, exact, everything at once
            loss = lm_loss(h, w, t, z_loss=z_loss, chunk=chunk)
            assert loss.dtype == dtype and loss.item() == pytest.approx(ce_ref.item(), rel=tol, abs=0)
            dh, dw = torch.autograd.grad(loss, (h, w))
            assert torch.allclose(dh.double(), gh, rtol=0, atol=tol * gh.abs().max())
            assert torch.allclose(dw.double(), gw, rtol=0, atol=tol * gw.abs().max())
        # same dtype, the plain path: value equal to rounding, returned loss is the cross-entropy only
        same_ce, _ = plain_loss(h @ w.t(), t, z_loss)
        assert lm_loss(h, w, t, z_loss=z_loss, chunk=8).item() == pytest.approx(same_ce.item(), rel=tol)


def test_model_loss_and_gradients_equal_the_plain_path():
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_word_embeddings=True)).double()
    idx = torch.randint(0, 131, (3, 16))
    tgt = torch.roll(idx, -1, 1)
    tgt[:, -1] = -1
    logits, loss = model(idx, tgt, z_loss=1e-3)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    full, none = model(idx)
    assert none is None and torch.allclose(logits, full[:, -1:], rtol=0, atol=1e-15)  # with targets: the last position only
    ce, objective = plain_loss(full.flatten(0, 1), tgt.flatten(), 1e-3)
    objective.backward()
    assert loss.item() == pytest.approx(ce.item(), rel=1e-13)
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, rtol=1e-9, atol=1e-13), k


def test_train_step_at_olmo_vocabulary_and_4096_tokens_stays_under_1_gib():
    # the plain path would hold [4096, 100352] float32 logits (1.6 GB) twice; this one holds a chunk
    out = run_py("""
        import math
        from contextlib import nullcontext
        import torch, train
        from model import GPT, GPTConfig
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=100352, n_layer=1, n_head=2, n_embd=32, block_size=4096, repo_start_layer=0))
        c = train.TrainConfig(z_loss=1e-5)
        opt = train.configure_optimizer(model, c, torch.device("cpu"))
        xy = torch.randint(0, 100352, (1, 4097))
        loss, gnorm = train.train_step(model, opt, [(xy[:, :-1], xy[:, 1:])], 1e-3, c, nullcontext())
        assert abs(loss - math.log(100352)) < 0.1 and math.isfinite(gnorm), (loss, gnorm)
        # the process's peak less its file pages (libraries, which a warm page cache maps in by the
        # hundred MB or a busy machine evicts): anonymous memory, what the logits would take
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(sum(sign * int(status[k].split()[0]) * 1024 for sign, k in ((1, "VmHWM"), (-1, "RssFile"), (-1, "RssShmem"))))
    """)
    assert int(out.split()[-1]) < 2**30


# ----- meta-device construction -----------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_then_init_or_load_equals_eager(tmp_path, tied):
    c = train.TrainConfig(device="cpu")
    cfg = tiny_config(tie_word_embeddings=tied)
    torch.manual_seed(7)
    eager = GPT(cfg)
    torch.manual_seed(7)
    with torch.device("meta"):
        raw = GPT(cfg)
    assert all(p.is_meta for p in raw.parameters())
    train.parallelize(raw, c, torch.device("cpu"))
    want = eager.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in raw.state_dict().items())
    # one tensor under two names, as in the eager build (to_empty alone would make two)
    assert (raw.lm_head.weight is raw.model.embed_tokens.weight) == tied
    torch.manual_seed(8)
    other = GPT(cfg)
    assert not torch.equal(other.lm_head.weight, eager.lm_head.weight)  # the seed matters
    # from an HF directory: build on meta, fill from the checkpoint; RePo-from-RoPE keeps fresh positioners
    rope = GPT(tiny_config(pos_mode="rope", tie_word_embeddings=tied))
    rope.save_pretrained(tmp_path / "hf")
    given = dict(init_from=str(tmp_path / "hf"), pos_mode="repo", repo_start_layer=1, block_size=16)
    torch.manual_seed(3)
    raw, c2, weights = train.build_model(train.TrainConfig(**given), given, 131)
    train.parallelize(raw, c2, torch.device("cpu"), weights)
    torch.manual_seed(3)
    ref = GPT.from_pretrained(str(tmp_path / "hf"), pos_mode="repo", repo_start_layer=1, block_size=16)
    want = ref.state_dict()
    assert any(".positioner." in k for k in want)
    assert all(torch.equal(v, want[k]) for k, v in raw.state_dict().items())
    assert (raw.lm_head.weight is raw.model.embed_tokens.weight) == tied


FSDP_WORKER = """
    import sys, torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    import train
    from model import GPT, GPTConfig
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cpu = torch.device("cpu")
    cfg = GPTConfig(vocab_size=131, n_layer=2, n_head=2, n_embd=24, intermediate_size=40, repo_start_layer=1)
    c = train.TrainConfig(fsdp=True, device="cpu", activation_checkpointing=True)
    full = lambda m: get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))

    # meta build -> shard -> per-shard init == eager build (131 rows: uneven shards of 66 and 65)
    torch.manual_seed(5)
    eager = GPT(cfg)
    torch.manual_seed(5)
    with torch.device("meta"):
        raw = GPT(cfg)
    model, sync = train.parallelize(raw, c, cpu)
    assert sync is None
    assert raw.lm_head.weight.to_local().shape[0] == (66, 65)[rank]
    got = full(raw)
    assert all(torch.equal(got[k], v) for k, v in eager.state_dict().items())

    # meta build -> shard -> each rank reads its rows of an HF checkpoint == from_pretrained
    if rank == 0:
        eager.save_pretrained(sys.argv[1])
    dist.barrier()
    torch.manual_seed(99)  # a different init: every tensor must come from the file
    with torch.device("meta"):
        loaded = GPT(cfg)
    train.parallelize(loaded, c, cpu, (sys.argv[1], cfg.layer_modes()))
    got = full(loaded)
    assert all(torch.equal(got[k], v) for k, v in GPT.from_pretrained(sys.argv[1]).state_dict().items())

    # between micro-steps only sharded gradients exist: after micro-step 1 every .grad is this
    # rank's reduce-scattered shard (with gradient sync switched off they would still be None)
    class Probe:
        seen = []
        def __enter__(self):
            self.seen.append([p.grad for p in raw.parameters()])
        def __exit__(self, *exc):
            return False
    opt = train.configure_optimizer(raw, c, cpu)
    xy = torch.randint(0, 131, (2, 2, 17), generator=torch.Generator().manual_seed(rank))
    train.train_step(model, opt, [(b[:, :-1], b[:, 1:]) for b in xy], 1e-3, c, Probe(), sync)
    first, second = Probe.seen
    assert all(g is None for g in first)
    for g, p in zip(second, raw.parameters()):
        assert g is not None and g.placements == p.placements and g.to_local().shape == p.to_local().shape
    print("OK")
"""


def test_fsdp2_meta_init_sharded_load_and_sharded_gradients(tmp_path):
    assert "OK" in run_py(FSDP_WORKER, tmp_path / "hf", nproc=2)


def test_fsdp2_with_accumulation_and_checkpointing_matches_one_process(byte_data, tmp_path):
    """...with an evaluation between training steps: a forward without backward must leave FSDP2's units
    ready for the next training step (torch 2.11 trained on sharded parameters after one)."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "fsdp")
    mid_eval = TINY + [f"--dataset={byte_data}", "--eval_interval=2"]
    train.main(mid_eval + [f"--out_dir={ref}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    res = subprocess.run(cmd + mid_eval + [f"--out_dir={out}", "--fsdp=True", "--activation_checkpointing=True"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    def log(d):
        with open(os.path.join(d, "log.jsonl")) as f:
            return [json.loads(line) for line in f]
    got, want = log(out), log(ref)
    assert [r["iter"] for r in got] == [r["iter"] for r in want]  # 2 processes x 2 micro-steps each
    assert [r["iter"] for r in got if "val_loss" in r] == [0, 2, 4]
    for g, w in zip(got, want):
        for k in ("loss", "val_loss", "grad_norm"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-5), (k, g, w)
    a, b = GPT.from_pretrained(os.path.join(out, "hf")), GPT.from_pretrained(os.path.join(ref, "hf"))
    for k, v in a.state_dict().items():
        off = (v - b.state_dict()[k]).abs() > 1e-5
        # Adam divides by |gradient|: an embedding entry whose gradient is a near-cancelling sum (a
        # rare token) can move differently when only the summation order differs; one such entry
        # of 12,288 shows up here. Everything else agrees to 1e-5.
        assert off.sum() <= (2 if k == "model.embed_tokens.weight" else 0), k


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config(layer_pattern="rope,repo,nope", n_layer=3)).double()
    idx = torch.randint(0, 131, (2, 16))
    grads = []
    for on in (False, True, 2):  # none, every block, the first two
        model.activation_checkpointing = on
        model.zero_grad()
        loss = model(idx, torch.roll(idx, -1, 1), z_loss=1e-3)[1]
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    for other in grads[1:]:
        assert grads[0][0] == other[0]
        assert all(torch.equal(a, b) for a, b in zip(grads[0][1], other[1]))


def test_activation_checkpointing_layers_reach_the_model_and_are_checked():
    given = dict(n_layer=3, n_embd=48, n_head=4, activation_checkpointing=True, init_from="scratch")
    for n, want in ((0, 3), (2, 2)):
        c = train.TrainConfig(**given, activation_checkpointing_layers=n)
        assert train.build_model(c, given, 200)[0].activation_checkpointing == want
    assert train.build_model(train.TrainConfig(**{**given, "activation_checkpointing": False},
                                               activation_checkpointing_layers=2), given, 200)[0].activation_checkpointing == 0
    with pytest.raises(train.TrainError, match=r"activation_checkpointing_layers=4 but the model has 3 layers"):
        train.main(["--n_layer=3", "--activation_checkpointing=True", "--activation_checkpointing_layers=4", "--dry_run"])


# ----- the memory plan ------------------------------------------------------------------------

def plan_1b(**kw):
    given = train.parse_args([os.path.join(ROOT, "config", "olmo2_1b_repo.py")])
    given.update(init_from="scratch", **kw)
    c = train.TrainConfig(**given)
    raw, c, _ = train.build_model(c, given, 100278)
    return raw, dict(memory.memory_plan(raw, c, 8, "cuda"))


def test_memory_plan_bytes_for_the_1b_shape():
    raw, ddp = plan_1b()
    assert all(p.is_meta for p in raw.parameters())  # nothing allocated
    d, I, V, L, H = 2048, 8192, 100352, 16, 16
    per_layer = 4 * d * d + 3 * d * I + 4 * d  # q, k, v, o; gate, up, down; QK-norm and the two norms
    positioner = 2 * d * (d // 8) + (d // 8) * H
    P = 2 * V * d + L * per_layer + d + 11 * positioner
    assert P == 1_484_916_736 + 11_579_392  # OLMo-2-0425-1B + RePo in layers 5..15
    assert ddp["parameters, float32"] == 4 * P and ddp["gradients, float32"] == 4 * P
    assert ddp["AdamW moments"] == 8 * P  # exp_avg and exp_avg_sq, fused AdamW on CUDA
    assert ddp["bf16 weight copies (autocast)"] == 2 * L * (4 * d * d + 3 * d * I)
    _, fsdp = plan_1b(fsdp=True)
    assert fsdp["parameters, float32 shard"] == 4 * P / 8 and fsdp["gradients, float32 shard"] == 4 * P / 8
    assert fsdp["AdamW moments, shard"] == 8 * P / 8  # fused AdamW on CUDA, FSDP2 too
    # bf16 compute: all-gathered in bf16 (infra/sharding.py), no autocast copies of the weights
    assert fsdp["all-gathered parameters (bf16) (root + 3 blocks)"] == 2 * (2 * V * d + d + 3 * (per_layer + positioner))
    assert "bf16 weight copies (autocast)" not in fsdp
    assert train.dry_run(train.parse_args([os.path.join(ROOT, "config", "olmo2_1b_repo.py"), "--dry_run",
                                           "--dry_run_world=8", "--fsdp=True"]))


def saved_bytes(model, idx, ctx):
    """Bytes of the distinct storages autograd saves for backward, parameters left out."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(idx, torch.roll(idx, -1, 1))
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ac", [0, 3, 1, 2])  # blocks recomputed in backward, of 3
def test_memory_plan_activations_match_autograds_saved_tensors(dtype, ac):
    c = train.TrainConfig(device="cpu", dtype=dtype, batch_size=3, block_size=40, activation_checkpointing=ac > 0,
                          activation_checkpointing_layers=ac, n_layer=3, layer_pattern="rope,repo,nope", n_embd=48,
                          n_head=4, intermediate_size=72)
    torch.manual_seed(0)
    model = GPT(train.model_config(c, 200))
    model.activation_checkpointing = memory.checkpointed_blocks(c)
    plan = dict(memory.memory_plan(model, c, 1, "cpu"))
    copies = plan.get("bf16 weight copies (autocast)", 0)
    # the recomputed blocks' weight copies live only while one of them is recomputed: one block's
    planned = plan["activations saved for backward (3 x 40 tokens)"] + copies - (copies / (3 - ac + 1) if ac else 0)
    measured = saved_bytes(model, torch.randint(0, 200, (3, 40)), train.autocast(torch.device("cpu"), c))
    # what the plan leaves out: RoPE's broadcast position table, the frequencies, the loss's scalars
    assert planned <= measured <= planned * 1.01 + 4096, (planned, measured)


def test_step_that_cannot_fit_is_refused_before_anything_is_allocated(byte_data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device, processes: (2 * 2**30, "this test's machine"))
    out = tmp_path / "out"
    with pytest.raises(train.TrainError, match=r"one training step needs about [\d.]+ GiB per process \(activations"
                                                r".* but this test's machine has 2.00 GiB available; lower batch_size "
                                                r"\(now 3000, [\d.]+ MiB of activations per sequence\) or block_size "
                                                r"\(now 256\), or set activation_checkpointing=True"):
        train.main([f"--dataset={byte_data}", "--device=cpu", "--batch_size=3000", f"--out_dir={out}"])
    assert not out.exists()
    res = subprocess.run([sys.executable, "train.py", f"--dataset={byte_data}", "--device=cpu",
                          "--batch_size=100000", f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: one training step")


def test_dry_run_names_the_least_activation_checkpointing_that_fits(capsys):
    seven = [os.path.join(ROOT, "config", "olmo2_7b_repo.py"), "--dry_run", "--dry_run_world=8"]
    assert train.main(seven)
    least = int(re.search(r"least activation checkpointing that fits: on for the first (\d+) of 32 blocks", capsys.readouterr().out)[1])
    assert 0 < least < 26  # the preset's 26 keeps a margin
    assert train.main(seven + [f"--activation_checkpointing_layers={least}"])
    assert not train.main(seven + [f"--activation_checkpointing_layers={least - 1}"])


def test_presets_fit_8_h100s():
    for preset, args, fits in (("olmo2_1b_repo.py", [], True), ("olmo2_1b_repo.py", ["--fsdp=True"], True),
                               ("olmo2_7b_repo.py", [], True), ("olmo2_7b_rope.py", [], True),
                               ("olmo2_7b_repo.py", ["--activation_checkpointing=False"], False),
                               ("olmo2_7b_repo.py", ["--dry_run_gpu=L4"], False)):
        assert train.main([os.path.join(ROOT, "config", preset), "--dry_run", "--dry_run_world=8", *args]) is fits
    seven = train.parse_args([os.path.join(ROOT, "config", "olmo2_7b_repo.py")])
    assert (seven["repo_start_layer"], seven["fsdp"], seven["learning_rate"], seven["max_iters"]) == (10, True, 6.1499e-5, 11931)
    assert seven["batch_size"] * seven["gradient_accumulation_steps"] * seven["block_size"] == 4_194_304
    rope = train.parse_args([os.path.join(ROOT, "config", "olmo2_7b_rope.py")])
    assert {k for k in seven if rope[k] != seven[k]} == {"pos_mode", "out_dir"}
    with pytest.raises(train.TrainError, match="dry_run_gpu='T4' is not a GPU"):
        train.main(["--dry_run", "--dry_run_gpu=T4", "--vocab_size=256"])


def test_gpu_names_are_matched_exactly():
    peak = {name: (memory.gpu_spec(name) or (None,))[0] for name in (
        "NVIDIA L4", "NVIDIA L40", "NVIDIA L40S", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
        "NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA L40G", "NVIDIA GeForce RTX 4090 D")}
    assert peak == {"NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12, "NVIDIA H100 80GB HBM3": 989e12,
                    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA GeForce RTX 4090": 165e12,
                    "NVIDIA A100-SXM4-80GB": 312e12, "Tesla T4": None, "NVIDIA L40G": None,
                    "NVIDIA GeForce RTX 4090 D": None}
    assert memory.gpu_spec("NVIDIA A100 80GB PCIe")[0] == 312e12
    assert memory.gpu_spec("A100 40GB")[1] == 40 and memory.gpu_spec("A100")[1] == 80  # --dry_run_gpu names


# ----- streaming data preparation --------------------------------------------------------------

def test_prepare_streams_20m_tokens_in_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 22}) + "\n"  # ~1000 bytes
    for i in range(20):
        (src / f"{i:02d}.jsonl").write_text(line * 1000)  # 20 x 1M byte tokens
    out = run_py("""
        import resource, sys
        from data import prepare
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prepare.main([f"--input={sys.argv[1]}", f"--out={sys.argv[2]}", "--tokenizer=byte", "--shard_tokens=8000000",
                      "--workers=2"])
        print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """, src, tmp_path / "out")
    base, peak = map(int, out.split()[-2:])
    n = sum(len(read_tokens(str(f))) for f in (tmp_path / "out").glob("*.bin"))
    assert n == 20 * 1000 * (len(line) - len('{"text": ""}\n') + 1)  # every byte and one <|endoftext|> a document
    assert sorted(f.name for f in (tmp_path / "out").glob("*.bin")) == ["train_000.bin", "train_001.bin",
                                                                        "train_002.bin", "val.bin"]
    # a list of Python ints would be ~36 B a token (720 MB here); two uint16 shard buffers are 32 MB
    assert peak - base < 150 * 2**20, (base, peak)


def prepare_cli(*args):
    return subprocess.run([sys.executable, "-m", "data.prepare", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def test_prepare_rebuilds_atomically_and_refuses_bad_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    out = tmp_path / "out"
    prepare.main([f"--input={src}", f"--out={out}", "--tokenizer=byte", "--val_every=10", "--shard_tokens=2000"])
    assert len(list(out.glob("train_*.bin"))) > 2
    prepare.main([f"--input={src}", f"--out={out}", "--tokenizer=byte", "--val_every=10"])
    assert sorted(f.name for f in out.glob("*.bin")) == ["train_000.bin", "val.bin"]  # no stale shards
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    # bad input: one error line, exit code 2, the earlier folder untouched, no temporary left
    (tmp_path / "bad.txt").write_bytes("caf\u00e9 ".encode() + b"na\xefve")
    bad = {("--val_every=1000",): r"val.bin would be empty: 30 documents, and every --val_every=1000th goes to val; "
                                  r"rerun with --val_every=3 \(or any value up to 30\)",
           ("--val_every=1",): r"train would be empty: --val_every=1 sends all 30 documents to val.bin",
           ("--val_every=10", f"--input={tmp_path / 'bad.txt'}"): r"bad.txt: not UTF-8 text at byte 8 ",
           ("--val_every=x",): "--val_every must be an integer, got 'x'",
           ("--shard_tokens=0",): "--shard_tokens=0: must be at least 1",
           ("--val_every=10", "--bogus=1"): "unknown or malformed option '--bogus=1'"}
    for args, msg in bad.items():
        res = prepare_cli(f"--input={src}", f"--out={out}", "--tokenizer=byte", *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
        assert __import__("re").search(msg, res.stderr), (msg, res.stderr)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not (tmp_path / "out.tmp").exists()
    with gzip.open(src / "bad.jsonl.gz", "wt") as f:
        f.write('{"text": "fine"}\n')
    with gzip.open(src / "bad.jsonl.gz", "ab") as f:
        f.write(b'{"text": "\xff"}\n')
    res = prepare_cli(f"--input={src}", f"--out={out}", "--tokenizer=byte", "--val_every=10")
    assert "bad.jsonl.gz: not UTF-8 text at byte 27 of the decompressed stream" in res.stderr
    res = prepare_cli("--help")
    assert res.returncode == 0 and "--val_every=1000" in res.stdout and "--shard_tokens=500000000" in res.stdout


def test_short_val_split_points_to_val_every(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.txt").write_text("x" * (10 if i % 20 == 19 else 300))  # val: 2 x 11 tokens
    prepare.main([f"--input={src}", f"--out={tmp_path / 'd'}", "--tokenizer=byte", "--val_every=20"])
    with pytest.raises(ValueError, match=r"block_size=64 needs at least 65 tokens in one val file.*prepare it "
                                         r"again with a smaller --val_every"):
        train.main(["--device=cpu", f"--dataset={tmp_path / 'd'}", "--block_size=64", f"--out_dir={tmp_path / 'o'}"])
