"""
How train.py runs a model built on the meta device over its processes: FSDP2 shards every block
and then the rest while nothing is allocated, then each process materialises only its part and
fills it (with the init a whole-model build gets, or its rows of an HF checkpoint); or DDP
replicates it. torch.compile goes inside DDP. full_model gathers an FSDP2 model for export.
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from infra import hf
from infra.checkpoint import TrainError
from infra.memory import compute_dtype
from infra.sharding import shard_model


def parallelize(raw, c, device, weights=None, init=True):
    """(module to call, sync). sync(last) tells DDP whether this micro-step should all-reduce the
    gradients (None without DDP); FSDP2 reduce-scatters after every micro-step, so only sharded
    gradients are ever accumulated (torchtitan's choice: one reduce-scatter per micro-step instead of
    a full unsharded gradient). weights: None = fresh init, else (HF dir, its layer modes); init=False
    when a checkpoint overwrites every tensor next (the init takes minutes per rank at 1B)."""
    model, sync = raw, None
    if c.fsdp:
        shard_model(raw, c, device, bf16=compute_dtype(device.type, c) == "bfloat16")
    raw.to_empty(device=device)
    raw.tie_weights()  # to_empty gives each module its own tensor (FSDP2 keeps one: it shards it once)
    if init:
        raw.reset_parameters()
    if weights is not None:
        try:
            hf.load_weights(raw, *weights)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(f"cannot start from {weights[0]!r}: {e}") from None
    if c.compile:
        model = torch.compile(model)
    if dist.is_initialized() and not c.fsdp:
        # gradients as views into DDP's all-reduce buckets: one copy of them, not two
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
        sync = lambda last: setattr(model, "require_backward_grad_sync", last)  # noqa: E731
    return model, sync


def full_model(raw, sharded, master, build):
    """The whole model on rank 0 for export (None elsewhere): raw itself, or, sharded by FSDP2,
    build(config) filled with the weights gathered onto rank 0's CPU. Every process must call it."""
    if not sharded:
        return raw if master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return None
    with torch.device("meta"):  # no init: every tensor comes from the gathered state
        model = build(raw.config)
    model.load_state_dict(full, assign=True)
    model.tie_weights()  # assign sets each name's tensor: re-tie
    return model
