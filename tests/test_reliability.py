"""No silent failure and no lost work: train.py, eval.py, sample.py, infra/hf.py and
data/ attacked with what goes wrong in practice. A second run into a busy out_dir, a non-empty
out_dir, flipped bytes in a checkpoint, NaN weights, SIGTERM / Ctrl-C (real signals to a real
process, then a resume that must be bit-identical), a full or read-only disk under every writer, a
torn log line, broken config.json and safetensors files, out-of-range token ids, and every bad
command-line value, which must be one `error:` line with exit code 2.

    python -m pytest -q tests/test_reliability.py
"""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eval as ev
from infra import hf
import sample
import train
from infra import files
from infra.files import WriteError, append_line, atomic_write, copy_file
from data.tokenizer import get_tokenizer, save_tokenizer
from data.tokens import HEADER, TokenDataset, read_header, write_tokens
from model import GPT, GPTConfig
# test_train.py's tiny run (layer 0 RoPE, layer 1 RePo, byte-level data, 2 micro-steps of 4 x 32
# tokens, checkpoints at 4 and 8), its one-thread setting and its log comparison
from test_train import ROOT, TINY, one_thread, records, reference, weights  # noqa: F401 - fixtures

LONG = ["--max_iters=400", "--lr_decay_iters=400"]  # a run to interrupt; resumed to fewer steps, same schedule


def crash_after_checkpoint_4(byte_data, out, monkeypatch):
    """A run killed at step 6 (the checkpoint of iteration 4 written, log lines up to 6)."""
    real = train.get_lr

    def crash(it, c):
        if it == 6:
            raise KeyboardInterrupt
        return real(it, c)

    with monkeypatch.context() as m:
        m.setattr(train, "get_lr", crash)
        with pytest.raises(KeyboardInterrupt):
            train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def logged_a_step(out):
    path = os.path.join(out, "log.jsonl")
    return os.path.exists(path) and '"loss"' in open(path).read()


