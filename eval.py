"""
Evaluate checkpoints on the paper's four dimensions and analyse their learned positions.

    python eval.py --ckpt=out                                   # the default training run; minutes on CPU
    python eval.py --ckpt=out --ckpt=out-rope --tasks=niah_multikey,table_cell \
                   --lengths=256,512,1024 --n=50 --out=eval_out  # README's RePo run and its RoPE baseline
    python eval.py --help                                       # every option and its default

--ckpt is a train.py out_dir (its hf/ export is used) or any Hugging Face OLMo-2/RePo directory;
repeat it to compare models side by side. Dimensions (paper, Sec. 4):
    noisy       RULER-style retrieval among distractors (data/tasks.py), at the training length
    structured  table and graph questions, at the training length
    long        the same tasks at the other --lengths (default 2x and 4x the training length),
                with and without YaRN frequency scaling applied to every layer (RePo layers
                included, as the authors' evaluation did)
    general     held-out loss and bits per byte on the validation split of the training data
                (the out_dir's dataset, or --val_data=<data folder>)
Tasks are scored by greedy generation with the KV cache. Each record reports the mean, the
number of examples and a 95% interval. The position analysis (paper, Sec. 5) reports the range
max z - min z of learned positions against context length, the share of constant / monotone /
mixed chunks, and the attention mass on needles versus recent tokens. Output: <out>/eval.json,
<out>/eval.md (the markdown table, also printed) and PNG plots (if matplotlib is installed).
Every option and every checkpoint is checked before the first model is evaluated; bad input is
one `error:` line and exit code 2.
"""
import json
import math
import os
import time

import numpy as np
import torch

import cli
from infra.files import atomic_open, atomic_write, make_dirs
from data.tasks import TASKS, generate, score
from data.tokens import TokenDataset
from model import GPT, GPTConfig, scaled_rope, yarn  # noqa: F401 - eval.yarn, eval.scaled_rope
from infra.model_dir import EvalError, check_device, check_length_fits, inspect_ckpt  # noqa: F401 - sample's too
from infra.progress import eta
from rope_kernel import apply_rope

OPTIONS = {  # option: (default, what it is); python eval.py --help prints them
    "ckpt": ([], "a train.py out_dir or an HF checkpoint dir; repeat it to compare models"),
    "tasks": ("all", "comma-separated task names, or all: " + ", ".join(TASKS)),
    "lengths": ("", "comma-separated context lengths; default L,2L,4L (L = the model's training length)"),
    "n": (8, "examples per task and length"),
    "out": ("eval_out", "output folder: eval.json, eval.md and the plots"),
    "yarn": ("both", "both, on or off: YaRN frequency scaling for lengths beyond the training length"),
    "device": ("cpu", "cpu, cuda or cuda:N"),
    "seed": (0, "seed of the task generators"),
    "val_data": ("", "data folder for the held-out loss; default the out_dir's dataset; none skips it"),
    "val_tokens": (16384, "validation tokens scored for the held-out loss"),
    "positions": (True, "the position analysis (range, chunk shapes, attention on needles)"),
    "chunk": (16, "chunk length for the constant / monotone / mixed analysis"),
    "chunk_tol": (0.25, "spread (radians at RoPE's fastest frequency) up to which a chunk is constant"),
    "plot": (True, "PNG plots (needs matplotlib)"),
    "plot_layers": ("", "layers of the position plot; default the first, middle and last RePo layer"),
    "plot_heads": ("", "heads of the position plot; default the first four"),
}
DEFAULTS = {k: v[0] for k, v in OPTIONS.items()}


def usage(doc=__doc__, options=OPTIONS) -> str:
    return cli.usage(doc, options)


# ----- loading ---------------------------------------------------------------------------------

def load(path, device):
    """(model, tokenizer, validation data folder or None) for a train.py out_dir or an HF dir."""
    info = inspect_ckpt(path)
    return GPT.from_pretrained(info["hf_dir"]).to(device).eval(), info["enc"], info["val"]



# ----- scoring -----------------------------------------------------------------------------------

