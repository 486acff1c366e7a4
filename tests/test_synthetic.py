"""The synthetic retrieval tasks of experiments/synthetic.py: every answer follows from a lookup in
the context (checked here by an independent search), offsets vary, the training and evaluation
streams are disjoint, and one run goes end to end through the report."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import synthetic as syn  # noqa: E402
import synthetic_report as report  # noqa: E402


def lookup(x, t, task):
    """The answer at target position t found by searching the context, and where it was found."""
    if task in ("induction", "recall"):  # the token after the earlier occurrence of x[t]
        j = max(j for j in range(t) if x[j] == x[t])
        return x[j + 1], j + 1
    if task in ("distract", "multikey"):  # the value of the pair "a b" asked for by "? a b"
        (j,) = [j for j in range(t - 3) if x[j] == x[t - 1] and x[j + 1] == x[t]]
        return x[j + 2], j + 2
    name, col = x[t - 1], x[t] - syn.COLS.start  # table: the row named x[t - 1], cell number col
    body = [j for j in range(t - 2) if x[j] == name and x[j - 1] != syn.QUERY]
    assert len(body) == 1, "a row name occurs once in the table"
    return x[body[0] + 1 + col], body[0] + 1 + col


def check_answers(task, x, y, metas, noise):
    """Every target re-derived by search; the recorded answers agree; the filler is as specified.
    Returns the offsets between a target and its source."""
    offsets = set()
    for xb, yb, meta in zip(x.tolist(), y.tolist(), metas):
        targets = [t for t, v in enumerate(yb) if v != -1]
        assert targets, "every sequence asks at least one question"
        for t in targets:
            answer, source = lookup(xb, t, task)
            assert yb[t] == answer
            offsets.add(t - source)
        assert sorted(t for t, _ in meta["answers"]) == targets
        for t, sources in meta["answers"]:  # every token holding the answer, the one search finds among them
            assert lookup(xb, t, task)[1] in sources and all(xb[j] == yb[t] for j in sources)
        filler = [v for v, r in zip(xb, meta["roles"]) if r == 0]
        if not noise:
            assert all(v == syn.QUIET for v in filler)
        elif task == "multikey":  # a haystack of the needles' own tokens
            assert all(v in syn.CONTENT for v in filler)
        else:
            assert all(v in syn.NOISE for v in filler)
        decoys = {v for v, r in zip(xb, meta["roles"]) if r == 4}  # induction's, beyond L: no token of the segment
        assert not decoys & {v for v, r in zip(xb, meta["roles"]) if r in (1, 2)}
    return offsets


@pytest.mark.parametrize("task", list(syn.TASKS))
@pytest.mark.parametrize("noise", [False, True])
def test_every_answer_is_the_result_of_a_lookup(task, noise):
    rng = np.random.default_rng(0)
    x, y, metas = syn.examples(task, 200, 64, noise, rng, "train")
    offsets = check_answers(task, x, y, metas, noise)
    assert len(offsets) >= 10, f"the answer lies at only {sorted(offsets)} tokens back: a fixed offset would solve it"


@pytest.mark.parametrize("task", list(syn.TASKS))
def test_paired_rendering_one_content_quiet_noisy_and_longer(task):
    """One set of contents rendered quiet and noisy at L, 2L, 4L: quiet and noisy differ only in the
    filler; longer renderings ask the same questions with the same answers and hold more distractors;
    every answer is still found by search."""
    L, n, blocks = 32, 40, {}
    for mult in (1, 2, 4):
        (xq, yq, mq), (xn, yn, mn) = (syn.rendered(task, n, L, mult, nz) for nz in (False, True))
        check_answers(task, xq, yq, mq, False), check_answers(task, xn, yn, mn, True)
        assert xq.shape == (n, mult * L) and (yq == yn).all()
        content = torch.tensor(np.stack([m["roles"] for m in mq])) != 0
        assert (xq[content] == xn[content]).all() and (xq[~content] == syn.QUIET).all()
        assert [m["example"] for m in mq] == [m["example"] for m in mn]
        answers = [yb[yb != -1].tolist() for yb in yq]
        if mult == 1:
            first, ids = answers, [m["example"] for m in mq]
        else:
            assert answers == first and [m["example"] for m in mq] == ids
        blocks[mult] = sum((xb != syn.QUIET).sum().item() for xb in xq)
    assert blocks[1] < blocks[2] < blocks[4], f"longer contexts add distractors, not only filler: {blocks}"


def test_multikey_haystack_near_misses_and_one_true_key():
    """The asked bigram occurs once in the body; near misses share exactly one of its tokens: 5 at L,
    14 at 4L (the longer context adds distractors); the haystack holds stray key tokens."""
    for mult, want in ((1, 5), (2, 8), (4, 14)):
        x, y, metas = syn.rendered("multikey", 60, 32, mult, True)
        stray_keys = 0
        for xb, meta in zip(x.tolist(), metas):
            a, b = xb[-2], xb[-1]
            body = xb[:-3]
            assert sum(body[j] == a and body[j + 1] == b for j in range(len(body) - 1)) == 1
            needles = [(s, xb[s + 1]) for s, _ in meta["pairs"][::2]]
            assert sum((xb[s] == a) != (k == b) for s, k in needles) == want
            stray_keys += sum(v in (a, b) for v, r in zip(body, meta["roles"]) if r == 0)
        assert stray_keys >= 20 * mult, "the haystack holds stray copies of the asked key's tokens"


def test_splits_are_disjoint_and_fixed():
    rng = np.random.default_rng(1)
    for task in syn.TASKS:
        x, _, metas = syn.examples(task, 100, 32, None, rng, "train")
        assert all(syn.split_of(m["content"]) == "train" for m in metas)
        train = {m["content"].tobytes() for m in metas}
        sets = {split: syn.rendered(task, 50, 32, 1, True, split) for split in ("dev", "test")}
        again = syn.eval_set(task, 50, 32, True)
        assert (sets["test"][0] == again[0]).all()
        contents = {split: {m["content"].tobytes() for m in s[2]} for split, s in sets.items()}
        assert all(syn.split_of(m["content"]) == split for split, s in sets.items() for m in s[2])
        assert not (contents["dev"] & contents["test"]) and not (train & (contents["dev"] | contents["test"]))


def test_attention_probs_match_eval_last_query_attention():
    from eval import last_query_attention
    torch.manual_seed(0)
    model = syn.GPT(syn.GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_embd=64, intermediate_size=64,
                                  block_size=32, pos_mode="repo", init_std=0.2)).eval()
    x = syn.eval_set("recall", 2, 32, True)[0]
    probs = syn.attention_probs(model, x)
    assert probs.shape == (3, 2, 4, 32, 32)
    for b in range(2):
        for t in (5, 31):
            ref = last_query_attention(model, x[b:b + 1, :t + 1])
            assert torch.allclose(probs[:, b, :, t, :t + 1], ref, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 4, 32), atol=1e-5) and (probs.triu(1) == 0).all()


def test_positions_as_zero_and_index_equal_nope_and_rope_layers():
    """z = 0 in the RePo layers is NoPE there, z = t is RoPE there: the same weights in an R1N2 and a
    RoPE model give the same logits."""
    torch.manual_seed(0)
    kw = dict(vocab_size=64, n_layer=3, n_head=4, n_embd=64, intermediate_size=64, block_size=32, init_std=0.2)
    repo = syn.GPT(syn.GPTConfig(pos_mode="repo", **kw)).eval()
    x = syn.eval_set("induction", 4, 32, True)[0]
    learned = repo(x)[0]
    for how, arm in (("zero", "r1n2"), ("index", "rope")):
        other = syn.GPT(syn.GPTConfig(**syn.ARMS[arm], **kw)).eval()
        other.load_state_dict(repo.state_dict(), strict=False)
        with syn.positions_as(repo, how):
            got = repo(x)[0]
        assert torch.allclose(got, other(x)[0], atol=1e-5)
        assert not torch.allclose(got, learned, atol=1e-3)
    assert torch.equal(repo(x)[0], learned)  # restored on exit


@pytest.fixture
def small(monkeypatch):
    """The smoke scale with small evaluation sets: a few seconds a run."""
    monkeypatch.setitem(syn.SCALES, "smoke", dict(syn.SCALES["smoke"], n_eval=16, n_final=16))


def test_one_run_end_to_end_and_its_report(small):
    runs = [syn.run(["recall"], arm, 0, "smoke", steps=4) for arm in ("rope", "nope", "repo")]
    runs.append(dict(runs[2], seed=1))
    rope = runs[0]
    assert [c["step"] for c in rope["curve"]] == [4]
    cells = {(n, nz, y) for n in (32, 64, 128) for nz in (False, True) for y in (False, True) if n > 32 or not y}
    assert {(f["length"], f["noise"], f["yarn"]) for f in rope["final"]} == cells
    # pure NoPE gets YaRN's temperature like the NoPE layers of a hybrid
    assert {(f["length"], f["noise"], f["yarn"]) for f in runs[1]["final"]} == cells
    assert {f["variant"] for f in runs[2]["final"]} == {"", "z=0", "z=index"} and {f["variant"] for f in rope["final"]} == {""}
    a = rope["analysis"]["recall"]
    # RoPE layers give token t the position t: range L - 1, every key-value pair its index distance
    assert a["range"]["32"] == pytest.approx([31.0] * 3) and a["range"]["128"] == pytest.approx([127.0] * 3)
    assert a["kv_gap"] == pytest.approx([a["kv_gap_rope"]] * 3, rel=1e-5) and a["kv_gap_rope"] == pytest.approx(1 / 31)
    assert all(0 <= m <= 1 for m in a["attention_on_source"])
    S = report.summarise(runs)
    assert list(S["recall"]) == ["rope", "nope", "repo", "repo z=0", "repo z=index"] and len(S["recall"]["repo"]) == 2
    md = report.table_md("recall", S["recall"], 32, 4)
    assert "| rope | 0/1 " in md and "| repo | " in md and "range at L" in md and " ± 0 " not in md


def test_induction_key_value_gap_is_the_pair_an_induction_head_reads(small):
    """RoPE's gap on induction is 1 / (L - 1): the looked-up token and the token after it."""
    r = syn.run(["induction"], "rope", 0, "smoke", steps=2)
    assert r["analysis"]["induction"]["kv_gap_rope"] == pytest.approx(1 / 31)
    assert r["analysis"]["induction"]["kv_gap"] == pytest.approx([1 / 31] * 3, rel=1e-5)


