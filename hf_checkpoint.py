"""
Hugging Face checkpoint directories for model.py: GPT.from_pretrained / GPT.save_pretrained.

Layout (as allenai/OLMo-2-0425-1B and SakanaAI/RePo-OLMo2-1B-stage2-L5 publish it):
    config.json                        model_type "olmo2", hidden_size, rope_theta, rms_norm_eps, ...
    model.safetensors                  or shards listed in model.safetensors.index.json
RePo checkpoints add to config.json
    "pe_config": {"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": 5, ...}
(the authors' stack reads the misspelled key; we read it first and fall back to the correct
spelling, and write both) and, for layers >= start, the positioner weights
    model.layers.{i}.self_attn.{gate_map,content_map,final_map}.weight
Our own key "layer_pattern" in pe_config records per-layer modes the authors' format cannot
express (mixtures of NoPE and RePo layers).

Tensor names are Hugging Face's; in model.py the positioner is a submodule, so
"self_attn.positioner.gate_map" <-> "self_attn.gate_map" is the only renaming.
safetensors is read and written here with numpy/torch only (the format is an 8-byte header
length, a JSON header and raw little-endian bytes), keeping the runtime to torch/numpy/tiktoken/triton.

    python hf_checkpoint.py <dir>      # prints the config and tensor inventory of a checkpoint
"""
import json
import os
import struct
import sys

import numpy as np
import torch

from data.files import atomic_open, atomic_write

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
PE_MODES = {"none": "rope", "nope": "nope", "swigluex_multihead": "repo"}  # authors' mode -> ours
NANOREPO_MODE = "nanorepo_layer_pattern"  # ours, for models their format cannot describe (see config_to_hf)
_POSITIONER = ".self_attn.positioner."


# ----- safetensors ---------------------------------------------------------------------------

