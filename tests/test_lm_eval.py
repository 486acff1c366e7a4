"""lm-eval-harness on an exported model: `lm_eval --model hf --model_args
pretrained=<out>/hf,trust_remote_code=True` runs the local task docs/lm_eval/nanorepo_demo.yaml on a
tiny RePo model trained by train.py, and every log-likelihood it reports equals the one model.GPT
computes from the same tokens."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from data.tokenizer import load_tokenizer
from model import GPT

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -r requirements-test.txt")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = os.path.join(ROOT, "docs", "lm_eval", "nanorepo_demo.jsonl")


def our_loglikelihood(model, enc, context, continuation):
    """(sum of log p(continuation | context), whether greedy decoding gives it), lm-eval's way of
    splitting the text: whitespace ending the context moves to the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, ctx = enc.encode_ordinary(stripped + continuation), enc.encode_ordinary(stripped)
    cont = whole[len(ctx):]
    assert len(whole) <= model.config.block_size + 1  # lm-eval would cut the context to the model's length
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0][0]
    logp = torch.log_softmax(logits.double(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_lm_eval_harness_runs_the_local_task_on_an_export(byte_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--device=cpu", "--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=128", "--batch_size=2",
                "--max_iters=10", "--eval_interval=10", "--eval_iters=1", "--sample_tokens=0", f"--dataset={byte_data}",
                f"--out_dir={out}"])
    hf = os.path.join(out, "hf")
    assert json.load(open(os.path.join(hf, "config.json")))["model_type"] == "repo_olmo2"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf},trust_remote_code=True,dtype=float32", "--tasks", "nanorepo_demo",
           "--include_path", os.path.join(ROOT, "docs", "lm_eval"), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "lm_eval"), "--log_samples"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [samples] = glob.glob(str(tmp_path / "lm_eval" / "*" / "samples_nanorepo_demo_*.jsonl"))
    [results] = glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))
    docs = [json.loads(line) for line in open(TASK)]
    model, enc = GPT.from_pretrained(hf).eval(), load_tokenizer(hf)
    rows = [json.loads(line) for line in open(samples)]
    assert sorted(r["doc_id"] for r in rows) == list(range(len(docs)))
    correct = []
    for r in rows:
        doc = docs[r["doc_id"]]
        ours = [our_loglikelihood(model, enc, doc["context"], c) for c in doc["choices"]]
        theirs = [(float(ll), greedy == "True") for ll, greedy in r["filtered_resps"]]
        for (a, ga), (b, gb) in zip(ours, theirs):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-4) and ga == gb
        correct.append(max(range(len(ours)), key=lambda i: ours[i][0]) == doc["label"])
    acc = json.load(open(results))["results"]["nanorepo_demo"]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct))