def test_bad_arguments_get_one_error_line():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "synthetic.py"), "--tasks=maze", "--arm=rope",
                        "--out=/dev/null"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["synthetic", "--arms=rope,maze"], ["study"], ["synthetic", "--seed=1"],
                                  ["sweep", "--scale=smoke"], ["synthetic", "--lrs=a,b"], ["synthetic", "--continued=yes"]])
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
    assert calls[0][0] == ("smoke", 1, 2, ["induction"], None) and calls[0][1]["lrs"] == [1e-3]
    assert calls[1][0] == ("smoke", 2, 2, ["recall", "distract"], ["rope", "repo"])
    assert calls[2][0] == ("cpu", 8, 2, ["induction", "multikey"], None) and len(calls[2][1]["lrs"]) == 3
    assert [k["continued"] for _, k in calls] == [False, False, True]  # the cpu study has the paper's protocol
    repro.main(["synthetic", "--continued=false"])
    assert calls[3][1]["continued"] is False
    assert "r1n2" in syn.SCALES["smoke"]["arms"] and "r1n2" in syn.SCALES["cpu"]["arms"]  # the matched control


def test_sign_flip_p_on_hand_checked_cases():
    assert report.sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)         # only all + and all - reach |6|
    assert report.sign_flip_p([3, 1, 1, -1]) == pytest.approx(8 / 16)    # |±3 ±1 ±1 ±1| >= 4 in 8 of 16
    assert report.sign_flip_p([1, -1]) == 1.0
    assert report.sign_flip_p([0.2] * 8) == pytest.approx(2 / 256)
    v = report.verdict([0.2] * 8)
    assert v["verdict"] == "supported" and (v["wins"], v["losses"], v["n"]) == (8, 0, 8)
    assert report.verdict([-0.2] * 8)["verdict"] == "not supported"
    assert report.verdict([0.2, -0.1] * 4)["verdict"] == "not supported"
    assert report.verdict([0.2] * 5)["verdict"].startswith("cannot be tested")  # 2/32 > 0.05: no outcome could decide
    assert report.verdict([0.2] * 8, learned=False)["verdict"].startswith("cannot be tested")