def ci95(scores):
    """95% interval of a mean: Wilson's for 0/1 scores, normal approximation otherwise."""
    s, n = np.asarray(scores, dtype=float), len(scores)
    m = s.mean()
    if set(np.unique(s)) <= {0.0, 1.0}:
        z = 1.96
        centre, half = (m + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return [max(0.0, centre - half), min(1.0, centre + half)]
    half = 1.96 * s.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return [max(0.0, m - half), min(1.0, m + half)]


@torch.no_grad()
def run_task(model, enc, task, length, n, seed, device):
    scores = []
    for ex in generate(task, enc, length, n, seed=seed, split="eval"):
        idx = torch.tensor([enc.encode_ordinary(ex.prompt)], device=device)
        out = model.generate(idx, ex.max_new_tokens, top_k=1)[0, idx.shape[1]:].tolist()
        if enc.eot_token in out:
            out = out[:out.index(enc.eot_token)]
        # ids past the tokenizer (vocabulary padding, never trained) decode to nothing
        scores.append(score(ex, enc.decode([t for t in out if t < enc.n_vocab])))
    return scores


@torch.no_grad()
def heldout(model, enc, folder, n_tokens, device):
    """Next-token loss (nats per token) and bits per byte on the validation split of `folder`, over
    evenly spaced windows of the training length (train.py's val windows). Special tokens
    (<|endoftext|>) are neither scored nor counted as bytes."""
    data = TokenDataset(folder, "val", model.config.block_size, seed=0)
    if (data.tokenizer, data.n_vocab) != (enc.name, enc.n_vocab):
        raise ValueError(f"{folder} was tokenized with {data.tokenizer} but the model uses {enc.name}")
    special = torch.tensor(sorted(enc.encode_single_token(t) for t in enc.special_tokens_set), dtype=torch.long)
    windows = data.eval_windows(max(1, n_tokens // model.config.block_size))
    nll, count, nbytes = 0.0, 0, 0
    for i in range(0, len(windows), 8):
        x, y = data.windows_batch(windows[i:i + 8], device)
        logits, _ = model(x)
        keep = ~torch.isin(y, special.to(device))
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nll += losses[keep.flatten()].sum().item()
        count += int(keep.sum())
        nbytes += sum(len(enc.decode_bytes(row[k].tolist())) for row, k in zip(y.cpu(), keep.cpu()))
    return nll / count, nll / math.log(2) / nbytes, count


# ----- position analysis --------------------------------------------------------------------------

def position_ranges(positions):
    """positions [..., T] -> max - min over tokens (the paper's d_{k,h})."""
    return positions.max(-1).values - positions.min(-1).values


def classify_chunks(z, chunk=16, tol=0.25):
    """Split one head's positions z [T] into chunks of `chunk` tokens and count them as
    'constant' (spread max - min <= tol: within tol radians at RoPE's fastest frequency, i.e. NoPE-like),
    'monotone' (not constant, every step in one direction up to tol / chunk: RoPE-like) or 'mixed'."""
    counts = {"constant": 0, "monotone": 0, "mixed": 0}
    step_tol = tol / chunk
    for s in range(0, len(z) - chunk + 1, chunk):
        c = z[s:s + chunk]
        d = c[1:] - c[:-1]
        if c.max() - c.min() <= tol:
            counts["constant"] += 1
        elif bool((d >= -step_tol).all()) or bool((d <= step_tol).all()):
            counts["monotone"] += 1
        else:
            counts["mixed"] += 1
    return counts


@torch.no_grad()
def attention_probs(model, idx, last=False):
    """Every token's attention over its context, per layer: [n_layer, B, n_head, T, T] (rows: queries),
    or with last=True only the last token's row: [n_layer, B, n_head, 1, T] (no T x T matrix, for long
    contexts). The fused attention never materialises them, so they are recomputed from each layer's input."""
    inputs, hooks = {}, []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])))
    try:
        model._trunk(idx, None)
    finally:
        for h in hooks:
            h.remove()
    out, inv, T = [], model.inv_freq.to(idx.device), idx.shape[1]
    future = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        q, k, _, pos = attn.project(inputs[i])
        if pos is not None:
            q, k = apply_rope(q, attn._per_query_head(pos), inv), apply_rope(k, pos, inv)
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        scale = model.sm_scale or 1 / math.sqrt(attn.head_dim)
        scores = (q[:, :, -1:] if last else q).float() @ k.float().transpose(-1, -2) * scale
        out.append((scores if last else scores.masked_fill(future, float("-inf"))).softmax(-1))
    return torch.stack(out)


def last_query_attention(model, idx):
    """Attention probabilities of the last token over the whole context, per layer: [n_layer, n_head, T]."""
    return attention_probs(model, idx[:1], last=True)[:, 0, :, 0]


