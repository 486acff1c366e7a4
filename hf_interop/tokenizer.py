"""
Hugging Face's tokenizer files <-> the tiktoken encodings nanoRePo uses (data/tokenizer.py).

Writing: hf_tokenizer_files(enc) gives tokenizer.json in the `tokenizers` library's format (a
byte-level BPE: the encoding's split regex, then GPT-2's byte-to-character map, then BPE with
every merge that tiktoken's ranks imply), tokenizer_config.json and special_tokens_map.json, so
AutoTokenizer.from_pretrained(dir) gives the ids tiktoken gives.

Why the two agree. tiktoken merges, inside each regex piece, the adjacent pair whose
concatenation has the lowest rank (leftmost on ties) and returns a piece that is itself a token
whole. The written BPE lists, for every token, each split into two tokens, ordered by the rank
of the result (Hugging Face's own tiktoken converter does the same), and sets ignore_merges (a
piece that is a token stays whole). The pairs either side may merge are then the same, in the
same order. Special tokens become added tokens with special=true: AutoTokenizer matches them in
text as tiktoken's encode(allowed_special="all") does, and with split_special_tokens=True it
reads them as text, as encode_ordinary does.

Reading: encoding_from_hf(file) turns an HF tokenizer.json that is a byte-level BPE (GPT-2,
OLMo-2, Llama-3 and the tokenizers library's ByteLevelBPETokenizer all are) into a tiktoken
encoding: the ids become ranks, the split regex becomes tiktoken's pattern, added tokens become
special tokens. The merges must come in the order of the ids of what they make (so a rank says
when a pair merges, all tiktoken knows); a file whose merges do not (or that has a normalizer,
another model type or pre-tokenizer, byte fallback, missing bytes) is refused with a ValueError
naming the file and the reason. (tiktoken would also merge two tokens whose concatenation is a
token where a file lists no such merge, and keep a piece that is a token whole; on the BPEs the
tokenizers library trains this made no difference on any text tested, docs/interop.md.)
"""
import hashlib
import json
import re

import tiktoken

# GPT-2's regex, which ByteLevel(use_regex=True) applies before the bytes are mapped
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map byte -> printable character (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


def _chars(token: bytes) -> str:
    return "".join(BYTE_CHAR[b] for b in token)


def merges_from_ranks(ranks: dict) -> list:
    """Every (left, right) pair of tokens whose concatenation is a token, in the order tiktoken merges
    them: by the rank of the result, then of the left and right parts."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


# ----- tiktoken -> HF ----------------------------------------------------------------------------

def onig_pattern(pat: str) -> str:
    """tiktoken's regex (Rust fancy-regex syntax) in the tokenizers library's Oniguruma syntax. The
    one construct they read differently in the patterns used here: a possessive counted repeat,
    `\\p{N}{1,3}+` (cl100k_base), is "1 to 3 digits, possessively" in Rust but "(1 to 3 digits) one
    or more times" in Oniguruma, which would keep a whole number together. Possessive and greedy
    agree at the end of an alternative, where these stand, so the `+` is dropped."""
    return re.sub(r"(?<!\\)(\{\d+(?:,\d*)?\})\+", r"\1", pat)


def hf_tokenizer_json(enc: tiktoken.Encoding) -> dict:
    ranks = enc._mergeable_ranks
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(enc._pat_str)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {_chars(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[_chars(a), _chars(b)] for a, b in merges_from_ranks(ranks)]},
    }


def hf_tokenizer_files(enc: tiktoken.Encoding, model_max_length=None) -> dict:
    """{file name: bytes} of tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    eos = EOT if EOT in enc._special_tokens else None
    pad = "<|pad|>" if "<|pad|>" in enc._special_tokens else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": eos, "pad_token": pad, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or int(1e30),
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s, i in specials},
    }
    special_map = {k: v for k, v in (("eos_token", eos), ("pad_token", pad)) if v is not None}
    dump = lambda obj: json.dumps(obj, indent=1, ensure_ascii=False).encode()  # noqa: E731
    return {"tokenizer.json": dump(hf_tokenizer_json(enc)), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(special_map)}


# ----- HF -> tiktoken ----------------------------------------------------------------------------