def test_steps_to_90_counts_every_seed():
    runs = [dict(steps_to_90=s) for s in (300, None, 500, None, None)]
    assert report.steps_to_90(runs) == "2/5 (median never)"
    assert report.steps_to_90(runs[:3]) == "2/3 (median 500)"
    assert report.cell([0.95, 0.5, 0.91]) == "79 (2/3)" and report.fmt([0.5]) == "50"


def test_best_lr_per_arm_from_the_dev_curve():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import repro
    curve = lambda a: [dict(accuracy={"induction": {"quiet": a, "noise": a}})]  # noqa: E731
    runs = [dict(arm="rope", lr=lr, tasks=["induction"], curve=curve(a)) for lr, a in ((1e-3, 0.5), (2e-3, 0.9), (4e-3, 0.9))]
    runs += [dict(arm="repo", lr=lr, tasks=["induction"], curve=curve(a)) for lr, a in ((1e-3, 0.7), (2e-3, 0.2))]
    assert repro.best_lrs(runs)[0] == {"rope": 2e-3, "repo": 1e-3}  # ties go to the smaller rate


def test_continued_arms_start_from_the_rope_run(tmp_path, small):
    state = str(tmp_path / "rope.pt")
    syn.run(["induction"], "rope", 0, "smoke", steps=2, save=state)
    for arm in ("rope_then_repo", "rope_then_nope", "rope_then_r1n2"):
        r = syn.run(["induction"], arm, 0, "smoke", steps=2, init=state)
        assert r["init"] and r["modes"] == syn.GPTConfig(n_layer=3, **syn.ARMS[syn.CONTINUED[arm]]).layer_modes()
    with pytest.raises(ValueError):
        syn.run(["induction"], "rope_then_repo", 0, "smoke", steps=2)


