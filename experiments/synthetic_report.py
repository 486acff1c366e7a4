"""
Tables, statistics and plots of the synthetic study (experiments/synthetic.py runs, one JSON file
each): experiments/repro.py synthetic and sweep call these; nothing here trains.

Cells show the mean over seeds with the seeds that solved the cell (accuracy >= 90%) beside it:
outcomes are bimodal (a seed escapes a plateau or not), so a standard deviation says little.
Arms are compared seed by seed (the same seed is the same data stream and test set for every arm)
with an exact two-sided sign-flip test on the paired differences.
"""
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from infra.files import atomic_open  # noqa: E402

ARM_ORDER = ["rope", "nope", "r2n1", "n2r1", "r1n2", "repo", "repo z=0", "repo z=index", "repo0", "repo0 z=0",
             "repo0 z=index", "rope_then_rope", "rope_then_nope", "rope_then_r1n2", "rope_then_repo", "rope_then_repo z=0",
             "rope_then_repo z=index"]
SOLVED = 0.9
ALPHA = 0.05
# (length / L, noise, YaRN): the table's columns; YaRN = frequencies and temperature (NoPE layers: temperature)
COLUMNS = [(1, False, False), (1, True, False), (2, True, False), (2, True, True), (4, False, False),
           (4, True, False), (4, True, True)]
# the comparisons every task gets: (a, b, what a - b measures)
PAIRS = [("repo", "rope", "RePo vs RoPE"),
         ("repo", "r1n2", "learned positions (same layout, NoPE instead)"),
         ("r1n2", "rope", "layer layout (NoPE above RoPE instead of RoPE)"),
         ("repo", "repo z=0", "RePo's positions vs z = 0 at inference"),
         ("repo", "repo z=index", "RePo's positions vs z = index at inference"),
         ("repo", "r2n1", "RePo vs R2N1"), ("r2n1", "rope", "R2N1 vs RoPE"),
         ("rope_then_repo", "rope_then_rope", "protocol: continued as RePo vs as RoPE"),
         ("rope_then_repo", "rope_then_nope", "protocol: continued as RePo vs as NoPE"),
         ("rope_then_repo", "rope_then_r1n2", "protocol: learned positions (continued as R1N2 instead)"),
         ("rope_then_r1n2", "rope_then_rope", "protocol: layout (continued as R1N2 vs as RoPE)")]


def mean_std(xs):
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan"))


def fmt(xs, scale=100, digits=0):
    """mean ± std; the mean alone for one value (a spread of one seed is not zero, it is unknown)."""
    m, s = mean_std(xs)
    if m != m:
        return "n/a"
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if s == s else "")


def sign_flip_p(diffs):
    """Exact two-sided p-value of the paired sign-flip (permutation) test of mean(diffs) = 0: the share
    of the 2^n sign assignments whose |sum| is at least the observed |sum|."""
    d = np.asarray([x for x in diffs if x is not None], dtype=float)
    if len(d) == 0:
        return float("nan")
    if len(d) > 20:
        raise ValueError(f"sign_flip_p enumerates 2^n assignments; {len(d)} differences are too many")
    signs = np.array(list(itertools.product((1, -1), repeat=len(d))))
    sums = np.abs(signs @ d)
    return float((sums >= abs(d.sum()) - 1e-9 * max(1.0, np.abs(d).sum())).mean())


def final(r, length, noise, yarn=False, variant=""):
    return next((f["accuracy"] for f in r["final"] if f["length"] == length and f["noise"] == noise
                 and f["yarn"] == yarn and f.get("variant", "") == variant), None)


def summarise(results, order=ARM_ORDER):
    """Runs (each trained on a mix of tasks) -> {task: {arm: [one view per seed: that task's curve,
    final accuracies, steps to 90% and analysis]}}, the arms in the given order (others after them).
    A RePo run's inference variants (z = 0, z = index) become arms of their own ("repo z=0")."""
    out = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        for t in r["tasks"]:
            for v in sorted({f.get("variant", "") for f in r["final"]}):
                view = dict(r, task=t, arm=(r["arm"] + " " + v).strip(),
                            final=[dict(f, variant="") for f in r["final"] if f["task"] == t and f.get("variant", "") == v],
                            curve=[dict(step=c["step"], **c["accuracy"][t]) for c in r["curve"]],
                            steps_to_90=r["steps_to_90"][t], analysis=r["analysis"][t], variant=v)
                out.setdefault(t, {}).setdefault(view["arm"], []).append(view)
    return {t: {a: out[t][a] for a in list(order) + sorted(set(out[t]) - set(order)) if a in out[t]} for t in out}


