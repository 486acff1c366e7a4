"""
Memory and speed accounting for train.py: the GPUs it knows (peak bf16 FLOP/s for MFU, memory for
the dry run), and the memory plan of one training step, counted from the model's shapes before
anything is allocated, which train.py uses to refuse a step that cannot fit and to print
`--dry_run` (tests/test_scale.py checks the counts against autograd's saved tensors).

    python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=8
"""
import dataclasses
import os
import re
import resource

import torch

from infra.checkpoint import TrainError
from infra.loss import LOSS_CHUNK_LOGITS


# name -> (dense bf16 tensor-core peak FLOP/s, memory GiB), from the vendors' datasheets. A device
# name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB") matches a key when the two have the same
# words once the vendor's brand and the memory words (80GB, HBM3, SXM4) are left out: L4, L40 and
# L40S are three GPUs, and an "RTX 4090 D" is none of these.
GPUS = {"B200": (2.25e15, 180), "H200": (989e12, 141), "H100": (989e12, 80), "H100 PCIe": (756e12, 80),
        "H100 NVL": (835e12, 94), "H800": (989e12, 80), "A100": (312e12, 80), "A100 PCIe": (312e12, 80),
        "A100 40GB": (312e12, 40), "A800": (312e12, 80), "L40S": (362e12, 48), "L40": (181e12, 48),
        "L4": (121e12, 24), "RTX 4090": (165e12, 24)}


def _gpu_words(name):
    words = name.upper().replace("-", " ").split()
    return [w for w in words if w not in ("NVIDIA", "GEFORCE", "TESLA") and not re.fullmatch(r"\d+GB|HBM\w*|SXM\d*", w)]


def gpu_spec(name: str):
    """(peak FLOP/s, memory GiB) of the GPUS key `name`, or of the key that names the same GPU, or None."""
    if name in GPUS:
        return GPUS[name]
    words = _gpu_words(name)
    return next((spec for key, spec in GPUS.items() if _gpu_words(key) == words), None)


def peak_flops(device, c):
    """Per-device peak FLOP/s for this run's precision, or None (CPU, fp32, unknown GPU: MFU n/a)."""
    if device.type != "cuda" or (c.dtype == "float32"):
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec[0] if spec else None


def memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


def compute_dtype(device_type, c) -> str:
    return c.dtype if c.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")