def cli(*runs):
    """[(exit code, stderr)] of `python <script> <args>` for each (script, args), run as __main__ in one
    child interpreter (torch is imported once)."""
    code = ("import contextlib, io, json, runpy, sys\nout = []\n"
            "for script, args in json.loads(sys.argv[1]):\n"
            "    sys.argv, err = [script] + args, io.StringIO()\n"
            "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as o:\n"
            "        try:\n            runpy.run_path(script, run_name='__main__')\n            rc = 0\n"
            "        except SystemExit as e:\n            rc = e.code if isinstance(e.code, int) else 1\n"
            "    out.append([rc, err.getvalue(), o.getvalue()])\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


# ----- out_dir: never overwritten, never shared ------------------------------------------------

def test_a_non_empty_out_dir_needs_resume_or_overwrite(byte_data, tmp_path):
    out = tmp_path / "run"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"iter": 0, "val_loss": 1.0}\n')
    (out / "notes.txt").write_text("mine")
    run = TINY + [f"--dataset={byte_data}", f"--out_dir={out}", "--max_iters=4"]
    with pytest.raises(train.TrainError, match=r"already holds hf, log.jsonl, notes.txt but no checkpoint to resume "
                                                r"from, or choose another --out_dir, or pass --overwrite=true"):
        train.main(run)
    assert (out / "log.jsonl").read_text() == '{"iter": 0, "val_loss": 1.0}\n'
    assert sorted(os.listdir(out)) == ["hf", "log.jsonl", "notes.txt"]  # not even a lock file left behind
    train.main(run + ["--overwrite=true"])  # asked for: the run files are replaced, other files stay
    assert (out / "notes.txt").read_text() == "mine" and records(out)[0]["iter"] == 0 and len(records(out)) == 6
    assert GPT.from_pretrained(out / "hf").config.n_layer == 2
    with pytest.raises(train.TrainError, match="cannot be combined with init_from=resume"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--overwrite=true"])
    train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=5"])  # overwrite is not inherited
    assert records(out)[-1]["iter"] == 5


def test_a_second_run_into_a_busy_out_dir_is_refused(byte_data, tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom infra import checkpoint\n"
                               "with checkpoint.out_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n"
                               "    time.sleep(300)\n", out],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(train.TrainError, match=rf"{re.escape(out)} is in use by another train.py run \(pid "
                                                    rf"{holder.pid} on .*lock file {re.escape(out)}/train.lock\)"):
            train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}"])
        assert os.listdir(out) == ["train.lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # kill -9: the kernel releases the lock; the stale file must not block the next run
        holder.wait()
    assert os.path.exists(os.path.join(out, "train.lock"))
    train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={out}", "--max_iters=1"])
    assert not os.path.exists(os.path.join(out, "train.lock"))  # removed by the run that held it


# ----- integrity --------------------------------------------------------------------------------

def test_a_checkpoint_with_flipped_bytes_is_refused(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "ckpt.pt"
    blob = bytearray(ckpt.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
    ckpt.write_bytes(blob)
    torch.load(ckpt, weights_only=True)  # torch itself loads the damaged file without a word
    with pytest.raises(train.TrainError, match=rf"checkpoint {re.escape(str(ckpt))} is corrupt or unreadable "
                                                r"\(ValueError: its record .* fails its CRC-32 check"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=10"])
    assert ckpt.read_bytes() == blob  # untouched
    torch.save({"model": {}, "optimizer": {}, "meta": {"iter_num": 3}}, ckpt)  # intact, but not ours
    with pytest.raises(train.TrainError, match=r"its trainer state lacks \['config', 'model_config', .*not a train.py "
                                                "checkpoint"):
        train.main([f"--out_dir={out}", "--init_from=resume"])


def test_non_finite_weights_are_refused(tmp_path):
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, repo_start_layer=1))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = dict(hf.read_safetensors(path))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].clone()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone().fill_(float("inf"))
    hf.write_safetensors(path, tensors)
    with pytest.raises(ValueError, match=r"holds non-finite weights \(NaN or inf\) in 2 tensor\(s\): model.layers.0.mlp."
                                         r"up_proj.weight \(1 of 4096\), lm_head.weight \(2048 of 2048\)"):
        GPT.from_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m", allow_non_finite=True)  # asked for: loaded as it is
    assert loaded.model.layers[0].mlp.up_proj.weight[3, 5].isnan()


def test_damaged_safetensors_are_named_not_parsed(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes: a header length of ~10^19
    with pytest.raises(ValueError, match=r"is not a safetensors file: its first 8 bytes announce a \d+-byte header"):
        hf.read_safetensors(path)
    path.write_bytes((2 ** 26).to_bytes(8, "little") + b"{" * (2 ** 26 + 10))  # 64 MB: within the file, not JSON
    with pytest.raises(ValueError, match="is not a safetensors file: its header is not JSON"):
        hf.read_safetensors(path)
    for header, msg in ((b"[1, 2]", "its header is a JSON list"),
                        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "header entry of tensor 'w'")):
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=msg):
            hf.read_safetensors(path)


def test_config_json_errors_name_the_file_and_the_key(tmp_path):
    src = tmp_path / "ok"
    GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, repo_start_layer=1)).save_pretrained(src)
    good = json.loads((src / "config.json").read_text())
    cases = [
        ("{\n  \"hidden_size\": 32,\n", r"is not valid JSON: Expecting property name enclosed in double quotes at line 3"),
        ('"a string"', "must hold a JSON object, not a str"),
        ({k: v for k, v in good.items() if k != "hidden_size"}, "required key 'hidden_size' is missing"),
        (dict(good, num_attention_heads=2.0), r"key 'num_attention_heads' must be a positive integer, got 2.0"),
        (dict(good, hidden_size="32"), r"key 'hidden_size' must be a positive integer, got \"32\""),
        (dict(good, rms_norm_eps="tiny"), "key 'rms_norm_eps' must be a positive number"),
        (dict(good, tie_word_embeddings="no"), "key 'tie_word_embeddings' must be true or false"),
        (dict(good, num_attention_heads=3), "hidden_size=32 does not split into num_attention_heads=3 heads"),
        # a layer count that does not match the weights is named as such, not blamed on the start layer
        (dict(good, num_hidden_layers=1), r"num_hidden_layers is 1 but the weights hold layers \[0, 1\]"),
        (dict(good, pe_config={"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": 7}),
         r"pe_config.dynmaic_pe_start_layer=7 must be a layer index in 0..1"),
        (dict(good, pe_config={"dynamic_pe_mode": "swigluex_multihead", "dynamic_pe_layer_ids": "1,x"}),
         r"pe_config.dynamic_pe_layer_ids=\"1,x\" must list layer indices"),
    ]
    for i, (config, msg) in enumerate(cases):
        d = tmp_path / f"c{i}"
        shutil.copytree(src, d)
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(ValueError, match=re.escape(str(d / "config.json")) + ".*" + msg):
            GPT.from_pretrained(d)