def steps_to_90(runs):
    """Seeds that reached 90% (quiet and noisy, dev split) and the median step over *all* seeds, a
    seed that never did counting as later than the budget."""
    steps = sorted(r["steps_to_90"] if r["steps_to_90"] is not None else float("inf") for r in runs)
    k, n = sum(s != float("inf") for s in steps), len(steps)
    med = steps[(n - 1) // 2] if n % 2 else (steps[n // 2 - 1] + steps[n // 2]) / 2
    return f"{k}/{n} (median {'never' if med == float('inf') else f'{med:,.0f}'})"


def cell(xs):
    """Mean accuracy in % with the seeds that solved it: '87 (5/8)'."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{100 * sum(xs) / len(xs):.0f} ({sum(x >= SOLVED for x in xs)}/{len(xs)})"


def repo_layers(r):
    return [i for i, m in enumerate(r["modes"]) if m == "repo"]


def column_name(m, nz, yarn):
    return f"{'L' if m == 1 else f'{m}L'} {'noise' if nz else 'quiet'}" + (" +YaRN" if yarn else "")


def table_md(task, arms, L, steps):
    n_seeds = max(len(v) for v in arms.values())
    md = [f"#### {task} (training length L = {L}, {steps} steps, {n_seeds} seeds; test accuracy on the answer "
          "tokens, %, mean over seeds (seeds ≥ 90%))", "",
          "| arm | reached 90% at L (median step) | " + " | ".join(column_name(*c) for c in COLUMNS) +
          " | attention on the source at L |", "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for a, runs in arms.items():
        cells = [cell([final(r, m * L, nz, yarn) for r in runs]) for m, nz, yarn in COLUMNS]
        variant = runs[0].get("variant")  # (its analysis is the trained model's: not shown twice)
        mass = fmt([max(r["analysis"]["attention_on_source"]) for r in runs], 1, 2) if not variant else "—"
        learned = steps_to_90(runs) if not variant else "(inference variant)"
        md.append(f"| {a} | {learned} | " + " | ".join(cells) + f" | {mass} |")
    repo = {a: runs for a, runs in arms.items() if repo_layers(runs[0]) and not runs[0].get("variant")}
    if repo:
        ref = next(iter(repo.values()))[0]["analysis"].get("kv_gap_rope")
        md += ["", "RePo positions (mean over RePo layers, heads and test examples with noise): range max z − min z "
               "at L / 2L / 4L tokens; key–value gap |z_key − z_value| / range over the pairs a lookup reads "
               f"(RoPE's positions z = t give {ref:.3f} on the same pairs); filler offset |mean z filler − mean z "
               "content| / range (RoPE ≈ 0)", "",
               "| arm | range at L | 2L | 4L | key–value gap / range | filler offset / range |", "|---|---|---|---|---|---|"]
        for a, runs in repo.items():
            layers = repo_layers(runs[0])
            avg = lambda xs: sum(xs[i] for i in layers) / len(layers) if xs else None  # noqa: E731
            rng = [fmt([avg(r["analysis"]["range"][str(m * L)]) for r in runs], 1, 2) for m in (1, 2, 4)]
            md.append(f"| {a} | " + " | ".join(rng) + f" | {fmt([avg(r['analysis']['kv_gap']) for r in runs], 1, 3)} | "
                      f"{fmt([avg(r['analysis']['filler_offset']) for r in runs], 1, 3)} |")
    return "\n".join(md)


def paired(arms, a, b, value):
    """Per-seed values of arms a and b on the seeds both have: (seeds, [value(a)], [value(b)])."""
    A, B = {r["seed"]: r for r in arms.get(a, [])}, {r["seed"]: r for r in arms.get(b, [])}
    seeds = sorted(set(A) & set(B))
    return seeds, [value(A[s]) for s in seeds], [value(B[s]) for s in seeds]


def verdict(diffs, learned=True):
    """The sign-flip test of mean(diffs) = 0 and its verdict: 'cannot be tested at this scale' when no
    seed learned the task or the seeds are too few for p < ALPHA at all; 'supported' when the mean is
    > 0 with p < ALPHA; otherwise 'not supported'."""
    diffs = [d for d in diffs if d is not None and d == d]
    out = dict(n=len(diffs), diff=float(np.mean(diffs)) if diffs else float("nan"),
               wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs), p=sign_flip_p(diffs))
    if not diffs or 2 / 2 ** len(diffs) >= ALPHA:
        out["verdict"] = "cannot be tested at this scale" + (f" ({len(diffs)} seeds)" if diffs else " (not run)")
    elif not learned:
        out["verdict"] = "cannot be tested at this scale (no seed learned the task)"
    else:
        out["verdict"] = "supported" if out["diff"] > 0 and out["p"] < ALPHA else "not supported"
    return out


def compare(arms, a, b, value, learned_at=None):
    """verdict() of value(a) - value(b) over the seeds both arms have; learned: some seed of either arm
    has learned_at (default: value) >= SOLVED."""
    _, va, vb = paired(arms, a, b, value)
    _, la, lb = paired(arms, a, b, learned_at or value)
    out = verdict([x - y for x, y in zip(va, vb) if x is not None and y is not None],
                  any(x is not None and x >= SOLVED for x in la + lb))
    return dict(out, a=a, b=b)


def fmt_test(c, scale=100, digits=0):
    if c["n"] == 0:
        return "—"
    return f"{c['diff'] * scale:+.{digits}f} ({c['wins']}–{c['losses']}, p={c['p']:.3f})"


def comparisons_md(task, arms, L):
    """Paired differences a − b per column: mean difference in points (seeds where a won – lost, exact
    sign-flip p)."""
    md = [f"Paired comparisons on {task}: mean of a − b over seeds, points (seeds a > b – a < b, exact "
          "two-sided sign-flip p)", "", "| a − b | what it measures | " +
          " | ".join(column_name(*c) for c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for a, b, what in PAIRS:
        if a in arms and b in arms:
            cells = [fmt_test(compare(arms, a, b, lambda r, c=c: final(r, c[0] * L, c[1], c[2]))) for c in COLUMNS]
            md.append(f"| {a} − {b} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def _learned(L):
    return lambda r: max(final(r, L, False) or 0, final(r, L, True) or 0)


def claims(S, L):
    """Each claim's named test on the study's runs: [(claim, test, comparison result)]."""
    out = []
    acc = lambda m, nz, yarn=False: (lambda r: final(r, m * L, nz, yarn))  # noqa: E731
    content = "multikey" if "multikey" in S else next(iter(S))
    for task in S:
        arms = S[task]
        hard = task == content
        if hard:
            out.append(("C1 RePo > RoPE among distractors at L", f"{task} at L with noise: repo − rope",
                        compare(arms, "repo", "rope", acc(1, True), _learned(L))))
            cost = lambda r: (final(r, L, False) or 0) - (final(r, L, True) or 0)  # noqa: E731
            out.append(("C1 noise costs RePo less than RoPE", f"{task} at L, (quiet − noise) of rope − of repo",
                        compare(arms, "rope", "repo", cost, _learned(L))))
            out.append(("C1 … from learned positions", f"{task} at L with noise: repo − r1n2",
                        compare(arms, "repo", "r1n2", acc(1, True), _learned(L))))
            out.append(("C2 RePo > R2N1", f"{task} at L with noise: repo − r2n1",
                        compare(arms, "repo", "r2n1", acc(1, True), _learned(L))))
            out.append(("C2 R2N1 > RoPE", f"{task} at L with noise: r2n1 − rope",
                        compare(arms, "r2n1", "rope", acc(1, True), _learned(L))))
        for yarn in (True, False):
            y = " +YaRN" if yarn else " (no YaRN)"
            out.append((f"C3 RePo degrades less at 4L{y}", f"{task} at 4L with noise{y}: repo − rope",
                        compare(arms, "repo", "rope", acc(4, True, yarn), _learned(L))))
            out.append((f"C3 … from learned positions{y}", f"{task} at 4L with noise{y}: repo − r1n2",
                        compare(arms, "repo", "r1n2", acc(4, True, yarn), _learned(L))))
            out.append((f"C3 … from the layout{y}", f"{task} at 4L with noise{y}: r1n2 − rope",
                        compare(arms, "r1n2", "rope", acc(4, True, yarn), _learned(L))))
        # the paper's protocol: the same RoPE run continued as RePo, as RoPE and as RePo's layout control
        for length, yarn, what in ((1, False, "C1 continued RePo > continued RoPE at L"),
                                   (4, True, "C3 continued RePo degrades less at 4L +YaRN")):
            if hard or length > 1:
                where = f"{task} at {'4L' if length > 1 else 'L'} with noise{' +YaRN' if yarn else ''}"
                out.append((what, f"{where}: rope_then_repo − rope_then_rope", compare(
                    arms, "rope_then_repo", "rope_then_rope", acc(length, True, yarn), _learned(L))))
                out.append(("… from learned positions (continued)", f"{where}: rope_then_repo − rope_then_r1n2",
                            compare(arms, "rope_then_repo", "rope_then_r1n2", acc(length, True, yarn), _learned(L))))
        out.append(("learned positions carry information", f"{task} at L with noise: repo − repo z=0",
                    compare(arms, "repo", "repo z=0", acc(1, True), _learned(L))))
        att = lambda r: max(r["analysis"]["attention_on_source"])  # noqa: E731
        out.append(("C6 more attention on the source", f"{task}: best head's attention on the answer's source, "
                    "repo − rope", compare(arms, "repo", "rope", att, _learned(L))))
        if "repo" in arms:
            layers = repo_layers(arms["repo"][0])
            avg = lambda xs: float(np.mean([xs[i] for i in layers]))  # noqa: E731
            a = [r["analysis"] for r in arms["repo"]]
            out.append(("C7 range grows with length", f"{task}: RePo's range at 4L − at L",
                        verdict([avg(x["range"][str(4 * L)]) - avg(x["range"][str(L)]) for x in a])))
            out.append(("C8/C9 positions draw a key to its value", f"{task}: RoPE's key–value gap / range − RePo's",
                        verdict([x["kv_gap_rope"] - avg(x["kv_gap"]) for x in a])))
    return out


def claims_md(S, L):
    md = ["#### Claims: each verdict from a named test", "",
          f"Exact two-sided sign-flip test on the per-seed paired differences; supported: a > b with p < {ALPHA}; "
          "cannot be tested: no seed of either arm reached 90% at L on the task, or too few seeds for "
          f"p < {ALPHA}.", "",
          "| claim | test (a − b) | mean a − b | seeds a > b – a < b | p | verdict |", "|---|---|---|---|---|---|"]
    for claim, test, c in claims(S, L):
        if c["n"] == 0:
            continue
        scale, digits = (100, 1) if "range" not in test and "gap" not in test and "attention" not in test else (1, 3)
        md.append(f"| {claim} | {test} | {c['diff'] * scale:+.{digits}f} | {c['wins']}–{c['losses']} | "
                  f"{c['p']:.3f} | {c['verdict']} |")
    return "\n".join(md)


def plots(summary, folder, prefix):
    """Per task: learning curves, accuracy against length, seed 0's RePo positions on one example."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(folder, exist_ok=True)
    files = []
    for task, arms in summary.items():
        trained = {a: runs for a, runs in arms.items() if not runs[0].get("variant")}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for a, runs in trained.items():
            steps = [c["step"] for c in runs[0]["curve"]]
            for ax, key in zip(axes, ("quiet", "noise")):
                ys = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
                ax.plot(steps, [100 * y for y in ys], label=a)
        for ax, key in zip(axes, ("without noise", "with noise")):
            ax.set(title=f"{task}: dev accuracy at L, {key} (mean over seeds)", xlabel="step", ylabel="%", ylim=(0, 101))
            ax.axhline(90, color="grey", lw=0.5)
        axes[0].legend(fontsize=7)
        files.append(_save(fig, folder, f"{prefix}_{task}_curves.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        L = next(iter(arms.values()))[0]["L"]
        for i, (a, runs) in enumerate(arms.items()):
            for yarn, style in ((False, "-"), (True, "--")):
                lengths = [m * L for m in (1, 2, 4)]
                ys = [mean_std([final(r, n, True, yarn and n > L) for r in runs])[0] for n in lengths]
                ax.plot(lengths, [100 * y for y in ys], style, color=f"C{i % 10}", marker="o",
                        label=a + (" +YaRN" if yarn else ""))
        ax.set(title=f"{task}: test accuracy with noise against length", xlabel="tokens", ylabel="%", xscale="log",
               ylim=(0, 101))
        ax.legend(fontsize=6)
        files.append(_save(fig, folder, f"{prefix}_{task}_length.png"))
        repo = [(a, runs[0]) for a, runs in trained.items() if repo_layers(runs[0])]
        if repo:
            rows = sum(len(repo_layers(r)) for _, r in repo)
            fig, axes = plt.subplots(rows, 1, figsize=(9, 2.2 * rows), squeeze=False)
            k = 0
            for a, r in repo:
                ex = r["analysis"]["example"]
                colours = [("lightgrey", "tab:blue", "tab:red", "black", "tab:green")[x] for x in ex["roles"]]
                for layer in repo_layers(r):
                    ax = axes[k, 0]
                    for h, z in enumerate(ex["positions"][layer]):
                        ax.scatter(range(len(z)), z, c=colours, s=8, marker="os^v<>"[h % 6])
                    ax.set(title=f"{task}, {a} seed {r['seed']}, layer {layer}: positions z per token (marker = head; "
                                 "blue key/row/copy, red value/cell/source, black question, grey filler)", xlabel="token index")
                    ax.title.set_fontsize(8)
                    k += 1
            files.append(_save(fig, folder, f"{prefix}_{task}_positions.png"))
    return files


def _save(fig, folder, name):
    path = os.path.join(folder, name)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