class HFEncoding(tiktoken.Encoding):
    """A tiktoken encoding whose end-of-text token may be named otherwise than <|endoftext|>
    (an HF tokenizer's eos_token, e.g. Llama-3's <|end_of_text|>)."""

    def __init__(self, *args, eot=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._eot = eot

    @property
    def eot_token(self) -> int:
        if self._eot is not None:
            return self._eot
        if EOT not in self._special_tokens:
            raise ValueError(f"tokenizer {self.name} has no end-of-text token: no <|endoftext|> and no eos_token "
                             "in tokenizer_config.json")
        return super().eot_token


def is_hf_tokenizer_json(info) -> bool:
    return isinstance(info, dict) and isinstance(info.get("model"), dict)


def _split_pattern(pre, file) -> str:
    """The regex tiktoken must split with: a Split(Regex) followed by ByteLevel(use_regex=false),
    or a lone ByteLevel (GPT-2's regex)."""
    def bad(why):
        return ValueError(f"{file}: {why}; only byte-level BPE tokenizers (a Split regex and ByteLevel, or "
                          "ByteLevel alone, as GPT-2, OLMo-2 and Llama-3 use) can be read into tiktoken")
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not steps or any(not isinstance(s, dict) for s in steps):
        raise bad("it has no pre-tokenizer")
    *splits, last = steps
    if last.get("type") != "ByteLevel":
        raise bad(f"its pre-tokenizer ends in {last.get('type')!r}, not ByteLevel")
    if last.get("add_prefix_space"):
        raise bad("its ByteLevel pre-tokenizer adds a prefix space (tiktoken cannot)")
    if last.get("use_regex", True):
        if splits:
            raise bad("it splits twice (a Split before a ByteLevel that splits with GPT-2's regex too)")
        return GPT2_PAT
    if len(splits) != 1 or splits[0].get("type") != "Split" or "Regex" not in (splits[0].get("pattern") or {}) \
            or splits[0].get("behavior") != "Isolated" or splits[0].get("invert"):
        raise bad(f"its pre-tokenizer is {[s.get('type') for s in steps]}, not one isolating Split(Regex) + ByteLevel")
    return splits[0]["pattern"]["Regex"]


def encoding_from_hf(file: str, name: str = None, eos_token: str = None) -> tiktoken.Encoding:
    """The tiktoken encoding of an HF tokenizer.json (see the module docstring for which files);
    eos_token names the end-of-text token when it is not <|endoftext|> (tokenizer_config.json's)."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not JSON ({e})") from None
    model = info.get("model") if isinstance(info, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{file} is not a tokenizer.json of the Hugging Face tokenizers library (no 'model')")
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{file} holds a {model.get('type')} model; only byte-level BPE tokenizers can be read into tiktoken")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{file}: its BPE sets {key}={model[key]!r}, which tiktoken cannot represent")
    if info.get("normalizer"):
        raise ValueError(f"{file} has a normalizer ({info['normalizer'].get('type')}); tiktoken applies none")
    pat = _split_pattern(info.get("pre_tokenizer"), file)

    vocab = model["vocab"]
    added = {t["content"]: t["id"] for t in info.get("added_tokens") or []}
    ranks = {}
    for tok, i in vocab.items():
        if added.get(tok) == i:
            continue  # an added token listed in the vocab too: in tiktoken it is a special token only
        if any(c not in CHAR_BYTE for c in tok):
            raise ValueError(f"{file}: vocabulary entry {tok!r} is not in the byte-level alphabet (not a byte-level BPE)")
        ranks[bytes(CHAR_BYTE[c] for c in tok)] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{file}: the vocabulary lacks {len(missing)} of the 256 single bytes (e.g. {missing[:5]}); "
                         "tiktoken needs every byte to be a token")
    if len(set(ranks.values()) | set(added.values())) != len(ranks) + len(added):
        raise ValueError(f"{file}: two tokens share an id")
    # the merges must come in the order of the ids of their results: then the rank of a pair's
    # concatenation says when it merges, which is all tiktoken knows
    last = -1
    for n, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        tok = vocab.get(a + b)
        if tok is None or a not in vocab or b not in vocab:
            raise ValueError(f"{file}: merge {n} ({a!r}, {b!r}) joins tokens not in the vocabulary")
        if tok < last:
            raise ValueError(f"{file}: merge {n} ({a!r} + {b!r} -> id {tok}) comes after a merge making id {last}; "
                             "merges out of id order cannot be expressed as tiktoken ranks")
        last = tok
    eot = added.get(eos_token) if eos_token else None
    if name is None:  # named by content: the same tokenizer gets the same name from any file
        h = hashlib.sha256(json.dumps([pat, sorted(added.items())]).encode())
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d %s\n" % (rank, tok.hex().encode()))
        name = "hf-" + h.hexdigest()[:12]
    try:
        return HFEncoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=added, eot=eot)
    except ValueError as e:  # tiktoken's regex engine refuses the pattern
        raise ValueError(f"{file}: its split regex {pat!r} does not compile in tiktoken ({e})") from None
