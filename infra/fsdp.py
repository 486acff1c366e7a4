"""
FSDP2 support for train.py: a model initialised shard by shard after meta-device construction gets
the very numbers a whole-model build gets (GPT.reset_parameters calls init_weights), and each
process reads or fills only the rows of a tensor it holds (local_rows).
"""
import hashlib
import math

import torch
import torch.nn as nn


def local_rows(p):
    """(the part of tensor p this process holds, the index of its first row in the full tensor):
    p itself, or the local shard of an FSDP2 DTensor (dim-0 chunks of ceil(rows / world) rows)."""
    if not hasattr(p, "to_local"):
        return p.data, 0
    # FSDP2's layout: rows split over one mesh dimension, replicated over the other (HSDP) if any
    (dim,) = [i for i, pl in enumerate(p.placements) if not pl.is_replicate()]
    assert p.placements[dim].is_shard(0), p.placements
    rank, world = p.device_mesh.get_coordinate()[dim], p.device_mesh.shape[dim]
    return p.to_local(), rank * -(-p.shape[0] // world)


INIT_BLOCK = 1 << 20  # elements per random block (whole rows)


def _trunc_normal_rows_(p, name, seed, std):
    """N(0, std^2) truncated at 3 std. The values come in blocks of whole rows, each block from its
    own generator seeded by (seed, name, block), so rows a..b get the same numbers however the
    tensor is split: a model built whole and one initialised per shard after meta-device
    construction (train.py, FSDP2) start identical."""
    local, row0 = local_rows(p)
    if local.numel() == 0:
        return
    row = math.prod(p.shape[1:])
    per_block = max(1, INIT_BLOCK // row)
    n = local.shape[0]
    for b in range(row0 // per_block, (row0 + n - 1) // per_block + 1):
        key = hashlib.sha256(f"{seed}/{name}/{b}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        lo, hi = b * per_block, min((b + 1) * per_block, p.shape[0])
        block = torch.empty((hi - lo, *p.shape[1:]))
        nn.init.trunc_normal_(block, std=std, a=-3 * std, b=3 * std, generator=gen)
        a, e = max(lo, row0), min(hi, row0 + n)
        with torch.no_grad():
            local[a - row0:e - row0].copy_(block[a - lo:e - lo])


def init_weights(model, seed, std):
    """OLMo-2's init: every matrix (linear maps, embedding) N(0, std^2) truncated at 3 std, every other
    weight (the RMSNorms) 1. Works on a whole model and on one whose parameters are FSDP2 shards (each
    fills its own rows); meta tensors are skipped (train.py initialises once they are materialised)."""
    seen = set()
    for name, m in model.named_modules():
        p = getattr(m, "weight", None)
        if p is None or p.is_meta or id(p) in seen:  # tied weights: the embedding's draw
            continue
        seen.add(id(p))
        if isinstance(m, (nn.Linear, nn.Embedding)):
            _trunc_normal_rows_(p, name + ".weight", seed, std)
        else:
            with torch.no_grad():
                local_rows(p)[0].fill_(1.0)
