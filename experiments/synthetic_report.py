"""
Tables and plots of the synthetic study (experiments/synthetic.py runs, one JSON file each):
experiments/repro.py synthetic and sweep call these; nothing here trains.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.files import atomic_open  # noqa: E402

ARM_ORDER = ["rope", "nope", "r2n1", "n2r1", "repo", "repo0"]


def mean_std(xs):
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0)


def fmt(xs, scale=100, digits=0):
    m, s = mean_std(xs)
    return "n/a" if m != m else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def final(r, length, noise, yarn=False):
    return next((f["accuracy"] for f in r["final"] if f["length"] == length and f["noise"] == noise
                 and f["yarn"] == yarn), None)


def summarise(results, order=ARM_ORDER):
    """Runs (each trained on a mix of tasks) -> {task: {arm: [one view per seed: that task's curve,
    final accuracies, steps to 90% and analysis]}}, the arms in the given order."""
    out = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        for t in r["tasks"]:
            view = dict(r, task=t, final=[f for f in r["final"] if f["task"] == t],
                        curve=[dict(step=c["step"], **c["accuracy"][t]) for c in r["curve"]],
                        steps_to_90=r["steps_to_90"][t], analysis=r["analysis"][t])
            out.setdefault(t, {}).setdefault(r["arm"], []).append(view)
    return {t: {a: out[t][a] for a in order if a in out[t]} for t in out}


def steps_to_90(runs):
    reached = [r["steps_to_90"] for r in runs if r["steps_to_90"] is not None]
    if not reached:
        return f"never (0/{len(runs)})"
    m, s = mean_std(reached)
    return f"{m:.0f} ± {s:.0f} ({len(reached)}/{len(runs)})"


def repo_layers(r):
    return [i for i, m in enumerate(r["modes"]) if m == "repo"]


def table_md(task, arms, L, steps):
    n_seeds = max(len(v) for v in arms.values())
    md = [f"#### {task} (training length L = {L}, {steps} steps, {n_seeds} seeds; accuracy on the answer tokens, %, "
          "mean ± std over seeds)", "",
          "| arm | steps to 90% at L (seeds reaching it) | L quiet | L noise | 2L quiet | 2L noise | 2L noise +YaRN "
          "| 4L quiet | 4L noise | 4L noise +YaRN | attention on the source at L |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    columns = [(1, False, False), (1, True, False), (2, False, False), (2, True, False), (2, True, True),
               (4, False, False), (4, True, False), (4, True, True)]  # (length / L, noise, YaRN), as in the header
    for a, runs in arms.items():
        cells = [fmt([final(r, m * L, nz, yarn) for r in runs]) for m, nz, yarn in columns]
        mass = fmt([max(r["analysis"]["attention_on_source"]) for r in runs], 1, 2)
        md.append(f"| {a} | {steps_to_90(runs)} | " + " | ".join(cells) + f" | {mass} |")
    repo = {a: runs for a, runs in arms.items() if repo_layers(runs[0])}
    if repo:
        md += ["", "RePo positions (mean over RePo layers, heads and examples with noise): range max z − min z at "
               "L / 2L / 4L tokens; key–value gap |z_key − z_value| / range (RoPE: 1/(L−1) = "
               f"{1 / (L - 1):.3f}); filler offset |mean z filler − mean z content| / range (RoPE ≈ 0)", "",
               "| arm | range at L | 2L | 4L | key–value gap / range | filler offset / range |", "|---|---|---|---|---|---|"]
        for a, runs in repo.items():
            layers = repo_layers(runs[0])
            avg = lambda xs: sum(xs[i] for i in layers) / len(layers)
            rng = [fmt([avg(r["analysis"]["range"][str(m * L)]) for r in runs], 1, 2) for m in (1, 2, 4)]
            md.append(f"| {a} | " + " | ".join(rng) + f" | {fmt([avg(r['analysis']['kv_gap']) for r in runs], 1, 3)} | "
                      f"{fmt([avg(r['analysis']['filler_offset']) for r in runs], 1, 3)} |")
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
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for a, runs in arms.items():
            steps = [c["step"] for c in runs[0]["curve"]]
            for ax, key in zip(axes, ("quiet", "noise")):
                ys = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
                ax.plot(steps, [100 * y for y in ys], label=a)
        for ax, key in zip(axes, ("without noise", "with noise")):
            ax.set(title=f"{task}: accuracy at L, {key} (mean over seeds)", xlabel="step", ylabel="%", ylim=(0, 101))
            ax.axhline(90, color="grey", lw=0.5)
        axes[0].legend()
        files.append(_save(fig, folder, f"{prefix}_{task}_curves.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        L = next(iter(arms.values()))[0]["L"]
        for i, (a, runs) in enumerate(arms.items()):
            for yarn, style in ((False, "-"), (True, "--")):
                lengths = [m * L for m in (1, 2, 4)]
                ys = [mean_std([final(r, n, True, yarn and n > L) for r in runs])[0] for n in lengths]
                if yarn and all(y != y for y in ys[1:]):
                    continue
                ax.plot(lengths, [100 * y for y in ys], style, color=f"C{i}", marker="o", label=a + (" +YaRN" if yarn else ""))
        ax.set(title=f"{task}: accuracy with noise against length", xlabel="tokens", ylabel="%", xscale="log", ylim=(0, 101))
        ax.legend(fontsize=7)
        files.append(_save(fig, folder, f"{prefix}_{task}_length.png"))
        repo = [(a, runs[0]) for a, runs in arms.items() if repo_layers(runs[0])]
        if repo:
            rows = sum(len(repo_layers(r)) for _, r in repo)
            fig, axes = plt.subplots(rows, 1, figsize=(9, 2.2 * rows), squeeze=False)
            k = 0
            for a, r in repo:
                ex = r["analysis"]["example"]
                colours = [("lightgrey", "tab:blue", "tab:red", "black")[x] for x in ex["roles"]]
                for layer in repo_layers(r):
                    ax = axes[k, 0]
                    for h, z in enumerate(ex["positions"][layer]):
                        ax.scatter(range(len(z)), z, c=colours, s=8, marker="os^v<>"[h % 6])
                    ax.set(title=f"{task}, {a} seed 0, layer {layer}: positions z per token (marker = head; "
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
