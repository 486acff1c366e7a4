"""
How train.py shards a GPT with FSDP2 (fully_shard), before anything is allocated: which modules
are units, which dtype they compute and communicate in, and over which devices.

Units: every block; the input embedding; the final norm with the LM head; the root (what is
left). A tied embedding is one matrix and so belongs to one unit: the root. The last unit is not
resharded after forward, as backward needs it at once (torchtitan's layout).

Precision: with bf16 compute, parameters are all-gathered in bf16 and gradients reduce-scattered in
float32 (MixedPrecisionPolicy): the float32 master weights and AdamW state stay sharded, and each
micro-step moves half the bytes it would in float32. The positioners stay float32 units of their
own: their weights set positions that enter sin/cos at up to ~1e3 radians (positioner.py), where
bf16's 8 bits would be several radians off. Inputs are never cast by FSDP (RoPE's inverse
frequencies enter each block in float64); autocast decides the matmul dtype as it does without FSDP.

Devices: one mesh over all processes, or with hsdp_shard (HSDP) a 2-D mesh that shards within
groups of that many processes (e.g. 8, one node: all-gathers stay on NVLink) and replicates across
groups (one all-reduce of the float32 gradient shards per micro-step crosses the network).

    python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=64
"""
import warnings

import torch
import torch.distributed as dist

from infra.checkpoint import TrainError


def shard_model(raw, c, device, bf16: bool):
    """fully_shard raw (a GPT on the meta device) in place: units, precision and mesh as above."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # blocks return (hidden, positions); the positions are views that are never modified in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    mesh = device_mesh(c, device)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if bf16 else fp32
    kw = dict(mesh=mesh, mp_policy=mp)
    for block in raw.model.layers:
        if block.self_attn.positioner is not None and bf16:
            fully_shard(block.self_attn.positioner, mesh=mesh, mp_policy=fp32)
        fully_shard(block, **kw)
    if not raw.config.tie_word_embeddings:
        fully_shard(raw.model.embed_tokens, **kw)
        # the loss reads lm_head.weight directly (infra/loss.py) after the norm's forward has gathered
        # the pair; it stays gathered for the backward that follows. Both modules must run forward each
        # time (GPT.forward calls lm_head for the last position's logits): torch 2.11 skips the pair's
        # next all-gather while one has not, and trains on sharded parameters after an evaluation
        fully_shard([raw.model.norm, raw.lm_head], reshard_after_forward=False, **kw)
    fully_shard(raw, **kw)


def device_mesh(c, device):
    """None (fully_shard's default: all processes, one dimension), or HSDP's (replicate, shard) mesh."""
    world = dist.get_world_size()
    if not c.hsdp_shard or c.hsdp_shard == world:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (world // c.hsdp_shard, c.hsdp_shard), mesh_dim_names=("replicate", "shard"))


def check_hsdp(c, world):
    """Refuse an hsdp_shard that cannot split `world` processes."""
    if c.hsdp_shard and (not c.fsdp or world % c.hsdp_shard):
        raise TrainError(f"hsdp_shard={c.hsdp_shard} needs fsdp=True and must divide the {world} processes (e.g. "
                         "the GPUs per node); 0 shards over all of them")
