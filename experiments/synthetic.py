"""
Synthetic in-context retrieval tasks, and one training run of one arm on a mix of them.

Each task uses part of one small vocabulary (64 tokens), puts the loss on the answer tokens only
(targets -1 elsewhere) and is built so that only a content-based lookup solves it:

    induction   a segment of 6-12 distinct tokens at a random place, repeated later at a random
                distance: predict each token of the repeat after its first. The distance varies, so
                no fixed relative position solves it; a previous-token head plus an induction head does.
    recall      a stream of key-value pairs (2-6 distinct keys, 10 pairs, at random places) in which
                keys recur: every recurring key asks for its value. Values repeat across keys and keys
                repeat within the stream, so eliminating values already asked for buys nothing.
    table       2-4 rows "name c1 c2 c3" at random places, then two questions "? name column": the
                cell. The row is found by content, the cell by its offset inside the row.
    distract    one question "? a b" over needles "a b v" whose near misses share the question's
                first or second key token.
    multikey    distract in a haystack drawn from the needles' own vocabulary (RULER multikey-style):
                stray key and value tokens everywhere, the asked bigram only once; the distractors
                must be rejected by content, not by identity.

Filler without noise is one quiet token; with noise, random tokens of a noise vocabulary (multikey:
the haystack). Evaluation is paired: one fixed set of contents per task, rendered quiet and noisy
with the same layout, and at L, 2L and 4L where the longer renderings keep every needle and add
distractors (decoy segments, unasked pairs, near-miss and other needles, unasked rows), not only
filler. A content's split (train / dev: learning curves and the learning-rate sweep / test: final
accuracies) is a hash of the content alone, so the streams are disjoint by construction.

One model is trained on the mix of the tasks (equal shares of every batch): trained alone, recall
sat for 3,000 steps on the plateau of "some value of this context" (~20-25%); next to induction,
which forms the previous-token/induction circuit within a few hundred steps, it is learnt too. A run
uses model.GPT and train.py's optimizer, learning-rate schedule and step (configure_optimizer, get_lr,
train_step), measures dev accuracy on the way and test accuracy at the end (L, 2L, 4L; beyond L
also with YaRN, whose temperature applies to NoPE layers, pure NoPE included); a RePo model is also
scored with its positions replaced by 0 and by the token index (what the learned positions carry);
and the positions of the RePo layers and the attention on the answer's source are analysed.
`experiments/repro.py synthetic` runs the sweep and the arms and writes the tables; one run:

    python experiments/synthetic.py --tasks=induction,multikey --arm=repo --seed=0 --out=/tmp/r.json
"""
import time

_T0 = time.time()  # before the heavy imports: the run's process time includes them
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
from infra.files import atomic_open, atomic_write  # noqa: E402
from infra.progress import eta  # noqa: E402
from eval import attention_probs, scaled_rope  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import TrainConfig, configure_optimizer, get_lr, train_step  # noqa: E402

# the vocabulary (one for all tasks, each uses a part) and the split hash, shared with gpu_data.py
from synthetic_vocab import (COLS, CONTENT, KEYS, NOISE, QUERY, QUIET, VALUES, VOCAB,  # noqa: E402
                             poly_hash, poly_hash_torch)  # noqa: F401 - syn.poly_hash_torch

# each arm differs from the others only in its positions; 3 layers so that R2N1 and N2R1 tile
ARMS = {"rope": dict(pos_mode="rope"), "nope": dict(pos_mode="nope"),
        "r2n1": dict(layer_pattern="rope,rope,nope"), "n2r1": dict(layer_pattern="nope,nope,rope"),
        # RePo's layout with NoPE where RePo is: what the layer layout alone does, without learned positions
        "r1n2": dict(layer_pattern="rope,nope,nope"),
        "repo": dict(pos_mode="repo"),                       # from floor(L/3): the paper's placement
        "repo0": dict(pos_mode="repo", repo_start_layer=0)}  # every layer RePo
