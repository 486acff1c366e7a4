"""
train.py's configuration checked before anything is built or written: every key in its range (each
named once, with what it must be), the choices, the model's keys as GPTConfig checks them, and a
device and attention backend this machine can run. Each problem is one TrainError.
"""
import math
from dataclasses import asdict

import torch

from infra.checkpoint import TrainError


def check_config(c, choices, model_config, interpreted=False):
    """Every value of train.py's config c in range, before any data is read or file written; choices:
    {key: allowed values}; model_config(c, n_vocab) builds the GPTConfig, which checks the model's keys;
    interpreted: whether Triton kernels run on the CPU here (TRITON_INTERPRET=1)."""
    positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "n_layer", "n_head", "n_embd",
                "dist_timeout", "keep_ckpts")
    non_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens", "vocab_size",
                    "hsdp_shard", "n_kv_head", "intermediate_size", "learning_rate", "min_lr", "weight_decay", "grad_clip", "z_loss",
                    "gradient_accumulation_steps", "dry_run_world", "init_std", "adam_eps",
                    "activation_checkpointing_layers")
    rules = {**{k: (lambda v: v >= 1, ">= 1") for k in positive}, **{k: (lambda v: v >= 0, ">= 0") for k in non_negative},
             "rope_theta": (lambda v: v > 0, "> 0"), "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)")}
    bad = {k: need for k, (ok, need) in rules.items() if not ok(getattr(c, k))}  # `not ok` catches NaN
    bad.update({k: "finite" for k, v in asdict(c).items() if isinstance(v, float) and not math.isfinite(v)})
    if bad:  # each key once, with what it must be
        raise TrainError("out of range: " + ", ".join(f"{k}={getattr(c, k)} (must be {need})" for k, need in bad.items()))
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise TrainError(f"{key}={getattr(c, key)!r}; choose one of {allowed}")
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        raise TrainError(f"beta1 and beta2 must lie in [0, 1), got {c.beta1}, {c.beta2}")
    if c.activation_checkpointing_layers > c.n_layer:
        raise TrainError(f"activation_checkpointing_layers={c.activation_checkpointing_layers} but the model has "
                         f"{c.n_layer} layers; use 0 (all) to {c.n_layer}")
    if c.min_lr > c.learning_rate:
        raise TrainError(f"min_lr={c.min_lr} is above learning_rate={c.learning_rate}: the schedule would rise; "
                         "set min_lr <= learning_rate")
    if not c.out_dir or not c.dataset:
        raise TrainError("out_dir and dataset must not be empty")
    check_model_keys(c, model_config, interpreted)
    if c.overwrite and c.init_from == "resume":
        raise TrainError("overwrite=True starts a new run in out_dir; it cannot be combined with init_from=resume")
    if c.device != "auto":
        try:
            device = torch.device(c.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise TrainError(f"device={c.device!r} is not a device train.py runs on; use auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"device={c.device!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device=cpu (or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise TrainError(f"device={c.device!r} but there are only {torch.cuda.device_count()} CUDA devices")


def check_model_keys(c, model_config, interpreted):
    """The model's keys as GPTConfig checks them, and a backend the device can run, before any data is
    read or file written (with init_from=<HF dir> that checkpoint's config decides and is checked)."""
    if c.init_from in ("scratch", "resume"):
        try:
            model_config(c, n_vocab=c.vocab_size or 1)
        except ValueError as e:
            raise TrainError(str(e).split(": GPTConfig(")[0]) from None
    on_gpu = c.device.startswith("cuda") or (c.device == "auto" and torch.cuda.is_available())
    if c.attn_backend in ("triton", "rotary") and not on_gpu and not interpreted:
        raise TrainError(f"attn_backend={c.attn_backend!r} runs Triton kernels, which need a CUDA GPU (this run is on "
                         "the CPU); use --attn_backend=auto or torch (or set TRITON_INTERPRET=1 to run the kernels "
                         "in Triton's slow interpreter)")
