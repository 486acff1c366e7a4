"""What a cluster run needs, checked with real processes on the CPU (gloo): tied embeddings stay
one tensor on every path (one process, DDP, FSDP2, the export, a run started from that export);
--init_from=auto resumes the same command after a kill; a signal between micro-steps abandons the
step and saves the state before it; token shards are read under a low open-file limit; the LM-head
backward stays within its memory plan; a two-"node" torchrun launch on localhost.

    python -m pytest -q tests/test_cluster.py
"""
import json
import time
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch

import train
from infra.checkpoint import Stopped
from data.tokens import TokenDataset
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=2", "--repo_start_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=2", "--gradient_accumulation_steps=2", "--learning_rate=1e-2", "--warmup_iters=2",
        "--min_lr=1e-3", "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--sample_tokens=0",
        "--max_iters=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


# one intra-op thread per process: the tests' several processes share 2 cores without oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(args, nproc=2, launcher=("--standalone",)):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", "train.py"]
    res = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def val_loss_of_export(out_dir, data):
    """The val loss of out_dir/hf, measured as train.py measures it (same windows, one process)."""
    model = GPT.from_pretrained(os.path.join(out_dir, "hf"))
    c = train.TrainConfig(block_size=32, batch_size=2, eval_iters=2)
    val = TokenDataset(data, "val", c.block_size, c.seed)
    return train.evaluate(model, val, c, nullcontext(), torch.device("cpu"), 0, 1)


# ----- tied embeddings --------------------------------------------------------------------------

def test_tied_embeddings_survive_every_path_and_the_export_scores_as_trained(byte_data, tmp_path):
    """A meta-device build materialised with to_empty() would give the LM head its own tensor; the
    export (which stores one matrix for a tied model) would then drop the trained head. On each
    path the checkpoint holds one matrix and the export's val loss is the run's last val loss."""
    tied = TINY + [f"--dataset={byte_data}", "--tie_word_embeddings=True"]
    runs = {"single": str(tmp_path / "single"), "ddp": str(tmp_path / "ddp"), "fsdp": str(tmp_path / "fsdp")}
    train.main(tied + [f"--out_dir={runs['single']}"])
    torchrun(tied + [f"--out_dir={runs['ddp']}"])
    torchrun(tied + [f"--out_dir={runs['fsdp']}", "--fsdp=True"])
    for name, out in runs.items():
        if name != "fsdp":
            sd = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
            assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]), name
        init = torch.load(os.path.join(out, "ckpt_fsdp", "trainer_state.pt") if name == "fsdp"
                          else os.path.join(out, "ckpt.pt"), weights_only=True)
        trained = [r["val_loss"] for r in log(out) if "val_loss" in r][-1]
        assert val_loss_of_export(out, byte_data) == pytest.approx(trained, rel=1e-5), name
        assert (init["meta"] if "meta" in init else init)["model_config"]["tie_word_embeddings"]
    # each rank hashed its own shards: every file of the FSDP checkpoint has its digest
    files = set(os.listdir(os.path.join(runs["fsdp"], "ckpt_fsdp"))) - {"trainer_state.pt"}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files and set(init["sha256"]) == files
    # a run started from the tied export measures the same loss before its first step
    start = str(tmp_path / "from_export")
    train.main(tied + [f"--out_dir={start}", f"--init_from={runs['single']}/hf", "--max_iters=0"])
    first = [r["val_loss"] for r in log(start) if "val_loss" in r][0]
    assert first == pytest.approx([r["val_loss"] for r in log(runs["single"]) if "val_loss" in r][-1], rel=1e-5)


def test_an_untied_model_with_a_tied_config_is_not_exported(tmp_path):
    from model import GPTConfig
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, tie_word_embeddings=True))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match="lm_head.weight and model.embed_tokens.weight differ"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ----- --init_from=auto: a requeue reruns the same command -----------------------------------------