# the paper's protocol: a RoPE run of the same seed (its saved weights, --init=) continued for as many
# steps again as each of these arms, the positioners fresh, no warmup, linear decay to 0; rope_then_r1n2
# is the continued RePo's layout control (RoPE in layer 0, NoPE where RePo is)
CONTINUED = {"rope_then_rope": "rope", "rope_then_nope": "nope", "rope_then_r1n2": "r1n2", "rope_then_repo": "repo"}

SCALES = {
    # 3 layers, d=64, SwiGLU width 64, L=32: ~40 ms a step single-threaded on an idle 2-core x86 CPU
    # (data included; ~300 ms on cores shared with a dozen other processes); lr: each arm's best of
    # `lrs` (the sweep, seed 100, dev split, sweep_steps); RoPE, RePo and the matched NoPE control
    "cpu": dict(n_layer=3, n_head=4, n_embd=64, mlp=64, L=32, batch=32, steps=1500, lr=1e-3, warmup=50,
                eval_every=100, n_eval=128, n_final=128, sweep_steps=2000, seeds=8,
                tasks=["induction", "multikey"], arms=["rope", "r1n2", "repo"],
                lrs=[5e-4, 1e-3, 2e-3], continued=True),  # 9 sweep + 56 study runs: ~35 minutes on 2 cores
    # for one GPU: twice the depth and width, twice the context, 4x the batch; the batches are made on
    # the device (gpu_data.py, split by poly_hash) so the GPU never waits for numpy. Sized (estimated,
    # not measured) for ~5 minutes of one H100/H200, eager: 33 runs of ~20-40 s, 8 at a time
    "gpu": dict(n_layer=6, n_head=4, n_embd=128, mlp=256, L=64, batch=128, steps=2000, lr=1e-3, warmup=100,
                eval_every=200, n_eval=256, n_final=512, sweep_steps=2000, seeds=8, data="torch", split="poly",
                tasks=["induction", "multikey"], arms=["rope", "r1n2", "repo"], lrs=[5e-4, 1e-3, 2e-3]),
    # the CPU model on the induction task alone, one seed: RoPE learns it in ~500 steps, RePo in
    # ~1,300, and beyond L the arms differ as in the full study; 7 runs of ~1.5 minutes, two at a time
    "smoke": dict(n_layer=3, n_head=4, n_embd=64, mlp=64, L=32, batch=32, steps=2000, lr=1e-3, warmup=50,
                  eval_every=100, n_eval=128, n_final=256, sweep_steps=2000, tasks=["induction"], seeds=1,
                  arms=["rope", "nope", "r2n1", "n2r1", "r1n2", "repo", "repo0"], lrs=[1e-3]),
}


# ----- the tasks --------------------------------------------------------------------------------
# A generator gen(rng, length, noise, size, extra, lay) draws the content from rng (everything that
# makes the answers) and the layout and filler from lay: one content rendered with and without noise
# (same lay seed) differs only in the filler, and rendered at 2L and 4L it keeps its needles and
# gains `extra` distractors (drawn from a child of rng, so the first k are the same for any extra >= k).
# meta: answers [(target position, [positions holding the answer])], pairs [(key, value) positions],
# roles per token, and content (the base content: what decides the split).

def _place(rng, length, sizes):
    """Random non-overlapping start offsets, in order, for blocks of the given sizes in [0, length)."""
    free = length - sum(sizes)
    if free < 0:
        raise ValueError(f"blocks of {sum(sizes)} tokens do not fit into {length}")
    gaps = np.sort(rng.integers(0, free + 1, len(sizes)))  # filler before each block
    return [int(g + sum(sizes[:i])) for i, g in enumerate(gaps)]


def _shuffled(lay, kinds):
    """The blocks' order: distractors (kind None) at random places, the rest keeping their order."""
    order = lay.permutation(len(kinds))
    fixed = iter([k for k in kinds if k is not None])
    return [next(fixed) if kinds[i] is not None else None for i in order]