def token_spans(enc, prompt, char_spans):
    """Token indices of the prompt whose text starts inside any of the character spans."""
    _, offsets = enc.decode_with_offsets(enc.encode_ordinary(prompt))
    return [j for j, o in enumerate(offsets) if any(a <= o < b for a, b in char_spans)]


@torch.no_grad()
def analyse_positions(model, enc, lengths, n, seed, chunk, tol, device):
    modes = model.config.layer_modes()
    repo = [i for i, m in enumerate(modes) if m == "repo"]
    out = {"layer_modes": modes, "range": {}, "chunks": None, "attention_mass": None}
    for length in lengths:  # range of learned positions against context length
        rngs = []
        for ex in generate("niah_single", enc, length, n, seed=seed, split="eval"):
            idx = torch.tensor([enc.encode_ordinary(ex.prompt)], device=device)
            _, pos = model._trunk(idx, None, want_positions=True)
            rngs.append(position_ranges(pos[:, 0]).cpu())  # [n_layer, n_head]
        r = torch.stack(rngs)
        out["range"][length] = {"tokens": int(idx.shape[1]),
                                "repo_mean": float(r[:, repo].mean()) if repo else None,
                                "repo_max": float(r[:, repo].max()) if repo else None,
                                "per_layer_mean": [float(x) for x in r.mean((0, 2))]}
    counts = {"constant": 0, "monotone": 0, "mixed": 0}
    mass = torch.zeros(2, len(modes))
    L = lengths[0]
    examples = generate("niah_single", enc, L, n, seed=seed, split="eval") + \
        generate("niah_multikey", enc, L, n, seed=seed, split="eval")
    for ex in examples:
        idx = torch.tensor([enc.encode_ordinary(ex.prompt)], device=device)
        _, pos = model._trunk(idx, None, want_positions=True)
        for layer in repo:
            for z in pos[layer, 0]:
                for k, v in classify_chunks(z.cpu(), chunk, tol).items():
                    counts[k] += v
        needle = token_spans(enc, ex.prompt, ex.needles)
        probs = last_query_attention(model, idx)  # [n_layer, n_head, T]
        mass[0] += probs[:, :, needle].sum(-1).mean(-1).cpu()
        mass[1] += probs[:, :, -len(needle):].sum(-1).mean(-1).cpu()  # an equally long window of recent tokens
    total = sum(counts.values())
    if total:
        out["chunks"] = {"chunk": chunk, "tol": tol, "n": total, **{k: v / total for k, v in counts.items()}}
    out["attention_mass"] = {"length": L, "n": len(examples), "needle": (mass[0] / len(examples)).tolist(),
                             "recent": (mass[1] / len(examples)).tolist()}
    # one prompt with visible structure (a table) for the position plot; short enough to keep eval.json small
    ex = generate("table_row", enc, min(L, 512), 1, seed=seed, split="eval")[0]
    idx = torch.tensor([enc.encode_ordinary(ex.prompt)], device=device)
    out["example"] = {"task": "table_row", "positions": model._trunk(idx, None, want_positions=True)[1][:, 0].cpu().tolist()}
    return out


# ----- main ----------------------------------------------------------------------------------------

def _ints(text) -> list:
    """'256,512' -> [256, 512]; '' -> []; anything else raises ValueError."""
    return [int(x) for x in text.split(",")] if text.strip() else []