def records(out_dir):
    return [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s", "mfu", "mem_gib")} for r in log(out_dir)]


def test_init_from_auto_reruns_the_same_command_after_a_kill(byte_data, tmp_path):
    """The command a job script runs on every (re)start: the first start trains from scratch, a
    SIGKILL after a checkpoint loses only the steps since, the same command then resumes from that
    checkpoint and the run ends as an uninterrupted one would, float for float. An out_dir that
    holds only an earlier attempt's log (stopped before its first checkpoint) starts over."""
    out = str(tmp_path / "run")
    args = TINY + [f"--dataset={byte_data}", "--max_iters=40", "--ckpt_interval=2", "--eval_interval=20"]
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out}", "--init_from=auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    ckpt = os.path.join(out, "ckpt.pt")
    t0 = time.time()
    while not os.path.exists(ckpt):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()[0]
        time.sleep(0.01)
    proc.kill()
    printed = proc.communicate()[0]
    assert proc.returncode == -9 and "init_from=auto: no checkpoint in" in printed, printed
    killed_at = torch.load(ckpt, weights_only=True)["meta"]["iter_num"]
    assert 0 < killed_at < 40
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"init_from=auto: resuming the run in {out}" in res.stdout
    assert f"resuming from iteration {killed_at}" in res.stdout or killed_at == 40
    ref = str(tmp_path / "ref")
    train.main(args + [f"--out_dir={ref}"])
    assert records(out) == records(ref)
    # an attempt stopped before its first checkpoint left a log and a config: auto starts over them
    again = str(tmp_path / "again")
    os.makedirs(again)
    for name in ("log.jsonl", "train_config.json"):
        with open(os.path.join(again, name), "w") as f:
            f.write('{"iter": 1, "loss": 9.0}\n' if name == "log.jsonl" else "{}")
    train.main(args + [f"--out_dir={again}", "--init_from=auto"])
    assert records(again) == records(ref)
    # ... but not over files a run does not write before its first checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(train.TrainError, match="already holds notes.txt"):
        train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={other}", "--init_from=auto"])
    assert (other / "notes.txt").read_text() == "mine"


# ----- preemption: stop between micro-steps -------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_between_micro_steps_abandons_the_step_and_saves_the_state_before_it(byte_data, tmp_path,
                                                                                        monkeypatch, capsys, sig):
    """A real signal, sent by the process to itself after 2 of the 8 micro-steps of step 3 (so exactly
    there, not whenever a busy machine gets to it): the run stops before the 3rd, writes the
    checkpoint of iteration 2 (the state before the step) and exits 128 + signal; resuming it gives
    the uninterrupted run, float for float (no partial gradient leaked into the update)."""
    args = [a for a in TINY if not a.startswith("--gradient_accumulation_steps")] + \
        [f"--dataset={byte_data}", "--gradient_accumulation_steps=8", "--ckpt_interval=100", "--max_iters=5"]
    out, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    real, calls = train.train_step, []

    def step(model, optimizer, micro, *a):
        class Micro(list):  # taking the 3rd micro-batch of the 3rd step sends the signal
            def __iter__(self):
                for m, xy in enumerate(list.__iter__(self)):
                    if len(calls) == 3 and m == 2:
                        os.kill(os.getpid(), sig)
                    yield xy
        calls.append(1)
        return real(model, optimizer, Micro(micro), *a)
    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(Stopped) as stop:
        train.main(args + [f"--out_dir={out}"])
    assert stop.value.code == 128 + sig
    printed = capsys.readouterr().out
    assert f"step 3 abandoned after 2 of 8 micro-steps\nstopped by {sig.name} after iteration 2;" in printed
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["meta"]["iter_num"] == 2
    monkeypatch.setattr(train, "train_step", real)
    train.main([f"--out_dir={out}", "--init_from=resume"])
    train.main(args + [f"--out_dir={ref}"])
    assert records(out) == records(ref)


# ----- the LM head's memory: the plan against a process's peak RSS --------------------------------

