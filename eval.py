"""
Evaluate checkpoints on the paper's four dimensions and analyse their learned positions.

    python eval.py --ckpt=out                                   # the default training run; minutes on CPU
    python eval.py --ckpt=out-repo --ckpt=out-rope --tasks=niah_multikey,table_cell \
                   --lengths=256,512,1024 --n=50 --out=eval_out

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
PNG plots (if matplotlib is installed) and a markdown table on stdout.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch

from data.files import atomic_write
from data.tasks import TASKS, generate, score
from data.tokenizer import DATA_DIR, get_tokenizer, load_tokenizer
from data.tokens import TokenDataset
from model import GPT
from rope_kernel import apply_rope

DEFAULTS = dict(ckpt=[], tasks="all", lengths="", n=8, out="eval_out", yarn="both", device="cpu", seed=0,
                val_data="", val_tokens=16384, chunk=16, chunk_tol=0.25, plot=True, plot_layers="", plot_heads="0,1,2,3")
HELP = {"yarn": "'both', 'on' or 'off' for lengths beyond the training length"}


# ----- loading ---------------------------------------------------------------------------------

def load(path, device):
    """(model, tokenizer, hf_dir, validation token file or None) for a train.py out_dir or an HF dir."""
    hf_dir = path if os.path.exists(os.path.join(path, "config.json")) else os.path.join(path, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"--ckpt={path} holds no model: expected config.json there or in {path}/hf "
                                "(a train.py out_dir writes hf/ at the end of a run)")
    model = GPT.from_pretrained(hf_dir).to(device).eval()
    if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        enc = load_tokenizer(hf_dir)
    elif model.config.vocab_size >= 100278:  # an OLMo-2 checkpoint: the dolma2 tokenizer
        enc = get_tokenizer("olmo2")
    else:
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json and its vocabulary ({model.config.vocab_size}) "
                                "is not OLMo-2's; cannot render tasks for it")
    if enc.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer {enc.name!r} has {enc.n_vocab} tokens but the model only {model.config.vocab_size}")
    val = None  # the validation data: the training run's dataset folder, if we know it
    cfg_path = os.path.join(path, "train_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            dataset = str(json.load(f).get("dataset"))
        folder = dataset if os.path.isdir(dataset) else os.path.join(DATA_DIR, dataset)
        val = folder if os.path.isdir(folder) else None
    return model, enc, val


def check_length_fits(model, length, device):
    """Refuse lengths whose KV cache and activations would not fit in memory."""
    c = model.config
    per_token = 4 * (2 * c.n_layer * c.n_kv_head * c.head_dim + 8 * c.n_embd + 3 * c.intermediate_size + c.n_head * 4)
    need = per_token * length + sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        raise MemoryError(f"length {length} needs about {need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB "
                          f"available on {device}; pass smaller --lengths")


# ----- YaRN --------------------------------------------------------------------------------------

def yarn(config, factor, original_max, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023) frequencies and logit scale for a context `factor` times longer.
    Frequency pairs that turn many times within original_max keep their frequency, slow ones are
    divided by factor, a linear ramp in between; attention logits grow by (0.1 ln s + 1)^2."""
    hd, theta = config.head_dim, config.rope_theta
    dim_of = lambda rotations: hd * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), hd - 1)
    i = torch.arange(hd // 2, dtype=torch.float64)
    inv_freq = theta ** (-2 * i / hd)
    ramp = ((i - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0 keeps the frequency, 1 divides it
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp, (0.1 * math.log(factor) + 1) ** 2 / math.sqrt(hd)


class scaled_rope:
    """Context manager: the model uses YaRN frequencies for `factor` (1 = no change) inside the block."""

    def __init__(self, model, factor):
        self.model, self.factor = model, factor

    def __enter__(self):
        self.saved = (self.model.inv_freq, self.model.sm_scale)
        if self.factor > 1:
            self.model.inv_freq, self.model.sm_scale = yarn(self.model.config, self.factor, self.model.config.block_size)

    def __exit__(self, *exc):
        self.model.inv_freq, self.model.sm_scale = self.saved


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
def last_query_attention(model, idx):
    """Attention probabilities of the last token over the whole context, per layer: [n_layer, n_head, T].
    The fused attention never materialises them, so they are recomputed from each layer's input."""
    inputs, hooks = {}, []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])))
    try:
        model._trunk(idx, None)
    finally:
        for h in hooks:
            h.remove()
    out, inv = [], model.inv_freq.to(idx.device)
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        q, k, _, pos = attn.project(inputs[i])
        if pos is not None:
            q, k = apply_rope(q, attn._per_query_head(pos), inv), apply_rope(k, pos, inv)
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        scale = model.sm_scale or 1 / math.sqrt(attn.head_dim)
        out.append(((q[0, :, -1:].float() @ k[0].float().transpose(-1, -2)) * scale).softmax(-1)[:, 0])
    return torch.stack(out)


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

