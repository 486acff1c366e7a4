"""
Synthetic in-context retrieval tasks, and one training run of one arm on a mix of them.

Each task uses part of one small vocabulary (64 tokens), puts the loss on the answer tokens only
(targets -1 elsewhere) and is built so that only a content-based lookup solves it:

    induction   a segment of 6-12 distinct tokens at a random place, repeated later at a random
                distance: predict each token of the repeat after its first. The distance varies, so
                no fixed relative position solves it; a previous-token head plus an induction head does.
    recall      a stream of key-value pairs (2-6 distinct keys, 10 pairs, at random places) in which
                keys recur: every recurring key asks for its value. Each question is one lookup;
                values repeat across keys and keys repeat within the stream, so eliminating values
                already asked for (the shortcut multi-query recall allows) buys nothing.
    table       2-4 rows "name c1 c2 c3" at random places, then two questions "? name column": the
                cell. The row is found by content, the cell by its offset inside the row
                (structured data: the lookup needs positions as well as content).
    distract    (not in the default mix) one question "? a b" over three-token pairs "a b v" whose
                near misses share the question's first or second key token.

Everything around them is filler: with noise, random tokens of a noise vocabulary; without, one
quiet token. Training mixes both at the training length L; evaluation uses fixed sets at L, 2L and
4L, with and without noise (the same number of pairs, rows or segment tokens as the hardest
training case, spread over the longer context). Training and evaluation sequences are disjoint by
construction: a sequence belongs to the evaluation stream when the CRC-32 of its content is 0 mod 8.

One model is trained on the mix of the tasks (equal shares of every batch): trained alone, recall
sat for 3,000 steps on the plateau of "some value of this context" (~20-25%); next to induction, which forms the previous-token/induction circuit within a few hundred steps, recall is
learnt too. A run uses model.GPT and train.py's optimizer, learning-rate schedule and step
(configure_optimizer, get_lr, train_step), measures the accuracy on the answer tokens on the way
and at the end (with YaRN beyond L where the arm rotates), and analyses the positions of the RePo
layers and the attention mass on the answer's source. `experiments/repro.py synthetic` runs the
arms and writes the tables; one run:

    python experiments/synthetic.py --tasks=induction,recall,table --arm=repo --seed=0 --out=/tmp/r.json
"""
import json
import os
import sys
import time
import zlib
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.files import atomic_write  # noqa: E402
from progress import eta  # noqa: E402
from eval import last_query_attention, scaled_rope  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import TrainConfig, configure_optimizer, get_lr, train_step  # noqa: E402

# ----- vocabulary: one for all tasks, each uses a part ------------------------------------------
QUIET, QUERY = 0, 1                  # the filler without noise; the query marker
COLS = range(2, 5)                   # table column names
NOISE = range(8, 24)                 # noise filler (recall, distract, table)
KEYS = range(24, 40)                 # keys, row names; induction segments use KEYS and VALUES
VALUES = range(40, 56)
VOCAB = 64

# each arm differs from the others only in its positions; 3 layers so that R2N1 and N2R1 tile
ARMS = {"rope": dict(pos_mode="rope"), "nope": dict(pos_mode="nope"),
        "r2n1": dict(layer_pattern="rope,rope,nope"), "n2r1": dict(layer_pattern="nope,nope,rope"),
        "repo": dict(pos_mode="repo"),                       # from floor(L/3): the paper's placement
        "repo0": dict(pos_mode="repo", repo_start_layer=0)}  # every layer RePo

