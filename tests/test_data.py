"""data/: token files (round trip, header and size checks), the sampler's determinism, the
tokenizers (a naive BPE reference, cl100k/OLMo-2 ids, save/load), prepare.py and the embedded
stdlib dataset.

    python -m pytest -q tests/test_data.py
"""
import json
import os
import zlib
from collections import Counter

import numpy as np
import pytest

from data import prepare, stdlib_text
from data.tokenizer import BPE_PAT, get_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from data.tokens import HEADER, TokenDataset, read_header, read_tokens, write_tokens

TRICKY = "Hello wörld_x² 123456 it's  \n\n  def f(x):\t return 你好 🙂 __init__ <|endoftext|> \r\n\x00 é"


# ----- token files ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_vocab,dtype", [(1024, np.uint16), (65536, np.uint16), (100278, np.uint32)])
def test_token_file_round_trip(tmp_path, n_vocab, dtype):
    ids = np.random.default_rng(0).integers(0, n_vocab, 10_000)
    ids[:2] = [0, n_vocab - 1]
    path = str(tmp_path / "t.bin")
    write_tokens(path, ids, "some-tok", n_vocab, eot=n_vocab - 1)
    h = read_header(path)
    assert h == dict(path=path, count=10_000, itemsize=np.dtype(dtype).itemsize, n_vocab=n_vocab, eot=n_vocab - 1,
                     tokenizer="some-tok", max_id=n_vocab - 1, crc32=zlib.crc32(ids.astype(dtype).tobytes()))
    arr = read_tokens(path)
    assert arr.dtype == dtype and np.array_equal(arr, ids)
    assert os.path.getsize(path) == HEADER + 10_000 * np.dtype(dtype).itemsize
    with open(path, "rb") as f:  # the documented layout, read independently of data/tokens.py
        raw = f.read()
    assert raw[:8] == b"nanoRePo" and int.from_bytes(raw[8:12], "little") == 1
    assert int.from_bytes(raw[16:24], "little") == 10_000
    assert np.array_equal(np.frombuffer(raw[HEADER:], dtype=dtype), ids)
    assert int.from_bytes(raw[116:120], "little") == zlib.crc32(raw[HEADER:]) and raw[120:124] == b"\1\0\0\0"