def _fill(x, roles, lay, noise, pool):
    """The filler, drawn after the layout so that quiet and noisy renderings share it."""
    free = roles == 0
    x[free] = lay.choice(pool, int(free.sum())) if noise else QUIET


def _child(rng):
    return np.random.default_rng(int(rng.integers(2 ** 62)))


def induction(rng, length, noise, size=None, extra=0, lay=None):
    lay = rng if lay is None else lay
    m = size or int(rng.integers(6, 13))
    perm = rng.permutation(CONTENT)
    seg, sub = perm[:m], _child(rng)
    decoys = [sub.permutation(perm[m:])[:6] for _ in range(extra)]  # no token of the segment: no ambiguity
    kinds = _shuffled(lay, ["seg", "seg"] + [None] * extra)
    blocks, d = [], iter(decoys)
    for k in kinds:
        blocks.append(seg if k else next(d))
    x, roles = np.full(length, QUIET), np.zeros(length, int)
    # roles: 0 filler, 1 key/row/copy, 2 value/cell/source, 3 question, 4 decoy segment (only beyond L)
    starts = _place(lay, length, [len(b) for b in blocks])
    first, second = [s for s, k in zip(starts, kinds) if k]
    for s, b, k in zip(starts, blocks, kinds):
        x[s:s + len(b)] = b
        roles[s:s + len(b)] = 4 if k is None else (2 if s == first else 1)
    _fill(x, roles, lay, noise, NOISE)
    y = np.full(length, -1)
    y[second:second + m - 1] = seg[1:]   # position t predicts token t + 1
    answers = [(second + j, [first + j + 1]) for j in range(m - 1)]
    pairs = [(first + j, first + j + 1) for j in range(m - 1)]  # the looked-up token and the one after it
    return x, y, dict(answers=answers, pairs=pairs, roles=roles, content=seg)