SCALES = {
    # 3 layers, d=64, SwiGLU width 64, L=32: ~100 ms a step single-threaded on a 2-core x86 CPU, a
    # run ~7 minutes; 18 runs (6 arms x 3 seeds) two at a time ~65 minutes. lr from the RoPE sweep
    # (`repro.py sweep`, 3,000 steps each); the study runs 4,000 to give slower arms room
    "cpu": dict(n_layer=3, n_head=4, n_embd=64, mlp=64, L=32, batch=32, steps=4000, lr=1e-3, warmup=50,
                eval_every=100, n_eval=128, n_final=256, sweep_steps=3000),
    # the same models with 4x the batch on one GPU (launch-bound: the model is tiny); `repro.py gpu`
    # runs it with one seed next to the text + task mix (estimated, not measured: no GPU was lent)
    "gpu": dict(n_layer=3, n_head=4, n_embd=64, mlp=64, L=32, batch=128, steps=3000, lr=1e-3, warmup=50,
                eval_every=100, n_eval=256, n_final=512, sweep_steps=3000),
    # the CPU model on the induction task alone, one seed: RoPE learns it in ~500 steps, RePo in
    # ~1,300 (at lr 3e-3 RePo did not within 800 steps), and beyond L the arms differ as in the
    # full study; 6 runs of ~1.5 minutes, two at a time
    "smoke": dict(n_layer=3, n_head=4, n_embd=64, mlp=64, L=32, batch=32, steps=2000, lr=1e-3, warmup=50,
                  eval_every=100, n_eval=128, n_final=256, sweep_steps=2000, tasks=["induction"], seeds=1),
}


# ----- the tasks --------------------------------------------------------------------------------

def _place(rng, length, sizes):
    """Random non-overlapping start offsets, in order, for blocks of the given sizes in [0, length)."""
    free = length - sum(sizes)
    if free < 0:
        raise ValueError(f"blocks of {sum(sizes)} tokens do not fit into {length}")
    gaps = np.sort(rng.integers(0, free + 1, len(sizes)))  # filler before each block
    return [int(g + sum(sizes[:i])) for i, g in enumerate(gaps)]


def _filler(rng, length, noise, pool):
    return rng.choice(pool, length) if noise else np.full(length, QUIET)


def induction(rng, length, noise, size=None):
    m = size or int(rng.integers(6, 13))
    content = np.array(list(KEYS) + list(VALUES))
    seg = rng.choice(content, m, replace=False)
    x = _filler(rng, length, noise, NOISE)
    first, second = _place(rng, length, [m, m])
    x[first:first + m], x[second:second + m] = seg, seg
    y = np.full(length, -1)
    y[second:second + m - 1] = seg[1:]   # position t predicts token t + 1
    roles = np.zeros(length, int)        # 0 filler, 1 key/row name/the copy, 2 value/cell/its source, 3 question
    roles[first:first + m], roles[second:second + m] = 2, 1
    return x, y, dict(query=second, source=[first + 1], roles=roles)