def test_protocol_claims_compare_the_continued_arms_seed_by_seed():
    """Hand-made runs: continued RePo beats continued RoPE at 4L +YaRN in 8 of 8 seeds (p = 2/256) and
    ties its layout control R1N2 (no difference: not supported)."""
    def run(arm, seed, acc4):
        final = [dict(task="multikey", length=m * 32, noise=True, yarn=m > 1, accuracy=a)
                 for m, a in ((1, 0.95), (4, acc4))]
        return dict(arm=arm, seed=seed, tasks=["multikey"], final=final, curve=[], steps_to_90={"multikey": None},
                    analysis={"multikey": {}})
    runs = [run(arm, s, {"rope_then_rope": 0.3, "rope_then_r1n2": 0.5, "rope_then_repo": 0.5}[arm] + 0.01 * s)
            for s in range(8) for arm in ("rope_then_rope", "rope_then_r1n2", "rope_then_repo")]
    found = {(claim, test): c for claim, test, c in report.claims(report.summarise(runs), 32)}
    vs_rope = found[("C3 continued RePo degrades less at 4L +YaRN", "multikey at 4L with noise +YaRN: rope_then_repo − rope_then_rope")]
    assert (vs_rope["wins"], vs_rope["verdict"]) == (8, "supported") and vs_rope["p"] == pytest.approx(2 / 256)
    vs_layout = found[("… from learned positions (continued)", "multikey at 4L with noise +YaRN: rope_then_repo − rope_then_r1n2")]
    assert (vs_layout["wins"], vs_layout["losses"], vs_layout["verdict"]) == (0, 0, "not supported")
    assert found[("C1 continued RePo > continued RoPE at L", "multikey at L with noise: rope_then_repo − rope_then_rope")]["n"] == 8