def read_safetensors(path) -> dict:
    """{name: tensor} from one .safetensors file; tensors view a copy-on-write memory map."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if os.path.getsize(path) > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, (b, e) = _DTYPES[info["dtype"]], info["data_offsets"]
        if e > len(data) or e - b != int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} points outside the file or has the wrong byte size (truncated?)")
        raw = data[b:e]
        if (8 + n + b) % dtype.itemsize:  # misaligned for its dtype: copy
            raw = raw.copy()
        out[name] = torch.from_numpy(raw).view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path, tensors: dict, metadata=None):
    header, offset = {}, 0
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def read_weights(path) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            if not os.path.exists(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} lists shard {shard}, which is missing")
            tensors.update(read_safetensors(os.path.join(path, shard)))
        return tensors
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return read_safetensors(single)
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json"
                            + (f" (found {other}: only safetensors checkpoints are supported)" if other else ""))


# ----- config.json <-> GPTConfig fields -------------------------------------------------------

def layer_modes_from_hf(hf: dict, n_layer: int) -> list:
    pe = hf.get("pe_config") or {}
    if pe.get("layer_pattern"):  # our own key: the exact per-layer modes
        modes = [m.strip() for m in pe["layer_pattern"].split(",")]
        if len(modes) != n_layer:
            raise ValueError(f"pe_config.layer_pattern has {len(modes)} entries but num_hidden_layers is {n_layer}")
        return modes
    mode = pe.get("dynamic_pe_mode", "none")
    if mode not in PE_MODES:
        raise ValueError(f"pe_config.dynamic_pe_mode={mode!r} is not supported; known modes: {sorted(PE_MODES)}")
    start = pe.get("dynmaic_pe_start_layer", pe.get("dynamic_pe_start_layer", 0))  # their stack reads the typo
    ids = pe.get("dynmaic_pe_layer_ids", pe.get("dynamic_pe_layer_ids", "")) or ""
    chosen = {int(i) for i in str(ids).split(",") if i.strip()} if str(ids).strip() else set(range(n_layer))
    return [PE_MODES[mode] if (i >= int(start) and i in chosen) else "rope" for i in range(n_layer)]


def config_from_hf(hf: dict):
    """config.json -> (GPTConfig keyword arguments, per-layer modes). The modes go in as an explicit
    layer_pattern: the one form that says every layer's mode, whatever the checkpoint's start layer."""
    kind = hf.get("model_type")
    if kind != "olmo2":
        raise ValueError(f"config.json describes model_type {kind!r} (architectures {hf.get('architectures')}); "
                         "only OLMo-2 ('olmo2') checkpoints can be loaded")
    if hf.get("attention_bias"):
        raise ValueError("config.json has attention_bias=true; OLMo-2/RePo models have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; the OLMo-2 MLP is SwiGLU (silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"config.json asks for RoPE scaling ({scaling or rope}); load without it and use "
                         "eval.py's YaRN option for longer contexts")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h):
        raise ValueError(f"config.json has head_dim={hf['head_dim']} but hidden_size/num_attention_heads = {d // h}")
    n_layer = hf["num_hidden_layers"]
    modes = layer_modes_from_hf(hf, n_layer)
    kw = dict(vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=h, n_kv_head=hf.get("num_key_value_heads") or h,
              n_embd=d, intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 4096),
              rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
              norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
              init_std=hf.get("initializer_range", 0.02), layer_pattern=",".join(modes))
    return kw, modes


def authors_format_problem(config):
    """Why the authors' pe_config cannot describe this model (None if it can): it has one mode for
    all non-RoPE layers, and their positioner has one output per query head (MHA only)."""
    special = set(config.layer_modes()) - {"rope"}
    if len(special) > 1:
        return "it mixes NoPE and RePo layers (their pe_config has one mode for all non-RoPE layers)"
    if "repo" in special and config.n_kv_head != config.n_head:
        return (f"its RePo layers use grouped-query attention (final_map is [n_kv_head={config.n_kv_head}, d/8]; "
                f"their stack expects [n_head={config.n_head}, d/8])")
    return None


def config_to_hf(config, extras=None) -> dict:
    modes = config.layer_modes()
    hf = {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": config.vocab_size,
          "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
          "num_key_value_heads": config.n_kv_head, "hidden_act": "silu",
          "max_position_embeddings": config.block_size, "initializer_range": config.init_std,
          "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
          "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": config.tie_word_embeddings,
          "use_cache": True, "torch_dtype": "float32", "pad_token_id": None, "bos_token_id": None,
          "eos_token_id": None}
    if set(modes) != {"rope"}:
        if authors_format_problem(config):
            # a mode name the authors' stack does not know: DynamicPeMode.verify refuses the file there,
            # instead of loading it as something else; from_pretrained reads layer_pattern
            hf["pe_config"] = {"dynamic_pe_mode": NANOREPO_MODE, "layer_pattern": ",".join(modes)}
        else:
            special = [i for i, m in enumerate(modes) if m != "rope"]
            mode = {v: k for k, v in PE_MODES.items()}[modes[special[0]]]
            ids = ",".join(str(i) for i in special)
            hf["pe_config"] = {"dynamic_pe_mode": mode, "dynmaic_pe_start_layer": special[0],
                               "dynamic_pe_start_layer": special[0], "dynmaic_pe_layer_ids": ids,
                               "dynamic_pe_layer_ids": ids, "layer_pattern": ",".join(modes)}
    hf.update(extras or {})
    return hf


# ----- load / save ---------------------------------------------------------------------------

def hf_name(name: str) -> str:
    return name.replace(_POSITIONER, ".self_attn.")


def read_config(path):
    """(GPTConfig keyword arguments, per-layer modes) of an HF checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (expected an HF checkpoint: config.json + model.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(cfg_path) as f:
        return config_from_hf(json.load(f))


def load_weights(model, path, ckpt_modes):
    """Copy the checkpoint's tensors into model (a GPT, whole or sharded by FSDP2), refusing missing,
    unexpected or mis-shaped ones. Positioners of layers that were not RePo layers in the checkpoint
    keep their fresh init."""
    tensors = {k: v for k, v in read_weights(path).items() if not k.endswith("rotary_emb.inv_freq")}
    own = {hf_name(k): p for k, p in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight")
    fresh = {k for k in own if k.split(".")[-2] in ("gate_map", "content_map", "final_map")
             and ckpt_modes[int(k.split(".")[2])] != "repo"}
    missing = sorted(set(own) - set(tensors) - fresh)
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    problems = ([f"missing tensors: {missing}"] if missing else []) + \
               ([f"unexpected tensors (not in the model as configured): {unexpected}"] if unexpected else []) + \
               ([f"mis-shaped tensors: {shapes}"] if shapes else [])
    if problems:
        raise ValueError(f"{path} does not match {model.config}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, p in own.items():
            if k in tensors:
                local, row0 = local_rows(p)  # an FSDP2 shard reads only its rows of the memory map
                local.copy_(tensors[k][row0:row0 + local.shape[0]])


def local_rows(p):
    """(the part of tensor p this process holds, the index of its first row in the full tensor):
    p itself, or the local shard of an FSDP2 DTensor (dim-0 chunks of ceil(rows / world) rows)."""
    if not hasattr(p, "to_local"):
        return p.data, 0
    assert p.device_mesh.ndim == 1 and p.placements[0].is_shard(0), p.placements  # FSDP2's layout
    (rank,), (world,) = p.device_mesh.get_coordinate(), p.device_mesh.shape
    return p.to_local(), rank * -(-p.shape[0] // world)


def save(model, path, **config_extras):
    os.makedirs(path, exist_ok=True)
    tensors = {hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    atomic_write(os.path.join(path, "config.json"), json.dumps(config_to_hf(model.config, config_extras), indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hf_checkpoint.py <checkpoint dir>")
    kw, modes = read_config(sys.argv[1])
    print(kw, "\nlayer modes:", modes)
    for k, v in read_weights(sys.argv[1]).items():
        print(f"  {k:60s} {str(v.dtype):15s} {tuple(v.shape)}")
