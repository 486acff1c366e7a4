"""
Remote code for Hugging Face model directories: the files in remote/ (a configuration and a
modeling file, torch + transformers only) copied beside config.json, and config.json pointed at
them, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

runs a RePo, NoPE or mixed model exactly in stock transformers. config.json gets model_type
"repo_olmo2" (unknown to stock transformers: without trust_remote_code it refuses the directory
instead of running it as plain OLMo-2), architectures ["RePoOlmo2ForCausalLM"] (not
Olmo2ForCausalLM: a tool that picks an implementation by this name must not take it for OLMo-2)
and auto_map. pe_config
keeps the authors' keys, so their transformers fork still reads it through its own class
(Olmo2ForCausalLM.from_pretrained; the other model_type only warns there). Pure RoPE models need
none of this and stay plain "olmo2".

GPT.save_pretrained does it for every model that needs it. For a directory in the authors' layout
(their released SakanaAI/RePo-OLMo2-1B-stage2-L5, model_type "olmo2" + pe_config):

    python -m hf_interop.remote_code <dir>      # adds the files; keeps the old config.json as config.json.orig
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# what an export carries (infra/hf.py writes it with every model that needs it)
from infra.hf import AUTO_MAP, FILES, MODEL_TYPE, REMOTE_DIR, needs_remote_code, remote_config, write_remote_files  # noqa: E402,F401


def add_remote_code(path) -> str:
    """Make the checkpoint directory path runnable with trust_remote_code; returns what was done."""
    from infra.files import atomic_write, copy_file, read_json
    from infra.hf import read_config
    cfg_path = os.path.join(path, "config.json")
    _, modes = read_config(path)  # refuses anything we could not load ourselves, by name
    if not needs_remote_code(modes):
        return f"{path}: every layer is RoPE, a plain OLMo-2 model: stock transformers runs it as it is, nothing changed"
    hf = read_json(cfg_path)
    if hf.get("model_type") != MODEL_TYPE and not os.path.exists(cfg_path + ".orig"):
        copy_file(cfg_path, cfg_path + ".orig")
    write_remote_files(path)
    atomic_write(cfg_path, json.dumps(remote_config(hf), indent=2))
    return (f"{path}: layer modes {','.join(modes)}; wrote {', '.join(FILES)} and pointed config.json at them "
            "(AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")


def main(argv):
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(add_remote_code(argv[0]))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))  # the repository root: infra, data
    sys.exit(main(sys.argv[1:]))