def test_poly_hash_on_the_device_matches_numpy():
    g = np.random.default_rng(0)
    content = torch.as_tensor(g.integers(24, 56, (50, 22)))
    live = torch.as_tensor(np.arange(22)[None] < g.integers(6, 23, (50, 1)))
    got = syn.poly_hash_torch(content, live).tolist()
    assert got == [syn.poly_hash(c[m].numpy()) for c, m in zip(content, live)]


@pytest.mark.parametrize("task", ["induction", "multikey"])
def test_device_batches_answers_by_search_and_split(task):
    import gpu_data
    g = torch.Generator().manual_seed(0)
    x, y, content, live = gpu_data.GENERATORS[task](300, 64, torch.rand(300, generator=g) < 0.5, g, "cpu")
    splits = [syn.split_of(c[m].numpy(), "poly") for c, m in zip(content, live)]
    assert (gpu_data.content_split(content, live) == torch.tensor([s == "train" for s in splits])).all()
    offsets = set()
    for xb, yb in zip(x.tolist(), y.tolist()):
        targets = [t for t, v in enumerate(yb) if v != -1]
        assert targets
        for t in targets:
            answer, source = lookup(xb, t, task)
            assert yb[t] == answer
            offsets.add(t - source)
        if task == "multikey":  # near misses of the asked key: some needle shares exactly one of its tokens
            a, b = xb[-2], xb[-1]
            assert any((xb[j] == a) != (xb[j + 1] == b) and xb[j + 2] in syn.VALUES for j in range(len(xb) - 5))
    assert len(offsets) >= 10
    xb, yb = gpu_data.batch(task, 64, 64, g, "cpu")
    assert xb.shape == (64, 64) and (yb != -1).any(1).all()


def test_run_at_the_gpu_scale_on_the_cpu(monkeypatch):
    """The GPU preset end to end at tiny size: batches from the device generator, poly split, timings."""
    tiny = dict(syn.SCALES["gpu"], n_layer=3, n_embd=32, mlp=32, n_head=2, L=32, batch=8, steps=3, eval_every=3,
                n_eval=8, n_final=8)
    monkeypatch.setitem(syn.SCALES, "gpu", tiny)
    r = syn.run(["induction", "multikey"], "repo", 0, "gpu")
    assert set(r["times"]) == {"data", "step", "eval", "final"} and r["times"]["data"] > 0
    assert {f["variant"] for f in r["final"]} == {"", "z=0", "z=index"}


def test_gpu_command_reports_where_the_time_went(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import json
    import repro
    for i, t in enumerate(([1.0, 6.0, 2.0, 1.0], [3.0, 2.0, 0.5, 0.5])):
        (tmp_path / f"r{i}.json").write_text(json.dumps(dict(times=dict(zip(("data", "step", "eval", "final"), t)),
                                                              process_s=sum(t) + 4.0)))
    text = repro.time_report(str(tmp_path), 30.0, 2)
    assert "2 runs" in text and "data        4.0 s (25%)" in text and "step        8.0 s (50%)" in text
    assert "start-up and the rest of each process: 8.0 s" in text