LM_PEAK = """
    import sys, torch
    from infra.memory import lm_loss_bytes
    from infra.loss import LOSS_CHUNK_LOGITS, lm_loss
    torch.set_num_threads(1)
    V, d, N, dtype = 100352, int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
    g = torch.Generator().manual_seed(0)
    w = torch.empty(V, d).normal_(0, 0.02, generator=g).requires_grad_()  # in place: no temporary
    h = torch.empty(N, d).normal_(generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    def kib(key):  # a field of /proc/self/status, in bytes
        with open("/proc/self/status") as f:
            return 1024 * int(next(line for line in f if line.startswith(key + ":")).split()[1])
    small = torch.randn(64, d, requires_grad=True)  # libraries loaded, allocator warm (not a slice of w:
    lm_loss(small[:4], small, t[:4] % 64).backward()  # its gradient would be a [V, d] tensor)
    # the peak of anonymous memory: the high-water mark (reset here) less the file pages (the
    # libraries, which a busy machine may evict from and bring back into this process meanwhile)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = kib("RssAnon")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = lm_loss(h, w, t, z_loss=1e-4)
    loss.backward()
    e = 2 if dtype == torch.bfloat16 else 4
    print(kib("VmHWM") - kib("RssFile") - kib("RssShmem") - base, lm_loss_bytes(N, V, d, e, max(1, LOSS_CHUNK_LOGITS // V)))
"""