def parse(argv) -> dict:
    """Options -> args, every value checked for what can be checked without the checkpoints."""
    args = {**DEFAULTS, **cli.parse(argv, DEFAULTS, error=EvalError)}  # a list default collects repeats
    if not args["ckpt"]:
        raise EvalError("give at least one --ckpt=<train.py out_dir or HF checkpoint dir>")
    if not args["out"]:
        raise EvalError("--out must name a folder")
    seen = {}  # the same folder however it is spelled (base1, base1/, ./base1, a symlink to it)
    for path in args["ckpt"]:
        real = os.path.realpath(os.path.expanduser(path))
        if real in seen:
            raise EvalError(f"--ckpt lists a checkpoint twice: {seen[real]} and {path} are both {real}")
        seen[real] = path
    tasks = list(TASKS) if args["tasks"] == "all" else [t.strip() for t in args["tasks"].split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EvalError(f"unknown task(s) {bad}; tasks: {', '.join(TASKS)} (or all)" if bad else
                        f"--tasks={args['tasks']!r} names no task; tasks: {', '.join(TASKS)} (or all)")
    args["tasks"] = tasks
    for key in ("lengths", "plot_layers", "plot_heads"):
        try:
            values = _ints(args[key])
        except ValueError:
            values = [-1]
        if min(values, default=1) < (1 if key == "lengths" else 0):
            raise EvalError(f"--{key} must be {'positive' if key == 'lengths' else 'non-negative'} integers separated "
                            f"by commas, got {args[key]!r}")
    for key, low in (("n", 1), ("val_tokens", 1), ("chunk", 2), ("chunk_tol", 0)):
        if args[key] < low:
            raise EvalError(f"--{key} must be at least {low}, got {args[key]}")
    if args["yarn"] not in ("both", "on", "off"):
        raise EvalError(f"--yarn must be both, on or off (YaRN for lengths beyond the training length), got {args['yarn']!r}")
    check_device(args["device"])
    return args


def _renders(task, enc, length, seed):
    """None if `task` can be rendered in `length` tokens with `enc`, else why not."""
    try:
        generate(task, enc, length, 1, seed=seed, split="eval")
        return None
    except ValueError as e:
        return str(e)


def check(args) -> dict:
    """Everything that can fail before the first model is evaluated, for every --ckpt (so that a bad
    second checkpoint does not cost the first one's evaluation): {ckpt: inspect_ckpt(...) + lengths}."""
    device = torch.device(args["device"])
    infos = {}
    for path in args["ckpt"]:
        info = inspect_ckpt(path, args["val_data"])
        kw, enc = info["config"], info["enc"]
        L = kw["block_size"]
        lengths = _ints(args["lengths"]) or [L, 2 * L, 4 * L]
        with torch.device("meta"):  # shapes only: no memory, no weights read
            model = GPT(GPTConfig(**kw))
        for length in lengths:
            check_length_fits(model, length, device)
        needed = [(t, length, "") for t in args["tasks"] for length in lengths]
        if args["positions"]:  # what analyse_positions renders, whichever tasks were asked for
            why = " (the position analysis uses it; --positions=false turns it off)"
            needed += [("niah_single", length, why) for length in lengths] + \
                [("niah_multikey", lengths[0], why), ("table_row", min(lengths[0], 512), why)]
        for task, length, why in needed:
            problem = _renders(task, enc, length, args["seed"])
            if problem:
                raise EvalError(f"{path}: task {task}{why} cannot be rendered in {length} tokens with tokenizer "
                                f"{enc.name} ({problem}); give longer --lengths or leave {task} out of --tasks")
        for key, n, what in (("plot_layers", kw["n_layer"], "layers"), ("plot_heads", kw["n_head"], "heads")):
            bad = [i for i in _ints(args[key]) if i >= n]
            if bad and args["plot"] and args["positions"]:
                raise EvalError(f"--{key}={args[key]}: {path} has {what} 0..{n - 1} only")
        infos[path] = dict(info, lengths=lengths)
    make_dirs(args["out"])  # last: a refused evaluation leaves nothing behind
    if not os.access(args["out"], os.W_OK):
        raise EvalError(f"--out={args['out']} is not writable")
    return infos


def evaluate(args, infos=None):
    infos = infos or check(args)
    device = torch.device(args["device"])
    results, positions, notes, t0 = [], {}, [], time.time()
    total = sum(len(args["tasks"]) * len(yarn_settings(length, info["config"]["block_size"], args["yarn"]))
                for info in infos.values() for length in info["lengths"])  # (task, length, YaRN) evaluations
    for path, info in infos.items():
        model = GPT.from_pretrained(info["hf_dir"]).to(device).eval()
        enc, val, lengths = info["enc"], info["val"], info["lengths"]
        L = model.config.block_size
        print(f"[{path}] {model.config.layer_modes().count('repo')} RePo layers, training length {L}, "
              f"tokenizer {enc.name}, lengths {lengths}", flush=True)
        for length in lengths:
            for use_yarn in yarn_settings(length, L, args["yarn"]):
                with scaled_rope(model, length / L if use_yarn else 1):
                    for task in args["tasks"]:
                        s = run_task(model, enc, task, length, args["n"], args["seed"], device)
                        dim = TASKS[task][0] if length <= L else "long"
                        results.append(dict(ckpt=path, task=task, dimension=dim, length=length,
                                            metric=TASKS_METRIC[task], value=float(np.mean(s)), n=len(s),
                                            ci95=ci95(s), yarn=use_yarn))
                        done = sum(r["task"] != "heldout" for r in results)
                        print(f"  {task:20s} len {length:6d}{' yarn' if use_yarn else '     '} "
                              f"{100 * np.mean(s):5.1f}  ({done}/{total} done, {time.time() - t0:.0f}s, "
                              f"{eta(time.time() - t0, done, total)} left)", flush=True)
        if val:
            loss, bpb, n = heldout(model, enc, val, args["val_tokens"], device)
            results += [dict(ckpt=path, task="heldout", dimension="general", length=L, metric=m, value=v, n=n,
                             ci95=None, yarn=False) for m, v in (("loss", loss), ("bpb", bpb))]
            print(f"  held-out loss {loss:.4f} nats, {bpb:.4f} bits/byte over {n} tokens", flush=True)
        else:
            notes.append(f"{path}: held-out loss (general) {info['val_note']}")
            print(f"  note: held-out loss {info['val_note']}", flush=True)
        if args["positions"]:
            positions[path] = analyse_positions(model, enc, lengths, max(2, args["n"] // 2), args["seed"],
                                                args["chunk"], args["chunk_tol"], device)
    results += dimension_averages(results)
    return results, positions, notes


def yarn_settings(length, L, yarn) -> list:
    """Whether each evaluation at `length` uses YaRN: only beyond the training length L."""
    return [False] if length <= L or yarn == "off" else [True] if yarn == "on" else [False, True]


TASKS_METRIC = {t: ("recall" if dim == "noisy" else "exact_match") for t, (dim, *_) in TASKS.items()}


def dimension_averages(results):
    """Mean over tasks per (checkpoint, dimension, length, yarn), with the interval of that mean."""
    groups = {}
    for r in results:
        if r["dimension"] != "general":
            groups.setdefault((r["ckpt"], r["dimension"], r["length"], r["yarn"]), []).append(r)
    out = []
    for (ckpt, dim, length, y), rs in groups.items():
        m = float(np.mean([r["value"] for r in rs]))
        # the mean of independent task means: its offsets below and above combine the tasks' offsets
        # in quadrature, each side on its own (Wilson's intervals are asymmetric: [0, 66] around 0)
        below = math.sqrt(sum((r["value"] - r["ci95"][0]) ** 2 for r in rs)) / len(rs)
        above = math.sqrt(sum((r["ci95"][1] - r["value"]) ** 2 for r in rs)) / len(rs)
        out.append(dict(ckpt=ckpt, task="average", dimension=dim, length=length, metric="mean", value=m,
                        n=sum(r["n"] for r in rs), ci95=[max(0.0, m - below), min(1.0, m + above)], yarn=y))
    return out


def markdown(results, ckpts):
    rows = {}
    for r in results:
        key = (r["dimension"], r["task"], r["length"], r["yarn"], r["metric"])
        rows.setdefault(key, {})[r["ckpt"]] = r
    order = {"noisy": 0, "structured": 1, "long": 2, "general": 3}
    lines = ["| dimension | task | length | " + " | ".join(ckpts) + " |", "|---|---|---|" + "---|" * len(ckpts)]
    for key in sorted(rows, key=lambda k: (order[k[0]], k[2], k[3], k[1] == "average", k[1], k[4])):
        dim, task, length, y, metric = key
        cells = []
        for c in ckpts:
            r = rows[key].get(c)
            if r is None:
                cells.append("")
            elif metric in ("loss", "bpb"):
                cells.append(f"{r['value']:.4f}")
            else:
                cells.append(f"{100 * r['value']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]")
        name = f"**{task}**" if task == "average" else task if metric not in ("loss", "bpb") else f"{task} {metric}"
        lines.append(f"| {dim} | {name} | {length}{' +YaRN' if y else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, positions, out, layers="", heads=""):
    """PNG plots in out/: positions over a table prompt per checkpoint, position range and attention
    masses, accuracy against length. Axes start at 0 (accuracy and attention mass are shares, so a
    1% change looks like one), and RePo layers are shaded. Returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    files = []
    for ckpt, p in positions.items():  # learned positions over a table prompt, like the authors' demo
        z = np.asarray(p["example"]["positions"])  # [n_layer, n_head, T]
        chosen = _ints(layers)
        if not chosen:  # the first, middle and last RePo layer (any layers if there are none)
            cand = [i for i, m in enumerate(p["layer_modes"]) if m == "repo"] or list(range(len(p["layer_modes"])))
            chosen = sorted({cand[0], cand[len(cand) // 2], cand[-1]})
        fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.5), squeeze=False)
        for ax, layer in zip(axes[0], chosen):
            for h in _ints(heads) or range(min(4, z.shape[1])):
                ax.plot(z[layer, h], ".", ms=2, label=f"head {h}")
            ax.set(title=f"layer {layer} ({p['layer_modes'][layer]})", xlabel="token index", ylabel="assigned position")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{ckpt}: positions over a table prompt")
        files.append(_save(fig, out, f"positions_{_slug(ckpt)}.png"))
    if positions:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        repo_layers = sorted({i for p in positions.values() for i, m in enumerate(p["layer_modes"]) if m == "repo"})
        for i in repo_layers:
            ax2.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0, label="RePo layers" if i == repo_layers[0] else None)
        for ckpt, p in positions.items():
            ls = sorted(p["range"], key=int)
            if p["range"][ls[0]]["repo_mean"] is not None:
                ax1.plot([p["range"][l]["tokens"] for l in ls], [p["range"][l]["repo_mean"] for l in ls], "o-", label=ckpt)
            m = p["attention_mass"]
            ax2.plot(m["needle"], "o-", label=f"{ckpt}: needle")
            ax2.plot(m["recent"], "x--", label=f"{ckpt}: recent")
        ax1.set(xlabel="context length (tokens)", ylabel="mean range max z - min z (RePo heads)", title="position range")
        ax2.set(xlabel="layer", ylabel="attention mass of the last token", title="needle vs recent tokens")
        ax1.set_ylim(0, 1.1 * ax1.get_ylim()[1])  # from 0: a 1% change in the range looks like one
        ax2.set_ylim(0, 1)
        ax2.set_xticks(range(max(len(p["layer_modes"]) for p in positions.values())))
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        files.append(_save(fig, out, "positions_range_attention.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt in dict.fromkeys([r["ckpt"] for r in results] + list(positions)):
        for y in (False, True):
            pts = sorted((r["length"], r["value"]) for r in results if r["ckpt"] == ckpt and r["task"] == "average"
                         and r["yarn"] == y and r["dimension"] != "general")
            merged = {}
            for length, v in pts:
                merged.setdefault(length, []).append(v)
            if y and not pts:
                continue
            ax.plot(list(merged), [np.mean(v) for v in merged.values()], "o-" if not y else "s--",
                    label=f"{ckpt}{' +YaRN' if y else ''}")
    ax.set(xlabel="context length (tokens)", ylabel="mean accuracy over tasks", title="accuracy against length")
    ax.set_ylim(0, 1)  # a share: an all-zero run sits on the axis, not in a band around it
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "accuracy_vs_length.png"))
    return files


def _slug(path):
    return "".join(ch if ch.isalnum() else "_" for ch in os.path.normpath(path)).strip("_")


def _save(fig, out, name):
    import matplotlib.pyplot as plt
    path = os.path.join(out, name)
    fig.tight_layout()
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def main(argv):
    """Evaluate, then write eval.json and eval.md before any plot: a failed plot never costs the tables."""
    args = parse(argv)
    torch.manual_seed(args["seed"])
    results, positions, notes = evaluate(args)
    report = {"args": {k: v for k, v in args.items()}, "results": results, "positions": positions}
    atomic_write(os.path.join(args["out"], "eval.json"), json.dumps(report, indent=1))
    table = markdown(results, args["ckpt"]) + "".join(f"\n\nNote: {n}" for n in notes)
    atomic_write(os.path.join(args["out"], "eval.md"), table + "\n")
    print("\n" + table)
    files = []
    if args["plot"]:
        try:
            files = plot(results, positions, args["out"], args["plot_layers"], args["plot_heads"])
        except Exception as e:  # noqa: BLE001 - the tables are written; say why the pictures are not
            print(f"warning: the plots failed ({type(e).__name__}: {e}); eval.json and eval.md are complete")
    print(f"\nwrote {os.path.join(args['out'], 'eval.json')}, {os.path.join(args['out'], 'eval.md')}"
          + "".join(f", {p}" for p in files))
    return report


if __name__ == "__main__":
    cli.run(main, usage(), errors=(EvalError, ValueError, OSError, MemoryError))  # OSError: missing files, failed writes
