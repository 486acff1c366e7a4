"""What a user's slip must never cost, and what a bad input must say: data.prepare never deletes a
folder it did not write (a train.py out_dir, a folder of someone's files); a resume that would change
the run's shape is refused; token ids outside the vocabulary are found when a file is opened; every
bad value is one `error:` line before anything is written; long work says how far it is. Real
processes, real files, real signals.

    python -m pytest -q tests/test_guards.py
"""
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from data import prepare
from test_train import ROOT, TINY, one_thread, reference  # noqa: F401 - fixtures


def run(*cmd, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class Result:
    def __init__(self, returncode, stderr, stdout):
        self.returncode, self.stderr, self.stdout = returncode, stderr, stdout


def prepare_runs(*argvs):
    """`python -m data.prepare <argv>` for each argv, as __main__ in one child interpreter (numpy,
    torch and the tokenizers are loaded once): [Result]."""
    code = ("import contextlib, io, json, runpy, sys\nout = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    sys.argv, err, o = ['prepare'] + args, io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(o):\n"
            "        try:\n            runpy.run_module('data.prepare', run_name='__main__')\n            rc = 0\n"
            "        except SystemExit as e:\n            rc = e.code if isinstance(e.code, int) else 1\n"
            "    out.append([rc, err.getvalue(), o.getvalue()])\n"
            "print(json.dumps(out))\n")
    res = run("-c", code, json.dumps([[str(a) for a in argv] for argv in argvs]))
    assert res.returncode == 0, res.stderr[-3000:]
    return [Result(*r) for r in json.loads(res.stdout.splitlines()[-1])]


def snapshot(folder):
    """Every file under folder with its bytes: what must come through a refused command unchanged."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def one_error(res, pattern):
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert re.search(pattern, res.stderr), (pattern, res.stderr)


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(30):
        (src / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    return src


# ----- 1. data.prepare never deletes what it did not write ------------------------------------------

def test_prepare_refuses_to_replace_a_folder_it_did_not_write(reference, corpus, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # a real train.py out_dir: ckpt.pt, hf/, log.jsonl, train_config.json
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years of work")
    before = {p: snapshot(p) for p in (run_dir, thesis)}
    assert {"ckpt.pt", "log.jsonl", "train_config.json", "hf/config.json"} <= set(before[run_dir])
    one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={run_dir}", "--tokenizer=byte",
                  "--val_every=10"),
              rf"--out {re.escape(str(run_dir))} holds ckpt.pt, hf/, log.jsonl, train_config.json, which "
              r"data.prepare did not write.*nothing was changed")
    one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={thesis}/", "--tokenizer=byte"),
              r"holds thesis.txt, which data.prepare did not write")
    # the folders beside --out that a rebuild uses (<out>.tmp, <out>.old) are not deleted either
    ds = tmp_path / "ds"
    for side in ("ds.tmp", "ds.old"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "mine.txt").write_text("keep")
        one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={ds}", "--tokenizer=byte"),
                  rf"{re.escape(str(tmp_path / side))} holds mine.txt, which data.prepare did not write")
        assert (tmp_path / side / "mine.txt").read_text() == "keep" and not ds.exists()
        shutil.rmtree(tmp_path / side)
    (tmp_path / "afile").write_text("x")
    one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={tmp_path / 'afile'}", "--tokenizer=byte"),
              r"exists and is not a folder")
    assert {p: snapshot(p) for p in (run_dir, thesis)} == before and (tmp_path / "afile").read_text() == "x"

    # what it wrote itself it replaces; once a user's file is added, that dataset is theirs too
    prepare.main([f"--input={corpus}", f"--out={ds}", "--tokenizer=byte", "--val_every=10", "--shard_tokens=2000"])
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["files"] == sorted(os.listdir(ds)) and meta["written_by"] == "data.prepare"
    prepare.main([f"--input={corpus}", f"--out={ds}", "--tokenizer=byte", "--val_every=10"])
    assert sorted(f for f in os.listdir(ds) if f.endswith(".bin")) == ["train_000.bin", "val.bin"]  # none stale
    (ds / "notes.md").write_text("my notes")
    (ds / "train_007.bin").write_bytes(b"not ours")  # one of our names, not our header
    before = snapshot(ds)
    one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={ds}", "--tokenizer=byte", "--val_every=10"),
              r"holds notes.md, train_007.bin, which data.prepare did not write")
    assert snapshot(ds) == before
    # a dataset of the other writers (stdlib_text: no list of files in meta.json) is recognised by its files
    legacy = tmp_path / "legacy"
    shutil.copytree(ds, legacy, ignore=shutil.ignore_patterns("notes.md", "train_007.bin", "meta.json"))
    (legacy / "meta.json").write_text(json.dumps({"dataset": "stdlib"}))
    prepare.main([f"--input={corpus}", f"--out={legacy}", "--tokenizer=byte", "--val_every=10"])
    assert json.loads((legacy / "meta.json").read_text())["written_by"] == "data.prepare"


# ----- 2. a resume continues the same run ---------------------------------------------------------

def test_a_resume_that_changes_the_runs_shape_is_refused(reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)  # block_size 32, batch_size 4, 2 micro-steps, 2 layers
    before = snapshot(out)
    preset = tmp_path / "longer.py"
    preset.write_text("block_size = 64\n")
    from test_reliability import cli
    resume = ["train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=9"]
    cases = ((["--block_size=64"], r"\['block_size'\].*block_size=32 \(this command: 64\)"),
             ([str(preset)], r"\['block_size'\]"),
             (["--batch_size=8", "--n_layer=3"], r"\['n_layer', 'batch_size'\]"),
             # 0 = one micro-step per process: 1 here, 2 when the run was made
             (["--gradient_accumulation_steps=0"],
              r"\['gradient_accumulation_steps'\].*gradient_accumulation_steps=2 \(this command: 1\)"))
    for (_, named), res in zip(cases, cli(*[(resume[0], resume[1:] + extra) for extra, _ in cases])):
        one_error(Result(*res), r"^error: cannot change " + named + r".*Drop them to continue the run")
    assert snapshot(out) == before
    # 2 micro-steps per step cannot be shared by 4 processes (the advice is not to change them)
    one_error(run(*resume, env={"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}),
              r"this run takes 2 micro-steps per step .*which 4 processes cannot share evenly: resume it on \[1, 2\]")
    assert snapshot(out) == before
    # the checkpoint's own values may be repeated; what does not change the run's shape may change
    res = run(*resume, "--block_size=32", "--gradient_accumulation_steps=2", "--eval_interval=100")
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())
    assert config["block_size"] == 32 and config["eval_interval"] == 100
    assert json.loads((out / "hf" / "config.json").read_text())["max_position_embeddings"] == 32


# ----- 3. token ids outside the vocabulary are found when a file is opened ---------------------------

def test_token_files_are_verified_when_opened_and_remembered(corpus, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from data import token_check
    from data.tokens import HEADER, TokenDataset, read_header
    ds = tmp_path / "ds"
    prepare.main([f"--input={corpus}", f"--out={ds}", "--tokenizer=byte", "--val_every=10"])
    shard = ds / "train_000.bin"
    clean = shard.read_bytes()
    n = read_header(str(shard))["count"]
    out = tmp_path / "out"
    args = ["train.py", *TINY, f"--dataset={ds}", f"--out_dir={out}", "--block_size=16"]

    def poke(token, value):
        with open(shard, "r+b") as f:
            f.seek(HEADER + 2 * token)
            f.write(int(value).to_bytes(2, "little"))

    # 300: past the byte tokenizer's 257 ids but inside the model's padded 384; the header still says
    # "checked". The last token of the file is only ever a target.
    for token, value in ((n // 2, 300), (n - 1, 300), (n - 1, 60_000)):
        shard.write_bytes(clean)
        poke(token, value)
        one_error(run(*args), rf"{re.escape(str(shard))}: token {token} \(byte offset {HEADER + 2 * token}\) is "
                              rf"{value}, outside the tokenizer's vocabulary \[0, 257\)")
        assert not out.exists()  # before the first step: nothing written
    shard.write_bytes(clean)
    poke(7, clean[HEADER + 14] ^ 1)  # an id that stays in range: the CRC-32 catches it
    one_error(run(*args), rf"{re.escape(str(shard))}: its token bytes do not match the CRC-32 recorded when it "
                          r"was written")

    # one read per version of a file: a second open of an unchanged file reads no ids; any write is seen
    shard.write_bytes(clean)
    reads = []
    counting = types.SimpleNamespace(argmax=np.argmax, asarray=lambda a: reads.append(len(a)) or np.asarray(a))
    monkeypatch.setattr(token_check, "np", counting)  # token_check's numpy: counts the ids it reads
    monkeypatch.setattr(token_check, "RACY_S", 0.0)  # else a file written < 2 s ago is read every time
    TokenDataset(str(ds), "train", 16, seed=0)
    assert sum(reads) == n
    TokenDataset(str(ds), "train", 16, seed=0)
    assert sum(reads) == n  # remembered
    poke(3, 256)  # in range, same size and inode: a write changes mtime/ctime, so it is read again
    with pytest.raises(ValueError, match="CRC-32"):
        TokenDataset(str(ds), "train", 16, seed=0)

    # a file written into while a run holds it open: every batch is range-checked as it is cut
    shard.write_bytes(clean)
    data = TokenDataset(str(ds), "train", 16, seed=0)
    poke(5 * 16 + 3, 999)  # window 5
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}: token 83 \(byte offset {HEADER + 166}\) is 999, "
                                         r"outside .*changed while it was in use"):
        data.batch(range(data.n_windows), torch.device("cpu"))


def test_the_model_refuses_bad_ids_and_empty_batches():
    import torch

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, pos_mode="rope"))
    x = torch.zeros(2, 8, dtype=torch.long)
    for idx, targets, msg in ((x, x.clone().fill_(64), r"targets: token ids must be in \[-1, 64\), got min 64"),
                              (x, x.clone().fill_(-2), r"targets: token ids must be in \[-1, 64\), got min -2"),
                              (x - 1, x, r"idx: token ids must be in \[0, 64\), got min -1"),
                              (x, x[:, :4], r"targets must be \[batch, time\] like idx \(2, 8\), got shape \(2, 4\)"),
                              (x[:0], x[:0], r"idx has no tokens \(shape \(0, 8\)\)"),
                              (x[:, :0], x[:, :0], r"idx has no tokens \(shape \(2, 0\)\)")):
        with pytest.raises(ValueError, match=msg):
            model(idx, targets)
    x[0, 3] = -1  # ignored targets are fine
    assert torch.isfinite(model(x.clamp(min=0), x)[1])


# ----- 4. --raw_tokens: the cheap signs of the wrong dtype ----------------------------------------

def test_raw_tokens_of_the_wrong_dtype_are_refused(tmp_path):
    import numpy as np
    ids = np.random.default_rng(0).integers(0, 50_000, 10_000)
    ids[::97] = 70_000  # dolma2 ids above 65,535 (their high halves are 1)
    u32, u16 = tmp_path / "u32.bin", tmp_path / "u16.bin"
    ids.astype(np.uint32).tofile(u32)
    (ids % 50_000).astype(np.uint16).tofile(u16)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(ids.astype(np.uint16).tobytes()[:-1])
    floats = tmp_path / "floats.npy"
    np.save(floats, ids.astype(np.float32))
    cases = (
            (u32, "uint16", r"u32.bin: (9\d|100)% of the ids at odd positions are 0 \(about half of all ids\): "
                            r"these look like uint32 ids read as uint16; use --dtype=uint32"),
            (u16, "uint32", r"u16.bin: id \d+ is outside the tokenizer's vocabulary \[0, 100278\).*use --dtype=uint16"),
            (odd, "uint16", r"odd.bin is 19,999 bytes, not a multiple of 2: not a flat array of uint16 ids"),
            (odd, "uint32", r"not a multiple of 4.*use --dtype=uint16"),
            (floats, "uint32", r"floats.npy holds a 1-D float32 array; token ids are a flat integer array"))
    results = prepare_runs(*[[f"--raw_tokens={src}", f"--out={tmp_path / 'o'}", "--tokenizer=olmo2",
                              f"--dtype={dtype}"] for src, dtype, _ in cases],
                           [f"--raw_tokens={u32}", f"--out={tmp_path / 'o32'}", "--tokenizer=olmo2"],
                           [f"--raw_tokens={u16}", f"--out={tmp_path / 'o16'}", "--tokenizer=olmo2", "--dtype=uint16"])
    for (_, _, msg), res in zip(cases, results):
        one_error(res, msg)
    assert not (tmp_path / "o").exists()
    assert [r.returncode for r in results[-2:]] == [0, 0], [r.stderr for r in results[-2:]]


# ----- 6. data.prepare: one error line naming the file (and line) for every bad input -----------------

def test_prepare_bad_inputs_are_one_line_naming_the_file(corpus, tmp_path):
    import gzip
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nums.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    (bad / "nulls.jsonl").write_text('{"text": null}\n')
    with gzip.open(bad / "cut.jsonl.gz", "wt") as f:
        f.write('{"text": "a long enough document"}\n' * 2000)
    blob = (bad / "cut.jsonl.gz").read_bytes()
    (bad / "cut.jsonl.gz").write_bytes(blob[:len(blob) // 2])  # a download cut short
    (bad / "notgz.txt.gz").write_text("plain text with a .gz name")
    out = tmp_path / "out"
    cases = {bad / "nums.jsonl": r"nums.jsonl:2: its 'text' is 42 \(int\), not a string",
             bad / "nulls.jsonl": r"nulls.jsonl:1: its 'text' is null \(NoneType\), not a string",
             bad / "cut.jsonl.gz": r"cut.jsonl.gz: the gzip stream is damaged or cut short \(EOFError",
             bad / "notgz.txt.gz": r"notgz.txt.gz: the gzip stream is damaged or cut short \(BadGzipFile"}
    # and where the output cannot go: under a file, on a file system that refuses it
    (tmp_path / "afile").write_text("x")
    cases[tmp_path / "afile" / "ds"] = r"cannot write .*afile/ds.tmp: Not a directory \[ENOTDIR\]"
    cases["/sys/nanorepo_test_ds"] = r"cannot write /sys/nanorepo_test_ds.tmp: .* \[(EPERM|EACCES|EROFS)\]"
    results = prepare_runs(*[[f"--input={src}", f"--input={corpus}", f"--out={out}", "--tokenizer=byte"]
                             for src in list(cases)[:4]],
                           *[[f"--input={corpus}", f"--out={dest}", "--tokenizer=byte"] for dest in list(cases)[4:]])
    for msg, res in zip(cases.values(), results):
        one_error(res, msg)
    # a full disk (ENOSPC from the kernel, as /dev/full gives it) while the dataset is written
    full = ("import errno, os, runpy, sys\n"
            "def fsync(fd):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.fsync = fsync\nsys.argv = ['prepare'] + sys.argv[1:]\n"
            "runpy.run_module('data.prepare', run_name='__main__')\n")
    one_error(run("-c", full, f"--input={corpus}", f"--out={out}", "--tokenizer=byte"),
              r"cannot write .*out.tmp/.*: No space left on device \[ENOSPC\]; the disk is full")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    # a tokenizer that needs the network, without one (a proxy that refuses: the same on any machine)
    one_error(run("-m", "data.prepare", f"--input={corpus}", f"--out={out}", "--tokenizer=r50k_base",
                  env={"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                       "TIKTOKEN_CACHE_DIR": str(tmp_path / "tk")}),
              r"tokenizer 'r50k_base' could not be loaded: tiktoken downloads its ranks and that failed.*use "
              r"'olmo2' or 'byte'")
    assert not out.exists()


def test_the_readme_prepare_command_works_on_a_small_folder(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(5):  # far fewer than --val_every's 1000
        (src / f"{i}.txt").write_text(f"note {i} " * 50)
    res = run("-m", "data.prepare", f"--input={src}", f"--out={tmp_path / 'text'}", "--tokenizer=olmo2")
    assert res.returncode == 0, res.stderr
    assert "5 documents, fewer than --val_every=1000: the last one goes to val.bin" in res.stdout
    printed = re.findall(r"^  (\S+\.bin): ", res.stdout, re.M)  # the names printed are the names written
    assert printed == ["train_000.bin", "val.bin"] and sorted(printed) == sorted(
        f for f in os.listdir(tmp_path / "text") if f.endswith(".bin"))
    from data.tokenizer import load_tokenizer
    from data.tokens import read_tokens
    enc = load_tokenizer(str(tmp_path / "text"))
    assert enc.decode(read_tokens(str(tmp_path / "text" / "val.bin")).tolist()) == "note 4 " * 50 + "<|endoftext|>"


# ----- 7, 8, 10. values that used to pass the checks and fail later -----------------------------------

def test_bad_values_fail_up_front_with_one_line_and_nothing_written(reference, tmp_path):  # noqa: F811
    from test_reliability import cli
    out = tmp_path / "never"
    train = [f"--out_dir={out}", "--device=cpu", "--max_iters=1"]
    base1 = os.path.join(str(tmp_path), "base1")
    os.symlink(reference, base1)
    cases = [
        ("train.py", ["--rope_theta=0"], r"^error: out of range: rope_theta=0.0 \(must be > 0\)\n$"),
        ("train.py", ["--rope_theta=-5", "--init_std=-1", "--seed=-1"],
         r"out of range: init_std=-1.0 \(must be >= 0\), rope_theta=-5.0 \(must be > 0\), seed=-1 \(must be in "),
        ("train.py", ["--learning_rate=nan"], r"^error: out of range: learning_rate=nan \(must be finite\)\n$"),
        ("train.py", ["--n_head=3"], r"n_embd \(128\) must split into n_head \(3\) heads of even size\n$"),
        ("train.py", ["--n_layer=2", "--repo_start_layer=5"], r"repo_start_layer=5 is out of range"),
        ("train.py", ["--n_kv_head=3"], r"n_head \(4\) must be a multiple of n_kv_head \(3\)"),
        ("bench.py", ["--n_head=3"], r"n_embd \(256\) must split into n_head \(3\) heads.*\(--vocab_size, --n_layer"),
        ("bench.py", ["--vocab_size=0", "--n_layer=-2"], r"--vocab_size=0, --n_layer=-2: must be at least 1"),
        ("bench.py", ["--batch_size=0"], r"--batch_size=0: must be at least 1"),
        ("bench.py", ["--seq_len=0"], r"--seq_len=0: must be at least 1"),
        ("bench.py", ["--what=attention", "--attn_dims=33"], r"--attn_dims=33: head dims must be even"),
        ("bench.py", ["--what=attention", "--attn_seqs=64,x"], r"--attn_seqs='64,x': give whole numbers"),
        ("eval.py", [f"--ckpt={base1}", f"--ckpt={base1}/", f"--out={out}"],
         r"--ckpt lists a checkpoint twice: .*base1 and .*base1/ are both"),
        ("eval.py", [f"--ckpt={reference}", f"--ckpt={base1}", f"--out={out}"], r"lists a checkpoint twice"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append(("bench.py", ["--what=gpu", f"--out={out}"], r"--what=gpu needs a CUDA GPU .*add --smoke"))
    for (script, args, pattern), (rc, err, _) in zip(cases, cli(*[(s, (train if s == "train.py" else []) + a)
                                                                 for s, a, _ in cases])):
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (script, args, rc, err[-2000:])
        assert re.search(pattern, err), (script, args, pattern, err)
    assert not out.exists()
    # a Triton backend on a machine without CUDA (and without the interpreter) is refused at config time
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "train.py", *train, "--attn_backend=triton"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    if not __import__("torch").cuda.is_available():
        one_error(res, r"attn_backend='triton' runs Triton kernels, which need a CUDA GPU")
        assert not out.exists()


# ----- 11. long work says how far it is ------------------------------------------------------------

def big_corpus(folder, n_files=6, chars=600_000):
    folder.mkdir()
    for i in range(n_files):  # ~3.6M characters: several of prepare's ~1M-character batches
        (folder / f"{i}.txt").write_text(("lorem ipsum dolor sit amet " * (chars // 27))[:chars])
    return folder


def test_progress_plain_lines_in_a_log_a_rewritten_line_on_a_terminal(tmp_path):
    import pty
    src = big_corpus(tmp_path / "src")
    cmd = ["-m", "data.prepare", f"--input={src}", "--tokenizer=byte", "--val_every=3"]
    # a log (a pipe): plain lines, here one per batch (NANOREPO_PROGRESS_S=0; by default every 30 s)
    res = run(*cmd, f"--out={tmp_path / 'a'}", env={"NANOREPO_PROGRESS_S": "0"})
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("prepare: ")]
    assert len(lines) >= 3 and "\r" not in res.stdout, res.stdout
    done = [float(re.match(r"prepare: +([\d.]+)% ([\d,]+) documents, ([\d,]+) tokens, [\d.]+[kMG]?B/s, "
                           r"\d+:\d\d:\d\d elapsed, \d+:\d\d:\d\d left$", line).group(1)) for line in lines]
    assert done == sorted(done) and 0 < done[0] and done[-1] <= 100
    # the default: a job shorter than 30 s prints no progress lines into a log
    res = run(*cmd, f"--out={tmp_path / 'b'}")
    assert res.returncode == 0 and "prepare: " not in res.stdout
    # under torchrun only rank 0 reports
    res = run(*cmd, f"--out={tmp_path / 'c'}", env={"NANOREPO_PROGRESS_S": "0", "RANK": "1"})
    assert res.returncode == 0 and "prepare: " not in res.stdout
    # a terminal: one line rewritten in place (carriage returns), ended before the summary lines
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, *cmd, f"--out={tmp_path / 'd'}"], cwd=ROOT, stdout=secondary,
                            stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    os.close(primary)
    text = b"".join(chunks).decode()
    if "\rprepare: " in text:  # at least one 0.5 s interval passed (it does on a 2-core machine)
        assert re.search(r"\rprepare: +[\d.]+% .* left *\r?\n  train_000.bin: ", text), text[-2000:]
    assert "documents from 6 files" in text


def test_train_and_eval_lines_carry_the_time_left(reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    res = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=11", "--log_interval=1")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = re.findall(r"^iter (\d+): loss .* \| (\d+:\d\d:\d\d|\?) left$", res.stdout, re.M)
    assert [int(s) for s, _ in steps] == [9, 10, 11] and steps[-1][1] == "0:00:00", res.stdout
    res = run("eval.py", f"--ckpt={out}", "--tasks=niah_single", "--lengths=256,512", "--n=2", "--positions=false",
              "--plot=false", f"--out={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    done = re.findall(r"^  niah_single +len +(\d+)(?: yarn)? .*\((\d+)/(\d+) done, \d+s, (\S+) left\)$", res.stdout, re.M)
    # beyond the training length (32) each length twice, without and with YaRN
    assert [(int(a), int(b), int(c)) for a, b, c, _ in done] == [(256, 1, 4), (256, 2, 4), (512, 3, 4), (512, 4, 4)], \
        res.stdout
    assert done[-1][3] == "0:00:00"