@pytest.mark.parametrize("d,N,dtype", [(512, 1024, "float32"), (384, 1536, "bfloat16")])
def test_lm_head_forward_and_backward_peak_matches_the_memory_plan(d, N, dtype, tmp_path):
    """At OLMo-2's vocabulary: the growth of a process's peak RSS (anonymous) over lm_loss forward + backward
    equals memory.lm_loss_bytes (what --dry_run prints) within 10%. The gradient of W is written
    block by block into one [V, d] tensor; accumulating it over row chunks (a product, its float32
    copy and an accumulator, each [V, d]) measured 791 MiB at d=512, N=2048, bf16, against 426 now."""
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(LM_PEAK))
    res = subprocess.run([sys.executable, str(script), str(d), str(N), dtype], capture_output=True, text=True,
                         timeout=300, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    measured, planned = map(int, res.stdout.split())
    assert 0.9 * planned < measured < 1.1 * planned, (measured / 2**20, planned / 2**20)


# ----- token shards under a low open-file limit ---------------------------------------------------

SHARDS = """
    import resource, sys
    import numpy as np
    from data.tokens import TokenDataset, write_tokens
    folder, n = sys.argv[1], 300
    for k in range(n):
        write_tokens(f"{folder}/train_{k:03d}.bin", (np.arange(65) + k) % 257, "byte", 257)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # far fewer descriptors than shards
    data = TokenDataset(folder, "train", 32, seed=0)
    assert data.n_windows == 2 * n
    seen = set()
    for g in range(3 * data.n_windows):  # three epochs in shuffled order: every shard read 6 times
        f, half = divmod(data.window_of(g), 2)  # shard f holds (0..64 + f) % 257: 2 windows of 32 + 1
        assert list(data.sample(g)) == [(half * 32 + j + f) % 257 for j in range(33)]
        seen.add(f)
    assert len(seen) == n
    print(len(data.files.open))
"""


def test_many_token_shards_under_a_low_open_file_limit(tmp_path):
    """300 shards, 128 file descriptors: each shard is opened when read and few stay open (a memmap
    holds a descriptor; one per shard ran out at 'Too many open files')."""
    script = tmp_path / "shards.py"
    script.write_text(textwrap.dedent(SHARDS))
    (tmp_path / "data").mkdir()
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=300, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 < int(res.stdout.split()[-1]) <= 64


# ----- the multi-node recipe, two "nodes" on localhost ---------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_stops_on_sigusr1_and_the_same_commands_resume(byte_data, tmp_path):
    """docs/cluster.md's plain-torchrun recipe with two 1-GPU "nodes" on this machine (c10d
    rendezvous, gloo): HSDP replicating across the nodes, --init_from=auto, SIGUSR1 handled by the
    launchers. SIGUSR1 to the second node's launcher stops both ranks after the same step with one
    checkpoint; the same two commands then resume, and the run equals one process's."""
    out, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    args = [a for a in TINY if not a.startswith("--max_iters")] + [
        f"--dataset={byte_data}", "--max_iters=40", "--eval_interval=20", "--ckpt_interval=20"]
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "--max_restarts=0",
            "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "train.py", *args, f"--out_dir={out}", "--init_from=auto", "--fsdp=True", "--hsdp_shard=1", "--keep_ckpts=2"]

    def launch():
        return [subprocess.Popen(node, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
    nodes = launch()
    t0 = time.time()
    while not (os.path.exists(os.path.join(out, "log.jsonl")) and '"loss"' in open(os.path.join(out, "log.jsonl")).read()):
        assert all(p.poll() is None for p in nodes) and time.time() - t0 < 120, [p.communicate()[0] for p in nodes]
        time.sleep(0.01)
    nodes[1].send_signal(signal.SIGUSR1)
    printed = "".join(p.communicate(timeout=120)[0] for p in nodes)
    assert all(p.returncode != 0 for p in nodes), printed
    found = re.search(r"stopped by SIGUSR1 after iteration (\d+); checkpoint (\S+)\.", printed)
    assert found and found.group(2) == os.path.join(out, "ckpt_fsdp"), printed[-3000:]
    k = int(found.group(1))
    assert 0 < k < 40 and torch.load(os.path.join(out, "ckpt_fsdp", "trainer_state.pt"),
                                      weights_only=True)["iter_num"] == k
    nodes = launch()
    printed = "".join(p.communicate(timeout=300)[0] for p in nodes)
    assert all(p.returncode == 0 for p in nodes), printed[-3000:]
    assert f"resuming from iteration {k}" in printed
    kept = sorted(n for n in os.listdir(out) if n.startswith("ckpt_fsdp-"))
    assert kept == [f"ckpt_fsdp-{k:07d}", "ckpt_fsdp-0000040"] or kept == ["ckpt_fsdp-0000020", "ckpt_fsdp-0000040"]
    train.main(args + [f"--out_dir={ref}"])
    got, want = records(out), records(ref)
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5), (key, g, w)


MP_WORKER = """
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    import train
    from model import GPT, GPTConfig
    dist.init_process_group("gloo")
    cfg = GPTConfig(vocab_size=131, n_layer=2, n_head=2, n_embd=32, repo_start_layer=1)
    c = train.TrainConfig(fsdp=True, device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    eager = GPT(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        raw = GPT(cfg)
    model, _ = train.parallelize(raw, c, torch.device("cpu"))
    assert all(isinstance(m, FSDPModule) for m in (raw.model.embed_tokens, raw.lm_head, *raw.model.layers))
    seen = {}
    for name, m in [("q_proj", raw.model.layers[1].self_attn.q_proj), ("positioner", raw.model.layers[1].self_attn.positioner)]:
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, next(mod.parameters()).dtype) and None)
    seen_in = {}
    raw.model.layers[1].register_forward_pre_hook(lambda mod, args: seen_in.setdefault("inv_freq", args[1].dtype) and None)
    idx = torch.randint(0, 131, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    ctx = train.autocast(torch.device("cpu"), c)
    with ctx:
        _, loss = model(idx, idx)
        _, want = eager(idx, idx)
    loss.backward()
    # bf16 all-gathers; float32 positioners; RoPE's frequencies enter the blocks uncast
    assert seen == {"q_proj": torch.bfloat16, "positioner": torch.float32}, seen
    assert seen_in["inv_freq"] == torch.float64
    assert abs(loss.item() - want.item()) < 2e-2 * want.item(), (loss.item(), want.item())
    g = raw.lm_head.weight.grad
    assert g.dtype == torch.float32 and g.to_local().shape[0] == (66, 65)[dist.get_rank()]

    # a NaN in rows only rank 1 reads: each rank checks its own rows, and both refuse the checkpoint
    import sys
    if dist.get_rank() == 0:
        with torch.no_grad():
            eager.lm_head.weight[130, 0] = float("nan")
        eager.save_pretrained(sys.argv[1])
    dist.barrier()
    with torch.device("meta"):
        again = GPT(cfg)
    try:
        train.parallelize(again, c, torch.device("cpu"), (sys.argv[1], cfg.layer_modes()))
        raise AssertionError("a NaN weight was loaded")
    except train.TrainError as e:
        assert "non-finite weights (NaN or inf) in 1 tensor(s): lm_head.weight (1 of 4192)" in str(e), e
    dist.destroy_process_group()
    print("OK", flush=True)
    import os
    os._exit(0)  # every check is done: skip the interpreter's teardown, where gloo's threads can abort on a loaded machine
"""


def test_fsdp2_bf16_gathers_parameters_in_bf16_and_each_rank_checks_its_rows(tmp_path):
    script = tmp_path / "mp.py"
    script.write_text(textwrap.dedent(MP_WORKER))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "nan")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.count("OK") == 2, res.stdout[-3000:] + res.stderr[-3000:]


# ----- a shared filesystem without flock ----------------------------------------------------------

def test_out_dir_lock_without_flock(tmp_path, monkeypatch):
    """Where flock fails (ENOLCK: Lustre without -o flock, some NFS), the lock is a file created
    exclusively: a second run is refused while the first lives; one left by a killed process of this
    host, or by this Slurm job before its requeue, is taken over; one from another host is not."""
    import errno

    from infra import checkpoint

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_flock)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = str(tmp_path / "run")
    held = os.path.join(out, "train.lock.held")
    with checkpoint.out_dir_lock(out):
        assert open(held).read() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(train.TrainError, match=r"is in use by another train.py run \(pid .*no flock"):
            with checkpoint.out_dir_lock(out):
                pass
    assert not os.path.exists(out)  # lock file and the out_dir it created removed: nothing was written
    os.makedirs(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for stale, taken in [(f"pid {dead.stdout.strip()} on {socket.gethostname()}", True),  # killed here
                         ("pid 1 on some-other-node", False),                               # alive elsewhere?
                         ("pid 1 on some-other-node, slurm job 4242", True)]:               # this job, requeued
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        with open(held, "w") as f:
            f.write(stale + "\n")
        if taken:
            with checkpoint.out_dir_lock(out):
                assert "slurm job 4242" in open(held).read()
            assert not os.path.exists(held)
        else:
            with pytest.raises(train.TrainError, match="delete it if no run is alive"):
                with checkpoint.out_dir_lock(out):
                    pass
            assert open(held).read() == stale + "\n"  # not touched


# ----- keeping the N latest checkpoints -------------------------------------------------------------

def test_keep_ckpts_keeps_the_latest_n_as_hard_links(byte_data, tmp_path):
    out = str(tmp_path / "run")
    args = TINY + [f"--dataset={byte_data}", "--max_iters=6", "--ckpt_interval=2", "--keep_ckpts=2"]
    train.main(args + [f"--out_dir={out}"])
    kept = sorted(n for n in os.listdir(out) if n.startswith("ckpt-"))
    assert kept == ["ckpt-0000004.pt", "ckpt-0000006.pt"]  # iteration 2's was pruned
    assert os.stat(os.path.join(out, "ckpt.pt")).st_ino == os.stat(os.path.join(out, kept[1])).st_ino
    old = torch.load(os.path.join(out, kept[0]), weights_only=True)
    assert old["meta"]["iter_num"] == 4
    # going back: the kept checkpoint of iteration 4, resumed, ends where the run ended
    back = str(tmp_path / "back")
    os.makedirs(back)
    import shutil
    shutil.copy(os.path.join(out, kept[0]), os.path.join(back, "ckpt.pt"))
    train.main([f"--out_dir={back}", "--init_from=resume"])
    want = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    got = torch.load(os.path.join(back, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())
    # --overwrite=true deletes them with the other run files
    train.main(args + [f"--out_dir={out}", "--overwrite=true", "--keep_ckpts=1", "--max_iters=2"])
    assert not [n for n in os.listdir(out) if n.startswith("ckpt-")]


def test_a_process_count_that_cannot_share_the_micro_steps_names_the_counts_that_keep_the_batch():
    with pytest.raises(train.TrainError, match=r"both change the global batch of 12 x batch_size sequences per step; "
                                               r"to keep it, run on a number of processes that divides 12: 1, 2, 3, 4, 6, 12"):
        train.with_accumulation(train.TrainConfig(gradient_accumulation_steps=12), 8)
    assert train.with_accumulation(train.TrainConfig(gradient_accumulation_steps=12), 6).gradient_accumulation_steps == 12


def test_an_hsdp_shard_that_cannot_split_the_processes_is_refused(byte_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(train.TrainError, match=r"hsdp_shard=2 needs fsdp=True and must divide the 1 processes"):
        train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}", "--hsdp_shard=2"])
    assert not out.exists()
