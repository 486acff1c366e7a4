"""
Training batches of the synthetic tasks made on the device, vectorised in torch: on a GPU the numpy
generators of experiments/synthetic.py (one Python loop per sequence, ~50-250 ms per 128 sequences
on a 2-core host) would keep the GPU waiting for data most of the time.

Same tasks, same training distribution as the numpy generators (induction and multikey, extra=0):
a segment of 6-12 distinct content tokens repeated later; 2-6 needles "a b v" (the asked key, then
near misses sharing its first or second token) in a haystack of the needles' own vocabulary, the
asked key's bigram broken wherever the haystack made it, and "? a b" at the end. The split is the
content's polynomial hash (synthetic.split_of with scheme "poly"), computed here on the device, so
training batches never hold a dev or test content.

    x, y = batch("multikey", 256, 128, torch.Generator("cuda").manual_seed(0), "cuda")
"""
import torch

import synthetic_vocab as syn

_A, _B = torch.arange(syn.KEYS.start, syn.KEYS.start + 8), torch.arange(syn.KEYS.start + 8, syn.KEYS.stop)
_CONTENT = torch.as_tensor(syn.CONTENT)


def _rand(shape, g, device):
    return torch.rand(shape, generator=g, device=device)


def _randint(low, high, shape, g, device):
    """Integers in [low, high) per element; low/high may be tensors broadcast against shape."""
    return (low + (_rand(shape, g, device) * (high - low)).floor()).long()


def _perm(n, rows, g, device):
    return _rand((rows, n), g, device).argsort(-1)


def _starts(sizes, n, body, g, device):
    """Start offsets of n[b] blocks of sizes [B, K] (only the first n[b] count) in [0, body): sorted
    random gaps, as synthetic._place draws them."""
    B, K = sizes.shape
    live = torch.arange(K, device=device) < n[:, None]
    sizes = sizes * live
    free = body - sizes.sum(1, keepdim=True)
    gaps = _randint(0, free + 1, (B, K), g, device).masked_fill(~live, 1 << 30).sort(-1).values
    before = sizes.cumsum(1) - sizes
    return (gaps + before).masked_fill(~live, 0), live


def content_split(content, live):
    """'train' mask [B] of contents [B, K] (live: which entries count), as synthetic.split_of(scheme='poly')."""
    return syn.poly_hash_torch(content, live) % 8 != 0


def induction(B, L, noise, g, device):
    m = _randint(6, 13, (B,), g, device)
    seg = _CONTENT.to(device)[_perm(len(_CONTENT), B, g, device)][:, :12]
    j = torch.arange(12, device=device)
    live = j < m[:, None]
    starts, _ = _starts(m[:, None].expand(B, 2).contiguous(), torch.full((B,), 2, device=device), L, g, device)
    first, second = starts[:, :1], starts[:, 1:]
    x = torch.where(noise[:, None], _randint(syn.NOISE.start, syn.NOISE.stop, (B, L), g, device),
                    torch.full((B, L), syn.QUIET, device=device))
    rows = torch.arange(B, device=device)[:, None].expand(B, 12)
    x[rows[live], (first + j)[live]] = seg[live]
    x[rows[live], (second + j)[live]] = seg[live]
    y = torch.full((B, L), -1, device=device)
    nxt = live & (j + 1 < m[:, None])
    y[rows[nxt], (second + j)[nxt]] = seg.roll(-1, 1)[nxt]  # position t predicts token t + 1
    return x, y, seg, live


def multikey(B, L, noise, g, device):
    n = _randint(2, 7, (B,), g, device)
    a, b = _A.to(device)[_perm(8, B, g, device)], _B.to(device)[_perm(8, B, g, device)]
    i = torch.arange(6, device=device)
    odd = (i % 2 == 1)
    ka = torch.where(odd | (i == 0), a[:, :1], a[:, :6])  # needle i: (a0, b_i) for odd i, (a_i, b0) for even
    kb = torch.where(odd, b[:, :6], b[:, :1])
    values = _randint(syn.VALUES.start, syn.VALUES.stop, (B, 6), g, device)
    live = i < n[:, None]
    order = _rand((B, 6), g, device).masked_fill(~live, 2.0).argsort(-1)  # slot k holds needle order[k]
    body = L - 3
    starts, _ = _starts(torch.full((B, 6), 3, device=device), n, body, g, device)
    x = torch.where(noise[:, None], _CONTENT.to(device)[_randint(0, len(_CONTENT), (B, L), g, device)],
                    torch.full((B, L), syn.QUIET, device=device))
    rows = torch.arange(B, device=device)[:, None].expand(B, 6)
    for k, tok in enumerate((ka, kb, values)):
        x[rows[live], (starts + k)[live]] = tok.gather(1, order)[live]
    target = starts.gather(1, order.argsort(-1)[:, :1])  # where needle 0 went
    # the asked bigram once in the body: break every other occurrence the haystack made (a filler token)
    t = torch.arange(body - 1, device=device)
    hit = (x[:, :body - 1] == a[:, :1]) & (x[:, 1:body] == b[:, :1]) & (t != target)
    x[:, :body - 1] = torch.where(hit, _randint(syn.VALUES.start, syn.VALUES.stop, (B, body - 1), g, device),
                                  x[:, :body - 1])
    x[:, body] = syn.QUERY
    x[:, body + 1], x[:, body + 2] = a[:, 0], b[:, 0]
    y = torch.full((B, L), -1, device=device)
    y[:, -1] = values[:, 0]
    return x, y, torch.cat([a, b, values], 1), torch.cat([torch.ones(B, 16, dtype=torch.bool, device=device), live], 1)


# name -> generator(B, L, noise [B] bool, generator, device) -> x, y [B, L], content [B, K], live [B, K]
GENERATORS = {"induction": induction, "multikey": multikey}


def batch(task, n, L, g, device):
    """n training sequences of one task (noise in half of them, at random), never a dev/test content."""
    xs, ys, have = [], [], 0
    while have < n:
        noise = _rand((n,), g, device) < 0.5
        x, y, content, live = GENERATORS[task](n, L, noise, g, device)
        train = content_split(content, live)
        xs.append(x[train]), ys.append(y[train])
        have += int(train.sum())
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def mixture(tasks, n, L, g, device):
    """The numpy mixture's shares: n sequences dealt out over the tasks in turn."""
    parts = [batch(t, n // len(tasks) + (k < n % len(tasks)), L, g, device) for k, t in enumerate(tasks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
