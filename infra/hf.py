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

    python -m infra.hf <dir>      # prints the config and tensor inventory of a checkpoint
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.distributed as dist

from infra.files import atomic_open, atomic_write, make_dirs, read_json, remove, replace_dir, writing
from infra.fsdp import local_rows

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
PE_MODES = {"none": "rope", "nope": "nope", "swigluex_multihead": "repo"}  # authors' mode -> ours
NANOREPO_MODE = "nanorepo_layer_pattern"  # ours, for models their format cannot describe (see config_to_hf)
_POSITIONER = ".self_attn.positioner."


# ----- remote code ------------------------------------------------------------------------

# remote code for stock transformers (hf_interop/remote/): copied beside config.json of every export that
# needs it, so AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) runs RePo, NoPE and mixed models
REMOTE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_interop", "remote")
FILES = ("configuration_repo_olmo2.py", "modeling_repo_olmo2.py")
MODEL_TYPE = "repo_olmo2"
AUTO_MAP = {"AutoConfig": "configuration_repo_olmo2.RePoOlmo2Config",
            "AutoModel": "modeling_repo_olmo2.RePoOlmo2Model",
            "AutoModelForCausalLM": "modeling_repo_olmo2.RePoOlmo2ForCausalLM"}


def needs_remote_code(layer_modes) -> bool:
    return set(layer_modes) != {"rope"}


def remote_config(hf: dict) -> dict:
    """config.json's dict pointed at the remote code."""
    return {**hf, "model_type": MODEL_TYPE, "architectures": ["RePoOlmo2ForCausalLM"], "auto_map": dict(AUTO_MAP)}


def write_remote_files(path):
    for name in FILES:
        with open(os.path.join(REMOTE_DIR, name), "rb") as f:
            atomic_write(os.path.join(path, name), f.read())


# ----- safetensors ---------------------------------------------------------------------------

MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def read_safetensors_header(path):
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a .safetensors file, the
    header checked before anything is allocated: random bytes or another format are refused by name."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file: its first 8 bytes announce a {n}-byte header, more "
                             f"than the {size - 8} bytes that follow or the format's limit of {MAX_HEADER} "
                             "(damaged, truncated or another format)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _is_tensor_entry(info):
            raise ValueError(f"{path}: the header entry of tensor {name!r} is not a safetensors tensor description "
                             f"(dtype, shape, data_offsets): {str(info)[:200]}")
    return header, 8 + n


def _is_tensor_entry(info) -> bool:
    """{"dtype": str, "shape": [non-negative ints], "data_offsets": [begin, end]}, 0 <= begin <= end."""
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and \
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and \
        0 <= offsets[0] <= offsets[1]


def read_safetensors(path) -> dict:
    """{name: tensor} from one .safetensors file; tensors view a copy-on-write memory map."""
    header, start = read_safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=start) if os.path.getsize(path) > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, (b, e) = _DTYPES[info["dtype"]], info["data_offsets"]
        if e > len(data) or e - b != int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} points outside the file or has the wrong byte size (truncated?)")
        raw = data[b:e]
        if (start + b) % dtype.itemsize:  # misaligned for its dtype: copy
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