def recall(rng, length, noise, size=None):
    n = size or int(rng.integers(2, 7))          # distinct keys, each with one value
    # keys and values from one pool: "some value of this context" is then no better a guess than
    # any context token (with a value vocabulary of its own, that guess is a plateau training sticks on)
    # (but never a key of this context: the token after a key's last occurrence is then its value)
    pool = np.array(list(KEYS) + list(VALUES))
    keys = rng.choice(pool, n, replace=False)
    values = rng.choice(np.setdiff1d(pool, keys), n)
    p = min(10, length // 3)                     # pairs in the stream; every key at least once
    which = np.concatenate([rng.permutation(n), rng.integers(0, n, max(p - n, 0))])[:p]
    x = _filler(rng, length, noise, NOISE)
    starts = _place(rng, length, [2] * p)
    y, roles, seen, source = np.full(length, -1), np.zeros(length, int), {}, []
    for s, i in zip(starts, which):
        x[s:s + 2] = keys[i], values[i]
        roles[s], roles[s + 1] = 1, 2
        if i in seen:                            # a repeated key: its value, from the first pair
            y[s] = values[i]
            source.append((s, seen[i]))
        else:
            seen[i] = s + 1
    q, src = source[int(rng.integers(len(source)))] if source else (starts[-1], starts[-1] + 1)
    return x, y, dict(query=q, source=[src], roles=roles)


def distract(rng, length, noise, size=None):
    n = size or int(rng.integers(2, 7))
    half = len(KEYS) // 2
    a_pool, b_pool = np.array(KEYS[:half]), np.array(KEYS[half:])
    a, b = rng.choice(a_pool, n, replace=False), rng.choice(b_pool, n, replace=False)
    pairs = [(a[0], b[0])]  # the queried key; near misses share its first or its second token
    for i in range(1, n):
        pairs.append((a[0], b[i]) if i % 2 else (a[i], b[0]))
    order = rng.permutation(n)
    values = rng.choice(VALUES, n)
    x = _filler(rng, length - 3, noise, NOISE)
    starts = _place(rng, length - 3, [3] * n)
    roles = np.zeros(length, int)
    for s, i in zip(starts, order):
        x[s:s + 3] = pairs[i][0], pairs[i][1], values[i]
        roles[s:s + 2], roles[s + 2] = 1, 2
    x = np.concatenate([x, [QUERY, a[0], b[0]]])
    roles[-3:] = 3
    y = np.full(length, -1)
    y[-1] = values[0]
    return x, y, dict(query=length - 1, source=[starts[list(order).index(0)] + 2], roles=roles)


def table(rng, length, noise, size=None):
    n, c, n_q = size or int(rng.integers(2, 5)), len(COLS), 2
    names, cells = rng.choice(KEYS, n, replace=False), rng.choice(VALUES, (n, c))
    body = length - 3 * n_q                      # the queries "? name column" close the sequence
    x = _filler(rng, body, noise, NOISE)
    starts = _place(rng, body, [1 + c] * n)
    roles = np.zeros(length, int)
    for s, name, row in zip(starts, names, cells):
        x[s], x[s + 1:s + 1 + c] = name, row
        roles[s], roles[s + 1:s + 1 + c] = 1, 2
    rows, cols = rng.integers(0, n, n_q), rng.integers(0, c, n_q)
    queries = np.stack([np.full(n_q, QUERY), names[rows], np.array(COLS)[cols]], 1).reshape(-1)
    x = np.concatenate([x, queries])
    roles[body:] = 3                             # the questions
    y = np.full(length, -1)
    y[body + 2::3] = cells[rows, cols]           # the column token predicts the cell
    return x, y, dict(query=length - 1, source=[starts[rows[-1]] + 1 + cols[-1]], roles=roles)


# name -> (generator, number of segment tokens / pairs / rows used at evaluation: the largest trained)
TASKS = {"induction": (induction, 12), "recall": (recall, 6), "distract": (distract, 6), "table": (table, 4)}


def is_eval(x):
    """The split of a sequence, from its content only (the filler does not count)."""
    content = x[(x != QUIET) & ((x < NOISE.start) | (x >= NOISE.stop))]
    return zlib.crc32(content.astype(np.int64).tobytes()) % 8 == 0


def examples(task, n, length, noise, rng, split, size=None):
    """n examples of one split: x, y [n, length] int64 and one meta dict per example.
    noise: True, False, or None (each example flips a coin)."""
    gen = TASKS[task][0]
    xs, ys, metas = [], [], []
    while len(xs) < n:
        with_noise = bool(rng.integers(2)) if noise is None else noise
        x, y, meta = gen(rng, length, with_noise, size)
        if is_eval(x) != (split == "eval"):
            continue
        xs.append(x), ys.append(y), metas.append(dict(meta, noise=with_noise))
    return torch.from_numpy(np.stack(xs)).long(), torch.from_numpy(np.stack(ys)).long(), metas


def eval_set(task, n, length, noise, seed=12345):
    """The fixed evaluation set of a task at a length and noise setting: the same for every arm and seed."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), length, int(noise)])
    return examples(task, n, length, noise, rng, "eval", size=TASKS[task][1])


@torch.no_grad()
def accuracy(model, x, y, batch=64):
    """The share of answer tokens (targets != -1) whose argmax prediction is right."""
    right = total = 0
    dev = model.lm_head.weight.device
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(dev))[0]
        yb = y[i:i + batch].to(dev)
        right += ((logits.argmax(-1) == yb) & (yb != -1)).sum().item()
        total += (yb != -1).sum().item()
    return right / max(total, 1)


# ----- what the RePo layers learned -------------------------------------------------------------

@torch.no_grad()
def analyse(model, task, L, n=32):
    """Per layer: the positions' range against the length; for RePo layers how far a key (or the
    looked-up copy) lies from its value (or source) relative to that range, and how far the filler's
    mean position lies from the content's; the attention mass of the answer's query token on the
    answer's source (best head per layer); one example's positions for the plot."""
    modes, dev = model.config.layer_modes(), model.lm_head.weight.device
    out = {"modes": modes, "range": {}, "kv_gap": None, "filler_offset": None, "attention_on_source": None}
    for mult in (4, 2, 1):  # L last: its examples and positions are the ones analysed below
        x, _, metas = eval_set(task, n, mult * L, True)
        x = x.to(dev)
        pos = model(x, return_positions=True)[2].cpu()  # [n_layer, B, n_head, T]
        out["range"][str(mult * L)] = (pos.amax(-1) - pos.amin(-1)).mean((1, 2)).tolist()
    gaps, offsets, mass = [], [], torch.zeros(len(modes))
    for b, meta in enumerate(metas):
        roles = torch.as_tensor(meta["roles"][:L])
        z = pos[:, b]                                   # [n_layer, n_head, T]
        rng_ = (z.amax(-1) - z.amin(-1)).clamp_min(1e-6)
        keys = (roles == 1).nonzero()[:, 0]
        # every key with the value right after it (induction: the copy's first token and its source)
        pairs = [(k, k + 1) for k in keys.tolist() if k + 1 < L and roles[k + 1] == 2] if task != "induction" \
            else [(meta["query"], meta["source"][0] - 1)]
        if pairs:
            k, v = torch.tensor(pairs).T
            gaps.append(((z[..., k] - z[..., v]).abs().mean(-1) / rng_))
        filler, content = (roles == 0), (roles != 0)
        if filler.any():
            offsets.append((z[..., filler].mean(-1) - z[..., content].mean(-1)).abs() / rng_)
        probs = last_query_attention(model, x[b:b + 1, :meta["query"] + 1])  # [n_layer, n_head, T]
        mass += probs[:, :, meta["source"]].sum(-1).amax(-1).cpu()
    out["kv_gap"] = torch.stack(gaps).mean((0, 2)).tolist() if gaps else None
    out["filler_offset"] = torch.stack(offsets).mean((0, 2)).tolist() if offsets else None
    out["attention_on_source"] = (mass / len(metas)).tolist()
    out["example"] = {"tokens": x[0].tolist(), "roles": metas[0]["roles"][:L].tolist(),
                      "positions": pos[:, 0].tolist()}
    return out


# ----- one run ----------------------------------------------------------------------------------

def mixture(tasks, n, length, rng):
    """n training examples dealt out over the tasks in turn (the mix is the same at every step)."""
    parts = [examples(t, n // len(tasks) + (k < n % len(tasks)), length, None, rng, "train")
             for k, t in enumerate(tasks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run(tasks, arm, seed, scale, steps=None, lr=None, verbose=False):
    """Train one model of the arm on the mix of the tasks; accuracy of each task on the way
    (without and with noise, at L) and at the end (L, 2L, 4L; YaRN beyond L where the arm rotates)."""
    s = dict(SCALES[scale])
    steps, lr, L = steps or s["steps"], lr or s["lr"], s["L"]
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                    intermediate_size=s["mlp"], block_size=L, rope_theta=10000.0, **ARMS[arm])
    # (theta 1e4, not OLMo-2's 5e5: with 16-dimensional heads and 32 tokens, 5e5 would leave half the
    # frequency pairs turning by less than 3 degrees over the whole context)
    device = torch.device("cuda" if torch.cuda.is_available() and scale == "gpu" else "cpu")
    model = GPT(cfg).to(device)  # float32 throughout: the model is tiny
    c = TrainConfig(learning_rate=lr, min_lr=lr / 10, warmup_iters=s["warmup"], max_iters=steps,
                    weight_decay=0.1, grad_clip=1.0, device=device.type)
    optimizer = configure_optimizer(model, c, device)
    rng = np.random.default_rng([seed, zlib.crc32(",".join(tasks).encode())])
    curve_sets = {(t, nz): eval_set(t, s["n_eval"], L, nz) for t in tasks for nz in (False, True)}
    curve, t0, to90 = [], time.time(), {t: None for t in tasks}
    for it in range(steps):
        model.train()
        x, y = mixture(tasks, s["batch"], L, rng)
        loss, _ = train_step(model, optimizer, [(x.to(device), y.to(device))], get_lr(it, c), c, nullcontext())
        if (it + 1) % s["eval_every"] == 0 or it + 1 == steps:
            model.eval()
            acc = {t: {("noise" if nz else "quiet"): accuracy(model, *curve_sets[t, nz][:2]) for nz in (False, True)}
                   for t in tasks}
            curve.append(dict(step=it + 1, loss=loss, accuracy=acc))
            for t in tasks:
                if to90[t] is None and min(acc[t].values()) >= 0.9:
                    to90[t] = it + 1
            if verbose:
                print(f"step {it + 1}: loss {loss:.3f}; accuracy at L quiet/noise " +
                      ", ".join(f"{t} {a['quiet']:.2f}/{a['noise']:.2f}" for t, a in acc.items()) +
                      f" ({time.time() - t0:.0f} s, {eta(time.time() - t0, it + 1, steps)} left)", flush=True)
    model.eval()
    rotates = cfg.layer_modes().count("nope") < cfg.n_layer
    final = []
    for t in tasks:
        for mult in (1, 2, 4):
            for nz in (False, True):
                x, y, _ = eval_set(t, s["n_final"], mult * L, nz)
                for use_yarn in ([False, True] if mult > 1 and rotates else [False]):
                    with scaled_rope(model, mult if use_yarn else 1):
                        final.append(dict(task=t, length=mult * L, noise=nz, yarn=use_yarn,
                                          accuracy=accuracy(model, x, y)))
    return dict(tasks=tasks, arm=arm, seed=seed, scale=scale, steps=steps, lr=lr, L=L, modes=cfg.layer_modes(),
                params=model.num_params(), train_s=time.time() - t0, steps_to_90=to90, curve=curve,
                final=final, analysis={t: analyse(model, t, L) for t in tasks})


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    tasks = args.get("tasks", "").split(",")
    unknown = set(args) - {"tasks", "arm", "seed", "scale", "out", "steps", "lr", "threads"}
    if unknown or not {"tasks", "arm", "out"} <= set(args) or any(t not in TASKS for t in tasks) or \
            args.get("arm") not in ARMS or args.get("scale", "cpu") not in SCALES:
        print(f"error: usage: python experiments/synthetic.py --tasks=T1,T2,... (of {','.join(TASKS)}) "
              f"--arm={{{','.join(ARMS)}}} --out=FILE.json [--seed=0] [--scale={{{','.join(SCALES)}}}] "
              f"[--steps=N] [--lr=X] [--threads=1]", file=sys.stderr)
        return 2
    torch.set_num_threads(int(args.get("threads", 1)))
    result = run(tasks, args["arm"], int(args.get("seed", 0)), args.get("scale", "cpu"),
                 int(args["steps"]) if "steps" in args else None, float(args["lr"]) if "lr" in args else None,
                 verbose=True)
    atomic_write(args["out"], json.dumps(result))
    print(f"{args['arm']} seed {result['seed']}: {result['train_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