def parse(argv):
    args = dict(DEFAULTS, ckpt=[])
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            sys.exit(f"arguments look like --key=value, got {a!r}")
        key, val = a[2:].split("=", 1)
        if key not in DEFAULTS:
            sys.exit(f"unknown option --{key}; options: {', '.join('--' + k for k in DEFAULTS)}")
        if key == "ckpt":
            args["ckpt"].append(val)
        elif isinstance(DEFAULTS[key], bool):
            args[key] = val.lower() in ("1", "true", "yes")
        else:
            args[key] = type(DEFAULTS[key])(val)
    if not args["ckpt"]:
        sys.exit("give at least one --ckpt=<train.py out_dir or HF checkpoint dir>")
    tasks = list(TASKS) if args["tasks"] == "all" else [t.strip() for t in args["tasks"].split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        sys.exit(f"unknown task(s) {bad}; tasks: {', '.join(TASKS)}")
    if args["yarn"] not in ("both", "on", "off"):
        sys.exit(f"--yarn must be {HELP['yarn']}")
    args["tasks"] = tasks
    return args


def evaluate(args):
    device = torch.device(args["device"])
    results, positions, t0 = [], {}, time.time()
    for path in args["ckpt"]:
        model, enc, val = load(path, device)
        val = args["val_data"] or val
        L = model.config.block_size
        lengths = [int(x) for x in args["lengths"].split(",")] if args["lengths"] else [L, 2 * L, 4 * L]
        for length in lengths:
            check_length_fits(model, length, device)
        print(f"[{path}] {model.config.layer_modes().count('repo')} RePo layers, training length {L}, "
              f"tokenizer {enc.name}, lengths {lengths}", flush=True)
        for length in lengths:
            settings = [False] if length <= L or args["yarn"] == "off" else [True] if args["yarn"] == "on" else [False, True]
            for use_yarn in settings:
                with scaled_rope(model, length / L if use_yarn else 1):
                    for task in args["tasks"]:
                        s = run_task(model, enc, task, length, args["n"], args["seed"], device)
                        dim = TASKS[task][0] if length <= L else "long"
                        results.append(dict(ckpt=path, task=task, dimension=dim, length=length,
                                            metric=TASKS_METRIC[task], value=float(np.mean(s)), n=len(s),
                                            ci95=ci95(s), yarn=use_yarn))
                        print(f"  {task:20s} len {length:6d}{' yarn' if use_yarn else '     '} "
                              f"{100 * np.mean(s):5.1f}  ({time.time() - t0:.0f}s)", flush=True)
        if val:
            loss, bpb, n = heldout(model, enc, val, args["val_tokens"], device)
            results += [dict(ckpt=path, task="heldout", dimension="general", length=L, metric=m, value=v, n=n,
                             ci95=None, yarn=False) for m, v in (("loss", loss), ("bpb", bpb))]
            print(f"  held-out loss {loss:.4f} nats, {bpb:.4f} bits/byte over {n} tokens", flush=True)
        positions[path] = analyse_positions(model, enc, lengths, max(2, args["n"] // 2), args["seed"],
                                            args["chunk"], args["chunk_tol"], device)
    results += dimension_averages(results)
    return results, positions


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


def plot(results, positions, out, layers="", heads="0,1,2,3"):
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
        if layers:
            chosen = [int(x) for x in layers.split(",") if int(x) < z.shape[0]]
        else:  # the first, middle and last RePo layer (any layers if there are none)
            cand = [i for i, m in enumerate(p["layer_modes"]) if m == "repo"] or list(range(len(p["layer_modes"])))
            chosen = sorted({cand[0], cand[len(cand) // 2], cand[-1]})
        fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.5), squeeze=False)
        for ax, layer in zip(axes[0], chosen):
            for h in [int(x) for x in heads.split(",") if int(x) < z.shape[1]]:
                ax.plot(z[layer, h], ".", ms=2, label=f"head {h}")
            ax.set(title=f"layer {layer} ({p['layer_modes'][layer]})", xlabel="token index", ylabel="assigned position")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{ckpt}: positions over a table prompt")
        files.append(_save(fig, out, f"positions_{_slug(ckpt)}.png"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ckpt, p in positions.items():
        ls = sorted(p["range"], key=int)
        if p["range"][ls[0]]["repo_mean"] is not None:
            ax1.plot([p["range"][l]["tokens"] for l in ls], [p["range"][l]["repo_mean"] for l in ls], "o-", label=ckpt)
        m = p["attention_mass"]
        ax2.plot(m["needle"], "o-", label=f"{ckpt}: needle")
        ax2.plot(m["recent"], "x--", label=f"{ckpt}: recent")
    ax1.set(xlabel="context length (tokens)", ylabel="mean range max z - min z (RePo heads)", title="position range")
    ax2.set(xlabel="layer", ylabel="attention mass of the last token", title="needle vs recent tokens")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    files.append(_save(fig, out, "positions_range_attention.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt in positions:
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
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "accuracy_vs_length.png"))
    return files


def _slug(path):
    return "".join(ch if ch.isalnum() else "_" for ch in os.path.normpath(path)).strip("_")


def _save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def main(argv):
    args = parse(argv)
    torch.manual_seed(args["seed"])
    results, positions = evaluate(args)
    os.makedirs(args["out"], exist_ok=True)
    report = {"args": {k: v for k, v in args.items()}, "results": results, "positions": positions}
    atomic_write(os.path.join(args["out"], "eval.json"), json.dumps(report, indent=1))
    files = plot(results, positions, args["out"], args["plot_layers"], args["plot_heads"]) if args["plot"] else []
    table = markdown(results, args["ckpt"])
    atomic_write(os.path.join(args["out"], "eval.md"), table + "\n")
    print("\n" + table)
    print(f"\nwrote {os.path.join(args['out'], 'eval.json')}" + "".join(f", {p}" for p in files))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