def weight_files(path) -> dict:
    """{tensor name: file} of a checkpoint directory, from model.safetensors.index.json or the header
    of model.safetensors (no tensor data is read)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: key 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} lists shard {shard}, which is missing")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return dict.fromkeys(read_safetensors_header(single)[0], single)
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json"
                            + (f" (found {other}: only safetensors checkpoints are supported)" if other else ""))


def read_weights(path) -> dict:
    tensors = {}
    for file in sorted(set(weight_files(path).values())):
        tensors.update(read_safetensors(file))
    return tensors


# ----- config.json <-> GPTConfig fields -------------------------------------------------------

# the keys config_from_hf reads and the JSON types they must have: a float head count, a string
# hidden size or a missing key is refused by name instead of failing somewhere inside the model
_INT, _NUM, _BOOL, _STR, _OBJ = "a positive integer", "a positive number", "true or false", "a string", "an object"
CONFIG_KEYS = dict(vocab_size=_INT, hidden_size=_INT, intermediate_size=_INT, num_hidden_layers=_INT,
                   num_attention_heads=_INT)  # required
OPTIONAL_KEYS = dict(num_key_value_heads=_INT, head_dim=_INT, max_position_embeddings=_INT, rope_theta=_NUM,
                     rms_norm_eps=_NUM, initializer_range=_NUM, tie_word_embeddings=_BOOL, attention_bias=_BOOL,
                     hidden_act=_STR, pe_config=_OBJ, rope_parameters=_OBJ, rope_scaling=_OBJ)


def _has_type(value, kind) -> bool:
    if kind == _INT:
        return type(value) is int and value > 0
    if kind == _NUM:
        return type(value) in (int, float) and math.isfinite(value) and value > 0
    return isinstance(value, {_BOOL: bool, _STR: str, _OBJ: dict}[kind])


def check_config_json(hf: dict, source="config.json"):
    """The model type, and every key config_from_hf reads: present if required, of its JSON type."""
    kind = hf.get("model_type")
    if kind not in ("olmo2", "repo_olmo2"):  # repo_olmo2: the same config with remote code (hf_interop)
        raise ValueError(f"{source} describes model_type {kind!r} (architectures {hf.get('architectures')}); "
                         "only OLMo-2 ('olmo2', 'repo_olmo2') checkpoints can be loaded")
    for key, kind in {**CONFIG_KEYS, **OPTIONAL_KEYS}.items():
        if key not in hf:
            if key in CONFIG_KEYS:
                raise ValueError(f"{source}: required key {key!r} is missing")
        elif not (hf[key] is None and key in OPTIONAL_KEYS) and not _has_type(hf[key], kind):
            raise ValueError(f"{source}: key {key!r} must be {kind}, got {json.dumps(hf[key])}")
    d, h, kv = hf["hidden_size"], hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if d % h or (d // h) % 2:
        raise ValueError(f"{source}: hidden_size={d} does not split into num_attention_heads={h} heads of even size")
    if h % kv:
        raise ValueError(f"{source}: num_attention_heads={h} is not a multiple of num_key_value_heads={kv}")


def layer_modes_from_hf(hf: dict, n_layer: int, source="config.json") -> list:
    pe = hf.get("pe_config") or {}
    if pe.get("layer_pattern"):  # our own key: the exact per-layer modes
        modes = [m.strip() for m in str(pe["layer_pattern"]).split(",")]
        if len(modes) != n_layer:
            raise ValueError(f"{source}: pe_config.layer_pattern has {len(modes)} entries but num_hidden_layers is {n_layer}")
        return modes
    mode = pe.get("dynamic_pe_mode", "none")
    if mode not in PE_MODES:
        raise ValueError(f"{source}: pe_config.dynamic_pe_mode={mode!r} is not supported; known modes: {sorted(PE_MODES)}")
    key = "dynmaic_pe_start_layer" if "dynmaic_pe_start_layer" in pe else "dynamic_pe_start_layer"  # their stack reads the typo
    start = pe.get(key, 0)
    if type(start) is not int or not 0 <= start < n_layer:
        raise ValueError(f"{source}: pe_config.{key}={json.dumps(start)} must be a layer index in 0..{n_layer - 1} "
                         f"(num_hidden_layers is {n_layer})")
    key = "dynmaic_pe_layer_ids" if "dynmaic_pe_layer_ids" in pe else "dynamic_pe_layer_ids"
    ids = pe.get(key) or ""
    ids = ids if isinstance(ids, list) else [i for i in str(ids).split(",") if i.strip()]
    try:
        chosen = {int(i) for i in ids} if ids else set(range(n_layer))
    except (TypeError, ValueError):
        chosen = None
    if chosen is None or not chosen <= set(range(n_layer)):
        raise ValueError(f"{source}: pe_config.{key}={json.dumps(pe.get(key))} must list layer indices in "
                         f"0..{n_layer - 1}, comma separated")
    return [PE_MODES[mode] if (i >= start and i in chosen) else "rope" for i in range(n_layer)]


def config_from_hf(hf: dict, source="config.json", weight_layers=None):
    """config.json -> (GPTConfig keyword arguments, per-layer modes). The modes go in as an explicit
    layer_pattern: the one form that says every layer's mode, whatever the checkpoint's start layer.
    source names the file in error messages; weight_layers, the layer indices the weights hold, are
    checked against num_hidden_layers before anything that depends on the layer count."""
    check_config_json(hf, source)
    if weight_layers is not None and set(weight_layers) != set(range(hf["num_hidden_layers"])):
        raise ValueError(f"{source}: num_hidden_layers is {hf['num_hidden_layers']} but the weights hold "
                         + (f"layers {sorted(weight_layers)}" if weight_layers else "no model.layers.* tensors"))
    if hf.get("attention_bias"):
        raise ValueError(f"{source} has attention_bias=true; OLMo-2/RePo models have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source} has hidden_act={hf['hidden_act']!r}; the OLMo-2 MLP is SwiGLU (silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"{source} asks for RoPE scaling ({scaling or rope}); load without it and use "
                         "eval.py's YaRN option for longer contexts")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h):
        raise ValueError(f"{source} has head_dim={hf['head_dim']} but hidden_size/num_attention_heads = {d // h}")
    n_layer = hf["num_hidden_layers"]
    modes = layer_modes_from_hf(hf, n_layer, source)
    kw = dict(vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=h, n_kv_head=hf.get("num_key_value_heads") or h,
              n_embd=d, intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings") or 4096,
              rope_theta=float(rope.get("rope_theta", hf.get("rope_theta") or 10000.0)),
              norm_eps=hf.get("rms_norm_eps") or 1e-6, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
              init_std=hf.get("initializer_range") or 0.02, layer_pattern=",".join(modes))
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
    # RePo / NoPE layers: stock transformers must not run this as OLMo-2, so it names our remote code
    return remote_config(hf) if needs_remote_code(modes) else hf


# ----- load / save ---------------------------------------------------------------------------

def hf_name(name: str) -> str:
    return name.replace(_POSITIONER, ".self_attn.")


def read_config(path, **overrides):
    """(GPTConfig keyword arguments, with overrides, and the checkpoint's per-layer modes) of an HF
    checkpoint directory. Overrides of the layer modes replace the checkpoint's own pattern."""
    kw, modes = _read_config(path)
    known = set(kw) | {"pos_mode", "repo_start_layer", "attn_backend"}  # every GPTConfig field
    if set(overrides) - known:
        raise ValueError(f"unknown override(s) {sorted(set(overrides) - known)}; GPTConfig fields are {sorted(known)}")
    if set(overrides) & {"pos_mode", "repo_start_layer"} and "layer_pattern" not in overrides:
        kw["layer_pattern"] = ""
    return {**kw, **overrides}, modes


def _read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (expected an HF checkpoint: config.json + model.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json")
    # the layer count is checked against the weights (their names only): a wrong num_hidden_layers
    # would otherwise surface as an error about some other key (a start layer out of range)
    hf = read_json(cfg_path)
    check_config_json(hf, cfg_path)
    layers = {int(k.split(".")[2]) for k in weight_files(path) if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    return config_from_hf(hf, cfg_path, layers)


def load_weights(model, path, ckpt_modes, allow_non_finite=False):
    """Copy the checkpoint's tensors into model (a GPT, whole or sharded by FSDP2), refusing missing,
    unexpected or mis-shaped ones, and NaN/inf weights unless allow_non_finite. Positioners of layers
    that were not RePo layers in the checkpoint keep their fresh init."""
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
    rows = {k: local_rows(p) for k, p in own.items() if k in tensors}  # an FSDP2 shard: only its rows
    if not allow_non_finite:  # a diverged or damaged model would be evaluated as if it were fine
        counts = [int((~torch.isfinite(tensors[k][row0:row0 + local.shape[0]])).sum())
                  if tensors[k].is_floating_point() else 0 for k, (local, row0) in rows.items()]
        if any(hasattr(p, "to_local") for p in own.values()) and dist.is_initialized():
            # each rank checked its rows: add up, so that all fail together or none does
            total = torch.tensor(counts, dtype=torch.int64, device=next(iter(rows.values()))[0].device)
            dist.all_reduce(total)
            counts = total.tolist()
        bad = [f"{k} ({n} of {tensors[k].numel()})" for k, n in zip(rows, counts) if n]
        if bad:
            raise ValueError(f"{path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the checkpoint is damaged or "
                             "its training diverged (GPT.from_pretrained(..., allow_non_finite=True) loads it anyway)")
    with torch.no_grad():
        for k, (local, row0) in rows.items():  # an FSDP2 shard reads only its rows of the memory map
            local.copy_(tensors[k][row0:row0 + local.shape[0]])


def save(model, path, **config_extras):
    make_dirs(path)
    tensors = {hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        head = tensors.pop("lm_head.weight")
        if head is not tensors["model.embed_tokens.weight"] and not torch.equal(head, tensors["model.embed_tokens.weight"]):
            # the file stores one matrix for both: writing it would silently drop the trained head
            raise ValueError("the config says tie_word_embeddings but lm_head.weight and model.embed_tokens.weight "
                             "differ (the model was untied, e.g. materialised with to_empty() without "
                             "GPT.tie_weights()); refusing to write a checkpoint that loses the LM head")
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    hf = config_to_hf(model.config, config_extras)
    if needs_remote_code(model.config.layer_modes()):
        write_remote_files(path)
    atomic_write(os.path.join(path, "config.json"), json.dumps(hf, indent=2))
    # generate()'s defaults: stop at the end-of-text token, pad with the pad token
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    atomic_write(os.path.join(path, "generation_config.json"), json.dumps({"_from_model_config": True, **gen}, indent=2))



def export(model, path, extra=None, **config_extras):
    """save(model) and extra(folder) (the tokenizer, say) into path, replaced as a whole: a failed
    export leaves the previous one in place and no path.tmp behind."""
    tmp = path.rstrip("/") + ".tmp"
    remove(tmp)
    with writing(path, cleanup=tmp):
        save(model, tmp, **config_extras)
        if extra is not None:
            extra(tmp)
        replace_dir(tmp, path)

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m infra.hf <checkpoint dir>")
    try:
        kw, modes = read_config(sys.argv[1])
        print(kw, "\nlayer modes:", modes)
        from data.tokenizer import has_tokenizer, load_tokenizer
        if has_tokenizer(sys.argv[1]):  # ours or Hugging Face's tokenizer.json, read as every script reads it
            enc = load_tokenizer(sys.argv[1])
            print(f"tokenizer: {enc.name}, n_vocab {enc.n_vocab}, end of text {enc.eot_token}, "
                  f"{len(enc._special_tokens)} special tokens")
        for k, v in read_weights(sys.argv[1]).items():
            print(f"  {k:60s} {str(v.dtype):15s} {tuple(v.shape)}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