def test_token_file_header_checks(tmp_path):
    path = str(tmp_path / "t.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_tokens(path)
    write_tokens(path, np.arange(100), "byte", 257)
    with open(path, "r+b") as f:  # truncated: the size no longer matches the count
        f.truncate(HEADER + 150)
    with pytest.raises(ValueError, match="truncated"):
        read_tokens(path)
    with open(path, "wb") as f:  # a raw array without our header
        f.write(np.arange(300, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match="not a nanoRePo token file"):
        read_tokens(path)
    write_tokens(path, np.arange(100), "byte", 257)
    raw = bytearray(open(path, "rb").read())
    raw[8] = 7  # version 7
    open(path, "wb").write(raw)
    with pytest.raises(ValueError, match="version 7"):
        read_tokens(path)
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        write_tokens(path, np.array([1, 300]), "byte", 257)
    assert not os.path.exists(path + ".tmp")


def test_dataset_windows_and_epochs(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    # two shards: 10*8+1 and 5*8+3 tokens -> 10 + 5 windows of 9 tokens
    a, b = np.arange(81), 1000 + np.arange(43)
    write_tokens(str(folder / "train_000.bin"), a, "t", 2000)
    write_tokens(str(folder / "train_001.bin"), b, "t", 2000)
    ds = TokenDataset(str(folder), "train", block_size=8, seed=3)
    assert ds.n_windows == 15
    wins = [ds.window(w).tolist() for w in range(15)]
    assert wins[0] == list(range(9)) and wins[9] == list(range(72, 81)) and wins[10] == list(range(1000, 1009))
    # one epoch deals every window exactly once, the next epoch in another order
    e0 = [tuple(ds.sample(g)) for g in range(15)]
    e1 = [tuple(ds.sample(g)) for g in range(15, 30)]
    assert sorted(e0) == sorted(map(tuple, wins)) == sorted(e1) and e0 != e1
    # a function of (seed, g) only: a fresh reader, visited in another order, agrees
    again = TokenDataset(str(folder), "train", block_size=8, seed=3)
    assert [tuple(again.sample(g)) for g in reversed(range(30))] == list(reversed(e0 + e1))
    assert [tuple(TokenDataset(str(folder), "train", 8, seed=4).sample(g)) for g in range(15)] != e0
    x, y = ds.batch(range(2), __import__("torch").device("cpu"))
    assert x.shape == (2, 8) and (x[:, 1:] == y[:, :-1]).all()
    ev = ds.eval_windows(4)
    assert ev == [0, 5, 9, 14] and ds.eval_windows(100) == list(range(15))
    with pytest.raises(ValueError, match="block_size=100 needs at least 101 tokens"):
        TokenDataset(str(folder), "train", block_size=100, seed=0)
    with pytest.raises(FileNotFoundError, match="no val.bin"):
        TokenDataset(str(folder), "val", block_size=8, seed=0)
    write_tokens(str(folder / "train_002.bin"), b, "other", 3000)
    with pytest.raises(ValueError, match="tokenized with other"):
        TokenDataset(str(folder), "train", block_size=8, seed=0)


# ----- tokenizers ----------------------------------------------------------------------------

def naive_bpe(text, vocab_size):
    """Reference BPE: recount every pair over all words at each merge (slow, obviously correct);
    same tie rule as train_bpe (highest count, then the smallest pair of ids)."""
    import re
    words = Counter(tuple(w.encode()) for w in re.findall(BPE_PAT, text))
    tokens = [bytes([i]) for i in range(256)]
    while len(tokens) < vocab_size - 1:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = tokens[best[0]] + tokens[best[1]]
        if merged in tokens:
            new = tokens.index(merged)
        else:
            new = len(tokens)
            tokens.append(merged)
        out = Counter()
        for w, f in words.items():
            res, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    res.append(new)
                    j += 2
                else:
                    res.append(w[j])
                    j += 1
            out[tuple(res)] += f
        words = out
    return tokens


def test_train_bpe_matches_naive_reference():
    import pydoc_data.topics
    text = pydoc_data.topics.topics["if"] + pydoc_data.topics.topics["while"] + TRICKY * 3
    enc = train_bpe(text, 400, "t")
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    assert [t for t, _ in ranks] == naive_bpe(text, 400)
    assert enc.n_vocab == 400 and enc.eot_token == 399
    for s in (text, TRICKY, "x" * 1000, ""):
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert len(enc.encode_ordinary(text)) < 0.6 * len(text.encode())  # it did learn to compress


def test_byte_and_olmo2_tokenizers():
    b = get_tokenizer("byte")
    assert b.n_vocab == 257 and b.eot_token == 256
    assert b.encode_ordinary("aé") == [97, 0xC3, 0xA9] and b.decode(b.encode_ordinary(TRICKY)) == TRICKY
    o = get_tokenizer("olmo2")
    assert o.n_vocab == 100278 and o.eot_token == 100257
    special = o._special_tokens
    assert special["<|pad|>"] == 100277 and special["<|extra_id_0|>"] == 100256
    assert special["<|im_start|>"] == 100264 and special["<|extra_id_10|>"] == 100275
    assert sorted(special.values()) == list(range(100256, 100278))
    # cl100k_base ids, known from OpenAI's published tokenizer
    assert o.encode_ordinary("hello world") == [15339, 1917]
    assert o.encode("a<|endoftext|>", allowed_special="all") == [64, 100257]
    assert o.decode(o.encode_ordinary(TRICKY)) == TRICKY


def test_save_load_tokenizers(tmp_path):
    import pydoc_data.topics
    custom = train_bpe(pydoc_data.topics.topics["for"], 300, "mine")
    for enc in (custom, get_tokenizer("byte"), get_tokenizer("olmo2")):
        d = str(tmp_path / enc.name)
        save_tokenizer(enc, d)
        info = json.load(open(os.path.join(d, "tiktoken.json")))
        assert {"name", "n_vocab", "eot_token", "pat_str", "special_tokens"} <= set(info)
        assert (info["name"], info["n_vocab"], info["eot_token"]) == (enc.name, enc.n_vocab, enc.eot_token)
        assert os.path.exists(os.path.join(d, "tokenizer.tiktoken")) == (enc.name == "mine")
        back = load_tokenizer(d)
        assert back.encode_ordinary(TRICKY) == enc.encode_ordinary(TRICKY) and back.n_vocab == enc.n_vocab
        assert get_tokenizer(d).name == enc.name  # a directory works as a tokenizer name
    with open(tmp_path / "mine" / "tokenizer.tiktoken", "ab") as f:
        f.write(b"eA== 300\n")
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("no-such-tokenizer")


# ----- prepare scripts -----------------------------------------------------------------------

def test_prepare_text_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first document\nline two")
    lines = [json.dumps({"text": "second ✓"}), "", json.dumps({"text": "third"})]  # blank lines are skipped
    (src / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    prepare.main([f"--input={src}", f"--out={out}", "--tokenizer=byte", "--val_every=2"])
    enc = load_tokenizer(str(out))
    train, val = read_tokens(str(out / "train_000.bin")), read_tokens(str(out / "val.bin"))
    # every 2nd document (a.txt, then b.jsonl's lines) goes to val, each followed by <|endoftext|>
    assert enc.decode(train.tolist()) == "first document\nline two<|endoftext|>third<|endoftext|>"
    assert enc.decode(val.tolist()) == "second ✓<|endoftext|>"
    assert read_header(str(out / "val.bin"))["tokenizer"] == "byte"
    (src / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prepare.main([f"--input={src}", f"--out={tmp_path / 'out2'}", "--tokenizer=byte"])


@pytest.mark.parametrize("npy_header", [False, True])
def test_prepare_raw_tokens(tmp_path, npy_header):
    ids = np.arange(5000, dtype=np.uint32) * 20
    src = tmp_path / "shard.npy"
    np.save(src, ids) if npy_header else ids.tofile(src)
    out = tmp_path / "out"
    prepare.main([f"--raw_tokens={src}", f"--out={out}", "--tokenizer=olmo2", "--val_tokens=100"])
    train, val = read_tokens(str(out / "train_000.bin")), read_tokens(str(out / "val.bin"))
    assert train.dtype == np.uint32 and np.array_equal(np.concatenate([train, val]), ids) and len(val) == 100
    assert load_tokenizer(str(out)).name == "olmo2"


def test_stdlib_dataset(tmp_path):
    folder = stdlib_text.prepare(str(tmp_path / "stdlib"))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    enc = load_tokenizer(folder)
    assert enc.n_vocab == stdlib_text.VOCAB_SIZE == 1024
    train, val = read_tokens(os.path.join(folder, "train.bin")), read_tokens(os.path.join(folder, "val.bin"))
    assert (len(train), len(val)) == (meta["tokens"]["train"], meta["tokens"]["val"])
    assert len(train) > 500_000 and len(val) > 20_000  # ~2 MB of text, ~2.7 characters per token
    assert read_header(os.path.join(folder, "val.bin"))["tokenizer"] == "stdlib"
    # the val documents are the first document and every 20th after it
    docs = stdlib_text.documents()
    first_val = enc.decode(val[:np.flatnonzero(val == enc.eot_token)[0]].tolist())
    assert first_val == docs[0]
    assert stdlib_text.prepare(folder) == folder  # already there: not rebuilt


def test_tokens_command_verifies_files_anew(tmp_path):
    """python -m data.tokens FILE: the header, then every id and the CRC-32 read again (no cache); a
    damaged id is one error line naming the file and the byte offset, exit 2."""
    import subprocess, sys
    path = str(tmp_path / "a.bin")
    write_tokens(path, np.arange(100, dtype=np.uint16), "byte", 256)
    run = lambda: subprocess.run([sys.executable, "-m", "data.tokens", path], capture_output=True, text=True,  # noqa: E731
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ok = run()
    assert ok.returncode == 0 and "CRC-32 as written" in ok.stdout, ok.stderr
    with open(path, "r+b") as f:
        f.seek(HEADER + 99 * 2)
        f.write(bytes([255, 255]))
    bad = run()
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {path}: token 99 (byte offset {HEADER + 198}) is 65535, outside the tokenizer's vocabulary "
        "[0, 256): the file is corrupt or was made with another tokenizer; prepare it again"]