def block_activation_bytes(config, mode: str, e: int, fused: bool) -> int:
    """Bytes one block saves for backward per token, counted tensor by tensor from model.py (checked
    against autograd's saved tensors in tests/test_scale.py). e: bytes of the matmul dtype (2 under
    bf16 autocast, 4 in float32); fused: the Triton attention kernels (else the PyTorch reference)."""
    d, I, H = config.n_embd, config.intermediate_size, config.n_head
    dq, dkv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    mixed = e != 4
    n = 3 * e * d if mixed else 4 * d          # inputs of q/k/v_proj: one bf16 cast each, or x itself
    n += 8 * dq + 4 + 8 * dkv + 4              # QK-norm: float32 input and normalised copy, 1/rms
    n += 2 * (8 * d + 4)                       # the two post-sublayer norms, likewise
    kv = dq if dkv != dq else dkv              # grouped-query attention repeats k and v to n_head heads
    n += e * (dq + 2 * kv + dq) + 4 * H        # attention keeps q, k, v, output and the log-sum-exp ...
    if not fused and mode != "nope":
        n += e * (dq + kv)                     # ... the reference path also the rotated q and k
    if fused or mode != "nope":                # input of o_proj, a copy unless SDPA already wrote the
        n += e * d                             # output as [B, T, H*D] (reference path, unrotated q)
    n += 2 * e * d if mixed else 4 * d         # inputs of gate/up_proj
    n += 4 * e * I                             # gate, up, silu(gate), their product (input of down_proj)
    if mode == "repo":                         # positioner in float32: x, gate, silu, content, r; positions
        n += (4 * d if mixed else 0) + 4 * 4 * (d // 8) + 4 * config.n_kv_head
    return n


def checkpointed_blocks(c) -> int:
    """How many blocks, from the first, recompute their activations in backward instead of saving them."""
    return (c.activation_checkpointing_layers or c.n_layer) if c.activation_checkpointing else 0


def memory_plan(raw, c, world: int, device_type: str) -> list:
    """[(what, bytes per process)] for one optimizer step of `raw` (built on the meta device: only
    shapes are read) with c's micro-batch, precision, DDP or FSDP2 and activation checkpointing.
    Counted, not measured: parameters, gradients and AdamW state exactly; activations from
    block_activation_bytes; the peaks of forward, backward and the optimizer step are simply added."""
    cfg = raw.config
    blocks = raw.model.layers
    P = sum(p.numel() for p in raw.parameters())
    P_blk = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    P_root = P - sum(p.numel() for b in blocks for p in b.parameters())  # embeddings, final norm, LM head
    mm_blk = max(sum(m.weight.numel() for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                     b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)) for b in blocks)
    mixed = compute_dtype(device_type, c) == "bfloat16"
    e = 2 if mixed else 4
    N = c.batch_size * c.block_size  # tokens per micro-step and process
    fused = device_type == "cuda" and cfg.attn_backend != "torch" and cfg.head_dim in (32, 64, 128)
    per_block = [block_activation_bytes(cfg, mode, e, fused) for mode in cfg.layer_modes()]
    d, V = cfg.n_embd, cfg.vocab_size
    top = 8 * d + 4 + e * d + 4 + 16  # final norm; the loss's h, logsumexp, targets and input ids
    n_ac = checkpointed_blocks(c)
    kept = n_ac * 4 * d + sum(per_block[n_ac:])  # a recomputed block keeps only its input
    chunk = max(1, LOSS_CHUNK_LOGITS // V)
    plan = []
    fused_adam = device_type == "cuda"  # configure_optimizer: fused on CUDA, foreach temporaries else
    adam = ("AdamW moments" + ("" if fused_adam else " + step temporaries"), (8 if fused_adam else 12) * P)
    if c.fsdp:  # infra/sharding.py: bf16 compute all-gathers bf16 parameters and reduces float32 gradients
        g = 2 if mixed else 4
        plan += [("parameters, float32 shard", 4 * P / world), ("gradients, float32 shard", 4 * P / world),
                 (adam[0] + ", shard", adam[1] / world),
                 (f"all-gathered parameters{' (bf16)' if mixed else ''} (root + 3 blocks)", g * (P_root + 3 * P_blk)),
                 # bf16 gradients are cast to float32 for the reduce-scatter one unit at a time
                 ("unsharded gradients (root + 2 blocks)", g * (P_root + 2 * P_blk) + (4 * max(P_blk, V * d) if mixed else 0))]
    else:
        plan += [("parameters, float32", 4 * P), ("gradients, float32", 4 * P), adam]
    if mixed and not c.fsdp:  # autocast's bf16 copies of the block matmul weights, saved for backward (one
        # for all recomputed blocks: only the block being recomputed has its copies)
        plan.append(("bf16 weight copies (autocast)", 2 * mm_blk * (len(blocks) - n_ac + (n_ac > 0))))
    plan += [(f"activations saved for backward ({c.batch_size} x {c.block_size} tokens)", N * (kept + top)),
             ("backward working set (one block)", N * max(per_block)),
             (f"LM loss: {chunk} tokens x {V} logits at a time", lm_loss_bytes(N, V, d, e, chunk, dw=not c.fsdp,
                                                                                   cast=not (c.fsdp and mixed)))]
    return plan


def lm_loss_bytes(N, V, d, e, chunk, dw=True, p=4, cast=True) -> int:
    """Peak bytes infra.loss.lm_loss allocates beyond its inputs, forward or backward, for N rows, vocabulary
    V, width d, matmul dtype of e bytes, parameters of p bytes; dw: count the head's gradient (with FSDP
    it is the unsharded gradient, counted there); cast: W is cast to the matmul dtype (not when FSDP
    all-gathers it in bf16). Tensor by tensor from infra.loss._ChunkedLMLoss, checked
    against a process's peak RSS in tests/test_cluster.py. L = the logits of one chunk (forward: rows)
    or block (backward: vocabulary), float32: forward holds the previous chunk's while forming the next
    (its matmul output too, when that is bf16) and logsumexp's exp; backward the block, softmaxed in
    place (and its bf16 copy), dh in float32 (and its cast) and, under bf16, a block of W and of dW."""
    rows = min(chunk, N)
    L, block, mixed = rows * V, max(1, rows * V // max(N, 1)), e != 4
    forward = (e * V * d * cast + e * L if mixed else 0) + 8 * L
    backward = (p * V * d if dw else 0) + 4 * L + 4 * N * d + (e * L + e * N * d + 2 * e * block * d if mixed else 0)
    return max(forward, backward)


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory(device, processes: int):
    """(bytes this process may use, where): free memory of its GPU, or its share of the RAM that
    /proc/meminfo calls available (MemAvailable), split between the processes of this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], torch.cuda.get_device_name(device)
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None, "this machine"  # not Linux: no check
    return kib * 1024 // processes, "this machine's RAM" + (f" / {processes} processes" if processes > 1 else "")


def check_memory(raw, c, device, world):
    """Refuse, before anything is allocated, a step whose memory plan exceeds what the device has."""
    plan = memory_plan(raw, c, world, device.type)
    need = sum(b for _, b in plan)
    have, where = available_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if have is None or need <= have:
        return
    big = ", ".join(f"{what} {gib(b)}" for what, b in sorted(plan, key=lambda x: -x[1])[:3])
    act = dict(plan)[f"activations saved for backward ({c.batch_size} x {c.block_size} tokens)"]
    n_layer, n_ac = c.n_layer, checkpointed_blocks(c)
    raise TrainError(f"one training step needs about {gib(need)} per process ({big}) but {where} has "
                     f"{gib(have)} available; lower batch_size (now {c.batch_size}, {act / c.batch_size / 2**20:.1f} MiB "
                     f"of activations per sequence) or block_size (now {c.block_size})"
                     + ("" if n_ac == n_layer else ", or set activation_checkpointing=True" if not n_ac else
                        f", or recompute more blocks (activation_checkpointing_layers={n_ac} of {n_layer}; 0 = all)")
                     + (", or use fsdp=True" if world > 1 and not c.fsdp else "")
                     + "; python train.py ... --dry_run prints the whole plan")


def print_plan(raw, c, world, gpu) -> bool:
    """--dry_run: the memory plan of one step of c's run on `world` x `gpu`, printed; True if it fits."""
    spec = gpu_spec(gpu)
    if spec is None:
        raise TrainError(f"dry_run_gpu={gpu!r} is not a GPU this script knows; choose one of {list(GPUS)}")
    plan = memory_plan(raw, c, world, "cuda")
    total, usable = sum(b for _, b in plan), 0.9 * spec[1] * 2**30
    print(f"memory plan per GPU: {raw.num_params(non_embedding=False) / 1e9:.3f}B parameters, "
          f"{'FSDP2' if c.fsdp else 'DDP'} on {world} x {gpu} ({spec[1]} GiB), micro-batch "
          f"{c.batch_size} x {c.block_size} tokens, {compute_dtype('cuda', c)}, activation checkpointing "
          f"{ac_words(c)}")
    for what, b in plan:
        print(f"  {what:52s} {gib(b):>11s}")
    print(f"  {'total':52s} {gib(total):>11s}  of {gib(usable)} usable (90%: the rest for the CUDA context, "
          f"NCCL and fragmentation): {'fits' if total <= usable else 'does NOT fit'}")
    # recomputing a block costs its forward again (~1/3 of its step): recompute no more blocks than needed
    least = next((n for n in range(c.n_layer + 1) if sum(b for _, b in memory_plan(
        raw, with_checkpointing(c, n), world, "cuda")) <= usable), None)
    if least is not None and least != checkpointed_blocks(c):
        print(f"  the least activation checkpointing that fits: {ac_words(with_checkpointing(c, least))}"
              f" (--activation_checkpointing={least > 0}" + (f" --activation_checkpointing_layers={least})" if least else ")"))
    return total <= usable


def with_checkpointing(c, n):
    """c with the first n blocks recomputed in backward (0: none)."""
    return dataclasses.replace(c, activation_checkpointing=n > 0, activation_checkpointing_layers=n)


def ac_words(c) -> str:
    n = checkpointed_blocks(c)
    return "off" if n == 0 else "on" if n == c.n_layer else f"on for the first {n} of {c.n_layer} blocks"