def recall(rng, length, noise, size=None, extra=0, lay=None):
    lay = rng if lay is None else lay
    n = size or int(rng.integers(2, 7))          # distinct keys, each with one value
    # keys and values from one pool: "some value of this context" is then no better a guess than
    # any context token (with a value vocabulary of its own, that guess is a plateau training sticks on)
    # (but never a key of this context: the token after a key's last occurrence is then its value)
    keys = rng.choice(CONTENT, n, replace=False)
    values = rng.choice(np.setdiff1d(CONTENT, keys), n)
    p = min(10, length // 3)                     # pairs in the stream; every key at least once
    which = np.concatenate([rng.permutation(n), rng.integers(0, n, max(p - n, 0))])[:p]
    sub = _child(rng)  # distractor pairs: keys that occur once (never asked), distinct, no key of the stream
    spare = sub.permutation(np.setdiff1d(CONTENT, np.concatenate([keys, values])))
    d_vals = sub.choice(np.setdiff1d(CONTENT, keys), len(spare))
    if extra > len(spare):
        raise ValueError(f"recall has {len(spare)} distractor keys, not {extra}")
    kinds = _shuffled(lay, list(which) + [None] * extra)
    x, roles = np.full(length, QUIET), np.zeros(length, int)
    starts = _place(lay, length, [2] * len(kinds))
    y, seen, answers, pairs, d = np.full(length, -1), {}, [], [], 0
    for s, i in zip(starts, kinds):
        x[s:s + 2] = (spare[d], d_vals[d]) if i is None else (keys[i], values[i])
        roles[s], roles[s + 1] = 1, 2
        pairs.append((s, s + 1))
        if i is None:
            d += 1
        else:
            if i in seen:                        # a repeated key: its value, from every earlier pair
                y[s] = values[i]
                answers.append((s, list(seen[i])))
            seen.setdefault(i, []).append(s + 1)
    _fill(x, roles, lay, noise, NOISE)
    return x, y, dict(answers=answers, pairs=pairs, roles=roles, content=np.concatenate([keys, values, which]))


def _needles(rng, n, extra):
    """Two-token keys "a b": the queried (a0, b0) first, then near misses sharing a0 or b0, then
    (distractors beyond 7 near misses of each kind) unrelated keys; and a value for each."""
    a, b = rng.permutation(np.array(KEYS[:8])), rng.permutation(np.array(KEYS[8:]))
    values, sub = rng.choice(VALUES, n), _child(rng)
    keys = [(a[0], b[0])] + [(a[0], b[i]) if i % 2 else (a[i], b[0]) for i in range(1, 8)] + \
           [(a[i], b[0]) if i % 2 else (a[0], b[i]) for i in range(1, 8)]
    keys = keys[:n] + [k for k in keys[n:] if k not in keys[:n]]
    keys += [(a[i], b[j]) for i, j in sub.permutation([(i, j) for i in range(1, 8) for j in range(1, 8)])]
    if n + extra > len(keys):
        raise ValueError(f"at most {len(keys)} needles, not {n + extra}")
    return keys[:n + extra], np.concatenate([values, sub.choice(VALUES, extra)]), np.concatenate([a, b, values])


def distract(rng, length, noise, size=None, extra=0, lay=None, hay=False):
    """One question "? a b" over needles "a b v"; hay: the filler is drawn from the needles' own
    vocabulary (stray key and value tokens everywhere), not from the noise vocabulary."""
    lay = rng if lay is None else lay
    n = size or int(rng.integers(2, 7))
    keys, values, content = _needles(rng, n, extra)
    kinds = list(lay.permutation(len(keys)))
    body = length - 3
    x, roles = np.full(length, QUIET), np.zeros(length, int)
    starts = _place(lay, body, [3] * len(keys))
    for s, i in zip(starts, kinds):
        x[s:s + 3] = keys[i][0], keys[i][1], values[i]
        roles[s:s + 2], roles[s + 2] = 1, 2
    target = starts[kinds.index(0)]
    x[body:], roles[body:] = [QUERY, *keys[0]], 3
    _fill(x[:body], roles[:body], lay, noise, CONTENT if hay else NOISE)
    if hay and noise:  # the queried key occurs once in the body: break its bigram wherever the haystack made it
        for j in range(body - 1):
            if j != target and x[j] == keys[0][0] and x[j + 1] == keys[0][1]:
                x[j] = lay.choice(VALUES)    # (only a filler token can stand there)
    y = np.full(length, -1)
    y[-1] = values[0]
    pairs = [(s + k, s + 2) for s in starts for k in (0, 1)]
    return x, y, dict(answers=[(length - 1, [target + 2])], pairs=pairs, roles=roles, content=content)


def multikey(rng, length, noise, size=None, extra=0, lay=None):
    return distract(rng, length, noise, size, extra, lay, hay=True)


def table(rng, length, noise, size=None, extra=0, lay=None):
    lay = rng if lay is None else lay
    n, c, n_q = size or int(rng.integers(2, 5)), len(COLS), 2
    names, cells = rng.choice(KEYS, n, replace=False), rng.choice(VALUES, (n, c))
    rows, cols = rng.integers(0, n, n_q), rng.integers(0, c, n_q)
    sub = _child(rng)  # distractor rows: names of their own, never asked
    d_names = sub.permutation(np.setdiff1d(np.array(KEYS), names))
    d_cells = sub.choice(VALUES, (len(d_names), c))
    if extra > len(d_names):
        raise ValueError(f"table has {len(d_names)} distractor rows, not {extra}")
    all_names = np.concatenate([names, d_names[:extra]])
    all_cells = np.concatenate([cells, d_cells[:extra]])
    kinds = _shuffled(lay, list(range(n)) + [None] * extra)
    order, d = [], n
    for k in kinds:
        order.append(k if k is not None else d)
        d += k is None
    body = length - 3 * n_q                      # the queries "? name column" close the sequence
    x, roles = np.full(length, QUIET), np.zeros(length, int)
    starts = _place(lay, body, [1 + c] * len(order))
    where = {}
    for s, r in zip(starts, order):
        x[s], x[s + 1:s + 1 + c] = all_names[r], all_cells[r]
        roles[s], roles[s + 1:s + 1 + c] = 1, 2
        where[r] = s
    x[body:] = np.stack([np.full(n_q, QUERY), names[rows], np.array(COLS)[cols]], 1).reshape(-1)
    roles[body:] = 3                             # the questions
    _fill(x[:body], roles[:body], lay, noise, NOISE)
    y = np.full(length, -1)
    y[body + 2::3] = cells[rows, cols]           # the column token predicts the cell
    answers = [(body + 2 + 3 * q, [where[rows[q]] + 1 + cols[q]]) for q in range(n_q)]
    pairs = [(s, s + 1 + k) for s in starts for k in range(c)]
    return x, y, dict(answers=answers, pairs=pairs, roles=roles,
                      content=np.concatenate([names, cells.reshape(-1), rows, cols]))


# name -> (generator, number of segment tokens / pairs / needles / rows at evaluation: the largest
# trained, distractors added per extra L of context at evaluation)
TASKS = {"induction": (induction, 12, 1), "recall": (recall, 6, 3), "distract": (distract, 6, 3),
         "multikey": (multikey, 6, 3), "table": (table, 4, 2)}
EVAL_SEED = 12345


def split_of(content, scheme="crc32"):
    """'train', 'dev' (learning curves, the lr sweep) or 'test' (final accuracies), from the base
    content alone: renderings of one content at any length, with or without noise, share it.
    scheme: 'crc32' (the CPU study) or 'poly' (poly_hash: the GPU study, whose batches are made on the device)."""
    h = poly_hash(content) if scheme == "poly" else zlib.crc32(np.asarray(content, dtype=np.int64).tobytes())
    return "train" if h % 8 else ("dev" if (h >> 3) % 2 == 0 else "test")


def is_eval(content, scheme="crc32"):
    return split_of(content, scheme) != "train"


def _stack(xs, ys, metas):
    return torch.from_numpy(np.stack(xs)).long(), torch.from_numpy(np.stack(ys)).long(), metas


def examples(task, n, length, noise, rng, split, size=None, scheme="crc32"):
    """n examples of one split: x, y [n, length] int64 and one meta dict per example.
    noise: True, False, or None (each example flips a coin)."""
    gen = TASKS[task][0]
    xs, ys, metas = [], [], []
    while len(xs) < n:
        with_noise = bool(rng.integers(2)) if noise is None else noise
        x, y, meta = gen(rng, length, with_noise, size)
        if (split_of(meta["content"], scheme) == "train") != (split == "train"):
            continue
        xs.append(x), ys.append(y), metas.append(dict(meta, noise=with_noise))
    return _stack(xs, ys, metas)


_RENDERED = {}


def rendered(task, n, L, mult, noise, split="test", seed=EVAL_SEED, scheme="crc32"):
    """The fixed evaluation set of a task: the same n contents (the first n of the split from a
    seeded stream) for every length multiple, noise setting, arm and training seed, rendered at
    mult * L with (mult - 1) * per-L extra distractors. Paired: compare any two cells example by example."""
    key = (task, n, L, mult, noise, split, seed, scheme)
    if key not in _RENDERED:
        gen, size, per_L = TASKS[task]
        xs, ys, metas, i = [], [], [], 0
        while len(xs) < n:
            base = [seed, zlib.crc32(task.encode()), L, i]
            i += 1
            if split_of(gen(np.random.default_rng(base), L, False, size)[2]["content"], scheme) != split:
                continue  # (the content alone decides; rendering at L is the cheap way to draw it)
            x, y, meta = gen(np.random.default_rng(base), mult * L, noise, size, (mult - 1) * per_L,
                             lay=np.random.default_rng(base + [mult]))
            xs.append(x), ys.append(y), metas.append(dict(meta, noise=noise, example=i - 1))
        _RENDERED[key] = _stack(xs, ys, metas)
    return _RENDERED[key]


def eval_set(task, n, length, noise, seed=EVAL_SEED, split="test"):
    """The fixed test set of a task at one length (no extra distractors): the same for every arm and seed."""
    return rendered(task, n, length, 1, noise, split, seed)


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

class positions_as:
    """Context manager: the RePo layers use z = 0 ('zero': NoPE there) or z = the token index ('index':
    RoPE there) instead of their learned positions: what the learned positions carry at inference."""

    def __init__(self, model, how):
        if how not in ("learned", "zero", "index"):
            raise ValueError(f"positions_as: {how!r} is not 'learned', 'zero' or 'index'")
        self.model, self.how = model, how

    def _fixed(self, x):
        B, T, _ = x.shape
        n = self.model.config.n_kv_head
        if self.how == "zero":
            return torch.zeros(B, n, T, device=x.device)
        return torch.arange(T, device=x.device, dtype=torch.float32).expand(B, n, T)

    def __enter__(self):
        self.patched = [b.self_attn.positioner for b in self.model.model.layers if b.self_attn.positioner is not None]
        if self.how != "learned":
            for p in self.patched:
                p.forward = self._fixed
        return self

    def __exit__(self, *exc):
        for p in self.patched:
            p.__dict__.pop("forward", None)


VARIANTS = {"": "learned", "z=0": "zero", "z=index": "index"}  # name in the results -> positions_as


@torch.no_grad()
def analyse(model, task, L, n=32, scheme="crc32"):
    """Per layer: the positions' range against the length; how far each key lies from its value (the
    induction: a token of the first occurrence from the one after it, the pair an induction head
    reads) relative to that range, with the same pairs under RoPE's positions z = t as the reference;
    how far the filler's mean position lies from the content's; the attention mass from every answer
    token to the token holding its answer (best head per layer, mean over all answers); one
    example's positions for the plot."""
    modes, dev = model.config.layer_modes(), model.lm_head.weight.device
    out = {"modes": modes, "range": {}}
    for mult in (4, 2, 1):  # L last: its examples and positions are the ones analysed below
        x, _, metas = rendered(task, n, L, mult, True, scheme=scheme)
        x = x.to(dev)
        pos = model(x, return_positions=True)[2].cpu()  # [n_layer, B, n_head, T]
        out["range"][str(mult * L)] = (pos.amax(-1) - pos.amin(-1)).mean((1, 2)).tolist()
    probs = attention_probs(model, x).cpu()           # [n_layer, B, n_head, T, T]
    index = torch.arange(L, dtype=torch.float32)
    gaps, ref, offsets, mass = [], [], [], []
    for b, meta in enumerate(metas):
        roles = torch.as_tensor(meta["roles"][:L])
        z = pos[:, b]                                   # [n_layer, n_head, T]
        rng_ = (z.amax(-1) - z.amin(-1)).clamp_min(1e-6)
        k, v = torch.tensor(meta["pairs"]).T
        gaps.append((z[..., k] - z[..., v]).abs().mean(-1) / rng_)
        ref.append(((index[k] - index[v]).abs() / (L - 1)).mean())
        filler, content = (roles == 0), (roles != 0) & (roles != 4)
        if filler.any():
            offsets.append((z[..., filler].mean(-1) - z[..., content].mean(-1)).abs() / rng_)
        # per answer token: its attention on every token holding the answer, summed; best head; mean over answers
        mass.append(torch.stack([probs[:, b, :, t, src].sum(-1).amax(1) for t, src in meta["answers"]]).mean(0))
    out["kv_gap"] = torch.stack(gaps).mean((0, 2)).tolist()
    out["kv_gap_rope"] = float(torch.stack(ref).mean())
    out["filler_offset"] = torch.stack(offsets).mean((0, 2)).tolist() if offsets else None
    out["attention_on_source"] = torch.stack(mass).mean(0).tolist()
    out["example"] = {"tokens": x[0].tolist(), "roles": metas[0]["roles"][:L].tolist(),
                      "positions": pos[:, 0].tolist()}
    return out


# ----- one run ----------------------------------------------------------------------------------

def mixture(tasks, n, length, rng):
    """n training examples dealt out over the tasks in turn (the mix is the same at every step)."""
    parts = [examples(t, n // len(tasks) + (k < n % len(tasks)), length, None, rng, "train")
             for k, t in enumerate(tasks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def final_accuracies(model, tasks, L, n, variants=("",), sets=rendered):
    """Accuracy on the paired test sets: every task at L, 2L, 4L, quiet and with noise; beyond L also
    with YaRN (frequencies and temperature; in NoPE layers, pure NoPE included, the temperature only);
    each variant of the positions (VARIANTS)."""
    out = []
    for t in tasks:
        for mult in (1, 2, 4):
            for nz in (False, True):
                x, y, _ = sets(t, n, L, mult, nz)
                for use_yarn in ([False, True] if mult > 1 else [False]):
                    for v in variants:
                        with scaled_rope(model, mult if use_yarn else 1), positions_as(model, VARIANTS[v]):
                            out.append(dict(task=t, length=mult * L, noise=nz, yarn=use_yarn, variant=v,
                                            accuracy=accuracy(model, x, y)))
    return out


def run(tasks, arm, seed, scale, steps=None, lr=None, verbose=False, init=None, save=None, batches=None):
    """Train one model of the arm on the mix of the tasks; accuracy of each task on the way (dev split,
    without and with noise, at L) and at the end (test split: final_accuracies). init: a saved state
    of a RoPE run that the CONTINUED arm continues (its positioners fresh); save: where to keep the
    final state. batches(it) -> (x, y) replaces the numpy mixture (the GPU's on-device data)."""
    s = dict(SCALES[scale])
    steps, lr, L = steps or s["steps"], lr or s["lr"], s["L"]
    if (arm in CONTINUED) != (init is not None):
        raise ValueError(f"arm {arm}: continued arms ({', '.join(CONTINUED)}) and only they need init=")
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                    intermediate_size=s["mlp"], block_size=L, rope_theta=10000.0, **ARMS[CONTINUED.get(arm, arm)])
    # (theta 1e4, not OLMo-2's 5e5: with 16-dimensional heads and 32 tokens, 5e5 would leave half the
    # frequency pairs turning by less than 3 degrees over the whole context)
    device = torch.device("cuda" if torch.cuda.is_available() and scale == "gpu" else "cpu")
    model = GPT(cfg).to(device)  # float32 throughout: the model is tiny
    if init is not None:
        missing, unexpected = model.load_state_dict(torch.load(init, map_location=device), strict=False)
        if unexpected or any("positioner" not in k for k in missing):
            raise ValueError(f"{init} is not a RoPE run of this scale (missing {missing}, unexpected {unexpected})")
        # the paper's continual stage: no warmup, linear decay to zero
        c = TrainConfig(learning_rate=lr, min_lr=0.0, warmup_iters=0, lr_schedule="linear", max_iters=steps,
                        weight_decay=0.1, grad_clip=1.0, device=device.type)
    else:
        c = TrainConfig(learning_rate=lr, min_lr=lr / 10, warmup_iters=s["warmup"], max_iters=steps,
                        weight_decay=0.1, grad_clip=1.0, device=device.type)
    optimizer = configure_optimizer(model, c, device)
    rng = np.random.default_rng([seed, zlib.crc32(",".join(tasks).encode())])
    scheme = s.get("split", "crc32")
    curve_sets = {(t, nz): rendered(t, s["n_eval"], L, 1, nz, "dev", scheme=scheme) for t in tasks for nz in (False, True)}
    if batches is None and s.get("data") == "torch":  # made on the device (experiments/gpu_data.py)
        import gpu_data
        g = torch.Generator(device).manual_seed(seed)
        batches = lambda it: gpu_data.mixture(tasks, s["batch"], L, g, device)  # noqa: E731
    curve, t0, to90, times = [], time.time(), {t: None for t in tasks}, dict(data=0.0, step=0.0, eval=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for it in range(steps):
        model.train()
        ta = time.time()
        x, y = batches(it) if batches else mixture(tasks, s["batch"], L, rng)
        x, y = x.to(device), y.to(device)
        sync()
        tb = time.time()
        loss, _ = train_step(model, optimizer, [(x, y)], get_lr(it, c), c, nullcontext())
        sync()
        tc = time.time()
        times["data"] += tb - ta
        times["step"] += tc - tb
        if (it + 1) % s["eval_every"] == 0 or it + 1 == steps:
            model.eval()
            acc = {t: {("noise" if nz else "quiet"): accuracy(model, *curve_sets[t, nz][:2]) for nz in (False, True)}
                   for t in tasks}
            curve.append(dict(step=it + 1, loss=loss, accuracy=acc))
            for t in tasks:
                if to90[t] is None and min(acc[t].values()) >= 0.9:
                    to90[t] = it + 1
            times["eval"] += time.time() - tc
            if verbose:
                print(f"step {it + 1}: loss {loss:.3f}; dev accuracy at L quiet/noise " +
                      ", ".join(f"{t} {a['quiet']:.2f}/{a['noise']:.2f}" for t, a in acc.items()) +
                      f" ({time.time() - t0:.0f} s, {eta(time.time() - t0, it + 1, steps)} left)", flush=True)
    model.eval()
    train_s = time.time() - t0
    variants = list(VARIANTS) if "repo" in cfg.layer_modes() else [""]
    final = final_accuracies(model, tasks, L, s["n_final"], variants,
                             sets=lambda *a: rendered(*a, split="test", scheme=scheme))
    analysis = {t: analyse(model, t, L, scheme=scheme) for t in tasks}
    times["final"] = time.time() - t0 - train_s
    if save:
        with atomic_open(save, "wb") as f:
            torch.save(model.state_dict(), f)
    return dict(tasks=tasks, arm=arm, seed=seed, scale=scale, steps=steps, lr=lr, L=L, modes=cfg.layer_modes(),
                params=model.num_params(), train_s=train_s, times=times, steps_to_90=to90, curve=curve,
                final=final, analysis=analysis, init=bool(init))


KEYS_CLI = {"tasks", "arm", "seed", "scale", "out", "steps", "lr", "threads", "init", "save"}


def main(argv):
    args = cli.parse(argv, {k: "" for k in sorted(KEYS_CLI)})  # text, as given; unknown keys refused
    tasks = args.get("tasks", "").split(",")
    arms = list(ARMS) + list(CONTINUED)
    if not {"tasks", "arm", "out"} <= set(args) or any(t not in TASKS for t in tasks) or \
            args.get("arm") not in arms or args.get("scale", "cpu") not in SCALES or \
            (args.get("arm") in CONTINUED) != ("init" in args):
        raise cli.UsageError(f"usage: python experiments/synthetic.py --tasks=T1,T2,... (of {','.join(TASKS)}) "
                             f"--arm={{{','.join(arms)}}} --out=FILE.json [--seed=0] [--scale={{{','.join(SCALES)}}}] "
                             f"[--steps=N] [--lr=X] [--threads=1] [--save=STATE.pt] [--init=ROPE_STATE.pt: the "
                             f"rope_then_* arms, and only they]")
    if "init" in args and not os.path.exists(args["init"]):
        raise cli.UsageError(f"--init={args['init']} does not exist: run the RoPE arm of this seed with --save= first")
    torch.set_num_threads(int(args.get("threads", 1)))
    result = run(tasks, args["arm"], int(args.get("seed", 0)), args.get("scale", "cpu"),
                 int(args["steps"]) if "steps" in args else None, float(args["lr"]) if "lr" in args else None,
                 verbose=True, init=args.get("init"), save=args.get("save"))
    result["process_s"] = time.time() - _T0
    atomic_write(args["out"], json.dumps(result))
    print(f"{args['arm']} seed {result['seed']}: {result['train_s']:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__.strip())
