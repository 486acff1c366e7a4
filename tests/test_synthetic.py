"""The synthetic retrieval tasks of experiments/synthetic.py: every answer follows from a lookup in
the context (checked here by an independent search), offsets vary, the training and evaluation
streams are disjoint, and one run goes end to end through the report."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import synthetic as syn  # noqa: E402
import synthetic_report as report  # noqa: E402


def lookup(x, t, task):
    """The answer at target position t found by searching the context, and where it was found."""
    if task in ("induction", "recall"):  # the token after the earlier occurrence of x[t]
        j = max(j for j in range(t) if x[j] == x[t])
        return x[j + 1], j + 1
    if task == "distract":  # the value of the pair "a b" asked for by "? a b"
        (j,) = [j for j in range(t - 3) if x[j] == x[t - 1] and x[j + 1] == x[t]]
        return x[j + 2], j + 2
    name, col = x[t - 1], x[t] - syn.COLS.start  # table: the row named x[t - 1], cell number col
    body = [j for j in range(t - 2) if x[j] == name and x[j - 1] != syn.QUERY]
    assert len(body) == 1, "a row name occurs once in the table"
    return x[body[0] + 1 + col], body[0] + 1 + col


@pytest.mark.parametrize("task", list(syn.TASKS))
@pytest.mark.parametrize("noise", [False, True])
def test_every_answer_is_the_result_of_a_lookup(task, noise):
    rng = np.random.default_rng(0)
    x, y, metas = syn.examples(task, 200, 64, noise, rng, "train")
    offsets = set()
    for xb, yb, meta in zip(x.tolist(), y.tolist(), metas):
        targets = [t for t, v in enumerate(yb) if v != -1]
        assert targets, "every sequence asks at least one question"
        for t in targets:
            answer, source = lookup(xb, t, task)
            assert yb[t] == answer
            offsets.add(t - source)
        assert yb[meta["query"]] == xb[meta["source"][0]]  # the analysed query and its source agree
        filler = [v for v, r in zip(xb, meta["roles"]) if r == 0]
        assert all((v in syn.NOISE) if noise else v == syn.QUIET for v in filler)
    assert len(offsets) >= 10, f"the answer lies at only {sorted(offsets)} tokens back: a fixed offset would solve it"


def test_training_and_evaluation_streams_are_disjoint_and_fixed():
    rng = np.random.default_rng(1)
    for task in syn.TASKS:
        train = syn.examples(task, 100, 32, None, rng, "train")[0].numpy()
        assert not any(syn.is_eval(s) for s in train)
        a, b = syn.eval_set(task, 50, 64, True)[0], syn.eval_set(task, 50, 64, True)[0]
        assert (a == b).all() and all(syn.is_eval(s) for s in a.numpy())
        assert not {s.tobytes() for s in train} & {s.tobytes() for s in a.numpy()}


def test_one_run_end_to_end_and_its_report(tmp_path):
    runs = [syn.run(["recall"], arm, 0, "smoke", steps=4) for arm in ("rope", "repo")]
    runs.append(dict(runs[1], seed=1))
    rope = runs[0]
    assert [c["step"] for c in rope["curve"]] == [4]
    assert {(f["length"], f["noise"], f["yarn"]) for f in rope["final"]} == \
        {(n, nz, y) for n in (32, 64, 128) for nz in (False, True) for y in (False, True) if n > 32 or not y}
    a = rope["analysis"]["recall"]
    # RoPE layers give token t the position t: range L - 1, a key next to its value 1 / (L - 1) apart
    assert a["range"]["32"] == pytest.approx([31.0] * 3) and a["range"]["128"] == pytest.approx([127.0] * 3)
    assert a["kv_gap"] == pytest.approx([1 / 31] * 3, rel=1e-5)
    assert all(0 <= m <= 1 for m in a["attention_on_source"])
    S = report.summarise(runs)
    assert list(S["recall"]) == ["rope", "repo"] and len(S["recall"]["repo"]) == 2
    md = report.table_md("recall", S["recall"], 32, 4)
    assert "| rope | never (0/1) |" in md and "| repo | " in md and "range at L" in md


def test_bad_arguments_get_one_error_line():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "synthetic.py"), "--tasks=maze", "--arm=rope",
                        "--out=/dev/null"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["synthetic", "--arms=rope,maze"], ["study"], ["synthetic", "--seed=1"]])
def test_repro_refuses_bad_arguments_with_one_error_line(args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "repro.py"), *args], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1, p.stderr


def test_repro_synthetic_seeds_and_tasks_per_scale(monkeypatch):
    """smoke is one seed of induction unless asked otherwise; --seeds and --tasks are passed through."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import repro
    calls = []
    monkeypatch.setattr(repro, "synthetic", lambda *a, **k: calls.append((a, k)))
    repro.main(["synthetic", "--scale=smoke"])
    repro.main(["synthetic", "--scale=smoke", "--seeds=2", "--tasks=recall,distract", "--arms=rope,repo"])
    repro.main(["synthetic"])
    assert calls[0][0] == ("smoke", 1, 2, ["induction"], None)
    assert calls[1][0] == ("smoke", 2, 2, ["recall", "distract"], ["rope", "repo"])
    assert calls[2][0] == ("cpu", 3, 2, ["induction", "recall", "table"], None)
