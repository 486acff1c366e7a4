"""eval.py, sample.py and train.py --init_from on Hugging Face directories written by others: an
OLMo-2 model saved by transformers with a tokenizer trained and saved by the tokenizers /
transformers libraries (HF's tokenizer.json, no file of ours), and a RePo model in the authors'
layout; a tokenizer tiktoken cannot represent is one `error:` line naming the file."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
import sample
import train
from data import prepare
from data.tokenizer import load_tokenizer
from model import GPT
from test_hf_tokenizer import topics_documents as documents, train_hf_bpe

transformers = pytest.importorskip("transformers")  # requirements-test.txt; never skipped in CI
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """(directory, transformers model, AutoTokenizer): nothing in it written by this project."""
    path = tmp_path_factory.mktemp("foreign")
    docs = documents()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_hf_bpe(docs[:40], ""), eos_token="<|endoftext|>",
                                               pad_token="<|pad|>")
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.Olmo2Config(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=256, eos_token_id=0, pad_token_id=1)
    model = transformers.Olmo2ForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    assert not any(os.path.exists(path / f) for f in ("tiktoken.json", "tokenizer.tiktoken"))
    return path, model, transformers.AutoTokenizer.from_pretrained(str(path))


def test_sample_on_a_foreign_directory_equals_transformers(foreign, capsys):
    path, model, tok = foreign
    prompt = "The for statement is used to"
    text = sample.main([f"--ckpt={path}", f"--prompt={prompt}", "--max_new_tokens=12", "--temperature=0"])
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert text == tok.decode(out[0])


def test_eval_on_a_foreign_directory(foreign, tmp_path):
    path, _, _ = foreign
    report = ev.main([f"--ckpt={path}", f"--out={tmp_path / 'e'}", "--tasks=table_cell", "--lengths=192", "--n=2",
                      "--positions=false", "--val_data=none"])
    assert {(r["task"], r["length"]) for r in report["results"] if r["task"] == "table_cell"} == {("table_cell", 192)}


def test_init_from_a_foreign_directory_with_data_in_its_tokenizer(foreign, tmp_path):
    path, model, tok = foreign
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(documents()[40:]):
        (src / f"{i}.txt").write_text(doc)
    data = str(tmp_path / "data")
    prepare.main([f"--input={src}", f"--out={data}", f"--tokenizer={path}", "--val_every=10"])
    assert load_tokenizer(data).name == load_tokenizer(str(path)).name  # the token files record it
    out = str(tmp_path / "run")
    train.main(["--device=cpu", f"--init_from={path}", "--pos_mode=repo", "--repo_start_layer=1", f"--dataset={data}",
                f"--out_dir={out}", "--block_size=64", "--batch_size=2", "--max_iters=1", "--eval_iters=1",
                "--sample_tokens=0"])
    # the export carries the same tokenizer, for transformers and for us
    again = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
    for text in documents()[60:]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert GPT.from_pretrained(os.path.join(out, "hf")).config.layer_modes() == ["rope", "repo"]


def test_a_tokenizer_we_cannot_represent_is_one_error_line(foreign, tmp_path):
    path, _, _ = foreign
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(path):
        (bad / f).write_bytes((path / f).read_bytes())
    info = json.loads((bad / "tokenizer.json").read_text())
    info["normalizer"] = {"type": "Lowercase"}
    (bad / "tokenizer.json").write_text(json.dumps(info))
    for cmd in (["eval.py", f"--ckpt={bad}", "--tasks=table_cell", "--lengths=192", f"--out={tmp_path / 'e'}"],
                ["sample.py", f"--ckpt={bad}", "--max_new_tokens=2"], ["-m", "infra.hf", str(bad)]):
        run = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(f"error: {bad / 'tokenizer.json'} has a normalizer (Lowercase)"), run.stderr
    run = subprocess.run([sys.executable, "-m", "infra.hf", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "tokenizer: hf-" in run.stdout and "n_vocab 1500, end of text 0" in run.stdout


def test_the_earlier_module_name_still_imports_and_runs(tmp_path):
    """hf_checkpoint, the earlier name of infra/hf.py: its functions are infra.hf's, and its command
    prints a directory's config as `python -m infra.hf` does."""
    import hf_checkpoint
    import infra.hf
    from model import GPT, GPTConfig
    assert hf_checkpoint.authors_format_problem is infra.hf.authors_format_problem
    assert hf_checkpoint.read_config is infra.hf.read_config
    GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)).save_pretrained(str(tmp_path / "m"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old, new = (subprocess.run([sys.executable, *cmd, str(tmp_path / "m")], capture_output=True, text=True, cwd=root)
                for cmd in (["hf_checkpoint.py"], ["-m", "infra.hf"]))
    assert old.returncode == new.returncode == 0 and "layer modes" in old.stdout and old.stdout == new.stdout, old.stderr