def test_other_broken_json_files_are_named(tmp_path):
    from data.tokenizer import load_tokenizer
    save_tokenizer(get_tokenizer("byte"), str(tmp_path / "tok"))
    for name in ("tiktoken.json", "tokenizer.json"):  # our description; then a folder with HF's file only
        (tmp_path / "tok" / name).write_text('{"name": "byte",')
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tok" / name)) + " is not valid JSON"):
            load_tokenizer(str(tmp_path / "tok"))
        (tmp_path / "tok" / name).write_text('{"name": "byte"}')
        with pytest.raises(ValueError, match=re.escape(name) + r" lacks \['n_vocab', 'eot_token', 'ranks', 'pat_str', "
                                             r"'special_tokens'\]: neither a Hugging Face tokenizer.json"):
            load_tokenizer(str(tmp_path / "tok"))
        os.remove(tmp_path / "tok" / name)
    GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: key 'weight_map' must map tensor names"):
        GPT.from_pretrained(tmp_path / "m")


# ----- preemption: SIGTERM and Ctrl-C save the run ----------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_is_bit_identical(byte_data, tmp_path, sig):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, *LONG, f"--dataset={byte_data}", f"--out_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),  # a terminal's Ctrl-C, even when pytest
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # runs in background
    wait_for(lambda: logged_a_step(out), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stdout + stderr
    assert f"received {sig.name}: stopping after this step with a checkpoint" in stderr
    found = re.search(rf"stopped by {sig.name} after iteration (\d+); checkpoint (\S+)\. Resume with:\n    (.*)\n", stdout)
    assert found, stdout
    k = int(found.group(1))
    assert found.group(2) == os.path.join(out, "ckpt.pt")
    assert found.group(3) == f"python train.py --init_from=resume --out_dir={out}"
    assert torch.load(found.group(2), weights_only=True)["meta"]["iter_num"] == k
    assert records(out)[-1]["iter"] == k  # nothing was logged after the step it stopped at
    train.main([f"--out_dir={out}", "--init_from=resume", f"--max_iters={k + 3}"])
    ref = str(tmp_path / "ref")
    train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={ref}", f"--max_iters={k + 3}", "--lr_decay_iters=400"])
    assert records(out) == records(ref)  # exact floats
    want = weights(ref)
    for name, v in weights(out).items():
        assert torch.equal(v, want[name]), name


def test_torchrun_sigterm_fsdp_default_accumulation_and_a_damaged_shard(byte_data, tmp_path):
    """torchrun passes SIGTERM on to both processes; they agree on the step to stop after and write
    one FSDP checkpoint, whose shards are then checked on resume. The default gradient accumulation
    (0: one micro-step per process) works on 2 processes."""
    out = str(tmp_path / "fsdp")
    args = [a for a in TINY if not a.startswith("--gradient_accumulation_steps")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "train.py"]
    proc = subprocess.Popen(torchrun[:4] + ["--nproc_per_node=2"] + torchrun[4:] + args + LONG +
                            [f"--dataset={byte_data}", f"--out_dir={out}", "--fsdp=True"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for(lambda: logged_a_step(out), proc)
    proc.send_signal(signal.SIGTERM)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    found = re.search(r"stopped by SIGTERM after iteration (\d+); checkpoint (\S+)\. Resume with:\n    (.*)\n", printed)
    assert found, printed
    k = int(found.group(1))
    assert found.group(3) == f"torchrun --standalone --nproc_per_node=2 train.py --init_from=resume --out_dir={out}"
    meta = torch.load(os.path.join(out, "ckpt_fsdp", "trainer_state.pt"), weights_only=True)
    assert meta["iter_num"] == k and meta["config"]["gradient_accumulation_steps"] == 2
    shard = sorted(glob.glob(os.path.join(out, "ckpt_fsdp", "*.distcp")))[0]
    blob = open(shard, "rb").read()
    with open(shard, "r+b") as f:
        f.seek(len(blob) // 2)
        f.write(bytes(b ^ 0xFF for b in blob[len(blob) // 2:len(blob) // 2 + 64]))
    resume = torchrun[:4] + ["--nproc_per_node=1"] + torchrun[4:] + [f"--out_dir={out}", "--init_from=resume",
                                                                      f"--max_iters={k + 2}"]
    res = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"error: checkpoint {out}/ckpt_fsdp is corrupt or unreadable (ValueError: " \
        f"{shard} does not match the sha256 recorded when it was written)" in res.stderr, res.stderr[-2000:]
    with open(shard, "wb") as f:
        f.write(blob)
    res = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = str(tmp_path / "ref")
    train.main(TINY + [f"--dataset={byte_data}", f"--out_dir={ref}", f"--max_iters={k + 2}", "--lr_decay_iters=400"])
    got, want = records(out), records(ref)
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx([r["loss"] for r in want if "loss" in r], rel=1e-5)


def test_a_torn_last_log_line_does_not_block_resume(byte_data, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    crash_after_checkpoint_4(byte_data, out, monkeypatch)
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"iter": 7, "loss": 4.1')  # killed in the middle of writing a line
    train.main([f"--out_dir={out}", "--init_from=resume"])
    assert records(out) == records(reference)
    lines = open(os.path.join(out, "log.jsonl")).read().splitlines()
    lines.insert(3, "this is not a record")
    open(os.path.join(out, "log.jsonl"), "w").write("\n".join(lines) + "\n")
    with pytest.raises(train.TrainError, match=r"log.jsonl, line 4, is not a log record \('this is not a record'\)"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=9"])


# ----- full and read-only disks -------------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(byte_data, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    crash_after_checkpoint_4(byte_data, out, monkeypatch)
    ckpt = os.path.join(out, "ckpt.pt")
    before = open(ckpt, "rb").read()
    os.symlink("/dev/full", ckpt + ".tmp")  # every write to it fails with ENOSPC, as on a full disk
    with pytest.raises(WriteError, match=rf"cannot write {re.escape(ckpt)}: No space left on device \[ENOSPC\]; the "
                                         rf"disk is full: .*{re.escape(ckpt)} is as it was before \(the temporary "
                                         r"file was removed\)"):
        train.main([f"--out_dir={out}", "--init_from=resume"])  # the checkpoint at iteration 8 fails
    assert not os.path.lexists(ckpt + ".tmp") and open(ckpt, "rb").read() == before
    train.main([f"--out_dir={out}", "--init_from=resume"])  # space again: the run carries on from iteration 4
    assert records(out) == records(reference)


def read_only(real_open, only=""):
    """open() for infra/files.py on a read-only file system: reading works, writing fails with EROFS."""
    def fake(path, mode="r", *args, **kw):
        if ("r" in mode and "+" not in mode) or only not in str(path):
            return real_open(path, mode, *args, **kw)
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    return fake


def test_every_writer_reports_a_failed_write_and_keeps_the_old_file(byte_data, tmp_path, monkeypatch):
    import builtins
    model = GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, pos_mode="rope"))
    enc = get_tokenizer("byte")
    src = tmp_path / "src.bin"
    write_tokens(str(src), np.arange(100), "byte", 257)

    def figure(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure()
        ev._save(fig, os.path.dirname(path), os.path.basename(path))

    writers = {"eval.json": lambda p: atomic_write(p, "{}"), "train.bin": lambda p: write_tokens(p, [1, 2], "byte", 257),
               "tokenizer.json": lambda p: save_tokenizer(enc, os.path.dirname(p)),
               "model.safetensors": lambda p: model.save_pretrained(os.path.dirname(p)),
               "val.bin": lambda p: copy_file(str(src), p), "plot.png": figure}
    monkeypatch.setattr(files, "open", read_only(builtins.open), raising=False)
    for name, write in writers.items():
        path = str(tmp_path / name.split(".")[0] / name)
        os.makedirs(os.path.dirname(path))
        builtins.open(path, "w").write("old")
        with pytest.raises(WriteError, match=rf"cannot write {re.escape(path)}: Read-only file system \[EROFS\]; the "
                                             r"file system is read-only: choose a writable location"):
            write(path)
        assert builtins.open(path).read() == "old" and not os.path.exists(path + ".tmp"), name


def test_a_failed_log_append_leaves_no_half_line(tmp_path, monkeypatch):
    log = str(tmp_path / "log.jsonl")
    append_line(log, '{"iter": 1}')
    real = os.write

    def half(fd, data):  # the disk fills up in the middle of the line
        real(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(files.os, "write", half)
        with pytest.raises(WriteError, match=rf"cannot write {re.escape(log)}: No space left on device \[ENOSPC\].*"
                                             "keeps its earlier lines"):
            append_line(log, '{"iter": 2}')
    assert open(log).read() == '{"iter": 1}\n'


def test_a_failed_export_keeps_the_previous_one(reference, tmp_path, monkeypatch):
    import builtins
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "hf" / "model.safetensors").read_bytes()
    monkeypatch.setattr(files, "open", read_only(builtins.open, only="model.safetensors"), raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*hf.tmp/model.safetensors: Read-only file system"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=9"])
    assert not os.path.exists(out / "hf.tmp") and (out / "hf" / "model.safetensors").read_bytes() == before


def test_no_module_writes_files_around_data_files():
    """Every writer of a run, a dataset or an evaluation goes through infra/files.py (atomic, and a clear
    error on a full or read-only disk): no other module opens files for writing itself."""
    sources = ["train.py", "eval.py", "sample.py", "model.py", "experiments/synthetic.py",
               "experiments/synthetic_report.py"] + \
        [os.path.relpath(p, ROOT) for d in ("data", "infra", "hf_interop") for p in glob.glob(os.path.join(ROOT, d, "*.py"))
         if not p.endswith(os.path.join("infra", "files.py"))]
    pattern = re.compile(r"""\bopen\([^)]*["'](w|a|x|r\+)b?["']|shutil\.copy|\.tofile\(|\bnp\.save\(|savefig\((?!f\b)"""
                         r"""|\.write_(text|bytes)\(|torch\.save\([^)]*,\s*(os\.path|path|["'])""")
    offenders = [f"{name}:{n}: {line.strip()}" for name in sources
                 for n, line in enumerate(open(os.path.join(ROOT, name)), 1) if pattern.search(line)]
    assert not offenders, offenders


# ----- token files ---------------------------------------------------------------------------------

def test_out_of_range_token_ids_are_found_when_the_file_is_opened(byte_data, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(os.path.join(byte_data, "tokenizer.json"), folder)
    ids = np.arange(50_000) % 257
    write_tokens(str(folder / "val.bin"), ids, "byte", 257, 256)
    assert read_header(str(folder / "val.bin"))["max_id"] == 256  # recorded by the writer: no scan needed
    write_tokens(str(folder / "train.bin"), ids, "byte", 257, 256)
    raw = bytearray((folder / "train.bin").read_bytes())
    raw[104:116] = bytes(12)  # a file from before the record (or another writer): readable, and scanned
    (folder / "train.bin").write_bytes(raw)
    assert read_header(str(folder / "train.bin"))["max_id"] is None
    TokenDataset(str(folder), "train", 32, seed=0)
    raw[HEADER + 2 * 45_678:HEADER + 2 * 45_678 + 2] = (300).to_bytes(2, "little")  # deep in the file
    (folder / "train.bin").write_bytes(raw)
    msg = rf"{re.escape(str(folder / 'train.bin'))}: token 45678 \(byte offset {HEADER + 2 * 45_678}\) is 300, outside"
    with pytest.raises(ValueError, match=msg):
        TokenDataset(str(folder), "train", 32, seed=0)
    with pytest.raises(ValueError, match=msg):  # before the first step, not when the batch comes up
        train.main(TINY + [f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}"])
    assert not os.path.exists(tmp_path / "out")
    raw = bytearray((folder / "val.bin").read_bytes())
    raw[24:32] = (200).to_bytes(8, "little")  # the header's vocabulary edited below the recorded ids
    (folder / "val.bin").write_bytes(raw)
    with pytest.raises(ValueError, match=r"val.bin: its header records ids up to 256, outside the tokenizer's "
                                         r"vocabulary \[0, 200\)"):
        read_header(str(folder / "val.bin"))


# ----- command lines -----------------------------------------------------------------------------

def test_command_line_errors_are_one_line_with_exit_code_2(reference, tmp_path):
    (tmp_path / "preset.py").write_text("max_iters = \n")
    bad = [("eval.py", ["--ckpt=x", "--lengths=abc"]), ("eval.py", ["--ckpt=x", "--n=0"]),
           ("eval.py", ["--ckpt=x", "--device=cuda:7"]), ("eval.py", [f"--ckpt={tmp_path}"]),
           ("train.py", ["--device=nonsense"]), ("train.py", ["--device=mps"]), ("train.py", ["--learning_rate=inf"]),
           ("train.py", [str(tmp_path / "preset.py")]), ("train.py", [f"--out_dir={tmp_path}", "--init_from=resume"]),
           ("sample.py", ["--top_k=-1"]), ("sample.py", [f"--ckpt={tmp_path}"]),
           ("sample.py", [f"--ckpt={reference}", "--max_new_tokens=100000000000"])]
    results = cli(*bad, ("eval.py", ["--help"]), ("sample.py", ["--help"]))
    for (script, args), (rc, err, _) in zip(bad, results):
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (script, args, rc, err)
    for rc, err, printed in results[len(bad):]:
        assert rc == 0 and "options (--key=value):" in printed
    assert "--n=8 " in results[-2][2] and "--plot_heads= " in results[-2][2] and "--top_k=50 " in results[-1][2]


@pytest.mark.parametrize("argv,msg", [
    (["--ckpt=x", "--lengths=-5"], "--lengths must be positive integers separated by commas, got '-5'"),
    (["--ckpt=x", "--lengths=256,,512"], "--lengths must be positive integers"),
    (["--ckpt=x", "--n=abc"], "--n must be an integer, got 'abc'"),
    (["--ckpt=x", "--n=0"], "--n must be at least 1, got 0"),
    (["--ckpt=x", "--plot=maybe"], "--plot must be true or false, got 'maybe'"),
    (["--ckpt=x", "--chunk_tol=nan"], "--chunk_tol must be a finite number"),
    (["--ckpt=x", "--plot_layers=a"], "--plot_layers must be non-negative integers"),
    (["--ckpt=x", "--yarn=maybe"], "--yarn must be both, on or off"),
    (["--ckpt=x", "--tasks=,"], "names no task"),
    (["--ckpt=x", "--ckpt=x"], "lists a checkpoint twice"),
    (["--ckpt=x", "--lenghts=5"], r"unknown option --lenghts \(did you mean --lengths\?\)"),
    (["--ckpt=x", "--device=gpu"], "--device='gpu' is not a device"),
    (["ckpt=x"], "arguments look like --key=value"),
])
def test_eval_arguments_are_checked_up_front(argv, msg):
    with pytest.raises(ev.EvalError, match=msg):
        ev.parse(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused():
    with pytest.raises(ev.EvalError, match=r"--device=cuda but this torch .* sees no CUDA device"):
        ev.parse(["--ckpt=x", "--device=cuda"])
    with pytest.raises(train.TrainError, match=r"device='cuda' but this torch .* sees no CUDA GPU"):
        train.main(["--device=cuda"])


def test_eval_checks_every_checkpoint_before_evaluating(reference, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "eval")
    base = [f"--ckpt={reference}", f"--out={out}", "--n=1"]
    for extra, msg in (([], r"task niah_single cannot be rendered in 32 tokens with tokenizer byte .*give longer --lengths"),
                       (["--tasks=table_cell", "--lengths=192"], r"task niah_single \(the position analysis uses it; "
                                                                 r"--positions=false turns it off\) cannot be rendered in 192"),
                       (["--tasks=table_cell", "--lengths=256", "--plot_layers=7"], "has layers 0..1 only"),
                       (["--tasks=table_cell", "--lengths=256", "--plot_heads=0,99"], "has heads 0..1 only"),
                       (["--tasks=table_cell", "--lengths=100000000000"], "length 100000000000 needs about"),
                       (["--tasks=table_cell", f"--val_data={tmp_path}"], r"no val.bin .* in")):
        with pytest.raises((ev.EvalError, FileNotFoundError, MemoryError), match=msg):
            ev.main(base + extra)
    assert not os.path.exists(out)  # refused before anything was written
    unfinished = tmp_path / "unfinished"  # stopped by SIGTERM: a checkpoint, no export yet
    unfinished.mkdir()
    shutil.copy(os.path.join(reference, "ckpt.pt"), unfinished)
    with pytest.raises(FileNotFoundError, match=rf"has a checkpoint but no export yet: finish it with python train.py "
                                                rf"--init_from=resume --out_dir={re.escape(str(unfinished))}"):
        ev.main([f"--ckpt={unfinished}", f"--out={out}"])
    # an out_dir whose dataset folder is gone: said, not silently skipped
    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    (moved / "train_config.json").write_text(json.dumps({"dataset": "no_such_dataset"}))
    with pytest.raises(ev.EvalError, match=r"names the dataset 'no_such_dataset', but .* does not exist, so the "
                                           r"held-out loss .* pass --val_data=<data folder> \(or --val_data=none"):
        ev.main([f"--ckpt={moved}", f"--out={out}", "--tasks=table_cell", "--lengths=192", "--positions=false"])
    # a plot that fails costs no table; the skipped held-out loss is noted in eval.md
    monkeypatch.setattr(ev, "plot", lambda *a, **k: 1 / 0)
    ev.main([f"--ckpt={moved}", f"--out={out}", "--tasks=table_cell", "--lengths=192", "--positions=false",
             "--val_data=none", "--n=1"])
    assert "warning: the plots failed (ZeroDivisionError" in capsys.readouterr().out
    report = json.load(open(os.path.join(out, "eval.json")))
    assert {r["task"] for r in report["results"]} == {"table_cell", "average"} and report["positions"] == {}
    assert f"Note: {moved}: held-out loss (general) skipped (--val_data=none)" in open(os.path.join(out, "eval.md")).read()


def test_plot_axes_start_at_zero_and_mark_repo_layers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures = {}

    def keep(fig, out, name):
        figures[name] = [(ax.get_ylim(), [p.get_x() for p in ax.patches], ax.get_legend_handles_labels()[1])
                         for ax in fig.axes]
        import matplotlib.pyplot as plt
        plt.close(fig)
        return name

    monkeypatch.setattr(ev, "_save", keep)
    rng = {str(L): {"tokens": L - 4, "repo_mean": 5.0 + 0.01 * i, "repo_max": 6.0, "per_layer_mean": [0, 5, 5]}
           for i, L in enumerate((64, 128, 256))}
    positions = {"m": {"layer_modes": ["rope", "repo", "repo"], "range": rng,
                       "attention_mass": {"needle": [0.10, 0.11, 0.12], "recent": [0.3, 0.31, 0.32]},
                       "example": {"positions": np.zeros((3, 2, 10)).tolist()}}}
    results = [dict(ckpt="m", task="average", dimension="noisy", length=L, metric="mean", value=0.0, n=4,
                    ci95=[0.0, 0.5], yarn=False) for L in (64, 128, 256)]
    ev.plot(results, positions, str(tmp_path))
    (range_ylim, _, _), (mass_ylim, spans, labels) = figures["positions_range_attention.png"]
    assert range_ylim[0] == 0 and range_ylim[1] > 5  # a 1% change in the range stays a 1% change
    assert mass_ylim == (0, 1) and spans == [0.5, 1.5] and "RePo layers" in labels
    assert figures["accuracy_vs_length.png"][0][0] == (0, 1)  # an all-zero run sits on the axis


def test_sample_generates_and_prints_the_learned_positions(reference, capsys):
    text = sample.main([f"--ckpt={reference}", "--prompt=The ", "--max_new_tokens=12", "--seed=3", "--positions=true"])
    printed = capsys.readouterr().out
    model = GPT.from_pretrained(os.path.join(reference, "hf"))
    idx = torch.tensor([list(b"The ")])
    torch.manual_seed(3)
    want = model.generate(idx, 12, temperature=0.8, top_k=50)[0].tolist()
    enc = get_tokenizer("byte")
    assert text == enc.decode([t for t in want if t < enc.n_vocab]) and text.startswith("The ")
    assert f"-----\n{text}\n-----" in printed
    _, _, pos = model(idx, return_positions=True)
    table = printed.split("layer 1 (repo): position of each prompt token per head\n")[1].splitlines()
    assert table[0].split() == ["token", "head", "0", "head", "1"]
    for t, line in enumerate(table[1:5]):
        assert [float(x) for x in line.split()[-2:]] == pytest.approx(pos[1, 0, :, t].tolist(), abs=1e-4)
    assert sample.main([f"--ckpt={reference}", "--temperature=0", "--max_new_tokens=5", "--seed=1"]) == \
        sample.main([f"--ckpt={reference}", "--temperature=0", "--max_new_tokens=5", "--seed=2"])  # greedy


def test_default_accumulation_fits_any_process_count(monkeypatch, tmp_path):
    assert train.TrainConfig().gradient_accumulation_steps == 0  # one micro-step per process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(train.TrainError, match=r"must be a multiple of 4: use --gradient_accumulation_steps=8, or 0 "
                                                r"for one per process"):
        train.main(["--gradient_accumulation_steps=6", f"--out_dir={tmp_path / 'x'}"])
